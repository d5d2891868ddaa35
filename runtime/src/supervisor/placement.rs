//! What this node can hold: its cores, memory and GPUs. Each replica
//! reserves its app's `cpu` and `memory` while it lives, and a GPU app's
//! replica a whole GPU of the model it asks for, which no other replica gets
//! until it exits. One that does not fit waits, reported as pending, until
//! capacity frees.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::{describe_cores, describe_size};
use crate::ipc::{GpuBackendKind, GpuSpec};

/// A replica's claim on the node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Demand {
    pub cpu: f64,
    pub memory: u64,
}

/// A GPU of this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeGpu {
    pub index: u32,
    pub name: String,
    pub memory_bytes: u64,
    /// NVML's stable id (`GPU-8d6f...`); `None` for CPU-backed GPUs.
    pub uuid: Option<String>,
}

/// The GPU a replica asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GpuDemand {
    /// `"any"` or part of a model name such as `"H100"` (case-insensitive).
    pub model: String,
    pub quota_per_worker: u64,
    /// `workers * gpu_memory`: the GPU must have that much (0: any size).
    pub memory_needed: u64,
}

impl NodeGpu {
    /// Whether this GPU is of `model`: `"any"`, or part of its name (case-insensitive).
    pub(crate) fn is_model(&self, model: &str) -> bool {
        model.eq_ignore_ascii_case("any") || self.name.to_lowercase().contains(&model.to_lowercase())
    }
}

/// The node's GPUs and what backs them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Gpus {
    pub backend: Option<GpuBackendKind>,
    pub devices: Vec<NodeGpu>,
}

pub(crate) struct Capacity {
    total: Demand,
    gpus: Gpus,
    used: Mutex<Used>,
    /// Woken whenever a reservation is made or released: pending replicas
    /// try again, and say anew what they wait for (the free share changed).
    pub(crate) changed: Notify,
    /// Replicas waiting for room ([`Capacity::wait`]), in the order they came.
    waiters: Mutex<Vec<Waiter>>,
    /// How many wait (asked on every replica's run end).
    waiting: AtomicUsize,
    next_ticket: AtomicU64,
    /// Apps an idle replica of another app was stopped for lately, since
    /// when: the room it frees is theirs first ([`ROOM_FREES_IN`]).
    room_made_for: Mutex<HashMap<String, Instant>>,
}

/// How long the room an idle replica was stopped for stays its app's (the
/// replica drains and exits, then the pending one starts); its calls are
/// not refused for want of capacity meanwhile.
pub(crate) const ROOM_FREES_IN: Duration = Duration::from_secs(10);

/// A replica waiting for room.
struct Waiter {
    ticket: u64,
    replica: String,
    app: String,
    demand: Demand,
    gpu: Option<GpuDemand>,
    /// Not to be waited for: its cluster does not want it to start now.
    held_back: bool,
}

/// A replica's place in line for room, while it lives (see [`Capacity::wait`]).
pub(crate) struct Waiting<'a> {
    capacity: &'a Capacity,
    ticket: u64,
}

impl Waiting<'_> {
    /// Whether replicas behind it in line go first: it would not start if it could.
    pub(crate) fn hold_back(&self, held: bool) {
        let mut waiters = self.capacity.waiters.lock().unwrap();
        if let Some(waiter) = waiters.iter_mut().find(|w| w.ticket == self.ticket) {
            waiter.held_back = held;
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.capacity.waiters.lock().unwrap().retain(|w| w.ticket != self.ticket);
        self.capacity.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Used {
    cpu: f64,
    memory: u64,
    /// Per GPU of [`Gpus::devices`]: the replica that holds it.
    gpus: Vec<Option<String>>,
}

/// Floating-point slack so that e.g. ten 0.1-core replicas fit one core.
const EPSILON: f64 = 1e-9;

impl Capacity {
    pub(crate) fn new(total: Demand, gpus: Gpus) -> Self {
        let used = Used { cpu: 0.0, memory: 0, gpus: vec![None; gpus.devices.len()] };
        Self {
            total,
            gpus,
            used: Mutex::new(used),
            changed: Notify::new(),
            waiters: Mutex::default(),
            waiting: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            room_made_for: Mutex::default(),
        }
    }

    /// Puts replica `replica` of `app` in line for room until the guard
    /// drops (see [`Capacity::try_reserve_in_turn`]).
    pub(crate) fn wait(&self, replica: &str, app: &str, demand: Demand, gpu: Option<&GpuDemand>) -> Waiting<'_> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (replica, app, gpu) = (replica.to_owned(), app.to_owned(), gpu.cloned());
        self.waiters.lock().unwrap().push(Waiter { ticket, replica, app, demand, gpu, held_back: false });
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting { capacity: self, ticket }
    }

    /// Whether any replica waits for room now.
    pub(crate) fn has_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// The apps whose replicas wait for room now.
    pub(crate) fn waiting_apps(&self) -> HashSet<String> {
        self.waiters.lock().unwrap().iter().map(|w| w.app.clone()).collect()
    }

    /// Says that an idle replica was stopped to give `app`'s pending replica its room.
    pub(crate) fn make_room_for(&self, app: &str) {
        self.room_made_for.lock().unwrap().insert(app.to_owned(), Instant::now());
    }

    /// Whether room is on its way to `app` (see [`Capacity::make_room_for`]).
    pub(crate) fn making_room_for(&self, app: &str) -> bool {
        let mut made = self.room_made_for.lock().unwrap();
        made.retain(|_, since| since.elapsed() < ROOM_FREES_IN);
        made.contains_key(app)
    }

    /// `app` has no replica waiting any more: no room is on its way to it.
    pub(crate) fn room_taken(&self, app: &str) {
        self.room_made_for.lock().unwrap().remove(app);
    }

    /// Reserves room for `waiting`'s replica unless a replica ahead of it in
    /// line fits the room free now, so that room goes to who waited for it:
    /// first the apps room was made for, then those with `queued` tasks,
    /// then the rest, each in the order they came. Else why it waits.
    pub(crate) fn try_reserve_in_turn(
        &self,
        waiting: &Waiting<'_>,
        queued: &HashSet<String>,
        reserve: bool,
    ) -> Result<Option<GpuSpec>, String> {
        let waiters = self.waiters.lock().unwrap();
        let made = {
            let mut made = self.room_made_for.lock().unwrap();
            made.retain(|_, since| since.elapsed() < ROOM_FREES_IN);
            made.clone()
        };
        let Some(me) = waiters.iter().find(|w| w.ticket == waiting.ticket) else {
            return Err("it no longer waits".to_owned());
        };
        let rank = |w: &Waiter| {
            let class = if made.contains_key(&w.app) {
                0
            } else if queued.contains(&w.app) {
                1
            } else {
                2
            };
            (class, w.ticket)
        };
        let mut used = self.used.lock().unwrap();
        let ahead = waiters.iter().filter(|w| !w.held_back && rank(w) < rank(me));
        if let Some(first) =
            ahead.filter(|w| self.room(&used, w.demand, w.gpu.as_ref()).is_ok()).min_by_key(|w| rank(w))
        {
            let why = match rank(first).0 {
                0 => "room was made for it",
                1 => "its app has tasks waiting",
                _ => "it waited longer",
            };
            return Err(format!("waiting its turn: replica {} of app {} goes first ({why})", first.replica, first.app));
        }
        if !reserve {
            return self.room(&used, me.demand, me.gpu.as_ref()).map(|_| None);
        }
        let placed = self.reserve(&mut used, &me.replica, me.demand, me.gpu.as_ref())?;
        drop(used);
        self.changed.notify_waiters();
        Ok(placed)
    }

    /// This machine: its cores and physical memory.
    pub(crate) fn of_this_machine() -> Demand {
        let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Demand { cpu, memory: physical_memory().unwrap_or(4 << 30) }
    }

    /// Reserves `demand` (and a whole GPU for `gpu`) for replica `holder`,
    /// whatever waits, or says why it does not fit. Returns the GPU reserved.
    #[cfg(test)]
    pub(crate) fn try_reserve(
        &self,
        holder: &str,
        demand: Demand,
        gpu: Option<&GpuDemand>,
    ) -> Result<Option<GpuSpec>, String> {
        let placed = self.reserve(&mut self.used.lock().unwrap(), holder, demand, gpu)?;
        self.changed.notify_waiters();
        Ok(placed)
    }

    fn reserve(
        &self,
        used: &mut Used,
        holder: &str,
        demand: Demand,
        gpu: Option<&GpuDemand>,
    ) -> Result<Option<GpuSpec>, String> {
        let slot = self.room(used, demand, gpu)?;
        let placed = gpu.zip(slot).map(|(want, slot)| {
            used.gpus[slot] = Some(holder.to_owned());
            let device = &self.gpus.devices[slot];
            GpuSpec {
                backend: self.gpus.backend.unwrap_or(GpuBackendKind::Cpu),
                index: device.index,
                name: device.name.clone(),
                uuid: device.uuid.clone(),
                memory_bytes: device.memory_bytes,
                quota_per_worker: want.quota_per_worker.min(device.memory_bytes),
            }
        });
        used.cpu += demand.cpu;
        used.memory += demand.memory;
        Ok(placed)
    }

    /// Whether `demand` fits now, without reserving it; else why not.
    pub(crate) fn fits(&self, demand: Demand, gpu: Option<&GpuDemand>) -> Result<(), String> {
        self.room(&self.used.lock().unwrap(), demand, gpu).map(drop)
    }

    /// Whether `demand`, which does not fit now, would fit once replica
    /// `holder`, holding `held` (and any GPU reserved for it), gave its room back.
    pub(crate) fn fits_without(&self, demand: Demand, gpu: Option<&GpuDemand>, holder: &str, held: Demand) -> bool {
        let used = self.used.lock().unwrap();
        if self.room(&used, demand, gpu).is_ok() {
            return false;
        }
        let gpus = used.gpus.iter().map(|by| by.clone().filter(|by| by != holder)).collect();
        let after = Used { cpu: (used.cpu - held.cpu).max(0.0), memory: used.memory.saturating_sub(held.memory), gpus };
        self.room(&after, demand, gpu).is_ok()
    }

    /// Whether `demand` fits beside `used`: the free GPU it would get, if it
    /// asks for one; else why it does not fit.
    fn room(&self, used: &Used, demand: Demand, gpu: Option<&GpuDemand>) -> Result<Option<usize>, String> {
        let free_cpu = self.total.cpu - used.cpu;
        let free_memory = self.total.memory.saturating_sub(used.memory);
        if demand.cpu > free_cpu + EPSILON {
            return Err(format!(
                "waiting for {}; {free_cpu:.2} of the node's {} are free",
                describe_cores(demand.cpu),
                self.total.cpu
            ));
        }
        if demand.memory > free_memory {
            return Err(format!(
                "waiting for {} of memory; {} of the node's {} are free",
                describe_size(demand.memory),
                describe_size(free_memory),
                describe_size(self.total.memory)
            ));
        }
        gpu.map(|want| self.free_gpu(used, want)).transpose()
    }

    fn free_gpu(&self, used: &Used, want: &GpuDemand) -> Result<usize, String> {
        if self.gpus.devices.is_empty() {
            return Err("waiting for a GPU; this node has none (on a machine without one, run `beamlet serve \
                 --gpu-backend cpu --gpus 1` to serve GPU apps on the CPU backend)"
                .into());
        }
        let fitting: Vec<usize> =
            (0..self.gpus.devices.len()).filter(|i| self.gpus.devices[*i].is_model(&want.model)).collect();
        if fitting.is_empty() {
            let names: Vec<_> = self.gpus.devices.iter().map(|gpu| gpu.name.as_str()).collect();
            return Err(format!("waiting for a {} GPU; this node has {}", want.model, names.join(", ")));
        }
        let model = if want.model.eq_ignore_ascii_case("any") { String::new() } else { format!("{} ", want.model) };
        // An app deployed where its GPUs were larger (a restart with other
        // GPUs): deploy checks this, placement must too.
        let largest = fitting.iter().map(|i| self.gpus.devices[*i].memory_bytes).max().unwrap_or(0);
        if largest < want.memory_needed {
            return Err(format!(
                "waiting for a {model}GPU with {} of memory (workers * gpu_memory); this node's have at most {}",
                describe_size(want.memory_needed),
                describe_size(largest)
            ));
        }
        let fitting: Vec<usize> =
            fitting.into_iter().filter(|i| self.gpus.devices[*i].memory_bytes >= want.memory_needed).collect();
        fitting.iter().copied().find(|i| used.gpus[*i].is_none()).ok_or_else(|| {
            let holders: Vec<&str> = fitting.iter().filter_map(|i| used.gpus[*i].as_deref()).collect();
            match fitting.len() {
                1 => format!("waiting for a free {model}GPU; this node's only one is held by replica {}", holders[0]),
                n => format!(
                    "waiting for a free {model}GPU; all {n} of this node's are held, by replicas {}",
                    holders.join(", ")
                ),
            }
        })
    }

    /// Each of the node's GPUs, and whether a replica holds it.
    pub(crate) fn gpus_held(&self) -> Vec<(NodeGpu, bool)> {
        let used = self.used.lock().unwrap();
        self.gpus.devices.iter().cloned().zip(used.gpus.iter().map(Option::is_some)).collect()
    }

    pub(crate) fn release(&self, demand: Demand, gpu: Option<&GpuSpec>) {
        {
            let mut used = self.used.lock().unwrap();
            used.cpu = (used.cpu - demand.cpu).max(0.0);
            used.memory = used.memory.saturating_sub(demand.memory);
            if let Some(gpu) = gpu
                && let Some(slot) = self.gpus.devices.iter().position(|device| device.index == gpu.index)
            {
                used.gpus[slot] = None;
            }
        }
        self.changed.notify_waiters();
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
        let capacity = Capacity::new(Demand { cpu: 2.0, memory: 1 << 30 }, Gpus::default());
        let half = Demand { cpu: 1.0, memory: 256 << 20 };
        capacity.try_reserve("r", half, None).unwrap();
        capacity.try_reserve("r", half, None).unwrap();
        let why = capacity.try_reserve("r", half, None).unwrap_err();
        assert!(why.contains("waiting for 1 core;"), "{why}");
        capacity.release(half, None);
        capacity.try_reserve("r", half, None).unwrap();
        let big = Demand { cpu: 0.0, memory: 2 << 30 };
        assert!(capacity.try_reserve("r", big, None).unwrap_err().contains("memory"));
        let tenth = Demand { cpu: 0.1, memory: 0 };
        let capacity = Capacity::new(Demand { cpu: 1.0, memory: 0 }, Gpus::default());
        for _ in 0..10 {
            capacity.try_reserve("r", tenth, None).unwrap();
        }
    }

    #[test]
    fn room_goes_to_the_app_it_was_made_for_then_to_queued_work_then_in_order() {
        let capacity = Capacity::new(Demand { cpu: 1.0, memory: 1 << 30 }, Gpus::default());
        let core = Demand { cpu: 1.0, memory: 0 };
        capacity.try_reserve("holder", core, None).unwrap();
        let first = capacity.wait("a-r0", "a", core, None);
        let busy = capacity.wait("b-r0", "b", core, None);
        let wanted = capacity.wait("c-r0", "c", core, None);
        let queued = HashSet::from(["b".to_owned()]);
        capacity.make_room_for("c");
        let why = capacity.try_reserve_in_turn(&first, &queued, true).unwrap_err();
        assert!(why.contains("waiting for 1 core"), "nothing fits yet, so it waits for room, not its turn: {why}");
        capacity.release(core, None);
        let why = capacity.try_reserve_in_turn(&first, &queued, true).unwrap_err();
        assert_eq!(why, "waiting its turn: replica c-r0 of app c goes first (room was made for it)");
        assert!(capacity.try_reserve_in_turn(&busy, &queued, true).unwrap_err().contains("replica c-r0"));
        // One the cluster holds back is not waited for.
        wanted.hold_back(true);
        let why = capacity.try_reserve_in_turn(&first, &queued, false).unwrap_err();
        assert!(why.contains("replica b-r0 of app b goes first (its app has tasks waiting)"), "{why}");
        wanted.hold_back(false);
        capacity.try_reserve_in_turn(&wanted, &queued, true).unwrap();
        capacity.room_taken("c");
        drop(wanted);
        capacity.release(core, None);
        assert!(capacity.try_reserve_in_turn(&first, &queued, true).unwrap_err().contains("replica b-r0"));
        capacity.try_reserve_in_turn(&busy, &queued, true).unwrap();
        drop(busy);
        capacity.release(core, None);
        capacity.try_reserve_in_turn(&first, &HashSet::new(), true).unwrap();
        // A replica that came later still fits beside room the others cannot use.
        let big = capacity.wait("big-r0", "big", Demand { cpu: 0.0, memory: 2 << 30 }, None);
        let small = capacity.wait("small-r0", "small", Demand { cpu: 0.0, memory: 1 << 20 }, None);
        assert!(capacity.try_reserve_in_turn(&big, &HashSet::new(), true).unwrap_err().contains("memory"));
        capacity.try_reserve_in_turn(&small, &HashSet::new(), true).unwrap();
    }

    #[test]
    fn pending_replicas_hear_of_reservations_as_of_releases() {
        use futures_util::FutureExt as _;
        let capacity = Capacity::new(Demand { cpu: 2.0, memory: 1 << 30 }, Gpus::default());
        let one = Demand { cpu: 1.0, memory: 0 };
        for change in ["a reservation", "a release"] {
            let changed = capacity.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            match change {
                "a reservation" => drop(capacity.try_reserve("r", one, None).unwrap()),
                _ => capacity.release(one, None),
            }
            assert!(changed.now_or_never().is_some(), "{change} wakes the replicas that wait for room");
        }
    }

    #[test]
    fn a_gpu_replica_gets_a_whole_gpu_of_its_model() {
        let device = |index: u32, name: &str| NodeGpu { index, name: name.into(), memory_bytes: 80 << 30, uuid: None };
        let gpus = Gpus {
            backend: Some(GpuBackendKind::Cuda),
            devices: vec![device(0, "NVIDIA H100"), device(1, "NVIDIA L4")],
        };
        let capacity = Capacity::new(Demand { cpu: 8.0, memory: 8 << 30 }, gpus);
        let demand = Demand { cpu: 1.0, memory: 0 };
        let want = |model: &str| GpuDemand { model: model.into(), quota_per_worker: 1 << 30, memory_needed: 1 << 30 };
        let h100 = capacity.try_reserve("r", demand, Some(&want("h100"))).unwrap().unwrap();
        assert_eq!((h100.index, h100.backend, h100.quota_per_worker), (0, GpuBackendKind::Cuda, 1 << 30));
        let why = capacity.try_reserve("r", demand, Some(&want("H100"))).unwrap_err();
        assert!(why.contains("free H100 GPU; this node's only one is held by replica r"), "exclusive: {why}");
        assert_eq!(capacity.try_reserve("l4", demand, Some(&want("any"))).unwrap().unwrap().index, 1);
        assert!(capacity.try_reserve("r", demand, Some(&want("any"))).is_err(), "both GPUs are held");
        assert!(capacity.fits_without(demand, Some(&want("any")), "l4", demand), "once the L4's replica goes");
        assert!(!capacity.fits_without(demand, Some(&want("H100")), "l4", demand), "the L4 is no H100");
        assert!(capacity.try_reserve("r", demand, Some(&want("A100"))).unwrap_err().contains("NVIDIA H100, NVIDIA L4"));
        assert!(capacity.try_reserve("r", demand, None).unwrap().is_none(), "a CPU app still fits");
        capacity.release(demand, Some(&h100));
        assert_eq!(capacity.try_reserve("r", demand, Some(&want("H100"))).unwrap().unwrap().index, 0);
        let huge = GpuDemand { memory_needed: 1 << 40, ..want("any") };
        let why = capacity.try_reserve("r", demand, Some(&huge)).unwrap_err();
        assert!(why.contains("with 1Ti of memory") && why.contains("at most 80Gi"), "{why}");
        let none = Capacity::new(Demand { cpu: 8.0, memory: 8 << 30 }, Gpus::default());
        assert!(none.try_reserve("r", demand, Some(&want("any"))).unwrap_err().contains("--gpu-backend cpu"));
    }
}
