//! Stays busy without ever waiting for an event, in ways the epoch deadline alone
//! cannot see. Config `{"mode": "sleep"}`: blocks in a WASI sleep for an hour;
//! `{"mode": "log-loop"}`: calls the host's `log` forever; `{"mode": "poll-loop"}`:
//! polls `next-event(0)` forever, which returns at once and so is not idle time.

use std::time::Duration;

use discovery_sdk::{Affiliate, Registry, export_registry, info};

struct Block {
    mode: String,
}

impl Registry for Block {
    const PREFIX: &'static str = "block";

    fn new(config: &str) -> Result<Self, String> {
        let mode = config.split('"').nth(3).unwrap_or("").to_string();
        Ok(Block { mode })
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        match self.mode.as_str() {
            "sleep" => std::thread::sleep(Duration::from_secs(3600)),
            "log-loop" => loop {
                info!("fault-block: spam");
            },
            "poll-loop" => loop {
                discovery_sdk::bindings::discovery::registry::host::next_event(0);
            },
            other => return Err(format!("unknown mode {other:?}")),
        }
        Ok(())
    }
}

export_registry!(Block);
