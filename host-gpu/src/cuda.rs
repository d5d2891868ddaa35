//! The CUDA backend (cudarc, CUDA 13.0 bindings loaded at run time).
//!
//! One replica owns one GPU: one primary context, one cuBLAS handle, one
//! kernel cache, shared by its workers; each worker stream is a CUDA stream.
//! Buffers are raw stream-ordered allocations (`cuMemAllocAsync`) rather than
//! cudarc's `CudaSlice`, whose per-launch event bookkeeping a worker that owns
//! its buffers and uses one stream does not need: the launch path is a few
//! read-locked lookups and one `cuLaunchKernel`.
//!
//! Built-in ops: GEMM by cuBLAS (`sgemm` for f32, `cublasGemmEx` with f32
//! compute for f16/bf16, tensor cores allowed); element-wise, bias, relu and
//! softmax as small CUDA C kernels compiled by NVRTC on first use.
//!
//! Errors: out of memory is `out-of-memory`; a sticky error (a faulting
//! kernel: illegal address, launch failure...) kills the context, so it is
//! `device-lost`, and every later call answers the same at once.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::result::DriverError;
use cudarc::driver::{CudaContext, CudaStream, result as driver, sys};
use cudarc::nvrtc;

use crate::{
    Backend, BinaryOp, BufferId, DType, DeviceInfo, DeviceLimits, GemmArgs, GpuError, KernelArg, KernelId,
    KernelSource, LaunchConfig, MAX_KERNEL_PARAMS, ParamKind, Result, StreamId, checks,
};

// Kernel arguments are passed as the first bytes of 8-byte slots.
const _: () = assert!(cfg!(target_endian = "little"), "the CUDA backend assumes a little-endian host");

/// The driver API version the bindings were generated for (`cuda-13000`).
const NEEDED_DRIVER_VERSION: i32 = 13000;
/// Writes larger than this may wait in the driver for the stream's earlier
/// work (pageable copies are staged in chunks); they wait here instead, with
/// a timeout.
const ASYNC_WRITE_BYTES: usize = 64 * 1024;
/// Threads per block of the built-in kernels (a power of two: softmax reduces
/// in shared memory).
const BUILTIN_BLOCK: u32 = 256;

/// Raw CUDA handles are plain pointers the driver lets any thread use.
#[derive(Clone, Copy)]
struct Raw<T>(T);
// SAFETY: CUDA driver handles (functions, modules, cuBLAS handles) are
// thread-safe to use from any thread with the context bound.
unsafe impl<T> Send for Raw<T> {}
unsafe impl<T> Sync for Raw<T> {}

struct DeviceBuffer {
    /// 0 for an empty buffer.
    ptr: sys::CUdeviceptr,
    dtype: DType,
    len: u64,
    bytes: u64,
}

struct Kernel {
    function: Raw<sys::CUfunction>,
    params: Vec<ParamKind>,
}

/// Compiled modules by source, and kernels by source, entry and params, so
/// one source is compiled once per replica whoever asks.
#[derive(Default)]
struct KernelCache {
    modules: HashMap<KernelSource, Raw<sys::CUmodule>>,
    kernels: HashMap<(KernelSource, String, Vec<ParamKind>), KernelId>,
}

/// The cuBLAS handle, switched between worker streams; each stream gets its
/// own workspace so concurrent GEMMs on two streams never share one.
struct Blas {
    handle: Raw<blas_sys::cublasHandle_t>,
    current: Option<StreamId>,
    workspaces: HashMap<StreamId, sys::CUdeviceptr>,
    workspace_bytes: usize,
}

/// The built-in op kernels, one per element type (indexed by [`dtype_index`]).
struct Builtins {
    _module: Raw<sys::CUmodule>,
    binary: [Raw<sys::CUfunction>; 3],
    add_bias: [Raw<sys::CUfunction>; 3],
    relu: [Raw<sys::CUfunction>; 3],
    softmax: [Raw<sys::CUfunction>; 3],
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    limits: DeviceLimits,
    /// `compute_XY`, what NVRTC compiles for.
    arch: String,
    /// Why NVRTC's PTX would not load here (NVRTC newer than the driver).
    nvrtc_mismatch: Option<String>,
    sm_count: u32,
    async_alloc: bool,
    lost: AtomicBool,
    next_id: AtomicU64,
    used: AtomicU64,
    streams: RwLock<HashMap<StreamId, Arc<CudaStream>>>,
    buffers: RwLock<HashMap<BufferId, DeviceBuffer>>,
    kernels: RwLock<Vec<Kernel>>,
    cache: Mutex<KernelCache>,
    blas: Mutex<Blas>,
    builtins: OnceLock<Builtins>,
    builtins_init: Mutex<()>,
}

fn dtype_index(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn unavailable(message: impl Into<String>) -> GpuError {
    GpuError::Unavailable(message.into())
}

fn unknown(id: BufferId) -> GpuError {
    GpuError::InvalidArgument(format!("no buffer {}", id.0))
}

/// Lets the device's default memory pool keep freed memory instead of
/// returning it to the driver at every synchronize (its release threshold is
/// 0 by default), so a worker that allocates per task reuses its memory.
/// Best effort: without it allocation is only slower.
fn keep_pool_memory(ctx: &CudaContext) {
    let mut threshold = u64::MAX;
    // SAFETY: the context is current on this thread (just created), and the
    // attribute takes a pointer to a u64 that outlives the call.
    let result = unsafe {
        let mut pool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().and_then(|()| {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
        })
    };
    if let Err(e) = result {
        eprintln!("beamlet-gpu: could not raise the memory pool's release threshold: {e:?}");
    }
}

/// A size cuBLAS takes as a C `int`.
fn blas_int(name: &str, value: u64) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| GpuError::InvalidArgument(format!("gemm: {name} {value} is over cuBLAS's {}", i32::MAX)))
}

fn host_size(bytes: u64) -> Result<usize> {
    usize::try_from(bytes).map_err(|_| GpuError::OutOfBounds(format!("{bytes} bytes do not fit this host")))
}

impl CudaBackend {
    /// Opens device `ordinal`. `Unavailable` (never a panic) when the driver,
    /// NVRTC or cuBLAS is missing or too old, or there is no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics on a missing library or symbol; the probes below
        // should catch those first, this catches the rest.
        catch_unwind(AssertUnwindSafe(|| Self::open(ordinal))).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(unavailable(format!("failed to load CUDA: {message}")))
        })
    }

    fn open(ordinal: usize) -> Result<Self> {
        probe_libraries()?;
        let version = unsafe {
            sys::cuInit(0).result().map_err(|e| unavailable(format!("failed to initialise the CUDA driver: {e:?}")))?;
            let mut version = 0;
            sys::cuDriverGetVersion(&mut version)
                .result()
                .map_err(|e| unavailable(format!("failed to get the CUDA driver version: {e:?}")))?;
            version
        };
        if version < NEEDED_DRIVER_VERSION {
            return Err(unavailable(format!(
                "the NVIDIA driver supports CUDA {}.{}, beamlet needs CUDA 13.0 (driver 580 or later)",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let nvrtc_mismatch = nvrtc_newer_than(version);
        let count = CudaContext::device_count().map_err(|e| unavailable(format!("failed to count GPUs: {e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!("no GPU {ordinal}: this machine has {count}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("failed to open GPU {ordinal}: {e:?}")))?;
        // SAFETY: no `CudaSlice` is ever made on this context object, so no
        // event tracking is lost. With tracking on, `new_stream` runs a
        // whole-context `cuCtxSynchronize` whenever the stream count is back
        // at 0: an unbounded wait behind a closed stream's endless kernel.
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx);
        }
        let attribute = |attribute: sys::CUdevice_attribute| -> Result<u32> {
            ctx.attribute(attribute)
                .map(|v| v.max(0) as u32)
                .map_err(|e| unavailable(format!("failed to query GPU {ordinal}: {e:?}")))
        };
        use sys::CUdevice_attribute::*;
        let limits = DeviceLimits {
            max_threads_per_block: attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            max_block_dims: [
                attribute(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
                attribute(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
                attribute(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
            ],
            max_grid_dims: [
                attribute(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
                attribute(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
                attribute(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
            ],
            max_shared_mem_per_block: attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
        };
        let sm_count = attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1);
        let (major, minor) =
            ctx.compute_capability().map_err(|e| unavailable(format!("failed to query GPU {ordinal}: {e:?}")))?;
        let info = DeviceInfo {
            name: ctx.name().map_err(|e| unavailable(format!("failed to query GPU {ordinal}: {e:?}")))?,
            memory_bytes: ctx.total_mem().map_err(|e| unavailable(format!("failed to query GPU {ordinal}: {e:?}")))?
                as u64,
            compute_capability: (major as u32, minor as u32),
            backend: "cuda",
            quota_bytes: 0,
            used_bytes: 0,
        };
        let handle =
            blas::create_handle().map_err(|e| unavailable(format!("failed to create a cuBLAS handle: {e:?}")))?;
        // f16/bf16 GEMMs accumulate in f32 all the way: no split-K partial
        // sums rounded to the output type (cuBLAS may pick split-K for small
        // shapes). The native benchmark sets the same.
        // SAFETY: the handle was just created.
        unsafe {
            blas_sys::cublasSetMathMode(
                handle,
                blas_sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
            .result()
            .map_err(|e| unavailable(format!("failed to set cuBLAS's math mode: {e:?}")))?;
        }
        Ok(Self {
            arch: format!("compute_{major}{minor}"),
            nvrtc_mismatch,
            async_alloc: ctx.has_async_alloc(),
            ctx,
            info,
            limits,
            sm_count,
            lost: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            used: AtomicU64::new(0),
            streams: RwLock::default(),
            buffers: RwLock::default(),
            kernels: RwLock::default(),
            cache: Mutex::default(),
            blas: Mutex::new(Blas {
                handle: Raw(handle),
                current: None,
                workspaces: HashMap::new(),
                // What cuBLAS recommends: 32 MiB on Hopper and later, 4 MiB before.
                workspace_bytes: if major >= 9 { 32 << 20 } else { 4 << 20 },
            }),
            builtins: OnceLock::new(),
            builtins_init: Mutex::new(()),
        })
    }

    /// Binds the context to this thread; `DeviceLost` once it has failed.
    fn enter(&self) -> Result<()> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(GpuError::DeviceLost("an earlier error ended this GPU's context".into()));
        }
        // Not `CudaContext::bind_to_thread`: it also hands back (and clears)
        // an error that a drop on another worker's thread recorded on the
        // shared context, failing this worker's unrelated call instead.
        let ctx = self.ctx.cu_ctx();
        let bound = driver::ctx::get_current().map_err(|e| self.driver_error("find the current context", e))?;
        if bound != Some(ctx) {
            // SAFETY: the context lives as long as `self.ctx`.
            unsafe { driver::ctx::set_current(ctx) }.map_err(|e| self.driver_error("bind the context", e))?;
        }
        Ok(())
    }

    /// Maps a driver error; a sticky one marks the device lost.
    fn driver_error(&self, what: &str, error: DriverError) -> GpuError {
        use sys::CUresult::*;
        let message = format!("failed to {what}: {error:?}");
        match error.0 {
            CUDA_ERROR_OUT_OF_MEMORY => GpuError::OutOfMemory { requested: 0 },
            // Refused calls: nothing ran, the context is fine.
            CUDA_ERROR_INVALID_VALUE
            | CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
            | CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
            | CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING
            | CUDA_ERROR_INVALID_HANDLE
            | CUDA_ERROR_NOT_FOUND => GpuError::InvalidArgument(message),
            // A module or kernel the driver cannot load (a guest's bad PTX
            // must not cost the replica its context).
            CUDA_ERROR_INVALID_PTX
            | CUDA_ERROR_INVALID_IMAGE
            | CUDA_ERROR_INVALID_SOURCE
            | CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC
            | CUDA_ERROR_NO_BINARY_FOR_GPU
            | CUDA_ERROR_JIT_COMPILER_NOT_FOUND
            | CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND
            | CUDA_ERROR_SHARED_OBJECT_INIT_FAILED
            | CUDA_ERROR_FUNCTION_NOT_LOADED => GpuError::CompileFailed(message),
            CUDA_ERROR_NOT_SUPPORTED | CUDA_ERROR_NOT_PERMITTED | CUDA_ERROR_JIT_COMPILATION_DISABLED => {
                GpuError::Unavailable(message)
            }
            // Everything else (illegal address, launch failure, misaligned
            // address, illegal instruction, ECC, an unknown error...) is
            // treated as sticky: the context is gone.
            _ => {
                self.lost.store(true, Ordering::Relaxed);
                GpuError::DeviceLost(message)
            }
        }
    }

    fn blas_error(&self, error: CublasError) -> GpuError {
        use blas_sys::cublasStatus_t::*;
        let message = format!("cuBLAS gemm failed: {error:?}");
        match error.0 {
            CUBLAS_STATUS_ALLOC_FAILED => GpuError::OutOfMemory { requested: 0 },
            CUBLAS_STATUS_INVALID_VALUE => GpuError::InvalidArgument(message),
            CUBLAS_STATUS_NOT_SUPPORTED | CUBLAS_STATUS_ARCH_MISMATCH => GpuError::Unavailable(message),
            _ => {
                self.lost.store(true, Ordering::Relaxed);
                GpuError::DeviceLost(message)
            }
        }
    }

    fn stream(&self, id: StreamId) -> Result<sys::CUstream> {
        let streams = self.streams.read().unwrap();
        let stream = streams.get(&id).ok_or_else(|| GpuError::InvalidArgument(format!("no stream {}", id.0)))?;
        Ok(stream.cu_stream())
    }

    /// (pointer, type, length) of a buffer.
    fn buffer(&self, id: BufferId) -> Result<(sys::CUdeviceptr, DType, u64)> {
        let buffers = self.buffers.read().unwrap();
        let buffer = buffers.get(&id).ok_or_else(|| unknown(id))?;
        Ok((buffer.ptr, buffer.dtype, buffer.len))
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Polls `stream` until it is idle. It yields between polls for the first
    /// 20 ms, so an op that takes milliseconds is seen done within
    /// microseconds (a sleep would add up to its timer slack), then sleeps
    /// 1/512 of the time waited so far (at most 1 ms): a long wait does not
    /// burn a core and is seen done at most ~0.2% late, as a timed benchmark
    /// against `cuStreamSynchronize` (which spins) needs.
    fn wait(&self, stream: sys::CUstream, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<()> {
        const SPIN: Duration = Duration::from_millis(20);
        let start = Instant::now();
        loop {
            match unsafe { sys::cuStreamQuery(stream) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                error => return Err(self.driver_error("run the stream's work", DriverError(error))),
            }
            let waited = start.elapsed();
            if waited >= timeout || stop() {
                return Err(GpuError::Timeout);
            }
            if waited < SPIN {
                std::thread::yield_now();
            } else {
                let nap = (waited / 512).clamp(Duration::from_micros(20), Duration::from_millis(1));
                std::thread::sleep(nap.min(timeout - waited));
            }
        }
    }

    /// Queues `function` with a grid-stride grid over `n` elements.
    fn launch_raw(
        &self,
        stream: sys::CUstream,
        function: Raw<sys::CUfunction>,
        grid: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        unsafe {
            driver::launch_kernel(function.0, (grid, 1, 1), (BUILTIN_BLOCK, 1, 1), 0, stream, params)
                .map_err(|e| self.driver_error("launch a built-in kernel", e))
        }
    }

    /// Blocks for a grid-stride loop over `n` elements: enough to fill the GPU.
    fn grid_for(&self, n: u64) -> u32 {
        n.div_ceil(u64::from(BUILTIN_BLOCK)).clamp(1, u64::from(self.sm_count) * 32) as u32
    }

    /// The built-in kernels, compiled and loaded on first use (the context
    /// must be bound: see [`CudaBackend::enter`]).
    fn builtins(&self) -> Result<&Builtins> {
        if let Some(builtins) = self.builtins.get() {
            return Ok(builtins);
        }
        let _init = self.builtins_init.lock().unwrap();
        if let Some(builtins) = self.builtins.get() {
            return Ok(builtins);
        }
        let ptx = self.nvrtc(BUILTINS_CU).map_err(|e| {
            // Our own source failing to compile is a host bug, not the guest's.
            unavailable(format!("failed to compile the built-in kernels: {e}"))
        })?;
        let module = self.load_module(&ptx)?;
        // Loaded now, not on first launch (CUDA's lazy loading): a lazy load
        // may wait for the whole context, behind another worker's long kernel.
        let get = |name: String| -> Result<Raw<sys::CUfunction>> {
            let function = self.function(module, &name)?;
            // SAFETY: a function of a module loaded in this (bound) context.
            unsafe { sys::cuFuncLoad(function.0) }
                .result()
                .map_err(|e| self.driver_error("load a built-in kernel", e))?;
            Ok(function)
        };
        let per_dtype = |op: &str| -> Result<[Raw<sys::CUfunction>; 3]> {
            Ok([get(format!("{op}_f32"))?, get(format!("{op}_f16"))?, get(format!("{op}_bf16"))?])
        };
        let builtins = Builtins {
            _module: module,
            binary: per_dtype("binary")?,
            add_bias: per_dtype("add_bias")?,
            relu: per_dtype("relu")?,
            softmax: per_dtype("softmax_columns")?,
        };
        Ok(self.builtins.get_or_init(|| builtins))
    }

    /// CUDA C to PTX for this device; the NVRTC log on failure.
    fn nvrtc(&self, source: &str) -> Result<String> {
        if let Some(mismatch) = &self.nvrtc_mismatch {
            return Err(GpuError::CompileFailed(mismatch.clone()));
        }
        let options =
            nvrtc::CompileOptions { options: vec![format!("--gpu-architecture={}", self.arch)], ..Default::default() };
        // cudarc unwraps a few NVRTC results (the log, the PTX as UTF-8):
        // a panic there must not take the worker's thread with it.
        let compiled =
            catch_unwind(AssertUnwindSafe(|| nvrtc::compile_ptx_with_opts(source, options).map(|ptx| ptx.to_src())))
                .map_err(|_| GpuError::CompileFailed("NVRTC failed unexpectedly (cudarc panicked)".into()))?;
        match compiled {
            Ok(ptx) => Ok(ptx),
            Err(nvrtc::CompileError::CompileError { log, .. }) => {
                Err(GpuError::CompileFailed(log.to_string_lossy().trim().to_string()))
            }
            Err(e) => Err(GpuError::CompileFailed(format!("{e:?}"))),
        }
    }

    /// Loads PTX; the JIT's error log on failure.
    fn load_module(&self, ptx: &str) -> Result<Raw<sys::CUmodule>> {
        let image = CString::new(ptx.trim_end_matches('\0'))
            .map_err(|_| GpuError::InvalidArgument("PTX has a NUL byte".into()))?;
        let mut log = vec![0u8; 16 * 1024];
        let mut options =
            [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
        let mut values = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
        let mut module = std::ptr::null_mut();
        let result = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                image.as_ptr() as *const c_void,
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        match result.result() {
            Ok(()) => Ok(Raw(module)),
            Err(e @ DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Err(self.driver_error("load a module", e)),
            Err(e) => {
                let log =
                    CStr::from_bytes_until_nul(&log).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                match self.driver_error("load the PTX", e) {
                    GpuError::DeviceLost(m) => Err(GpuError::DeviceLost(m)),
                    other => Err(GpuError::CompileFailed(format!("{other}\n{}", log.trim()))),
                }
            }
        }
    }

    fn function(&self, module: Raw<sys::CUmodule>, entry: &str) -> Result<Raw<sys::CUfunction>> {
        let name = CString::new(entry).map_err(|_| GpuError::InvalidArgument("entry has a NUL byte".into()))?;
        let mut function = std::ptr::null_mut();
        match unsafe { sys::cuModuleGetFunction(&mut function, module.0, name.as_ptr()) } {
            sys::CUresult::CUDA_SUCCESS => Ok(Raw(function)),
            sys::CUresult::CUDA_ERROR_NOT_FOUND => Err(GpuError::CompileFailed(format!(
                "no kernel named `{entry}` in the module (is it `extern \"C\" __global__`?)"
            ))),
            error => Err(self.driver_error("find the kernel", DriverError(error))),
        }
    }

    /// The kernel's parameter sizes, as the driver sees them.
    fn param_sizes(&self, function: Raw<sys::CUfunction>) -> Result<Vec<usize>> {
        // With lazy loading (the default since CUDA 12.2) a function handle
        // may not be loaded yet; load it so the query sees its real layout
        // (and a kernel that cannot load fails here, not at its launch).
        unsafe { sys::cuFuncLoad(function.0) }.result().map_err(|e| self.driver_error("load the kernel", e))?;
        let mut sizes = Vec::new();
        loop {
            let (mut offset, mut size) = (0usize, 0usize);
            match unsafe { sys::cuFuncGetParamInfo(function.0, sizes.len(), &mut offset, &mut size) } {
                sys::CUresult::CUDA_SUCCESS => sizes.push(size),
                // Past the last parameter.
                sys::CUresult::CUDA_ERROR_INVALID_VALUE => return Ok(sizes),
                error => return Err(self.driver_error("read the kernel's parameters", DriverError(error))),
            }
            if sizes.len() > MAX_KERNEL_PARAMS {
                return Ok(sizes);
            }
        }
    }

    fn compile_new(
        &self,
        cache: &mut KernelCache,
        source: &KernelSource,
        entry: &str,
        params: &[ParamKind],
    ) -> Result<KernelId> {
        let module = match cache.modules.get(source) {
            Some(module) => *module,
            None => {
                let module = match source {
                    KernelSource::CudaC(text) => self.load_module(&self.nvrtc(text)?)?,
                    KernelSource::Ptx(text) => self.load_module(text)?,
                };
                cache.modules.insert(source.clone(), module);
                module
            }
        };
        let function = self.function(module, entry)?;
        // A pointer declared where the kernel takes an int would let a guest
        // hand it garbage: the declared list must match the real one in
        // count and size.
        let sizes = self.param_sizes(function)?;
        let declared: Vec<usize> = params.iter().map(|p| p.size()).collect();
        if sizes != declared {
            return Err(GpuError::InvalidArgument(format!(
                "kernel `{entry}` takes parameters of {sizes:?} bytes, the declared {params:?} are {declared:?} bytes"
            )));
        }
        let mut kernels = self.kernels.write().unwrap();
        let id = KernelId(kernels.len() as u64);
        kernels.push(Kernel { function, params: params.to_vec() });
        Ok(id)
    }

    /// Makes the cuBLAS handle run on `stream` with that stream's workspace.
    fn blas_on(&self, blas: &mut Blas, id: StreamId, stream: sys::CUstream) -> Result<()> {
        if blas.current == Some(id) {
            return Ok(());
        }
        let workspace = match blas.workspaces.get(&id) {
            Some(workspace) => *workspace,
            None => {
                let workspace = unsafe { self.malloc(stream, blas.workspace_bytes) }?;
                blas.workspaces.insert(id, workspace);
                workspace
            }
        };
        // Half switched (stream set, workspace not) is no stream at all.
        blas.current = None;
        unsafe {
            blas::set_stream(blas.handle.0, stream as _).map_err(|e| self.blas_error(e))?;
            blas_sys::cublasSetWorkspace_v2(blas.handle.0, workspace as *mut c_void, blas.workspace_bytes)
                .result()
                .map_err(|e| self.blas_error(e))?;
        }
        blas.current = Some(id);
        Ok(())
    }

    /// # Safety
    /// The context is bound and `stream` is live.
    unsafe fn malloc(&self, stream: sys::CUstream, bytes: usize) -> Result<sys::CUdeviceptr> {
        let result =
            unsafe { if self.async_alloc { driver::malloc_async(stream, bytes) } else { driver::malloc_sync(bytes) } };
        result.map_err(|e| match self.driver_error("allocate device memory", e) {
            GpuError::OutOfMemory { .. } => GpuError::OutOfMemory { requested: bytes as u64 },
            other => other,
        })
    }

    /// # Safety
    /// The context is bound, `stream` is live and nothing queued after this
    /// uses `ptr`.
    unsafe fn release(&self, stream: sys::CUstream, ptr: sys::CUdeviceptr) -> Result<()> {
        let result = unsafe {
            if self.async_alloc {
                driver::free_async(ptr, stream)
            } else {
                driver::stream::synchronize(stream).and_then(|()| driver::free_sync(ptr))
            }
        };
        result.map_err(|e| self.driver_error("free device memory", e))
    }
}

/// Why PTX from the NVRTC found here would not load on a driver that
/// supports CUDA `driver_version` (as `cuDriverGetVersion` says it): PTX from
/// a newer NVRTC uses an ISA the driver cannot JIT.
fn nvrtc_newer_than(driver_version: i32) -> Option<String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: `probe_libraries` found libnvrtc; plain out-parameters.
    let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS;
    let driver = format!("{}.{}", driver_version / 1000, driver_version % 1000 / 10);
    (ok && major * 1000 + minor * 10 > driver_version).then(|| {
        format!(
            "NVRTC {major}.{minor} is newer than the NVIDIA driver's CUDA {driver}: the PTX it makes cannot load; \
             put the NVRTC of CUDA {driver} first on LD_LIBRARY_PATH or update the driver"
        )
    })
}

/// Checks that the driver, NVRTC and cuBLAS can be loaded, so cudarc never
/// panics on a missing one.
fn probe_libraries() -> Result<()> {
    // SAFETY: each probe only tries to dlopen the library's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("no NVIDIA driver here: libcuda.so was not found"));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "NVRTC (libnvrtc.so, CUDA 13) was not found; set LD_LIBRARY_PATH to the CUDA libraries",
        ));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable(
            "cuBLAS (libcublas.so, CUDA 13) was not found; set LD_LIBRARY_PATH to the CUDA libraries",
        ));
    }
    Ok(())
}

impl Backend for CudaBackend {
    fn info(&self) -> DeviceInfo {
        let used = self.memory_used();
        DeviceInfo { quota_bytes: self.info.memory_bytes, used_bytes: used, ..self.info.clone() }
    }

    fn limits(&self) -> DeviceLimits {
        self.limits
    }

    fn open_stream(&self) -> Result<StreamId> {
        self.enter()?;
        let stream = self.ctx.new_stream().map_err(|e| self.driver_error("create a stream", e))?;
        let id = StreamId(self.new_id());
        self.streams.write().unwrap().insert(id, stream);
        Ok(id)
    }

    fn close_stream(&self, id: StreamId) {
        let Some(stream) = self.streams.write().unwrap().remove(&id) else { return };
        let workspace = {
            let mut blas = self.blas.lock().unwrap();
            if blas.current == Some(id) {
                blas.current = None;
                // The handle must not keep a stream that is about to go.
                if self.enter().is_ok() {
                    // SAFETY: the handle is live; the null stream always is.
                    let _ = unsafe { blas::set_stream(blas.handle.0, std::ptr::null_mut()) };
                }
            }
            blas.workspaces.remove(&id)
        };
        if let (Some(workspace), Ok(())) = (workspace, self.enter()) {
            // SAFETY: bound above; the stream is live until `stream` drops.
            let _ = unsafe { self.release(stream.cu_stream(), workspace) };
        }
        // Dropping the stream destroys it once its queued work is done.
    }

    fn synchronize_unless(&self, stream: StreamId, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<()> {
        self.enter()?;
        self.wait(self.stream(stream)?, timeout, stop)
    }

    fn alloc(&self, stream: StreamId, dtype: DType, len: u64) -> Result<BufferId> {
        let bytes = checks::bytes(dtype, len)?;
        let size = host_size(bytes)?;
        self.enter()?;
        let stream = self.stream(stream)?;
        let ptr = if size == 0 {
            0
        } else {
            // SAFETY: bound by `enter`; a fresh allocation is zeroed in
            // stream order before anything else queued on it.
            unsafe {
                let ptr = self.malloc(stream, size)?;
                if let Err(e) = driver::memset_d8_async(ptr, 0, size, stream) {
                    let _ = self.release(stream, ptr);
                    return Err(self.driver_error("zero a buffer", e));
                }
                ptr
            }
        };
        let id = BufferId(self.new_id());
        self.buffers.write().unwrap().insert(id, DeviceBuffer { ptr, dtype, len, bytes });
        self.used.fetch_add(bytes, Ordering::Relaxed);
        Ok(id)
    }

    fn free(&self, stream: StreamId, id: BufferId) -> Result<()> {
        let stream = self.stream(stream)?;
        let buffer = self.buffers.write().unwrap().remove(&id).ok_or_else(|| unknown(id))?;
        self.used.fetch_sub(buffer.bytes, Ordering::Relaxed);
        if buffer.ptr == 0 {
            return Ok(());
        }
        self.enter()?;
        // SAFETY: bound; the buffer is gone from the table, so nothing queued
        // after this can name it.
        unsafe { self.release(stream, buffer.ptr) }
    }

    fn describe(&self, id: BufferId) -> Result<(DType, u64)> {
        let (_, dtype, len) = self.buffer(id)?;
        Ok((dtype, len))
    }

    fn write(&self, stream: StreamId, id: BufferId, offset: u64, bytes: &[u8], timeout: Duration) -> Result<()> {
        let (ptr, dtype, len) = self.buffer(id)?;
        let count = checks::write_elements(dtype, bytes.len())?;
        checks::range("write", offset, count, len)?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.enter()?;
        let stream_id = stream;
        let stream = self.stream(stream)?;
        if bytes.len() > ASYNC_WRITE_BYTES {
            self.synchronize(stream_id, timeout)?;
        }
        let dst = ptr + offset * dtype.size() as u64;
        // SAFETY: the range is inside the buffer; a copy from pageable memory
        // has taken the bytes when the call returns, so the guest may reuse them.
        unsafe { driver::memcpy_htod_async(dst, bytes, stream) }.map_err(|e| self.driver_error("copy to the GPU", e))
    }

    fn read(&self, stream: StreamId, id: BufferId, offset: u64, len: u64, timeout: Duration) -> Result<Vec<u8>> {
        let (ptr, dtype, buffer_len) = self.buffer(id)?;
        checks::range("read", offset, len, buffer_len)?;
        let mut out = vec![0u8; host_size(checks::bytes(dtype, len)?)?];
        if out.is_empty() {
            return Ok(out);
        }
        self.enter()?;
        let stream = self.stream(stream)?;
        // Wait (bounded) for the earlier work, so the copy itself never queues
        // behind a kernel that does not end.
        self.wait(stream, timeout, &|| false)?;
        let src = ptr + offset * dtype.size() as u64;
        unsafe {
            driver::memcpy_dtoh_async(&mut out, src, stream)
                .and_then(|()| driver::stream::synchronize(stream))
                .map_err(|e| self.driver_error("copy from the GPU", e))?;
        }
        Ok(out)
    }

    fn gemm(&self, stream: StreamId, args: &GemmArgs) -> Result<()> {
        let ((a, a_type, a_len), (b, b_type, b_len), (c, c_type, c_len)) =
            (self.buffer(args.a)?, self.buffer(args.b)?, self.buffer(args.c)?);
        args.check_buffers((a_type, a_len), (b_type, b_len), (c_type, c_len))?;
        let (m, n, k) = (blas_int("m", args.m)?, blas_int("n", args.n)?, blas_int("k", args.k)?);
        let (lda, ldb, ldc) = (blas_int("lda", args.lda)?, blas_int("ldb", args.ldb)?, blas_int("ldc", args.ldc)?);
        let op = |trans| {
            if trans { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N }
        };
        self.enter()?;
        let cu_stream = self.stream(stream)?;
        let mut blas = self.blas.lock().unwrap();
        self.blas_on(&mut blas, stream, cu_stream)?;
        let handle = blas.handle.0;
        let (alpha, beta) = (args.alpha, args.beta);
        // SAFETY: `check_buffers` proved every strided access of a, b and c is
        // inside its buffer; the handle runs on this worker's stream.
        let result = unsafe {
            match a_type {
                DType::F32 => blas::sgemm(
                    handle,
                    op(args.trans_a),
                    op(args.trans_b),
                    m,
                    n,
                    k,
                    &alpha,
                    a as *const f32,
                    lda,
                    b as *const f32,
                    ldb,
                    &beta,
                    c as *mut f32,
                    ldc,
                ),
                DType::F16 | DType::BF16 => {
                    let data = if a_type == DType::F16 {
                        blas_sys::cudaDataType_t::CUDA_R_16F
                    } else {
                        blas_sys::cudaDataType_t::CUDA_R_16BF
                    };
                    blas::gemm_ex(
                        handle,
                        op(args.trans_a),
                        op(args.trans_b),
                        m,
                        n,
                        k,
                        &alpha as *const f32 as *const c_void,
                        a as *const c_void,
                        data,
                        lda,
                        b as *const c_void,
                        data,
                        ldb,
                        &beta as *const f32 as *const c_void,
                        c as *mut c_void,
                        data,
                        ldc,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
        };
        result.map_err(|e| self.blas_error(e))
    }

    fn binary(&self, stream: StreamId, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()> {
        let ((a, a_type, a_len), (b, b_type, b_len), (out, out_type, out_len)) =
            (self.buffer(a)?, self.buffer(b)?, self.buffer(out)?);
        checks::binary((a_type, a_len), (b_type, b_len), (out_type, out_len))?;
        if a_len == 0 {
            return Ok(());
        }
        // Bound first: the first call loads the built-ins' module.
        self.enter()?;
        let kernel = self.builtins()?.binary[dtype_index(a_type)];
        let stream = self.stream(stream)?;
        let (mut op, mut a, mut b, mut out, mut n) = (op as i32, a, b, out, a_len);
        let mut params = [
            &mut op as *mut i32 as *mut c_void,
            &mut a as *mut u64 as *mut c_void,
            &mut b as *mut u64 as *mut c_void,
            &mut out as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
        ];
        self.launch_raw(stream, kernel, self.grid_for(a_len), &mut params)
    }

    fn add_bias(&self, stream: StreamId, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()> {
        let ((x, x_type, x_len), (bias, bias_type, bias_len)) = (self.buffer(x)?, self.buffer(bias)?);
        checks::add_bias((x_type, x_len), (bias_type, bias_len), rows, cols)?;
        if x_len == 0 {
            return Ok(());
        }
        // Bound first: the first call loads the built-ins' module.
        self.enter()?;
        let kernel = self.builtins()?.add_bias[dtype_index(x_type)];
        let stream = self.stream(stream)?;
        let (mut x, mut bias, mut rows, mut n) = (x, bias, rows, x_len);
        let mut params = [
            &mut x as *mut u64 as *mut c_void,
            &mut bias as *mut u64 as *mut c_void,
            &mut rows as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
        ];
        self.launch_raw(stream, kernel, self.grid_for(x_len), &mut params)
    }

    fn relu(&self, stream: StreamId, x: BufferId) -> Result<()> {
        let (x, dtype, len) = self.buffer(x)?;
        if len == 0 {
            return Ok(());
        }
        // Bound first: the first call loads the built-ins' module.
        self.enter()?;
        let kernel = self.builtins()?.relu[dtype_index(dtype)];
        let stream = self.stream(stream)?;
        let (mut x, mut n) = (x, len);
        let mut params = [&mut x as *mut u64 as *mut c_void, &mut n as *mut u64 as *mut c_void];
        self.launch_raw(stream, kernel, self.grid_for(len), &mut params)
    }

    fn softmax_columns(&self, stream: StreamId, x: BufferId, rows: u64, cols: u64) -> Result<()> {
        let (x, dtype, len) = self.buffer(x)?;
        checks::softmax(len, rows, cols)?;
        if len == 0 {
            return Ok(());
        }
        // Bound first: the first call loads the built-ins' module.
        self.enter()?;
        let kernel = self.builtins()?.softmax[dtype_index(dtype)];
        let stream = self.stream(stream)?;
        // One block per column (the kernel strides over the rest).
        let grid = cols.min(u64::from(self.limits.max_grid_dims[0])) as u32;
        let (mut x, mut rows, mut cols) = (x, rows, cols);
        let mut params = [
            &mut x as *mut u64 as *mut c_void,
            &mut rows as *mut u64 as *mut c_void,
            &mut cols as *mut u64 as *mut c_void,
        ];
        self.launch_raw(stream, kernel, grid, &mut params)
    }

    fn compile(&self, source: &KernelSource, entry: &str, params: &[ParamKind]) -> Result<KernelId> {
        checks::kernel_source(source)?;
        checks::entry(entry)?;
        checks::params(params)?;
        self.enter()?;
        // One compile at a time: a second worker asking for the same source
        // waits for the first and then finds it cached.
        let mut cache = self.cache.lock().unwrap();
        let key = (source.clone(), entry.to_string(), params.to_vec());
        if let Some(id) = cache.kernels.get(&key) {
            return Ok(*id);
        }
        let id = self.compile_new(&mut cache, source, entry, params)?;
        cache.kernels.insert(key, id);
        Ok(id)
    }

    fn launch(&self, stream: StreamId, kernel: KernelId, config: &LaunchConfig, args: &[KernelArg]) -> Result<()> {
        checks::launch(config, &self.limits)?;
        let function = {
            let kernels = self.kernels.read().unwrap();
            let kernel = usize::try_from(kernel.0)
                .ok()
                .and_then(|i| kernels.get(i))
                .ok_or_else(|| GpuError::InvalidArgument(format!("no kernel {}", kernel.0)))?;
            checks::args(&kernel.params, args)?;
            kernel.function
        };
        // Each argument in an 8-byte slot (4-byte ones in its first bytes):
        // on the stack, no allocation on this path.
        let mut values = [0u64; MAX_KERNEL_PARAMS];
        {
            let buffers = self.buffers.read().unwrap();
            for (slot, arg) in values.iter_mut().zip(args) {
                *slot = match *arg {
                    KernelArg::Buffer(id) => buffers.get(&id).ok_or_else(|| unknown(id))?.ptr,
                    KernelArg::I32(v) => u64::from(v as u32),
                    KernelArg::U32(v) => u64::from(v),
                    KernelArg::I64(v) => v as u64,
                    KernelArg::U64(v) => v,
                    KernelArg::F32(v) => u64::from(v.to_bits()),
                    KernelArg::F64(v) => v.to_bits(),
                };
            }
        }
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_KERNEL_PARAMS];
        for (param, value) in params.iter_mut().zip(values.iter_mut()) {
            *param = value as *mut u64 as *mut c_void;
        }
        self.enter()?;
        let stream = self.stream(stream)?;
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        // SAFETY: dims and argument kinds are checked, and the kinds match the
        // kernel's real parameter sizes (checked at compile); buffer arguments
        // are live allocations of the calling worker.
        unsafe {
            driver::launch_kernel(
                function.0,
                (gx, gy, gz),
                (bx, by, bz),
                config.shared_mem_bytes,
                stream,
                &mut params[..args.len().max(1)],
            )
        }
        .map_err(|e| self.driver_error("launch the kernel", e))
    }

    fn memory_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Best effort: a lost context frees everything with it anyway.
        let bound = self.ctx.bind_to_thread().is_ok();
        // A panic in Drop while unwinding aborts: take poisoned locks as is.
        let blas = self.blas.get_mut().unwrap_or_else(|e| e.into_inner());
        // A lost context may never finish its work (a kernel that does not
        // end): waiting for it would hold the process, and the GPU, forever.
        if bound && !self.lost.load(Ordering::Relaxed) {
            let _ = self.ctx.synchronize();
            unsafe {
                let _ = blas::destroy_handle(blas.handle.0);
                for (_, workspace) in blas.workspaces.drain() {
                    let _ = driver::free_sync(workspace);
                }
                for (_, buffer) in self.buffers.get_mut().unwrap_or_else(|e| e.into_inner()).drain() {
                    if buffer.ptr != 0 {
                        let _ = driver::free_sync(buffer.ptr);
                    }
                }
                for (_, module) in self.cache.get_mut().unwrap_or_else(|e| e.into_inner()).modules.drain() {
                    let _ = driver::module::unload(module.0);
                }
                if let Some(builtins) = self.builtins.take() {
                    let _ = driver::module::unload(builtins._module.0);
                }
            }
        }
    }
}

/// The built-in ops, for f32, f16 and bf16 buffers, computed in f32. No
/// headers: half conversions are PTX `cvt` (f16) and bit shifts (bf16, round
/// to nearest even), so NVRTC needs nothing but itself.
const BUILTINS_CU: &str = r#"
typedef unsigned short u16;
typedef unsigned long long u64;

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
    static __device__ __forceinline__ u16 store(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
    static __device__ __forceinline__ u16 store(float f) {
        unsigned u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
};

#define GRID_STRIDE(i, n) for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

template <class D> __device__ void binary(int op, const typename D::T* a, const typename D::T* b, typename D::T* out, u64 n) {
    GRID_STRIDE(i, n) {
        float x = D::load(a[i]), y = D::load(b[i]);
        out[i] = D::store(op == 0 ? x + y : x * y);
    }
}

template <class D> __device__ void add_bias(typename D::T* x, const typename D::T* bias, u64 rows, u64 n) {
    GRID_STRIDE(i, n) x[i] = D::store(D::load(x[i]) + D::load(bias[i % rows]));
}

template <class D> __device__ void relu(typename D::T* x, u64 n) {
    GRID_STRIDE(i, n) x[i] = D::store(fmaxf(D::load(x[i]), 0.0f));
}

// blockDim.x is a power of two.
__device__ float block_max(float v, float* s) {
    s[threadIdx.x] = v;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] = fmaxf(s[threadIdx.x], s[threadIdx.x + k]);
        __syncthreads();
    }
    float r = s[0];
    __syncthreads();
    return r;
}

__device__ float block_sum(float v, float* s) {
    s[threadIdx.x] = v;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
        __syncthreads();
    }
    float r = s[0];
    __syncthreads();
    return r;
}

template <class D> __device__ void softmax_columns(typename D::T* x, u64 rows, u64 cols) {
    __shared__ float scratch[1024];
    for (u64 col = blockIdx.x; col < cols; col += gridDim.x) {
        typename D::T* c = x + col * rows;
        float m = -__int_as_float(0x7f800000); // -inf (no math headers)
        for (u64 i = threadIdx.x; i < rows; i += blockDim.x) m = fmaxf(m, D::load(c[i]));
        m = block_max(m, scratch);
        float sum = 0.0f;
        for (u64 i = threadIdx.x; i < rows; i += blockDim.x) sum += expf(D::load(c[i]) - m);
        sum = block_sum(sum, scratch);
        for (u64 i = threadIdx.x; i < rows; i += blockDim.x) c[i] = D::store(expf(D::load(c[i]) - m) / sum);
    }
}

#define OPS(D, s) \
extern "C" __global__ void binary_##s(int op, const D::T* a, const D::T* b, D::T* out, u64 n) { binary<D>(op, a, b, out, n); } \
extern "C" __global__ void add_bias_##s(D::T* x, const D::T* bias, u64 rows, u64 n) { add_bias<D>(x, bias, rows, n); } \
extern "C" __global__ void relu_##s(D::T* x, u64 n) { relu<D>(x, n); } \
extern "C" __global__ void softmax_columns_##s(D::T* x, u64 rows, u64 cols) { softmax_columns<D>(x, rows, cols); }

OPS(F32, f32)
OPS(F16, f16)
OPS(BF16, bf16)
"#;
