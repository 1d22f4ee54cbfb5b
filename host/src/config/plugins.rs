//! The registry plugins (`plugins.<name>`): the component file, the raw-affiliate
//! prefix, the plugin's own config section (with Talos's registry endpoint folded
//! in), its grants (the directories it may read, cluster crypto) and the limits of
//! its sandbox.
//!
//! Apart because a plugin runs untrusted code: everything it is granted is
//! decided here, before it starts.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ClusterIdentity;
use super::discovery_services::DiscoveryService;
use super::endpoint_url::check_endpoint_url;
use super::file::{RawGrants, RawLimits, RawPlugin, RawRegistry};
use super::{ConfigError, err};
use crate::builtin_plugins;
use crate::capabilities::grpc::GrpcTarget;
use crate::capabilities::{ClusterCrypto, FileGrant, Grants, GrpcGrant, KubeGrant};
use crate::limits;

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    pub source: PluginSource,
    /// Overrides the prefix the plugin declares for its raw affiliates.
    pub prefix: Option<String>,
    /// The plugin's own config section, handed to it as JSON.
    pub config_json: String,
    /// What the operator granted it beyond the basic host interface.
    pub grants: Grants,
    pub enabled: bool,
    pub limits: PluginLimits,
}

/// Where a plugin's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    File(PathBuf),
    /// One of the daemon's built-in plugins, by registry name.
    BuiltIn(String),
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::File(path) => path.display().fmt(f),
            PluginSource::BuiltIn(name) => write!(f, "built-in {name} plugin"),
        }
    }
}

/// The limits of one plugin's sandbox.
#[derive(Debug, Clone)]
pub struct PluginLimits {
    /// Bytes of all its memories plus what the host stores for it.
    pub memory: usize,
    /// Longest busy stretch between two waits for an event.
    pub cpu_budget: Duration,
    /// Busy time allowed over any `cpu_share_window`, in percent of one core.
    pub cpu_share_percent: u32,
    pub cpu_share_window: Duration,
    /// Host resources (files, streams, pollables) it may hold at once.
    pub resources: usize,
    /// How long it may keep failing before its raw affiliates are withdrawn.
    pub withdraw_after: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory: (limits::PLUGIN_MEMORY_MIB as usize) << 20,
            cpu_budget: Duration::from_millis(limits::PLUGIN_CPU_BUDGET_MS),
            cpu_share_percent: limits::PLUGIN_CPU_SHARE_PERCENT,
            cpu_share_window: limits::PLUGIN_CPU_SHARE_WINDOW,
            resources: limits::PLUGIN_RESOURCES,
            withdraw_after: limits::PLUGIN_WITHDRAW_AFTER,
        }
    }
}

impl RawPlugin {
    /// `services` are the discovery services of the `service` registry (for the
    /// plugin named `service` only).
    pub(super) fn validate(
        self,
        name: &str,
        registry: Option<&RawRegistry>,
        services: Option<&[DiscoveryService]>,
        cluster: Option<&ClusterIdentity>,
        base: &Path,
    ) -> Result<PluginConfig, ConfigError> {
        let at = |field: &str| format!("plugins.{name}.{field}");
        if !limits::is_registry_name(name) {
            return Err(err(
                format!("plugins.{name}"),
                format!(
                    "plugin names use lowercase letters, digits and '-' (at most {})",
                    limits::REGISTRY_NAME_MAX
                ),
            ));
        }
        let source = match &self.path {
            Some(path) => {
                let path = base.join(path);
                if !path.is_file() {
                    return Err(err(at("path"), format!("{} is not a file", path.display())));
                }
                PluginSource::File(path)
            }
            None if builtin_plugins::is_builtin(name) => PluginSource::BuiltIn(name.to_string()),
            None => {
                return Err(err(
                    at("path"),
                    format!(
                        "required: no plugin is built in as {name:?} (built in: {})",
                        builtin_plugins::NAMES.join(", ")
                    ),
                ));
            }
        };
        if let Some(prefix) = &self.prefix
            && !limits::is_registry_name(prefix)
        {
            return Err(err(
                at("prefix"),
                format!(
                    "{prefix:?}: use lowercase letters, digits and '-' (at most {})",
                    limits::REGISTRY_NAME_MAX
                ),
            ));
        }
        let mut config = self.config;
        // The registry's endpoints reach the plugin in its config, and are granted.
        let mut endpoints = Vec::new();
        if let Some(services) = services {
            inject(
                &mut config,
                name,
                "endpoints",
                serde_json::to_value(services).unwrap_or_default(),
            )?;
            endpoints.extend(services.iter().map(|s| s.endpoint.clone()));
        } else if let Some(endpoint) =
            registry.and_then(|r| r.endpoint.clone().filter(|e| !e.is_empty()))
        {
            // An empty endpoint is unset, as in Talos (where it means the default).
            check_endpoint_url(&endpoint).map_err(|message| {
                err(
                    format!("cluster.discovery.registries.{name}.endpoint"),
                    format!("{endpoint:?}: {message}"),
                )
            })?;
            inject(&mut config, name, "endpoint", endpoint.clone().into())?;
            endpoints.push(endpoint);
        }
        let grpc = grpc_grant(name, &self.grants, endpoints, base)?;
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
        // The Kubernetes registry reads Nodes: with a granted kubeconfig, else
        // (for the registry named `kubernetes`) the pod's service account.
        let kube = match &self.grants.kubeconfig {
            Some(file) => {
                let path = base.join(file);
                if !path.is_file() {
                    return Err(err(
                        at("grants.kubeconfig"),
                        format!("{} is not a file", path.display()),
                    ));
                }
                Some(KubeGrant::Kubeconfig(path))
            }
            None => (name == "kubernetes").then_some(KubeGrant::InCluster),
        };
        // The discovery service protocol seals everything: its registry gets the
        // crypto capability unless the operator says otherwise.
        let crypto = self
            .grants
            .crypto
            .unwrap_or(name == "service")
            .then(|| ClusterCrypto {
                cluster_id: cluster.map(|c| c.id.clone()),
                key: cluster.map(|c| c.key.clone()),
            });
        Ok(PluginConfig {
            name: name.to_string(),
            source,
            prefix: self.prefix,
            config_json: config.to_string(),
            grants: Grants {
                files,
                crypto,
                grpc,
                kube,
            },
            enabled: !registry.is_some_and(|r| r.disabled),
            limits: self.limits.validate(name)?,
        })
    }
}

/// Adds what the daemon config says about a registry to the plugin's own config
/// section, under `key`.
fn inject(
    config: &mut serde_json::Value,
    name: &str,
    key: &str,
    value: serde_json::Value,
) -> Result<(), ConfigError> {
    match config {
        serde_json::Value::Null => *config = serde_json::json!({ key: value }),
        serde_json::Value::Object(map) if !map.contains_key(key) => {
            map.insert(key.into(), value);
        }
        _ => {
            return Err(err(
                format!("plugins.{name}.config"),
                format!("must be a map without `{key}`, which the registry's config fills in"),
            ));
        }
    }
    Ok(())
}

/// The gRPC endpoints a plugin may call: its registry's own, and those granted
/// in `grants.endpoints`; with the CA it trusts for them.
fn grpc_grant(
    name: &str,
    grants: &RawGrants,
    registry_endpoints: Vec<String>,
    base: &Path,
) -> Result<GrpcGrant, ConfigError> {
    let mut targets = Vec::new();
    for endpoint in registry_endpoints {
        // Checked with Talos's messages already, where the config names it.
        if let Ok(target) = GrpcTarget::parse(&endpoint) {
            targets.push(target);
        }
    }
    for (i, endpoint) in grants.endpoints.iter().enumerate() {
        let field = || format!("plugins.{name}.grants.endpoints[{i}]");
        check_endpoint_url(endpoint).map_err(|m| err(field(), format!("{endpoint:?}: {m}")))?;
        targets.push(GrpcTarget::parse(endpoint).map_err(|m| err(field(), m))?);
    }
    targets.sort();
    targets.dedup();
    let ca_pem = match &grants.ca_file {
        None => None,
        Some(file) => {
            let path = base.join(file);
            let field = format!("plugins.{name}.grants.caFile");
            let pem = std::fs::read(&path)
                .map_err(|e| err(&field, format!("cannot read {}: {e}", path.display())))?;
            if !pem
                .windows(b"-----BEGIN CERTIFICATE-----".len())
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
            {
                return Err(err(
                    field,
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            Some(pem)
        }
    };
    Ok(GrpcGrant { targets, ca_pem })
}

impl RawLimits {
    /// Each limit is the configured value if it is within its range, else the
    /// default.
    fn validate(self, plugin: &str) -> Result<PluginLimits, ConfigError> {
        let defaults = PluginLimits::default();
        let limit = |key: &str, value: Option<u64>, range: RangeInclusive<u64>, default: u64| {
            let value = value.unwrap_or(default);
            if !range.contains(&value) {
                return Err(err(
                    format!("plugins.{plugin}.limits.{key}"),
                    format!("{value} is outside {}..={}", range.start(), range.end()),
                ));
            }
            Ok(value)
        };
        let memory_mib = limit(
            "memoryMiB",
            self.memory_mib,
            limits::PLUGIN_MEMORY_MIB_MIN..=limits::PLUGIN_MEMORY_MIB_MAX,
            limits::PLUGIN_MEMORY_MIB,
        )?;
        let cpu_budget_ms = limit(
            "cpuBudgetMs",
            self.cpu_budget_ms,
            limits::PLUGIN_CPU_BUDGET_MS_MIN..=limits::PLUGIN_CPU_BUDGET_MS_MAX,
            limits::PLUGIN_CPU_BUDGET_MS,
        )?;
        let cpu_share_percent = limit(
            "cpuSharePercent",
            self.cpu_share_percent,
            limits::PLUGIN_CPU_SHARE_PERCENT_RANGE,
            defaults.cpu_share_percent.into(),
        )?;
        let cpu_share_window_ms = limit(
            "cpuShareWindowMs",
            self.cpu_share_window_ms,
            limits::PLUGIN_CPU_SHARE_WINDOW_MS_RANGE,
            defaults.cpu_share_window.as_millis() as u64,
        )?;
        let resources = limit(
            "resources",
            self.resources,
            limits::PLUGIN_RESOURCES_RANGE,
            defaults.resources as u64,
        )?;
        let withdraw_after_seconds = limit(
            "withdrawAfterSeconds",
            self.withdraw_after_seconds,
            limits::PLUGIN_WITHDRAW_AFTER_SECONDS_RANGE,
            defaults.withdraw_after.as_secs(),
        )?;
        Ok(PluginLimits {
            memory: (memory_mib as usize) << 20,
            cpu_budget: Duration::from_millis(cpu_budget_ms),
            cpu_share_percent: cpu_share_percent as u32,
            cpu_share_window: Duration::from_millis(cpu_share_window_ms),
            resources: resources as usize,
            withdraw_after: Duration::from_secs(withdraw_after_seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::PluginSource;
    use crate::config::tests::{SECRET, dir_with_plugin, parse_in};

    #[test]
    fn registry_endpoints_reach_the_plugin_config_and_are_granted() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            &format!(
                "cluster: {{id: c, secret: {SECRET}, discovery: {{registries: {{\
                 service: {{endpoint: 'http://localhost:3000'}}, \
                 other: {{endpoint: 'https://other.example/'}}}}}}}}\n\
                 plugins: {{other: {{path: p.wasm, grants: {{endpoints: ['grpc://extra.example:4000']}}}}}}"
            ),
        )
        .unwrap();
        let service = &config.plugins["service"];
        assert_eq!(service.source, PluginSource::BuiltIn("service".into()));
        assert_eq!(
            service.config_json,
            r#"{"endpoints":[{"name":"legacy","endpoint":"http://localhost:3000"}]}"#
        );
        assert!(service.grants.crypto.is_some());
        let granted: Vec<String> = service
            .grants
            .grpc
            .targets
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(granted, ["http://localhost:3000"]);
        let other = &config.plugins["other"];
        assert_eq!(
            other.config_json,
            r#"{"endpoint":"https://other.example/"}"#
        );
        let granted: Vec<String> = other
            .grants
            .grpc
            .targets
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(
            granted,
            ["https://extra.example:4000", "https://other.example:443"]
        );
    }

    #[test]
    fn discovery_service_documents_name_the_services() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            &format!(
                "cluster: {{id: c, secret: {SECRET}}}\n---\n\
                 apiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: b\nendpoint: http://127.0.0.1:3001\n---\n\
                 apiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: a\nendpoint: http://127.0.0.1:3002\n"
            ),
        )
        .unwrap();
        assert!(
            config.discovery_enabled,
            "the documents enable the service registry"
        );
        let service = &config.plugins["service"];
        assert_eq!(
            service.config_json,
            r#"{"endpoints":[{"name":"b","endpoint":"http://127.0.0.1:3001"},{"name":"a","endpoint":"http://127.0.0.1:3002"}]}"#
        );
        assert_eq!(service.grants.grpc.targets.len(), 2);
    }

    #[test]
    fn defaults_for_a_bare_plugin() {
        let dir = dir_with_plugin();
        let config = parse_in(&dir, "plugins: {static: {path: p.wasm}}").unwrap();
        // Unlike Talos (false when unset): this daemon exists to discover.
        assert!(config.discovery_enabled);
        let plugin = &config.plugins["static"];
        assert_eq!(plugin.limits.memory, 64 << 20);
        assert_eq!(plugin.limits.cpu_budget, Duration::from_secs(1));
        assert_eq!(plugin.limits.cpu_share_percent, 10);
        assert_eq!(plugin.limits.cpu_share_window, Duration::from_secs(10));
        assert_eq!(plugin.limits.resources, 256);
        assert_eq!(plugin.limits.withdraw_after, Duration::from_secs(300));
        assert_eq!(plugin.config_json, "null");
        assert!(plugin.grants.files.is_empty());
        assert!(plugin.grants.crypto.is_none(), "crypto is a grant");
    }

    #[test]
    fn crypto_is_granted_to_the_service_registry_by_default_and_to_others_on_request() {
        let dir = dir_with_plugin();
        let config = parse_in(
            &dir,
            &format!(
                "cluster: {{id: c1, secret: {SECRET}}}\n\
                 plugins: {{service: {{path: p.wasm}}, static: {{path: p.wasm}}, \
                 probe: {{path: p.wasm, grants: {{crypto: true}}}}, \
                 quiet: {{path: p.wasm, prefix: quiet, grants: {{crypto: false}}}}}}"
            ),
        )
        .unwrap();
        let crypto = |name: &str| config.plugins[name].grants.crypto.clone();
        assert_eq!(crypto("service").unwrap().cluster_id.as_deref(), Some("c1"));
        assert!(crypto("service").unwrap().key.is_some());
        assert!(crypto("static").is_none());
        assert!(crypto("probe").is_some());
        assert!(crypto("quiet").is_none());
    }
}
