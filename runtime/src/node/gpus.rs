//! The GPUs a node offers GPU apps (`serve --gpu-backend`, `--gpus`).

use anyhow::{Result, bail};

use crate::config::format_size;
use crate::ipc::GpuBackendKind;
use crate::supervisor::{Gpus, NodeGpu};

/// How `beamlet serve` finds its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum GpuBackendChoice {
    /// The NVIDIA GPUs NVML reports, if any; none otherwise.
    Auto,
    /// The NVIDIA GPUs NVML reports; an error without them.
    Cuda,
    /// `--gpus` GPUs backed by the CPU backend, for machines without a GPU.
    Cpu,
}

/// The node's GPUs: at most `count` of them (all by default; one CPU-backed
/// GPU of `cpu_memory` bytes for `cpu`).
pub(crate) fn discover(choice: GpuBackendChoice, count: Option<u32>, cpu_memory: u64) -> Result<Gpus> {
    let cuda = || -> Result<Gpus> {
        let mut devices: Vec<NodeGpu> = beamlet_gpu::discover::list()?
            .into_iter()
            .map(|gpu| NodeGpu {
                index: gpu.index,
                name: gpu.name,
                memory_bytes: gpu.memory_bytes,
                uuid: Some(gpu.uuid),
            })
            .collect();
        devices.truncate(count.map_or(usize::MAX, |n| n as usize));
        Ok(Gpus { backend: Some(GpuBackendKind::Cuda), devices })
    };
    let gpus = match choice {
        GpuBackendChoice::Cpu => {
            let devices = (0..count.unwrap_or(1))
                .map(|index| NodeGpu {
                    index,
                    name: format!("cpu-backend-{index}"),
                    memory_bytes: cpu_memory,
                    uuid: None,
                })
                .collect();
            Gpus { backend: Some(GpuBackendKind::Cpu), devices }
        }
        GpuBackendChoice::Cuda => {
            let gpus = cuda()?;
            if gpus.devices.is_empty() {
                bail!("--gpu-backend cuda: NVML found no NVIDIA GPU on this machine");
            }
            gpus
        }
        GpuBackendChoice::Auto => match cuda() {
            Ok(gpus) if !gpus.devices.is_empty() => gpus,
            Ok(_) | Err(_) => {
                tracing::info!(
                    "no NVIDIA GPU found; GPU apps will wait (serve them on the CPU with --gpu-backend cpu --gpus 1)"
                );
                Gpus::default()
            }
        },
    };
    for gpu in &gpus.devices {
        tracing::info!(index = gpu.index, name = %gpu.name, uuid = gpu.uuid.as_deref().unwrap_or("-"), memory = %format_size(gpu.memory_bytes), backend = ?gpus.backend, "GPU");
    }
    Ok(gpus)
}
