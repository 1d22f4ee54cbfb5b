//! Kubernetes Node objects through the host, with the credentials the operator
//! granted this plugin (`grants.kubeconfig`, or the pod's service account for the
//! `kubernetes` registry). Only Nodes are reachable and no credential enters the
//! plugin. A call's results arrive as
//! [`Registry::on_ready`](crate::Registry::on_ready) with the call's ID.

use crate::bindings::discovery::registry::kube_nodes as host;
pub use host::{KubeError, KubeEvent, Node};

/// A Kubernetes call in flight. Dropping it cancels the call.
#[derive(Debug, PartialEq, Eq)]
pub struct Call(u32);

impl Call {
    /// The ID [`Registry::on_ready`](crate::Registry::on_ready) reports for it.
    pub fn id(&self) -> u32 {
        self.0
    }

    /// The next result, if it has one now.
    pub fn next(&self) -> Option<KubeEvent> {
        host::next(self.0)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        host::close_call(self.0);
    }
}

/// Lists every Node: `Nodes`, then `Done`.
pub fn list() -> Result<Call, String> {
    host::start_list().map(Call)
}

/// Gets one Node: `Nodes` with it, then `Done`.
pub fn get(name: &str) -> Result<Call, String> {
    host::start_get(name).map(Call)
}

/// Sets (`Some`) and deletes (`None`) annotations of one Node with a merge patch
/// touching only those keys: `Nodes` with the patched Node, then `Done`.
pub fn patch_annotations(name: &str, changes: &[(String, Option<String>)]) -> Result<Call, String> {
    host::start_patch_annotations(name, changes).map(Call)
}

/// Watches every Node: `Synced` with all of them, then `Applied` and `Deleted`;
/// `Synced` again after a relist, `Failed` for each error it retries after.
pub fn watch() -> Result<Call, String> {
    host::start_watch().map(Call)
}

impl Node {
    /// The value of an annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        find(&self.annotations, key)
    }

    /// The value of a label.
    pub fn label(&self, key: &str) -> Option<&str> {
        find(&self.labels, key)
    }
}

fn find<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
