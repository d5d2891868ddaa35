//! The CUDA backend against the CPU backend, on a real GPU. Without one
//! (no driver, no device) every test says so loudly and passes, unless
//! `REQUIRE_GPU=1`, where it fails. The faulting-kernel test lives in
//! `cuda_lost.rs`: a process has one primary context per GPU, and a sticky
//! error would end it for every test running beside it.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use beamlet_gpu::cpu::CpuBackend;
use beamlet_gpu::{
    BinaryOp, BufferId, DType, GemmArgs, GpuError, KernelArg, KernelSource, LaunchConfig, ParamKind, Session,
};
use common::{WAIT, gpu};
use half::{bf16, f16};

fn cpu() -> Session {
    Session::new(Arc::new(CpuBackend::new("cpu", 1 << 30)), 0, 1 << 30).unwrap()
}

fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| match dtype {
            DType::F32 => v.to_le_bytes().to_vec(),
            DType::F16 => f16::from_f32(*v).to_le_bytes().to_vec(),
            DType::BF16 => bf16::from_f32(*v).to_le_bytes().to_vec(),
        })
        .collect()
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn upload(session: &mut Session, dtype: DType, values: &[f32]) -> BufferId {
    let id = session.alloc(dtype, values.len() as u64).unwrap();
    session.write(id, 0, &encode(dtype, values)).unwrap();
    id
}

fn download(session: &mut Session, id: BufferId) -> Vec<f32> {
    let (dtype, len) = session.describe(id).unwrap();
    decode(dtype, &session.read(id, 0, len).unwrap())
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn buffers_round_trip_zeroed_and_bounded() {
    let Some(mut gpu) = gpu() else { return };
    let id = gpu.alloc(DType::F32, 1000).unwrap();
    assert_eq!(download(&mut gpu, id), vec![0.0; 1000], "zeroed");
    let data = values(1000, 1);
    gpu.write(id, 0, &encode(DType::F32, &data)).unwrap();
    gpu.write(id, 10, &encode(DType::F32, &[42.0, 43.0])).unwrap();
    let mut want = data.clone();
    want[10..12].copy_from_slice(&[42.0, 43.0]);
    assert_eq!(download(&mut gpu, id), want);
    assert_eq!(decode(DType::F32, &gpu.read(id, 10, 2).unwrap()), vec![42.0, 43.0]);
    assert!(matches!(gpu.read(id, 999, 2), Err(GpuError::OutOfBounds(_))));
    assert!(matches!(gpu.write(id, 0, &[0; 3]), Err(GpuError::InvalidArgument(_))));
    // Large writes (past the async limit) and empty buffers.
    let big = values(1 << 20, 2);
    let big_id = upload(&mut gpu, DType::F32, &big);
    assert_eq!(download(&mut gpu, big_id), big);
    let empty = gpu.alloc(DType::BF16, 0).unwrap();
    assert_eq!(gpu.read(empty, 0, 0).unwrap(), Vec::<u8>::new());
    gpu.free(id).unwrap();
    gpu.free(big_id).unwrap();
    gpu.synchronize(WAIT).unwrap();
    assert_eq!(gpu.used_bytes(), 0);
}

#[test]
fn gemm_matches_the_cpu() {
    let Some(mut gpu) = gpu() else { return };
    let mut cpu = cpu();
    let (m, n, k) = (67u64, 45u64, 129u64);
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 2e-2), (DType::F16, 5e-3)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true)] {
            let a_values = values((m * k) as usize, 3);
            let b_values = values((k * n) as usize, 4);
            let c_values = values((m * n) as usize, 5);
            let run = |session: &mut Session| {
                let a = upload(session, dtype, &a_values);
                let b = upload(session, dtype, &b_values);
                let c = upload(session, dtype, &c_values);
                let args = GemmArgs {
                    m,
                    n,
                    k,
                    alpha: 0.5,
                    beta: 2.0,
                    a,
                    lda: if trans_a { k } else { m },
                    trans_a,
                    b,
                    ldb: if trans_b { n } else { k },
                    trans_b,
                    c,
                    ldc: m,
                };
                session.gemm(&args).unwrap();
                download(session, c)
            };
            let (got, want) = (run(&mut gpu), run(&mut cpu));
            assert_close(&format!("{dtype:?} gemm t{trans_a}/{trans_b}"), &got, &want, tolerance);
        }
    }
    let a = gpu.alloc(DType::F32, 4).unwrap();
    let b = gpu.alloc(DType::BF16, 4).unwrap();
    let c = gpu.alloc(DType::F32, 4).unwrap();
    let args = GemmArgs {
        m: 2,
        n: 2,
        k: 2,
        alpha: 1.0,
        beta: 0.0,
        a,
        lda: 2,
        trans_a: false,
        b,
        ldb: 2,
        trans_b: false,
        c,
        ldc: 2,
    };
    assert!(matches!(gpu.gemm(&args), Err(GpuError::InvalidArgument(_))), "dtype mismatch");
}

#[test]
fn mlp_ops_match_the_cpu() {
    let Some(mut gpu) = gpu() else { return };
    let mut cpu = cpu();
    let (rows, cols) = (300u64, 7u64);
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let x_values = values((rows * cols) as usize, 6);
        let y_values = values((rows * cols) as usize, 7);
        let bias_values = values(rows as usize, 8);
        let run = |session: &mut Session| {
            let x = upload(session, dtype, &x_values);
            let y = upload(session, dtype, &y_values);
            let bias = upload(session, dtype, &bias_values);
            let out = session.alloc(dtype, rows * cols).unwrap();
            session.elementwise(BinaryOp::Mul, x, y, out).unwrap();
            session.elementwise(BinaryOp::Add, out, x, out).unwrap();
            session.add_bias(out, bias, rows, cols).unwrap();
            session.relu(out).unwrap();
            let after_relu = download(session, out);
            session.softmax_columns(out, rows, cols).unwrap();
            (after_relu, download(session, out))
        };
        let (got, want) = (run(&mut gpu), run(&mut cpu));
        assert_close(&format!("{dtype:?} mul/add/bias/relu"), &got.0, &want.0, tolerance);
        assert_close(&format!("{dtype:?} softmax"), &got.1, &want.1, tolerance);
    }
}

const SAXPY: &str = r#"
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}"#;

#[test]
fn custom_cuda_c_kernel() {
    let Some(mut gpu) = gpu() else { return };
    let params = [ParamKind::F32, ParamKind::Buffer, ParamKind::Buffer, ParamKind::U64];
    let kernel = gpu.compile(&KernelSource::CudaC(SAXPY.into()), "saxpy", &params).unwrap();
    let again = gpu.compile(&KernelSource::CudaC(SAXPY.into()), "saxpy", &params).unwrap();
    assert_eq!(kernel, again, "compiled once, cached");
    let n = 10_000;
    let (x_values, y_values) = (values(n, 9), values(n, 10));
    let x = upload(&mut gpu, DType::F32, &x_values);
    let y = upload(&mut gpu, DType::F32, &y_values);
    let config = LaunchConfig { grid: [(n as u32).div_ceil(256), 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 };
    let args = [KernelArg::F32(3.0), KernelArg::Buffer(x), KernelArg::Buffer(y), KernelArg::U64(n as u64)];
    gpu.launch(kernel, &config, &args).unwrap();
    gpu.synchronize(WAIT).unwrap();
    let want: Vec<f32> = x_values.iter().zip(&y_values).map(|(x, y)| 3.0 * x + y).collect();
    assert_close("saxpy", &download(&mut gpu, y), &want, 1e-6);

    let wrong = [KernelArg::F32(3.0), KernelArg::Buffer(x), KernelArg::Buffer(y)];
    assert!(matches!(gpu.launch(kernel, &config, &wrong), Err(GpuError::InvalidArgument(_))), "argument count");
    let declared_wrong = [ParamKind::F32, ParamKind::Buffer, ParamKind::Buffer, ParamKind::U32];
    let err = gpu.compile(&KernelSource::CudaC(SAXPY.into()), "saxpy", &declared_wrong).unwrap_err();
    assert!(matches!(err, GpuError::InvalidArgument(_)), "declared params must match the kernel's: {err}");

    // Another worker on the same replica cannot launch this worker's kernel
    // handle or pass its buffers.
    let mut other = Session::new(gpu.backend().clone(), 1, 1 << 20).unwrap();
    assert!(matches!(other.launch(kernel, &config, &args), Err(GpuError::InvalidArgument(_))));
    let theirs = other.compile(&KernelSource::CudaC(SAXPY.into()), "saxpy", &params).unwrap();
    let err = other.launch(theirs, &config, &args).unwrap_err();
    assert!(matches!(&err, GpuError::InvalidArgument(m) if m.contains("another worker")), "{err}");
}

const PTX_FILL: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry fill(.param .u64 out, .param .f32 value, .param .u32 n)
{
    .reg .pred %p;
    .reg .b32 %r<5>;
    .reg .f32 %f;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    ld.param.f32 %f, [value];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r2, %r2, %r3, %r4;
    setp.ge.u32 %p, %r2, %r1;
    @%p bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r2, 4;
    add.s64 %rd2, %rd2, %rd3;
    st.global.f32 [%rd2], %f;
DONE:
    ret;
}
"#;

#[test]
fn custom_ptx_kernel() {
    let Some(mut gpu) = gpu() else { return };
    let params = [ParamKind::Buffer, ParamKind::F32, ParamKind::U32];
    let kernel = gpu.compile(&KernelSource::Ptx(PTX_FILL.into()), "fill", &params).unwrap();
    let out = gpu.alloc(DType::F32, 1000).unwrap();
    let config = LaunchConfig { grid: [4, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 };
    gpu.launch(kernel, &config, &[KernelArg::Buffer(out), KernelArg::F32(7.5), KernelArg::U32(1000)]).unwrap();
    assert_eq!(download(&mut gpu, out), vec![7.5; 1000]);
}

#[test]
fn bad_kernels_and_launches_are_refused() {
    let Some(mut gpu) = gpu() else { return };
    let bad = KernelSource::CudaC("extern \"C\" __global__ void broken( { }".into());
    let err = gpu.compile(&bad, "broken", &[]).unwrap_err();
    assert!(matches!(&err, GpuError::CompileFailed(log) if !log.is_empty()), "{err}");
    let err = gpu.compile(&KernelSource::Ptx("not ptx at all".into()), "k", &[]).unwrap_err();
    assert!(matches!(err, GpuError::CompileFailed(_)), "{err}");
    let err = gpu.compile(&KernelSource::CudaC(SAXPY.into()), "missing", &[]).unwrap_err();
    assert!(matches!(err, GpuError::CompileFailed(_)), "{err}");

    let empty = KernelSource::CudaC("extern \"C\" __global__ void empty() {}".into());
    let kernel = gpu.compile(&empty, "empty", &[]).unwrap();
    for config in [
        LaunchConfig { grid: [0, 1, 1], block: [1, 1, 1], shared_mem_bytes: 0 },
        LaunchConfig { grid: [1, 1, 1], block: [2048, 1, 1], shared_mem_bytes: 0 },
        LaunchConfig { grid: [1, 1 << 20, 1], block: [1, 1, 1], shared_mem_bytes: 0 },
        LaunchConfig { grid: [1, 1, 1], block: [1, 1, 1], shared_mem_bytes: 1 << 30 },
    ] {
        assert!(matches!(gpu.launch(kernel, &config, &[]), Err(GpuError::InvalidArgument(_))), "{config:?}");
    }
    gpu.launch(kernel, &LaunchConfig { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 }, &[]).unwrap();
    gpu.synchronize(WAIT).unwrap();
    assert!(!gpu.is_lost());
}

#[test]
fn synchronize_times_out_on_a_long_kernel() {
    let Some(mut gpu) = gpu() else { return };
    let spin = KernelSource::CudaC(
        r#"extern "C" __global__ void spin(unsigned long long cycles) {
            long long start = clock64();
            while (clock64() - start < (long long)cycles) {}
        }"#
        .into(),
    );
    let kernel = gpu.compile(&spin, "spin", &[ParamKind::U64]).unwrap();
    let one = LaunchConfig { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 };
    // About a second at 1-2 GHz.
    gpu.launch(kernel, &one, &[KernelArg::U64(2_000_000_000)]).unwrap();
    assert_eq!(gpu.synchronize(Duration::from_millis(20)), Err(GpuError::Timeout));
    // A stop check (a cancelled task) ends even an unbounded wait.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    gpu.set_stop(Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(gpu.synchronize(Duration::MAX), Err(GpuError::Timeout));
    stop.store(false, std::sync::atomic::Ordering::Relaxed);
    gpu.synchronize(WAIT).unwrap();
}
