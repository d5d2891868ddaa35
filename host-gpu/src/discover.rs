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
}
