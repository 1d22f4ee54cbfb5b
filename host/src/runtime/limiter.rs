//! The memory cap of one plugin. A guest that grows past it traps with a message
//! that says so, rather than seeing `memory.grow` fail somewhere in its allocator.

use wasmtime::ResourceLimiter;

/// Tables and instances a plugin may create; generous for any Rust component.
const TABLE_ELEMENTS_MAX: usize = 100_000;
const INSTANCES_MAX: usize = 64;
const TABLES_MAX: usize = 64;
const MEMORIES_MAX: usize = 16;

pub struct MemoryCap {
    max_bytes: usize,
}

impl MemoryCap {
    pub fn new(max_bytes: usize) -> MemoryCap {
        MemoryCap { max_bytes }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            wasmtime::bail!(
                "memory limit exceeded: the plugin asked for {} KiB, its limit is {} MiB",
                desired.div_ceil(1024),
                self.max_bytes >> 20
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
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
