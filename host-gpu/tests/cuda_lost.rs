//! A faulting kernel ends the context: `device-lost`, remembered by the
//! session. Its own test binary (its own process), since the primary context
//! it kills is shared by everything else in the process.
#![cfg(feature = "cuda")]

mod common;

use common::{WAIT, gpu};

use beamlet_gpu::{DType, GpuError, KernelArg, KernelSource, LaunchConfig, ParamKind};

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
