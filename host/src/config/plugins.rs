//! The registry plugins (`plugins.<name>`): the component file, the raw-affiliate
//! prefix, the plugin's own config section (with Talos's registry endpoint folded
//! in), the host directories it may read, and its memory and CPU limits.
//!
//! Apart because a plugin runs untrusted code: everything it is granted is
//! decided here, before it starts.

use std::path::{Path, PathBuf};

use super::endpoint_url::check_endpoint_url;
use super::file::{RawPlugin, RawRegistry};
use super::{ConfigError, err};
use crate::limits;

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

impl RawPlugin {
    pub(super) fn validate(
        self,
        name: &str,
        registry: Option<&RawRegistry>,
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
        let memory_mib = self.limits.memory_mib.unwrap_or(limits::PLUGIN_MEMORY_MIB);
        if !(limits::PLUGIN_MEMORY_MIB_MIN..=limits::PLUGIN_MEMORY_MIB_MAX).contains(&memory_mib) {
            return Err(err(
                at("limits.memoryMiB"),
                format!(
                    "{memory_mib} is outside {}..={}",
                    limits::PLUGIN_MEMORY_MIB_MIN,
                    limits::PLUGIN_MEMORY_MIB_MAX
                ),
            ));
        }
        let cpu_ms = self
            .limits
            .cpu_budget_ms
            .unwrap_or(limits::PLUGIN_CPU_BUDGET_MS);
        if !(limits::PLUGIN_CPU_BUDGET_MS_MIN..=limits::PLUGIN_CPU_BUDGET_MS_MAX).contains(&cpu_ms)
        {
            return Err(err(
                at("limits.cpuBudgetMs"),
                format!(
                    "{cpu_ms} is outside {}..={}",
                    limits::PLUGIN_CPU_BUDGET_MS_MIN,
                    limits::PLUGIN_CPU_BUDGET_MS_MAX
                ),
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

#[cfg(test)]
mod tests {
    use crate::config::tests::{dir_with_plugin, parse_in};

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
        assert_eq!(plugin.memory_limit, 64 << 20);
        assert_eq!(plugin.cpu_budget, std::time::Duration::from_secs(1));
        assert_eq!(plugin.config_json, "null");
        assert!(plugin.files.is_empty());
    }
}
