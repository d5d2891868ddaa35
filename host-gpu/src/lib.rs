//! The GPU host interface behind `beamlet:function/gpu` (SPEC §6).
//!
//! Guests see handles, never pointers: every operation names buffers by
//! [`BufferId`] and kernels by [`KernelId`], and is checked here, once, for
//! every backend (`checks.rs`, [`GemmArgs::check`]) — element types, offsets and
//! lengths with checked arithmetic, GEMM shapes, kernel sources, entry names,
//! launch dimensions and argument lists — before a backend runs it.
//!
//! - [`Backend`]: what a device offers, shared by a replica's workers. Work is
//!   queued on a stream ([`StreamId`], one per worker) and runs in order on it;
//!   [`Backend::synchronize`] and [`Backend::read`] wait for it, never longer
//!   than the timeout they are given, so a guest cannot hang the host.
//! - [`Session`]: one worker's view of the backend — its stream, its
//!   `gpu_memory` quota, the buffers and kernels it owns (it refuses any other),
//!   and everything freed when it is dropped. The runtime maps the WIT
//!   `gpu` interface onto it one to one.
//! - [`cpu::CpuBackend`]: the same interface on host memory, so GPU apps are
//!   developed and tested anywhere; custom kernels are `unavailable` there.
//! - `cuda::CudaBackend` (feature `cuda`): cudarc — one primary context,
//!   one cuBLAS handle, NVRTC-compiled built-in ops and a kernel cache.
//! - `discover` (feature `nvml`): the GPUs NVML sees, for placement.

mod checks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "nvml")]
pub mod discover;
mod gemm;
mod kernel;
mod session;

use std::time::Duration;

pub use checks::{MAX_ENTRY_NAME_BYTES, MAX_KERNEL_PARAMS, MAX_KERNEL_SOURCE_BYTES};
pub use gemm::GemmArgs;
pub use kernel::{DeviceLimits, KernelArg, KernelSource, LaunchConfig, ParamKind};
pub use session::Session;

/// Element types a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A device buffer, as a guest names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferId(pub u64);

/// An ordered queue of work on a device; each worker has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// A compiled custom kernel with its declared parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelId(pub u64);

/// What `device` reports (WIT `device-info`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
    /// (major, minor); (0, 0) for the CPU backend.
    pub compute_capability: (u32, u32),
    /// `"cuda"` or `"cpu"`.
    pub backend: &'static str,
    /// Bytes the caller may hold: the whole device from a [`Backend`], the
    /// worker's `gpu_memory` from a [`Session`].
    pub quota_bytes: u64,
    /// Bytes held now: by every worker from a [`Backend`], by this worker
    /// from a [`Session`].
    pub used_bytes: u64,
}

/// Errors a guest gets back as WIT variants (SPEC §6). None of them traps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("out of device memory allocating {requested} bytes")]
    OutOfMemory { requested: u64 },
    #[error(
        "quota exceeded: {requested} more bytes would pass the worker's gpu_memory quota of {quota} bytes \
         ({used} in use)"
    )]
    QuotaExceeded { requested: u64, quota: u64, used: u64 },
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("compile failed: {0}")]
    CompileFailed(String),
    #[error("timeout")]
    Timeout,
    #[error("device lost: {0}")]
    DeviceLost(String),
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// Element-wise binary ops on equal-length buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Mul,
}

/// A device, shared by a replica's workers (one CUDA context, one cuBLAS
/// handle, one kernel cache).
///
/// Work on one stream runs in the order it was queued; a backend may return
/// before it has run. A buffer must only be used on the stream it was
/// allocated on — [`Session`] guarantees it by giving each worker one stream
/// and only its own buffers.
pub trait Backend: Send + Sync {
    fn info(&self) -> DeviceInfo;
    /// Launch limits custom kernels are checked against.
    fn limits(&self) -> DeviceLimits;

    fn open_stream(&self) -> Result<StreamId>;
    /// Closes a stream; work still queued on it finishes first.
    fn close_stream(&self, stream: StreamId);
    /// Waits until everything queued on `stream` has run; [`GpuError::Timeout`]
    /// when that takes longer than `timeout` (the work keeps running).
    fn synchronize(&self, stream: StreamId, timeout: Duration) -> Result<()> {
        self.synchronize_unless(stream, timeout, &|| false)
    }
    /// [`Backend::synchronize`] that also gives up, with [`GpuError::Timeout`],
    /// soon after `stop` returns true (a cancelled task stops waiting).
    fn synchronize_unless(&self, stream: StreamId, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<()>;
    /// Drops the work queued on `stream` that has not started, where the
    /// backend can (the CPU backend); a GPU runs what it was given.
    fn abandon(&self, _stream: StreamId) {}

    /// A buffer of `len` zeroed elements (zeroed in `stream` order).
    fn alloc(&self, stream: StreamId, dtype: DType, len: u64) -> Result<BufferId>;
    /// Frees a buffer after the work queued on `stream` before it.
    fn free(&self, stream: StreamId, id: BufferId) -> Result<()>;
    /// Element type and length of a buffer.
    fn describe(&self, id: BufferId) -> Result<(DType, u64)>;
    /// Writes little-endian element bytes at element `offset`. `bytes` may be
    /// reused once this returns. Waits at most `timeout` for earlier work when
    /// the copy has to.
    fn write(&self, stream: StreamId, id: BufferId, offset: u64, bytes: &[u8], timeout: Duration) -> Result<()>;
    /// Reads `len` elements from element `offset` as little-endian bytes, after
    /// the work queued before it; [`GpuError::Timeout`] past `timeout`.
    fn read(&self, stream: StreamId, id: BufferId, offset: u64, len: u64, timeout: Duration) -> Result<Vec<u8>>;

    /// `c = alpha * op(a) * op(b) + beta * c`, column-major; see [`GemmArgs`].
    fn gemm(&self, stream: StreamId, args: &GemmArgs) -> Result<()>;
    /// `out[i] = a[i] op b[i]`; `out` may be `a` or `b`.
    fn binary(&self, stream: StreamId, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()>;
    /// `x[i + j * rows] += bias[i]` for a column-major `rows x cols` matrix.
    fn add_bias(&self, stream: StreamId, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()>;
    /// `x[i] = max(x[i], 0)`.
    fn relu(&self, stream: StreamId, x: BufferId) -> Result<()>;
    /// Softmax of each column of a column-major `rows x cols` matrix, in place.
    fn softmax_columns(&self, stream: StreamId, x: BufferId, rows: u64, cols: u64) -> Result<()>;

    /// Compiles (or finds in the backend's cache) kernel `entry` of `source`,
    /// whose parameters are `params`.
    fn compile(&self, source: &KernelSource, entry: &str, params: &[ParamKind]) -> Result<KernelId>;
    /// Queues a kernel on `stream`; `args` must match its declared params.
    fn launch(&self, stream: StreamId, kernel: KernelId, config: &LaunchConfig, args: &[KernelArg]) -> Result<()>;

    /// Bytes allocated now, by every stream.
    fn memory_used(&self) -> u64;
}
