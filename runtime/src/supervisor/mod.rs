//! Runs each app's replicas: starts them for the current version, drains the
//! old version's after a deploy, and stops them when the app is removed.

mod replica;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use self::replica::{Plan, ReplicaHandle};
pub(crate) use self::replica::{ReplicaInfo, ReplicaState, start_process};
use crate::ipc::ReplicaSpec;
use crate::node::AppLogs;
use crate::queue::Dispatch;
use crate::registry::App;

pub(crate) struct Supervisor {
    exe: PathBuf,
    dispatch: Arc<Dispatch>,
    logs: Arc<AppLogs>,
    next_replica: AtomicU64,
    apps: Mutex<HashMap<String, AppReplicas>>,
}

#[derive(Default)]
struct AppReplicas {
    current: Vec<ReplicaHandle>,
    /// Replicas of earlier versions finishing their tasks.
    draining: Vec<ReplicaHandle>,
}

impl Supervisor {
    pub(crate) fn new(exe: PathBuf, dispatch: Arc<Dispatch>, logs: Arc<AppLogs>) -> Self {
        Self { exe, dispatch, logs, next_replica: AtomicU64::new(0), apps: Mutex::default() }
    }

    /// Starts replicas for `app`'s version and drains any older ones.
    pub(crate) fn run(&self, app: &App) {
        let name = &app.version.name;
        let count = fixed_replicas(app);
        let current = (0..count).map(|_| self.start_replica(app)).collect();
        let mut apps = self.apps.lock().unwrap();
        let replicas = apps.entry(name.clone()).or_default();
        let old = std::mem::replace(&mut replicas.current, current);
        for handle in &old {
            handle.stop();
        }
        replicas.draining.retain(|handle| handle.info().state != ReplicaState::Stopped);
        replicas.draining.extend(old);
    }

    fn start_replica(&self, app: &App) -> ReplicaHandle {
        let n = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let runtime = &app.config.runtime;
        let spec = ReplicaSpec {
            app: app.version.name.clone(),
            version: app.version.version,
            replica: format!("{}-v{}-r{n}", app.version.name, app.version.version),
            compiled: app.compiled.to_string_lossy().into_owned(),
            workers: runtime.workers,
            memory_per_worker: runtime.memory_per_worker(),
            fresh_instance_per_task: runtime.instance == crate::config::InstanceMode::PerTask,
            init_timeout_ms: u64::try_from(runtime.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        replica::spawn(Plan { exe: self.exe.clone(), spec, dispatch: self.dispatch.clone(), logs: self.logs.clone() })
    }

    /// Drains and stops every replica of `name`.
    pub(crate) fn remove(&self, name: &str) {
        if let Some(replicas) = self.apps.lock().unwrap().remove(name) {
            for handle in replicas.current.iter().chain(&replicas.draining) {
                handle.stop();
            }
        }
    }

    /// The app's replicas, current version first.
    pub(crate) fn replicas(&self, name: &str) -> Vec<ReplicaInfo> {
        let apps = self.apps.lock().unwrap();
        let Some(replicas) = apps.get(name) else { return Vec::new() };
        replicas
            .current
            .iter()
            .chain(replicas.draining.iter())
            .map(ReplicaHandle::info)
            .filter(|info| info.state != ReplicaState::Stopped)
            .collect()
    }
}

/// Replicas the app runs. The autoscaler is not in this node yet, so an app
/// configured for scale to zero still gets one replica rather than none.
pub(crate) fn fixed_replicas(app: &App) -> u32 {
    app.config.autoscaler.baseline_replicas().max(1)
}
