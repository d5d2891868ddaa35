use std::time::Duration;

use super::{GpuError, raw};

/// The replica's GPU, shared by its workers; [`Device::info`] describes it.
///
/// A namespace, not a value: a worker has exactly one device, reached through
/// the functions of [`crate::gpu`].
#[derive(Debug)]
pub enum Device {}

impl Device {
    /// What the device is, and how much of its memory this worker holds.
    ///
    /// ```no_run
    /// use beamlet_sdk::gpu::Device;
    ///
    /// let info = Device::info()?;
    /// println!("{} ({}), {} of {} bytes used", info.name, info.backend, info.used_bytes, info.quota_bytes);
    /// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
    /// ```
    pub fn info() -> Result<DeviceInfo, GpuError> {
        Ok(raw::device()?.into())
    }
}

/// The answer of [`Device::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// e.g. `"NVIDIA H100 80GB HBM3"`, or `"cpu"` for the CPU backend.
    pub name: String,
    /// The whole device's memory, in bytes.
    pub memory_bytes: u64,
    /// (major, minor); (0, 0) on the CPU backend.
    pub compute_capability: (u32, u32),
    /// `"cuda"` or `"cpu"` (`beamlet serve --gpu-backend cpu`).
    pub backend: String,
    /// Bytes this worker may hold at once (the app's `gpu_memory`).
    pub quota_bytes: u64,
    /// Bytes this worker holds now.
    pub used_bytes: u64,
}

impl DeviceInfo {
    /// Whether this is a real CUDA device (custom kernels work there only).
    pub fn is_cuda(&self) -> bool {
        self.backend == "cuda"
    }

    /// Bytes this worker may still allocate.
    pub fn free_quota_bytes(&self) -> u64 {
        self.quota_bytes.saturating_sub(self.used_bytes)
    }
}

impl From<raw::DeviceInfo> for DeviceInfo {
    fn from(info: raw::DeviceInfo) -> Self {
        DeviceInfo {
            name: info.name,
            memory_bytes: info.memory_bytes,
            compute_capability: info.compute_capability,
            backend: info.backend,
            quota_bytes: info.quota_bytes,
            used_bytes: info.used_bytes,
        }
    }
}

/// Waits until all the work this worker queued on its stream has finished.
///
/// GPU calls are queued in order on the worker's one stream and return before
/// the device is done; [`Buffer::read`](super::Buffer::read) waits by itself,
/// so call this only to time work or to surface a kernel's failure. Answers
/// [`GpuError::Timeout`] if the work takes longer than `timeout` (rounded up to
/// whole milliseconds).
///
/// ```no_run
/// use std::time::{Duration, Instant};
///
/// let started = Instant::now();
/// // ... queue GPU work ...
/// beamlet_sdk::gpu::synchronize(Duration::from_secs(10))?;
/// println!("took {:?}", started.elapsed());
/// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
/// ```
pub fn synchronize(timeout: Duration) -> Result<(), GpuError> {
    Ok(raw::synchronize(timeout_ms(timeout))?)
}

/// Whole milliseconds, rounded up so a short timeout never becomes "no time".
fn timeout_ms(timeout: Duration) -> u64 {
    let ms = timeout.as_millis() + u128::from(!timeout.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(timeout_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn free_quota_never_goes_negative() {
        let info = DeviceInfo {
            name: "cpu".into(),
            memory_bytes: 1 << 30,
            compute_capability: (0, 0),
            backend: "cpu".into(),
            quota_bytes: 100,
            used_bytes: 120,
        };
        assert_eq!(info.free_quota_bytes(), 0);
        assert!(!info.is_cuda());
    }
}
