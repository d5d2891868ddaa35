//! A custom CUDA C kernel, `y = a * x + y`, compiled once per worker and
//! launched per task.
//!
//! Custom kernels need a CUDA GPU: on `beamlet serve --gpu-backend cpu` the
//! compile answers `unavailable`. `init` still succeeds then, so the app
//! deploys, and every task fails with a message saying why.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use beamlet_sdk::gpu::{self, Arg, Buffer, GpuError, Kernel, LaunchConfig, Param};
use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

/// The kernel: one thread per element, so `i < n` guards the last block.
pub const SAXPY: &str = r#"
extern "C" __global__ void saxpy(unsigned long long n, float a, const float* x, float* y) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = a * x[i] + y[i];
    }
}
"#;

/// The kernel's parameters, in order: `n`, `a`, `x`, `y`.
pub const PARAMS: [Param; 4] = [Param::U64, Param::F32, Param::Buffer, Param::Buffer];

/// Largest `n` a task may ask for (x and y take 8 bytes per element).
pub const MAX_N: u64 = 1 << 27;

/// Threads per block.
const BLOCK: u32 = 256;

/// Elements the guest checks against its own arithmetic.
const CHECKS: u64 = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Elements in x and y, 1 to [`MAX_N`].
    pub n: u64,
    /// The scale.
    pub a: f32,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub n: u64,
    /// Whether the checked elements matched (a mismatch fails the task instead).
    pub checked: bool,
    /// `[index, y]` for each checked element.
    pub sample: Vec<(u64, f32)>,
    /// From the launch until the stream had finished.
    pub kernel_ms: f64,
}

/// The deterministic inputs: small integers and halves, exact in f32.
pub fn x_at(i: u64) -> f32 {
    (i % 97) as f32 * 0.5
}

pub fn y_at(i: u64) -> f32 {
    (i % 89) as f32 - 44.0
}

/// The indices checked: the ends and evenly spaced ones between.
pub fn check_indices(n: u64) -> Vec<u64> {
    let last = u128::from(n.max(1) - 1);
    let mut at: Vec<u64> = (0..CHECKS).map(|k| (u128::from(k) * last / u128::from(CHECKS - 1)) as u64).collect();
    at.dedup();
    at
}

/// Whether `got` is `a * x + y` within f32 rounding, with or without a fused
/// multiply-add (NVRTC fuses by default).
pub fn matches(a: f32, i: u64, got: f32) -> bool {
    let want = a.mul_add(x_at(i), y_at(i));
    (got - want).abs() <= 1e-6 * want.abs().max(1.0)
}

/// The compiled kernel, or why custom kernels cannot run on this replica.
static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();

fn setup() -> Result<(), Error> {
    let kernel = match Kernel::cuda_c(SAXPY, "saxpy", &PARAMS) {
        Ok(kernel) => Ok(kernel),
        // The CPU backend has no custom kernels: deploy anyway, refuse per task.
        Err(GpuError::Unavailable(why)) => {
            println!("gpu-saxpy: custom kernels unavailable here: {why}");
            Err(format!(
                "gpu-saxpy runs a custom CUDA kernel, which needs a CUDA GPU (beamlet serve --gpu-backend cuda); \
                 this replica has none: {why}"
            ))
        }
        Err(err) => return Err(Error::failed(format!("failed to compile the saxpy kernel: {err}"))),
    };
    let _ = KERNEL.set(kernel);
    Ok(())
}

fn saxpy(_ctx: &Context, input: Input) -> Result<Output, Error> {
    let Input { n, a } = input;
    if !(1..=MAX_N).contains(&n) {
        return Err(Error::bad_input(format!("`n` must be 1 to {MAX_N}, not {n}")));
    }
    if !a.is_finite() {
        return Err(Error::bad_input("`a` must be a finite number"));
    }
    let kernel = match KERNEL.get() {
        Some(Ok(kernel)) => kernel,
        Some(Err(why)) => return Err(Error::failed(why.clone())),
        None => return Err(Error::failed("the kernel is not compiled: init did not run")),
    };

    let x = Buffer::from_fn(n, x_at)?;
    let y = Buffer::from_fn(n, y_at)?;
    // Uploads are queued too; wait for them so the timing is the kernel's alone.
    gpu::synchronize(Duration::from_secs(60))?;

    let started = Instant::now();
    kernel.launch(LaunchConfig::linear(n, BLOCK), &[Arg::U64(n), Arg::F32(a), Arg::buffer(&x), Arg::buffer(&y)])?;
    gpu::synchronize(Duration::from_secs(60))?;
    let kernel_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut sample = Vec::new();
    for i in check_indices(n) {
        let got = y.read(i, 1)?[0];
        if !matches(a, i, got) {
            return Err(Error::failed(format!(
                "y[{i}] = {got}, but {a} * {} + {} = {}",
                x_at(i),
                y_at(i),
                a.mul_add(x_at(i), y_at(i))
            )));
        }
        sample.push((i, got));
    }
    Ok(Output { n, checked: true, sample, kernel_ms })
}

beamlet_sdk::export!(saxpy, init = setup);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_cover_both_ends_without_repeats() {
        assert_eq!(check_indices(1), [0]);
        assert_eq!(check_indices(3), [0, 1, 2]);
        let many = check_indices(1 << 20);
        assert_eq!((many.len(), many[0], many[15]), (16, 0, (1 << 20) - 1));
        assert!(many.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn fused_and_unfused_results_both_match() {
        for i in [0, 1, 96, 1000, 12345] {
            let a = 0.1f32;
            assert!(matches(a, i, a * x_at(i) + y_at(i)), "{i}");
            assert!(matches(a, i, a.mul_add(x_at(i), y_at(i))), "{i}");
            assert!(!matches(a, i, a * x_at(i) + y_at(i) + 0.01), "{i}");
        }
    }

    #[test]
    fn inputs_are_exact_small_numbers() {
        assert_eq!((x_at(0), x_at(97), x_at(3)), (0.0, 0.0, 1.5));
        assert_eq!((y_at(0), y_at(89), y_at(88)), (-44.0, -44.0, 44.0));
    }

    #[test]
    fn the_kernel_declares_what_it_takes() {
        assert!(
            SAXPY.contains(
                "extern \"C\" __global__ void saxpy(unsigned long long n, float a, const float* x, float* y)"
            )
        );
        assert_eq!(PARAMS.len(), 4);
    }

    #[test]
    fn output_json() {
        let out = Output { n: 3, checked: true, sample: vec![(0, -44.0), (2, -41.0)], kernel_ms: 0.5 };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"n":3,"checked":true,"sample":[[0,-44.0],[2,-41.0]],"kernel_ms":0.5}"#
        );
    }
}
