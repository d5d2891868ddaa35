//! Runs each app's replicas: places and starts them for the current version,
//! drains the old version's after a deploy, scales them as the autoscaler
//! decides, and stops them when the app is removed.

mod placement;
mod replica;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) use self::placement::{Capacity, Demand, GpuDemand, Gpus, NodeGpu};
use self::replica::{Admit, Plan, ReplicaHandle};
pub(crate) use self::replica::{ReplicaInfo, ReplicaState, start_process};
use crate::autoscaler::{Decision, Placement, ReplicaSample, Sample};
use crate::config::AutoscalerConfig;
use crate::ipc::ReplicaSpec;
use crate::metrics::Metrics;
use crate::node::AppLogs;
use crate::queue::{Counts, Dispatch};
use crate::registry::App;

/// Run times of an app's recent tasks, for the request-latency policy.
#[derive(Default)]
pub(crate) struct TaskTimes(Mutex<VecDeque<Duration>>);

/// How many recent tasks the average covers.
const RECENT_TASKS: usize = 50;

impl TaskTimes {
    pub(crate) fn record(&self, time: Duration) {
        let mut times = self.0.lock().unwrap();
        if times.len() == RECENT_TASKS {
            times.pop_front();
        }
        times.push_back(time);
    }

    pub(crate) fn average(&self) -> Option<Duration> {
        let times = self.0.lock().unwrap();
        let count = u32::try_from(times.len()).ok().filter(|n| *n > 0)?;
        Some(times.iter().sum::<Duration>() / count)
    }
}

/// The other nodes of a cluster, as replicas that waited for room see them.
pub(crate) trait ClusterSlots: Send + Sync {
    /// Counts one more replica of `app` (`replica`, on this node), unless
    /// the cluster's nodes run `desired` already (or cannot be asked): then
    /// why it waits.
    fn claim(&self, app: &str, replica: &str, desired: u32) -> Result<(), String>;
}

pub(crate) struct Supervisor {
    exe: PathBuf,
    dispatch: Arc<Dispatch>,
    logs: Arc<AppLogs>,
    capacity: Arc<Capacity>,
    metrics: Arc<Metrics>,
    bodies: Arc<crate::bodies::Bodies>,
    next_replica: AtomicU64,
    /// Ends replica ids in a cluster (`@` and the start of this node's id),
    /// so a task's replica says which node ran it.
    node_tag: String,
    apps: Mutex<HashMap<String, AppReplicas>>,
    /// The node is shutting down: no replica starts.
    closed: AtomicBool,
    /// In a cluster: asked before a replica that waited for room starts.
    slots: Option<Arc<dyn ClusterSlots>>,
}

struct AppReplicas {
    app: App,
    current: Vec<ReplicaHandle>,
    /// Replicas of earlier versions, or scaled away, finishing their tasks.
    draining: Vec<ReplicaHandle>,
    times: Arc<TaskTimes>,
    last: Option<Decision>,
    /// Replicas the cluster wants, as last decided (what a replica that
    /// waited for room asks [`ClusterSlots::claim`] about).
    desired: Arc<AtomicU32>,
}

impl Supervisor {
    pub(crate) fn new(
        exe: PathBuf,
        dispatch: Arc<Dispatch>,
        logs: Arc<AppLogs>,
        capacity: Arc<Capacity>,
        metrics: Arc<Metrics>,
        bodies: Arc<crate::bodies::Bodies>,
        cluster: Option<(String, Arc<dyn ClusterSlots>)>,
    ) -> Self {
        let (node_tag, slots) = cluster.unzip();
        Self {
            node_tag: node_tag.map(|tag| format!("@{tag}")).unwrap_or_default(),
            exe,
            dispatch,
            logs,
            capacity,
            metrics,
            bodies,
            next_replica: AtomicU64::new(0),
            apps: Mutex::default(),
            closed: AtomicBool::new(false),
            slots,
        }
    }

    /// Makes `app`'s version the one that runs: starts its baseline replicas
    /// (with `baseline`; in a cluster the autoscaler starts them, counting
    /// other nodes' replicas) and drains any older ones. The autoscaler
    /// takes it from there.
    pub(crate) fn run(&self, app: &App, baseline: bool) {
        let mut apps = self.apps.lock().unwrap();
        let name = app.version.name.clone();
        let times = apps.get(&name).map(|a| a.times.clone()).unwrap_or_default();
        let desired = Arc::new(AtomicU32::new(app.config.autoscaler.max_replicas()));
        let baseline = if self.is_closed() || !baseline { 0 } else { app.config.autoscaler.baseline_replicas() };
        let current = (0..baseline).map(|_| self.start_replica(app, &times, &desired)).collect();
        let replicas = AppReplicas { app: app.clone(), current, draining: Vec::new(), times, last: None, desired };
        let previous = apps.insert(name, replicas);
        if let Some(previous) = previous {
            let replicas = apps.get_mut(&app.version.name).expect("just inserted");
            for handle in previous.current.iter() {
                handle.replace();
            }
            replicas.draining = previous.draining;
            replicas.draining.extend(previous.current);
            replicas.draining.retain(|handle| !handle.is_stopped());
        }
    }

    /// Node shutdown: every replica finishes the runs it was sent and exits;
    /// none starts from now on.
    pub(crate) fn stop_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for replicas in self.apps.lock().unwrap().values() {
            for handle in replicas.current.iter().chain(&replicas.draining) {
                handle.stop();
            }
        }
    }

    /// Whether [`Supervisor::stop_all`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Whether every replica has exited (after [`Supervisor::stop_all`]).
    pub(crate) fn all_stopped(&self) -> bool {
        let apps = self.apps.lock().unwrap();
        apps.values().flat_map(|replicas| replicas.current.iter().chain(&replicas.draining)).all(|h| h.is_stopped())
    }

    fn start_replica(&self, app: &App, times: &Arc<TaskTimes>, desired: &Arc<AtomicU32>) -> ReplicaHandle {
        let n = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let runtime = &app.config.runtime;
        let spec = ReplicaSpec {
            app: app.version.name.clone(),
            version: app.version.version,
            replica: format!("{}-v{}-r{n}{}", app.version.name, app.version.version, self.node_tag),
            compiled: app.compiled.to_string_lossy().into_owned(),
            world: app.version.world,
            workers: runtime.workers,
            memory_per_worker: runtime.memory_per_worker(),
            fresh_instance_per_task: runtime.instance == crate::config::InstanceMode::PerTask,
            init_timeout_ms: u64::try_from(runtime.timeout.as_millis()).unwrap_or(u64::MAX),
            allowed_outbound_hosts: runtime.allowed_outbound_hosts.clone(),
            gpu: None,
        };
        let (demand, gpu) = demand(app);
        replica::spawn(Plan {
            exe: self.exe.clone(),
            spec,
            dispatch: self.dispatch.clone(),
            logs: self.logs.clone(),
            capacity: self.capacity.clone(),
            metrics: self.metrics.clone(),
            demand,
            gpu,
            times: times.clone(),
            bodies: self.bodies.clone(),
            admit: self.slots.clone().map(|slots| Admit { slots, desired: desired.clone() }),
        })
    }

    /// Each of the node's GPUs, and whether a replica holds it.
    pub(crate) fn gpus_held(&self) -> Vec<(NodeGpu, bool)> {
        self.capacity.gpus_held()
    }

    /// Drains and stops every replica of `name`.
    pub(crate) fn remove(&self, name: &str) {
        if let Some(replicas) = self.apps.lock().unwrap().remove(name) {
            for handle in replicas.current.iter().chain(&replicas.draining) {
                handle.stop();
            }
        }
    }

    /// Whether this node runs `name` (in a cluster, it may not fit here).
    pub(crate) fn runs(&self, name: &str) -> bool {
        self.apps.lock().unwrap().contains_key(name)
    }

    /// Apps this node runs.
    pub(crate) fn apps(&self) -> Vec<String> {
        self.apps.lock().unwrap().keys().cloned().collect()
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

    /// Replicas of `name` starting, ready, or restarting after a crash
    /// (what other nodes count). One that fails to start does not count: it
    /// may be this node that fails it (a GPU, memory), and the app must run
    /// on the others; if it is the app, each node's replica fails alike.
    pub(crate) fn serving_replicas(&self, name: &str) -> u64 {
        let replicas = self.replicas(name);
        let counted = |r: &ReplicaInfo| {
            !r.failing && matches!(r.state, ReplicaState::Starting | ReplicaState::Ready | ReplicaState::Backoff)
        };
        replicas.iter().filter(|r| counted(r)).count() as u64
    }

    /// Why no replica of `name` can run a call now: it has replicas and every
    /// one waits for capacity (a GPU, cores, memory). `None` when one runs,
    /// starts or drains, or when it has none yet (the autoscaler starts one).
    pub(crate) fn no_capacity(&self, name: &str) -> Option<String> {
        if self.capacity.making_room_for(name) {
            return None;
        }
        let replicas = self.replicas(name);
        let first = replicas.first()?;
        if replicas.iter().any(|replica| replica.state != ReplicaState::Pending) {
            return None;
        }

        let mut reason = first.pending_reason.clone().unwrap_or_else(|| "its replicas are pending".to_owned());
        // What holds the cores and memory, unless they are not what it lacks
        // (a GPU's reason names the replica holding it).
        let apps = self.apps.lock().unwrap();
        let cores_fit =
            apps.get(name).is_some_and(|replicas| self.capacity.fits(demand(&replicas.app).0, None).is_ok());
        let holders = holders(&apps);
        drop(apps);
        if !cores_fit && !holders.is_empty() {
            reason = format!("{reason} (held now by {holders})");
        }
        // In a cluster the caller may be on another node: say which this is.
        if let Some(tag) = self.node_tag.strip_prefix('@') {
            reason =
                reason.replace("this node", &format!("node {tag}")).replace("the node's", &format!("node {tag}'s"));
        }
        // Capacity is not its only trouble: it would not start when it had some.
        if let Some(error) = replicas.iter().filter(|replica| replica.failing).find_map(|r| r.last_error.as_ref()) {
            reason = format!("{reason}; its last start failed: {error}");
        }
        Some(reason)
    }

    /// Whether `name`'s pending replica may well have room within a moment:
    /// it is free now, or held by a replica of another app scaled by load
    /// and above its `min_replicas`, which its autoscaler stops for it once
    /// idle (a burst of calls to cold apps takes turns so). Never for room
    /// only fixed pools and `min_replicas` hold.
    pub(crate) fn room_coming(&self, name: &str) -> bool {
        let app = self.apps.lock().unwrap().get(name).map(|replicas| replicas.app.clone());
        app.is_some_and(|app| self.room_for(&app).is_ok() || self.yielded(&app, false))
    }

    /// Whether a replica of another app scaled by load, and above its
    /// `min_replicas`, holds room that alone would let one of `app` start:
    /// with `idle`, an idle one among its ready replicas (the autoscaler
    /// stops it at once for `app`); else any placed one (once idle).
    fn yielded(&self, app: &App, idle: bool) -> bool {
        let (demand, gpu) = demand(app);
        let counts = |info: &ReplicaInfo| match idle {
            true => info.state == ReplicaState::Ready,
            false => info.state != ReplicaState::Pending,
        };
        let apps = self.apps.lock().unwrap();
        let others = apps.iter().filter(|(other, _)| **other != app.version.name).map(|(_, other)| other);
        others.filter(|other| other.app.config.autoscaler.policy.is_some()).any(|other| {
            let infos: Vec<ReplicaInfo> = other.current.iter().map(ReplicaHandle::info).collect();
            let held = self::demand(&other.app).0;
            infos.iter().filter(|info| counts(info)).count() > other.app.config.autoscaler.min_replicas as usize
                && infos.iter().any(|info| {
                    counts(info)
                        && (!idle || info.is_idle())
                        && self.capacity.fits_without(demand, gpu.as_ref(), &info.id, held)
                })
        })
    }

    /// For each idle ready replica of `name`, another app whose pending
    /// replica would fit if that replica gave its room back (each pending
    /// replica counted for one, and none whose room is already freeing).
    fn room_wanted(
        &self,
        apps: &HashMap<String, AppReplicas>,
        name: &str,
        infos: &[ReplicaInfo],
    ) -> HashMap<String, String> {
        let mut wanted = HashMap::new();
        let pending_in =
            |replicas: &AppReplicas| replicas.current.iter().filter(|h| h.state() == ReplicaState::Pending).count();
        // Most of the time no replica waits: nothing more to look at.
        if !self.capacity.has_waiting() {
            return wanted;
        }
        let mut pending: Vec<(&String, Demand, Option<GpuDemand>)> = apps
            .iter()
            .filter(|(other, _)| *other != name && !self.capacity.making_room_for(other))
            .flat_map(|(other, replicas)| {
                let (demand, gpu) = demand(&replicas.app);
                std::iter::repeat_n((other, demand, gpu), pending_in(replicas))
            })
            .collect();
        let Some(replicas) = apps.get(name) else { return wanted };
        let (held, _) = demand(&replicas.app);
        for info in infos {
            if !info.is_idle() {
                continue;
            }
            let fits = |(_, demand, gpu): &(&String, Demand, Option<GpuDemand>)| {
                self.capacity.fits_without(*demand, gpu.as_ref(), &info.id, held)
            };
            if let Some(at) = pending.iter().position(fits) {
                wanted.insert(info.id.clone(), pending.swap_remove(at).0.clone());
            }
        }
        wanted
    }

    /// What the autoscaler needs to decide for `name`.
    pub(crate) fn sample(&self, name: &str, counts: Counts) -> Option<(Sample, AutoscalerConfig)> {
        let apps = self.apps.lock().unwrap();
        let replicas = apps.get(name)?;
        let infos: Vec<_> = (replicas.current.iter())
            .map(ReplicaHandle::info)
            .filter(|info| info.state != ReplicaState::Stopped)
            .collect();
        if infos.iter().all(|info| info.state != ReplicaState::Pending) {
            // Placed: room freed for it is no longer on its way.
            self.capacity.room_taken(name);
        }
        let mut wanted = self.room_wanted(&apps, name, &infos);
        let now = Instant::now();
        let longest_run = (infos.iter().filter_map(|info| info.oldest_run))
            .map(|started| now.saturating_duration_since(started))
            .max()
            .unwrap_or_default();
        let sample = Sample {
            queued: counts.queued,
            running: counts.running,
            workers_per_replica: replicas.app.config.runtime.workers,
            avg_task_time: replicas.times.average(),
            longest_run,
            replicas: infos
                .into_iter()
                .map(|info| ReplicaSample {
                    placement: match info.state {
                        ReplicaState::Pending => Placement::Pending,
                        ReplicaState::Ready => Placement::Ready,
                        ReplicaState::Backoff => Placement::Failing,
                        _ => Placement::Starting,
                    },
                    busy: info.busy,
                    idle_since: info.idle_since,
                    wanted_by: wanted.remove(&info.id),
                    id: info.id,
                })
                .collect(),
            elsewhere: 0,
            others: 0,
        };
        Some((sample, replicas.app.config.autoscaler.clone()))
    }

    /// Starts and stops replicas as decided, and remembers the decision.
    pub(crate) fn apply(&self, name: &str, decision: Decision) {
        let mut apps = self.apps.lock().unwrap();
        let Some(replicas) = apps.get_mut(name) else { return };
        replicas.desired.store(decision.desired, Ordering::Relaxed);
        let starts = if self.is_closed() { 0 } else { decision.start };
        for _ in 0..starts {
            let handle = self.start_replica(&replicas.app, &replicas.times, &replicas.desired);
            replicas.current.push(handle);
        }
        if !decision.stop.is_empty() {
            let (stopping, kept) =
                std::mem::take(&mut replicas.current).into_iter().partition(|h| decision.stop.contains(&h.info().id));
            replicas.current = kept;
            for handle in &stopping {
                handle.stop();
            }
            replicas.draining.retain(|handle| !handle.is_stopped());
            replicas.draining.extend(stopping);
        }
        for app in &decision.making_room_for {
            self.capacity.make_room_for(app);
        }
        // Stopped replicas (crashed for good, or drained) leave the pool.
        replicas.current.retain(|handle| !handle.is_stopped());
        replicas.last = Some(decision);
    }

    /// The autoscaler's last decision for `name`.
    pub(crate) fn last_decision(&self, name: &str) -> Option<Decision> {
        self.apps.lock().unwrap().get(name)?.last.clone()
    }

    pub(crate) fn average_task_time(&self, name: &str) -> Option<Duration> {
        self.apps.lock().unwrap().get(name)?.times.average()
    }

    /// Whether one replica of `app` fits on the node now; else why not.
    pub(crate) fn room_for(&self, app: &App) -> Result<(), String> {
        let (demand, gpu) = demand(app);
        self.capacity.fits(demand, gpu.as_ref())
    }

    /// [`Supervisor::room_for`] a new app, counting the room an idle surplus
    /// replica of another app would give it (the autoscaler stops one for a
    /// pending replica whose room it holds; not one of a fixed pool, nor one
    /// `min_replicas` keeps).
    pub(crate) fn room_for_new(&self, app: &App) -> Result<(), String> {
        let Err(reason) = self.room_for(app) else { return Ok(()) };
        if self.yielded(app, true) { Ok(()) } else { Err(reason) }
    }

    /// Starts one replica of app `name` now, or says why not (the app has
    /// its most replicas, or the node no room for one: a replica started
    /// then would only wait, pending, until the autoscaler drops it).
    pub(crate) fn warmup(&self, name: &str) -> Option<Result<(), String>> {
        let mut apps = self.apps.lock().unwrap();
        let replicas = apps.get_mut(name)?;
        if self.is_closed() {
            return Some(Err("the node is shutting down".into()));
        }
        let live = replicas.current.iter().filter(|h| !h.is_stopped()).count() as u32;
        let max = replicas.app.config.autoscaler.max_replicas();
        if live >= max {
            let has = format!("the app has {live} of its at most {max} replicas (max_replicas) already");
            // One of them may be the replica the caller hoped to start, pending.
            let pending = replicas.current.iter().map(ReplicaHandle::info).find_map(|info| info.pending_reason);
            return Some(Err(match pending {
                Some(reason) => format!("{has}, and one is pending: {reason} (held now by {})", holders(&apps)),
                None => has,
            }));
        }
        if let Err(reason) = self.room_for(&replicas.app) {
            return Some(Err(format!("no room on this node: {reason} (held now by {})", holders(&apps))));
        }
        let handle = self.start_replica(&replicas.app, &replicas.times, &replicas.desired);
        replicas.current.push(handle);
        Some(Ok(()))
    }
}

/// The apps whose replicas hold the node's capacity, with how many each:
/// `hello (1 replica), sleep (2 replicas)`.
fn holders(apps: &HashMap<String, AppReplicas>) -> String {
    let mut held: Vec<String> = apps
        .iter()
        .filter_map(|(name, replicas)| {
            let holding = replicas.current.iter().chain(&replicas.draining).map(ReplicaHandle::info);
            // One pending, stopped, or waiting to retry a failed start holds nothing.
            let n = holding
                .filter(|info| match info.state {
                    ReplicaState::Pending | ReplicaState::Stopped => false,
                    ReplicaState::Backoff => !info.failing,
                    ReplicaState::Starting | ReplicaState::Ready | ReplicaState::Draining => true,
                })
                .count();
            (n > 0).then(|| format!("{name} ({n} replica{})", if n == 1 { "" } else { "s" }))
        })
        .collect();
    held.sort();
    held.join(", ")
}

/// What one replica of `app` takes of the node: cores and memory, and a
/// whole GPU when it asks for one.
fn demand(app: &App) -> (Demand, Option<GpuDemand>) {
    let runtime = &app.config.runtime;
    // Without `gpu_memory`, a worker may use the whole device.
    let gpu = runtime.gpu.clone().map(|model| GpuDemand {
        model,
        quota_per_worker: runtime.gpu_memory.unwrap_or(u64::MAX),
        memory_needed: runtime.gpu_memory_per_replica().unwrap_or(0),
    });
    (Demand { cpu: runtime.cpu, memory: runtime.memory }, gpu)
}
