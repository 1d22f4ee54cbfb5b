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
use super::endpoint_url::check_endpoint_url;
use super::file::{RawLimits, RawPlugin, RawRegistry};
use super::{ConfigError, err};
use crate::capabilities::{ClusterCrypto, FileGrant, Grants};
use crate::limits;

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    /// Overrides the prefix the plugin declares for its raw affiliates.
    pub prefix: Option<String>,
    /// The plugin's own config section, handed to it as JSON.
    pub config_json: String,
    /// What the operator granted it beyond the basic host interface.
    pub grants: Grants,
    pub enabled: bool,
    pub limits: PluginLimits,
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
    pub(super) fn validate(
        self,
        name: &str,
        registry: Option<&RawRegistry>,
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
        let path = base.join(&self.path);
        if !path.is_file() {
            return Err(err(at("path"), format!("{} is not a file", path.display())));
        }
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
            path,
            prefix: self.prefix,
            config_json: config.to_string(),
            grants: Grants { files, crypto },
            enabled: !registry.is_some_and(|r| r.disabled),
            limits: self.limits.validate(name)?,
        })
    }
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

    use crate::config::tests::{SECRET, dir_with_plugin, parse_in};

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
