//! Traps a moment after start: publishes one peer, then panics (panic = abort, so
//! the component hits `unreachable`). The peer must survive the crash.

use discovery_sdk::{Affiliate, MachineType, Registry, export_registry, publish};

struct Trap;

impl Registry for Trap {
    const PREFIX: &'static str = "trap";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(Trap)
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        publish(&[Affiliate {
            node_id: "trap-peer".into(),
            hostname: "trap-peer".into(),
            nodename: "trap-peer".into(),
            machine_type: MachineType::Worker,
            operating_system: String::new(),
            addresses: vec![],
            kubespan: None,
            control_plane: None,
        }]);
        panic!("fault-trap: deliberate panic");
    }
}

export_registry!(Trap);
