//! The per-worker memory limit (the app's `memory` split across its workers).

use wasmtime::ResourceLimiter;

/// Refuses growth past the limit and remembers that it did, so a guest that
/// dies of it is reported as out of memory rather than as a bare trap.
pub(crate) struct MemoryLimiter {
    limit: u64,
    refused: Option<u64>,
}

/// Table elements a guest may grow to; tables hold function references.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryLimiter {
    pub(crate) fn new(limit: u64) -> Self {
        Self { limit, refused: None }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// The size a refused growth asked for, if any since the last call.
    pub(crate) fn take_refused(&mut self) -> Option<u64> {
        self.refused.take()
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
