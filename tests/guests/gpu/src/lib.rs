//! Test fixture: exercises the GPU interface's checks from a guest. Every
//! GPU error comes back as `{"error": "<Variant>", "message": ...}` so tests
//! can tell them apart.
//!
//! - `{"mode": "info"}`: the device as the worker sees it
//! - `{"mode": "alloc", "bytes": N}`: allocates and frees N bytes of f32
//! - `{"mode": "hold", "bytes": N}`: allocates N bytes and keeps them for the
//!   instance's life (so the quota stays spent across tasks)
//! - `{"mode": "hold-then-trap", "bytes": N}`: allocates, then panics (the
//!   instance, and with it the allocation, goes)
//! - `{"mode": "oob"}`: reads past a buffer's end
//! - `{"mode": "gemm-mismatch"}`: a GEMM whose leading dimension is too small
//! - `{"mode": "kernel"}`: compiles a CUDA C kernel (unavailable on the CPU backend)
//! - `{"mode": "gemm"}`: a 2x2 f32 GEMM whose result is known
//! - `{"mode": "fault"}`: launches a kernel that writes far past its buffer
//! - `{"mode": "endless"}`: launches a kernel that never ends and waits for it
//!   (CUDA: a sticky error, so `device-lost` and a replaced replica)
//! - `{"mode": "busy", "n": N, "iters": K}`: queues K f32 GEMMs of N x N and
//!   waits up to 10 minutes for them (a task to cancel while it waits)

use std::sync::Mutex;

use beamlet_sdk::gpu::{Arg, Buffer, Device, Gemm, GpuError, Kernel, LaunchConfig, Param};
use beamlet_sdk::{Context, Error};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Input {
    mode: String,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    n: u64,
    #[serde(default)]
    iters: u32,
}

/// What `hold` keeps alive.
static HELD: Mutex<Vec<Buffer<f32>>> = Mutex::new(Vec::new());

fn report(error: GpuError) -> Value {
    let variant = format!("{error:?}");
    let variant = variant.split('(').next().unwrap_or_default().to_owned();
    json!({"error": variant, "message": error.message()})
}

fn run(input: &Input) -> Result<Value, GpuError> {
    Ok(match input.mode.as_str() {
        "info" => {
            let info = Device::info()?;
            json!({"name": info.name, "backend": info.backend, "memory": info.memory_bytes,
                   "quota": info.quota_bytes, "used": info.used_bytes})
        }
        "alloc" => {
            let buffer = Buffer::<f32>::zeros(input.bytes / 4)?;
            json!({"len": buffer.len()})
        }
        "hold" => {
            HELD.lock().unwrap().push(Buffer::<f32>::zeros(input.bytes / 4)?);
            json!({"held": HELD.lock().unwrap().len(), "used": Device::info()?.used_bytes})
        }
        "hold-then-trap" => {
            HELD.lock().unwrap().push(Buffer::<f32>::zeros(input.bytes / 4)?);
            panic!("trapping while holding GPU memory");
        }
        "oob" => {
            let buffer = Buffer::<f32>::zeros(16)?;
            json!({"read": buffer.read(10, 10)?})
        }
        "gemm-mismatch" => {
            let (a, b, c) = (Buffer::<f32>::zeros(4)?, Buffer::<f32>::zeros(4)?, Buffer::<f32>::zeros(4)?);
            Gemm::new(2, 2, 2).lda(1).run(&a, &b, &c)?;
            json!({"ran": true})
        }
        "kernel" => {
            let source = r#"extern "C" __global__ void noop(float *x) {}"#;
            let kernel = Kernel::cuda_c(source, "noop", &[Param::Buffer])?;
            json!({"compiled": kernel.entry()})
        }
        "fault" => {
            let source = r#"extern "C" __global__ void smash(float *x) { x[1ull << 40] = 1.0f; }"#;
            run_one_thread(source, "smash", 30)?;
            json!({"survived": true})
        }
        "endless" => {
            let source = r#"extern "C" __global__ void forever(float *x) {
                volatile float *p = x;
                while (true) { p[0] += 1.0f; }
            }"#;
            run_one_thread(source, "forever", 600)?;
            json!({"finished": true})
        }
        "gemm" => {
            // Column-major: a = [[1, 3], [2, 4]], b = identity * 2.
            let a = Buffer::from_slice(&[1.0f32, 2.0, 3.0, 4.0])?;
            let b = Buffer::from_slice(&[2.0f32, 0.0, 0.0, 2.0])?;
            let c = Buffer::<f32>::zeros(4)?;
            Gemm::new(2, 2, 2).run(&a, &b, &c)?;
            json!({"c": c.to_vec()?})
        }
        "busy" => {
            let elements = input.n * input.n;
            let (a, b, c) =
                (Buffer::<f32>::zeros(elements)?, Buffer::<f32>::zeros(elements)?, Buffer::<f32>::zeros(elements)?);
            for _ in 0..input.iters {
                Gemm::new(input.n, input.n, input.n).run(&a, &b, &c)?;
            }
            beamlet_sdk::gpu::synchronize(std::time::Duration::from_secs(600))?;
            json!({"ran": input.iters})
        }
        other => json!({"error": "UnknownMode", "message": other}),
    })
}

/// Compiles `entry(float *x)`, runs it on one thread over a small buffer
/// and waits up to `wait_s` seconds for it.
fn run_one_thread(source: &str, entry: &str, wait_s: u64) -> Result<(), GpuError> {
    let kernel = Kernel::cuda_c(source, entry, &[Param::Buffer])?;
    let buffer = Buffer::<f32>::zeros(16)?;
    kernel.launch(LaunchConfig::new((1, 1, 1), (1, 1, 1)), &[Arg::buffer(&buffer)])?;
    beamlet_sdk::gpu::synchronize(std::time::Duration::from_secs(wait_s))
}

fn handle(_ctx: &Context, input: Input) -> Result<Value, Error> {
    Ok(run(&input).unwrap_or_else(report))
}

beamlet_sdk::export!(handle);
