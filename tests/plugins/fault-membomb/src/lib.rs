//! Allocates without bound: only the memory cap stops it.

use discovery_sdk::{Affiliate, Registry, export_registry};

struct MemBomb;

impl Registry for MemBomb {
    const PREFIX: &'static str = "membomb";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(MemBomb)
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page so the memory is really committed.
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export_registry!(MemBomb);
