//! Serves the local API on the daemon's unix socket.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::Stream;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::local_server::{Local, LocalServer};
use super::proto::{self, ListRequest, ListResponse, PluginsRequest, PluginsResponse, WatchEvent};
use super::{change_kind_to_proto, resource_to_proto};
use crate::runtime::PluginStatuses;
use crate::store::{ChangeKind, Kind, Namespace, Resource, Store};

/// How many events a slow CLI watcher may have in flight.
const WATCH_QUEUE: usize = 256;

pub struct LocalApi {
    pub store: Arc<Store>,
    pub statuses: Arc<PluginStatuses>,
    pub shutdown: CancellationToken,
}

fn parse_request(request: &ListRequest) -> Result<(Namespace, Kind), Status> {
    let namespace = Namespace::parse(&request.namespace).ok_or_else(|| {
        Status::invalid_argument(format!(
            "namespace {:?}: use cluster or cluster-raw",
            request.namespace
        ))
    })?;
    let kind = Kind::from_type_name(&request.r#type)
        .ok_or_else(|| Status::invalid_argument(format!("unknown type {:?}", request.r#type)))?;
    Ok((namespace, kind))
}

#[tonic::async_trait]
impl Local for LocalApi {
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let (namespace, kind) = parse_request(request.get_ref())?;
        let resources = self
            .store
            .list(namespace, kind)
            .iter()
            .map(resource_to_proto)
            .collect();
        Ok(Response::new(ListResponse { resources }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<ListRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (namespace, kind) = parse_request(request.get_ref())?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(forward_changes(
            self.store.clone(),
            namespace,
            kind,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn plugins(
        &self,
        _: Request<PluginsRequest>,
    ) -> Result<Response<PluginsResponse>, Status> {
        Ok(Response::new(plugins_response(&self.statuses)))
    }

    type WatchPluginsStream = Pin<Box<dyn Stream<Item = Result<PluginsResponse, Status>> + Send>>;

    async fn watch_plugins(
        &self,
        _: Request<PluginsRequest>,
    ) -> Result<Response<Self::WatchPluginsStream>, Status> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let statuses = self.statuses.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // Changes in quick succession collapse into one message.
            let mut changes = statuses.subscribe();
            loop {
                changes.borrow_and_update();
                if tx.send(Ok(plugins_response(&statuses))).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn plugins_response(statuses: &PluginStatuses) -> PluginsResponse {
    let plugins = statuses
        .list()
        .into_iter()
        .map(|s| proto::Plugin {
            name: s.name,
            prefix: s.prefix,
            state: s.state.as_str().to_string(),
            restarts: s.restarts,
            last_error: s.last_error.unwrap_or_default(),
            healthy: s.healthy,
            message: s.message,
            published: s.published as u64,
        })
        .collect();
    PluginsResponse { plugins }
}

/// Sends the current resources, then each change. A watcher that falls behind the
/// store's buffer is brought up to date by comparing against a fresh list, so it
/// never misses the final state of any resource.
async fn forward_changes(
    store: Arc<Store>,
    namespace: Namespace,
    kind: Kind,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
    shutdown: CancellationToken,
) {
    let (snapshot, mut changes) = store.watch(namespace, kind);
    let mut known: BTreeMap<String, Resource> = BTreeMap::new();
    let mut pending: Vec<(ChangeKind, Resource)> = snapshot
        .into_iter()
        .map(|r| (ChangeKind::Created, r))
        .collect();
    loop {
        for (change, resource) in pending.drain(..) {
            match change {
                ChangeKind::Destroyed => known.remove(&resource.id),
                _ => known.insert(resource.id.clone(), resource.clone()),
            };
            let event = WatchEvent {
                kind: change_kind_to_proto(change).into(),
                resource: Some(resource_to_proto(&resource)),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let received = tokio::select! {
            received = changes.recv() => received,
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => return,
        };
        match received {
            Ok(change) => {
                if change.resource.namespace == namespace && change.resource.kind() == kind {
                    pending.push((change.kind, change.resource));
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                pending = resync(&known, store.list(namespace, kind));
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The changes that turn what a watcher saw into the current list.
fn resync(
    known: &BTreeMap<String, Resource>,
    current: Vec<Resource>,
) -> Vec<(ChangeKind, Resource)> {
    let mut changes = Vec::new();
    let current_ids: std::collections::HashSet<&str> =
        current.iter().map(|r| r.id.as_str()).collect();
    for (id, resource) in known {
        if !current_ids.contains(id.as_str()) {
            changes.push((ChangeKind::Destroyed, resource.clone()));
        }
    }
    for resource in current {
        match known.get(&resource.id) {
            None => changes.push((ChangeKind::Created, resource)),
            Some(seen) if seen.version != resource.version => {
                changes.push((ChangeKind::Updated, resource))
            }
            Some(_) => {}
        }
    }
    changes
}

/// Binds the socket (mode 0600), replacing a stale one but never one that another
/// daemon still answers on.
pub async fn bind(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another discoveryd is already serving {}; stop it first",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API until its shutdown token fires.
pub async fn serve(listener: UnixListener, api: LocalApi) -> Result<()> {
    let shutdown = api.shutdown.clone();
    tonic::transport::Server::builder()
        .add_service(LocalServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await?;
    Ok(())
}
