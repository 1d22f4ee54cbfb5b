//! The daemon's YAML config: the Talos `cluster.discovery` layout, node settings,
//! and the registry plugins with their grants.
//!
//! Loading is all or nothing: the first problem becomes one error naming the field
//! and the value, and nothing starts half-configured.
//!
//! A file holds one daemon config document and, as Talos's machine configs do,
//! any number of `DiscoveryServiceConfig` documents (`---` between documents).
//!
//! This module holds the validated [`Config`], loading and the errors; the file's
//! raw shapes are in `file`, and each part of the file is checked in its own
//! module: `cluster` (identity and secret), `node` (node settings and KubeSpan),
//! `plugins` (plugins, grants and limits), `discovery_services` (the service
//! registry's endpoints) and `endpoint_url` (Talos's endpoint URL checks).

mod cluster;
mod discovery_services;
mod endpoint_url;
mod file;
mod node;
mod plugins;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::cluster::ClusterIdentity;
pub use self::discovery_services::{DEFAULT_ENDPOINT, DiscoveryService};
pub use self::node::{KubeSpanConfig, NodeConfig};
pub use self::plugins::{PluginConfig, PluginLimits, PluginSource};
use crate::builtin_plugins;
use crate::limits;
use file::{RawConfig, RawDiscoveryService, RawPlugin};

/// Where state lives when the config does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/discoveryd";

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Present when the cluster identity is configured; plugins seal through it.
    pub cluster: Option<ClusterIdentity>,
    /// Discovery is on when it is enabled and at least one registry is enabled.
    pub discovery_enabled: bool,
    pub node: NodeConfig,
    /// Every configured plugin, enabled or not, by name.
    pub plugins: BTreeMap<String, PluginConfig>,
}

impl Config {
    /// The plugins that should run.
    pub fn enabled_plugins(&self) -> impl Iterator<Item = &PluginConfig> {
        self.plugins
            .values()
            .filter(|p| self.discovery_enabled && p.enabled)
    }

    /// The local API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.node.state_dir.join(limits::SOCKET_NAME)
    }
}

/// A config problem, naming the field (`plugins.static-file.path`) and the value.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// Reads and validates a config file. Relative paths in it are relative to the
/// file's directory.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        err(
            file.display().to_string(),
            format!("cannot read config: {e}"),
        )
    })?;
    parse(&text, &base_dir(file)).map_err(|e| ConfigError {
        path: format!("{}: {}", file.display(), e.path),
        message: e.message,
    })
}

/// The state directory a config file names, without validating the rest: all
/// the CLI needs to find a running daemon, even while a plugin file is being
/// replaced.
pub fn state_dir_of(file: &Path) -> Result<PathBuf, ConfigError> {
    #[derive(Deserialize, Default)]
    struct File {
        #[serde(default)]
        node: Node,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Node {
        state_dir: Option<PathBuf>,
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        err(
            file.display().to_string(),
            format!("cannot read config: {e}"),
        )
    })?;
    let parsed: File = serde_norway::from_str(&text)
        .map_err(|e| err(file.display().to_string(), e.to_string()))?;
    Ok(resolve_state_dir(parsed.node.state_dir, &base_dir(file)))
}

fn base_dir(file: &Path) -> PathBuf {
    file.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn resolve_state_dir(configured: Option<PathBuf>, base: &Path) -> PathBuf {
    configured
        .map(|dir| base.join(dir))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Parses and validates config text; `base` anchors relative paths.
pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
    let (config, services) = documents(text)?;
    config.validate(services, base)
}

/// Splits the file into the daemon config and the `DiscoveryServiceConfig`
/// documents. Each document is read twice: once for its `kind`, then into the
/// type that kind names, so serde's errors keep naming the field.
fn documents(text: &str) -> Result<(RawConfig, Vec<RawDiscoveryService>), ConfigError> {
    let mut kinds = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(document).map_err(yaml_error)?;
        let kind = match value.get("kind") {
            None => None,
            Some(kind) => Some(kind.as_str().map(str::to_string).ok_or_else(|| {
                err(
                    format!("document {}", kinds.len() + 1),
                    "kind must be a string",
                )
            })?),
        };
        kinds.push((value.is_null(), kind));
    }
    let mut config = None;
    let mut services = Vec::new();
    let documents = serde_norway::Deserializer::from_str(text).zip(kinds);
    for (i, (document, (empty, kind))) in documents.enumerate() {
        match kind.as_deref() {
            None if empty => {}
            None if config.is_some() => {
                return Err(err(
                    format!("document {}", i + 1),
                    "a second daemon config; other documents need a kind (DiscoveryServiceConfig)",
                ));
            }
            None => config = Some(RawConfig::deserialize(document).map_err(yaml_error)?),
            Some("DiscoveryServiceConfig") => {
                services.push(RawDiscoveryService::deserialize(document).map_err(|e| {
                    err(
                        format!("DiscoveryServiceConfig[{}]", services.len()),
                        e.to_string(),
                    )
                })?)
            }
            Some(other) => {
                return Err(err(
                    format!("document {}", i + 1),
                    format!(
                        "unknown kind {other:?} (this daemon reads DiscoveryServiceConfig documents)"
                    ),
                ));
            }
        }
    }
    Ok((config.unwrap_or_default(), services))
}

/// serde_norway puts the field path first: "cluster.discovery: unknown field ...".
fn yaml_error(e: serde_norway::Error) -> ConfigError {
    let message = e.to_string();
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => err(path, rest),
        _ => err("config", message),
    }
}

impl RawConfig {
    /// Checks each part in its own module. An enabled registry runs the plugin
    /// of its name, configured under `plugins` or else built in.
    fn validate(
        self,
        documents: Vec<RawDiscoveryService>,
        base: &Path,
    ) -> Result<Config, ConfigError> {
        let cluster = cluster::validate_cluster(self.cluster.id, self.cluster.secret)?;
        let node = self.node.validate(base)?;
        let registries = self.cluster.discovery.registries;
        let services = discovery_services::resolve(&registries, documents)?;
        let mut raw_plugins = self.plugins;
        let enabled_registries = registries
            .iter()
            .filter(|(_, r)| !r.disabled)
            .map(|(name, _)| name.as_str())
            .chain(services.as_ref().map(|_| "service"));
        for name in enabled_registries {
            if raw_plugins.contains_key(name) {
                continue;
            }
            if !builtin_plugins::is_builtin(name) {
                return Err(err(
                    format!("cluster.discovery.registries.{name}"),
                    format!(
                        "registry {name:?} is enabled but no plugin of that name is configured \
                         and none is built in (add plugins.{name}.path, or set disabled: true)"
                    ),
                ));
            }
            raw_plugins.insert(name.to_string(), RawPlugin::default());
        }
        if services.is_some() && self.cluster.discovery.enabled && cluster.is_none() {
            return Err(err(
                "cluster",
                "cluster identity is required when discovery service is configured \
                 (set cluster.id and cluster.secret)",
            ));
        }
        let mut plugins = BTreeMap::new();
        for (name, raw) in raw_plugins {
            let registry = registries.get(&name);
            let services = services.as_deref().filter(|_| name == "service");
            let plugin = raw.validate(&name, registry, services, cluster.as_ref(), base)?;
            plugins.insert(name, plugin);
        }
        let discovery_enabled =
            self.cluster.discovery.enabled && plugins.values().any(|p: &PluginConfig| p.enabled);
        Ok(Config {
            cluster,
            discovery_enabled,
            node,
            plugins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SECRET: &str = "kCQsKr4B28VUl7qw1sVkTDNF9fFH++ViIuKsss+C6kc=";

    pub(super) fn dir_with_plugin() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"\0asm").unwrap();
        std::fs::create_dir(dir.path().join("peers")).unwrap();
        dir
    }

    pub(super) fn parse_in(dir: &tempfile::TempDir, yaml: &str) -> Result<Config, ConfigError> {
        parse(yaml, dir.path())
    }

    #[test]
    fn accepts_the_talos_layout_with_a_plugin() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            &format!(
                r#"
cluster:
  id: 8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=
  secret: {SECRET}
  discovery:
    enabled: true
    registries:
      kubernetes: {{disabled: true}}
      static: {{}}
node:
  stateDir: state
  nodename: worker-1
  machineType: controlplane
  addresses: [10.0.0.1, "2001:db8::1"]
  controlPlane: {{apiServerPort: 6443}}
plugins:
  static:
    path: p.wasm
    config: {{path: /peers/peers.yaml}}
    grants:
      files: [{{host: peers, guest: /peers}}]
    limits: {{memoryMiB: 32, cpuBudgetMs: 200}}
"#
            ),
        )
        .unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.id, "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=");
        assert!(
            !format!("{config:?}").contains("kCQs"),
            "secret leaked into Debug"
        );
        assert!(config.discovery_enabled);
        assert_eq!(config.node.state_dir, dir.path().join("state"));
        assert_eq!(config.node.api_server_port, Some(6443));
        let plugin = &config.plugins["static"];
        assert_eq!(plugin.config_json, r#"{"path":"/peers/peers.yaml"}"#);
        assert_eq!(plugin.limits.memory, 32 << 20);
        assert_eq!(plugin.grants.files[0].guest, "/peers");
        assert_eq!(config.enabled_plugins().count(), 1);
    }

    #[test]
    fn disabling_every_registry_disables_discovery() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            "cluster: {discovery: {registries: {static: {disabled: true}}}}\nplugins: {static: {path: p.wasm}}",
        )
        .unwrap();
        assert!(!config.discovery_enabled);
        assert_eq!(config.enabled_plugins().count(), 0);
        let config = parse_in(
            &dir,
            "cluster: {discovery: {enabled: false}}\nplugins: {static: {path: p.wasm}}",
        )
        .unwrap();
        assert!(!config.discovery_enabled);
    }

    /// The README's annotated example is a config the daemon accepts.
    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Configuration").unwrap()..];
        let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let example = example
            .replace("<base64 of 32 bytes>", SECRET)
            .replace(
                "<base64 WireGuard key>",
                "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=",
            )
            .replace("/usr/lib/discoveryd/static-file.wasm", "p.wasm")
            .replace("/etc/discoveryd/peers", "peers")
            .replace("/etc/discoveryd/ca.pem", "ca.pem");
        let dir = dir_with_plugin();
        std::fs::write(
            dir.path().join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let config = parse_in(&dir, &example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert!(config.discovery_enabled);
        assert!(
            config.plugins["static"]
                .config_json
                .contains("/peers/peers.yaml")
        );
    }

    /// Each bad value gives one error naming the field (and the value, except the secret).
    #[test]
    fn bad_fields_are_named() {
        let dir = dir_with_plugin();
        let cases: &[(&str, &str)] = &[
            (
                "cluster: {id: x, secret: 'AAAA'}",
                "cluster.secret: secret must decode to 32 bytes (AES-256), got 3",
            ),
            (
                "cluster: {id: x, secret: 'not base64!'}",
                "cluster.secret: secret is not valid base64",
            ),
            ("cluster: {id: x}", "cluster.secret: missing"),
            (
                &format!("cluster: {{id: '', secret: {SECRET}}}"),
                "cluster.id: must not be empty",
            ),
            (
                "cluster: {discovery: {enabeld: true}}",
                "cluster.discovery: unknown field `enabeld`",
            ),
            (
                "cluster: {discovery: {registries: {service: {}}}}",
                "cluster: cluster identity is required when discovery service is configured",
            ),
            (
                "cluster: {discovery: {registries: {consul: {}}}}",
                "cluster.discovery.registries.consul: registry \"consul\" is enabled but no plugin of that name is configured and none is built in",
            ),
            (
                "plugins: {mine: {config: {}}}",
                "plugins.mine.path: required: no plugin is built in as \"mine\"",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {endpoints: ['discovery.example:443']}}}",
                "plugins.static.grants.endpoints[0]: \"discovery.example:443\": endpoint scheme must be",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {kubeconfig: nope.yaml}}}",
                "plugins.static.grants.kubeconfig:",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {caFile: peers}}}",
                "plugins.static.grants.caFile: cannot read",
            ),
            (
                "plugins: {static: {path: p.wasm}}\n---\nkind: Other\n",
                "document 2: unknown kind \"Other\"",
            ),
            (
                "---\nkind: DiscoveryServiceConfig\nname: a\nendpoint: https://x/\nextra: 1\n",
                "DiscoveryServiceConfig[0]: unknown field `extra`",
            ),
            (
                "node: {machineType: boss}",
                "node.machineType: \"boss\" is not one of",
            ),
            (
                "node: {addresses: [10.0.0.1, 10.0.0.300]}",
                "node.addresses[1]: \"10.0.0.300\" is not an IP address",
            ),
            (
                "node: {addresses: [0.0.0.0]}",
                "node.addresses[0]: 0.0.0.0 is not a node address",
            ),
            (
                "node: {kubespan: {publicKey: 'PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=', endpoints: ['10.0.0.1:0']}}",
                "node.kubespan.endpoints[0]: \"10.0.0.1:0\" has port 0",
            ),
            (
                "node: {controlPlane: {apiServerPort: 6443}}",
                "node.controlPlane: only init and controlplane",
            ),
            (
                "node: {kubespan: {publicKey: abc}}",
                "node.kubespan.publicKey: \"abc\" is not a base64 WireGuard key",
            ),
            (
                "node: {kubespan: {publicKey: 'PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=', endpoints: ['10.0.0.1']}}",
                "node.kubespan.endpoints[0]: \"10.0.0.1\" is not an ip:port endpoint",
            ),
            (
                "plugins: {static: {path: missing.wasm}}",
                "plugins.static.path:",
            ),
            (
                "plugins: {Bad_Name: {path: p.wasm}}",
                "plugins.Bad_Name: plugin names use",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {files: [{host: nope, guest: /x}]}}}",
                "plugins.static.grants.files[0].host:",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {files: [{host: peers, guest: rel}]}}}",
                "plugins.static.grants.files[0].guest: \"rel\" must be an absolute path",
            ),
            (
                "plugins: {static: {path: p.wasm, limits: {memoryMiB: 0}}}",
                "plugins.static.limits.memoryMiB: 0 is outside",
            ),
            (
                "plugins: {static: {path: p.wasm, limits: {cpuSharePercent: 0}}}",
                "plugins.static.limits.cpuSharePercent: 0 is outside 1..=100",
            ),
            (
                "plugins: {static: {path: p.wasm, limits: {cpuShareWindowMs: 100}}}",
                "plugins.static.limits.cpuShareWindowMs: 100 is outside 1000..=600000",
            ),
            (
                "plugins: {static: {path: p.wasm, limits: {resources: 100000}}}",
                "plugins.static.limits.resources: 100000 is outside 16..=4096",
            ),
            (
                "plugins: {static: {path: p.wasm, limits: {withdrawAfterSeconds: 0}}}",
                "plugins.static.limits.withdrawAfterSeconds: 0 is outside 1..=86400",
            ),
            (
                "plugins: {static: {path: p.wasm, grants: {crypto: maybe}}}",
                "plugins.static.grants.crypto: invalid type",
            ),
            (
                "plugins: {static: {path: p.wasm, prefix: 'a/b'}}",
                "plugins.static.prefix: \"a/b\"",
            ),
            (
                "cluster: {discovery: {registries: {static: {endpoint: 'discovery.talos.dev:443'}}}}\nplugins: {static: {path: p.wasm}}",
                "cluster.discovery.registries.static.endpoint: \"discovery.talos.dev:443\": endpoint scheme must be http://, https:// or grpc://",
            ),
            (
                "cluster: {discovery: {registries: {static: {endpoint: 'ftp://x.example/'}}}}\nplugins: {static: {path: p.wasm}}",
                "cluster.discovery.registries.static.endpoint: \"ftp://x.example/\": endpoint scheme must be",
            ),
            (
                "cluster: {discovery: {registries: {static: {endpoint: 'https:///path'}}}}\nplugins: {static: {path: p.wasm}}",
                "cluster.discovery.registries.static.endpoint: \"https:///path\": endpoint host is required",
            ),
            (
                "cluster: {discovery: {registries: {static: {endpoint: 'https://x.example:99999'}}}}\nplugins: {static: {path: p.wasm}}",
                "cluster.discovery.registries.static.endpoint: \"https://x.example:99999\": endpoint port must be",
            ),
        ];
        for (yaml, expected) in cases {
            let error = parse_in(&dir, yaml).unwrap_err().to_string();
            assert!(
                error.starts_with(expected),
                "{yaml}\n  gave: {error}\n  want: {expected}"
            );
            assert!(!error.contains("AAAA"), "secret value echoed: {error}");
        }
    }
}
