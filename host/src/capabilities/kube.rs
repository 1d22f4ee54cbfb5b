//! The `kube-nodes` capability: a plugin lists, gets, watches and annotates
//! Kubernetes Node objects through the host's client (`kube`), with credentials
//! the operator granted (a kubeconfig file, or the pod's service account). The
//! plugin sees Nodes only, and never a credential.
//!
//! Every operation is a host call (`runtime::host_calls`): its results arrive as
//! `ready(call)` events. The watch is `kube::runtime::watcher`: it resumes from
//! the last resource version, relists after 410 Gone, follows bookmarks, and
//! keeps retrying with a backoff after errors, reporting each one.

use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::Mutex;

use super::error_chain as chain;
use crate::limits;
use crate::runtime::host_calls::{HandOver, HostCalls, Outbox};

/// Where the credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeGrant {
    /// A kubeconfig file the operator granted.
    Kubeconfig(PathBuf),
    /// The service account of the pod the daemon runs in.
    InCluster,
}

/// What a registry needs of a Node (reference §9.6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub resource_version: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// `status.addresses` as (type, address).
    pub addresses: Vec<(String, String)>,
    pub os_image: String,
}

impl NodeView {
    fn from_node(node: &Node) -> NodeView {
        let pairs = |map: &Option<std::collections::BTreeMap<String, String>>| {
            map.iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let status = node.status.as_ref();
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            resource_version: node.metadata.resource_version.clone().unwrap_or_default(),
            labels: pairs(&node.metadata.labels),
            annotations: pairs(&node.metadata.annotations),
            addresses: status
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .map(|a| (a.type_.clone(), a.address.clone()))
                .collect(),
            os_image: status
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.os_image.clone())
                .unwrap_or_default(),
        }
    }

    fn bytes(&self) -> usize {
        let pairs =
            |list: &[(String, String)]| list.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        self.name.len()
            + self.resource_version.len()
            + self.os_image.len()
            + pairs(&self.labels)
            + pairs(&self.annotations)
            + pairs(&self.addresses)
    }
}

/// Why a call failed: the API server's HTTP status (0 if it was not reached).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeError {
    pub status: u16,
    pub message: String,
}

impl KubeError {
    fn from_kube(error: &kube::Error) -> KubeError {
        match error {
            kube::Error::Api(status) => KubeError {
                status: status.code,
                message: status.message.clone(),
            },
            other => KubeError {
                status: 0,
                message: chain(other),
            },
        }
    }

    fn from_watcher(error: &watcher::Error) -> KubeError {
        match error {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => KubeError::from_kube(e),
            watcher::Error::WatchError(status) => KubeError {
                status: status.code,
                message: status.message.clone(),
            },
            other => KubeError {
                status: 0,
                message: chain(other),
            },
        }
    }
}

/// What a call hands the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeEvent {
    Nodes(Vec<NodeView>),
    Synced(Vec<NodeView>),
    Applied(NodeView),
    Deleted(NodeView),
    Failed(KubeError),
    Done(Result<(), KubeError>),
}

impl HandOver for KubeEvent {
    fn bytes(&self) -> usize {
        match self {
            KubeEvent::Nodes(nodes) | KubeEvent::Synced(nodes) => {
                nodes.iter().map(NodeView::bytes).sum()
            }
            KubeEvent::Applied(node) | KubeEvent::Deleted(node) => node.bytes(),
            KubeEvent::Failed(e) | KubeEvent::Done(Err(e)) => e.message.len(),
            KubeEvent::Done(Ok(())) => 0,
        }
    }
}

/// The plugin's client, made on first use (on the plugin's runtime, where its
/// connection tasks then run) and kept across the plugin's restarts.
#[derive(Default)]
pub struct KubeClient {
    client: Mutex<Option<kube::Client>>,
}

impl KubeClient {
    async fn nodes(&self, grant: &KubeGrant) -> Result<Api<Node>, KubeError> {
        let mut client = self.client.lock().await;
        if client.is_none() {
            *client = Some(connect(grant).await?);
        }
        Ok(Api::all(client.clone().expect("just set")))
    }
}

async fn connect(grant: &KubeGrant) -> Result<kube::Client, KubeError> {
    let fail = |message: String| KubeError { status: 0, message };
    let config = match grant {
        KubeGrant::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| fail(format!("kubeconfig {}: {}", path.display(), chain(&e))))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| fail(format!("kubeconfig {}: {}", path.display(), chain(&e))))?
        }
        KubeGrant::InCluster => kube::Config::incluster().map_err(|e| {
            fail(format!(
                "no in-cluster credentials ({}); outside a pod, grant a kubeconfig \
                 (plugins.<name>.grants.kubeconfig)",
                chain(&e)
            ))
        })?,
    };
    kube::Client::try_from(config).map_err(|e| fail(chain(&e)))
}

/// Starts one Kubernetes call for a plugin. `client` is the plugin's, shared
/// by its incarnations.
pub fn start(
    calls: &mut HostCalls,
    client: std::sync::Arc<KubeClient>,
    grant: KubeGrant,
    request: KubeRequest,
) -> Result<u32, String> {
    calls.start(
        "Kubernetes",
        limits::KUBE_CALLS_MAX,
        move |out| async move {
            let outcome = match client.nodes(&grant).await {
                Ok(nodes) => run(nodes, request, &out).await,
                Err(e) => Err(e),
            };
            out.send(KubeEvent::Done(outcome)).await;
        },
    )
}

/// What a plugin asks of the Nodes API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeRequest {
    List,
    Get(String),
    /// Some(value) sets an annotation, None deletes it.
    PatchAnnotations(String, Vec<(String, Option<String>)>),
    Watch,
}

async fn run(
    nodes: Api<Node>,
    request: KubeRequest,
    out: &Outbox<KubeEvent>,
) -> Result<(), KubeError> {
    let timeout = |what: &str| KubeError {
        status: 0,
        message: format!("{what} took longer than {:?}", limits::KUBE_REQUEST_TIMEOUT),
    };
    match request {
        KubeRequest::List => {
            let list = tokio::time::timeout(
                limits::KUBE_REQUEST_TIMEOUT,
                nodes.list(&ListParams::default()),
            )
            .await
            .map_err(|_| timeout("list"))?
            .map_err(|e| KubeError::from_kube(&e))?;
            out.send(KubeEvent::Nodes(
                list.items.iter().map(NodeView::from_node).collect(),
            ))
            .await;
        }
        KubeRequest::Get(name) => {
            let node = tokio::time::timeout(limits::KUBE_REQUEST_TIMEOUT, nodes.get(&name))
                .await
                .map_err(|_| timeout("get"))?
                .map_err(|e| KubeError::from_kube(&e))?;
            out.send(KubeEvent::Nodes(vec![NodeView::from_node(&node)]))
                .await;
        }
        KubeRequest::PatchAnnotations(name, changes) => {
            let annotations: serde_json::Map<String, serde_json::Value> = changes
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.map_or(serde_json::Value::Null, serde_json::Value::String),
                    )
                })
                .collect();
            let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
            let node = tokio::time::timeout(
                limits::KUBE_REQUEST_TIMEOUT,
                nodes.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
            .map_err(|_| timeout("patch"))?
            .map_err(|e| KubeError::from_kube(&e))?;
            out.send(KubeEvent::Nodes(vec![NodeView::from_node(&node)]))
                .await;
        }
        KubeRequest::Watch => {
            let stream = watcher(nodes, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            let mut initial: Option<Vec<NodeView>> = None;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(watcher::Event::Init) => {
                        initial = Some(Vec::new());
                        continue;
                    }
                    Ok(watcher::Event::InitApply(node)) => {
                        initial
                            .get_or_insert_with(Vec::new)
                            .push(NodeView::from_node(&node));
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        KubeEvent::Synced(initial.take().unwrap_or_default())
                    }
                    Ok(watcher::Event::Apply(node)) => {
                        KubeEvent::Applied(NodeView::from_node(&node))
                    }
                    Ok(watcher::Event::Delete(node)) => {
                        KubeEvent::Deleted(NodeView::from_node(&node))
                    }
                    Err(e) => KubeEvent::Failed(KubeError::from_watcher(&e)),
                };
                if !out.send(event).await {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
