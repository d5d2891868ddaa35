//! The GPUs a node offers GPU apps (`serve --gpu-backend`, `--gpus`).

use anyhow::{Context as _, Result, bail};

use crate::config::{MIN_GPU_MEMORY, format_size};
use crate::ipc::GpuBackendKind;
use crate::supervisor::{Gpus, NodeGpu};

/// More CPU-backed GPUs than this is a typo, not a test setup.
const MAX_CPU_GPUS: u32 = 64;

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
            let count = count.unwrap_or(1);
            if count > MAX_CPU_GPUS {
                bail!("--gpus {count}: at most {MAX_CPU_GPUS} GPUs backed by the CPU backend");
            }
            if count == 0 {
                bail!(
                    "--gpus 0 with --gpu-backend cpu offers no GPU; give --gpus 1 or more, or leave out --gpu-backend"
                );
            }
            if cpu_memory < MIN_GPU_MEMORY {
                bail!(
                    "--cpu-gpu-memory {} is less than {}, the least a worker's GPU memory may be: it is the memory \
                     each CPU-backed GPU offers (e.g. 16Gi)",
                    format_size(cpu_memory),
                    format_size(MIN_GPU_MEMORY)
                );
            }
            // Host memory, taken as guests fill their buffers.
            let machine = crate::supervisor::Capacity::of_this_machine().memory;
            if u64::from(count).saturating_mul(cpu_memory) > machine {
                tracing::warn!(
                    "{count} CPU-backed GPUs of {} each offer more than this machine's {:.1}Gi of memory: GPU \
                     apps that fill them would exhaust it; lower --cpu-gpu-memory",
                    format_size(cpu_memory),
                    machine as f64 / f64::from(1u32 << 30)
                );
            }
            let devices = (0..count)
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
            if count == Some(0) {
                bail!(
                    "--gpus 0 with --gpu-backend cuda offers no GPU; give --gpus 1 or more, or leave out --gpus for all"
                );
            }
            let cpu_hint = "on a machine without one, --gpu-backend cpu --gpus 1 serves GPU apps on the CPU";
            let gpus = cuda().with_context(|| format!("--gpu-backend cuda ({cpu_hint})"))?;
            if gpus.devices.is_empty() {
                bail!("--gpu-backend cuda: NVML found no NVIDIA GPU on this machine ({cpu_hint})");
            }
            gpus
        }
        GpuBackendChoice::Auto => match cuda() {
            Ok(gpus) if !gpus.devices.is_empty() => gpus,
            Ok(_) | Err(_) => {
                let cpu_hint = "serve them on the CPU with --gpu-backend cpu --gpus 1";
                match count {
                    Some(wanted) if wanted > 0 => tracing::warn!(
                        "--gpus {wanted}: no NVIDIA GPU found, so this node runs no GPU app ({cpu_hint})"
                    ),
                    _ => tracing::info!("no NVIDIA GPU found: this node runs no GPU app ({cpu_hint})"),
                }
                Gpus::default()
            }
        },
    };
    for gpu in &gpus.devices {
        tracing::info!(index = gpu.index, name = %gpu.name, uuid = gpu.uuid.as_deref().unwrap_or("-"), memory = %crate::config::describe_size(gpu.memory_bytes), backend = match gpus.backend {
            Some(GpuBackendKind::Cuda) => "cuda",
            Some(GpuBackendKind::Cpu) => "cpu",
            None => "none",
        }, "GPU");
    }
    Ok(gpus)
}
