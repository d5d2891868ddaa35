//! The wasmtime `Engine`, configured once for the node (which compiles) and
//! for each replica (which runs): both must agree on every setting that shapes
//! compiled code, or a replica could not load what the node precompiled.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch ticks; timeouts and cancellation are checked at this grain.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Wasm stack per call, generous enough for serde-heavy handlers.
const MAX_WASM_STACK: usize = 1 << 20;

/// The stack a guest call runs on (as a fiber), host calls included: what
/// the wasm does not use is the host's. GPU host calls compile CUDA C
/// (NVRTC) and JIT PTX (the driver) on it, which want a thread's usual
/// 8 MiB, not the 1 MiB wasmtime's 2 MiB default would leave. Only the
/// pages a call touches are ever committed.
const CALL_STACK: usize = 8 << 20;

/// How the engine places instances in memory.
pub(crate) enum Allocation {
    /// On demand: the node only compiles and type-checks components.
    OnDemand,
    /// A pool sized for one replica: `slots` instances (workers plus one spare
    /// for replacing a trapped instance), each with at most `memory_bytes`.
    Pooling { slots: u32, memory_bytes: u64 },
}

/// Core instances, memories and tables one component may hold. Rust
/// components have a handful of core instances (the program plus shims).
const CORE_INSTANCES_PER_COMPONENT: u32 = 64;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 16;

pub(crate) fn new_engine(allocation: Allocation) -> Result<Engine> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(CALL_STACK);
    if let Allocation::Pooling { slots, memory_bytes } = allocation {
        let mut pool = PoolingAllocationConfig::new();
        let memory = usize::try_from(memory_bytes).context("failed to size the memory pool")?;
        pool.total_component_instances(slots)
            .total_core_instances(slots * CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(slots * MEMORIES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(slots * TABLES_PER_COMPONENT)
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .max_memory_size(memory)
            .total_stacks(slots);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).map_err(anyhow::Error::from).context("failed to create the wasm engine")
}

/// A short key naming everything that makes precompiled code loadable by this
/// build: compiled artifacts are cached under `{digest}-{key}.cwasm`.
pub(crate) fn compatibility_key(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Guest calls in progress in this process (see [`guest_running`]).
static GUESTS_RUNNING: AtomicUsize = AtomicUsize::new(0);
/// The thread [`start_epoch_ticker`] started, to wake when a guest runs.
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// Drives epoch interruption for a replica: one thread for the process,
/// ticking only while guest code runs (an idle replica costs no wake-ups).
pub(crate) fn start_epoch_ticker(engine: Engine) {
    let ticker = std::thread::Builder::new()
        .name("epoch".into())
        .spawn(move || {
            loop {
                // Parked until a guest call begins (a wake before the park is kept).
                if GUESTS_RUNNING.load(Ordering::Acquire) == 0 {
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("failed to spawn the epoch thread");
    let _ = TICKER.set(ticker.thread().clone());
}

/// Says that guest code runs (an instantiation, `init`, a task) while the
/// guard lives: the epoch ticks, so its deadline and cancellation are seen.
pub(crate) fn guest_running() -> GuestRunning {
    if GUESTS_RUNNING.fetch_add(1, Ordering::AcqRel) == 0
        && let Some(ticker) = TICKER.get()
    {
        ticker.unpark();
    }
    GuestRunning(())
}

/// See [`guest_running`].
pub(crate) struct GuestRunning(());

impl Drop for GuestRunning {
    fn drop(&mut self) {
        GUESTS_RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}
