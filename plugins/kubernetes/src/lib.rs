//! The `kubernetes` registry, wire-compatible with Talos's (reference §9.5–9.6):
//! this node's affiliate lives as eight annotations on its own Kubernetes Node,
//! and every other Node that carries a node ID becomes a raw affiliate
//! `k8s/<node-id>`.
//!
//! - Push: on start and on every local change, the annotations are compared with
//!   what the Node carries and only the difference is sent, as a merge patch
//!   touching only this registry's keys (an empty value deletes a key). Nothing
//!   is sent when nothing changed.
//! - Pull: a watch of every Node (the host resumes it, relists after 410 Gone and
//!   follows bookmarks); the whole set is re-derived from it every 30 s, as
//!   Talos's informer resyncs. Items that do not parse are dropped and each is
//!   logged once.
//! - Errors are a status, not a crash: an unreachable API server, 401/403 or an
//!   expired watch keep the last known Nodes, say why in `discoveryd plugins`,
//!   and are retried with backoff.
//!
//! The Nodes API is reached through the host (`kube-nodes`) with the
//! credentials the operator granted (a kubeconfig, or the pod's service
//! account); the plugin never sees them.

pub mod annotations;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use discovery_sdk::backoff::Backoff;
use discovery_sdk::kube::{self, Call, KubeError, KubeEvent, Node};
use discovery_sdk::{
    Affiliate, Registry, export_registry, leaving, publish, set_status, wait_ready, warn,
};

/// How often the whole set is re-derived from the watched Nodes.
const RESYNC: Duration = Duration::from_secs(30);
/// How long leaving may spend removing this node's annotations.
const LEAVE_TIME: Duration = Duration::from_millis(2500);

/// The push of this node's annotations, one step at a time.
enum Push {
    Idle,
    /// Reading the Node, to patch only what differs.
    Getting(Call),
    Patching(Call),
    /// Waiting out a backoff after a failure.
    Waiting(Instant),
}

struct Kubernetes {
    local: Option<Affiliate>,
    /// The annotations the Node carries as far as we know, after our last push.
    pushed: Option<BTreeMap<&'static str, String>>,
    push: Push,
    push_backoff: Backoff,
    push_error: Option<String>,
    watch: Option<Call>,
    watch_retry: Option<Instant>,
    watch_backoff: Backoff,
    watch_error: Option<String>,
    /// Every Node, by name, as the watch last reported it.
    nodes: BTreeMap<String, Node>,
    synced: bool,
    published: Option<Vec<Affiliate>>,
    next_resync: Instant,
    /// Bad items already logged, once each.
    logged: BTreeSet<String>,
    status: String,
}

impl Registry for Kubernetes {
    const PREFIX: &'static str = "k8s";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(Kubernetes {
            local: None,
            pushed: None,
            push: Push::Idle,
            push_backoff: Backoff::default(),
            push_error: None,
            watch: None,
            watch_retry: Some(Instant::now()),
            watch_backoff: Backoff::default(),
            watch_error: None,
            nodes: BTreeMap::new(),
            synced: false,
            published: None,
            next_resync: Instant::now() + RESYNC,
            logged: BTreeSet::new(),
            status: String::new(),
        })
    }

    fn on_local_change(&mut self, local: Option<Affiliate>) -> Result<(), String> {
        let changed_name =
            self.local.as_ref().map(|a| &a.nodename) != local.as_ref().map(|a| &a.nodename);
        self.local = local;
        if changed_name {
            // Another Node: what was pushed there is not here.
            self.pushed = None;
            self.republish();
        }
        self.push();
        self.report();
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let push = match self.push {
            Push::Waiting(at) => Some(at),
            _ => None,
        };
        [push, self.watch_retry, Some(self.next_resync)]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_deadline(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if matches!(self.push, Push::Waiting(at) if at <= now) {
            self.push = Push::Idle;
            self.push();
        }
        if self.watch_retry.is_some_and(|at| at <= now) {
            self.start_watch();
        }
        if self.next_resync <= now {
            // Re-derive everything from the watched Nodes; publishing is a no-op
            // when nothing changed.
            self.next_resync = now + RESYNC;
            self.republish();
        }
        self.report();
        Ok(())
    }

    fn on_ready(&mut self, call: u32) -> Result<(), String> {
        if self.watch.as_ref().is_some_and(|w| w.id() == call) {
            self.on_watch();
        } else {
            self.on_push(call);
        }
        self.report();
        Ok(())
    }

    fn on_shutdown(&mut self) {
        if leaving() {
            self.leave();
        }
    }
}

impl Kubernetes {
    fn nodename(&self) -> Option<&str> {
        self.local
            .as_ref()
            .map(|a| a.nodename.as_str())
            .filter(|n| !n.is_empty())
    }

    fn desired(&self) -> Option<BTreeMap<&'static str, String>> {
        self.local.as_ref().map(annotations::from_affiliate)
    }

    /// Starts a push if one is due: read the Node, then patch what differs.
    fn push(&mut self) {
        if !matches!(self.push, Push::Idle) || self.desired() == self.pushed {
            return;
        }
        let Some(nodename) = self.nodename() else {
            return;
        };
        match kube::get(nodename) {
            Ok(call) => self.push = Push::Getting(call),
            Err(e) => self.push_failed(e),
        }
    }

    fn on_push(&mut self, call: u32) {
        let (Push::Getting(current) | Push::Patching(current)) = &self.push else {
            return;
        };
        if current.id() != call {
            return;
        }
        let patching = matches!(self.push, Push::Patching(_));
        let Some(event) = current.next() else { return };
        match event {
            KubeEvent::Nodes(nodes) => {
                let Some(node) = nodes.into_iter().next() else {
                    return;
                };
                let desired = self.desired().unwrap_or_default();
                if patching {
                    self.pushed = Some(desired);
                    return;
                }
                let changes = annotations::changes(&node.annotations, &desired);
                if changes.is_empty() {
                    // The Node already says it all: nothing is sent.
                    self.pushed = Some(desired);
                    return;
                }
                match kube::patch_annotations(&node.name, &changes) {
                    Ok(call) => self.push = Push::Patching(call),
                    Err(e) => self.push_failed(e),
                }
            }
            KubeEvent::Done(Ok(())) => {
                self.push = Push::Idle;
                self.push_error = None;
                self.push_backoff.reset();
                // It changed again meanwhile.
                self.push();
            }
            KubeEvent::Done(Err(e)) => {
                let what = if patching { "patching" } else { "reading" };
                let node = self.nodename().unwrap_or_default().to_string();
                self.push_failed(format!("{what} Node {node:?}: {}", explain(&e)));
            }
            _ => {}
        }
    }

    fn push_failed(&mut self, error: String) {
        if self.push_error.as_ref() != Some(&error) {
            warn!("{error}");
        }
        self.push_error = Some(error);
        self.push = Push::Waiting(Instant::now() + self.push_backoff.next_delay());
    }

    fn start_watch(&mut self) {
        self.watch_retry = None;
        match kube::watch() {
            Ok(call) => self.watch = Some(call),
            Err(e) => self.watch_failed(e),
        }
    }

    fn on_watch(&mut self) {
        let Some(event) = self.watch.as_ref().and_then(Call::next) else {
            return;
        };
        match event {
            KubeEvent::Synced(nodes) => {
                self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                self.synced = true;
                self.watch_error = None;
                self.watch_backoff.reset();
            }
            KubeEvent::Applied(node) => {
                self.watch_error = None;
                self.nodes.insert(node.name.clone(), node);
            }
            KubeEvent::Deleted(node) => {
                self.nodes.remove(&node.name);
            }
            // The host retries after a backoff; the last known Nodes stay.
            KubeEvent::Failed(e) => {
                let error = format!("watching Nodes: {}", explain(&e));
                if self.watch_error.as_ref() != Some(&error) {
                    warn!("{error}");
                }
                self.watch_error = Some(error);
                return;
            }
            KubeEvent::Done(result) => {
                let why = match result {
                    Ok(()) => "the watch ended".to_string(),
                    Err(e) => format!("watching Nodes: {}", explain(&e)),
                };
                self.watch = None;
                self.watch_failed(why);
                return;
            }
            KubeEvent::Nodes(_) => return,
        }
        self.republish();
    }

    fn watch_failed(&mut self, error: String) {
        if self.watch_error.as_ref() != Some(&error) {
            warn!("{error}");
        }
        self.watch_error = Some(error);
        self.watch_retry = Some(Instant::now() + self.watch_backoff.next_delay());
    }

    /// Every Node but ours with a node ID, as raw affiliates.
    fn republish(&mut self) {
        if !self.synced {
            return;
        }
        let own = self.nodename().unwrap_or_default().to_string();
        let mut affiliates = Vec::new();
        for node in self.nodes.values().filter(|n| n.name != own) {
            let Some((affiliate, dropped)) = annotations::to_affiliate(node) else {
                continue;
            };
            for item in dropped {
                if self.logged.insert(format!("{} {item}", node.name)) {
                    warn!("Node {:?}: dropped {item}", node.name);
                }
            }
            affiliates.push(affiliate);
        }
        if self.published.as_ref() == Some(&affiliates) {
            return;
        }
        let rejected = publish(&affiliates);
        if let Some(first) = rejected.first()
            && self
                .logged
                .insert(format!("rejected {} {}", first.node_id, first.reason))
        {
            warn!(
                "{} Nodes refused by the daemon, first {:?}: {}",
                rejected.len(),
                first.node_id,
                first.reason
            );
        }
        self.published = Some(affiliates);
    }

    fn report(&mut self) {
        let peers = self.published.as_ref().map_or(0, Vec::len);
        let mut status = format!("{peers} peers from {} Nodes", self.nodes.len());
        let errors: Vec<&String> = [&self.watch_error, &self.push_error]
            .into_iter()
            .flatten()
            .collect();
        for error in &errors {
            status.push_str(&format!("; {error}"));
        }
        if status != self.status {
            set_status(errors.is_empty() && self.synced, &status);
            self.status = status;
        }
    }

    /// Removes this node's annotations (`discoveryd leave`), within a bound.
    fn leave(&mut self) {
        let Some(nodename) = self.nodename().map(str::to_string) else {
            return;
        };
        let changes: Vec<(String, Option<String>)> = annotations::KEYS
            .iter()
            .map(|key| (key.to_string(), None))
            .collect();
        let Ok(call) = kube::patch_annotations(&nodename, &changes) else {
            return;
        };
        let deadline = Instant::now() + LEAVE_TIME;
        while Instant::now() < deadline {
            let Some(ready) = wait_ready(deadline.saturating_duration_since(Instant::now())) else {
                break;
            };
            if ready != call.id() {
                continue;
            }
            match call.next() {
                Some(KubeEvent::Done(Ok(()))) => return,
                Some(KubeEvent::Done(Err(e))) => {
                    warn!("could not remove this node's annotations: {}", explain(&e));
                    return;
                }
                _ => {}
            }
        }
        warn!("could not remove this node's annotations before stopping");
    }
}

/// An API error, with the fix for the one Talos users meet most (talos#9980).
fn explain(e: &KubeError) -> String {
    let base = match e.status {
        0 => e.message.clone(),
        status => format!("{status} {}", e.message),
    };
    match e.status {
        401 => format!("{base} (the credentials were refused: check the granted kubeconfig)"),
        403 => format!(
            "{base} (Kubernetes 1.32 and later let a node's own credentials read only its own \
             Node: grant a credential allowed to get/list/watch/patch Nodes, such as the \
             ClusterRole in examples/kubernetes-rbac.yaml)"
        ),
        _ => base,
    }
}

export_registry!(Kubernetes, needs = ["kube-nodes"]);
