//! The GPU host interface behind `beamlet:function/gpu` (SPEC §6).
//!
//! Guests see handles, never pointers: every operation names buffers by
//! [`BufferId`] and is checked here, once, for every backend — element
//! types, offsets and lengths with checked arithmetic, and GEMM shapes and
//! leading dimensions — before a backend runs it.
//!
//! - [`Backend`]: what a device offers (allocate zeroed, write, read, GEMM,
//!   the element-wise and reduction ops an MLP needs).
//! - [`cpu::CpuBackend`]: the same interface on host memory, so GPU apps are
//!   developed and tested anywhere. The CUDA backend (cudarc) is still to come.
//! - [`GemmArgs`]: column-major GEMM, as cuBLAS takes it.

pub mod cpu;
mod gemm;

pub use gemm::GemmArgs;

/// Element types a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What `device` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
    /// (major, minor); (0, 0) for the CPU backend.
    pub compute_capability: (u32, u32),
    /// `"cuda"` or `"cpu"`.
    pub backend: &'static str,
}

/// Errors a guest gets back as WIT variants (SPEC §6). None of them traps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("out of device memory allocating {requested} bytes")]
    OutOfMemory { requested: u64 },
    #[error("quota exceeded: {requested} more bytes would pass the worker's {quota} byte gpu_memory quota")]
    QuotaExceeded { requested: u64, quota: u64 },
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

/// A device, shared by a replica's workers.
pub trait Backend: Send + Sync {
    fn info(&self) -> DeviceInfo;
    /// A buffer of `len` zeroed elements.
    fn alloc(&self, dtype: DType, len: u64) -> Result<BufferId>;
    fn free(&self, id: BufferId) -> Result<()>;
    /// Element type and length of a buffer.
    fn describe(&self, id: BufferId) -> Result<(DType, u64)>;
    /// Writes little-endian element bytes at element `offset`.
    fn write(&self, id: BufferId, offset: u64, bytes: &[u8]) -> Result<()>;
    /// Reads `len` elements from element `offset` as little-endian bytes.
    fn read(&self, id: BufferId, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// `c = alpha * op(a) * op(b) + beta * c`, column-major; see [`GemmArgs`].
    fn gemm(&self, args: &GemmArgs) -> Result<()>;
    /// `out[i] = a[i] op b[i]`.
    fn binary(&self, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()>;
    /// `x[i + j * rows] += bias[i]` for a column-major `rows x cols` matrix.
    fn add_bias(&self, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()>;
    /// `x[i] = max(x[i], 0)`.
    fn relu(&self, x: BufferId) -> Result<()>;
    /// Softmax of each column of a column-major `rows x cols` matrix, in place.
    fn softmax_columns(&self, x: BufferId, rows: u64, cols: u64) -> Result<()>;
    /// Bytes allocated now.
    fn memory_used(&self) -> u64;
}

/// Checks that `offset + len` elements fit in a buffer of `buffer_len`.
pub(crate) fn check_range(what: &str, offset: u64, len: u64, buffer_len: u64) -> Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| GpuError::OutOfBounds(format!("{what}: offset {offset} + length {len} overflows")))?;
    if end > buffer_len {
        return Err(GpuError::OutOfBounds(format!(
            "{what}: elements {offset}..{end} are past the buffer's {buffer_len}"
        )));
    }
    Ok(())
}
