//! What `discoveryd plugins` shows: each plugin's state, restarts, throttling,
//! withdrawal and last error.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Starting,
    Running,
    /// Held back because it used more than its CPU share.
    Throttled,
    /// Waiting out the backoff before the next start.
    Restarting,
    Stopped,
    /// Configured, but its registry is disabled.
    Disabled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Throttled => "throttled",
            RunState::Restarting => "restarting",
            RunState::Stopped => "stopped",
            RunState::Disabled => "disabled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginStatus {
    pub name: String,
    pub prefix: String,
    pub state: RunState,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// The plugin's own note (`set-status`).
    pub healthy: bool,
    pub message: String,
    /// Raw affiliates it currently publishes.
    pub published: usize,
    /// How often it was held back for using more than its CPU share.
    pub throttled: u32,
    /// Its raw affiliates were withdrawn because it kept failing; cleared when it
    /// publishes again.
    pub withdrawn: bool,
    /// The public address a registry sees this node at, as the plugin reports it.
    pub public_address: Option<std::net::IpAddr>,
}

/// Status of every plugin, shared by the supervisors and the API.
pub struct PluginStatuses {
    plugins: Mutex<BTreeMap<String, PluginStatus>>,
    /// Bumped on every change, for watchers.
    changes: watch::Sender<u64>,
}

impl Default for PluginStatuses {
    fn default() -> Self {
        PluginStatuses {
            plugins: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        }
    }
}

impl PluginStatuses {
    pub fn register(&self, name: &str, prefix: &str) {
        self.lock().insert(
            name.to_string(),
            PluginStatus {
                name: name.to_string(),
                prefix: prefix.to_string(),
                state: RunState::Starting,
                restarts: 0,
                last_error: None,
                healthy: true,
                message: String::new(),
                published: 0,
                throttled: 0,
                withdrawn: false,
                public_address: None,
            },
        );
        self.changes.send_modify(|g| *g += 1);
    }

    /// Applies `change`; watchers wake only if it changed something (a plugin that
    /// republishes the same view every poll wakes nobody).
    pub fn update(&self, name: &str, change: impl FnOnce(&mut PluginStatus)) {
        let changed = match self.lock().get_mut(name) {
            Some(status) => {
                let before = status.clone();
                change(status);
                *status != before
            }
            None => false,
        };
        if changed {
            self.changes.send_modify(|g| *g += 1);
        }
    }

    /// Wakes after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn list(&self) -> Vec<PluginStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PluginStatus>> {
        self.plugins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_wake_only_on_real_changes() {
        let statuses = PluginStatuses::default();
        statuses.register("static", "static");
        let mut changes = statuses.subscribe();
        changes.borrow_and_update();
        statuses.update("static", |s| s.published = 0);
        statuses.update("absent", |s| s.published = 5);
        assert!(!changes.has_changed().unwrap(), "nothing changed");
        statuses.update("static", |s| s.published = 2);
        assert!(changes.has_changed().unwrap());
        assert_eq!(statuses.list()[0].published, 2);
    }
}
