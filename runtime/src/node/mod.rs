//! One node: the gateway, the queue, the registry and the replica supervisor,
//! wired together by `beamlet serve`.

mod callbacks;
pub(crate) mod cluster;
mod gpus;
mod logs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::AsyncWriteExt;

pub(crate) use self::cluster::Cluster;
pub(crate) use self::gpus::{GpuBackendChoice, discover as discover_gpus};
pub(crate) use self::logs::AppLogs;
use crate::bodies::Bodies;
use crate::ipc::GpuBackendKind;
use crate::metrics::Metrics;
use crate::queue::{Dispatch, EmbeddedQueue, Queue, RedisQueue, now_ms, spawn_cluster};
use crate::registry::Registry;
use crate::supervisor::{Capacity, ClusterSlots, Demand, Gpus, Supervisor};

/// Request size limits, in bytes.
pub(crate) struct Limits {
    pub max_component: usize,
    pub max_input: usize,
    /// What the node may hold for its tasks: inputs not yet run, results
    /// kept (without Redis, in its memory).
    pub max_task_bytes: u64,
}

/// Options of `beamlet serve`.
pub(crate) struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Cores and memory replicas may reserve on this node.
    pub capacity: Demand,
    pub gpus: Gpus,
    /// How long replicas may finish their tasks after Ctrl-C or SIGTERM.
    pub shutdown_grace: Duration,
    /// The Redis server whose queue this node shares with others; `None`:
    /// the embedded queue under the data dir.
    pub redis: Option<String>,
}

pub(crate) struct Node {
    pub registry: Registry,
    pub dispatch: Arc<Dispatch>,
    pub supervisor: Arc<Supervisor>,
    pub logs: Arc<AppLogs>,
    pub metrics: Arc<Metrics>,
    /// Streamed HTTP bodies of the requests in progress.
    pub bodies: Arc<Bodies>,
    /// The cores and memory replicas may reserve on this node, in all.
    pub capacity: Demand,
    /// The GPUs this node offers.
    pub gpus: Gpus,
    /// Samples the CUDA GPUs' usage for `/metrics`; `None` on the CPU backend.
    pub gpu_monitor: Option<beamlet_gpu::discover::Monitor>,
    pub limits: Limits,
    /// The other nodes sharing the queue and apps (`--redis`).
    pub cluster: Option<Cluster>,
}

impl Node {
    /// Starts the app's replicas (a new version replaces the old one's); in
    /// a cluster, only if they fit this node.
    pub(crate) fn run_app(&self, app: &crate::registry::App) {
        match &self.cluster {
            Some(_) => cluster::run_here(self, app),
            None => self.supervisor.run(app, true),
        }
    }

    /// In a cluster, brings this node's copy of `name` in line with the
    /// cluster's now. Blocking.
    pub(crate) fn sync_app(&self, name: &str) {
        if self.cluster.is_some() {
            cluster::sync(self, Some(name));
        }
    }

    /// Stops what runs of an app just removed from the registry and drops
    /// what this node kept of it (the registry keeps its callback secret).
    pub(crate) fn drop_app(&self, app: &crate::registry::App) {
        let name = &app.version.name;
        self.supervisor.remove(name);
        self.logs.remove(name);
        self.metrics.remove_app(name);
    }

    /// The secret to sign the callback of a task of `app` made at
    /// `created_at`: that of the app it was submitted to, though that app
    /// was removed and another of its name deployed since.
    pub(crate) fn callback_secret(&self, app: &str, created_at: u64) -> Option<String> {
        let current = self.registry.get(app);
        let removed = self.registry.removed_secret(app, created_at, current.is_none());
        removed.or_else(|| current.map(|app| app.version.callback_secret))
    }
}

/// What replicas are started from: this very binary, even after its file is
/// replaced (an upgrade in place while the node runs), so a node and its
/// replicas always speak the same frames.
fn replica_executable() -> Result<PathBuf> {
    let this = PathBuf::from("/proc/self/exe");
    if this.exists() {
        return Ok(this);
    }
    std::env::current_exe().context("failed to find the beamlet executable")
}

/// Makes this node the only one using `data_dir` while the returned file is
/// open: two nodes on one store would both run every task.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;

    let path = data_dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open {path:?}"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let holder = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
        anyhow::bail!(
            "data dir {data_dir:?} is in use by another beamlet serve{holder}; stop it, or give this one its own \
             --data-dir"
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// This node's id among the nodes sharing a Redis queue, kept in the data
/// dir: a restarted node is the same node, and takes back its tasks.
fn node_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, &id).with_context(|| format!("failed to write {path:?}"))?;
            Ok(id)
        }
    }
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Cancels the tasks of apps removed here that the task store still holds:
/// a node that died as a removal's cancellations were being saved finds
/// them queued, for an app that will never run them.
fn cancel_tasks_of_removed_apps(node: &Node) {
    for name in node.registry.removed_names() {
        if node.registry.get(&name).is_some() {
            continue;
        }
        let cancelled = node.dispatch.remove_app(&name);
        if cancelled > 0 {
            tracing::warn!(app = %name, cancelled, "cancelled the tasks left of an app removed before the last stop");
        }
    }
}

pub(crate) async fn serve(options: ServeOptions) -> Result<()> {
    let data_dir = options.data_dir.clone();
    if data_dir.exists() && !data_dir.is_dir() {
        anyhow::bail!(
            "--data-dir {data_dir:?} is a file, not a directory; give a directory (it is created if missing)"
        );
    }
    std::fs::create_dir_all(&data_dir).with_context(|| format!("failed to create data dir {data_dir:?}"))?;
    let _lock = lock_data_dir(&data_dir)?;
    let registry = tokio::task::spawn_blocking(move || Registry::open(&data_dir)).await??;
    let (queue, shared): (Arc<dyn Queue>, _) = match options.redis.clone() {
        None => {
            let store = options.data_dir.join("tasks.db");
            let budget = options.limits.max_task_bytes;
            let open = move || EmbeddedQueue::open(&store, now_ms()).map(|queue| queue.with_budget(budget));
            (Arc::new(tokio::task::spawn_blocking(open).await??), None)
        }
        Some(url) => {
            let id = node_id(&options.data_dir)?;
            let queue = Arc::new(tokio::task::spawn_blocking(move || RedisQueue::open(&url, id, now_ms())).await??);
            tracing::info!(node = queue.node(), redis = %queue.url().addr, "sharing the task queue in Redis");
            (queue.clone(), Some(queue))
        }
    };
    let (dispatch, ended) = Dispatch::new(queue);
    let dispatch = Arc::new(dispatch);
    let logs = Arc::new(AppLogs::default());
    let exe = replica_executable()?;
    let capacity = Arc::new(Capacity::new(options.capacity, options.gpus.clone()));
    let metrics = Arc::new(Metrics::new());
    let bodies = Arc::new(Bodies::default());
    // In a cluster: replica ids name their node, and replicas that waited for room ask Redis before they start.
    let cluster_slots =
        shared.clone().map(|queue| (RedisQueue::node_tag(queue.node()), queue as Arc<dyn ClusterSlots>));
    let supervisor = Arc::new(Supervisor::new(
        exe,
        dispatch.clone(),
        logs.clone(),
        capacity,
        metrics.clone(),
        bodies.clone(),
        cluster_slots,
    ));
    let gpus = options.gpus;
    let gpu_monitor = (gpus.backend == Some(GpuBackendKind::Cuda))
        .then(|| {
            beamlet_gpu::discover::Monitor::open()
                .inspect_err(|e| tracing::warn!("GPU usage will not be in /metrics: {e}"))
                .ok()
        })
        .flatten();
    let (limits, capacity) = (options.limits, options.capacity);
    let cluster = shared.map(Cluster::new);
    let node = Arc::new(Node {
        registry,
        dispatch,
        supervisor,
        logs,
        metrics,
        bodies,
        capacity,
        gpus,
        gpu_monitor,
        limits,
        cluster,
    });
    callbacks::spawn(node.clone(), ended);
    tokio::spawn(crate::autoscaler::run(
        node.supervisor.clone(),
        node.dispatch.clone(),
        node.metrics.clone(),
        node.cluster.as_ref().map(|cluster| cluster.queue.clone()),
    ));
    // Apps with tasks waiting first: when not all fit, they get the room.
    let mut apps = node.registry.list();
    apps.sort_by_key(|app| node.dispatch.recent_counts(&app.version.name).queued == 0);
    for app in apps {
        tracing::info!(app = %app.version.name, version = app.version.version, "restoring app");
        node.run_app(&app);
    }
    if node.cluster.is_none() {
        cancel_tasks_of_removed_apps(&node);
    }
    if let Some(cluster) = &node.cluster {
        let apps = cluster::app_sync(Arc::downgrade(&node), tokio::runtime::Handle::current())?;
        spawn_cluster(cluster.queue.clone(), node.dispatch.clone(), apps)
            .context("failed to start the Redis listener")?;
        let joining = node.clone();
        tokio::task::spawn_blocking(move || cluster::join(&joining)).await?.context("failed to join the cluster")?;
        tokio::spawn(cluster::refuse_calls_run_nowhere(node.clone()));
    }
    let sweeper = node.dispatch.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            sweeper.sweep();
        }
    });

    let listener = tokio::net::TcpListener::bind(options.listen).await.with_context(|| {
        format!("failed to listen on {}; is another server using it? pick another with --listen", options.listen)
    })?;
    let addr = listener.local_addr()?;
    // Whoever reads stdout may be gone (`beamlet serve | head`): the node serves on.
    let mut stdout = tokio::io::stdout();
    let printed = stdout.write_all(format!("listening on http://{addr}\n").as_bytes()).await;
    if let Err(e) = printed.and(stdout.flush().await) {
        tracing::warn!("could not print the address to stdout: {e}");
    }
    tracing::info!(
        data_dir = ?options.data_dir, cpus = options.capacity.cpu, memory = %crate::config::describe_size(options.capacity.memory),
        "beamlet node serving on http://{addr}"
    );
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "shutting down: replicas finish the tasks they hold (up to {}; again to stop now)",
            crate::config::format_duration(options.shutdown_grace)
        );
        let _ = stopping.send(true);
        shutdown_signal().await;
        tracing::warn!("stopping now; tasks still running run again on the next start");
        std::process::exit(130);
    });
    let server = crate::gateway::serve(listener, crate::gateway::router(node.clone()), stopped.clone());
    let mut server = tokio::spawn(server);
    let mut signalled = stopped;
    tokio::select! {
        // The server also ends at the signal (when no request is open): the
        // replicas must be drained all the same.
        biased;
        _ = signalled.wait_for(|stopped| *stopped) => {}
        result = &mut server => return result.context("the HTTP server stopped"),
    }
    drain(&node, options.shutdown_grace).await;
    // Calls whose tasks just ended still get their answers written, and
    // calls cut off by the grace theirs (503 SHUTTING_DOWN).
    if tokio::time::timeout(ANSWER_GRACE, &mut server).await.is_err() {
        tracing::warn!("requests still open after the replicas stopped; closing them");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long answers may take to be written once the replicas have stopped.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Stops every replica, each finishing the tasks it holds, and waits for the
/// calls still running (in a cluster, maybe on other nodes), for at most
/// `grace`; then makes sure every change to the task store is saved. Tasks
/// still running when the grace runs out run again on the next start (in a
/// cluster, at once on another node).
async fn drain(node: &Node, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    node.supervisor.stop_all();
    let apps: Vec<String> = node.registry.list().into_iter().map(|app| app.version.name).collect();
    // Ending the queued calls is a round trip per app to a shared store,
    // which may not answer (Redis frozen): not past the grace.
    let dispatch = node.dispatch.clone();
    let _ = tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(move || dispatch.close(&apps))).await;
    // Calls whose tasks run on another node of a cluster are waited for too:
    // their callers are connected here.
    while !node.supervisor.all_stopped() || node.dispatch.calls_waiting() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "replicas still running tasks, or calls still waiting for their tasks, {grace:?} after the shutdown \
                 signal; stopping"
            );
            node.dispatch.give_up_calls();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if node.dispatch.sync().await.is_err() {
        tracing::error!(
            "the task store could not save its last changes (see the errors above; {}): \
             tasks that ended since its last save run again on the next start",
            crate::queue::STORE_HINT
        );
    }
    if let Some(cluster) = &node.cluster {
        save_before_leaving(node, &cluster.queue, deadline).await;
        // Said if Redis answers soon; otherwise the others take this node
        // for dead once its heartbeat runs out.
        let queue = cluster.queue.clone();
        let leaving = tokio::task::spawn_blocking(move || queue.leave());
        let _ = tokio::time::timeout_at(deadline.max(tokio::time::Instant::now()) + LEAVE_GRACE, leaving).await;
    }
}

/// How long a stopping node waits for Redis to take its leave.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// Saves the ends of runs that Redis did not take while it was down (they
/// are kept in memory until it answers), trying until `deadline`: a node
/// that left without them would have those tasks run again (or fail, out
/// of retries) though they ran to their end.
async fn save_before_leaving(node: &Node, queue: &Arc<RedisQueue>, deadline: tokio::time::Instant) {
    let mut said = false;
    loop {
        let unsaved = queue.unsaved();
        let saving = queue.clone();
        let attempt = tokio::task::spawn_blocking(move || (saving.save_unsaved(), saving.unsaved()));
        // A frozen Redis holds a call for its whole timeout: not past the grace.
        let (saved, left) = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(both)) => both,
            Ok(Err(_)) => return,
            Err(_) => (Vec::new(), unsaved),
        };
        for saved in saved {
            node.dispatch.saved_late(saved);
        }
        if left == 0 {
            if said {
                tracing::info!("saved the ends of the runs Redis missed");
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(
                "Redis did not answer before the shutdown grace ran out: the ends of {left} runs may be lost. A frozen \
                 Redis that got them still records them when it answers; else their tasks run again (or fail, out of \
                 retries) once another node takes over this node's work"
            );
            return;
        }
        if !said {
            tracing::warn!(
                "waiting for Redis to save the ends of {left} runs that it missed (until the shutdown grace ends)"
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(term) => { term.recv().await; } None => std::future::pending().await } } => {}
    }
}
