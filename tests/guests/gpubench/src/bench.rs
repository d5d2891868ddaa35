//! The timed runs: warm up once, queue `iters` runs, synchronize once, and
//! report the mean time per run.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use beamlet_sdk::gpu::{self, Arg, Buffer, Element, Gemm, GpuError, Kernel, LaunchConfig, Param};
use serde::Serialize;

use crate::check::tolerance;
use crate::data::{error, gemm_at, value};

/// Long enough for an 8192³ GEMM loop on a slow device, short of a task's timeout.
const SYNC: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize)]
pub struct Sample {
    /// Element index (column-major for GEMM).
    pub index: u64,
    pub got: f32,
    pub want: f64,
}

#[derive(Debug, Serialize)]
pub struct Timed {
    pub iters: u32,
    /// Mean milliseconds per run: the loop of queued runs plus one synchronize.
    pub ms_per_op: f64,
    /// Elements checked against the guest's own arithmetic.
    pub sample: Vec<Sample>,
    /// Largest [`error`] in `sample`.
    pub max_err: f64,
    /// Whether `max_err` is within the rounding of the result's dtype.
    pub ok: bool,
}

fn timed(iters: u32, mut run: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    run()?;
    gpu::synchronize(SYNC)?;
    let started = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    gpu::synchronize(SYNC)?;
    Ok(started.elapsed().as_secs_f64() * 1e3 / f64::from(iters))
}

fn checked<T: Element>(iters: u32, ms_per_op: f64, sample: Vec<Sample>) -> Timed {
    let max_err = sample.iter().map(|s| error(s.got, s.want)).fold(0.0, f64::max);
    Timed { iters, ms_per_op, sample, max_err, ok: max_err <= tolerance::<T>() }
}

/// `c = a * b` for n x n matrices of `T`; samples the corners and the middle.
pub fn gemm<T: Element>(n: u64, iters: u32) -> Result<Timed, GpuError> {
    let a = Buffer::<T>::from_fn(n * n, |i| T::from_f32(value(i, 1)))?;
    let b = Buffer::<T>::from_fn(n * n, |i| T::from_f32(value(i, 2)))?;
    let c = Buffer::<T>::zeros(n * n)?;
    let ms = timed(iters, || Gemm::new(n, n, n).run(&a, &b, &c))?;
    let mut sample = Vec::new();
    for (i, j) in [(0, 0), (n - 1, 0), (n / 2, n / 3), (0, n - 1), (n - 1, n - 1)] {
        let index = i + j * n;
        let got = c.read(index, 1)?[0].to_f32();
        let want = gemm_at(|x| value(x, 1), |x| value(x, 2), 0.0, (n, n, n), (false, false), (1.0, 0.0), (i, j));
        sample.push(Sample { index, got, want });
    }
    Ok(checked::<T>(iters, ms, sample))
}

const SAXPY: &str = r#"
extern "C" __global__ void saxpy(unsigned long long n, float a, const float* x, float* y) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"#;

const EMPTY: &str = r#"extern "C" __global__ void empty() {}"#;

static SAXPY_KERNEL: OnceLock<Kernel> = OnceLock::new();
static EMPTY_KERNEL: OnceLock<Kernel> = OnceLock::new();

/// The worker's copy of a kernel, compiled on first use; also the compile
/// time when this call compiled it.
fn kernel(
    cell: &'static OnceLock<Kernel>,
    source: &str,
    entry: &str,
    params: &[Param],
) -> Result<(&'static Kernel, Option<f64>), GpuError> {
    if let Some(kernel) = cell.get() {
        return Ok((kernel, None));
    }
    let started = Instant::now();
    let compiled = Kernel::cuda_c(source, entry, params)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    Ok((cell.get_or_init(|| compiled), Some(ms)))
}

#[derive(Debug, Serialize)]
pub struct Compiled<T> {
    #[serde(flatten)]
    pub result: T,
    /// Present when this task compiled the kernel (the first on its worker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile_ms: Option<f64>,
}

/// `y = 0.5 * x + y` on n floats with a custom kernel (CUDA only).
pub fn saxpy(n: u64, iters: u32) -> Result<Compiled<Timed>, GpuError> {
    const A: f32 = 0.5;
    let (kernel, compile_ms) =
        kernel(&SAXPY_KERNEL, SAXPY, "saxpy", &[Param::U64, Param::F32, Param::Buffer, Param::Buffer])?;
    let x_at = |i: u64| (i % 97) as f32 * 0.5;
    let y_at = |i: u64| (i % 89) as f32 - 44.0;
    let x = Buffer::from_fn(n, x_at)?;
    let y = Buffer::from_fn(n, y_at)?;
    let config = LaunchConfig::linear(n, 256);
    let ms = timed(iters, || kernel.launch(config, &[Arg::U64(n), Arg::F32(A), Arg::buffer(&x), Arg::buffer(&y)]))?;
    // Warm-up plus iters runs, each adding an exact a * x.
    let runs = f64::from(iters) + 1.0;
    let mut sample = Vec::new();
    for index in [0, 1, n / 2, n - 1] {
        let want = f64::from(y_at(index)) + runs * f64::from(A) * f64::from(x_at(index));
        sample.push(Sample { index, got: y.read(index, 1)?[0], want });
    }
    Ok(Compiled { result: checked::<f32>(iters, ms, sample), compile_ms })
}

#[derive(Debug, Serialize)]
pub struct Launches {
    pub iters: u32,
    /// Host microseconds per launch call: the median over rounds of at
    /// most [`ROUND`] queued launches (a round never fills the driver's
    /// launch queue, which would pace the calls by the GPU instead).
    pub launch_us: f64,
    /// Microseconds per launch including each round's synchronize.
    pub total_us: f64,
}

/// Launches per round, as `gpu-native-bench` times them.
const ROUND: u32 = 512;

/// `iters` launches of an empty kernel, in rounds: the cost of one launch
/// through the host.
pub fn launch(iters: u32) -> Result<Compiled<Launches>, GpuError> {
    let (kernel, compile_ms) = kernel(&EMPTY_KERNEL, EMPTY, "empty", &[])?;
    let config = LaunchConfig::new((1, 1, 1), (1, 1, 1));
    kernel.launch(config, &[])?;
    gpu::synchronize(SYNC)?;
    let (mut per_launch, mut total, mut left) = (Vec::new(), Duration::ZERO, iters);
    while left > 0 {
        let round = left.min(ROUND);
        let started = Instant::now();
        for _ in 0..round {
            kernel.launch(config, &[])?;
        }
        per_launch.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(round));
        gpu::synchronize(SYNC)?;
        total += started.elapsed();
        left -= round;
    }
    per_launch.sort_by(f64::total_cmp);
    let launch_us = per_launch.get(per_launch.len() / 2).copied().unwrap_or_default();
    let total_us = total.as_secs_f64() * 1e6 / f64::from(iters.max(1));
    Ok(Compiled { result: Launches { iters, launch_us, total_us }, compile_ms })
}
