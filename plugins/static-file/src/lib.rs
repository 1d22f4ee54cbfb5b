//! Registry plugin that publishes the affiliates listed in a YAML or JSON file.
//!
//! Config: `{"path": "/peers/peers.yaml"}`, a path inside a read-only directory the
//! operator grants to this plugin. The file holds a list of affiliates with Talos's
//! spec keys (or `{affiliates: [...]}`); it is reread every second, and invalid
//! entries are skipped with a log line naming them.

mod entry;
mod file;

use std::time::Duration;

use discovery_sdk::{
    PUBLISH_MAX, Registry, export_registry, local_affiliate, publish, set_status, warn,
};
use serde::Deserialize;

/// How often the file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
}

impl Config {
    fn parse(config: &str) -> Result<Config, String> {
        serde_json::from_str(config)
            .map_err(|e| format!("{e} (expected {{\"path\": \"/dir/file.yaml\"}})"))
    }
}

struct StaticFile {
    path: String,
    /// The file contents last published, to republish only on change.
    last_contents: Option<Vec<u8>>,
    /// The last read error, to log it once rather than every second.
    last_error: Option<String>,
}

impl Registry for StaticFile {
    const PREFIX: &'static str = "static";

    fn check_config(config: &str) -> Result<(), String> {
        Config::parse(config).map(drop)
    }

    fn new(config: &str) -> Result<Self, String> {
        let config = Config::parse(config)?;
        Ok(Self {
            path: config.path,
            last_contents: None,
            last_error: None,
        })
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(POLL_INTERVAL)
    }

    fn on_local_change(&mut self, _local: Option<discovery_sdk::Affiliate>) -> Result<(), String> {
        self.refresh();
        Ok(())
    }

    fn on_timer(&mut self) -> Result<(), String> {
        self.refresh();
        Ok(())
    }
}

impl StaticFile {
    /// Rereads the file and publishes it if it changed. A file that cannot be read
    /// keeps the last published view: editors replace files by rename, and a
    /// moment without the file should not make every peer vanish.
    fn refresh(&mut self) {
        let contents = match std::fs::read(&self.path) {
            Ok(contents) => contents,
            Err(e) => {
                self.report_error(format!("cannot read {}: {e}", self.path));
                return;
            }
        };
        if self.last_error.is_none() && self.last_contents.as_deref() == Some(&contents[..]) {
            return;
        }
        let mut parsed = match file::parse(&contents) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.report_error(format!("{}: {e}", self.path));
                return;
            }
        };
        self.last_error = None;
        for skipped in &parsed.skipped {
            warn!("{}: skipping {skipped}", self.path);
        }
        if let Some(local) = local_affiliate() {
            parsed.remove_node(&local.node_id);
        }
        parsed.truncate(PUBLISH_MAX);
        let rejected = publish(&parsed.affiliates);
        for r in &rejected {
            let name = parsed.names.get(r.index as usize).map_or("an entry", |n| n);
            warn!("{}: the daemon refused {name}: {}", self.path, r.reason);
        }
        let published = parsed.affiliates.len().saturating_sub(rejected.len());
        let skipped = parsed.skipped.len() + rejected.len();
        set_status(
            skipped == 0,
            &format!(
                "{published} affiliates from {}, {skipped} skipped",
                self.path
            ),
        );
        self.last_contents = Some(contents);
    }

    /// Logs and shows an error once, not on every poll.
    fn report_error(&mut self, message: String) {
        if self.last_error.as_deref() != Some(message.as_str()) {
            warn!("{message}; keeping the last published affiliates");
            set_status(false, &message);
            self.last_error = Some(message);
        }
    }
}

export_registry!(StaticFile);
