//! What this node can hold: its cores and memory (GPUs come with the GPU
//! work). Each replica reserves its app's `cpu` and `memory` while it lives;
//! one that does not fit waits, reported as pending, until capacity frees.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::config::format_size;

/// A replica's claim on the node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Demand {
    pub cpu: f64,
    pub memory: u64,
}

pub(crate) struct Capacity {
    total: Demand,
    used: Mutex<Demand>,
    /// Woken whenever a reservation is released.
    pub(crate) freed: Notify,
}

/// Floating-point slack so that e.g. ten 0.1-core replicas fit one core.
const EPSILON: f64 = 1e-9;

impl Capacity {
    pub(crate) fn new(total: Demand) -> Self {
        Self { total, used: Mutex::new(Demand { cpu: 0.0, memory: 0 }), freed: Notify::new() }
    }

    /// This machine: its cores and physical memory.
    pub(crate) fn of_this_machine() -> Demand {
        let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Demand { cpu, memory: physical_memory().unwrap_or(4 << 30) }
    }

    /// Reserves `demand`, or says why it does not fit.
    pub(crate) fn try_reserve(&self, demand: Demand) -> Result<(), String> {
        let mut used = self.used.lock().unwrap();
        let free_cpu = self.total.cpu - used.cpu;
        let free_memory = self.total.memory.saturating_sub(used.memory);
        if demand.cpu > free_cpu + EPSILON {
            return Err(format!(
                "waiting for {} cores; {free_cpu:.2} of the node's {} are free",
                demand.cpu, self.total.cpu
            ));
        }
        if demand.memory > free_memory {
            return Err(format!(
                "waiting for {} of memory; {} of the node's {} are free",
                format_size(demand.memory),
                format_size(free_memory),
                format_size(self.total.memory)
            ));
        }
        used.cpu += demand.cpu;
        used.memory += demand.memory;
        Ok(())
    }

    pub(crate) fn release(&self, demand: Demand) {
        {
            let mut used = self.used.lock().unwrap();
            used.cpu = (used.cpu - demand.cpu).max(0.0);
            used.memory = used.memory.saturating_sub(demand.memory);
        }
        self.freed.notify_waiters();
    }
}

fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_until_full_and_free_on_release() {
        let capacity = Capacity::new(Demand { cpu: 2.0, memory: 1 << 30 });
        let half = Demand { cpu: 1.0, memory: 256 << 20 };
        capacity.try_reserve(half).unwrap();
        capacity.try_reserve(half).unwrap();
        let why = capacity.try_reserve(half).unwrap_err();
        assert!(why.contains("cores"), "{why}");
        capacity.release(half);
        capacity.try_reserve(half).unwrap();
        let big = Demand { cpu: 0.0, memory: 2 << 30 };
        assert!(capacity.try_reserve(big).unwrap_err().contains("memory"));
        let tenth = Demand { cpu: 0.1, memory: 0 };
        let capacity = Capacity::new(Demand { cpu: 1.0, memory: 0 });
        for _ in 0..10 {
            capacity.try_reserve(tenth).unwrap();
        }
    }
}
