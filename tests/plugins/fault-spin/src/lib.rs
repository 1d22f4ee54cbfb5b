//! Loops forever without calling the host: only the CPU deadline stops it.

use discovery_sdk::{Affiliate, Registry, export_registry};

struct Spin;

impl Registry for Spin {
    const PREFIX: &'static str = "spin";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(Spin)
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

export_registry!(Spin);
