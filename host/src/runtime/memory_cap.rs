//! The memory cap of one plugin, over all its linear memories and tables
//! together, and over what the host keeps on its behalf (the raw affiliates it
//! published). A guest that grows past it traps with a message that says so,
//! rather than seeing `memory.grow` fail somewhere in its allocator.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::ResourceLimiter;

use crate::limits::{
    PLUGIN_INSTANCES_MAX as INSTANCES_MAX, PLUGIN_MEMORIES_MAX as MEMORIES_MAX,
    PLUGIN_TABLE_ELEMENTS_MAX as TABLE_ELEMENTS_MAX, PLUGIN_TABLES_MAX as TABLES_MAX,
};

pub struct MemoryCap {
    max_bytes: usize,
    /// Bytes of all linear memories so far.
    memory_bytes: usize,
    table_elements: usize,
    host: Arc<HostMemory>,
}

/// Host memory held for one plugin; outlives an incarnation, as what it
/// published does.
#[derive(Debug, Default)]
pub struct HostMemory {
    /// What its raw affiliates take in the store.
    pub published: AtomicUsize,
    /// Messages received for it (gRPC) and not yet taken.
    pub in_transit: AtomicUsize,
}

impl HostMemory {
    pub fn total(&self) -> usize {
        self.published.load(Ordering::Relaxed) + self.in_transit.load(Ordering::Relaxed)
    }
}

impl MemoryCap {
    pub fn new(max_bytes: usize, host: Arc<HostMemory>) -> MemoryCap {
        MemoryCap {
            max_bytes,
            memory_bytes: 0,
            table_elements: 0,
            host,
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// What the plugin's published affiliates may take, beside its memories
    /// and what is in transit for it.
    pub fn room_to_publish(&self) -> usize {
        self.max_bytes
            .saturating_sub(self.memory_bytes + self.host.in_transit.load(Ordering::Relaxed))
    }

    /// Records what the plugin's published affiliates take; the caller checked
    /// `room_to_publish` first.
    pub fn set_published_bytes(&self, bytes: usize) {
        self.host.published.store(bytes, Ordering::Relaxed);
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_bytes - current.min(self.memory_bytes) + desired;
        let host = self.host.total();
        if total + host > self.max_bytes {
            wasmtime::bail!(
                "memory limit exceeded: the plugin asked for {} KiB in all ({} KiB more held by \
                 the host for what it published), its limit is {} MiB",
                total.div_ceil(1024),
                host.div_ceil(1024),
                self.max_bytes >> 20
            );
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_elements - current.min(self.table_elements) + desired;
        if total > TABLE_ELEMENTS_MAX {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        INSTANCES_MAX
    }

    fn tables(&self) -> usize {
        TABLES_MAX
    }

    fn memories(&self) -> usize {
        MEMORIES_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_cap_covers_all_memories_together() {
        let mut cap = MemoryCap::new(64 * MIB, Arc::default());
        assert!(cap.memory_growing(0, 40 * MIB, None).unwrap());
        assert!(cap.memory_growing(40 * MIB, 50 * MIB, None).unwrap());
        // A second memory may only have what the first left.
        assert!(cap.memory_growing(0, 14 * MIB, None).unwrap());
        let error = cap.memory_growing(0, MIB, None).unwrap_err().to_string();
        assert!(error.contains("memory limit exceeded"), "{error}");
    }

    #[test]
    fn what_the_host_holds_counts_too() {
        let host = Arc::new(HostMemory::default());
        let mut cap = MemoryCap::new(64 * MIB, host.clone());
        assert!(cap.memory_growing(0, 40 * MIB, None).unwrap());
        host.in_transit.store(4 * MIB, Ordering::Relaxed);
        assert_eq!(cap.room_to_publish(), 20 * MIB);
        host.in_transit.store(0, Ordering::Relaxed);
        cap.set_published_bytes(20 * MIB);
        assert!(cap.memory_growing(40 * MIB, 44 * MIB, None).unwrap());
        let error = cap
            .memory_growing(44 * MIB, 45 * MIB, None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("20480 KiB more held by the host"), "{error}");
        // A new incarnation starts with what the last one left published.
        let next = MemoryCap::new(64 * MIB, host);
        assert_eq!(next.host.total(), 20 * MIB);
    }

    #[test]
    fn table_elements_are_capped_in_total() {
        let mut cap = MemoryCap::new(64 * MIB, Arc::default());
        assert!(cap.table_growing(0, TABLE_ELEMENTS_MAX / 2, None).unwrap());
        assert!(cap.table_growing(0, TABLE_ELEMENTS_MAX / 2, None).unwrap());
        assert!(!cap.table_growing(0, 1, None).unwrap());
    }
}
