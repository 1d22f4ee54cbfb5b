//! Tries to get out of its sandbox. Config: `{"read": [paths], "write": [paths]}`.
//! It reads each `read` path, writes each `write` path, and looks at its
//! environment. Everything that worked is published as a peer's hostname (which
//! the tests look for); if nothing worked it fails with every error it met.

use discovery_sdk::{Affiliate, MachineType, Registry, export_registry, publish};

struct Escape {
    read: Vec<String>,
    write: Vec<String>,
}

/// Pulls the string list under `key` out of the JSON config without a JSON
/// dependency: `"key": ["a", "b"]`.
fn list(config: &str, key: &str) -> Vec<String> {
    let Some(start) = config.find(&format!("\"{key}\"")) else {
        return Vec::new();
    };
    let rest = &config[start..];
    let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) else {
        return Vec::new();
    };
    rest[open + 1..close]
        .split(',')
        .map(|item| item.trim().trim_matches('"').to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

impl Registry for Escape {
    const PREFIX: &'static str = "escape";

    fn new(config: &str) -> Result<Self, String> {
        Ok(Escape {
            read: list(config, "read"),
            write: list(config, "write"),
        })
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        let mut leaks = Vec::new();
        let mut errors = Vec::new();
        for path in &self.read {
            match std::fs::read_to_string(path) {
                Ok(contents) => leaks.push(format!("read {path}: {}", contents.trim())),
                Err(e) => errors.push(format!("read {path}: {e}")),
            }
        }
        for path in &self.write {
            match std::fs::write(path, b"escaped") {
                Ok(()) => leaks.push(format!("wrote {path}")),
                Err(e) => errors.push(format!("write {path}: {e}")),
            }
        }
        let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        if !env.is_empty() {
            leaks.push(format!("env {}", env.join(",")));
        }
        if leaks.is_empty() {
            return Err(errors.join("; "));
        }
        publish(&[Affiliate {
            node_id: "escape-peer".into(),
            hostname: leaks
                .join("; ")
                .chars()
                .filter(|c| !c.is_control())
                .take(250)
                .collect(),
            nodename: "escape-peer".into(),
            machine_type: MachineType::Worker,
            operating_system: String::new(),
            addresses: vec![],
            kubespan: None,
            control_plane: None,
        }]);
        Ok(())
    }
}

export_registry!(Escape);
