//! A faulting kernel ends the context: `device-lost`, remembered by the
//! session. Its own test binary (its own process), since the primary context
//! it kills is shared by everything else in the process.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use std::time::Duration;

use beamlet_gpu::cuda::CudaBackend;
use beamlet_gpu::{DType, GpuError, KernelArg, KernelSource, LaunchConfig, ParamKind, Session};

const WAIT: Duration = Duration::from_secs(30);

/// A session on GPU 0, or `None` (after saying so) when there is none.
fn gpu() -> Option<Session> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(Session::new(Arc::new(backend), 0, 1 << 30).expect("open a stream")),
        Err(e) => {
            if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_GPU=1 but the CUDA backend is unavailable: {e}");
            }
            eprintln!("==== no GPU: CUDA tests skipped ({e}) ====");
            None
        }
    }
}

#[test]
fn out_of_bounds_kernel_write_is_device_lost() {
    let Some(mut gpu) = gpu() else { return };
    let source =
        KernelSource::CudaC(r#"extern "C" __global__ void scribble(float* out) { out[1ull << 40] = 1.0f; }"#.into());
    let kernel = gpu.compile(&source, "scribble", &[ParamKind::Buffer]).unwrap();
    let out = gpu.alloc(DType::F32, 1).unwrap();
    let one = LaunchConfig { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 };
    let launched = gpu.launch(kernel, &one, &[KernelArg::Buffer(out)]);
    let result = launched.and_then(|()| gpu.synchronize(WAIT));
    assert!(matches!(result, Err(GpuError::DeviceLost(_))), "{result:?}");
    assert!(gpu.is_lost());
    assert!(matches!(gpu.relu(out), Err(GpuError::DeviceLost(_))), "every later call is lost too");
}
