//! Serves the local API on the daemon's unix socket.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use futures::Stream;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::local_server::{Local, LocalServer};
use super::proto::{self, ListRequest, ListResponse, PluginsRequest, PluginsResponse, WatchEvent};
use super::{Sources, change_kind_to_proto, resource_to_proto};
use crate::limits;
use crate::runtime::PluginStatuses;
use crate::store::{ChangeKind, Kind, Namespace, Resource, Store};

pub struct LocalApi {
    pub store: Arc<Store>,
    pub statuses: Arc<PluginStatuses>,
    pub shutdown: CancellationToken,
    /// Set by `Leave` before `stop`, so plugins withdraw this node.
    pub leaving: Arc<AtomicBool>,
    /// Asks the daemon to stop.
    pub stop: CancellationToken,
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
    if namespace == Namespace::ClusterRaw && kind != Kind::Affiliate {
        return Err(Status::invalid_argument(
            "namespace cluster-raw holds only affiliates (per registry)",
        ));
    }
    Ok((namespace, kind))
}

#[tonic::async_trait]
impl Local for LocalApi {
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let (namespace, kind) = parse_request(request.get_ref())?;
        let sources = Sources::apply_to(namespace, kind).then(|| Sources::of(&self.store));
        let resources = self
            .store
            .list(namespace, kind)
            .iter()
            .map(|r| resource_to_proto(r, sources.as_ref()))
            .collect();
        Ok(Response::new(ListResponse { resources }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<ListRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (namespace, kind) = parse_request(request.get_ref())?;
        let (tx, rx) = mpsc::channel(limits::API_WATCH_QUEUE);
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
        let (tx, rx) = mpsc::channel(limits::API_WATCH_QUEUE);
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
    async fn leave(
        &self,
        _: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveResponse>, Status> {
        tracing::info!("leaving the cluster: plugins withdraw this node, then the daemon stops");
        self.leaving.store(true, Ordering::Release);
        self.stop.cancel();
        Ok(Response::new(proto::LeaveResponse {}))
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
            throttled: s.throttled,
            withdrawn: s.withdrawn,
            public_address: s.public_address.map(|a| a.to_string()).unwrap_or_default(),
        })
        .collect();
    PluginsResponse { plugins }
}

/// Sends the current resources, then each change. A watcher that falls behind
/// the store's buffer subscribes again and is sent the difference between what
/// it saw and the fresh snapshot, so it never misses the final state of any
/// resource and never sees a stale one.
async fn forward_changes(
    store: Arc<Store>,
    namespace: Namespace,
    kind: Kind,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
    shutdown: CancellationToken,
) {
    let mut known: BTreeMap<String, Resource> = BTreeMap::new();
    loop {
        let (snapshot, mut changes) = store.watch(namespace, kind);
        let mut pending = resync(&known, snapshot);
        loop {
            // One pass over the raw affiliates per batch, not per event.
            let sources = (Sources::apply_to(namespace, kind) && !pending.is_empty())
                .then(|| Sources::of(&store));
            for (change, resource) in pending.drain(..) {
                match change {
                    ChangeKind::Destroyed => known.remove(&resource.id),
                    _ => known.insert(resource.id.clone(), resource.clone()),
                };
                let event = WatchEvent {
                    kind: change_kind_to_proto(change).into(),
                    resource: Some(resource_to_proto(&resource, sources.as_ref())),
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
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// The changes that turn what a watcher saw into `current`.
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
            // Versions only grow, unless it was destroyed and created again meanwhile.
            Some(seen) if seen.version > resource.version => {
                changes.push((ChangeKind::Destroyed, seen.clone()));
                changes.push((ChangeKind::Created, resource));
            }
            Some(seen) if seen.version != resource.version || seen.spec != resource.spec => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::specs::AffiliateSpec;
    use crate::store::Spec;

    fn affiliate(id: &str, hostname: &str) -> Spec {
        Spec::Affiliate(AffiliateSpec {
            node_id: id.into(),
            hostname: hostname.into(),
            ..Default::default()
        })
    }

    /// A watcher far behind the store's buffer ends up with exactly the store's
    /// state, and never sees a resource go back to an older version.
    #[tokio::test]
    async fn a_lagging_watcher_catches_up_without_stale_events() {
        let store = Arc::new(Store::with_watch_buffer(4));
        let (tx, mut rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        store.put(Namespace::Cluster, "a", affiliate("a", "v0"));
        let task = tokio::spawn(forward_changes(
            store.clone(),
            Namespace::Cluster,
            Kind::Affiliate,
            tx,
            shutdown.clone(),
        ));
        // While the watcher is stuck on its full channel, far more changes happen
        // than the store buffers.
        for round in 1..=50 {
            store.put(
                Namespace::Cluster,
                "a",
                affiliate("a", &format!("v{round}")),
            );
            store.put(
                Namespace::Cluster,
                &format!("n{}", round % 7),
                affiliate("n", &format!("v{round}")),
            );
            if round % 10 == 0 {
                store.remove(Namespace::Cluster, Kind::Affiliate, "n3");
            }
        }
        let mut seen: BTreeMap<String, (u64, String)> = BTreeMap::new();
        let expected: BTreeMap<String, (u64, String)> = store
            .list(Namespace::Cluster, Kind::Affiliate)
            .into_iter()
            .map(|r| (r.id, (r.version, (*r.spec).to_json().to_string())))
            .collect();
        while seen != expected {
            let event = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("the watcher catches up")
                .unwrap()
                .unwrap();
            let resource = event.resource.unwrap();
            let meta = resource.metadata.unwrap();
            if event.kind == proto::watch_event::Kind::Destroyed as i32 {
                seen.remove(&meta.id);
                continue;
            }
            if let Some((version, _)) = seen.get(&meta.id) {
                assert!(
                    meta.version > *version,
                    "{} went from version {version} back to {}",
                    meta.id,
                    meta.version
                );
            }
            seen.insert(meta.id, (meta.version, resource.spec_json));
        }
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn resync_reports_recreated_resources_as_destroyed_then_created() {
        let resource = |version, hostname| Resource {
            namespace: Namespace::Cluster,
            id: "a".into(),
            version,
            spec: Arc::new(affiliate("a", hostname)),
            first_seen: std::time::SystemTime::UNIX_EPOCH,
            last_seen: std::time::SystemTime::UNIX_EPOCH,
        };
        let known = BTreeMap::from([("a".to_string(), resource(3, "old"))]);
        let kinds: Vec<(ChangeKind, u64)> = resync(&known, vec![resource(1, "new")])
            .into_iter()
            .map(|(kind, r)| (kind, r.version))
            .collect();
        assert_eq!(
            kinds,
            [(ChangeKind::Destroyed, 3), (ChangeKind::Created, 1)]
        );
        assert!(resync(&known, vec![resource(3, "old")]).is_empty());
        assert_eq!(
            resync(&known, vec![resource(4, "newer")])[0].0,
            ChangeKind::Updated
        );
        assert_eq!(resync(&known, vec![])[0].0, ChangeKind::Destroyed);
    }
}
