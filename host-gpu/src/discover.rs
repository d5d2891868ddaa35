//! The GPUs on this machine, as NVML sees them, for placing GPU replicas.
//! NVML (libnvidia-ml) is loaded at run time: without a driver this answers
//! an error, the binary still builds and runs.

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

/// One GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuDevice {
    /// The CUDA/NVML index (`CUDA_VISIBLE_DEVICES` aside, the same order).
    pub index: u32,
    pub name: String,
    /// e.g. `GPU-8d6f...`, stable across reboots.
    pub uuid: String,
    pub memory_bytes: u64,
    /// Percent of the last sample period a kernel ran; `None` when the
    /// device does not report it.
    pub utilization_percent: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("NVML is not available (no NVIDIA driver here?): {0}")]
    NoNvml(String),
    #[error("failed to query GPU {index} through NVML: {source}")]
    Query { index: u32, source: NvmlError },
}

/// Library names tried in order: the versioned one the driver installs, then
/// the development link.
const LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

fn open() -> Result<Nvml, DiscoverError> {
    let mut errors = Vec::new();
    for library in LIBRARIES {
        match Nvml::builder().lib_path(library.as_ref()).init() {
            Ok(nvml) => return Ok(nvml),
            Err(e) => errors.push(format!("{library}: {e}")),
        }
    }
    Err(DiscoverError::NoNvml(errors.join("; ")))
}

/// What a GPU is doing now, as NVML last sampled it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuUsage {
    /// Percent of the last sample period a kernel ran.
    pub utilization_percent: Option<u32>,
    /// Device memory in use by every process on the GPU.
    pub memory_used_bytes: Option<u64>,
}

/// An open NVML session for sampling GPUs while the node runs (at each
/// metrics scrape), so the library is loaded once.
pub struct Monitor {
    nvml: Nvml,
}

impl Monitor {
    pub fn open() -> Result<Self, DiscoverError> {
        Ok(Self { nvml: open()? })
    }

    /// GPU `index`'s usage now; what NVML cannot tell is `None`.
    pub fn usage(&self, index: u32) -> GpuUsage {
        let Ok(device) = self.nvml.device_by_index(index) else {
            return GpuUsage::default();
        };
        GpuUsage {
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            memory_used_bytes: device.memory_info().ok().map(|m| m.used),
        }
    }
}

/// Every GPU NVML reports; an empty list on a driver with no GPUs.
pub fn list() -> Result<Vec<GpuDevice>, DiscoverError> {
    let nvml = open()?;
    let count = nvml.device_count().map_err(|e| DiscoverError::NoNvml(e.to_string()))?;
    (0..count)
        .map(|index| {
            let query = |source| DiscoverError::Query { index, source };
            let device = nvml.device_by_index(index).map_err(query)?;
            Ok(GpuDevice {
                index,
                name: device.name().map_err(query)?,
                uuid: device.uuid().map_err(query)?,
                memory_bytes: device.memory_info().map_err(query)?.total,
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_gpus_or_says_why_not() {
        match super::list() {
            Ok(gpus) => {
                for gpu in &gpus {
                    assert!(!gpu.name.is_empty() && gpu.memory_bytes > 0, "{gpu:?}");
                }
                eprintln!("NVML sees {} GPU(s): {gpus:?}", gpus.len());
            }
            Err(e) => {
                assert!(e.to_string().contains("NVML is not available"), "{e}");
                eprintln!("no NVML here: {e}");
            }
        }
    }

    #[test]
    fn a_monitor_samples_each_gpu_or_says_why_not() {
        match (super::Monitor::open(), super::list()) {
            (Ok(monitor), Ok(gpus)) => {
                for gpu in &gpus {
                    let usage = monitor.usage(gpu.index);
                    assert!(usage.memory_used_bytes.is_some_and(|used| used <= gpu.memory_bytes), "{usage:?}");
                    assert!(usage.utilization_percent.is_none_or(|percent| percent <= 100), "{usage:?}");
                }
                assert_eq!(monitor.usage(u32::MAX), super::GpuUsage::default(), "no such GPU");
            }
            (Err(e), _) => assert!(e.to_string().contains("NVML is not available"), "{e}"),
            (Ok(_), Err(e)) => panic!("NVML opened but listing failed: {e}"),
        }
    }
}
