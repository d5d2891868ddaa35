//! Custom kernels as guests describe them: source, declared parameters,
//! arguments and launch sizes (WIT `kernel-source`, `param-kind`,
//! `kernel-arg`, `launch-config`).

use crate::BufferId;

/// Where a kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// CUDA C, compiled by NVRTC for the device.
    CudaC(String),
    /// PTX text, loaded (and JIT-compiled) by the driver.
    Ptx(String),
}

impl KernelSource {
    pub fn text(&self) -> &str {
        match self {
            KernelSource::CudaC(text) | KernelSource::Ptx(text) => text,
        }
    }
}

/// What one kernel parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A device pointer to a buffer's first element.
    Buffer,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl ParamKind {
    /// Bytes the parameter takes in the kernel's parameter block.
    pub fn size(self) -> usize {
        match self {
            ParamKind::I32 | ParamKind::U32 | ParamKind::F32 => 4,
            ParamKind::Buffer | ParamKind::I64 | ParamKind::U64 | ParamKind::F64 => 8,
        }
    }
}

/// One launch argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    Buffer(BufferId),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl KernelArg {
    pub fn kind(&self) -> ParamKind {
        match self {
            KernelArg::Buffer(_) => ParamKind::Buffer,
            KernelArg::I32(_) => ParamKind::I32,
            KernelArg::U32(_) => ParamKind::U32,
            KernelArg::I64(_) => ParamKind::I64,
            KernelArg::U64(_) => ParamKind::U64,
            KernelArg::F32(_) => ParamKind::F32,
            KernelArg::F64(_) => ParamKind::F64,
        }
    }
}

/// Grid and block sizes of one launch, as CUDA takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
}

/// A device's launch limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Threads in one block, all dimensions together.
    pub max_threads_per_block: u32,
    pub max_block_dims: [u32; 3],
    pub max_grid_dims: [u32; 3],
    /// Dynamic shared memory one launch may ask for, in bytes.
    pub max_shared_mem_per_block: u32,
}

impl DeviceLimits {
    /// What CUDA devices since compute capability 3.0 offer by default; the
    /// CPU backend reports these so launch checks read the same everywhere.
    pub const TYPICAL_CUDA: DeviceLimits = DeviceLimits {
        max_threads_per_block: 1024,
        max_block_dims: [1024, 1024, 64],
        max_grid_dims: [i32::MAX as u32, 65535, 65535],
        max_shared_mem_per_block: 48 * 1024,
    };
}
