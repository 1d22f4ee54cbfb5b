//! The config file as written: the serde shapes that YAML deserializes into,
//! before any value is checked.
//!
//! Kept apart from validation so the file's layout (Talos's `cluster.discovery`,
//! then `node` and `plugins`) reads in one place. Every struct denies unknown
//! fields so typos are errors, and serde names the field in them
//! (`cluster.discovery: unknown field ...`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub cluster: RawCluster,
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub plugins: BTreeMap<String, RawPlugin>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub id: Option<String>,
    pub secret: Option<String>,
    #[serde(default)]
    pub discovery: RawDiscovery,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub registries: BTreeMap<String, RawRegistry>,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        RawDiscovery {
            enabled: true,
            registries: BTreeMap::new(),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    #[serde(default)]
    pub disabled: bool,
    /// Talos's `registries.service.endpoint`; handed to the plugin as `endpoint`.
    pub endpoint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawNode {
    pub state_dir: Option<PathBuf>,
    pub hostname: Option<String>,
    pub nodename: Option<String>,
    pub machine_type: Option<String>,
    pub addresses: Option<Vec<String>>,
    pub kubespan: Option<RawKubeSpan>,
    pub control_plane: Option<RawControlPlane>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawKubeSpan {
    pub public_key: String,
    pub address: Option<String>,
    #[serde(default)]
    pub additional_addresses: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub exclude_advertised_networks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawControlPlane {
    pub api_server_port: u16,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPlugin {
    /// Unset: the built-in plugin of that name.
    pub path: Option<PathBuf>,
    pub prefix: Option<String>,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub grants: RawGrants,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawGrants {
    #[serde(default)]
    pub files: Vec<RawFileGrant>,
    /// `cluster-crypto`; by default only the `service` registry has it.
    pub crypto: Option<bool>,
    /// gRPC endpoints beyond the registry's own (which are always granted).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// PEM CA certificates the plugin trusts for TLS instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Kubernetes credentials for `kube-nodes`.
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFileGrant {
    pub host: PathBuf,
    pub guest: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLimits {
    #[serde(rename = "memoryMiB")]
    pub memory_mib: Option<u64>,
    pub cpu_budget_ms: Option<u64>,
    pub cpu_share_percent: Option<u64>,
    pub cpu_share_window_ms: Option<u64>,
    pub resources: Option<u64>,
    pub withdraw_after_seconds: Option<u64>,
}

/// Talos's `DiscoveryServiceConfig` document, one per discovery service:
/// ```yaml
/// apiVersion: v1alpha1
/// kind: DiscoveryServiceConfig
/// name: default
/// endpoint: https://discovery.talos.dev/
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawDiscoveryService {
    #[allow(dead_code)]
    pub api_version: Option<String>,
    #[allow(dead_code)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub endpoint: String,
}
