//! Test support: build the guest components once, run real `beamlet serve`
//! processes on 127.0.0.1:0, and talk to them over HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response, multipart};
use serde_json::Value;

pub const GUESTS: [&str; 11] = [
    "hello",
    "sleep",
    "guest-trap",
    "guest-spin",
    "guest-hog",
    "guest-command",
    "guest-badinit",
    "guest-slowstart",
    "guest-http",
    "guest-gpu",
    "gpu-mlp",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The repository's examples directory.
pub fn examples() -> PathBuf {
    workspace_root().join("examples")
}

/// Builds every guest for wasm32-wasip2 (once per test run) and returns the
/// directory holding the `.wasm` files.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        // A target dir of their own: the outer `cargo test` holds the main one.
        let target = root.join("target").join("guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(&root).args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"]).arg(&target);
        for guest in GUESTS {
            command.args(["-p", guest]);
        }
        let status = command.status().expect("failed to run cargo to build the guests");
        assert!(status.success(), "building the guest components failed; is the wasm32-wasip2 target installed? (rustup target add wasm32-wasip2)");
        target.join("wasm32-wasip2").join("release")
    })
}

/// Builds `examples/python-http` with componentize-py (once per test run).
pub fn python_http() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let example = workspace_root().join("examples").join("python-http");
        let out = workspace_root().join("target").join("guests").join("python-http.wasm");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        // Through python3 rather than the `componentize-py` script, which a
        // fresh pip install may leave off PATH (pyenv shims, ~/.local/bin).
        let run = "import sys, componentize_py; sys.argv[0] = 'componentize-py'; sys.exit(componentize_py.script())";
        let status = Command::new("python3")
            .current_dir(&example)
            .args(["-c", run, "-d", "wit", "-w", "app", "componentize", "app", "-o"])
            .arg(&out)
            .status()
            .expect("failed to run componentize-py; install it with: pip install componentize-py==0.25.1");
        assert!(status.success(), "componentize-py failed to build examples/python-http");
        out
    })
}

/// The path of a built guest, by crate name.
pub fn wasm(guest: &str) -> PathBuf {
    // Libraries (cdylib) get underscores in their file names; binaries keep their name.
    let file = if guest == "guest-command" { guest.to_owned() } else { guest.replace('-', "_") };
    guests().join(format!("{file}.wasm"))
}

/// A running `beamlet serve`, killed when dropped. A test that passes leaves
/// no data dir behind (each holds compiled components); a failing one keeps
/// it and its log under target/e2e-data for a look.
pub struct Server {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    pub http: Client,
    /// The data dir goes on to another node ([`Server::kill`], [`Server::terminate`]).
    handed_on: bool,
}

fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("log")
}

/// A builder of HTTP clients, with the TLS provider installed that reqwest
/// is built to use (rustls with ring).
pub fn http_client() -> reqwest::blocking::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Client::builder()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target").join("e2e-data").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Server {
    pub fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_in(temp_dir(name), extra)
    }

    /// Starts a node; unless `extra` sets `--cpus`, it offers 64 cores so that
    /// tests running many apps at once are not held back by placement.
    pub fn start_in(data_dir: PathBuf, extra: &[&str]) -> Self {
        Self::start_from(Path::new(env!("CARGO_BIN_EXE_beamlet")), data_dir, extra)
    }

    /// [`Server::start_in`] with the `beamlet` binary at `exe`.
    pub fn start_from(exe: &Path, data_dir: PathBuf, extra: &[&str]) -> Self {
        Self::spawn(exe, data_dir, extra, &[])
    }

    /// [`Server::start`] with `env` set for the node.
    pub fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        Self::spawn(Path::new(env!("CARGO_BIN_EXE_beamlet")), temp_dir(name), extra, env)
    }

    fn spawn(exe: &Path, data_dir: PathBuf, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let cpus: &[&str] = if extra.contains(&"--cpus") { &[] } else { &["--cpus", "64"] };
        let listen: &[&str] = if extra.contains(&"--listen") { &[] } else { &["--listen", "127.0.0.1:0"] };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(&data_dir)).unwrap();
        let mut child = Command::new(exe)
            .args(["serve", "--data-dir"])
            .arg(&data_dir)
            .args(listen)
            .args(cpus)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("failed to start beamlet serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("failed to read serve's first line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?} instead of its address"))
            .to_owned();
        // No pooled connections: a server may close one after refusing an
        // oversized body, and a test must not trip over that reuse.
        let http = http_client().timeout(Duration::from_secs(120)).pool_max_idle_per_host(0).build().unwrap();
        Self { child, base, data_dir, http, handed_on: false }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the node (and its replicas) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(&self.data_dir)).unwrap_or_default()
    }

    /// Kills the node with SIGKILL, as a crash would.
    pub fn kill(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.handed_on = true;
        self.data_dir.clone()
    }

    /// Stops the node with SIGTERM, as an operator would, and waits for it
    /// to exit; panics unless it exits cleanly.
    pub fn terminate(self) -> PathBuf {
        self.sigterm();
        self.wait_exit()
    }

    /// Sends the node SIGTERM, not waiting for it to exit.
    pub fn sigterm(&self) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
    }

    /// Waits for the node to exit; panics unless it exits cleanly.
    pub fn wait_exit(mut self) -> PathBuf {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exited with {status} after SIGTERM:\n{}", self.log());
        self.handed_on = true;
        self.data_dir.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn deploy(&self, name: &str, wasm: &[u8], config: Option<&str>) -> Response {
        let mut form =
            multipart::Form::new().part("component", multipart::Part::bytes(wasm.to_vec()).file_name("app.wasm"));
        if let Some(config) = config {
            form = form.text("config", config.to_owned());
        }
        self.http.put(self.url(&format!("/v1/apps/{name}"))).multipart(form).send().unwrap()
    }

    /// Deploys a built guest and asserts it worked.
    pub fn deploy_guest(&self, name: &str, guest: &str, config: Option<&str>) -> Value {
        let response = self.deploy(name, &std::fs::read(wasm(guest)).unwrap(), config);
        let status = response.status();
        let body: Value = response.json().unwrap();
        assert_eq!(status, 201, "deploy of {guest} failed: {body}");
        body
    }

    pub fn invoke(&self, name: &str, input: &str) -> Response {
        self.http.post(self.url(&format!("/v1/apps/{name}/invoke"))).body(input.to_owned()).send().unwrap()
    }

    /// Invokes and returns (status, JSON body).
    pub fn invoke_json(&self, name: &str, input: &str) -> (u16, Value) {
        let response = self.invoke(name, input);
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> Value {
        self.http.get(self.url(path)).send().unwrap().json().unwrap()
    }

    pub fn status(&self, name: &str) -> Value {
        self.get(&format!("/v1/apps/{name}"))
    }

    /// Waits until `check` holds for the app's status, or panics after `limit`.
    pub fn wait_status(&self, name: &str, what: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, limit, || {
            let status = self.status(name);
            check(&status).then_some(status)
        })
    }

    /// The pids of the app's ready replicas.
    pub fn ready_pids(&self, name: &str) -> Vec<u32> {
        ready_pids(&self.status(name))
    }
}

pub fn ready_pids(status: &Value) -> Vec<u32> {
    status["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] == "ready")
        .filter_map(|r| r["pid"].as_u64())
        .map(|pid| pid as u32)
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.handed_on && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
            let _ = std::fs::remove_file(log_path(&self.data_dir));
        }
    }
}

/// Polls `probe` until it returns something; a generous limit only guards
/// against hanging forever, it is not a speed check.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(start.elapsed() < limit, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process is alive (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

pub fn kill9(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "failed to kill {pid}");
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

pub fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

/// One request a [`receiver`] got.
pub struct Received {
    pub headers: std::collections::HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A plain HTTP receiver on 127.0.0.1 that answers 500 to its first
/// `failures` requests and 200 after.
pub fn receiver(failures: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    receiver_at("127.0.0.1:0", failures)
}

/// [`receiver`] on a given address.
pub fn receiver_at(addr: &str, failures: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            answer_hook(stream, &log, failures);
        }
    });
    (url, received)
}

/// A [`receiver`] over TLS, its certificate issued for `localhost` by a CA
/// of its own; returns its URL, what it got, and the CA's certificate (PEM)
/// for the client to trust.
pub fn tls_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://localhost:{}/hook", listener.local_addr().unwrap().port());
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tls = rustls::ServerConnection::new(config.clone()).unwrap();
            answer_hook(rustls::StreamOwned::new(tls, stream), &log, 0);
        }
    });
    (url, received, ca_cert.pem())
}

/// Reads one request from `stream` into `log` and answers it: 500 while
/// `log` holds fewer than `failures` requests, 200 after.
fn answer_hook(
    mut stream: impl std::io::Read + std::io::Write,
    log: &std::sync::Mutex<Vec<Received>>,
    failures: usize,
) {
    use std::io::{BufRead, BufReader, Read};
    let mut reader = BufReader::new(&mut stream);
    let mut headers = std::collections::HashMap::new();
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    drop(reader);
    let mut log = log.lock().unwrap();
    let status = if log.len() < failures { "500 Internal Server Error" } else { "200 OK" };
    log.push(Received { headers, body });
    let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = stream.flush();
}

/// Queues a task; returns its id.
pub fn submit(server: &Server, app: &str, input: &str) -> String {
    let response =
        server.http.post(server.url(&format!("/v1/apps/{app}/tasks"))).body(input.to_owned()).send().unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned()
}

/// Waits for a queued task to complete and returns its result.
pub fn result(server: &Server, id: &str) -> Value {
    let record = server.get(&format!("/v1/tasks/{id}?wait=90s"));
    assert_eq!(record["status"], "COMPLETE", "{record}");
    server.http.get(server.url(&format!("/v1/tasks/{id}/result"))).send().unwrap().json().unwrap()
}
