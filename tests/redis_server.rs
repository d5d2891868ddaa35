//! A `redis-server` of a test's own on a free loopback port, stopped when
//! dropped. Shared by the runtime's unit tests and the end-to-end tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    child: Child,
    pub url: String,
}

impl TestRedis {
    /// `None` (said loudly) where `redis-server` is not installed, unless
    /// `REQUIRE_REDIS=1` or `CI` is set: there that fails the test.
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let required = std::env::var_os("REQUIRE_REDIS").is_some() || std::env::var_os("CI").is_some();
                assert!(!required, "redis-server could not start ({e}); install it (apt-get install redis-server)");
                eprintln!("no redis-server: Redis tests skipped ({e})");
                return None;
            }
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "redis-server on port {port} did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self { child, url: format!("redis://127.0.0.1:{port}") })
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
