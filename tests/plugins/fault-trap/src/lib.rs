//! Traps a moment after start: publishes one good peer among 2100 bad entries (a
//! flood of rejections the daemon must not echo line by line), then panics
//! (panic = abort, so the component hits `unreachable`). The peer must survive
//! the crash.

use discovery_sdk::{Affiliate, MachineType, Registry, export_registry, publish};

struct Trap;

impl Registry for Trap {
    const PREFIX: &'static str = "trap";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(Trap)
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        let peer = Affiliate {
            node_id: "trap-peer".into(),
            hostname: "trap-peer".into(),
            nodename: "trap-peer".into(),
            machine_type: MachineType::Worker,
            operating_system: String::new(),
            addresses: vec![],
            kubespan: None,
            control_plane: None,
        };
        let bad = Affiliate {
            node_id: String::new(),
            ..peer.clone()
        };
        let mut list = vec![peer];
        list.extend(std::iter::repeat_n(bad, 2100));
        publish(&list);
        panic!("fault-trap: deliberate panic");
    }
}

export_registry!(Trap);
