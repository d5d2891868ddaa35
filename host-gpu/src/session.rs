//! One worker's hold on a replica's GPU: its stream, its `gpu_memory` quota,
//! and the buffers and kernels it made. Every guest call goes through here,
//! so a worker can only name what it owns, can never hold more than its
//! quota, and leaves nothing behind when its instance is dropped (after a
//! trap, say).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::{
    Backend, BinaryOp, BufferId, DType, DeviceInfo, GemmArgs, GpuError, KernelArg, KernelId, KernelSource,
    LaunchConfig, ParamKind, Result, StreamId, checks,
};

/// The wait a read or write allows for earlier work unless told otherwise.
const DEFAULT_WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Buffers one worker may hold at once, whatever their size (empty ones
/// cost host memory too); past it `alloc` answers `invalid-argument`.
pub const MAX_BUFFERS: usize = 16_384;

pub struct Session {
    backend: Arc<dyn Backend>,
    worker: usize,
    stream: StreamId,
    quota: u64,
    used: u64,
    /// Buffers this worker owns, with their size in bytes.
    buffers: HashMap<BufferId, u64>,
    kernels: HashSet<KernelId>,
    wait_limit: Duration,
    /// Ends a wait early when it returns true (the task was cancelled).
    stop: Option<StopCheck>,
    lost: bool,
}

/// Says whether the worker's waits should give up now.
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

impl Session {
    /// A session for worker `worker`, which may hold `quota_bytes` of device
    /// memory at once; opens the worker's stream.
    pub fn new(backend: Arc<dyn Backend>, worker: usize, quota_bytes: u64) -> Result<Self> {
        let stream = backend.open_stream()?;
        Ok(Self {
            backend,
            worker,
            stream,
            quota: quota_bytes,
            used: 0,
            buffers: HashMap::new(),
            kernels: HashSet::new(),
            wait_limit: DEFAULT_WAIT_LIMIT,
            stop: None,
            lost: false,
        })
    }

    pub fn worker(&self) -> usize {
        self.worker
    }

    pub fn stream(&self) -> StreamId {
        self.stream
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Bytes this worker holds now.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    pub fn quota_bytes(&self) -> u64 {
        self.quota
    }

    /// Whether a call ever answered `device-lost`: the context is dead and
    /// the runtime should replace the replica.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// The longest `read` (and a large `write`) waits for earlier work on the
    /// stream before answering `timeout`; e.g. the task's remaining time.
    pub fn set_wait_limit(&mut self, limit: Duration) {
        self.wait_limit = limit;
    }

    /// The device, with this worker's quota and use.
    pub fn device(&self) -> DeviceInfo {
        DeviceInfo { quota_bytes: self.quota, used_bytes: self.used, ..self.backend.info() }
    }

    /// From now on, every wait (`synchronize`, `read`) also gives up, with
    /// `timeout`, soon after `stop` returns true.
    pub fn set_stop(&mut self, stop: StopCheck) {
        self.stop = Some(stop);
    }

    /// Waits for everything this worker queued.
    pub fn synchronize(&mut self, timeout: Duration) -> Result<()> {
        let stop = self.stop.clone();
        let result =
            self.backend.synchronize_unless(self.stream, timeout, &|| stop.as_ref().is_some_and(|stop| stop()));
        self.track(result)
    }

    /// Drops the work this worker queued that has not started yet, where
    /// the backend can: its task stopped and its instance goes.
    pub fn abandon(&mut self) {
        self.backend.abandon(self.stream);
    }

    pub fn alloc(&mut self, dtype: DType, len: u64) -> Result<BufferId> {
        let bytes = checks::bytes(dtype, len)?;
        if self.buffers.len() >= MAX_BUFFERS {
            return Err(GpuError::InvalidArgument(format!(
                "a worker holds at most {MAX_BUFFERS} buffers at once; drop some before making more"
            )));
        }
        if self.used.checked_add(bytes).is_none_or(|total| total > self.quota) {
            // A quota of the whole device is no quota: the device is what ran out.
            if self.quota >= self.backend.info().memory_bytes {
                return Err(GpuError::OutOfMemory { requested: bytes });
            }
            return Err(GpuError::QuotaExceeded { requested: bytes, quota: self.quota, used: self.used });
        }
        let result = self.backend.alloc(self.stream, dtype, len);
        let id = self.track(result)?;
        self.buffers.insert(id, bytes);
        self.used += bytes;
        Ok(id)
    }

    /// Frees a buffer (the guest dropped it) and credits the quota.
    pub fn free(&mut self, id: BufferId) -> Result<()> {
        self.owned(id)?;
        let bytes = self.buffers.remove(&id).unwrap_or(0);
        self.used -= bytes;
        let result = self.backend.free(self.stream, id);
        self.track(result)
    }

    /// Element type and length of an owned buffer.
    pub fn describe(&self, id: BufferId) -> Result<(DType, u64)> {
        self.owned(id)?;
        self.backend.describe(id)
    }

    pub fn write(&mut self, id: BufferId, offset: u64, bytes: &[u8]) -> Result<()> {
        self.owned(id)?;
        let result = self.backend.write(self.stream, id, offset, bytes, self.wait_limit);
        self.track(result)
    }

    pub fn read(&mut self, id: BufferId, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.owned(id)?;
        if self.stop.is_some() {
            // The earlier work first, in a wait the stop check can end.
            self.synchronize(self.wait_limit)?;
        }
        let result = self.backend.read(self.stream, id, offset, len, self.wait_limit);
        self.track(result)
    }

    /// `c = alpha * op(a) * op(b) + beta * c` on the buffers named in `args`.
    pub fn gemm(&mut self, args: &GemmArgs) -> Result<()> {
        for id in [args.a, args.b, args.c] {
            self.owned(id)?;
        }
        let result = self.backend.gemm(self.stream, args);
        self.track(result)
    }

    pub fn elementwise(&mut self, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()> {
        for id in [a, b, out] {
            self.owned(id)?;
        }
        let result = self.backend.binary(self.stream, op, a, b, out);
        self.track(result)
    }

    pub fn add_bias(&mut self, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()> {
        self.owned(x)?;
        self.owned(bias)?;
        let result = self.backend.add_bias(self.stream, x, bias, rows, cols);
        self.track(result)
    }

    pub fn relu(&mut self, x: BufferId) -> Result<()> {
        self.owned(x)?;
        let result = self.backend.relu(self.stream, x);
        self.track(result)
    }

    pub fn softmax_columns(&mut self, x: BufferId, rows: u64, cols: u64) -> Result<()> {
        self.owned(x)?;
        let result = self.backend.softmax_columns(self.stream, x, rows, cols);
        self.track(result)
    }

    /// Compiles a kernel (once per replica for one source) for this worker.
    pub fn compile(&mut self, source: &KernelSource, entry: &str, params: &[ParamKind]) -> Result<KernelId> {
        let result = self.backend.compile(source, entry, params);
        let id = self.track(result)?;
        self.kernels.insert(id);
        Ok(id)
    }

    /// The guest dropped its kernel handle; the compiled code stays cached.
    pub fn drop_kernel(&mut self, id: KernelId) {
        self.kernels.remove(&id);
    }

    pub fn launch(&mut self, kernel: KernelId, config: &LaunchConfig, args: &[KernelArg]) -> Result<()> {
        if !self.kernels.contains(&kernel) {
            return Err(GpuError::InvalidArgument(format!("kernel {} was not compiled by this worker", kernel.0)));
        }
        for arg in args {
            if let KernelArg::Buffer(id) = arg {
                self.owned(*id)?;
            }
        }
        let result = self.backend.launch(self.stream, kernel, config, args);
        self.track(result)
    }

    fn owned(&self, id: BufferId) -> Result<()> {
        if self.buffers.contains_key(&id) {
            return Ok(());
        }
        Err(GpuError::InvalidArgument(if self.backend.describe(id).is_ok() {
            format!("buffer {} belongs to another worker", id.0)
        } else {
            format!("no buffer {}", id.0)
        }))
    }

    fn track<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(GpuError::DeviceLost(_)) = &result {
            self.lost = true;
        }
        result
    }
}

impl Drop for Session {
    /// Frees what the worker still holds, in its stream's order; errors are
    /// moot here (a lost device frees everything with its context).
    fn drop(&mut self) {
        for (id, _) in self.buffers.drain() {
            let _ = self.backend.free(self.stream, id);
        }
        self.backend.close_stream(self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    fn backend() -> Arc<dyn Backend> {
        Arc::new(CpuBackend::new("cpu", 1 << 20))
    }

    #[test]
    fn quota_is_enforced_and_credited_back() {
        let backend = backend();
        let mut session = Session::new(backend.clone(), 0, 64).unwrap();
        let a = session.alloc(DType::F32, 8).unwrap(); // 32 bytes
        let b = session.alloc(DType::BF16, 16).unwrap(); // 32 bytes
        assert_eq!(session.used_bytes(), 64);
        let err = session.alloc(DType::F32, 1).unwrap_err();
        assert_eq!(err, GpuError::QuotaExceeded { requested: 4, quota: 64, used: 64 });
        assert!(matches!(session.alloc(DType::F32, u64::MAX), Err(GpuError::OutOfBounds(_))));
        session.free(a).unwrap();
        assert_eq!(session.used_bytes(), 32);
        session.alloc(DType::F32, 8).unwrap();
        assert_eq!((session.device().quota_bytes, session.device().used_bytes), (64, 64));
        assert_eq!(backend.memory_used(), 64);
        assert!(session.free(a).is_err(), "a freed buffer is gone");
        session.free(b).unwrap();
    }

    #[test]
    fn a_worker_holds_a_bounded_number_of_buffers_however_small() {
        let mut session = Session::new(backend(), 0, 1 << 20).unwrap();
        let held: Vec<_> = (0..MAX_BUFFERS).map(|_| session.alloc(DType::F32, 0).unwrap()).collect();
        let err = session.alloc(DType::F32, 0).unwrap_err();
        assert!(matches!(&err, GpuError::InvalidArgument(m) if m.contains("at most 16384 buffers")), "{err}");
        session.free(held[0]).unwrap();
        session.alloc(DType::F32, 1).unwrap();
    }

    #[test]
    fn without_a_quota_of_its_own_a_worker_runs_out_of_device_memory() {
        // No `gpu_memory`: the runtime gives the whole device as the quota.
        let mut session = Session::new(backend(), 0, 1 << 20).unwrap();
        assert_eq!(session.alloc(DType::F32, 1 << 20), Err(GpuError::OutOfMemory { requested: 4 << 20 }));
    }

    #[test]
    fn workers_cannot_touch_each_others_buffers() {
        let backend = backend();
        let mut one = Session::new(backend.clone(), 0, 1024).unwrap();
        let mut two = Session::new(backend.clone(), 1, 1024).unwrap();
        let mine = one.alloc(DType::F32, 4).unwrap();
        let theirs = two.alloc(DType::F32, 4).unwrap();
        let err = one.read(theirs, 0, 1).unwrap_err();
        assert_eq!(err, GpuError::InvalidArgument(format!("buffer {} belongs to another worker", theirs.0)));
        assert!(one.write(theirs, 0, &[0; 4]).is_err());
        assert!(one.free(theirs).is_err());
        assert!(one.relu(theirs).is_err());
        assert!(one.elementwise(BinaryOp::Add, mine, theirs, mine).is_err());
        assert!(one.add_bias(mine, theirs, 4, 1).is_err());
        assert!(one.softmax_columns(theirs, 4, 1).is_err());
        let args = GemmArgs {
            m: 2,
            n: 2,
            k: 1,
            alpha: 1.0,
            beta: 0.0,
            a: mine,
            lda: 2,
            trans_a: false,
            b: theirs,
            ldb: 1,
            trans_b: false,
            c: mine,
            ldc: 2,
        };
        assert!(matches!(one.gemm(&args), Err(GpuError::InvalidArgument(m)) if m.contains("another worker")));
        assert_eq!(one.describe(BufferId(999)), Err(GpuError::InvalidArgument("no buffer 999".into())));
        assert_eq!(two.read(theirs, 0, 1).unwrap(), vec![0; 4], "the owner still can");
        assert_eq!(one.read(mine, 0, 4).unwrap().len(), 16);
    }

    #[test]
    fn dropping_a_session_frees_everything_it_held() {
        let backend = backend();
        let mut other = Session::new(backend.clone(), 1, 1024).unwrap();
        let kept = other.alloc(DType::F32, 2).unwrap();
        {
            let mut session = Session::new(backend.clone(), 0, 1024).unwrap();
            for _ in 0..3 {
                session.alloc(DType::F16, 10).unwrap();
            }
            assert_eq!(backend.memory_used(), 8 + 60);
        }
        assert_eq!(backend.memory_used(), 8, "only the other worker's buffer is left");
        assert!(other.read(kept, 0, 2).is_ok());
    }

    #[test]
    fn ops_run_through_the_session() {
        let mut session = Session::new(backend(), 0, 1024).unwrap();
        let x = session.alloc(DType::F32, 2).unwrap();
        session.write(x, 0, &[-1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        session.relu(x).unwrap();
        session.synchronize(Duration::from_secs(1)).unwrap();
        assert_eq!(
            session.read(x, 0, 2).unwrap(),
            [0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()
        );
        assert_eq!(session.describe(x).unwrap(), (DType::F32, 2));
        assert!(!session.is_lost());
    }

    #[test]
    fn kernels_are_unavailable_on_the_cpu_and_checked_per_worker() {
        let mut session = Session::new(backend(), 0, 1024).unwrap();
        let source = KernelSource::CudaC("extern \"C\" __global__ void k() {}".into());
        assert!(matches!(session.compile(&source, "k", &[]), Err(GpuError::Unavailable(_))));
        let config = LaunchConfig { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 };
        let err = session.launch(KernelId(0), &config, &[]).unwrap_err();
        assert!(matches!(err, GpuError::InvalidArgument(m) if m.contains("not compiled by this worker")));
    }

    #[test]
    fn device_lost_is_remembered() {
        let mut session = Session::new(backend(), 0, 1024).unwrap();
        assert!(session.track::<()>(Err(GpuError::Timeout)).is_err());
        assert!(!session.is_lost());
        assert!(session.track::<()>(Err(GpuError::DeviceLost("gone".into()))).is_err());
        assert!(session.is_lost());
    }
}
