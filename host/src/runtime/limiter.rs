//! The memory cap of one plugin, over all its linear memories and tables
//! together. A guest that grows past it traps with a message that says so,
//! rather than seeing `memory.grow` fail somewhere in its allocator.

use wasmtime::ResourceLimiter;

/// Table elements (function references) a plugin may hold in all its tables.
const TABLE_ELEMENTS_MAX: usize = 100_000;
/// A Rust wasip2 component has one memory and a few tables and instances.
const INSTANCES_MAX: usize = 32;
const TABLES_MAX: usize = 16;
const MEMORIES_MAX: usize = 4;

pub struct MemoryCap {
    max_bytes: usize,
    /// Bytes of all linear memories so far.
    memory_bytes: usize,
    table_elements: usize,
}

impl MemoryCap {
    pub fn new(max_bytes: usize) -> MemoryCap {
        MemoryCap {
            max_bytes,
            memory_bytes: 0,
            table_elements: 0,
        }
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
        if total > self.max_bytes {
            wasmtime::bail!(
                "memory limit exceeded: the plugin asked for {} KiB in all, its limit is {} MiB",
                total.div_ceil(1024),
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
        let mut cap = MemoryCap::new(64 * MIB);
        assert!(cap.memory_growing(0, 40 * MIB, None).unwrap());
        assert!(cap.memory_growing(40 * MIB, 50 * MIB, None).unwrap());
        // A second memory may only have what the first left.
        assert!(cap.memory_growing(0, 14 * MIB, None).unwrap());
        let error = cap.memory_growing(0, MIB, None).unwrap_err().to_string();
        assert!(error.contains("memory limit exceeded"), "{error}");
    }

    #[test]
    fn table_elements_are_capped_in_total() {
        let mut cap = MemoryCap::new(64 * MIB);
        assert!(cap.table_growing(0, TABLE_ELEMENTS_MAX / 2, None).unwrap());
        assert!(cap.table_growing(0, TABLE_ELEMENTS_MAX / 2, None).unwrap());
        assert!(!cap.table_growing(0, 1, None).unwrap());
    }
}
