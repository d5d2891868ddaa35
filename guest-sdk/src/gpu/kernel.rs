use std::fmt;

use super::{Buffer, Dtype, Element, GpuError, raw};

/// A custom kernel: the `extern "C" __global__` function `entry` of a CUDA C
/// or PTX source, with the parameter list it was declared with.
///
/// Only a CUDA backend runs custom kernels; the CPU backend answers
/// [`GpuError::Unavailable`]. Compiling is slow (NVRTC), so compile once per
/// worker, in `init` or on first use, and keep the kernel in a `static`; the
/// host also caches compiled kernels per replica.
///
/// ```no_run
/// use beamlet_sdk::gpu::{Arg, Buffer, Kernel, LaunchConfig, Param};
///
/// const SCALE: &str = r#"
/// extern "C" __global__ void scale(float* x, float a, unsigned long long n) {
///     unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
///     if (i < n) x[i] *= a;
/// }"#;
///
/// let kernel = Kernel::cuda_c(SCALE, "scale", &[Param::Buffer, Param::F32, Param::U64])?;
/// let x = Buffer::from_slice(&[1.0f32, 2.0, 3.0])?;
/// kernel.launch(LaunchConfig::linear(x.len(), 256), &[Arg::buffer(&x), Arg::F32(2.0), Arg::U64(x.len())])?;
/// assert_eq!(x.to_vec()?, [2.0, 4.0, 6.0]);
/// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
/// ```
pub struct Kernel {
    raw: raw::Kernel,
    entry: String,
    params: Vec<Param>,
}

impl Kernel {
    /// Compiles CUDA C with NVRTC for this device. A compile error answers
    /// [`GpuError::CompileFailed`] with NVRTC's log.
    pub fn cuda_c(source: &str, entry: &str, params: &[Param]) -> Result<Self, GpuError> {
        Self::compile(raw::KernelSource::CudaC(source.to_owned()), entry, params)
    }

    /// Loads PTX text.
    pub fn ptx(source: &str, entry: &str, params: &[Param]) -> Result<Self, GpuError> {
        Self::compile(raw::KernelSource::Ptx(source.to_owned()), entry, params)
    }

    fn compile(source: raw::KernelSource, entry: &str, params: &[Param]) -> Result<Self, GpuError> {
        let kinds: Vec<raw::ParamKind> = params.iter().map(|p| p.to_raw()).collect();
        let raw = raw::Kernel::compile(&source, entry, &kinds)?;
        Ok(Kernel { raw, entry: entry.to_owned(), params: params.to_vec() })
    }

    /// The kernel function's name.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The parameter kinds it was compiled with.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Queues one launch on the worker's stream.
    ///
    /// `args` must match [`Kernel::params`] in number and kind, else
    /// [`GpuError::InvalidArgument`] before anything reaches the host; the host
    /// checks the launch dimensions. A kernel that faults is reported by a
    /// later call, as [`GpuError::DeviceLost`].
    pub fn launch(&self, config: LaunchConfig, args: &[Arg<'_>]) -> Result<(), GpuError> {
        check_args(&self.entry, &self.params, args)?;
        let args: Vec<raw::KernelArg<'_>> = args.iter().map(|arg| arg.to_raw()).collect();
        Ok(self.raw.launch(config.to_raw(), &args)?)
    }
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel").field("entry", &self.entry).field("params", &self.params).finish()
    }
}

/// What one kernel parameter is, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    /// A pointer to a buffer's first element (`float*`, `__half*`, ...).
    Buffer,
    /// `int`.
    I32,
    /// `unsigned int`.
    U32,
    /// `long long`.
    I64,
    /// `unsigned long long` (or `size_t` on 64-bit devices).
    U64,
    /// `float`.
    F32,
    /// `double`.
    F64,
}

impl Param {
    fn to_raw(self) -> raw::ParamKind {
        match self {
            Param::Buffer => raw::ParamKind::Buffer,
            Param::I32 => raw::ParamKind::I32,
            Param::U32 => raw::ParamKind::U32,
            Param::I64 => raw::ParamKind::I64,
            Param::U64 => raw::ParamKind::U64,
            Param::F32 => raw::ParamKind::F32,
            Param::F64 => raw::ParamKind::F64,
        }
    }
}

/// One launch argument. Build a buffer argument with [`Arg::buffer`] (or
/// `Arg::from(&buffer)`); it borrows the buffer for the launch call only.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// A buffer, passed as a device pointer to its first element.
    Buffer(BufferArg<'a>),
    /// An `int`.
    I32(i32),
    /// An `unsigned int`.
    U32(u32),
    /// A `long long`.
    I64(i64),
    /// An `unsigned long long`.
    U64(u64),
    /// A `float`.
    F32(f32),
    /// A `double`.
    F64(f64),
}

/// A borrowed buffer of any element type, as a kernel argument.
#[derive(Clone, Copy)]
pub struct BufferArg<'a> {
    raw: &'a raw::Buffer,
    dtype: Dtype,
    len: u64,
}

impl fmt::Debug for BufferArg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferArg").field("dtype", &self.dtype).field("len", &self.len).finish()
    }
}

impl<'a> Arg<'a> {
    /// `buffer` as a device pointer to its first element.
    pub fn buffer<T: Element>(buffer: &'a Buffer<T>) -> Self {
        Arg::Buffer(BufferArg { raw: buffer.raw(), dtype: T::DTYPE, len: buffer.len() })
    }

    /// The parameter kind this argument fills.
    pub fn param(&self) -> Param {
        match self {
            Arg::Buffer(_) => Param::Buffer,
            Arg::I32(_) => Param::I32,
            Arg::U32(_) => Param::U32,
            Arg::I64(_) => Param::I64,
            Arg::U64(_) => Param::U64,
            Arg::F32(_) => Param::F32,
            Arg::F64(_) => Param::F64,
        }
    }

    fn to_raw(self) -> raw::KernelArg<'a> {
        match self {
            Arg::Buffer(b) => raw::KernelArg::Buffer(b.raw),
            Arg::I32(v) => raw::KernelArg::I32(v),
            Arg::U32(v) => raw::KernelArg::U32(v),
            Arg::I64(v) => raw::KernelArg::I64(v),
            Arg::U64(v) => raw::KernelArg::U64(v),
            Arg::F32(v) => raw::KernelArg::F32(v),
            Arg::F64(v) => raw::KernelArg::F64(v),
        }
    }
}

impl<'a, T: Element> From<&'a Buffer<T>> for Arg<'a> {
    fn from(buffer: &'a Buffer<T>) -> Self {
        Arg::buffer(buffer)
    }
}

macro_rules! scalar_arg {
    ($($ty:ty => $variant:ident),*) => {
        $(impl From<$ty> for Arg<'_> {
            fn from(value: $ty) -> Self {
                Arg::$variant(value)
            }
        })*
    };
}

scalar_arg!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64);

fn check_args(entry: &str, params: &[Param], args: &[Arg<'_>]) -> Result<(), GpuError> {
    if args.len() != params.len() {
        return Err(GpuError::InvalidArgument(format!(
            "kernel {entry:?} takes {} arguments, the launch passed {}",
            params.len(),
            args.len()
        )));
    }
    for (i, (param, arg)) in params.iter().zip(args).enumerate() {
        if *param != arg.param() {
            return Err(GpuError::InvalidArgument(format!(
                "argument {i} of kernel {entry:?} must be {param:?}, the launch passed {:?}",
                arg.param()
            )));
        }
    }
    Ok(())
}

/// Grid and block dimensions (x, y, z) and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in the grid.
    pub grid: (u32, u32, u32),
    /// Threads in a block.
    pub block: (u32, u32, u32),
    /// Bytes of dynamic shared memory per block.
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// `grid` x `block`, no dynamic shared memory.
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32)) -> Self {
        LaunchConfig { grid, block, shared_mem_bytes: 0 }
    }

    /// One thread per element of `n`, `block` threads a block: a 1-D grid of
    /// ceil(n / block) blocks, at least one (so the kernel must check `i < n`).
    /// A grid too large for the device is refused by [`Kernel::launch`].
    ///
    /// # Panics
    ///
    /// If `block` is 0.
    pub fn linear(n: u64, block: u32) -> Self {
        assert!(block > 0, "a block needs at least one thread");
        let blocks = n.div_ceil(u64::from(block)).max(1);
        LaunchConfig::new((u32::try_from(blocks).unwrap_or(u32::MAX), 1, 1), (block, 1, 1))
    }

    /// The same launch with `bytes` of dynamic shared memory per block.
    pub fn shared_mem(mut self, bytes: u32) -> Self {
        self.shared_mem_bytes = bytes;
        self
    }

    fn to_raw(self) -> raw::LaunchConfig {
        raw::LaunchConfig { grid: self.grid, block: self.block, shared_mem_bytes: self.shared_mem_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_grids_cover_every_element() {
        assert_eq!(LaunchConfig::linear(1000, 256), LaunchConfig::new((4, 1, 1), (256, 1, 1)));
        assert_eq!(LaunchConfig::linear(1024, 256).grid, (4, 1, 1));
        assert_eq!(LaunchConfig::linear(1025, 256).grid, (5, 1, 1));
        assert_eq!(LaunchConfig::linear(0, 128).grid, (1, 1, 1));
        assert_eq!(LaunchConfig::linear(u64::MAX, 1).grid.0, u32::MAX, "too large saturates; launch refuses it");
        assert_eq!(LaunchConfig::linear(1, 32).shared_mem(1024).shared_mem_bytes, 1024);
    }

    #[test]
    #[should_panic(expected = "at least one thread")]
    fn linear_refuses_empty_blocks() {
        LaunchConfig::linear(10, 0);
    }

    #[test]
    fn arguments_must_match_the_declared_params() {
        let params = [Param::U64, Param::F32];
        assert_eq!(check_args("k", &params, &[Arg::U64(1), Arg::F32(2.0)]), Ok(()));
        assert_eq!(check_args("k", &[], &[]), Ok(()));
        assert_eq!(
            check_args("k", &params, &[Arg::U64(1)]),
            Err(GpuError::InvalidArgument("kernel \"k\" takes 2 arguments, the launch passed 1".into()))
        );
        assert_eq!(
            check_args("k", &params, &[Arg::U64(1), Arg::F64(2.0)]),
            Err(GpuError::InvalidArgument("argument 1 of kernel \"k\" must be F32, the launch passed F64".into()))
        );
    }

    #[test]
    fn scalars_convert_to_their_kind() {
        let args: [Arg<'_>; 6] = [1i32.into(), 1u32.into(), 1i64.into(), 1u64.into(), 1f32.into(), 1f64.into()];
        assert_eq!(args.map(|a| a.param()), [Param::I32, Param::U32, Param::I64, Param::U64, Param::F32, Param::F64]);
    }
}
