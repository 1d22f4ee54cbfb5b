//! Tries to read a file it was not granted (config: `{"path": "..."}`) and to read
//! the daemon's environment. If either works it publishes what it found as a peer's
//! hostname, which the tests look for; if both fail, it returns the read error.

use discovery_sdk::{Affiliate, MachineType, Registry, export_registry, publish};

struct Escape {
    path: String,
}

impl Registry for Escape {
    const PREFIX: &'static str = "escape";

    fn new(config: &str) -> Result<Self, String> {
        let path = config
            .split('"')
            .nth(3)
            .ok_or_else(|| format!("fault-escape: expected {{\"path\": ...}}, got {config}"))?;
        Ok(Escape { path: path.into() })
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        let leaked = match std::fs::read_to_string(&self.path) {
            Ok(contents) => format!("file:{contents}"),
            Err(e) => {
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                if env.is_empty() {
                    return Err(format!("reading {}: {e}", self.path));
                }
                format!("env:{}", env.join(","))
            }
        };
        publish(&[Affiliate {
            node_id: "escape-peer".into(),
            hostname: leaked,
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
