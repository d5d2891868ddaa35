//! The CPU backend: buffers in host memory, GEMM by `matrixmultiply`
//! (f16/bf16 computed in f32, as tensor cores accumulate), the same checks
//! and errors as a GPU. Each stream is a thread that runs its work in order,
//! as a GPU stream does: an op is checked and queued at once, `synchronize`
//! and `read` wait for it at most their timeout, and one worker's long GEMM
//! holds back no other worker. Custom kernels are `unavailable`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::{
    Backend, BinaryOp, BufferId, DType, DeviceInfo, DeviceLimits, GemmArgs, GpuError, KernelArg, KernelId,
    KernelSource, LaunchConfig, ParamKind, Result, StreamId, checks,
};

/// A buffer's elements.
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Data {
    fn zeroed(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; len]),
            DType::F16 => Data::F16(vec![f16::ZERO; len]),
            DType::BF16 => Data::BF16(vec![bf16::ZERO; len]),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    fn set_f32(&mut self, values: &[f32]) {
        match self {
            Data::F32(v) => v.copy_from_slice(values),
            Data::F16(v) => v.iter_mut().zip(values).for_each(|(x, y)| *x = f16::from_f32(*y)),
            Data::BF16(v) => v.iter_mut().zip(values).for_each(|(x, y)| *x = bf16::from_f32(*y)),
        }
    }
}

/// A buffer: its type and length are fixed, so ops are checked without
/// touching its elements, which only its stream's thread reads and writes.
#[derive(Clone)]
struct Buffer {
    dtype: DType,
    len: u64,
    data: Arc<Mutex<Data>>,
}

impl Buffer {
    fn shape(&self) -> (DType, u64) {
        (self.dtype, self.len)
    }

    fn values(&self) -> Vec<f32> {
        self.data.lock().unwrap().to_f32()
    }

    /// Runs `f` on the elements as f32, writing them back.
    fn map_f32(&self, f: impl FnOnce(&mut [f32])) {
        let mut data = self.data.lock().unwrap();
        let mut values = data.to_f32();
        f(&mut values);
        data.set_f32(&values);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A stream: work queued to its thread, and how far that thread has got.
struct Stream {
    jobs: mpsc::Sender<Job>,
    progress: Arc<Progress>,
}

#[derive(Default)]
struct Progress {
    state: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Default)]
struct Counts {
    queued: u64,
    done: u64,
    /// A job panicked: the stream is lost, as a GPU's after a fault.
    failed: Option<String>,
    /// Jobs up to this one (by queue order) are dropped, not run.
    abandoned: u64,
}

impl Stream {
    fn open() -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        std::thread::Builder::new()
            .name("cpu-gpu-stream".into())
            .spawn(move || {
                for job in queue {
                    let abandoned = {
                        let counts = shared.state.lock().unwrap();
                        counts.done < counts.abandoned
                    };
                    let outcome = if abandoned { Ok(()) } else { std::panic::catch_unwind(AssertUnwindSafe(job)) };
                    let mut counts = shared.state.lock().unwrap();
                    counts.done += 1;
                    if let Err(panic) = outcome {
                        let message = panic.downcast_ref::<&str>().map(|s| s.to_string());
                        counts.failed.get_or_insert(message.unwrap_or_else(|| "an op panicked".into()));
                    }
                    shared.changed.notify_all();
                }
            })
            .map_err(|e| GpuError::Unavailable(format!("failed to start a stream thread: {e}")))?;
        Ok(Self { jobs, progress })
    }

    fn queue(&self, job: impl FnOnce() + Send + 'static) -> Result<()> {
        self.progress.state.lock().unwrap().queued += 1;
        self.jobs.send(Box::new(job)).map_err(|_| GpuError::DeviceLost("the stream's thread is gone".into()))
    }

    /// Waits until the work queued so far has run, at most `timeout`, and
    /// gives up soon after `stop` says so.
    fn wait(&self, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<()> {
        let deadline = Instant::now().checked_add(timeout);
        let mut counts = self.progress.state.lock().unwrap();
        let target = counts.queued;
        loop {
            if let Some(message) = &counts.failed {
                return Err(GpuError::DeviceLost(message.clone()));
            }
            if counts.done >= target {
                return Ok(());
            }
            let left = deadline.map_or(Duration::MAX, |deadline| deadline.saturating_duration_since(Instant::now()));
            if left.is_zero() || stop() {
                return Err(GpuError::Timeout);
            }
            counts = self.progress.changed.wait_timeout(counts, left.min(STOP_POLL)).unwrap().0;
        }
    }

    fn abandon(&self) {
        let mut counts = self.progress.state.lock().unwrap();
        counts.abandoned = counts.queued;
    }
}

/// How often a wait looks at its stop check.
const STOP_POLL: Duration = Duration::from_millis(20);

pub struct CpuBackend {
    name: String,
    memory_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    buffers: HashMap<BufferId, Buffer>,
    /// Shared with the calls waiting on them; a closed stream's thread ends
    /// once its queued work has run.
    streams: HashMap<StreamId, Arc<Stream>>,
    next: u64,
    used: u64,
}

fn index(value: u64, what: &str) -> Result<usize> {
    usize::try_from(value).map_err(|_| GpuError::OutOfBounds(format!("{what} {value} does not fit this host")))
}

impl CpuBackend {
    /// A CPU "device" named `name` offering `memory_bytes`.
    pub fn new(name: impl Into<String>, memory_bytes: u64) -> Self {
        Self { name: name.into(), memory_bytes, state: Mutex::default() }
    }

    fn buffer(&self, id: BufferId) -> Result<Buffer> {
        self.state.lock().unwrap().buffers.get(&id).cloned().ok_or_else(|| unknown(id))
    }

    fn stream(&self, stream: StreamId) -> Result<Arc<Stream>> {
        let state = self.state.lock().unwrap();
        state.streams.get(&stream).cloned().ok_or_else(|| GpuError::InvalidArgument(format!("no stream {}", stream.0)))
    }
}

fn unknown(id: BufferId) -> GpuError {
    GpuError::InvalidArgument(format!("no buffer {}", id.0))
}

const NO_KERNELS: &str = "custom kernels need the cuda backend; this replica runs on --gpu-backend cpu";

impl Backend for CpuBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            memory_bytes: self.memory_bytes,
            compute_capability: (0, 0),
            backend: "cpu",
            quota_bytes: self.memory_bytes,
            used_bytes: self.memory_used(),
        }
    }

    fn limits(&self) -> DeviceLimits {
        DeviceLimits::TYPICAL_CUDA
    }

    fn open_stream(&self) -> Result<StreamId> {
        let opened = Arc::new(Stream::open()?);
        let mut state = self.state.lock().unwrap();
        state.next += 1;
        let id = StreamId(state.next);
        state.streams.insert(id, opened);
        Ok(id)
    }

    fn close_stream(&self, stream: StreamId) {
        self.state.lock().unwrap().streams.remove(&stream);
    }

    fn synchronize_unless(&self, stream: StreamId, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<()> {
        self.stream(stream)?.wait(timeout, stop)
    }

    fn abandon(&self, stream: StreamId) {
        if let Ok(stream) = self.stream(stream) {
            stream.abandon();
        }
    }

    fn alloc(&self, stream: StreamId, dtype: DType, len: u64) -> Result<BufferId> {
        self.stream(stream)?;
        let bytes = checks::bytes(dtype, len)?;
        let elements = index(len, "length")?;
        {
            let mut state = self.state.lock().unwrap();
            if state.used.checked_add(bytes).is_none_or(|total| total > self.memory_bytes) {
                return Err(GpuError::OutOfMemory { requested: bytes });
            }
            state.used += bytes;
        }
        // Zeroed pages come from the OS lazily: cheap outside the lock.
        let buffer = Buffer { dtype, len, data: Arc::new(Mutex::new(Data::zeroed(dtype, elements))) };
        let mut state = self.state.lock().unwrap();
        state.next += 1;
        let id = BufferId(state.next);
        state.buffers.insert(id, buffer);
        Ok(id)
    }

    /// The handle is gone at once; the elements go once the work queued
    /// before has run (it holds them until then).
    fn free(&self, stream: StreamId, id: BufferId) -> Result<()> {
        self.stream(stream)?;
        let mut state = self.state.lock().unwrap();
        let buffer = state.buffers.remove(&id).ok_or_else(|| unknown(id))?;
        state.used -= buffer.len * buffer.dtype.size() as u64;
        Ok(())
    }

    fn describe(&self, id: BufferId) -> Result<(DType, u64)> {
        self.buffer(id).map(|buffer| buffer.shape())
    }

    fn write(&self, stream: StreamId, id: BufferId, offset: u64, bytes: &[u8], _timeout: Duration) -> Result<()> {
        let stream = self.stream(stream)?;
        let buffer = self.buffer(id)?;
        let count = checks::write_elements(buffer.dtype, bytes.len())?;
        checks::range("write", offset, count, buffer.len)?;
        let start = index(offset, "offset")?;
        let bytes = bytes.to_vec();
        stream.queue(move || match &mut *buffer.data.lock().unwrap() {
            Data::F32(v) => bytes.chunks_exact(4).zip(&mut v[start..]).for_each(|(b, x)| {
                *x = f32::from_le_bytes(b.try_into().expect("chunks of 4"));
            }),
            Data::F16(v) => bytes.chunks_exact(2).zip(&mut v[start..]).for_each(|(b, x)| {
                *x = f16::from_le_bytes(b.try_into().expect("chunks of 2"));
            }),
            Data::BF16(v) => bytes.chunks_exact(2).zip(&mut v[start..]).for_each(|(b, x)| {
                *x = bf16::from_le_bytes(b.try_into().expect("chunks of 2"));
            }),
        })
    }

    fn read(&self, stream: StreamId, id: BufferId, offset: u64, len: u64, timeout: Duration) -> Result<Vec<u8>> {
        let stream = self.stream(stream)?;
        let buffer = self.buffer(id)?;
        checks::range("read", offset, len, buffer.len)?;
        let (start, end) = (index(offset, "offset")?, index(offset + len, "length")?);
        let (sender, bytes) = mpsc::sync_channel(1);
        stream.queue(move || {
            let read = match &*buffer.data.lock().unwrap() {
                Data::F32(v) => v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
                Data::F16(v) => v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
                Data::BF16(v) => v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            };
            let _ = sender.send(read);
        })?;
        stream.wait(timeout, &|| false)?;
        bytes.recv().map_err(|_| GpuError::DeviceLost("the stream dropped a read".into()))
    }

    fn gemm(&self, stream: StreamId, args: &GemmArgs) -> Result<()> {
        let stream = self.stream(stream)?;
        let (a, b, c) = (self.buffer(args.a)?, self.buffer(args.b)?, self.buffer(args.c)?);
        args.check_buffers(a.shape(), b.shape(), c.shape())?;
        let (m, n, k) = (index(args.m, "m")?, index(args.n, "n")?, index(args.k, "k")?);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (lda, ldb, ldc) = (args.lda as isize, args.ldb as isize, args.ldc as isize);
        // Column-major strides: element (i, j) at i * row_stride + j * col_stride.
        let (rsa, csa) = if args.trans_a { (lda, 1) } else { (1, lda) };
        let (rsb, csb) = if args.trans_b { (ldb, 1) } else { (1, ldb) };
        let (alpha, beta) = (args.alpha, args.beta);
        stream.queue(move || {
            let (a, b) = (a.values(), b.values());
            c.map_f32(|c| {
                // SAFETY: `check_buffers` proved every strided index of a
                // (m x k), b (k x n) and c (m x n) lies inside these slices,
                // and c is a distinct buffer.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        1,
                        ldc,
                    );
                }
            });
        })
    }

    fn binary(&self, stream: StreamId, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()> {
        let stream = self.stream(stream)?;
        let (a, b, out) = (self.buffer(a)?, self.buffer(b)?, self.buffer(out)?);
        checks::binary(a.shape(), b.shape(), out.shape())?;
        stream.queue(move || {
            let (a, b) = (a.values(), b.values());
            out.map_f32(|out| {
                for ((o, x), y) in out.iter_mut().zip(&a).zip(&b) {
                    *o = match op {
                        BinaryOp::Add => x + y,
                        BinaryOp::Mul => x * y,
                    };
                }
            });
        })
    }

    fn add_bias(&self, stream: StreamId, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()> {
        let stream = self.stream(stream)?;
        let (x, bias) = (self.buffer(x)?, self.buffer(bias)?);
        checks::add_bias(x.shape(), bias.shape(), rows, cols)?;
        let rows = index(rows, "rows")?;
        stream.queue(move || {
            let bias = bias.values();
            x.map_f32(|x| {
                for column in x.chunks_mut(rows.max(1)) {
                    column.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
                }
            });
        })
    }

    fn relu(&self, stream: StreamId, x: BufferId) -> Result<()> {
        let stream = self.stream(stream)?;
        let x = self.buffer(x)?;
        stream.queue(move || x.map_f32(|x| x.iter_mut().for_each(|v| *v = v.max(0.0))))
    }

    fn softmax_columns(&self, stream: StreamId, x: BufferId, rows: u64, cols: u64) -> Result<()> {
        let stream = self.stream(stream)?;
        let x = self.buffer(x)?;
        checks::softmax(x.len, rows, cols)?;
        let rows = index(rows, "rows")?;
        stream.queue(move || {
            x.map_f32(|x| {
                for column in x.chunks_mut(rows.max(1)) {
                    let max = column.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = column
                        .iter_mut()
                        .map(|v| {
                            *v = (*v - max).exp();
                            *v
                        })
                        .sum();
                    column.iter_mut().for_each(|v| *v /= sum);
                }
            });
        })
    }

    /// Checks the kernel as a GPU would, then answers `unavailable`.
    fn compile(&self, source: &KernelSource, entry: &str, params: &[ParamKind]) -> Result<KernelId> {
        checks::kernel_source(source)?;
        checks::entry(entry)?;
        checks::params(params)?;
        Err(GpuError::Unavailable(NO_KERNELS.into()))
    }

    fn launch(&self, stream: StreamId, _kernel: KernelId, config: &LaunchConfig, _args: &[KernelArg]) -> Result<()> {
        self.stream(stream)?;
        checks::launch(config, &self.limits())?;
        Err(GpuError::Unavailable(NO_KERNELS.into()))
    }

    fn memory_used(&self) -> u64 {
        self.state.lock().unwrap().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend and one stream, so the tests read as calls on a device.
    struct Gpu(CpuBackend, StreamId);

    impl Gpu {
        fn new(memory_bytes: u64) -> Self {
            let backend = CpuBackend::new("cpu", memory_bytes);
            let stream = backend.open_stream().unwrap();
            Gpu(backend, stream)
        }
        fn alloc(&self, dtype: DType, len: u64) -> Result<BufferId> {
            self.0.alloc(self.1, dtype, len)
        }
        fn free(&self, id: BufferId) -> Result<()> {
            self.0.free(self.1, id)
        }
        fn write(&self, id: BufferId, offset: u64, bytes: &[u8]) -> Result<()> {
            self.0.write(self.1, id, offset, bytes, Duration::MAX)
        }
        fn read(&self, id: BufferId, offset: u64, len: u64) -> Result<Vec<u8>> {
            self.0.read(self.1, id, offset, len, Duration::MAX)
        }
        fn gemm(&self, args: &GemmArgs) -> Result<()> {
            self.0.gemm(self.1, args)
        }
        fn binary(&self, op: BinaryOp, a: BufferId, b: BufferId, out: BufferId) -> Result<()> {
            self.0.binary(self.1, op, a, b, out)
        }
        fn add_bias(&self, x: BufferId, bias: BufferId, rows: u64, cols: u64) -> Result<()> {
            self.0.add_bias(self.1, x, bias, rows, cols)
        }
        fn relu(&self, x: BufferId) -> Result<()> {
            self.0.relu(self.1, x)
        }
        fn softmax_columns(&self, x: BufferId, rows: u64, cols: u64) -> Result<()> {
            self.0.softmax_columns(self.1, x, rows, cols)
        }
        fn memory_used(&self) -> u64 {
            self.0.memory_used()
        }
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn read_f32(backend: &Gpu, id: BufferId) -> Vec<f32> {
        let (_, len) = backend.0.describe(id).unwrap();
        backend.read(id, 0, len).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn args(a: BufferId, b: BufferId, c: BufferId, (m, n, k): (u64, u64, u64)) -> GemmArgs {
        GemmArgs { m, n, k, alpha: 1.0, beta: 0.0, a, lda: m, trans_a: false, b, ldb: k, trans_b: false, c, ldc: m }
    }

    #[test]
    fn buffers_are_zeroed_bounded_and_counted() {
        let gpu = Gpu::new(1024);
        let id = gpu.alloc(DType::F32, 4).unwrap();
        assert_eq!(read_f32(&gpu, id), vec![0.0; 4]);
        gpu.write(id, 2, &f32s(&[7.0, 8.0])).unwrap();
        assert_eq!(read_f32(&gpu, id), vec![0.0, 0.0, 7.0, 8.0]);
        assert!(matches!(gpu.write(id, 3, &f32s(&[1.0, 2.0])), Err(GpuError::OutOfBounds(_))));
        assert!(matches!(gpu.read(id, u64::MAX, 2), Err(GpuError::OutOfBounds(_))), "overflow is checked");
        assert!(matches!(gpu.write(id, 0, &[1, 2, 3]), Err(GpuError::InvalidArgument(_))));
        assert_eq!(gpu.memory_used(), 16);
        assert!(matches!(gpu.alloc(DType::F32, 1000), Err(GpuError::OutOfMemory { .. })));
        assert!(matches!(gpu.alloc(DType::F32, u64::MAX), Err(GpuError::OutOfBounds(_))));
        gpu.free(id).unwrap();
        assert_eq!(gpu.memory_used(), 0);
        assert!(gpu.read(id, 0, 1).is_err(), "a freed handle is gone");
    }

    #[test]
    fn gemm_column_major_with_transposes_and_leading_dimensions() {
        let gpu = Gpu::new(1 << 20);
        // a = [[1, 2], [3, 4]] stored column-major: 1, 3, 2, 4.
        let a = gpu.alloc(DType::F32, 4).unwrap();
        gpu.write(a, 0, &f32s(&[1.0, 3.0, 2.0, 4.0])).unwrap();
        let b = gpu.alloc(DType::F32, 4).unwrap();
        gpu.write(b, 0, &f32s(&[5.0, 7.0, 6.0, 8.0])).unwrap(); // [[5, 6], [7, 8]]
        let c = gpu.alloc(DType::F32, 4).unwrap();
        gpu.gemm(&args(a, b, c, (2, 2, 2))).unwrap();
        assert_eq!(read_f32(&gpu, c), vec![19.0, 43.0, 22.0, 50.0]); // [[19, 22], [43, 50]]
        gpu.gemm(&GemmArgs { trans_a: true, ..args(a, b, c, (2, 2, 2)) }).unwrap();
        assert_eq!(read_f32(&gpu, c), vec![26.0, 38.0, 30.0, 44.0]); // a^T b

        let small = gpu.alloc(DType::F32, 3).unwrap();
        let err = gpu.gemm(&args(a, b, small, (2, 2, 2))).unwrap_err();
        assert!(matches!(err, GpuError::OutOfBounds(_)), "{err}");
        let err = gpu.gemm(&GemmArgs { lda: 1, ..args(a, b, c, (2, 2, 2)) }).unwrap_err();
        assert!(matches!(err, GpuError::InvalidArgument(_)), "{err}");
        let err = gpu.gemm(&args(a, b, a, (2, 2, 2))).unwrap_err();
        assert!(matches!(err, GpuError::InvalidArgument(_)), "c aliasing a is refused: {err}");
        let half = gpu.alloc(DType::BF16, 4).unwrap();
        assert!(matches!(gpu.gemm(&args(a, b, half, (2, 2, 2))), Err(GpuError::InvalidArgument(_))));
    }

    #[test]
    fn half_precision_gemm_matches_f32_within_rounding() {
        let gpu = Gpu::new(1 << 20);
        for dtype in [DType::F16, DType::BF16] {
            let a = gpu.alloc(dtype, 4).unwrap();
            let b = gpu.alloc(dtype, 4).unwrap();
            let c = gpu.alloc(dtype, 4).unwrap();
            let to_half = |values: &[f32]| -> Vec<u8> {
                values
                    .iter()
                    .flat_map(|v| match dtype {
                        DType::F16 => f16::from_f32(*v).to_le_bytes(),
                        _ => bf16::from_f32(*v).to_le_bytes(),
                    })
                    .collect()
            };
            gpu.write(a, 0, &to_half(&[1.0, 3.0, 2.0, 4.0])).unwrap();
            gpu.write(b, 0, &to_half(&[5.0, 7.0, 6.0, 8.0])).unwrap();
            gpu.gemm(&args(a, b, c, (2, 2, 2))).unwrap();
            let out: Vec<f32> = gpu
                .read(c, 0, 4)
                .unwrap()
                .chunks_exact(2)
                .map(|b| match dtype {
                    DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    _ => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                })
                .collect();
            assert_eq!(out, vec![19.0, 43.0, 22.0, 50.0], "{dtype:?}");
        }
    }

    #[test]
    fn mlp_ops() {
        let gpu = Gpu::new(1 << 20);
        let x = gpu.alloc(DType::F32, 4).unwrap(); // 2 rows x 2 columns
        gpu.write(x, 0, &f32s(&[-1.0, 2.0, 3.0, -4.0])).unwrap();
        let bias = gpu.alloc(DType::F32, 2).unwrap();
        gpu.write(bias, 0, &f32s(&[1.0, 10.0])).unwrap();
        gpu.add_bias(x, bias, 2, 2).unwrap();
        assert_eq!(read_f32(&gpu, x), vec![0.0, 12.0, 4.0, 6.0]);
        assert!(gpu.add_bias(x, bias, 4, 1).is_err(), "bias length must match rows");
        let y = gpu.alloc(DType::F32, 4).unwrap();
        gpu.binary(BinaryOp::Mul, x, x, y).unwrap();
        assert_eq!(read_f32(&gpu, y), vec![0.0, 144.0, 16.0, 36.0]);
        gpu.write(x, 0, &f32s(&[-1.0, 2.0, 0.0, 0.0])).unwrap();
        gpu.relu(x).unwrap();
        assert_eq!(read_f32(&gpu, x), vec![0.0, 2.0, 0.0, 0.0]);
        gpu.softmax_columns(x, 2, 2).unwrap();
        let p = read_f32(&gpu, x);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-6 && (p[2] - 0.5).abs() < 1e-6, "{p:?}");
        assert!(gpu.softmax_columns(x, 3, 2).is_err());
        let short = gpu.alloc(DType::F32, 3).unwrap();
        assert!(gpu.binary(BinaryOp::Add, x, short, y).is_err());
        gpu.binary(BinaryOp::Add, x, y, x).unwrap();
        assert_eq!(read_f32(&gpu, x)[1], p[1] + 144.0, "out may alias an input");
    }

    #[test]
    fn streams_must_be_open() {
        let gpu = Gpu::new(1024);
        let id = gpu.alloc(DType::F32, 1).unwrap();
        let closed = gpu.0.open_stream().unwrap();
        gpu.0.close_stream(closed);
        assert!(matches!(gpu.0.read(closed, id, 0, 1, Duration::MAX), Err(GpuError::InvalidArgument(_))));
        assert!(matches!(gpu.0.synchronize(closed, Duration::ZERO), Err(GpuError::InvalidArgument(_))));
        assert!(gpu.0.synchronize(gpu.1, Duration::ZERO).is_ok());
    }

    /// Queues a job on `stream` that waits until the returned sender speaks
    /// (or is dropped): a stream busy for as long as a test wants.
    fn hold(gpu: &CpuBackend, stream: StreamId) -> mpsc::Sender<()> {
        let (release, gate) = mpsc::channel::<()>();
        gpu.stream(stream)
            .unwrap()
            .queue(move || {
                let _ = gate.recv();
            })
            .unwrap();
        release
    }

    #[test]
    fn a_busy_stream_holds_back_only_its_own_work_and_waits_are_bounded() {
        let gpu = Gpu::new(1 << 20);
        let id = gpu.alloc(DType::F32, 2).unwrap();
        let release = hold(&gpu.0, gpu.1);
        gpu.write(id, 0, &f32s(&[1.0, 2.0])).unwrap();
        gpu.relu(id).unwrap();
        let short = Duration::from_millis(20);
        assert_eq!(gpu.0.synchronize(gpu.1, short), Err(GpuError::Timeout));
        assert_eq!(gpu.0.read(gpu.1, id, 0, 2, short), Err(GpuError::Timeout));

        // Another worker's stream runs meanwhile.
        let other = gpu.0.open_stream().unwrap();
        let theirs = gpu.0.alloc(other, DType::F32, 1).unwrap();
        gpu.0.write(other, theirs, 0, &f32s(&[5.0]), Duration::MAX).unwrap();
        assert_eq!(gpu.0.read(other, theirs, 0, 1, Duration::MAX).unwrap(), f32s(&[5.0]));

        release.send(()).unwrap();
        gpu.0.synchronize(gpu.1, Duration::MAX).unwrap();
        assert_eq!(read_f32(&gpu, id), vec![1.0, 2.0], "queued work ran in order once the stream freed");
    }

    #[test]
    fn a_wait_ends_when_told_to_stop_and_abandoned_work_never_runs() {
        let gpu = Gpu::new(1 << 20);
        let id = gpu.alloc(DType::F32, 2).unwrap();
        let release = hold(&gpu.0, gpu.1);
        gpu.write(id, 0, &f32s(&[-1.0, 2.0])).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                gpu.0.synchronize_unless(gpu.1, Duration::MAX, &|| stop.load(std::sync::atomic::Ordering::Relaxed))
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(waiting.join().unwrap(), Err(GpuError::Timeout), "an endless wait ends when told to stop");
        });

        // The write and the relu behind the busy job are dropped, not run.
        gpu.relu(id).unwrap();
        gpu.0.abandon(gpu.1);
        // (The held job itself may have been dropped too, if it had not started.)
        let _ = release.send(());
        gpu.0.synchronize(gpu.1, Duration::MAX).unwrap();
        assert_eq!(read_f32(&gpu, id), vec![0.0, 0.0]);
        // Work queued after that runs as ever.
        gpu.write(id, 0, &f32s(&[-3.0, 4.0])).unwrap();
        gpu.relu(id).unwrap();
        assert_eq!(read_f32(&gpu, id), vec![0.0, 4.0]);
    }

    #[test]
    fn a_failed_op_loses_the_stream() {
        let gpu = Gpu::new(1024);
        gpu.0.stream(gpu.1).unwrap().queue(|| panic!("simulated fault")).unwrap();
        let err = gpu.0.synchronize(gpu.1, Duration::MAX).unwrap_err();
        assert_eq!(err, GpuError::DeviceLost("simulated fault".into()));
    }

    #[test]
    fn custom_kernels_are_checked_then_unavailable() {
        let gpu = Gpu::new(1024);
        let source = KernelSource::CudaC("extern \"C\" __global__ void k() {}".into());
        let err = gpu.0.compile(&source, "k", &[]).unwrap_err();
        assert_eq!(err, GpuError::Unavailable(NO_KERNELS.into()));
        assert!(matches!(gpu.0.compile(&source, "not valid", &[]), Err(GpuError::InvalidArgument(_))));
        let bad = LaunchConfig { grid: [0, 1, 1], block: [1, 1, 1], shared_mem_bytes: 0 };
        assert!(matches!(gpu.0.launch(gpu.1, KernelId(1), &bad, &[]), Err(GpuError::InvalidArgument(_))));
    }
}
