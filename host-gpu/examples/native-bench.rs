//! The native reference for the GPU benchmarks (BENCHMARKS.md, GPU section):
//! cudarc called directly, the same cuBLAS settings as beamlet's CUDA
//! backend, and — side by side, in the same process and minute — the same ops
//! through `beamlet_gpu::Session` on `CudaBackend` (the host side of a guest
//! call, without wasm).
//!
//! Prints one JSON object: mean ms per op (gemm, saxpy: warm-up, runs queued
//! back to back, one synchronize, as the guest times them) and median us
//! per launch over rounds of 512,
//! TFLOP/s and GB/s, and the backend/native ratios. GEMM results are checked
//! against an f64 CPU dot product on sampled entries; a mismatch fails.
//!
//! Build here (no CUDA needed): `cargo build --release -p beamlet-gpu --example gpu-native-bench`,
//! then copy `target/release/examples/gpu-native-bench` to the GPU machine.
//! Usage: `gpu-native-bench [--quick]` (`--quick`: 2048^3 gemm, 2^22 saxpy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use beamlet_gpu::cuda::CudaBackend;
use beamlet_gpu::{Backend, DType, GemmArgs, KernelArg, KernelSource, LaunchConfig, ParamKind, Session};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig as CudaLaunch, PushKernelArg};
use half::bf16;

type Error = Box<dyn std::error::Error>;

const SAXPY: &str = r#"extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}"#;
const EMPTY: &str = r#"extern "C" __global__ void empty() {}"#;
/// Runs per timed op, as `scripts/bench-gpu` asks the guest for them.
const GEMM_BF16_ITERS: u32 = 20;
const GEMM_F32_ITERS: u32 = 10;
const SAXPY_ITERS: u32 = 20;
/// Launches per round: rounds never fill the driver's launch queue (which
/// would pace the calls by the GPU, not the host).
const ROUND: usize = 512;
const ROUNDS: usize = 21;
const WAIT: Duration = Duration::from_secs(60);

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Mean seconds per `op`, timed as the guest times it (tests/guests/gpubench):
/// one run and a `sync` to warm up, then `iters` runs queued back to back
/// and one `sync`.
fn timed<T>(
    state: &mut T,
    iters: u32,
    op: impl Fn(&mut T) -> Result<(), Error>,
    sync: impl Fn(&mut T) -> Result<(), Error>,
) -> Result<f64, Error> {
    op(state)?;
    sync(state)?;
    let start = Instant::now();
    for _ in 0..iters {
        op(state)?;
    }
    sync(state)?;
    Ok(start.elapsed().as_secs_f64() / f64::from(iters))
}

/// Median host microseconds per `launch` over rounds of [`ROUND`], the
/// queue drained (`sync`) between rounds and not counted; the first round
/// warms up.
fn per_launch_us<T>(
    state: &mut T,
    launch: impl Fn(&mut T) -> Result<(), Error>,
    sync: impl Fn(&mut T) -> Result<(), Error>,
) -> Result<f64, Error> {
    let mut samples = Vec::new();
    for round in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..ROUND {
            launch(state)?;
        }
        if round > 0 {
            samples.push(start.elapsed().as_secs_f64() / ROUND as f64 * 1e6);
        }
        sync(state)?;
    }
    Ok(median(samples))
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The guest's GEMM inputs (`value` in tests/guests/gpubench/src/data.rs):
/// multiples of 1/8 in [-0.75, 0.75], `a` with salt 1 and `b` with salt 2.
/// A tensor-core GEMM's speed depends on its data (fewer bit flips draw less
/// power and keep the clocks up: on an H100 "predictable" inputs run several
/// percent faster than random ones), so the native reference must multiply
/// the very matrices the guest does, or the guest/native ratio measures the
/// data, not beamlet.
fn gemm_values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64).map(|i| (i.wrapping_mul(7).wrapping_add(salt.wrapping_mul(3)) % 13) as f32 / 8.0 - 0.75).collect()
}

/// Checks sampled entries of column-major `c = a * b` (n x n) against f64:
/// each may be off by the output's rounding (`dtype`, relative to the entry)
/// plus f32 accumulation error (relative to the sum of |products|). With
/// [`gemm_values`] the f32 sums are exact, so only the rounding counts.
fn check_gemm(what: &str, dtype: DType, n: usize, a: &[f32], b: &[f32], c: &[f32]) -> Result<(), Error> {
    // bf16 keeps 8 significant bits: rounding costs at most 2^-9 of the
    // entry; 2^-7 leaves room for accumulation in a different order.
    let (rounding, accumulation) = if dtype == DType::F32 { (0.0, 1e-4) } else { (1.0 / 128.0, 1e-3) };
    let picks = values(64, 7);
    for (s, t) in picks.iter().zip(picks.iter().rev()) {
        let i = ((s + 1.0) / 2.0 * n as f32) as usize % n;
        let j = ((t + 1.0) / 2.0 * n as f32) as usize % n;
        let (mut exact, mut scale) = (0f64, 0f64);
        for k in 0..n {
            let p = f64::from(a[i + k * n]) * f64::from(b[k + j * n]);
            exact += p;
            scale += p.abs();
        }
        let got = f64::from(c[i + j * n]);
        if (got - exact).abs() > rounding * exact.abs() + accumulation * scale.max(1.0) {
            return Err(format!("{what}: c[{i},{j}] = {got}, expected {exact} (scale {scale})").into());
        }
    }
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}

fn probe() -> Result<(), Error> {
    // cudarc panics on a missing library: look first.
    let found = unsafe {
        [
            ("libcuda (the NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc (CUDA 13)", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas (CUDA 13)", cudarc::cublas::sys::is_culib_present()),
        ]
    };
    for (name, present) in found {
        if !present {
            return Err(format!("no GPU here: {name} was not found (set LD_LIBRARY_PATH?)").into());
        }
    }
    if CudaContext::device_count().unwrap_or(0) < 1 {
        return Err("no GPU here: the driver reports no CUDA device".into());
    }
    Ok(())
}

struct Native {
    stream: Arc<CudaStream>,
    blas: blas_sys::cublasHandle_t,
}

impl Native {
    /// `c = a * b`, square n, as the backend calls cuBLAS.
    fn gemm(&self, n: i32, a: u64, b: u64, c: u64, dtype: DType) -> Result<(), Error> {
        let (alpha, beta) = (1f32, 0f32);
        let op = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        unsafe {
            match dtype {
                DType::F32 => blas::sgemm(self.blas, op, op, n, n, n, &alpha, a as _, n, b as _, n, &beta, c as _, n)?,
                _ => blas::gemm_ex(
                    self.blas,
                    op,
                    op,
                    n,
                    n,
                    n,
                    &alpha as *const f32 as _,
                    a as _,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    n,
                    b as _,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    n,
                    &beta as *const f32 as _,
                    c as _,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    n,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?,
            }
        }
        Ok(())
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu-native-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 2048 } else { 8192 };
    let saxpy_n: usize = if quick { 1 << 22 } else { 1 << 26 };
    probe()?;

    let started = Instant::now();
    let ctx = CudaContext::new(0)?;
    let context_s = started.elapsed().as_secs_f64();
    let stream = ctx.new_stream()?;
    let handle = blas::create_handle()?;
    let (major, minor) = ctx.compute_capability()?;
    // As beamlet-gpu's backend's workspace (which cuBLAS's algorithm choice
    // depends on): 32 MiB on Hopper and later, 4 MiB before. It outlives the
    // handle (dropped at the end of `run`).
    let workspace_bytes: usize = if major >= 9 { 32 << 20 } else { 4 << 20 };
    let workspace = stream.alloc_zeros::<u8>(workspace_bytes)?;
    // As beamlet-gpu's backend: f16/bf16 accumulate in f32 all the way, and
    // the workspace is set after the stream (setting a stream resets it).
    unsafe {
        cudarc::cublas::sys::cublasSetMathMode(
            handle,
            cudarc::cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
        )
        .result()?;
        blas::set_stream(handle, stream.cu_stream() as _)?;
        let (workspace_ptr, _record) = workspace.device_ptr(&stream);
        cudarc::cublas::sys::cublasSetWorkspace_v2(handle, workspace_ptr as *mut std::ffi::c_void, workspace_bytes)
            .result()?;
    }
    // The same target as the backend's NVRTC: this device's compute capability.
    let compile = |source: &str| {
        let options = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source, options)
    };
    let native = Native { stream: stream.clone(), blas: handle };

    let a = gemm_values(n * n, 1);
    let b = gemm_values(n * n, 2);
    let flops = 2.0 * (n as f64).powi(3);
    let mut report = Vec::new();
    report.push(format!("\"device\": {:?}", ctx.name()?));
    // Which libraries were loaded: NVRTC newer than the driver makes PTX it cannot load.
    let (mut driver, mut nvrtc_major, mut nvrtc_minor, mut cublas) = (0, 0, 0, 0);
    // SAFETY: `probe` found the libraries; plain out-parameters.
    unsafe {
        cudarc::driver::sys::cuDriverGetVersion(&mut driver);
        cudarc::nvrtc::sys::nvrtcVersion(&mut nvrtc_major, &mut nvrtc_minor);
        cudarc::cublas::sys::cublasGetVersion_v2(handle, &mut cublas);
    }
    report.push(format!(
        "\"driver_cuda\": \"{}.{}\", \"nvrtc\": \"{nvrtc_major}.{nvrtc_minor}\", \"cublas\": {cublas}",
        driver / 1000,
        driver % 1000 / 10
    ));
    report.push(format!("\"n\": {n}, \"saxpy_n\": {saxpy_n}, \"context_s\": {context_s:.3}"));

    // Native GEMMs.
    let mut native_ms = std::collections::HashMap::new();
    for dtype in [DType::BF16, DType::F32] {
        let iters = if dtype == DType::F32 { GEMM_F32_ITERS } else { GEMM_BF16_ITERS };
        let time_gemm = |a, b, c| {
            timed(&mut (), iters, |_| native.gemm(n as i32, a, b, c, dtype), |_| Ok(native.stream.synchronize()?))
        };
        let (ms, c) = if dtype == DType::F32 {
            let (da, db) = (stream.clone_htod(&a)?, stream.clone_htod(&b)?);
            let mut dc = stream.alloc_zeros::<f32>(n * n)?;
            let (pa, pb, pc) = (da.device_ptr(&stream).0, db.device_ptr(&stream).0, dc.device_ptr_mut(&stream).0);
            let secs = time_gemm(pa, pb, pc)?;
            (secs * 1e3, stream.clone_dtoh(&dc)?)
        } else {
            let bits = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
            let (da, db) = (stream.clone_htod(&bits(&a))?, stream.clone_htod(&bits(&b))?);
            let mut dc = stream.alloc_zeros::<u16>(n * n)?;
            let (pa, pb, pc) = (da.device_ptr(&stream).0, db.device_ptr(&stream).0, dc.device_ptr_mut(&stream).0);
            let secs = time_gemm(pa, pb, pc)?;
            let c: Vec<f32> = stream.clone_dtoh(&dc)?.into_iter().map(|h| bf16::from_bits(h).to_f32()).collect();
            (secs * 1e3, c)
        };
        let (ra, rb): (Vec<f32>, Vec<f32>) = if dtype == DType::F32 {
            (a.clone(), b.clone())
        } else {
            (
                a.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
                b.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
            )
        };
        check_gemm(&format!("native {dtype:?} gemm"), dtype, n, &ra, &rb, &c)?;
        native_ms.insert(dtype, ms);
    }

    // Native saxpy (NVRTC) and tiny-kernel launches.
    let compiled = Instant::now();
    let module = ctx.load_module(compile(SAXPY)?)?;
    let compile_ms = compiled.elapsed().as_secs_f64() * 1e3;
    let saxpy = module.load_function("saxpy")?;
    let x = stream.clone_htod(&values(saxpy_n, 3))?;
    let mut y = stream.clone_htod(&values(saxpy_n, 4))?;
    let config = CudaLaunch::for_num_elems(saxpy_n as u32);
    let config = CudaLaunch { block_dim: (256, 1, 1), grid_dim: ((saxpy_n as u32).div_ceil(256), 1, 1), ..config };
    let (alpha, count) = (2f32, saxpy_n as u64);
    let native_saxpy_ms = timed(
        &mut y,
        SAXPY_ITERS,
        |y| {
            let mut launch = stream.launch_builder(&saxpy);
            launch.arg(&alpha).arg(&x).arg(y).arg(&count);
            unsafe { launch.launch(config)? };
            Ok(())
        },
        |_| Ok(stream.synchronize()?),
    )? * 1e3;
    let empty = ctx.load_module(compile(EMPTY)?)?.load_function("empty")?;
    let one = CudaLaunch { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    let native_launch_us = per_launch_us(
        &mut (),
        |_| {
            unsafe { stream.launch_builder(&empty).launch(one)? };
            Ok(())
        },
        |_| Ok(stream.synchronize()?),
    )?;
    drop((x, y));
    unsafe { blas::destroy_handle(handle)? };

    // The same through beamlet's backend and a worker session.
    let backend: Arc<dyn Backend> = Arc::new(CudaBackend::new(0)?);
    let mut session = Session::new(backend.clone(), 0, u64::MAX)?;
    session.set_wait_limit(WAIT);
    let mut backend_ms = std::collections::HashMap::new();
    for dtype in [DType::BF16, DType::F32] {
        let iters = if dtype == DType::F32 { GEMM_F32_ITERS } else { GEMM_BF16_ITERS };
        let len = (n * n) as u64;
        let (ba, bb, bc) = (session.alloc(dtype, len)?, session.alloc(dtype, len)?, session.alloc(dtype, len)?);
        let encode = if dtype == DType::F32 { f32_bytes } else { bf16_bytes };
        session.write(ba, 0, &encode(&a))?;
        session.write(bb, 0, &encode(&b))?;
        let args = GemmArgs {
            m: n as u64,
            n: n as u64,
            k: n as u64,
            alpha: 1.0,
            beta: 0.0,
            a: ba,
            lda: n as u64,
            trans_a: false,
            b: bb,
            ldb: n as u64,
            trans_b: false,
            c: bc,
            ldc: n as u64,
        };
        let ms = timed(&mut session, iters, |s| Ok(s.gemm(&args)?), |s| Ok(s.synchronize(WAIT)?))? * 1e3;
        let bytes = session.read(bc, 0, len)?;
        let c: Vec<f32> = if dtype == DType::F32 {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        } else {
            bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        };
        let (ra, rb): (Vec<f32>, Vec<f32>) = if dtype == DType::F32 {
            (a.clone(), b.clone())
        } else {
            (
                a.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
                b.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
            )
        };
        check_gemm(&format!("backend {dtype:?} gemm"), dtype, n, &ra, &rb, &c)?;
        for id in [ba, bb, bc] {
            session.free(id)?;
        }
        backend_ms.insert(dtype, ms);
    }
    let kernel = session.compile(
        &KernelSource::CudaC(SAXPY.into()),
        "saxpy",
        &[ParamKind::F32, ParamKind::Buffer, ParamKind::Buffer, ParamKind::U64],
    )?;
    let (bx, by) = (session.alloc(DType::F32, saxpy_n as u64)?, session.alloc(DType::F32, saxpy_n as u64)?);
    session.write(bx, 0, &f32_bytes(&values(saxpy_n, 3)))?;
    let saxpy_config =
        LaunchConfig { grid: [(saxpy_n as u32).div_ceil(256), 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 };
    let saxpy_args =
        [KernelArg::F32(2.0), KernelArg::Buffer(bx), KernelArg::Buffer(by), KernelArg::U64(saxpy_n as u64)];
    let backend_saxpy_ms = timed(
        &mut session,
        SAXPY_ITERS,
        |s| Ok(s.launch(kernel, &saxpy_config, &saxpy_args)?),
        |s| Ok(s.synchronize(WAIT)?),
    )? * 1e3;
    let empty = session.compile(&KernelSource::CudaC(EMPTY.into()), "empty", &[])?;
    let one = LaunchConfig { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 };
    let backend_launch_us = per_launch_us(
        &mut session,
        |session| Ok(session.launch(empty, &one, &[])?),
        |session| Ok(session.synchronize(WAIT)?),
    )?;
    for (name, dtype) in [("bf16", DType::BF16), ("f32", DType::F32)] {
        let (native, ours) = (native_ms[&dtype], backend_ms[&dtype]);
        report.push(format!(
            "\"gemm_{name}\": {{\"native_ms\": {native:.4}, \"native_tflops\": {:.1}, \"backend_ms\": {ours:.4}, \"backend_tflops\": {:.1}, \"backend_vs_native\": {:.3}}}",
            flops / native / 1e9,
            flops / ours / 1e9,
            native / ours
        ));
    }
    let bytes = 12.0 * saxpy_n as f64;
    report.push(format!(
        "\"saxpy\": {{\"native_ms\": {native_saxpy_ms:.4}, \"native_gbps\": {:.0}, \"backend_ms\": {backend_saxpy_ms:.4}, \"backend_gbps\": {:.0}, \"backend_vs_native\": {:.3}, \"nvrtc_compile_ms\": {compile_ms:.1}}}",
        bytes / native_saxpy_ms / 1e6,
        bytes / backend_saxpy_ms / 1e6,
        native_saxpy_ms / backend_saxpy_ms
    ));
    report.push(format!(
        "\"launch\": {{\"native_us\": {native_launch_us:.3}, \"backend_us\": {backend_launch_us:.3}, \"backend_over_native\": {:.2}}}",
        backend_launch_us / native_launch_us
    ));
    println!("{{{}}}", report.join(", "));
    Ok(())
}
