//! One replica slot: starts a `beamlet replica` process, feeds it tasks while
//! it has free workers, and restarts it (with backoff) when it dies. The tasks
//! a dead replica held go back to the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use super::placement::{Capacity, Demand, GpuDemand};
use super::{ClusterSlots, TaskTimes};
use crate::bodies::{self, Bodies, ResponseStart};
use crate::ipc::{self, FromReplica, GpuBackendKind, GpuSpec, Outcome, ReplicaSpec, RunTask, TaskDone, ToReplica};
use crate::node::AppLogs;
use crate::queue::{Dispatch, ErrorCode, Finish, Lease, TaskError, TaskId, now_ms};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// How often a replica's loop looks for hung runs and a hung exit.
const WATCH_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A replica up this long has recovered: its next crash restarts at once.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Failed starts in a row after which the app's queued calls are failed
/// rather than left waiting for a replica that cannot come up (their callers
/// wait; tasks submitted to the queue wait on, up to their ttl).
const FAILED_STARTS: u32 = 3;
/// Time a replica gets beyond its `init` timeout to start all workers.
const START_GRACE: Duration = Duration::from_secs(30);
/// A run still unanswered this long past its timeout means the replica is
/// hung (it stops a run at its timeout itself): it is killed and replaced.
const HUNG_AFTER: Duration = Duration::from_secs(10);

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReplicaState {
    /// It does not fit on the node yet; it starts when capacity frees.
    Pending,
    /// The process is starting its workers.
    Starting,
    /// All workers are up; it takes tasks.
    Ready,
    /// It takes no new tasks and stops when its running tasks end.
    Draining,
    /// It died and waits before the next start.
    Backoff,
    /// It has exited for good.
    Stopped,
}

impl ReplicaState {
    /// The states a replica listed in status can be in (not `Stopped`).
    pub(crate) const LIVE: [Self; 5] = [Self::Pending, Self::Starting, Self::Ready, Self::Draining, Self::Backoff];

    /// Its name in status and metrics (`"ready"`).
    pub(crate) fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

/// What status shows of a replica.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplicaInfo {
    pub id: String,
    pub version: u32,
    pub state: ReplicaState,
    pub workers: u32,
    pub pid: Option<u32>,
    /// When the current process started (ms since the epoch).
    pub started_at: Option<u64>,
    pub tasks_done: u64,
    /// Tasks running on it now.
    pub busy: u32,
    /// Since when it has run nothing (`None` while busy or not yet ready).
    #[serde(skip)]
    pub idle_since: Option<Instant>,
    /// When its oldest run in progress started (`None` when it runs none).
    #[serde(skip)]
    pub oldest_run: Option<Instant>,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Its last start failed, and none has succeeded since (a guest whose
    /// init fails, a start slower than the timeout): it is restarted with
    /// backoff but serves nothing.
    pub failing: bool,
    /// Starts that failed in a row, up to now (0 once one succeeds).
    pub failed_starts: u32,
    /// Why a pending replica waits.
    pub pending_reason: Option<String>,
    /// The GPU it holds: `"0: NVIDIA H100 80GB HBM3 (GPU-8d6f...)"`.
    pub gpu: Option<String>,
    /// GPU memory its workers hold, as of their last runs.
    pub gpu_memory_used: u64,
    #[serde(skip)]
    gpu_by_worker: HashMap<u32, u64>,
}

impl ReplicaInfo {
    /// Ready and running nothing: its room could go to another app.
    pub(crate) fn is_idle(&self) -> bool {
        self.state == ReplicaState::Ready && self.busy == 0 && self.idle_since.is_some()
    }

    fn set_gpu_bytes(&mut self, worker: u32, bytes: u64) {
        self.gpu_by_worker.insert(worker, bytes);
        self.gpu_memory_used = self.gpu_by_worker.values().sum();
    }
}

/// What a replica is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// Run on.
    Run,
    /// Drain and stop: its runs are finished there (a scale-down, a node's
    /// shutdown).
    Stop,
    /// Drain and stop for a new version of its app: a run it leased but has
    /// not sent yet goes back, for the new version.
    Replace,
}

impl Asked {
    fn stops(self) -> bool {
        self != Asked::Run
    }
}

pub(crate) struct ReplicaHandle {
    info: Arc<Mutex<ReplicaInfo>>,
    stop: watch::Sender<Asked>,
}

impl ReplicaHandle {
    pub(crate) fn info(&self) -> ReplicaInfo {
        self.info.lock().unwrap().clone()
    }

    pub(crate) fn state(&self) -> ReplicaState {
        self.info.lock().unwrap().state
    }

    /// Whether it has exited for good.
    pub(crate) fn is_stopped(&self) -> bool {
        self.info.lock().unwrap().state == ReplicaState::Stopped
    }

    /// Asks the replica to drain and stop; returns at once.
    pub(crate) fn stop(&self) {
        self.ask(Asked::Stop);
    }

    /// [`ReplicaHandle::stop`], for a new version of its app.
    pub(crate) fn replace(&self) {
        self.ask(Asked::Replace);
    }

    /// The first stop asked for is the one the replica sees.
    fn ask(&self, stop: Asked) {
        self.stop.send_if_modified(|asked| {
            let first = *asked == Asked::Run;
            if first {
                *asked = stop;
            }
            first
        });
    }
}

/// Everything needed to (re)start one replica.
pub(crate) struct Plan {
    pub exe: PathBuf,
    pub spec: ReplicaSpec,
    pub dispatch: Arc<Dispatch>,
    pub logs: Arc<AppLogs>,
    pub capacity: Arc<Capacity>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub demand: Demand,
    /// The GPU a GPU app's replica needs.
    pub gpu: Option<GpuDemand>,
    pub times: Arc<TaskTimes>,
    pub bodies: Arc<Bodies>,
    /// In a cluster: whether it may start once it has waited for room.
    pub admit: Option<Admit>,
}

/// A cluster's say in starting a replica that waited for room: nodes that
/// all held pending replicas of an app would otherwise start them all when
/// room frees, past what the cluster wants (and `max_replicas`).
pub(crate) struct Admit {
    pub slots: Arc<dyn ClusterSlots>,
    /// The replicas the cluster wants of the app, as this node last decided.
    pub desired: Arc<AtomicU32>,
}

impl Admit {
    async fn claim(&self, spec: &ReplicaSpec) -> Result<(), String> {
        let (slots, desired) = (self.slots.clone(), self.desired.load(Ordering::Relaxed));
        let (app, replica) = (spec.app.clone(), spec.replica.clone());
        (tokio::task::spawn_blocking(move || slots.claim(&app, &replica, desired)).await)
            .unwrap_or_else(|e| Err(format!("failed to count the cluster's replicas: {e}")))
    }
}

/// How long a replica the cluster did not need waits before it asks again
/// (the autoscaler drops it meanwhile when the cluster runs enough).
const ADMIT_AGAIN: Duration = Duration::from_secs(1);

pub(crate) fn spawn(plan: Plan) -> ReplicaHandle {
    let info = Arc::new(Mutex::new(ReplicaInfo {
        id: plan.spec.replica.clone(),
        version: plan.spec.version,
        // Placed at once when it fits; `place` says pending when it does not.
        state: ReplicaState::Starting,
        workers: plan.spec.workers,
        pid: None,
        started_at: None,
        tasks_done: 0,
        busy: 0,
        idle_since: None,
        oldest_run: None,
        restarts: 0,
        last_error: None,
        failing: false,
        failed_starts: 0,
        pending_reason: None,
        gpu: None,
        gpu_memory_used: 0,
        gpu_by_worker: HashMap::new(),
    }));
    let (stop, stop_rx) = watch::channel(Asked::Run);
    tokio::spawn(supervise(plan, info.clone(), stop_rx));
    ReplicaHandle { info, stop }
}

async fn supervise(plan: Plan, info: Arc<Mutex<ReplicaInfo>>, mut stop: watch::Receiver<Asked>) {
    let mut restarts = Restarts { backoff: MIN_BACKOFF, failed_starts: 0 };
    while let Some(gpu) = place(&plan, &info, &mut stop).await {
        let spec = ReplicaSpec { gpu: gpu.clone(), ..plan.spec.clone() };
        let start_failed = run_placed(&plan, &spec, &info, &mut stop, &mut restarts).await;
        plan.capacity.release(plan.demand, gpu.as_ref());
        // A replica that cannot start holds no cores, memory or GPU while it
        // waits to try again: another app's replica may take them meanwhile.
        if !start_failed {
            break;
        }
        info.lock().unwrap().gpu = None;
        if !restarts.wait(&mut stop).await {
            break;
        }
    }
    let mut info = info.lock().unwrap();
    info.state = ReplicaState::Stopped;
    info.pid = None;
    info.gpu = None;
    info.idle_since = None;
}

/// How a replica's restarts are paced.
struct Restarts {
    /// The wait before the next start; doubles with each, up to [`MAX_BACKOFF`].
    backoff: Duration,
    /// Starts that failed since the last that succeeded.
    failed_starts: u32,
}

impl Restarts {
    /// Waits out the backoff; `false` when the replica was stopped meanwhile.
    async fn wait(&mut self, stop: &mut watch::Receiver<Asked>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.backoff) => {}
            _ = stop.changed() => {}
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        !stop.borrow().stops()
    }
}

/// Waits until the node has room for the replica; `None` if it was stopped
/// first, else the GPU it got (if it asked for one).
async fn place(plan: &Plan, info: &Mutex<ReplicaInfo>, stop: &mut watch::Receiver<Asked>) -> Option<Option<GpuSpec>> {
    let (spec, capacity) = (&plan.spec, &plan.capacity);
    let waiting = capacity.wait(&spec.replica, &spec.app, plan.demand, plan.gpu.as_ref());
    let mut pending = false;
    loop {
        let changed = capacity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let queued: HashSet<String> =
            capacity.waiting_apps().into_iter().filter(|app| plan.dispatch.recent_counts(app).queued > 0).collect();
        // Other nodes may have started what it waited to run meanwhile.
        if pending
            && capacity.try_reserve_in_turn(&waiting, &queued, false).is_ok()
            && let Some(admit) = &plan.admit
            && let Err(reason) = admit.claim(spec).await
        {
            waiting.hold_back(true);
            say_pending(plan, info, reason);
            tokio::select! {
                _ = tokio::time::sleep(ADMIT_AGAIN) => {}
                _ = stop.changed() => {}
            }
            if stop.borrow().stops() {
                return None;
            }
            continue;
        }
        waiting.hold_back(false);
        match capacity.try_reserve_in_turn(&waiting, &queued, true) {
            Ok(gpu) => {
                let mut info = info.lock().unwrap();
                info.pending_reason = None;
                info.state = ReplicaState::Starting;
                info.gpu = gpu.as_ref().map(|gpu| match &gpu.uuid {
                    Some(uuid) => format!("{}: {} ({uuid})", gpu.index, gpu.name),
                    None => format!("{}: {}", gpu.index, gpu.name),
                });
                return Some(gpu);
            }
            Err(reason) => {
                pending = true;
                say_pending(plan, info, reason);
            }
        }
        if stop.borrow().stops() {
            return None;
        }
        tokio::select! {
            _ = changed => {}
            _ = stop.changed() => {}
        }
    }
}

fn say_pending(plan: &Plan, info: &Mutex<ReplicaInfo>, reason: String) {
    let mut info = info.lock().unwrap();
    info.state = ReplicaState::Pending;
    if info.pending_reason.as_ref() != Some(&reason) {
        tracing::info!(app = %plan.spec.app, replica = %plan.spec.replica, "replica pending: {reason}");
    }
    info.pending_reason = Some(reason);
}

/// Runs the replica on its place, restarting it when it dies, until it is
/// stopped (`false`) or a start fails (`true`: the caller gives the place up
/// while it waits to try again).
async fn run_placed(
    plan: &Plan,
    spec: &ReplicaSpec,
    info: &Arc<Mutex<ReplicaInfo>>,
    stop: &mut watch::Receiver<Asked>,
    restarts: &mut Restarts,
) -> bool {
    while !stop.borrow().stops() {
        let started = Instant::now();
        let mut run = Run {
            plan,
            spec,
            info,
            inflight: HashMap::new(),
            ahead: VecDeque::new(),
            recalling: HashSet::new(),
            stalled: 0,
            prefetched: None,
            started: HashMap::new(),
            restarting: 0,
            exiting: None,
            streams: HashMap::new(),
        };
        let result = run.once(stop).await;
        run.requeue_inflight(result.as_ref().err());
        let Err(error) = result else { break };
        let message = format!("{error:#}");
        let start_failed = info.lock().unwrap().state == ReplicaState::Starting;
        restarts.failed_starts = if start_failed { restarts.failed_starts + 1 } else { 0 };
        let failed_starts = restarts.failed_starts;
        if failed_starts >= FAILED_STARTS {
            plan.dispatch.fail_calls(
                &plan.spec.app,
                format!("the app's replicas failed to start {failed_starts} times in a row; last: {message}"),
            );
        }
        let next = if stop.borrow().stops() { "not restarted: it was being stopped" } else { "restarting" };
        tracing::warn!(app = %plan.spec.app, replica = %plan.spec.replica, "replica stopped: {message}; {next}");
        plan.logs.push(&plan.spec.app, format!("[replica {}] {message}", plan.spec.replica));
        {
            let mut info = info.lock().unwrap();
            info.state = ReplicaState::Backoff;
            info.pid = None;
            info.restarts += 1;
            info.last_error = Some(message);
            info.failing = failed_starts > 0;
            info.failed_starts = failed_starts;
        }
        if started.elapsed() > STABLE_AFTER {
            restarts.backoff = MIN_BACKOFF;
        }
        if start_failed {
            return true;
        }
        restarts.wait(stop).await;
    }
    false
}

/// One process's life.
struct Run<'a> {
    plan: &'a Plan,
    /// The plan's spec with the GPU it was placed on.
    spec: &'a ReplicaSpec,
    info: &'a Arc<Mutex<ReplicaInfo>>,
    /// Tasks sent to the process and not yet done, by run sequence number.
    inflight: HashMap<u64, Lease>,
    /// Runs sent while every worker was busy, oldest first: the replica takes
    /// runs in order, so each starts when a worker reports one done.
    ahead: VecDeque<u64>,
    /// Runs asked back ([`ToReplica::Recall`]) and not yet returned or done.
    recalling: HashSet<u64>,
    /// Looks in a row (`Pace::STALE`) that found every worker on a long run.
    stalled: u32,
    /// The next run, leased with the end of the last in one round trip to
    /// a shared store (never for a draining or exiting replica); sent at the
    /// next turn of the loop.
    prefetched: Option<Lease>,
    /// When each run that a worker took started.
    started: HashMap<u64, Instant>,
    /// Workers building a new instance before their next run: busy until
    /// they report it started.
    restarting: usize,
    /// Runs whose HTTP bodies stream; their failures are final.
    streams: HashMap<u64, Streams>,
    /// When a worker said the process exits (its GPU failed or is stuck): it
    /// is sent no more runs, so a task it gave back is retried elsewhere.
    exiting: Option<(Instant, String)>,
}

/// Where one run's streamed bodies go.
#[derive(Default)]
struct Streams {
    /// Asks the request pump for more parts.
    wants: Option<mpsc::UnboundedSender<u32>>,
    /// The response body's parts, to the gateway.
    response: Option<mpsc::UnboundedSender<Result<bytes::Bytes, String>>>,
}

impl Run<'_> {
    fn set_state(&self, state: ReplicaState) {
        let mut info = self.info.lock().unwrap();
        info.state = state;
        if state == ReplicaState::Ready {
            info.idle_since = Some(Instant::now());
            info.failing = false;
            info.failed_starts = 0;
            drop(info);
            self.went_idle();
        }
    }

    /// Publishes how many tasks the replica runs now, and since when.
    fn set_busy(&self) {
        let mut info = self.info.lock().unwrap();
        info.busy = self.inflight.len() as u32;
        info.oldest_run = self.started.values().min().copied();
        let was_idle = info.idle_since.is_some();
        info.idle_since = match (info.busy, info.idle_since) {
            (0, None) => Some(Instant::now()),
            (0, since) => since,
            _ => None,
        };
        let idle = info.idle_since.is_some();
        drop(info);
        if idle && !was_idle {
            self.went_idle();
        }
    }

    /// An idle replica's room may be what a pending one (of another app)
    /// waits for: the autoscaler looks now, not at its next tick.
    fn went_idle(&self) {
        if self.plan.capacity.has_waiting() {
            self.plan.dispatch.wake_autoscaler();
        }
    }

    /// `Ok` when the replica drained and exited as asked.
    async fn once(&mut self, stop: &mut watch::Receiver<Asked>) -> Result<()> {
        let plan = self.plan;
        let spec = self.spec;
        let (mut child, stream) = start_process(&plan.exe, spec.gpu.as_ref())?;
        {
            let mut info = self.info.lock().unwrap();
            info.state = ReplicaState::Starting;
            info.pid = child.id();
            info.started_at = Some(now_ms());
        }
        let (read, mut write) = stream.into_split();
        let mut frames = read_frames(read);
        ipc::write_async(&mut write, &ToReplica::Start(spec.clone())).await?;

        let start_deadline = Duration::from_millis(spec.init_timeout_ms) + START_GRACE;
        let started = tokio::time::timeout(start_deadline, self.await_ready(&mut frames)).await;
        match started {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(exit_context(e, &mut child).await),
            Err(_) => bail!("replica did not start its workers within {start_deadline:?}"),
        }
        self.set_state(ReplicaState::Ready);
        tracing::info!(app = %spec.app, replica = %spec.replica, pid = child.id(), "replica ready");

        let _serving = plan.dispatch.serving(&spec.app);
        let (cancel_tx, mut cancels) = mpsc::unbounded_channel::<TaskId>();
        // Frames from body pumps and response credits, written in turn.
        let (out, mut outgoing) = mpsc::unbounded_channel::<ToReplica>();
        // Runs whose streamed response lost its client before its end.
        let (gone, mut abandoned) = mpsc::unbounded_channel::<u64>();
        let mut pace = Pace::default();
        let mut draining = false;
        let mut stop_asked = false;
        let mut seq = 0u64;
        let mut watchdog = tokio::time::interval(WATCH_EVERY);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_watch = Instant::now();
        // While runs are in progress, a look now and then at whether every
        // worker is stuck on a long one (see `Pace::STALE`).
        let mut recheck = tokio::time::interval(Pace::STALE / 2);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.started.is_empty() {
                self.stalled = 0;
            }
            // Two looks in a row: a pause of this loop (frames not yet
            // read) looks like long runs once, not twice.
            let stalled = self.stalled >= 2;
            // With a store a round trip away (Redis), a run sent ahead costs
            // one more (its start is recorded) than a worker's wait for the
            // run leased with the end of its last: none are.
            let none_ahead = stalled || !plan.dispatch.leases_are_cheap();
            let window = pace.window(spec.workers, plan.dispatch.serves_alone(&spec.app), none_ahead);
            // A draining replica keeps what it holds: at a shutdown, a call
            // put back in the queue would find no replica to run it.
            let recalls = if draining || !stalled { Vec::new() } else { self.recalls(window) };
            if !recalls.is_empty() {
                with_exit(send_bytes(&mut write, &recalls).await, &mut child).await?;
            }
            // A run leased with the end of the last (see `Run::done`) goes out now.
            let mut leased = self.prefetched.take();
            if draining && let Some(lease) = leased.take() {
                plan.dispatch.release(&lease.id);
            }
            if leased.is_none() {
                tokio::select! {
                    lease = plan.dispatch.next(&spec.app, self.all_busy()),
                        if self.inflight.len() < window && !draining && self.exiting.is_none() => leased = Some(lease),
                    frame = frames.recv() => match frame {
                        Some(FromReplica::Done(done)) => {
                            pace.record(done.run_us);
                            self.done(done, draining);
                            self.set_busy();
                        }
                        Some(started @ FromReplica::WorkerStarted { .. }) => {
                            self.worker_restarted(started);
                            self.set_busy();
                        }
                        Some(FromReplica::Returned { seq }) => {
                            self.returned(seq);
                            self.set_busy();
                        }
                        Some(FromReplica::WantBody { seq, parts }) => {
                            if let Some(wants) = self.streams.get(&seq).and_then(|s| s.wants.as_ref()) {
                                let _ = wants.send(parts);
                            }
                        }
                        Some(FromReplica::ResponseHead { seq, status, headers }) => {
                            self.response_head(seq, status, headers, &out, &gone);
                        }
                        Some(FromReplica::ResponseBody { seq, part }) => self.response_part(seq, part),
                        Some(FromReplica::ResponseEnd { seq }) => self.response_end(seq),
                        Some(other) => tracing::warn!(replica = %spec.replica, "unexpected frame {other:?}"),
                        None if draining && self.inflight.is_empty() => {
                            let _ = child.wait().await;
                            return Ok(());
                        }
                        None => {
                            let closed = match &self.exiting {
                                Some((_, reason)) => anyhow!("it exited as it said it would: {reason}"),
                                None => anyhow!("replica connection closed"),
                            };
                            return Err(exit_context(closed, &mut child).await);
                        }
                    },
                    Some(frame) = outgoing.recv() => with_exit(send(&mut write, &frame).await, &mut child).await?,
                    Some(seq) = abandoned.recv() => self.client_gone(seq),
                    Some(id) = cancels.recv() => {
                        let seq = self.inflight.iter().find(|(_, lease)| lease.id == id).map(|(seq, _)| *seq);
                        if let Some(seq) = seq {
                            with_exit(send(&mut write, &ToReplica::Cancel { seq }).await, &mut child).await?;
                        }
                    }
                    // Handled below (an error: the handle is gone, a stop too).
                    _ = stop.changed(), if !draining => stop_asked = true,
                    _ = recheck.tick(), if !self.started.is_empty() => {
                        self.stalled = if self.all_stuck() { self.stalled + 1 } else { 0 };
                    }
                    _ = watchdog.tick() => {
                        self.unpause(&mut last_watch);
                        if self.exiting.as_ref().is_some_and(|(since, _)| since.elapsed() > EXIT_GRACE) {
                            // Its exit hangs (in a GPU library's teardown, say): it
                            // would hold its GPU until killed.
                            let _ = child.kill().await;
                            bail!("the replica said it was exiting but was still running {EXIT_GRACE:?} later, so it was killed");
                        }
                        if let Some(id) = self.overdue() {
                            let _ = child.kill().await;
                            bail!(
                                "task {id} was still unanswered {HUNG_AFTER:?} past its timeout: the replica was hung, \
                                 so it was killed"
                            );
                        }
                    }
                }
            }
            let asked = *stop.borrow_and_update();
            let stopping = !draining && (stop_asked || asked.stops());
            // A run leased with the end of one that ended as the stop came
            // (Redis) goes now or not at all: after the drain the replica
            // takes no run.
            if stopping && leased.is_none() {
                leased = self.prefetched.take();
            }
            // For a new version, a run leased at the same moment goes back
            // for its replicas: a call made once a deploy has answered runs
            // on the new version. (At a scale-down or a shutdown it runs
            // here, sent before the replica is told to drain.)
            if stopping
                && asked == Asked::Replace
                && let Some(lease) = leased.take()
            {
                plan.dispatch.release(&lease.id);
            }
            if let Some(lease) = leased {
                // This run and any others already waiting, up to the
                // window, go in one write: one wake-up of the replica.
                let (mut runs, mut sent) = (Vec::new(), Vec::new());
                let mut next = Some(lease);
                while let Some(lease) = next.take() {
                    seq += 1;
                    sent.push((seq, lease.id.clone()));
                    runs.push(self.admit(seq, lease, &cancel_tx));
                    if self.inflight.len() < window && !stopping {
                        next = plan.dispatch.also_next(&spec.app, self.all_busy());
                    }
                }
                self.set_busy();
                let batch = runs.iter().map(ipc::frame).collect::<Result<Vec<_>>>().map(|frames| frames.concat());
                let written = match batch {
                    Ok(batch) => send_bytes(&mut write, &batch).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    // The runs never reached the replica: they go back
                    // first in line without spending an attempt.
                    for (seq, _) in sent.iter().rev() {
                        if self.started.remove(seq).is_some() {
                            self.ahead.push_front(*seq);
                        }
                    }
                    return Err(exit_context(e, &mut child).await);
                }
                for (seq, id) in sent {
                    if let Some(body) = plan.bodies.take_request(&id) {
                        let (wants, asks) = mpsc::unbounded_channel();
                        tokio::spawn(bodies::pump_request(seq, body, asks, out.clone(), bodies::BODY_IDLE));
                        self.streams.entry(seq).or_default().wants = Some(wants);
                    }
                }
            }
            if stopping {
                draining = true;
                self.set_state(ReplicaState::Draining);
                with_exit(send(&mut write, &ToReplica::Drain).await, &mut child).await?;
            }
        }
    }

    /// Takes `lease` as run `seq`: to a free worker, or to wait in the
    /// replica behind busy ones.
    fn admit(&mut self, seq: u64, lease: Lease, cancels: &mpsc::UnboundedSender<TaskId>) -> ToReplica {
        if self.all_busy() {
            self.ahead.push_back(seq);
        } else {
            self.started.insert(seq, Instant::now());
        }
        self.plan.dispatch.route(&lease.id, cancels);
        let run = RunTask {
            seq,
            task_id: lease.id.clone(),
            attempt: lease.attempt,
            timeout_ms: u64::try_from(lease.timeout.as_millis()).unwrap_or(u64::MAX),
            input: lease.input.to_vec(),
            stream: self.plan.bodies.waits_for(&lease.id),
        };
        self.inflight.insert(seq, lease);
        ToReplica::Run(run)
    }

    /// Whether every worker has been on its run for over [`Pace::STALE`].
    fn all_stuck(&self) -> bool {
        let now = Instant::now();
        let stuck = self.started.values().filter(|started| now.saturating_duration_since(**started) > Pace::STALE);
        stuck.count() >= self.spec.workers as usize
    }

    /// Frames asking back the runs waiting in the replica beyond `window`
    /// (every worker is stuck on a long run): newest first, they go back to
    /// the queue, where an idle replica, or a new one the autoscaler starts
    /// for them, takes them. A run whose request body already streams stays.
    fn recalls(&mut self, window: usize) -> Vec<u8> {
        let held = self.inflight.len().saturating_sub(self.recalling.len());
        if held <= window {
            return Vec::new();
        }
        let recall: Vec<u64> = (self.ahead.iter().rev())
            .filter(|seq| !self.recalling.contains(seq) && !self.streams.contains_key(seq))
            .take(held - window)
            .copied()
            .collect();
        self.recalling.extend(&recall);
        recall.into_iter().filter_map(|seq| ipc::frame(&ToReplica::Recall { seq }).ok()).collect::<Vec<_>>().concat()
    }

    /// The replica gave back run `seq` without running it: first in line
    /// again in the queue, its attempt not counted.
    fn returned(&mut self, seq: u64) {
        self.recalling.remove(&seq);
        let Some(lease) = self.inflight.remove(&seq) else { return };
        if self.started.remove(&seq).is_some() {
            // Taken as started by the worker that freed before it: that
            // worker skipped it and took the next run waiting.
            self.start_next();
        } else {
            self.ahead.retain(|ahead| *ahead != seq);
        }
        self.plan.dispatch.release(&lease.id);
    }

    /// Time this loop did not run at all (the node was frozen, or starved of
    /// CPU) is not its runs' time: a replica whose answers wait unread in
    /// its socket is not hung. Called at each watchdog tick.
    fn unpause(&mut self, last_watch: &mut Instant) {
        let now = Instant::now();
        let paused = now.saturating_duration_since(*last_watch).saturating_sub(WATCH_EVERY);
        *last_watch = now;
        if paused > WATCH_EVERY {
            for started in self.started.values_mut() {
                *started += paused;
            }
        }
    }

    /// A run unanswered [`HUNG_AFTER`] past its timeout, if any.
    fn overdue(&self) -> Option<&TaskId> {
        let now = Instant::now();
        self.started.iter().find_map(|(seq, started)| {
            let lease = self.inflight.get(seq)?;
            (now.saturating_duration_since(*started) > lease.timeout + HUNG_AFTER).then_some(&lease.id)
        })
    }

    async fn await_ready(&self, frames: &mut mpsc::UnboundedReceiver<FromReplica>) -> Result<()> {
        loop {
            match frames.recv().await {
                Some(started @ FromReplica::WorkerStarted { .. }) => self.worker_started(started),
                Some(FromReplica::Ready) => return Ok(()),
                Some(FromReplica::StartFailed { message }) => bail!("replica failed to start: {message}"),
                Some(FromReplica::Done(_)) => bail!("replica reported a task before it was ready"),
                Some(other) => bail!("replica sent {other:?} before it was ready"),
                None => bail!("replica exited while starting"),
            }
        }
    }

    /// Logs a worker's start (first, or after its instance was replaced).
    fn worker_started(&self, frame: FromReplica) {
        let FromReplica::WorkerStarted { worker, instantiate_us, init_us, stdout, stderr, gpu_bytes } = frame else {
            return;
        };
        self.info.lock().unwrap().set_gpu_bytes(worker, gpu_bytes);
        let spec = &self.plan.spec;
        self.plan.logs.capture(&spec.app, &format!("init {} worker {worker}", spec.replica), &stdout, &stderr);
        tracing::info!(app = %spec.app, replica = %spec.replica, worker, instantiate_us, init_us, "worker started");
    }

    /// A worker built a new instance after its last run and takes the
    /// oldest run waiting in the replica, if any.
    fn worker_restarted(&mut self, frame: FromReplica) {
        self.worker_started(frame);
        self.restarting = self.restarting.saturating_sub(1);
        self.start_next();
    }

    fn all_busy(&self) -> bool {
        self.inflight.len() + self.restarting >= self.spec.workers as usize
    }

    /// The oldest run waiting in the replica has started on a worker.
    fn start_next(&mut self) {
        if let Some(next) = self.ahead.pop_front()
            && let Some(lease) = self.inflight.get(&next)
        {
            self.started.insert(next, Instant::now());
            self.plan.dispatch.started(&lease.id);
        }
    }

    /// A run ended. Unless the replica is `draining` (or exiting), a store
    /// that is a round trip away (Redis) leases the freed worker's next run
    /// with this end.
    fn done(&mut self, done: TaskDone, draining: bool) {
        // The worker that sent this takes the oldest run waiting in the
        // replica: now, or once it has a new instance. Not if the replica is
        // going down (its GPU failed), nor if that new instance fails to start.
        self.ahead.retain(|seq| *seq != done.seq);
        self.recalling.remove(&done.seq);
        self.started.remove(&done.seq);
        if let Some(reason) = &done.exits {
            self.exiting.get_or_insert_with(|| (Instant::now(), reason.clone()));
        }
        if done.restarts {
            self.restarting += 1;
        } else if done.exits.is_none() {
            self.start_next();
        }
        let Some(lease) = self.inflight.remove(&done.seq) else {
            tracing::warn!(replica = %self.plan.spec.replica, seq = done.seq, "done for an unknown run");
            return;
        };
        {
            let mut info = self.info.lock().unwrap();
            info.tasks_done += 1;
            info.set_gpu_bytes(done.worker, done.gpu_bytes);
        }
        let run_time = Duration::from_micros(done.run_us);
        self.plan.times.record(run_time);
        self.plan.metrics.run_ended(&lease.app, outcome_name(&done.outcome), run_time);
        self.plan.logs.capture(&lease.app, &format!("task {}", lease.id), &done.stdout, &done.stderr);
        let finish = match done.outcome {
            Outcome::Complete(output) if output.len() as u64 > lease.max_result_size => Finish::Rejected(TaskError {
                code: ErrorCode::ResultTooLarge,
                message: format!(
                    "the handler's output is {}, over the app's [task_queue] max_result_size of {}",
                    crate::config::describe_size(output.len() as u64),
                    crate::config::describe_size(lease.max_result_size)
                ),
            }),
            Outcome::Complete(output) => Finish::Complete(output.into()),
            Outcome::BadInput(message) => Finish::Rejected(TaskError { code: ErrorCode::BadInput, message }),
            Outcome::Failed(message) => Finish::Rejected(TaskError { code: ErrorCode::GuestError, message }),
            Outcome::Trap(message) => Finish::Retryable(TaskError { code: ErrorCode::GuestTrap, message }),
            Outcome::OutOfMemory(message) => Finish::Retryable(TaskError { code: ErrorCode::OutOfMemory, message }),
            Outcome::DeviceLost(message) => Finish::Retryable(TaskError { code: ErrorCode::ReplicaLost, message }),
            Outcome::Timeout => Finish::Retryable(TaskError {
                code: ErrorCode::Timeout,
                message: format!("the task ran past its timeout of {}", crate::config::format_duration(lease.timeout)),
            }),
            Outcome::Cancelled => Finish::Cancelled,
        };
        let finish = self.end_streams(done.seq, &lease.id, finish);
        let dispatch = &self.plan.dispatch;
        // For a worker free now (not one building a new instance first).
        let free = !draining && self.exiting.is_none() && !self.all_busy();
        let next = (free && !dispatch.leases_are_cheap()).then_some(lease.app.as_str());
        self.prefetched = dispatch.finish_and_next(&lease.id, finish, next);
    }

    /// Passes a streamed response's head to the gateway, with a body that
    /// will yield its parts. A body nobody takes, or whose client goes away,
    /// says so on `gone` as it drops, which cancels the run (`client_gone`).
    fn response_head(
        &mut self,
        seq: u64,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        out: &mpsc::UnboundedSender<ToReplica>,
        gone: &mpsc::UnboundedSender<u64>,
    ) {
        let Some(lease) = self.inflight.get(&seq) else { return };
        let (parts, received) = mpsc::unbounded_channel();
        let body = bodies::response_body(seq, received, out.clone(), gone.clone());
        let start = ResponseStart { status, headers, body };
        if let Some(head) = self.plan.bodies.take_head(&lease.id) {
            let _ = head.send(start);
        }
        self.streams.entry(seq).or_default().response = Some(parts);
    }

    fn response_part(&mut self, seq: u64, part: Vec<u8>) {
        if let Some(response) = self.streams.get(&seq).and_then(|s| s.response.as_ref()) {
            let _ = response.send(Ok(part.into()));
        }
    }

    /// The response of run `seq` is whole: its client's body ends now (the
    /// run goes on; a failure of it can no longer reach that client).
    fn response_end(&mut self, seq: u64) {
        if let Some(streams) = self.streams.get_mut(&seq) {
            streams.response = None;
        }
    }

    /// The client of a streamed response went away: stop the run.
    fn client_gone(&mut self, seq: u64) {
        if let Some(streams) = self.streams.get_mut(&seq)
            && streams.response.take().is_some()
            && let Some(lease) = self.inflight.get(&seq)
        {
            tracing::debug!(task = %lease.id, "the client of a streamed response went away; cancelling");
            let _ = self.plan.dispatch.cancel(&lease.id);
        }
    }

    /// Ends the streams of run `seq`. A run whose bodies moved cannot be
    /// replayed, so its failure is final, and its client's body ends with it.
    fn end_streams(&mut self, seq: u64, id: &str, finish: Finish) -> Finish {
        let Some(streams) = self.streams.remove(&seq) else { return finish };
        let (finish, error) = match finish {
            Finish::Retryable(error) | Finish::Rejected(error) => {
                let message = error.message.clone();
                (Finish::Rejected(error), Some(message))
            }
            Finish::Cancelled => (Finish::Cancelled, Some("the task was cancelled".to_owned())),
            complete => (complete, None),
        };
        if let (Some(response), Some(message)) = (streams.response, error) {
            // The client sees only a connection cut short: say why here
            // (unless it went away itself: that cancelled the run).
            if !matches!(finish, Finish::Cancelled) {
                let (app, replica) = (&self.plan.spec.app, &self.plan.spec.replica);
                tracing::warn!(%app, %replica, "task {id}: its response was cut short after its head was sent: {message}");
                self.plan.logs.push(app, format!("[replica {replica}] task {id}: response cut short: {message}"));
            }
            let _ = response.send(Err(message));
        }
        finish
    }

    /// Puts back what a dead replica held: each run it started counts as a
    /// failed attempt; a run still waiting for a worker goes back first in line.
    fn requeue_inflight(&mut self, error: Option<&anyhow::Error>) {
        if let Some(lease) = self.prefetched.take() {
            self.plan.dispatch.release(&lease.id);
        }
        let reason = error.map_or_else(|| "replica stopped".to_owned(), |e| format!("{e:#}"));
        for seq in std::mem::take(&mut self.ahead) {
            // A run whose request body already moved cannot start over.
            if !self.streams.contains_key(&seq)
                && let Some(lease) = self.inflight.remove(&seq)
            {
                self.plan.dispatch.release(&lease.id);
            }
        }
        for (seq, lease) in std::mem::take(&mut self.inflight) {
            let message = format!("replica {} was lost while running the task: {reason}", self.plan.spec.replica);
            let lost = Finish::Retryable(TaskError { code: ErrorCode::ReplicaLost, message });
            let finish = self.end_streams(seq, &lease.id, lost);
            self.plan.dispatch.finish(&lease.id, finish);
        }
        self.set_busy();
    }
}

/// One of [`crate::metrics::OUTCOMES`].
fn outcome_name(outcome: &Outcome) -> &'static str {
    let [complete, bad_input, guest_error, trap, out_of_memory, timeout, device_lost, cancelled] =
        crate::metrics::OUTCOMES;
    match outcome {
        Outcome::Complete(_) => complete,
        Outcome::BadInput(_) => bad_input,
        Outcome::Failed(_) => guest_error,
        Outcome::Trap(_) => trap,
        Outcome::OutOfMemory(_) => out_of_memory,
        Outcome::Timeout => timeout,
        Outcome::DeviceLost(_) => device_lost,
        Outcome::Cancelled => cancelled,
    }
}

/// How many runs a replica is sent at once. Each worker takes one; when the
/// app's tasks are short, each may also have one waiting in the replica, so a
/// worker that finishes starts the next at once instead of after a round trip
/// through the node; when they are tiny (a hello, a lookup) and this is the
/// app's only replica, three, so that under load workers rarely sleep and
/// frames come in batches (about 10% more requests/s, a fifth fewer context
/// switches per request in the replica). With other replicas, one: the
/// average is of past runs, and a burst of long tasks after tiny ones would
/// otherwise wait here while another replica sits idle. Apps whose tasks
/// are long are never held back this way, nor while every worker has been
/// on its run for [`Pace::STALE`]: the runs held back then are recalled.
#[derive(Default)]
struct Pace {
    /// Recent average run time, in microseconds (`None` before any ran).
    average_us: Option<f64>,
}

impl Pace {
    /// Runs this short on average are sent ahead.
    const SHORT_US: f64 = 2_000.0;
    /// Runs this short on average are sent three ahead per worker.
    const TINY_US: f64 = 300.0;
    /// Weight of the newest run in the average.
    const WEIGHT: f64 = 0.1;
    /// Every worker on a run this long says the app's tasks are long now,
    /// whatever the average of past runs (a burst of long tasks after tiny
    /// ones; the average learns of them only as they end), and that the
    /// runs waiting in the replica would wait long.
    const STALE: Duration = Duration::from_millis(50);

    fn record(&mut self, run_us: u64) {
        let run_us = run_us as f64;
        self.average_us = Some(self.average_us.map_or(run_us, |avg| avg + Self::WEIGHT * (run_us - avg)));
    }

    /// `alone`: no other replica could take what this one holds back;
    /// `none_ahead`: none are sent ahead whatever the pace (every worker is
    /// on a long run, or each run sent ahead costs a round trip).
    fn window(&self, workers: u32, alone: bool, none_ahead: bool) -> usize {
        let ahead = match self.average_us {
            _ if none_ahead => 0,
            Some(avg) if avg <= Self::TINY_US && alone => 3 * workers,
            Some(avg) if avg <= Self::SHORT_US => workers,
            _ => 0,
        };
        (workers + ahead) as usize
    }
}

/// How long a replica that said it exits may take to be gone.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Writes a frame to the replica. One that stops reading its socket (hung)
/// fails the write after [`HUNG_AFTER`] instead of blocking the node's side.
async fn send(write: &mut OwnedWriteHalf, message: &ToReplica) -> Result<()> {
    send_bytes(write, &ipc::frame(message)?).await
}

/// [`send`] of frames already encoded.
async fn send_bytes(write: &mut OwnedWriteHalf, frames: &[u8]) -> Result<()> {
    match tokio::time::timeout(HUNG_AFTER, write.write_all(frames)).await {
        Ok(written) => written.context("failed to write to the replica"),
        Err(_) => bail!("the replica did not read its socket for {HUNG_AFTER:?}: it was hung, so it was killed"),
    }
}

/// Starts `beamlet replica` with its end of a fresh socket pair (its number
/// given with `--fd`). A replica on a CUDA GPU sees that device only.
pub(crate) fn start_process(
    exe: &PathBuf,
    gpu: Option<&GpuSpec>,
) -> Result<(tokio::process::Child, tokio::net::UnixStream)> {
    let (node_end, child_end) = std::os::unix::net::UnixStream::pair().context("failed to create a socket pair")?;
    let child_fd = child_end.as_raw_fd();
    let mut command = tokio::process::Command::new(exe);
    command.arg("replica").arg("--fd").arg(child_fd.to_string()).stdin(Stdio::null()).kill_on_drop(true);
    // `ps` shows the binary's name, not the path it is started from.
    command.arg0(std::env::current_exe().unwrap_or_else(|_| "beamlet".into()));
    if let Some(gpu) = gpu.filter(|gpu| gpu.backend == GpuBackendKind::Cuda) {
        // By UUID where NVML gave one (the same device whatever order CUDA
        // numbers them in); else by index, in NVML's (PCI bus) order.
        let visible = gpu.uuid.clone().filter(|uuid| uuid.starts_with("GPU-")).unwrap_or_else(|| gpu.index.to_string());
        command.env("CUDA_VISIBLE_DEVICES", visible).env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    // The child's end is inherited by this child only: it is inheritable
    // just while the node starts no other. Without a `pre_exec` hook the
    // process starts by posix_spawn (vfork), whose cost does not grow with
    // the node's memory as fork's does (a node that compiled a large
    // component started replicas 2-3x slower).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let child = {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: `child_fd` is open (owned by `child_end`, alive here).
        if unsafe { libc::fcntl(child_fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error()).context("failed to pass the socket to the replica");
        }
        let spawned = command.spawn();
        drop(child_end);
        spawned.with_context(|| format!("failed to start replica process {exe:?}"))?
    };
    node_end.set_nonblocking(true)?;
    Ok((child, tokio::net::UnixStream::from_std(node_end)?))
}

fn read_frames(read: tokio::net::unix::OwnedReadHalf) -> mpsc::UnboundedReceiver<FromReplica> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut read = BufReader::with_capacity(64 * 1024, read);
        while let Ok(Some(frame)) = ipc::read_async::<FromReplica>(&mut read).await {
            if tx.send(frame).is_err() {
                break;
            }
        }
    });
    rx
}

/// A failed write to the replica, with how its process ended (usually why
/// the write failed).
async fn with_exit(written: Result<()>, child: &mut tokio::process::Child) -> Result<()> {
    match written {
        Ok(()) => Ok(()),
        Err(e) => Err(exit_context(e, child).await),
    }
}

/// Adds how the process ended to an error about it.
async fn exit_context(error: anyhow::Error, child: &mut tokio::process::Child) -> anyhow::Error {
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        Ok(Ok(status)) => error.context(format!("replica process exited ({status})")),
        _ => {
            let _ = child.start_kill();
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_go_ahead_only_while_tasks_are_short_and_workers_are_not_stuck() {
        let mut pace = Pace::default();
        assert_eq!(pace.window(4, true, false), 4, "before any run ends, none ahead");
        pace.record(100);
        assert_eq!(pace.window(4, true, false), 16, "tiny tasks, the app's only replica: three ahead per worker");
        assert_eq!(pace.window(4, false, false), 8, "with other replicas, one");
        assert_eq!(pace.window(4, true, true), 4, "every worker on a long run: none ahead, whatever the average");
        for _ in 0..50 {
            pace.record(5_000);
        }
        assert_eq!(pace.window(4, true, false), 4, "long tasks: none ahead");
    }
}
