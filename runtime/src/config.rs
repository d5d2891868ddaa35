//! App configuration: `beamlet.toml` (SPEC §3).
//!
//! Two layers. The documented structs are what the rest of the runtime reads;
//! the private `Raw*` serde forms mirror the file and reject unknown keys.
//! [`parse`] decodes one into the other and refuses every combination the
//! runtime could not honour, naming the offending key.

use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Fewest cores a replica may reserve (`[runtime] cpu`).
const MIN_CPU: f64 = 0.01;

const MIB: u64 = 1 << 20;
const MAX_WORKERS: u32 = 256;
/// Below this a worker cannot hold a typical guest's stack, data and heap.
const MIN_WORKER_MEMORY: u64 = 16 * MIB;
/// The least GPU memory a worker may be given (`gpu_memory`), and so the
/// least a CPU-backed GPU may offer.
pub const MIN_GPU_MEMORY: u64 = MIB;
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// An app's configuration.
///
/// Serializes with the same keys as `beamlet.toml` and the same units: sizes as
/// strings such as `"4Gi"` (see [`format_size`]), durations as strings such as
/// `"3m"` (see [`format_duration`]), the autoscaler policy as `kind` plus its keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AppConfig {
    pub runtime: RuntimeConfig,
    pub autoscaler: AutoscalerConfig,
    pub task_queue: TaskQueueConfig,
}

/// `[runtime]`: what each replica of the app gets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeConfig {
    /// Wasm instances per replica (1..=256); they share its cpu, memory and gpu. Default 1.
    pub workers: u32,
    /// Cores reserved per replica when placing it on a node (> 0). Default 1.
    pub cpu: f64,
    /// Bytes of memory per replica, split evenly across workers as their wasm
    /// memory limit (at least 16 MiB each). Default 512 MiB.
    #[serde(serialize_with = "ser_size")]
    pub memory: u64,
    /// `"any"` or a GPU model name such as `"H100"`; `None` for a CPU app.
    pub gpu: Option<String>,
    /// Bytes of GPU memory each worker may allocate; needs `gpu`. `None`: no
    /// per-worker quota below the device's own memory.
    #[serde(serialize_with = "ser_opt_size")]
    pub gpu_memory: Option<u64>,
    /// Longest one task may run (0 < timeout <= 24 h); past it the task is
    /// stopped as TIMEOUT. Default 180 s.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Whether workers reuse one instance or start a fresh one per task.
    pub instance: InstanceMode,
    /// Hosts a guest may send HTTP requests to, as `host` (any port) or
    /// `host:port`; key `allowed_outbound_hosts`. Empty (the default): none.
    pub allowed_outbound_hosts: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            cpu: 1.0,
            memory: 512 * MIB,
            gpu: None,
            gpu_memory: None,
            timeout: Duration::from_secs(180),
            instance: InstanceMode::PerWorker,
            allowed_outbound_hosts: Vec::new(),
        }
    }
}

impl RuntimeConfig {
    /// Bytes of wasm memory each worker may use: `memory / workers`.
    pub fn memory_per_worker(&self) -> u64 {
        self.memory / u64::from(self.workers.max(1))
    }

    /// GPU memory a replica's workers may hold together: `workers *
    /// gpu_memory` (`None` without `gpu_memory`: a worker may use the whole GPU).
    pub fn gpu_memory_per_replica(&self) -> Option<u64> {
        self.gpu_memory.map(|per_worker| per_worker.saturating_mul(u64::from(self.workers)))
    }
}

/// `[runtime] instance`: how long a wasm instance lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// `"per-worker"`: one instance per worker, reused for every task it runs.
    #[default]
    PerWorker,
    /// `"per-task"`: a fresh instance for every task, so no state survives between tasks.
    PerTask,
}

/// `[autoscaler]`: how many replicas run.
///
/// With no `kind` (including no `[autoscaler]` table at all) the app runs a
/// fixed pool of `max(min_replicas, 1)` replicas and never scales. With a kind,
/// it runs between `min_replicas` and the policy's `max_replicas`, and may
/// scale to zero when `min_replicas` is 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoscalerConfig {
    /// The scaling policy; `None` for a fixed pool.
    #[serde(flatten)]
    pub policy: Option<Policy>,
    /// Replicas kept running with no load. Default 0.
    pub min_replicas: u32,
    /// Idle time before a surplus replica stops; only used with a policy. Default 10 s.
    #[serde(serialize_with = "ser_duration")]
    pub keep_warm: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self { policy: None, min_replicas: 0, keep_warm: Duration::from_secs(10) }
    }
}

impl AutoscalerConfig {
    /// Replicas to run with no load: `min_replicas` under a policy (0 = scale to
    /// zero), otherwise the fixed pool of `max(min_replicas, 1)`.
    pub fn baseline_replicas(&self) -> u32 {
        match self.policy {
            Some(_) => self.min_replicas,
            None => self.min_replicas.max(1),
        }
    }

    /// Most replicas the app may run: the policy's cap, or the fixed pool size.
    pub fn max_replicas(&self) -> u32 {
        self.policy.map_or_else(|| self.baseline_replicas(), |policy| policy.max_replicas())
    }
}

/// `[autoscaler] kind` and its keys (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Policy {
    /// `"queue_depth"`: desired = ceil((queued + running) / max_tasks_per_replica).
    QueueDepth {
        /// Queued plus running tasks one replica should carry (>= 1). Default 30.
        max_tasks_per_replica: u32,
        /// Default 3.
        max_replicas: u32,
    },
    /// `"request_latency"`: enough worker slots that a task starts within `desired_latency`.
    RequestLatency {
        /// Longest a task should wait before it starts (> 0). Default 30 s.
        #[serde(serialize_with = "ser_duration")]
        desired_latency: Duration,
        /// Default 5.
        max_replicas: u32,
    },
}

impl Policy {
    pub fn max_replicas(&self) -> u32 {
        match *self {
            Policy::QueueDepth { max_replicas, .. } | Policy::RequestLatency { max_replicas, .. } => max_replicas,
        }
    }
}

/// `[task_queue]`: retries, expiry and limits for the app's tasks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskQueueConfig {
    /// Re-runs after a trap, crash or timeout. Default 3.
    pub retries: u32,
    /// A task still queued after this becomes EXPIRED (> 0). Default 2 h.
    #[serde(serialize_with = "ser_duration")]
    pub ttl: Duration,
    /// `http://` or `https://` URL that receives a signed POST of each result.
    pub callback_url: Option<String>,
    /// How long a finished task's result is kept (> 0). Default 1 h.
    #[serde(serialize_with = "ser_duration")]
    pub result_ttl: Duration,
    /// Tasks that may wait in the queue before submissions get 429 (> 0). Default 10 000.
    pub max_queued: u32,
    /// Largest result in bytes a task may return (> 0). Default 16 MiB.
    #[serde(serialize_with = "ser_size")]
    pub max_result_size: u64,
}

impl Default for TaskQueueConfig {
    fn default() -> Self {
        Self {
            retries: 3,
            ttl: Duration::from_secs(2 * 3600),
            callback_url: None,
            result_ttl: Duration::from_secs(3600),
            max_queued: 10_000,
            max_result_size: 16 * MIB,
        }
    }
}

/// Why a `beamlet.toml` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("TOML syntax error at line {line}, column {column} ({text:?}): {message}; fix the config there")]
    Syntax { line: usize, column: usize, text: String, message: String },
    #[error("unknown key {key:?} in {table}; expected one of: {expected}")]
    UnknownKey { table: String, key: String, expected: String },
    /// `key` reads like `[runtime] memory`.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Parses and checks a `beamlet.toml`; an empty text gives [`AppConfig::default`].
pub fn parse(toml_text: &str) -> Result<AppConfig, ConfigError> {
    let doc: toml::Table = toml::from_str(toml_text).map_err(|e| {
        let (line, column) = line_column(toml_text, e.span().map_or(0, |span| span.start));
        let text = toml_text.lines().nth(line - 1).unwrap_or_default().trim().chars().take(80).collect();
        let mut message = e.message().trim_end().to_owned();
        if message.contains("as i128") {
            // The parser's words for an integer TOML cannot hold.
            message = format!("the number is too large (TOML integers are at most {})", i64::MAX);
        }
        ConfigError::Syntax { line, column, text, message }
    })?;
    let raw: RawConfig = decode("", doc)?;
    Ok(AppConfig {
        runtime: decode::<RawRuntime>("runtime", raw.runtime.unwrap_or_default())?.check()?,
        autoscaler: decode::<RawAutoscaler>("autoscaler", raw.autoscaler.unwrap_or_default())?.check()?,
        task_queue: decode::<RawTaskQueue>("task_queue", raw.task_queue.unwrap_or_default())?.check()?,
    })
}

/// [`parse`], and the rules only a new deploy must meet: they came after
/// apps may have been stored without them, and those still load (and sync
/// across a cluster) as they are.
pub fn parse_new(toml_text: &str) -> Result<AppConfig, ConfigError> {
    let config = parse(toml_text)?;
    let cpu = config.runtime.cpu;
    // Each replica is a process: a thousandth of a core would let one app
    // start hundreds of them on a one-core node.
    let message = format!("must be at least {MIN_CPU} cores (a replica is a process), got {cpu}");
    ensure(cpu >= MIN_CPU, "runtime", "cpu", message)?;
    let doc: toml::Table = toml::from_str(toml_text).unwrap_or_default();
    let autoscaler = doc.get("autoscaler").and_then(toml::Value::as_table);
    let zero = autoscaler.and_then(|table| table.get("min_replicas")) == Some(&toml::Value::Integer(0));
    let message = "0 scales to zero, which only an autoscaler does: add kind = \"queue_depth\" or \
                   \"request_latency\" (without one, the app runs a fixed pool of max(min_replicas, 1))";
    ensure(config.autoscaler.policy.is_some() || !zero, "autoscaler", "min_replicas", message)?;
    Ok(config)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    runtime: Option<toml::Table>,
    autoscaler: Option<toml::Table>,
    task_queue: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<u32>,
    cpu: Option<f64>,
    memory: Option<Size>,
    gpu: Option<String>,
    gpu_memory: Option<Size>,
    timeout: Option<Dur>,
    instance: Option<String>,
    allowed_outbound_hosts: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscaler {
    kind: Option<String>,
    min_replicas: Option<u32>,
    keep_warm: Option<Dur>,
    max_replicas: Option<u32>,
    max_tasks_per_replica: Option<u32>,
    desired_latency: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskQueue {
    retries: Option<u32>,
    ttl: Option<Dur>,
    callback_url: Option<String>,
    result_ttl: Option<Dur>,
    max_queued: Option<u32>,
    max_result_size: Option<Size>,
}

/// Fails with `message` about `[table] key` unless `ok`.
fn ensure(ok: bool, table: &str, key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    match ok {
        true => Ok(()),
        false => Err(ConfigError::Invalid { key: format!("[{table}] {key}"), message: message.into() }),
    }
}

impl RawRuntime {
    fn check(self) -> Result<RuntimeConfig, ConfigError> {
        let ensure = |ok, key, message: String| ensure(ok, "runtime", key, message);
        let d = RuntimeConfig::default();
        let workers = self.workers.unwrap_or(d.workers);
        ensure((1..=MAX_WORKERS).contains(&workers), "workers", format!("must be 1 to {MAX_WORKERS}, got {workers}"))?;
        let cpu = self.cpu.unwrap_or(d.cpu);
        ensure(
            cpu > 0.0 && cpu.is_finite(),
            "cpu",
            format!("must be a positive number of cores such as 1 or 0.5, got {cpu}"),
        )?;
        let memory = self.memory.map_or(d.memory, |s| s.bytes);
        let memory_hint = self.memory.map_or_else(String::new, |s| s.bytes_hint());
        let each = memory / u64::from(workers);
        ensure(
            each >= MIN_WORKER_MEMORY,
            "memory",
            format!(
                "{} split across {workers} worker{} leaves {} each, below the {} a worker needs; raise memory or \
                 lower workers{}",
                describe_size(memory),
                if workers == 1 { "" } else { "s" },
                describe_size(each),
                format_size(MIN_WORKER_MEMORY),
                memory_hint,
            ),
        )?;
        let gpu_named = self.gpu.as_deref().is_none_or(|gpu| !gpu.trim().is_empty());
        ensure(gpu_named, "gpu", "must be \"any\" or a model name such as \"H100\"; omit gpu for a CPU app".into())?;
        let gpu_memory = self.gpu_memory.map(|s| s.bytes);
        let needs_gpu = "needs a GPU; add gpu = \"any\" (or a model name) or remove gpu_memory";
        ensure(gpu_memory.is_none() || self.gpu.is_some(), "gpu_memory", needs_gpu.into())?;
        ensure(gpu_memory != Some(0), "gpu_memory", "must be more than 0; omit it for no per-worker quota".into())?;
        if let Some(size) = self.gpu_memory {
            ensure(
                size.bytes >= MIN_GPU_MEMORY,
                "gpu_memory",
                format!(
                    "{} is less than the {} a worker's GPU memory may be{}",
                    describe_size(size.bytes),
                    format_size(MIN_GPU_MEMORY),
                    size.bytes_hint()
                ),
            )?;
        }
        let timeout = self.timeout.map_or(d.timeout, |t| t.0);
        let in_range = !timeout.is_zero() && timeout <= MAX_TIMEOUT;
        ensure(in_range, "timeout", format!("must be more than 0s and at most 24h, got {}", format_duration(timeout)))?;
        let instance = match self.instance.as_deref() {
            None | Some("per-worker") => InstanceMode::PerWorker,
            Some("per-task") => InstanceMode::PerTask,
            Some(other) => {
                let message = format!("{other:?} is not an instance mode; use \"per-worker\" or \"per-task\"");
                return Err(ConfigError::Invalid { key: "[runtime] instance".into(), message });
            }
        };
        let allowed_outbound_hosts = self.allowed_outbound_hosts.unwrap_or_default();
        for host in &allowed_outbound_hosts {
            let plain = !host.is_empty()
                && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            let message =
                format!("{host:?} is not a host; write \"example.com\" or \"example.com:8080\", no scheme or path");
            ensure(plain, "allowed_outbound_hosts", message)?;
        }
        Ok(RuntimeConfig { workers, cpu, memory, gpu: self.gpu, gpu_memory, timeout, instance, allowed_outbound_hosts })
    }
}

impl RawAutoscaler {
    fn check(self) -> Result<AutoscalerConfig, ConfigError> {
        let ensure = |ok, key, message: String| ensure(ok, "autoscaler", key, message);
        let d = AutoscalerConfig::default();
        let kind = self.kind.as_deref();
        let known = matches!(kind, None | Some("queue_depth" | "request_latency"));
        let kinds = "\"queue_depth\" or \"request_latency\"";
        ensure(known, "kind", format!("{:?} is not an autoscaler kind; use {kinds}", kind.unwrap_or_default()))?;
        // A key the chosen kind never reads is a mistake, not something to ignore.
        let kind_keys = [
            ("max_tasks_per_replica", self.max_tasks_per_replica.is_some(), Some("queue_depth")),
            ("desired_latency", self.desired_latency.is_some(), Some("request_latency")),
            ("max_replicas", self.max_replicas.is_some(), None),
            ("keep_warm", self.keep_warm.is_some(), None),
        ];
        for (key, set, only) in kind_keys {
            let message = match only {
                Some(only) => format!("only applies with kind = {only:?}; set that kind or remove {key}"),
                None => format!("only applies with an autoscaler; add kind = {kinds}, or remove {key}"),
            };
            ensure(!set || kind.is_some_and(|kind| only.is_none_or(|only| only == kind)), key, message)?;
        }
        let policy = match kind {
            Some("queue_depth") => Some(Policy::QueueDepth {
                max_tasks_per_replica: self.max_tasks_per_replica.unwrap_or(30),
                max_replicas: self.max_replicas.unwrap_or(3),
            }),
            // "request_latency", the only other kind `known` lets through.
            Some(_) => Some(Policy::RequestLatency {
                desired_latency: self.desired_latency.map_or(Duration::from_secs(30), |t| t.0),
                max_replicas: self.max_replicas.unwrap_or(5),
            }),
            None => None,
        };
        let min_replicas = self.min_replicas.unwrap_or(d.min_replicas);
        match policy {
            Some(Policy::QueueDepth { max_tasks_per_replica, .. }) => {
                ensure(max_tasks_per_replica > 0, "max_tasks_per_replica", "must be at least 1".into())?
            }
            Some(Policy::RequestLatency { desired_latency, .. }) => {
                ensure(!desired_latency.is_zero(), "desired_latency", "must be more than 0s, e.g. \"30s\"".into())?
            }
            None => {}
        }
        ensure(min_replicas <= MAX_REPLICAS, "min_replicas", format!("must be at most {MAX_REPLICAS}"))?;
        if let Some(max) = policy.map(|policy| policy.max_replicas()) {
            let scale_to_zero = "must be at least 1; use min_replicas = 0 to scale to zero";
            ensure(max > 0, "max_replicas", scale_to_zero.into())?;
            ensure(max <= MAX_REPLICAS, "max_replicas", format!("must be at most {MAX_REPLICAS}"))?;
            let fix = "lower min_replicas or raise max_replicas";
            ensure(
                min_replicas <= max,
                "min_replicas",
                format!("{min_replicas} is more than max_replicas ({max}); {fix}"),
            )?;
        }
        Ok(AutoscalerConfig { policy, min_replicas, keep_warm: self.keep_warm.map_or(d.keep_warm, |t| t.0) })
    }
}

/// The most replicas one app may ask for: a sanity bound on typos, far above
/// what one node places.
const MAX_REPLICAS: u32 = 1000;

impl RawTaskQueue {
    fn check(self) -> Result<TaskQueueConfig, ConfigError> {
        let ensure = |ok, key, message: &str| ensure(ok, "task_queue", key, message);
        let d = TaskQueueConfig::default();
        let ttl = self.ttl.map_or(d.ttl, |t| t.0);
        ensure(!ttl.is_zero(), "ttl", "must be more than 0s, e.g. \"2h\"")?;
        let result_ttl = self.result_ttl.map_or(d.result_ttl, |t| t.0);
        ensure(!result_ttl.is_zero(), "result_ttl", "must be more than 0s, e.g. \"1h\"")?;
        let max_queued = self.max_queued.unwrap_or(d.max_queued);
        ensure(max_queued > 0, "max_queued", "must be at least 1")?;
        let max_result_size = self.max_result_size.map_or(d.max_result_size, |s| s.bytes);
        ensure(max_result_size > 0, "max_result_size", "must be more than 0, e.g. \"16Mi\"")?;
        if let Some(url) = &self.callback_url {
            ensure(check_callback_url(url).is_ok(), "callback_url", "must be an http:// or https:// URL with a host")?;
        }
        let retries = self.retries.unwrap_or(d.retries);
        Ok(TaskQueueConfig { retries, ttl, callback_url: self.callback_url, result_ttl, max_queued, max_result_size })
    }
}

/// Checks a callback URL (from the config or a task submission).
pub fn check_callback_url(url: &str) -> Result<(), String> {
    let must = || format!("{url:?} must be an http:// or https:// URL with a host");
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{} ({e})", must()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(must());
    }
    Ok(())
}

/// Deserializes one table of the file into `T`, naming the table and key on failure.
fn decode<T: DeserializeOwned>(table: &str, map: toml::Table) -> Result<T, ConfigError> {
    let fields = field_names::<T>();
    if let Some(key) = map.keys().find(|key| !fields.contains(&key.as_str())) {
        let table = if table.is_empty() { "the top level".to_owned() } else { format!("[{table}]") };
        return Err(ConfigError::UnknownKey { table, key: key.clone(), expected: fields.join(", ") });
    }
    T::deserialize(toml::Value::Table(map.clone())).map_err(|whole| {
        // serde's error does not say which key failed; every field is optional,
        // so decoding each entry alone finds it.
        let culprit = map.iter().find_map(|(key, value)| {
            let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
            T::deserialize(toml::Value::Table(alone)).err().map(|e| (key, e))
        });
        let (key, error) = culprit.map_or((None, whole), |(key, e)| (Some(key), e));
        let key = match (table, key) {
            ("", Some(key)) => key.clone(),
            (table, Some(key)) => format!("[{table}] {key}"),
            (table, None) => format!("[{table}]"),
        };
        ConfigError::Invalid { key, message: plain_types(error.message()) }
    })
}

/// serde's messages name Rust types (`expected u32`); users wrote TOML.
fn plain_types(message: &str) -> String {
    const TYPES: [(&str, &str); 6] = [
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a map", "expected a table (a [section] of keys)"),
        ("expected a sequence", "expected a list such as [\"a\", \"b\"]"),
        ("expected a boolean", "expected true or false"),
    ];
    TYPES.iter().fold(message.to_owned(), |message, (rust, toml)| message.replace(rust, toml))
}

/// The keys a derived `Deserialize` struct accepts, which it passes to `deserialize_struct`.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// A size in bytes: a non-negative integer or a string such as `"4Gi"`.
#[derive(Clone, Copy)]
struct Size {
    bytes: u64,
    /// Written without a unit (`512`, `"512"`): bytes.
    bare: bool,
}

impl Size {
    /// For a size too small to be meant, written without a unit: it is bytes.
    fn bytes_hint(self) -> String {
        let bytes = self.bytes;
        if self.bare && bytes > 0 && bytes < 1 << 20 {
            format!(" (a size without a unit is bytes; for {bytes} MiB write \"{bytes}Mi\")")
        } else {
            String::new()
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let size = match toml::Value::deserialize(deserializer)? {
            toml::Value::String(text) => {
                let bare = text.trim().bytes().all(|b| b.is_ascii_digit());
                parse_size(&text).map(|bytes| Size { bytes, bare })
            }
            toml::Value::Integer(n) => {
                u64::try_from(n).map(|bytes| Size { bytes, bare: true }).map_err(|_| not_a_size(&n.to_string()))
            }
            other => Err(not_a_size(&format!("this {}", other.type_str()))),
        };
        let size = size.and_then(|size| {
            if size.bytes > MAX_SIZE { Err(format!("{} is too large: at most 1Ei", size.bytes)) } else { Ok(size) }
        });
        size.map_err(de::Error::custom)
    }
}

/// A duration: a string with units such as `"180s"`; bare numbers are ambiguous.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let duration = match toml::Value::deserialize(deserializer)? {
            toml::Value::String(text) => parse_duration(&text),
            toml::Value::Integer(n) if n < 0 => Err(format!("{n} is negative; a duration is 0 or more, e.g. \"30s\"")),
            toml::Value::Integer(n) => {
                Err(format!("{n} has no unit; write it as a string such as \"{n}s\" or \"{n}ms\""))
            }
            other => Err(not_a_duration(&format!("this {}", other.type_str()))),
        };
        let duration = duration.and_then(|d| {
            if d > MAX_DURATION {
                Err(format!("{} is too long: at most 3650d (ten years)", format_duration(d)))
            } else {
                Ok(d)
            }
        });
        duration.map(Dur).map_err(de::Error::custom)
    }
}

/// The longest duration a config takes: a bound on typos (and on times in
/// milliseconds the task store keeps as 64-bit signed integers).
const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);
/// The largest size a config takes (1Ei), for the same reasons.
const MAX_SIZE: u64 = 1 << 60;

/// Binary units first so [`format_size`] prefers them.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("k", 1_000),
    ("K", 1_000),
];

/// Largest first, for [`format_duration`].
const DURATION_UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

fn not_a_size(text: &str) -> String {
    format!(
        "{text} is not a size; use e.g. \"512Mi\", \"4Gi\" (a whole number; binary Ki Mi Gi Ti, or decimal k M G T; no B)"
    )
}

fn not_a_duration(text: &str) -> String {
    format!("{text} is not a duration; use e.g. \"180s\", \"500ms\", \"2m\", \"1h30m\"")
}

/// Parses a byte size: digits with an optional unit, binary (`Ki Mi Gi Ti`) or
/// decimal (`k M G T`); no unit means bytes. `"4Gi"` = 4 * 2^30, `"1G"` = 10^9.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let quoted = format!("{text:?}");
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| not_a_size(&quoted))?;
    let scale = match unit {
        "" => 1,
        unit => SIZE_UNITS.iter().find(|(name, _)| *name == unit).ok_or_else(|| not_a_size(&quoted))?.1,
    };
    number.checked_mul(scale).ok_or_else(|| format!("{quoted} is too large"))
}

/// Parses a duration: one or more `<digits><unit>` parts, unit one of
/// `d h m s ms`, e.g. `"180s"`, `"500ms"`, `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let quoted = format!("{text:?}");
    let mut rest = text.trim();
    if rest.parse::<u64>().is_ok() {
        return Err(format!("{quoted} has no unit; write e.g. \"{rest}s\" or \"{rest}ms\""));
    }
    if rest.is_empty() {
        return Err(not_a_duration(&quoted));
    }
    let mut millis: u64 = 0;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_end = rest[digits_end..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| digits_end + i);
        let number: u64 = rest[..digits_end].parse().map_err(|_| not_a_duration(&quoted))?;
        let unit = &rest[digits_end..unit_end];
        let (_, scale) =
            DURATION_UNITS.iter().find(|(name, _)| *name == unit).ok_or_else(|| not_a_duration(&quoted))?;
        millis = number
            .checked_mul(*scale)
            .and_then(|part| millis.checked_add(part))
            .ok_or_else(|| format!("{quoted} is too long"))?;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_millis(millis))
}

/// Formats bytes exactly in the largest unit that divides them (`"4Gi"`, `"1G"`),
/// or as plain bytes (`"1023"`); [`parse_size`] reads it back unchanged.
pub fn format_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .find(|(_, scale)| bytes != 0 && bytes.is_multiple_of(*scale))
        .map_or_else(|| bytes.to_string(), |(unit, scale)| format!("{}{unit}", bytes / scale))
}

/// [`format_size`] for messages: a size without a unit says "bytes", and
/// about how many Ki/Mi/Gi/Ti when it is that large (`"89478485 bytes (~85.3Mi)"`,
/// `"24684100Ki (~23.5Gi)"`).
pub fn describe_size(bytes: u64) -> String {
    let size = format_size(bytes);
    let unit_given = !size.ends_with(|c: char| c.is_ascii_digit());
    let exact = if unit_given { size.clone() } else { format!("{size} bytes") };
    // Up to four digits read at a glance.
    if size.bytes().take_while(u8::is_ascii_digit).count() <= 4 {
        return exact;
    }
    match SIZE_UNITS[..4].iter().find(|(_, scale)| bytes >= *scale) {
        Some((unit, scale)) => format!("{exact} (~{:.1}{unit})", bytes as f64 / *scale as f64),
        None => exact,
    }
}

/// A number of cores for messages: `"1 core"`, `"0.5 cores"`.
pub fn describe_cores(cores: f64) -> String {
    if cores == 1.0 { "1 core".into() } else { format!("{cores} cores") }
}

/// Formats a duration as its nonzero parts, largest first (`"3m"`, `"1h30m"`,
/// `"1s500ms"`, `"0s"`), to whole milliseconds; [`parse_duration`] reads it back.
pub fn format_duration(duration: Duration) -> String {
    let mut millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, scale) in DURATION_UNITS {
        if millis >= scale {
            out += &format!("{}{unit}", millis / scale);
            millis %= scale;
        }
    }
    out
}

fn ser_size<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_size(*bytes))
}

fn ser_opt_size<S: Serializer>(bytes: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => serializer.serialize_some(&format_size(*bytes)),
        None => serializer.serialize_none(),
    }
}

fn ser_duration<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
[runtime]
workers = 4              # instances per replica
cpu = 1
memory = "4Gi"
gpu = "any"
gpu_memory = "3Gi"
timeout = "180s"
instance = "per-worker"

[autoscaler]
kind = "queue_depth"
# kind = "request_latency"   desired_latency = "30s", max_replicas = 5
min_replicas = 0
keep_warm = "10s"

[task_queue]
retries = 3
ttl = "2h"
callback_url = "https://example.com/beamlet/done"
"#;

    fn error(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn rules_added_later_bind_new_deploys_and_stored_apps_still_load() {
        for (text, key) in [
            ("[autoscaler]\nmin_replicas = 0", "[autoscaler] min_replicas"),
            ("[runtime]\ncpu = 0.001", "[runtime] cpu"),
        ] {
            let error = parse_new(text).expect_err(text).to_string();
            assert!(error.starts_with(key), "{text:?} gave {error}");
            assert!(parse(text).is_ok(), "stored with {text:?} before the rule, it still loads");
        }
        assert!(parse_new("[autoscaler]\nkind = \"queue_depth\"\nmin_replicas = 0\n").is_ok());
        assert!(parse_new("").is_ok());
    }

    #[test]
    fn empty_config_is_the_default() {
        let config = parse("").unwrap();
        assert_eq!(config, AppConfig::default());
        assert_eq!(config.runtime.memory, 512 * MIB);
        assert_eq!(config.runtime.timeout, Duration::from_secs(180));
        assert_eq!(config.task_queue.ttl, Duration::from_secs(7200));
        assert_eq!(config.task_queue.max_result_size, 16 * MIB);
        assert_eq!(config.autoscaler.baseline_replicas(), 1);
        assert_eq!(config.autoscaler.max_replicas(), 1);
    }

    #[test]
    fn spec_example_parses() {
        let config = parse(SPEC_EXAMPLE).unwrap();
        let runtime = &config.runtime;
        assert_eq!((runtime.workers, runtime.cpu, runtime.memory), (4, 1.0, 4 << 30));
        assert_eq!(runtime.memory_per_worker(), 1 << 30);
        assert_eq!((runtime.gpu.as_deref(), runtime.gpu_memory), (Some("any"), Some(3 << 30)));
        assert_eq!(runtime.instance, InstanceMode::PerWorker);
        let autoscaler = &config.autoscaler;
        assert_eq!(autoscaler.policy, Some(Policy::QueueDepth { max_tasks_per_replica: 30, max_replicas: 3 }));
        assert_eq!((autoscaler.baseline_replicas(), autoscaler.keep_warm), (0, Duration::from_secs(10)));
        assert_eq!(config.task_queue.callback_url.as_deref(), Some("https://example.com/beamlet/done"));

        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["runtime"]["memory"], "4Gi");
        assert_eq!(json["runtime"]["gpu_memory"], "3Gi");
        assert_eq!(json["runtime"]["timeout"], "3m");
        assert_eq!(json["runtime"]["instance"], "per-worker");
        assert_eq!(json["autoscaler"]["kind"], "queue_depth");
        assert_eq!(json["autoscaler"]["max_tasks_per_replica"], 30);
        assert_eq!(json["task_queue"]["ttl"], "2h");
    }

    #[test]
    fn request_latency_defaults_and_fixed_pools() {
        let config = parse("[autoscaler]\nkind = \"request_latency\"\nmin_replicas = 1").unwrap();
        let policy = Policy::RequestLatency { desired_latency: Duration::from_secs(30), max_replicas: 5 };
        assert_eq!(config.autoscaler.policy, Some(policy));
        assert_eq!((config.autoscaler.baseline_replicas(), config.autoscaler.max_replicas()), (1, 5));
        let json = serde_json::to_value(&config.autoscaler).unwrap();
        assert_eq!(json["desired_latency"], "30s");

        let fixed = parse("[autoscaler]\nmin_replicas = 2").unwrap().autoscaler;
        assert_eq!((fixed.policy, fixed.baseline_replicas(), fixed.max_replicas()), (None, 2, 2));
        assert_eq!(parse("[runtime]\ninstance = \"per-task\"").unwrap().runtime.instance, InstanceMode::PerTask);
    }

    #[test]
    fn unknown_keys_name_key_and_table() {
        let message = error("[runtime]\nwrkers = 4");
        assert!(
            message.starts_with("unknown key \"wrkers\" in [runtime]; expected one of: workers, cpu,"),
            "{message}"
        );
        assert!(error("[autoscaling]\nkind = \"queue_depth\"").contains("\"autoscaling\" in the top level"));
        assert!(error("[task_queue.extra]\na = 1").contains("\"extra\" in [task_queue]"));
        assert!(error("[autoscaler]\nmax_task_per_replica = 3").contains("\"max_task_per_replica\" in [autoscaler]"));
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(
            error("[runtime]\nmemory = \"4GB\""),
            r#"[runtime] memory: "4GB" is not a size; use e.g. "512Mi", "4Gi" (a whole number; binary Ki Mi Gi Ti, or decimal k M G T; no B)"#
        );
        let message = error("[runtime]\ntimeout = 180");
        assert!(message.starts_with("[runtime] timeout: 180 has no unit"), "{message}");
        assert!(error("[runtime]\nworkers = \"four\"").starts_with("[runtime] workers: invalid type"));
        let message = error("[autoscaler]\nkind = \"queue_depth\"\nkeep_warm = -5");
        assert_eq!(message, "[autoscaler] keep_warm: -5 is negative; a duration is 0 or more, e.g. \"30s\"");
        let message = error("[autoscaler]\nkind = \"queue_depth\"\nmax_replicas = -1");
        assert!(message.ends_with("invalid value: integer `-1`, expected a whole number"), "{message}");
        assert!(error("autoscaler = \"queue_depth\"").ends_with("expected a table (a [section] of keys)"));
        assert!(error("runtime = 5").starts_with("runtime: invalid type"));
        assert!(
            error("[task_queue]\nttl = \"2 hours\"").starts_with("[task_queue] ttl: \"2 hours\" is not a duration")
        );
    }

    #[test]
    fn impossible_combinations_name_the_key() {
        let cases = [
            ("[runtime]\nworkers = 0", "[runtime] workers"),
            ("[runtime]\nworkers = 257\nmemory = \"16Gi\"", "[runtime] workers"),
            ("[runtime]\nworkers = 8\nmemory = \"64Mi\"", "[runtime] memory"),
            ("[runtime]\ncpu = 0", "[runtime] cpu"),
            ("[runtime]\ncpu = -1.5", "[runtime] cpu"),
            ("[runtime]\ntimeout = \"0s\"", "[runtime] timeout"),
            ("[runtime]\ntimeout = \"25h\"", "[runtime] timeout"),
            ("[runtime]\ngpu_memory = \"3Gi\"", "[runtime] gpu_memory"),
            ("[runtime]\ngpu = \"\"", "[runtime] gpu"),
            ("[runtime]\ngpu = \"any\"\ngpu_memory = 1000", "[runtime] gpu_memory"),
            ("[runtime]\ninstance = \"per_task\"", "[runtime] instance"),
            ("[autoscaler]\nkind = \"queue_depth\"\nmin_replicas = 4", "[autoscaler] min_replicas"),
            ("[autoscaler]\nkind = \"request_latency\"\nmax_replicas = 0", "[autoscaler] max_replicas"),
            ("[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 0", "[autoscaler] max_tasks_per_replica"),
            ("[autoscaler]\nkind = \"request_latency\"\ndesired_latency = \"0s\"", "[autoscaler] desired_latency"),
            (
                "[autoscaler]\nkind = \"request_latency\"\nmax_tasks_per_replica = 3",
                "[autoscaler] max_tasks_per_replica",
            ),
            ("[autoscaler]\nkind = \"queue_depth\"\ndesired_latency = \"30s\"", "[autoscaler] desired_latency"),
            ("[autoscaler]\nmax_replicas = 3", "[autoscaler] max_replicas"),
            ("[autoscaler]\nkeep_warm = \"10s\"", "[autoscaler] keep_warm"),
            ("[autoscaler]\nkind = \"queue-depth\"", "[autoscaler] kind"),
            ("[task_queue]\nttl = \"0s\"", "[task_queue] ttl"),
            ("[task_queue]\nresult_ttl = \"0ms\"", "[task_queue] result_ttl"),
            ("[task_queue]\nmax_queued = 0", "[task_queue] max_queued"),
            ("[task_queue]\nmax_result_size = 0", "[task_queue] max_result_size"),
            ("[task_queue]\nmax_result_size = \"9223372036854775808\"", "[task_queue] max_result_size"),
            ("[task_queue]\nttl = \"18446744073709551615ms\"", "[task_queue] ttl"),
            ("[task_queue]\nresult_ttl = \"3651d\"", "[task_queue] result_ttl"),
            ("[runtime]\ntimeout = \"3000000000000h\"", "[runtime] timeout"),
            ("[autoscaler]\nkind = \"queue_depth\"\nmax_replicas = 100000", "[autoscaler] max_replicas"),
            ("[autoscaler]\nmin_replicas = 5000", "[autoscaler] min_replicas"),
            ("[task_queue]\ncallback_url = \"ftp://example.com\"", "[task_queue] callback_url"),
            ("[task_queue]\ncallback_url = \"https://\"", "[task_queue] callback_url"),
            ("[task_queue]\ncallback_url = \"http://[::1\"", "[task_queue] callback_url"),
            ("[task_queue]\ncallback_url = \"http:// spaces\"", "[task_queue] callback_url"),
        ];
        for (text, key) in cases {
            let message = error(text);
            assert!(message.starts_with(&format!("{key}: ")), "{text:?} gave {message:?}");
        }
    }

    #[test]
    fn a_size_without_a_unit_is_said_to_be_bytes() {
        let message = error("[runtime]\nmemory = 512");
        assert!(
            message.contains("512 bytes split across 1 worker leaves") && message.contains("write \"512Mi\""),
            "{message}"
        );
        let message = error("[runtime]\ngpu = \"any\"\ngpu_memory = 256");
        assert!(message.contains("256 bytes is less than the 1Mi") && message.contains("\"256Mi\""), "{message}");
        // A size with a unit was meant as written: no hint about bytes.
        for config in ["[runtime]\nmemory = \"1Ki\"", "[runtime]\ngpu = \"any\"\ngpu_memory = \"1Ki\""] {
            let message = error(config);
            assert!(message.contains("1Ki") && !message.contains("without a unit"), "{message}");
        }
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let message = error("[runtime]\nworkers = 4\nmemory = ");
        assert!(message.starts_with("TOML syntax error at line 3, column 10 (\"memory =\"): "), "{message}");
        let message = error("[runtime]\nworkers = 99999999999999999999");
        assert!(message.contains("\"workers = 99999999999999999999\"): the number is too large"), "{message}");
    }

    #[test]
    fn sizes_parse_and_round_trip() {
        let cases = [
            ("4Gi", 4 << 30),
            ("512Mi", 512 << 20),
            ("64Ki", 64 << 10),
            ("1G", 1_000_000_000),
            ("500M", 500_000_000),
            ("1024", 1024),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bytes in [0, 1, 1023, 1024, 3 << 30, 1_500_000, 16 << 20, u64::MAX] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(format_size(4 << 30), "4Gi");
        assert_eq!(describe_size(4 << 30), "4Gi");
        assert_eq!(describe_size(1001), "1001 bytes");
        assert_eq!(describe_size((256 << 20) / 3), "89478485 bytes (~85.3Mi)");
        assert_eq!(describe_size(24_684_100 << 10), "24684100Ki (~23.5Gi)");
        assert_eq!(describe_size(1536 << 20), "1536Mi");
        assert_eq!(parse("[task_queue]\nmax_result_size = 2048").unwrap().task_queue.max_result_size, 2048);
        for bad in ["4GB", "", "Gi", "-1", "1.5Gi", "99999999999Ti"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_and_round_trip() {
        let cases = [("180s", 180_000), ("500ms", 500), ("2m", 120_000), ("2h", 7_200_000), ("1h30m", 5_400_000)];
        for (text, millis) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(millis)), "{text}");
        }
        for millis in [0, 1, 999, 1_500, 180_000, 5_400_000, 90_061_001] {
            let duration = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration), "{millis}");
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert!(parse_duration("180").unwrap_err().contains("no unit"));
        for bad in ["", "s", "5x", "1.5s", "-5s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
