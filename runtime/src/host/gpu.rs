//! `beamlet:function/gpu`: the WIT interface mapped one to one onto the
//! worker's [`Session`] (beamlet-gpu), which checks every handle, offset,
//! shape and launch and holds the worker to its `gpu_memory` quota.
//!
//! Buffers and kernels are WIT resources: the guest holds table handles that
//! stand for [`BufferId`]s and [`KernelId`]s of its own worker only. A GPU
//! error is a `gpu-error` value for the guest, never a trap; a handle the
//! table does not know is a trap (only a broken guest can produce one).

use std::time::Duration;

use beamlet_gpu::{BinaryOp, BufferId, DType, GemmArgs, GpuError, KernelArg, KernelId, Session};
use wasmtime::component::Resource;

use super::WorkerState;
use super::bindings::beamlet::function::gpu as wit;

/// What a guest's `buffer` handle stands for.
pub struct GpuBuffer(BufferId);

/// What a guest's `kernel` handle stands for.
pub struct GpuKernel(KernelId);

/// A worker's GPU: its session, or why it has none.
pub(crate) enum WorkerGpu {
    Ready(Session),
    Unavailable(String),
}

impl WorkerGpu {
    fn session(&mut self) -> Result<&mut Session, wit::GpuError> {
        match self {
            WorkerGpu::Ready(session) => Ok(session),
            WorkerGpu::Unavailable(reason) => Err(wit::GpuError::Unavailable(reason.clone())),
        }
    }

    /// Whether the device failed under this worker (the replica must go).
    pub(crate) fn is_lost(&self) -> bool {
        matches!(self, WorkerGpu::Ready(session) if session.is_lost())
    }

    /// Waits up to `grace` for the GPU work the worker queued; `false` if
    /// it is still running then.
    pub(crate) fn settles(&mut self, grace: Duration) -> bool {
        match self {
            // Not `session.synchronize`: the task's cancel must not cut this wait short.
            WorkerGpu::Ready(session) => {
                !matches!(session.backend().synchronize(session.stream(), grace), Err(GpuError::Timeout))
            }
            WorkerGpu::Unavailable(_) => true,
        }
    }

    /// Drops the work the worker queued that has not started (CPU backend).
    pub(crate) fn abandon(&mut self) {
        if let WorkerGpu::Ready(session) = self {
            session.abandon();
        }
    }

    /// Device memory the worker holds now.
    pub(crate) fn used_bytes(&self) -> u64 {
        match self {
            WorkerGpu::Ready(session) => session.used_bytes(),
            WorkerGpu::Unavailable(_) => 0,
        }
    }
}

type GpuResult<T> = wasmtime::Result<Result<T, wit::GpuError>>;

fn to_wit(error: GpuError) -> wit::GpuError {
    let message = error.to_string();
    match error {
        GpuError::Unavailable(m) => wit::GpuError::Unavailable(m),
        GpuError::OutOfMemory { .. } => wit::GpuError::OutOfMemory(message),
        GpuError::QuotaExceeded { .. } => wit::GpuError::QuotaExceeded(message),
        GpuError::OutOfBounds(m) => wit::GpuError::OutOfBounds(m),
        GpuError::InvalidArgument(m) => wit::GpuError::InvalidArgument(m),
        GpuError::CompileFailed(m) => wit::GpuError::CompileFailed(m),
        GpuError::Timeout => wit::GpuError::Timeout,
        GpuError::DeviceLost(m) => wit::GpuError::DeviceLost(m),
    }
}

fn dtype_from(dtype: wit::Dtype) -> DType {
    match dtype {
        wit::Dtype::F32 => DType::F32,
        wit::Dtype::F16 => DType::F16,
        wit::Dtype::Bf16 => DType::BF16,
    }
}

fn dtype_to(dtype: DType) -> wit::Dtype {
    match dtype {
        DType::F32 => wit::Dtype::F32,
        DType::F16 => wit::Dtype::F16,
        DType::BF16 => wit::Dtype::Bf16,
    }
}

impl WorkerState {
    fn buffer_id(&self, buffer: &Resource<GpuBuffer>) -> wasmtime::Result<BufferId> {
        Ok(self.table.get(buffer)?.0)
    }

    /// Runs `op` on the session with the guest's error mapping. No wait
    /// inside it (a read, a synchronize) outlasts the running call's
    /// deadline: a guest blocked in a host call is out of reach of the epoch
    /// interrupt that enforces the task's timeout.
    fn with_session<T>(&mut self, op: impl FnOnce(&mut Session) -> beamlet_gpu::Result<T>) -> GpuResult<T> {
        let left = self.time_left();
        Ok(self.gpu.session().and_then(|session| {
            if let Some(left) = left {
                session.set_wait_limit(left);
            }
            op(session).map_err(to_wit)
        }))
    }

    /// Time until the running call's deadline, if it has one.
    fn time_left(&self) -> Option<Duration> {
        self.deadline.map(|deadline| deadline.saturating_duration_since(std::time::Instant::now()))
    }
}

impl wit::Host for WorkerState {
    fn device(&mut self) -> GpuResult<wit::DeviceInfo> {
        self.with_session(|session| {
            let info = session.device();
            Ok(wit::DeviceInfo {
                name: info.name,
                memory_bytes: info.memory_bytes,
                compute_capability: info.compute_capability,
                backend: info.backend.to_owned(),
                quota_bytes: info.quota_bytes,
                used_bytes: info.used_bytes,
            })
        })
    }

    fn synchronize(&mut self, timeout_ms: u64) -> GpuResult<()> {
        let timeout = Duration::from_millis(timeout_ms).min(self.time_left().unwrap_or(Duration::MAX));
        self.with_session(|session| session.synchronize(timeout))
    }

    fn gemm(
        &mut self,
        args: wit::GemmArgs,
        a: Resource<GpuBuffer>,
        b: Resource<GpuBuffer>,
        c: Resource<GpuBuffer>,
    ) -> GpuResult<()> {
        let (a, b, c) = (self.buffer_id(&a)?, self.buffer_id(&b)?, self.buffer_id(&c)?);
        let args = GemmArgs {
            m: args.m,
            n: args.n,
            k: args.k,
            alpha: args.alpha,
            beta: args.beta,
            a,
            lda: args.lda,
            trans_a: args.trans_a,
            b,
            ldb: args.ldb,
            trans_b: args.trans_b,
            c,
            ldc: args.ldc,
        };
        self.with_session(|session| session.gemm(&args))
    }

    fn elementwise(
        &mut self,
        op: wit::BinaryOp,
        a: Resource<GpuBuffer>,
        b: Resource<GpuBuffer>,
        out: Resource<GpuBuffer>,
    ) -> GpuResult<()> {
        let (a, b, out) = (self.buffer_id(&a)?, self.buffer_id(&b)?, self.buffer_id(&out)?);
        let op = match op {
            wit::BinaryOp::Add => BinaryOp::Add,
            wit::BinaryOp::Mul => BinaryOp::Mul,
        };
        self.with_session(|session| session.elementwise(op, a, b, out))
    }

    fn add_bias(&mut self, x: Resource<GpuBuffer>, bias: Resource<GpuBuffer>, rows: u64, cols: u64) -> GpuResult<()> {
        let (x, bias) = (self.buffer_id(&x)?, self.buffer_id(&bias)?);
        self.with_session(|session| session.add_bias(x, bias, rows, cols))
    }

    fn relu(&mut self, x: Resource<GpuBuffer>) -> GpuResult<()> {
        let x = self.buffer_id(&x)?;
        self.with_session(|session| session.relu(x))
    }

    fn softmax_columns(&mut self, x: Resource<GpuBuffer>, rows: u64, cols: u64) -> GpuResult<()> {
        let x = self.buffer_id(&x)?;
        self.with_session(|session| session.softmax_columns(x, rows, cols))
    }
}

impl wit::HostBuffer for WorkerState {
    fn alloc(&mut self, dtype: wit::Dtype, len: u64) -> GpuResult<Resource<GpuBuffer>> {
        let id = match self.with_session(|session| session.alloc(dtype_from(dtype), len))? {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        match self.table.push(GpuBuffer(id)) {
            Ok(handle) => Ok(Ok(handle)),
            Err(e) => {
                let _ = self.with_session(|session| session.free(id));
                Err(e.into())
            }
        }
    }

    fn dtype(&mut self, buffer: Resource<GpuBuffer>) -> wasmtime::Result<wit::Dtype> {
        let id = self.buffer_id(&buffer)?;
        let described = self.with_session(|session| session.describe(id))?;
        Ok(described.map_or(wit::Dtype::F32, |(dtype, _)| dtype_to(dtype)))
    }

    fn len(&mut self, buffer: Resource<GpuBuffer>) -> wasmtime::Result<u64> {
        let id = self.buffer_id(&buffer)?;
        Ok(self.with_session(|session| session.describe(id))?.map_or(0, |(_, len)| len))
    }

    fn write(&mut self, buffer: Resource<GpuBuffer>, offset: u64, data: Vec<u8>) -> GpuResult<()> {
        let id = self.buffer_id(&buffer)?;
        self.with_session(|session| session.write(id, offset, &data))
    }

    fn read(&mut self, buffer: Resource<GpuBuffer>, offset: u64, len: u64) -> GpuResult<Vec<u8>> {
        let id = self.buffer_id(&buffer)?;
        self.with_session(|session| session.read(id, offset, len))
    }

    fn drop(&mut self, buffer: Resource<GpuBuffer>) -> wasmtime::Result<()> {
        let GpuBuffer(id) = self.table.delete(buffer)?;
        // A free that fails (a lost device) has nothing left to free.
        let _ = self.with_session(|session| session.free(id));
        Ok(())
    }
}

impl wit::HostKernel for WorkerState {
    fn compile(
        &mut self,
        source: wit::KernelSource,
        entry: String,
        params: Vec<wit::ParamKind>,
    ) -> GpuResult<Resource<GpuKernel>> {
        let source = match source {
            wit::KernelSource::CudaC(text) => beamlet_gpu::KernelSource::CudaC(text),
            wit::KernelSource::Ptx(text) => beamlet_gpu::KernelSource::Ptx(text),
        };
        let params: Vec<_> = params.into_iter().map(param_kind).collect();
        let id = match self.with_session(|session| session.compile(&source, &entry, &params))? {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(self.table.push(GpuKernel(id))?))
    }

    fn launch(
        &mut self,
        kernel: Resource<GpuKernel>,
        config: wit::LaunchConfig,
        args: Vec<wit::KernelArg>,
    ) -> GpuResult<()> {
        let kernel = self.table.get(&kernel)?.0;
        let args = args
            .into_iter()
            .map(|arg| {
                Ok(match arg {
                    wit::KernelArg::Buffer(buffer) => KernelArg::Buffer(self.buffer_id(&buffer)?),
                    wit::KernelArg::I32(v) => KernelArg::I32(v),
                    wit::KernelArg::U32(v) => KernelArg::U32(v),
                    wit::KernelArg::I64(v) => KernelArg::I64(v),
                    wit::KernelArg::U64(v) => KernelArg::U64(v),
                    wit::KernelArg::F32(v) => KernelArg::F32(v),
                    wit::KernelArg::F64(v) => KernelArg::F64(v),
                })
            })
            .collect::<wasmtime::Result<Vec<_>>>()?;
        let (g, b) = (config.grid, config.block);
        let config = beamlet_gpu::LaunchConfig {
            grid: [g.0, g.1, g.2],
            block: [b.0, b.1, b.2],
            shared_mem_bytes: config.shared_mem_bytes,
        };
        self.with_session(|session| session.launch(kernel, &config, &args))
    }

    fn drop(&mut self, kernel: Resource<GpuKernel>) -> wasmtime::Result<()> {
        let GpuKernel(id) = self.table.delete(kernel)?;
        if let WorkerGpu::Ready(session) = &mut self.gpu {
            session.drop_kernel(id);
        }
        Ok(())
    }
}

fn param_kind(kind: wit::ParamKind) -> beamlet_gpu::ParamKind {
    use beamlet_gpu::ParamKind as P;
    match kind {
        wit::ParamKind::Buffer => P::Buffer,
        wit::ParamKind::I32 => P::I32,
        wit::ParamKind::U32 => P::U32,
        wit::ParamKind::I64 => P::I64,
        wit::ParamKind::U64 => P::U64,
        wit::ParamKind::F32 => P::F32,
        wit::ParamKind::F64 => P::F64,
    }
}
