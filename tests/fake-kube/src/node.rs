//! Node objects: the builder tests use, and the JSON the fake stores and serves.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// Describes a Node for [`crate::FakeApiServer::put_node`].
///
/// The fake fills in what the API server assigns (`uid`, `resourceVersion`,
/// `creationTimestamp`). Only the labels and annotations given here are set: the fake does not
/// add the labels a kubelet would (`kubernetes.io/hostname`, ...).
#[derive(Debug, Clone, Default)]
pub struct NodeBuilder {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) annotations: BTreeMap<String, String>,
    pub(crate) addresses: Vec<(String, String)>,
    pub(crate) os_image: String,
    pub(crate) kubelet_version: String,
    pub(crate) operating_system: String,
    pub(crate) architecture: String,
    pub(crate) unschedulable: bool,
}

impl NodeBuilder {
    /// A Node called `name` (`operatingSystem: linux`, `architecture: amd64`, no addresses).
    pub fn new(name: impl Into<String>) -> Self {
        NodeBuilder {
            name: name.into(),
            operating_system: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }
    }

    /// Sets a label (`metadata.labels`).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets an annotation (`metadata.annotations`).
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Appends a `status.addresses` entry of any type (`InternalIP`, `ExternalIP`, `Hostname`,
    /// `InternalDNS`, `ExternalDNS`).
    pub fn address(mut self, kind: impl Into<String>, address: impl Into<String>) -> Self {
        self.addresses.push((kind.into(), address.into()));
        self
    }

    /// Appends an `InternalIP` address.
    pub fn internal_ip(self, ip: impl Into<String>) -> Self {
        self.address("InternalIP", ip)
    }

    /// Appends a `Hostname` address.
    pub fn hostname(self, hostname: impl Into<String>) -> Self {
        self.address("Hostname", hostname)
    }

    /// Sets `status.nodeInfo.osImage`.
    pub fn os_image(mut self, os_image: impl Into<String>) -> Self {
        self.os_image = os_image.into();
        self
    }

    /// Sets `status.nodeInfo.kubeletVersion` (empty by default).
    pub fn kubelet_version(mut self, version: impl Into<String>) -> Self {
        self.kubelet_version = version.into();
        self
    }

    /// Sets `spec.unschedulable` (selectable with the field selector `spec.unschedulable`).
    pub fn unschedulable(mut self, unschedulable: bool) -> Self {
        self.unschedulable = unschedulable;
        self
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Node object as the API server would store it.
    pub(crate) fn to_json(&self, uid: &str, resource_version: u64, created: &str) -> Value {
        let mut metadata = Map::new();
        metadata.insert("name".into(), json!(self.name));
        metadata.insert("uid".into(), json!(uid));
        metadata.insert(
            "resourceVersion".into(),
            json!(resource_version.to_string()),
        );
        metadata.insert("creationTimestamp".into(), json!(created));
        if !self.labels.is_empty() {
            metadata.insert("labels".into(), json!(self.labels));
        }
        if !self.annotations.is_empty() {
            metadata.insert("annotations".into(), json!(self.annotations));
        }
        let mut spec = Map::new();
        if self.unschedulable {
            spec.insert("unschedulable".into(), json!(true));
        }
        let mut status = Map::new();
        if !self.addresses.is_empty() {
            let addresses: Vec<Value> = self
                .addresses
                .iter()
                .map(|(t, a)| json!({"type": t, "address": a}))
                .collect();
            status.insert("addresses".into(), Value::Array(addresses));
        }
        status.insert(
            "daemonEndpoints".into(),
            json!({"kubeletEndpoint": {"Port": 10250}}),
        );
        // Every NodeSystemInfo field is required (no omitempty) in the real schema.
        status.insert(
            "nodeInfo".into(),
            json!({
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": self.os_image,
                "containerRuntimeVersion": "",
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": self.operating_system,
                "architecture": self.architecture,
            }),
        );
        json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": Value::Object(metadata),
            "spec": Value::Object(spec),
            "status": Value::Object(status),
        })
    }
}

/// `metadata.resourceVersion` of a stored object, parsed.
pub(crate) fn object_rv(obj: &Value) -> u64 {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sets `metadata.resourceVersion`.
pub(crate) fn set_object_rv(obj: &mut Value, rv: u64) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

/// Drops empty `labels` / `annotations` maps, as Go's `omitempty` does on the wire.
pub(crate) fn normalise_metadata(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in ["labels", "annotations"] {
            let empty = matches!(m.get(key), Some(Value::Object(o)) if o.is_empty())
                || matches!(m.get(key), Some(Value::Null));
            if empty {
                m.remove(key);
            }
        }
    }
}

/// A list item: the real API server leaves `kind`/`apiVersion` off the items of a list.
pub(crate) fn as_list_item(obj: &Value) -> Value {
    let mut item = obj.clone();
    if let Some(m) = item.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    item
}

/// The string map at `/metadata/<field>` (labels or annotations).
pub(crate) fn string_map<'a>(obj: &'a Value, field: &str) -> Option<&'a Map<String, Value>> {
    obj.get("metadata")?.get(field)?.as_object()
}
