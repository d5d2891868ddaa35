//! A `redis-server` of a test's own on a free loopback port, stopped when
//! dropped. Shared by the runtime's unit tests and the end-to-end tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    child: Child,
    port: u16,
    /// Where `SAVE` writes its snapshot, read back by a restart.
    dir: std::path::PathBuf,
    pub url: String,
}

impl TestRedis {
    /// `None` (said loudly) where `redis-server` is not installed, unless
    /// `REQUIRE_REDIS=1` or `CI` is set: there that fails the test.
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("beamlet-test-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, &dir)?;
        Some(Self { child, port, dir, url: format!("redis://127.0.0.1:{port}") })
    }

    /// Takes a snapshot and stops, as an outage that loses nothing.
    #[allow(dead_code)] // The end-to-end tests' only.
    pub fn stop(&mut self) {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        std::io::Write::write_all(&mut conn, b"SAVE\r\n").unwrap();
        let mut reply = [0u8; 5];
        std::io::Read::read_exact(&mut conn, &mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (SIGSTOP): connections open, nothing answered.
    #[allow(dead_code)] // The end-to-end tests' only.
    pub fn freeze(&self) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) }, 0);
    }

    /// Undoes [`TestRedis::freeze`].
    #[allow(dead_code)] // The end-to-end tests' only.
    pub fn thaw(&self) {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) }, 0);
    }

    /// Starts again on the same port with the data of [`TestRedis::stop`].
    #[allow(dead_code)] // The end-to-end tests' only.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, &self.dir).expect("redis-server ran before");
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Option<Child> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
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
        Some(child)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
