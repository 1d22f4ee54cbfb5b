//! The daemon's YAML config: the Talos `cluster.discovery` layout, node settings,
//! and the registry plugins with their grants.
//!
//! Loading is all or nothing: the first problem becomes one error naming the field
//! and the value, and nothing starts half-configured.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::affiliate::{IpPrefix, MachineType, check_node_address};
use crate::crypto::ClusterKey;
use crate::limits;

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

/// Cluster ID and the key from its secret (which never appears in Debug output).
#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    /// Opaque: sent and hashed exactly as written.
    pub id: String,
    pub key: Arc<ClusterKey>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    /// Overrides the system hostname.
    pub hostname: Option<String>,
    /// Defaults to the hostname.
    pub nodename: Option<String>,
    pub machine_type: MachineType,
    /// Fixed addresses; `None` detects them from the interfaces.
    pub addresses: Option<Vec<IpAddr>>,
    pub kubespan: Option<KubeSpanConfig>,
    pub api_server_port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct KubeSpanConfig {
    pub public_key: String,
    pub address: Option<IpAddr>,
    pub additional_addresses: Vec<IpPrefix>,
    pub endpoints: Vec<SocketAddr>,
    pub exclude_advertised_networks: Vec<IpPrefix>,
}

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    /// Overrides the prefix the plugin declares for its raw affiliates.
    pub prefix: Option<String>,
    /// The plugin's own config section, handed to it as JSON.
    pub config_json: String,
    pub files: Vec<FileGrant>,
    pub enabled: bool,
    pub memory_limit: usize,
    pub cpu_budget: std::time::Duration,
}

/// A host directory the plugin may read, and where it sees it.
#[derive(Debug, Clone)]
pub struct FileGrant {
    pub host: PathBuf,
    pub guest: String,
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
    let raw: RawConfig = serde_norway::from_str(text).map_err(|e| {
        // serde_norway puts the field path first: "cluster.discovery: unknown field ...".
        let message = e.to_string();
        match message.split_once(": ") {
            Some((path, rest)) if !path.contains(' ') => err(path, rest),
            _ => err("config", message),
        }
    })?;
    raw.validate(base)
}

// The file as written. Every struct denies unknown fields so typos are errors.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    plugins: BTreeMap<String, RawPlugin>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    id: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    discovery: RawDiscovery,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    registries: BTreeMap<String, RawRegistry>,
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
struct RawRegistry {
    #[serde(default)]
    disabled: bool,
    /// Talos's `registries.service.endpoint`; handed to the plugin as `endpoint`.
    endpoint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNode {
    state_dir: Option<PathBuf>,
    hostname: Option<String>,
    nodename: Option<String>,
    machine_type: Option<String>,
    addresses: Option<Vec<String>>,
    kubespan: Option<RawKubeSpan>,
    control_plane: Option<RawControlPlane>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKubeSpan {
    public_key: String,
    address: Option<String>,
    #[serde(default)]
    additional_addresses: Vec<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    exclude_advertised_networks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawControlPlane {
    api_server_port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPlugin {
    path: PathBuf,
    prefix: Option<String>,
    #[serde(default)]
    config: serde_json::Value,
    #[serde(default)]
    grants: RawGrants,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    #[serde(default)]
    files: Vec<RawFileGrant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileGrant {
    host: PathBuf,
    guest: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLimits {
    #[serde(rename = "memoryMiB")]
    memory_mib: Option<u64>,
    cpu_budget_ms: Option<u64>,
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let cluster = validate_cluster(self.cluster.id, self.cluster.secret)?;
        let node = self.node.validate(base)?;
        let registries = self.cluster.discovery.registries;
        for (name, registry) in &registries {
            if !registry.disabled && !self.plugins.contains_key(name) {
                return Err(err(
                    format!("cluster.discovery.registries.{name}"),
                    format!(
                        "registry {name:?} is enabled but no plugin of that name is configured \
                         (add plugins.{name}.path, or set disabled: true)"
                    ),
                ));
            }
        }
        let mut plugins = BTreeMap::new();
        for (name, raw) in self.plugins {
            let registry = registries.get(&name);
            let plugin = raw.validate(&name, registry, base)?;
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

fn validate_cluster(
    id: Option<String>,
    secret: Option<String>,
) -> Result<Option<ClusterIdentity>, ConfigError> {
    match (id, secret) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(
            "cluster.secret",
            "missing: cluster.id and cluster.secret are set together",
        )),
        (None, Some(_)) => Err(err(
            "cluster.id",
            "missing: cluster.id and cluster.secret are set together",
        )),
        (Some(id), Some(_)) if id.is_empty() => Err(err("cluster.id", "must not be empty")),
        (Some(id), Some(secret)) => {
            // The secret's value is never echoed back, even in errors.
            let key = ClusterKey::from_secret(&secret)
                .map_err(|e| err("cluster.secret", format!("{e} (value redacted)")))?;
            Ok(Some(ClusterIdentity {
                id,
                key: Arc::new(key),
            }))
        }
    }
}

impl RawNode {
    fn validate(self, base: &Path) -> Result<NodeConfig, ConfigError> {
        let state_dir = resolve_state_dir(self.state_dir, base);
        if let Some(name) = &self.hostname {
            check_name("node.hostname", name)?;
        }
        if let Some(name) = &self.nodename {
            check_name("node.nodename", name)?;
        }
        let machine_type = match self.machine_type.as_deref() {
            None => MachineType::Worker,
            Some(text @ ("init" | "controlplane" | "worker")) => MachineType::parse_talos(text),
            Some(other) => {
                return Err(err(
                    "node.machineType",
                    format!("{other:?} is not one of init, controlplane, worker"),
                ));
            }
        };
        let addresses = self
            .addresses
            .map(|list| {
                parse_list(
                    "node.addresses",
                    &list,
                    limits::ADDRESSES_MAX,
                    parse_node_ip,
                )
            })
            .transpose()?;
        let api_server_port = match self.control_plane {
            None => None,
            Some(_) if !machine_type.is_control_plane() => {
                return Err(err(
                    "node.controlPlane",
                    format!(
                        "only init and controlplane nodes run an API server, this node is {machine_type}"
                    ),
                ));
            }
            Some(RawControlPlane { api_server_port: 0 }) => {
                return Err(err("node.controlPlane.apiServerPort", "must not be 0"));
            }
            Some(cp) => Some(cp.api_server_port),
        };
        let kubespan = self.kubespan.map(RawKubeSpan::validate).transpose()?;
        Ok(NodeConfig {
            state_dir,
            hostname: self.hostname,
            nodename: self.nodename,
            machine_type,
            addresses,
            kubespan,
            api_server_port,
        })
    }
}

impl RawKubeSpan {
    fn validate(self) -> Result<KubeSpanConfig, ConfigError> {
        if !limits::is_wireguard_key(&self.public_key) {
            return Err(err(
                "node.kubespan.publicKey",
                format!(
                    "{:?} is not a base64 WireGuard key (32 bytes)",
                    self.public_key
                ),
            ));
        }
        let address = self
            .address
            .map(|a| parse_node_ip("node.kubespan.address", &a))
            .transpose()?;
        Ok(KubeSpanConfig {
            public_key: self.public_key,
            address,
            additional_addresses: parse_list(
                "node.kubespan.additionalAddresses",
                &self.additional_addresses,
                limits::ADDRESSES_MAX,
                parse_prefix,
            )?,
            endpoints: parse_list(
                "node.kubespan.endpoints",
                &self.endpoints,
                limits::ENDPOINTS_MAX,
                parse_endpoint,
            )?,
            exclude_advertised_networks: parse_list(
                "node.kubespan.excludeAdvertisedNetworks",
                &self.exclude_advertised_networks,
                limits::ADDRESSES_MAX,
                parse_prefix,
            )?,
        })
    }
}

impl RawPlugin {
    fn validate(
        self,
        name: &str,
        registry: Option<&RawRegistry>,
        base: &Path,
    ) -> Result<PluginConfig, ConfigError> {
        let at = |field: &str| format!("plugins.{name}.{field}");
        if !limits::is_registry_name(name) {
            return Err(err(
                format!("plugins.{name}"),
                "plugin names use lowercase letters, digits and '-' (at most 63)",
            ));
        }
        let path = base.join(&self.path);
        if !path.is_file() {
            return Err(err(at("path"), format!("{} is not a file", path.display())));
        }
        if let Some(prefix) = &self.prefix
            && !limits::is_registry_name(prefix)
        {
            return Err(err(
                at("prefix"),
                format!("{prefix:?}: use lowercase letters, digits and '-' (at most 63)"),
            ));
        }
        let mut config = self.config;
        // An empty endpoint is unset, as in Talos (where it means the default).
        let endpoint = registry.and_then(|r| r.endpoint.clone().filter(|e| !e.is_empty()));
        if let Some(endpoint) = endpoint {
            check_endpoint_url(&endpoint).map_err(|message| {
                err(
                    format!("cluster.discovery.registries.{name}.endpoint"),
                    format!("{endpoint:?}: {message}"),
                )
            })?;
            // Talos's registries.service.endpoint reaches the plugin as its `endpoint`.
            match &mut config {
                serde_json::Value::Null => config = serde_json::json!({ "endpoint": endpoint }),
                serde_json::Value::Object(map) if !map.contains_key("endpoint") => {
                    map.insert("endpoint".into(), endpoint.into());
                }
                _ => {
                    return Err(err(
                        format!("cluster.discovery.registries.{name}.endpoint"),
                        format!(
                            "plugins.{name}.config must be a map without `endpoint` to take it"
                        ),
                    ));
                }
            }
        }
        let mut files = Vec::new();
        for (i, grant) in self.grants.files.into_iter().enumerate() {
            let host = base.join(&grant.host);
            if !host.is_dir() {
                return Err(err(
                    format!("plugins.{name}.grants.files[{i}].host"),
                    format!("{} is not a directory", host.display()),
                ));
            }
            if !grant.guest.starts_with('/') {
                return Err(err(
                    format!("plugins.{name}.grants.files[{i}].guest"),
                    format!("{:?} must be an absolute path", grant.guest),
                ));
            }
            files.push(FileGrant {
                host,
                guest: grant.guest,
            });
        }
        let memory_mib = self.limits.memory_mib.unwrap_or(limits::PLUGIN_MEMORY_MIB);
        if !(1..=limits::PLUGIN_MEMORY_MIB_MAX).contains(&memory_mib) {
            return Err(err(
                at("limits.memoryMiB"),
                format!(
                    "{memory_mib} is outside 1..={}",
                    limits::PLUGIN_MEMORY_MIB_MAX
                ),
            ));
        }
        let cpu_ms = self
            .limits
            .cpu_budget_ms
            .unwrap_or(limits::PLUGIN_CPU_BUDGET_MS);
        if !(10..=60_000).contains(&cpu_ms) {
            return Err(err(
                at("limits.cpuBudgetMs"),
                format!("{cpu_ms} is outside 10..=60000"),
            ));
        }
        Ok(PluginConfig {
            name: name.to_string(),
            path,
            prefix: self.prefix,
            config_json: config.to_string(),
            files,
            enabled: !registry.is_some_and(|r| r.disabled),
            memory_limit: (memory_mib as usize) << 20,
            cpu_budget: std::time::Duration::from_millis(cpu_ms),
        })
    }
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > limits::NAME_MAX || name.chars().any(char::is_control) {
        return Err(err(
            path,
            format!(
                "{name:?} must be 1..={} printable characters",
                limits::NAME_MAX
            ),
        ));
    }
    Ok(())
}

/// Talos's checks of a discovery service endpoint URL, with its messages.
fn check_endpoint_url(url: &str) -> Result<(), &'static str> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    if !["http", "https", "grpc"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return Err("endpoint scheme must be http://, https:// or grpc://");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("endpoint has an unclosed '[' in its host")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("endpoint host in brackets must be an IPv6 address");
            }
            (host, after.strip_prefix(':'))
        }
        None => match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("endpoint host is required");
    }
    if let Some(port) = port
        && !port.is_empty()
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err("endpoint port must be a number in 1..=65535");
    }
    Ok(())
}

fn parse_node_ip(path: &str, text: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| err(path, format!("{text:?} is not an IP address")))?;
    check_node_address(ip).map_err(|e| err(path, e))
}

fn parse_endpoint(path: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let endpoint: SocketAddr = text
        .parse()
        .map_err(|_| err(path, format!("{text:?} is not an ip:port endpoint")))?;
    if endpoint.port() == 0 {
        return Err(err(path, format!("{text:?} has port 0")));
    }
    check_node_address(endpoint.ip()).map_err(|e| err(path, e))?;
    Ok(endpoint)
}

fn parse_prefix(path: &str, text: &str) -> Result<IpPrefix, ConfigError> {
    text.parse().map_err(|e: String| err(path, e))
}

fn parse_list<T>(
    path: &str,
    items: &[String],
    max: usize,
    parse: impl Fn(&str, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    if items.len() > max {
        return Err(err(path, format!("{} entries, at most {max}", items.len())));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, text)| parse(&format!("{path}[{i}]"), text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "kCQsKr4B28VUl7qw1sVkTDNF9fFH++ViIuKsss+C6kc=";

    fn dir_with_plugin() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"\0asm").unwrap();
        std::fs::create_dir(dir.path().join("peers")).unwrap();
        dir
    }

    fn parse_in(dir: &tempfile::TempDir, yaml: &str) -> Result<Config, ConfigError> {
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
        assert_eq!(plugin.memory_limit, 32 << 20);
        assert_eq!(plugin.files[0].guest, "/peers");
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

    #[test]
    fn the_service_endpoint_reaches_the_plugin_config() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            "cluster: {discovery: {registries: {service: {endpoint: 'http://localhost:3000'}}}}\nplugins: {service: {path: p.wasm}}",
        )
        .unwrap();
        assert_eq!(
            config.plugins["service"].config_json,
            r#"{"endpoint":"http://localhost:3000"}"#
        );
    }

    /// Each bad value gives one error naming the field (and the value, except the secret).
    /// The README's annotated example is a config the daemon accepts.
    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../README.md");
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
            .replace("/etc/discoveryd/peers", "peers");
        let dir = dir_with_plugin();
        let config = parse_in(&dir, &example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert!(config.discovery_enabled);
        assert!(
            config.plugins["static"]
                .config_json
                .contains("/peers/peers.yaml")
        );
    }

    #[test]
    fn defaults_for_a_bare_plugin() {
        let dir = dir_with_plugin();
        let config = parse_in(&dir, "plugins: {static: {path: p.wasm}}").unwrap();
        // Unlike Talos (false when unset): this daemon exists to discover.
        assert!(config.discovery_enabled);
        let plugin = &config.plugins["static"];
        assert_eq!(plugin.memory_limit, 64 << 20);
        assert_eq!(plugin.cpu_budget, std::time::Duration::from_secs(1));
        assert_eq!(plugin.config_json, "null");
        assert!(plugin.files.is_empty());
    }

    #[test]
    fn endpoint_urls_talos_accepts() {
        for url in [
            "https://discovery.talos.dev/",
            "http://localhost:3000",
            "grpc://10.0.0.1:3000",
            "https://[2001:470:6d:30e:565d:e162:e2a0:cf5a]:3456/",
            "HTTPS://user@host.example/path?q#f",
        ] {
            assert_eq!(check_endpoint_url(url), Ok(()), "{url}");
        }
        assert!(check_endpoint_url("https://[zz]/").is_err());
        assert!(check_endpoint_url("https://[::1/").is_err());
    }

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
                "cluster.discovery.registries.service: registry \"service\" is enabled but no plugin",
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
