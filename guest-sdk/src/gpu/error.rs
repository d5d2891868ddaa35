use std::fmt;

use super::raw;
use crate::Error;

/// Why a GPU call failed.
///
/// None of these traps the guest: the handler decides what to do, and `?`
/// turns any of them into a [`crate::Error`] that fails the task
/// ([`crate::ErrorKind::Failed`], with this error's text as the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuError {
    /// No GPU for this app (its config has no `gpu`), or the operation needs one
    /// the backend lacks: custom kernels on the CPU backend.
    Unavailable(String),
    /// The device has no room left.
    OutOfMemory(String),
    /// The allocation would pass this worker's `gpu_memory`.
    QuotaExceeded(String),
    /// An offset, length or shape reaches past a buffer.
    OutOfBounds(String),
    /// Wrong element type, leading dimension, launch size, argument list...
    InvalidArgument(String),
    /// NVRTC or the PTX loader refused the kernel; the message holds its log.
    CompileFailed(String),
    /// The worker's stream did not finish within the given time.
    Timeout,
    /// The device failed (say, a faulting kernel). The runtime replaces the
    /// replica and retries its tasks; there is nothing left to do on this one.
    DeviceLost(String),
}

impl GpuError {
    /// The host's explanation; empty for [`GpuError::Timeout`].
    pub fn message(&self) -> &str {
        match self {
            GpuError::Unavailable(m)
            | GpuError::OutOfMemory(m)
            | GpuError::QuotaExceeded(m)
            | GpuError::OutOfBounds(m)
            | GpuError::InvalidArgument(m)
            | GpuError::CompileFailed(m)
            | GpuError::DeviceLost(m) => m,
            GpuError::Timeout => "",
        }
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            GpuError::Unavailable(_) => "GPU unavailable",
            GpuError::OutOfMemory(_) => "GPU out of memory",
            GpuError::QuotaExceeded(_) => "GPU memory quota exceeded",
            GpuError::OutOfBounds(_) => "GPU access out of bounds",
            GpuError::InvalidArgument(_) => "invalid GPU call",
            GpuError::CompileFailed(_) => "GPU kernel failed to compile",
            GpuError::Timeout => return f.write_str("GPU work did not finish within the timeout"),
            GpuError::DeviceLost(_) => "GPU device lost",
        };
        write!(f, "{what}: {}", self.message())
    }
}

impl std::error::Error for GpuError {}

impl From<raw::GpuError> for GpuError {
    fn from(err: raw::GpuError) -> Self {
        match err {
            raw::GpuError::Unavailable(m) => GpuError::Unavailable(m),
            raw::GpuError::OutOfMemory(m) => GpuError::OutOfMemory(m),
            raw::GpuError::QuotaExceeded(m) => GpuError::QuotaExceeded(m),
            raw::GpuError::OutOfBounds(m) => GpuError::OutOfBounds(m),
            raw::GpuError::InvalidArgument(m) => GpuError::InvalidArgument(m),
            raw::GpuError::CompileFailed(m) => GpuError::CompileFailed(m),
            raw::GpuError::Timeout => GpuError::Timeout,
            raw::GpuError::DeviceLost(m) => GpuError::DeviceLost(m),
        }
    }
}

/// A GPU error fails the task (HTTP 500) with the error's text, so handlers can
/// use `?` on GPU calls.
impl From<GpuError> for Error {
    fn from(err: GpuError) -> Self {
        Error::failed(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn maps_every_wit_variant() {
        let cases = [
            (raw::GpuError::Unavailable("u".into()), GpuError::Unavailable("u".into())),
            (raw::GpuError::OutOfMemory("o".into()), GpuError::OutOfMemory("o".into())),
            (raw::GpuError::QuotaExceeded("q".into()), GpuError::QuotaExceeded("q".into())),
            (raw::GpuError::OutOfBounds("b".into()), GpuError::OutOfBounds("b".into())),
            (raw::GpuError::InvalidArgument("i".into()), GpuError::InvalidArgument("i".into())),
            (raw::GpuError::CompileFailed("c".into()), GpuError::CompileFailed("c".into())),
            (raw::GpuError::Timeout, GpuError::Timeout),
            (raw::GpuError::DeviceLost("d".into()), GpuError::DeviceLost("d".into())),
        ];
        for (raw, ours) in cases {
            assert_eq!(GpuError::from(raw), ours);
        }
    }

    #[test]
    fn displays_what_and_the_host_message() {
        assert_eq!(GpuError::Unavailable("no gpu in config".into()).to_string(), "GPU unavailable: no gpu in config");
        assert_eq!(GpuError::Timeout.to_string(), "GPU work did not finish within the timeout");
        assert_eq!(GpuError::Timeout.message(), "");
        assert_eq!(GpuError::CompileFailed("log".into()).message(), "log");
    }

    #[test]
    fn becomes_a_failed_task_error() {
        let err = Error::from(GpuError::QuotaExceeded("3 GiB > 1 GiB".into()));
        assert_eq!(err.kind(), ErrorKind::Failed);
        assert_eq!(err.message(), "GPU memory quota exceeded: 3 GiB > 1 GiB");
    }
}
