//! What the CUDA test binaries share: a session on GPU 0, or a loud skip.

use std::sync::Arc;
use std::time::Duration;

use beamlet_gpu::Session;
use beamlet_gpu::cuda::CudaBackend;

pub const WAIT: Duration = Duration::from_secs(30);

/// A session on GPU 0, or `None` (after saying so) when there is none;
/// with `REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu() -> Option<Session> {
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
