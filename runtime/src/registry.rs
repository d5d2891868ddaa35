//! Apps and their versions, and the compiled-component cache.
//!
//! Under `--data-dir`: `components/{digest}.wasm` (what was uploaded),
//! `compiled/{digest}-{engine}.cwasm` (precompiled for this build's engine,
//! loaded by replicas) and `apps/{name}.json` (the app's current version).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::config::{self, AppConfig};
use crate::engine::{self, Allocation};
use crate::host::bindings::FunctionPre;
use crate::host::{self, WorkerState};
use crate::supervisor::{Demand, Gpus};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// The WIT world a component was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum World {
    /// `beamlet:function/function`: typed handlers.
    #[serde(rename = "beamlet:function/function")]
    Function,
    /// `wasi:http/proxy`: standard HTTP handlers from any toolchain.
    #[serde(rename = "wasi:http/proxy")]
    HttpProxy,
}

impl World {
    /// The world's name, as the API shows it.
    pub(crate) fn wit_name(self) -> &'static str {
        match self {
            Self::Function => "beamlet:function/function",
            Self::HttpProxy => "wasi:http/proxy",
        }
    }
}

/// A version just deployed, and what the deploy learned of its component.
pub(crate) struct Deployed {
    pub app: App,
    /// It imports `beamlet:function/gpu` (its code calls the GPU).
    pub uses_gpu: bool,
    /// The version it follows, if any.
    pub previous: Option<AppVersion>,
}

/// The version a new one follows.
#[derive(Clone, Copy)]
pub(crate) enum Follows<'a> {
    /// This node's current version of the app, if any.
    ThisNode,
    /// The cluster's, as read from Redis (`None`: it has none). This node's
    /// copy may be behind it (not taken on yet), or ahead of it (a deploy
    /// the cluster never took, or an app deleted through another node).
    Cluster(Option<&'a AppVersion>),
}

/// What a component is: its world, and whether it calls the GPU.
struct Inspected {
    world: World,
    uses_gpu: bool,
}

/// One deployed version of an app, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppVersion {
    pub name: String,
    pub version: u32,
    pub world: World,
    /// sha256 of the uploaded component, hex.
    pub digest: String,
    /// The config as uploaded (TOML), empty for defaults.
    pub config_toml: String,
    /// When this version was deployed (ms since the epoch).
    pub deployed_at: u64,
    /// Signs callbacks (HMAC-SHA256); kept from one version to the next.
    pub callback_secret: String,
}

/// A deployed app: its version record, parsed config and compiled artifact.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub version: AppVersion,
    pub config: AppConfig,
    pub compiled: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DeployError {
    #[error(
        "app name {0:?} is not valid: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or \
         digit"
    )]
    BadName(String),
    #[error("the config is not valid: {0}")]
    BadConfig(#[from] config::ConfigError),
    /// No GPU of the node fits the app: none of its model, or none with
    /// `workers * gpu_memory`.
    #[error("{0}")]
    NoFittingGpu(String),
    /// A new version of another world while the app has tasks to run.
    #[error("{0}")]
    WorldChange(String),
    /// The app's `cpu` or `memory` is more than the whole node has.
    #[error("{0}")]
    TooBigForNode(String),
    #[error("the upload is empty: send the component's bytes in the multipart part `component`")]
    Empty,
    #[error(
        "the upload is not a WebAssembly file (it does not start with \\0asm); send the .wasm component your build produced"
    )]
    NotWasm,
    #[error(
        "the upload is a core WebAssembly module, not a component: build for the wasm32-wasip2 target \
         (cargo build --target wasm32-wasip2), or wrap the module with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("the component failed to compile: {0}")]
    Compile(String),
    #[error(
        "the component targets neither beamlet:function/function nor wasi:http/proxy: {reason}. Its exports \
         are [{exports}]; a handler built with beamlet-sdk exports `init` and `handle`, a wasi:http/proxy \
         component exports `wasi:http/incoming-handler`"
    )]
    WrongWorld { reason: String, exports: String },
    #[error(
        "the component imports {0}, which beamlet does not provide (not in that version or shape): a guest may \
         import wasi:cli, wasi:clocks, \
         wasi:random, wasi:io, wasi:filesystem, wasi:sockets (all denied), wasi:http and beamlet:function \
         interfaces; build it without that dependency (or for the wasm32-wasip2 target of a Rust toolchain or \
         SDK that targets WASI 0.2)"
    )]
    UnsupportedImport(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Where the callback secrets of removed apps are kept, in the data dir.
const REMOVED_SECRETS: &str = "removed-secrets.json";

/// The callback secrets of the apps once called `name`, as
/// `removed-secrets.json` holds them: a name deployed again after a removal
/// has a new secret, and a task's callback is signed with the one of the app
/// it was submitted to.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RemovedSecrets {
    /// As written before removals were timed: the last removed app's secret.
    Last(String),
    Each(Vec<RemovedSecret>),
}

/// One removed app's callback secret, with when it was removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RemovedSecret {
    secret: String,
    /// When the app was removed (ms since the epoch).
    removed_at: u64,
    /// When no task of it is left to call back, and the secret goes (ms
    /// since the epoch): its tasks' results are forgotten by then, and a
    /// task left queued by a crash has expired. Kept for good when absent
    /// (written before this was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_until: Option<u64>,
}

/// After the last of a removed app's tasks is forgotten, the time its
/// callback may still take (retries, a node restarted late).
const SECRET_KEPT_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Drops the secrets no task can want any more, and the names left with none.
fn forget_removed_secrets(removed: &mut BTreeMap<String, Vec<RemovedSecret>>, now: u64) {
    for secrets in removed.values_mut() {
        secrets.retain(|secret| secret.keep_until.is_none_or(|until| until > now));
    }
    removed.retain(|_, secrets| !secrets.is_empty());
}

impl RemovedSecrets {
    fn into_each(self) -> Vec<RemovedSecret> {
        match self {
            // Removed before any task that could still want it was made, as far as we know.
            Self::Last(secret) => vec![RemovedSecret { secret, removed_at: 0, keep_until: None }],
            Self::Each(each) => each,
        }
    }
}

pub(crate) struct Registry {
    dir: PathBuf,
    engine: Engine,
    linker: Linker<WorkerState>,
    engine_key: String,
    apps: Mutex<BTreeMap<String, App>>,
    /// The callback secrets of removed apps, by name (kept in
    /// `removed-secrets.json`): the tasks a removal cancels still get their
    /// signed callbacks, after a restart too.
    removed_secrets: Mutex<BTreeMap<String, Vec<RemovedSecret>>>,
    /// Held (shared) while apps change (see [`Registry::changing`]), and
    /// exclusively while unused files are collected.
    changes: RwLock<()>,
}

impl Registry {
    /// Opens the registry under `data_dir`, recompiling any app whose
    /// compiled artifact is missing (for example after an upgrade).
    pub(crate) fn open(data_dir: &Path) -> Result<Self> {
        for sub in ["components", "compiled", "apps"] {
            std::fs::create_dir_all(data_dir.join(sub))
                .with_context(|| format!("failed to create {:?}", data_dir.join(sub)))?;
        }
        let engine = engine::new_engine(Allocation::OnDemand)?;
        let linker = host::linker(&engine)?;
        let registry = Self {
            dir: data_dir.to_owned(),
            engine_key: engine::compatibility_key(&engine),
            engine,
            linker,
            apps: Mutex::default(),
            removed_secrets: Mutex::default(),
            changes: RwLock::default(),
        };
        let secrets = data_dir.join(REMOVED_SECRETS);
        match std::fs::read(&secrets) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            read => match read.map_err(anyhow::Error::from).and_then(|json| Ok(serde_json::from_slice(&json)?)) {
                Ok(removed) => {
                    let removed: BTreeMap<String, RemovedSecrets> = removed;
                    let mut removed = removed.into_iter().map(|(name, secrets)| (name, secrets.into_each())).collect();
                    forget_removed_secrets(&mut removed, crate::queue::now_ms());
                    *registry.removed_secrets.lock().unwrap() = removed;
                }
                Err(e) => tracing::error!("failed to read {secrets:?}: {e}; callbacks of removed apps go unsent"),
            },
        }
        for entry in std::fs::read_dir(data_dir.join("apps"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                match registry.load(&path) {
                    Ok(app) => {
                        registry.apps.lock().unwrap().insert(app.version.name.clone(), app);
                    }
                    Err(e) => tracing::error!("failed to load app {path:?}: {e:#}"),
                }
            }
        }
        registry.collect_unused();
        Ok(registry)
    }

    /// Held by a change of apps from its start to its end (a deploy, from
    /// its compile until the cluster took the new version or the old one
    /// is back): the files it writes, and those of the version it may put
    /// back, are not collected meanwhile.
    pub(crate) fn changing(&self) -> RwLockReadGuard<'_, ()> {
        self.changes.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the uploaded and compiled components no app uses any more
    /// (versions replaced, apps removed, builds of another engine): a
    /// deploy per commit would otherwise fill the disk. Skipped while apps
    /// change; the change collects once it ends.
    pub(crate) fn collect_unused(&self) {
        let Ok(_exclusive) = self.changes.try_write() else { return };
        let used: Vec<PathBuf> = {
            let apps = self.apps.lock().unwrap();
            apps.values()
                .flat_map(|app| {
                    let digest = &app.version.digest;
                    [self.component_path(digest), self.compiled_path(digest), digest_path(&self.compiled_path(digest))]
                })
                .collect()
        };
        let (mut files, mut bytes) = (0, 0);
        for sub in ["components", "compiled"] {
            let Ok(entries) = std::fs::read_dir(self.dir.join(sub)) else { continue };
            for path in entries.flatten().map(|entry| entry.path()) {
                if used.contains(&path) || !path.is_file() {
                    continue;
                }
                let size = path.metadata().map_or(0, |meta| meta.len());
                match std::fs::remove_file(&path) {
                    Ok(()) => (files, bytes) = (files + 1, bytes + size),
                    Err(e) => tracing::warn!("failed to delete the unused {path:?}: {e}"),
                }
            }
        }
        if files > 0 {
            tracing::info!(files, "deleted the components no app uses any more ({})", config::describe_size(bytes));
        }
    }

    fn load(&self, path: &Path) -> Result<App> {
        let version: AppVersion = serde_json::from_slice(&std::fs::read(path)?)?;
        let config = config::parse(&version.config_toml)?;
        let compiled = self.compiled_path(&version.digest);
        // The compiled file is a cache: one that is missing or damaged on
        // disk is built again from the component.
        let cached = compiled.exists().then(|| self.check_cached(&compiled));
        if let Some(Err(e)) = &cached {
            tracing::warn!("the compiled component {compiled:?} cannot be used ({e:#}); compiling it again");
        }
        if cached.is_none_or(|checked| checked.is_err()) {
            let source = self.component_path(&version.digest);
            let wasm = std::fs::read(&source).with_context(|| format!("failed to read its component {source:?}"))?;
            let component = self.compile(&wasm).map_err(|e| anyhow::anyhow!("{e}"))?;
            self.write_compiled(&component, &compiled)?;
        }
        Ok(App { version, config, compiled })
    }

    fn component_path(&self, digest: &str) -> PathBuf {
        self.dir.join("components").join(format!("{digest}.wasm"))
    }

    fn compiled_path(&self, digest: &str) -> PathBuf {
        self.dir.join("compiled").join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    pub(crate) fn get(&self, name: &str) -> Option<App> {
        self.apps.lock().unwrap().get(name).cloned()
    }

    pub(crate) fn list(&self) -> Vec<App> {
        self.apps.lock().unwrap().values().cloned().collect()
    }

    /// Validates, compiles and records a new version of `name`. Blocking:
    /// compiling a component takes a while.
    /// `unfinished`: the app's queued and running tasks, which a new version
    /// of another world could not run.
    /// `fits`: whether a node (this one, or one of its cluster) can run
    /// the app's replicas, see [`fits_node`].
    /// `follows`: the version the new one follows (its number, callback
    /// secret and world count).
    pub(crate) fn deploy(
        &self,
        name: &str,
        wasm: &[u8],
        config_toml: &str,
        fits: impl Fn(&AppConfig) -> Result<(), DeployError>,
        unfinished: u64,
        follows: Follows<'_>,
    ) -> Result<Deployed, DeployError> {
        validate_name(name)?;
        let config = config::parse_new(config_toml)?;
        fits(&config)?;
        check_header(wasm)?;
        let digest = hex(&Sha256::digest(wasm));
        let compiled = self.compiled_path(&digest);
        let Inspected { world, uses_gpu } = if compiled.exists() && self.check_cached(&compiled).is_ok() {
            // SAFETY: written by `write_compiled` from this engine (its key is in the name).
            let component = unsafe { Component::deserialize_file(&self.engine, &compiled) };
            match component {
                Ok(component) => self.inspect(&component)?,
                Err(_) => self.compile_and_store(wasm, &compiled)?,
            }
        } else {
            self.compile_and_store(wasm, &compiled)?
        };
        write_atomic(&self.component_path(&digest), wasm)?;
        let mut apps = self.apps.lock().unwrap();
        let previous = match follows {
            Follows::ThisNode => apps.get(name).map(|app| &app.version),
            Follows::Cluster(shared) => shared,
        };
        if let Some(previous) = previous.filter(|previous| previous.world != world && unfinished > 0) {
            return Err(DeployError::WorldChange(format!(
                "app {name:?} is a {} app with {unfinished} queued or running task{}, which a {} component cannot \
                 run; wait for them or cancel them, or delete the app first",
                previous.world.wit_name(),
                if unfinished == 1 { "" } else { "s" },
                world.wit_name()
            )));
        }
        let version = AppVersion {
            name: name.to_owned(),
            version: previous.map_or(1, |v| v.version + 1),
            callback_secret: previous.map_or_else(new_secret, |v| v.callback_secret.clone()),
            world,
            digest,
            config_toml: config_toml.to_owned(),
            deployed_at: crate::queue::now_ms(),
        };
        let json = serde_json::to_vec_pretty(&version).context("failed to encode app record")?;
        write_atomic(&self.dir.join("apps").join(format!("{name}.json")), &json)?;
        let app = App { version, config, compiled };
        let previous = previous.cloned();
        apps.insert(name.to_owned(), app.clone());
        Ok(Deployed { app, uses_gpu, previous })
    }

    /// Takes on a version deployed on another node of the cluster, as it
    /// is (its number and callback secret included). Blocking: it may
    /// compile. Whether this node can run it is [`fits_node`]'s question.
    pub(crate) fn adopt(&self, version: AppVersion, wasm: &[u8]) -> Result<App, DeployError> {
        validate_name(&version.name)?;
        let config = config::parse(&version.config_toml)?;
        check_header(wasm)?;
        let digest = hex(&Sha256::digest(wasm));
        if digest != version.digest {
            return Err(DeployError::Internal(anyhow::anyhow!(
                "the component stored for app {:?} has digest {digest}, its record says {}",
                version.name,
                version.digest
            )));
        }
        let compiled = self.compiled_path(&digest);
        if !compiled.exists() {
            self.compile_and_store(wasm, &compiled)?;
        }
        write_atomic(&self.component_path(&digest), wasm)?;
        let json = serde_json::to_vec_pretty(&version).context("failed to encode app record")?;
        write_atomic(&self.dir.join("apps").join(format!("{}.json", version.name)), &json)?;
        let app = App { version, config, compiled };
        self.apps.lock().unwrap().insert(app.version.name.clone(), app.clone());
        Ok(app)
    }

    /// The component uploaded as `digest`, if this node has it.
    pub(crate) fn component(&self, digest: &str) -> Option<Vec<u8>> {
        std::fs::read(self.component_path(digest)).ok()
    }

    /// Puts `before` back as the app's current version (`None`: no such
    /// app), in place of a version just deployed here that the cluster may
    /// not have taken.
    pub(crate) fn restore(&self, name: &str, before: Option<App>) -> Result<()> {
        let Some(app) = before else { return self.remove(name).map(drop) };
        let json = serde_json::to_vec_pretty(&app.version).context("failed to encode app record")?;
        write_atomic(&self.dir.join("apps").join(format!("{name}.json")), &json)?;
        self.apps.lock().unwrap().insert(name.to_owned(), app);
        Ok(())
    }

    /// The apps ever removed here (their names), whether deployed again since or not.
    pub(crate) fn removed_names(&self) -> Vec<String> {
        self.removed_secrets.lock().unwrap().keys().cloned().collect()
    }

    /// The callback secret of the removed app called `name` that a task
    /// made at `created_at` belonged to: the first removed after it; else
    /// (`None` for a task of the current app) the last removed one, with
    /// `or_last`.
    pub(crate) fn removed_secret(&self, name: &str, created_at: u64, or_last: bool) -> Option<String> {
        let removed = self.removed_secrets.lock().unwrap();
        let each = removed.get(name)?;
        let owner = each.iter().filter(|r| r.removed_at >= created_at).min_by_key(|r| r.removed_at);
        let last = || each.iter().max_by_key(|r| r.removed_at).filter(|_| or_last);
        owner.or_else(last).map(|r| r.secret.clone())
    }

    pub(crate) fn remove(&self, name: &str) -> Result<Option<App>> {
        let mut apps = self.apps.lock().unwrap();
        let Some(app) = apps.remove(name) else { return Ok(None) };
        {
            let mut removed = self.removed_secrets.lock().unwrap();
            let removed_at = crate::queue::now_ms();
            let secret = app.version.callback_secret.clone();
            let queue = &app.config.task_queue;
            let kept = queue.ttl.max(queue.result_ttl).saturating_add(SECRET_KEPT_AFTER);
            let keep_until = Some(removed_at.saturating_add(u64::try_from(kept.as_millis()).unwrap_or(u64::MAX)));
            forget_removed_secrets(&mut removed, removed_at);
            removed.entry(name.to_owned()).or_default().push(RemovedSecret { secret, removed_at, keep_until });
            let json = serde_json::to_vec_pretty(&*removed).context("failed to encode the removed apps' secrets")?;
            write_atomic(&self.dir.join(REMOVED_SECRETS), &json)?;
        }
        let path = self.dir.join("apps").join(format!("{name}.json"));
        std::fs::remove_file(&path).with_context(|| format!("failed to remove {path:?}"))?;
        Ok(Some(app))
    }

    fn compile(&self, wasm: &[u8]) -> Result<Component, DeployError> {
        Component::new(&self.engine, wasm).map_err(|e| DeployError::Compile(format!("{e:#}")))
    }

    fn compile_and_store(&self, wasm: &[u8], compiled: &Path) -> Result<Inspected, DeployError> {
        let component = self.compile(wasm)?;
        let inspected = self.inspect(&component)?;
        self.write_compiled(&component, compiled)?;
        Ok(inspected)
    }

    /// Whether the compiled component cached at `compiled` is whole: its
    /// bytes match the digest written with them. One written before digests
    /// were is checked by loading it, and its digest written then.
    fn check_cached(&self, compiled: &Path) -> Result<()> {
        let bytes = std::fs::read(compiled)?;
        let digest = hex(&Sha256::digest(&bytes));
        match std::fs::read_to_string(digest_path(compiled)) {
            Ok(written) if written.trim() == digest => Ok(()),
            Ok(_) => anyhow::bail!("its contents no longer match the digest written with it"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // SAFETY: written by `write_compiled` from this engine (its key is in the name).
                unsafe { Component::deserialize(&self.engine, &bytes) }.map_err(anyhow::Error::from)?;
                write_atomic(&digest_path(compiled), digest.as_bytes())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the compiled component, and beside it (`.sha256`) its digest,
    /// by which a copy damaged on disk is told at the next start.
    fn write_compiled(&self, component: &Component, path: &Path) -> Result<()> {
        let bytes = component.serialize().map_err(anyhow::Error::from).context("failed to serialize component")?;
        write_atomic(path, &bytes)?;
        write_atomic(&digest_path(path), hex(&Sha256::digest(&bytes)).as_bytes())
    }

    /// Checks the component against the worlds this node serves, and
    /// whether it calls the GPU interface.
    fn inspect(&self, component: &Component) -> Result<Inspected, DeployError> {
        let function = self.linker.instantiate_pre(component).and_then(FunctionPre::new);
        let proxy = self.linker.instantiate_pre(component).and_then(ProxyPre::new);
        let ty = component.component_type();
        let world = match (function, proxy) {
            (Ok(_), _) => World::Function,
            (_, Ok(_)) => World::HttpProxy,
            (Err(e), Err(_)) => {
                let reason = format!("{e:#}");
                if let Some(import) = missing_import(&reason) {
                    return Err(DeployError::UnsupportedImport(import.to_owned()));
                }
                let exports: Vec<&str> = ty.exports(&self.engine).map(|(name, _)| name).collect();
                return Err(DeployError::WrongWorld { reason, exports: exports.join(", ") });
            }
        };
        // A component imports only the interfaces its code calls.
        let uses_gpu = ty
            .imports(&self.engine)
            .any(|(name, _)| name == "beamlet:function/gpu" || name.starts_with("beamlet:function/gpu@"));
        Ok(Inspected { world, uses_gpu })
    }
}

/// Whether replicas of an app with `config` can run on a node with `node`
/// cores and memory and `gpus`, and if not, why.
pub(crate) fn fits_node(config: &config::AppConfig, node: Demand, gpus: &Gpus) -> Result<(), DeployError> {
    let baseline = config.autoscaler.baseline_replicas();
    check_fits_node(config, node, baseline)?;
    check_gpu(config, gpus, baseline)
}

/// Whether one replica of an app with `config` can run on the node: in a
/// cluster, the baseline (`min_replicas`, the fixed pool) is the nodes'
/// together (see [`replicas_fitting`]).
pub(crate) fn fits_one(config: &config::AppConfig, node: Demand, gpus: &Gpus) -> Result<(), DeployError> {
    check_fits_node(config, node, 1)?;
    check_gpu(config, gpus, 1)
}

/// How many replicas of an app with `config` the node could run at once.
pub(crate) fn replicas_fitting(config: &config::AppConfig, node: Demand, gpus: &Gpus) -> u32 {
    if fits_one(config, node, gpus).is_err() {
        return 0;
    }
    let runtime = &config.runtime;
    let by_cpu = if runtime.cpu > 0.0 { ((node.cpu + 1e-9) / runtime.cpu).floor() } else { f64::from(u32::MAX) };
    let by_memory = node.memory.checked_div(runtime.memory).unwrap_or(u64::MAX);
    let by_gpu = match &runtime.gpu {
        Some(model) => gpus.devices.iter().filter(|gpu| gpu.is_model(model)).count(),
        None => usize::MAX,
    };
    let fitting = (by_cpu.min(f64::from(u32::MAX)) as u64).min(by_memory).min(by_gpu as u64);
    u32::try_from(fitting).unwrap_or(u32::MAX)
}

/// A replica reserves its app's `cpu` and `memory`: more than the node has
/// in all could never start, nor could more replicas than fit be kept
/// running with no load (`baseline`: `min_replicas`, or the fixed pool).
fn check_fits_node(config: &config::AppConfig, node: Demand, baseline: u32) -> Result<(), DeployError> {
    let runtime = &config.runtime;
    let too_many = f64::from(baseline) * runtime.cpu > node.cpu + 1e-9
        || runtime.memory.saturating_mul(u64::from(baseline)) > node.memory;
    if baseline > 1 && too_many {
        return Err(DeployError::TooBigForNode(format!(
            "[autoscaler] min_replicas = {baseline} replicas of cpu = {} and memory = {} need more than the {} \
             and {} this node has for replicas (serve --cpus, --memory); lower min_replicas",
            runtime.cpu,
            config::describe_size(runtime.memory),
            config::describe_cores(node.cpu),
            config::describe_size(node.memory)
        )));
    }
    if runtime.cpu > node.cpu {
        return Err(DeployError::TooBigForNode(format!(
            "[runtime] cpu = {} is more than the {} this node has for replicas (serve --cpus); lower cpu",
            runtime.cpu,
            config::describe_cores(node.cpu)
        )));
    }
    if runtime.memory > node.memory {
        return Err(DeployError::TooBigForNode(format!(
            "[runtime] memory = {} is more than the {} this node has for replicas (serve --memory); lower memory",
            config::describe_size(runtime.memory),
            config::describe_size(node.memory)
        )));
    }
    Ok(())
}

/// A GPU app needs a GPU of its model on this node, and its workers share
/// it: `workers * gpu_memory` must fit that GPU's memory. (Refused at deploy,
/// like cores the node does not have: its replicas would wait forever.)
fn check_gpu(config: &config::AppConfig, gpus: &Gpus, baseline: u32) -> Result<(), DeployError> {
    let runtime = &config.runtime;
    let Some(model) = &runtime.gpu else { return Ok(()) };
    let fitting: Vec<_> = gpus.devices.iter().filter(|gpu| gpu.is_model(model)).collect();
    let Some(largest) = fitting.iter().max_by_key(|gpu| gpu.memory_bytes) else {
        return Err(DeployError::NoFittingGpu(if gpus.devices.is_empty() {
            "[runtime] gpu: this node has no GPU; on a machine without one, run `beamlet serve --gpu-backend cpu \
             --gpus 1` to serve GPU apps on the CPU backend"
                .into()
        } else {
            let names: Vec<_> = gpus.devices.iter().map(|gpu| gpu.name.as_str()).collect();
            format!(
                "[runtime] gpu = {model:?} matches none of this node's GPUs ({}); use gpu = \"any\" or part of one \
                 of those names",
                names.join(", ")
            )
        }));
    };
    if baseline as usize > fitting.len() {
        return Err(DeployError::NoFittingGpu(format!(
            "[autoscaler] min_replicas = {baseline}: each replica holds a whole GPU and {} of this node's fit; lower \
             min_replicas",
            fitting.len()
        )));
    }
    let (Some(per_worker), Some(needed)) = (runtime.gpu_memory, runtime.gpu_memory_per_replica()) else {
        return Ok(());
    };
    if largest.memory_bytes < needed {
        return Err(DeployError::NoFittingGpu(format!(
            "[runtime] workers * gpu_memory = {} * {} = {} is more than the {} of this node's largest fitting GPU \
             ({}); lower gpu_memory or workers",
            runtime.workers,
            config::describe_size(per_worker),
            config::describe_size(needed),
            config::describe_size(largest.memory_bytes),
            largest.name
        )));
    }
    Ok(())
}

/// The import the linker lacked, from its error (`component imports
/// instance \`foo:bar/baz@1.0.0\`, but a matching implementation was not
/// found in the linker`).
fn missing_import(reason: &str) -> Option<&str> {
    if !reason.contains("matching implementation was not found in the linker") {
        return None;
    }
    let after = reason.split_once("component imports ")?.1;
    after.split('`').nth(1)
}

/// App names are DNS labels: they go into URLs and may become host names.
pub(crate) fn validate_name(name: &str) -> Result<(), DeployError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(DeployError::BadName(name.to_owned())) }
}

/// Tells junk and core modules from components by the 8-byte header.
fn check_header(wasm: &[u8]) -> Result<(), DeployError> {
    if wasm.is_empty() {
        return Err(DeployError::Empty);
    }
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(DeployError::NotWasm);
    }
    // Bytes 4..8: version 1 (core) vs the component layer (0x0d, 0, 1, 0).
    if wasm[4..8] == [1, 0, 0, 0] {
        return Err(DeployError::CoreModule);
    }
    Ok(())
}

/// 244 random bits, hex.
fn new_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Where the digest of a compiled component is kept.
fn digest_path(compiled: &Path) -> PathBuf {
    compiled.with_extension("cwasm.sha256")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader sees the old file or the whole new one. Concurrent writers (two
/// deploys of one component) each use a temporary file of their own.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("failed to write {tmp:?}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {path:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_atomic_writes_of_one_file_all_succeed() {
        let dir = crate::queue::ScratchStore::new("write-atomic");
        let path = dir.path().with_file_name("component.wasm");
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || write_atomic(&path, &vec![i; 1 << 20]))
            })
            .collect();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() == 1 << 20 && bytes.iter().all(|b| *b == bytes[0]), "one writer's whole file");
    }

    #[test]
    fn removed_apps_secrets_go_once_no_task_can_want_them() {
        let secret = |name: &str, keep_until| RemovedSecret { secret: name.to_owned(), removed_at: 1, keep_until };
        let mut removed = BTreeMap::from([
            ("old".to_owned(), vec![secret("old", Some(100))]),
            ("mixed".to_owned(), vec![secret("gone", Some(100)), secret("kept", Some(101))]),
            ("unknown".to_owned(), vec![secret("unknown", None)]),
        ]);
        forget_removed_secrets(&mut removed, 100);
        let left: Vec<_> = removed.values().flatten().map(|s| s.secret.as_str()).collect();
        assert_eq!(left, ["kept", "unknown"]);
        assert!(!removed.contains_key("old"), "a name left with no secret goes");
    }

    #[test]
    fn the_import_a_linker_lacks_is_named() {
        let reason = "component imports instance `foo:bar/baz@1.0.0`, but a matching implementation was not found \
                      in the linker: instance export `f` has the wrong type";
        assert_eq!(missing_import(reason), Some("foo:bar/baz@1.0.0"));
        assert_eq!(missing_import("expected a `handle` export"), None);
    }

    #[test]
    fn names() {
        for ok in ["hello", "a", "gpu-mlp-2"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "-x", "x-", "a_b", "a/b", "a?b", "..", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// The node checks with the app's own baseline, as a single node makes them.
    fn fits_cores(config: &config::AppConfig, node: Demand) -> Result<(), DeployError> {
        check_fits_node(config, node, config.autoscaler.baseline_replicas())
    }

    fn fits_gpu(config: &config::AppConfig, gpus: &Gpus) -> Result<(), DeployError> {
        check_gpu(config, gpus, config.autoscaler.baseline_replicas())
    }

    #[test]
    fn replicas_must_fit_the_node() {
        let runtime = |toml: &str| config::parse(toml).unwrap();
        let node = Demand { cpu: 2.0, memory: 8 << 30 };
        assert!(fits_cores(&runtime("[runtime]\ncpu = 2\nmemory = \"8Gi\"\n"), node).is_ok());
        let DeployError::TooBigForNode(why) = fits_cores(&runtime("[runtime]\ncpu = 1000\n"), node).unwrap_err() else {
            panic!()
        };
        assert!(why.contains("cpu = 1000") && why.contains("2 cores"), "{why}");
        let DeployError::TooBigForNode(why) = fits_cores(&runtime("[runtime]\nmemory = \"1Ti\"\n"), node).unwrap_err()
        else {
            panic!()
        };
        assert!(why.contains("memory = 1Ti") && why.contains("8Gi"), "{why}");
        // The replicas kept with no load must fit too.
        assert!(fits_cores(&runtime("[autoscaler]\nmin_replicas = 2\n"), node).is_ok());
        let many = runtime("[runtime]\ncpu = 0.25\n[autoscaler]\nmin_replicas = 9\n");
        let DeployError::TooBigForNode(why) = fits_cores(&many, node).unwrap_err() else { panic!() };
        assert!(why.contains("min_replicas = 9"), "{why}");
    }

    #[test]
    fn gpu_apps_must_fit_their_gpu() {
        let gpus = |memory: u64| Gpus {
            backend: Some(crate::ipc::GpuBackendKind::Cpu),
            devices: vec![crate::supervisor::NodeGpu {
                index: 0,
                name: "cpu-backend-0".into(),
                memory_bytes: memory,
                uuid: None,
            }],
        };
        let runtime = |toml: &str| config::parse(toml).unwrap();
        let app = runtime("[runtime]\nworkers = 4\ngpu = \"any\"\ngpu_memory = \"1Gi\"\n");
        assert!(fits_gpu(&app, &gpus(4 << 30)).is_ok(), "4 x 1Gi fits 4Gi");
        let why = |result: Result<(), DeployError>| match result {
            Err(DeployError::NoFittingGpu(why)) => why,
            other => panic!("{other:?}"),
        };
        let too_small = why(fits_gpu(&app, &gpus(3 << 30)));
        assert!(too_small.contains("4 * 1Gi = 4Gi") && too_small.contains("3Gi"), "{too_small}");
        assert!(why(fits_gpu(&app, &Gpus::default())).contains("--gpu-backend cpu"), "no GPU here");
        let other_model = runtime("[runtime]\ngpu = \"H100\"\n");
        assert!(why(fits_gpu(&other_model, &gpus(1 << 30))).contains("(cpu-backend-0)"), "no H100 here");
        assert!(fits_gpu(&runtime("[runtime]\ngpu = \"CPU-backend\"\n"), &gpus(1 << 30)).is_ok());
        let two = runtime("[runtime]\ngpu = \"any\"\n[autoscaler]\nmin_replicas = 2\n");
        assert!(why(fits_gpu(&two, &gpus(1 << 30))).contains("each replica holds a whole GPU"));
    }

    #[test]
    fn headers() {
        assert!(matches!(check_header(b""), Err(DeployError::Empty)));
        assert!(matches!(check_header(b"hello world"), Err(DeployError::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(DeployError::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
