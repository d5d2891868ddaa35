//! The task queue: every invocation, synchronous or not, is a task here.
//!
//! [`Queue`] is the storage interface (the embedded store and a Redis backend
//! sit behind it); [`Dispatch`] adds what one node needs on top: waking
//! replicas when work arrives and callers when a task ends.

mod dispatch;
mod embedded;
mod redis;
mod sqlite;

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::oneshot;

pub(crate) use self::dispatch::Dispatch;
pub(crate) use self::embedded::EmbeddedQueue;
pub(crate) use self::redis::{AppsChanged, Elsewhere, Event, Published, RedisQueue, Saved, spawn_cluster};

pub(crate) type TaskId = String;

/// A task's place in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum TaskStatus {
    /// Queued, not yet run.
    Pending,
    /// Leased to a worker.
    Running,
    /// Finished with an output.
    Complete,
    /// Finished with an error (a trap after its retries, or the handler's error).
    Failed,
    /// Ran past its timeout on its last attempt.
    Timeout,
    /// Cancelled by a caller.
    Cancelled,
    /// Still queued when its `ttl` ran out.
    Expired,
    /// Queued again after a failed attempt, waiting for another.
    Retry,
}

/// Names as the API and the store spell them, both ways.
macro_rules! names {
    ($ty:ty { $($variant:ident = $name:literal),* $(,)? }) => {
        impl $ty {
            pub(crate) fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }

            pub(crate) fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

names!(TaskStatus {
    Pending = "PENDING", Running = "RUNNING", Complete = "COMPLETE", Failed = "FAILED",
    Timeout = "TIMEOUT", Cancelled = "CANCELLED", Expired = "EXPIRED", Retry = "RETRY",
});

names!(ErrorCode {
    BadInput = "BAD_INPUT", GuestError = "GUEST_ERROR", GuestTrap = "GUEST_TRAP", OutOfMemory = "OUT_OF_MEMORY",
    Timeout = "TIMEOUT", ReplicaLost = "REPLICA_LOST", ResultTooLarge = "RESULT_TOO_LARGE", StartFailed = "START_FAILED",
    Cancelled = "CANCELLED", Expired = "EXPIRED", ShuttingDown = "SHUTTING_DOWN", NoCapacity = "NO_CAPACITY",
});

impl TaskStatus {
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed | Self::Timeout | Self::Cancelled | Self::Expired)
    }
}

/// Why a task failed, in the API's error shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct TaskError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum ErrorCode {
    /// The handler refused its input.
    BadInput,
    /// The handler returned an error.
    GuestError,
    /// The guest trapped.
    GuestTrap,
    /// The guest exhausted its memory limit.
    OutOfMemory,
    /// The task ran past its timeout.
    Timeout,
    /// The replica running the task died.
    ReplicaLost,
    /// The output was over the app's `max_result_size`.
    ResultTooLarge,
    /// The app's replicas keep failing to start (`init` fails, say).
    StartFailed,
    Cancelled,
    Expired,
    /// The node is stopping and will not run the call.
    ShuttingDown,
    /// Every replica of the app waits for capacity: the call is refused.
    NoCapacity,
}

names!(CallbackState { Pending = "pending", Delivered = "delivered", Failed = "failed" });

/// Where the callback of a task that ended stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CallbackState {
    /// Not delivered yet (being tried, or waiting for a retry).
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up on after its tries (or the app was removed before it went).
    Failed,
}

impl CallbackState {
    /// As a number, for the journal: 0 none, 1 pending, 2 delivered, 3 failed.
    pub(crate) fn code(state: Option<Self>) -> i64 {
        match state {
            None => 0,
            Some(Self::Pending) => 1,
            Some(Self::Delivered) => 2,
            Some(Self::Failed) => 3,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Pending),
            2 => Some(Self::Delivered),
            3 => Some(Self::Failed),
            _ => None,
        }
    }
}

/// What a caller sees of a task.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TaskRecord {
    pub id: TaskId,
    pub app: String,
    pub status: TaskStatus,
    /// Runs started so far.
    pub attempts: u32,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub error: Option<TaskError>,
    /// Where the result is POSTed when the task ends.
    #[serde(skip)]
    pub callback_url: Option<String>,
    /// Its callback, once the task has ended with one to send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackState>,
    /// Journaled and kept after it ends; `false` for calls whose caller
    /// waits (they are forgotten once the caller has the answer).
    #[serde(skip)]
    pub durable: bool,
}

/// A task that ended, with its output when it completed.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub record: TaskRecord,
    pub output: Option<Bytes>,
}

/// A task to add.
#[derive(Debug, Clone)]
pub(crate) struct NewTask {
    /// From [`new_task_id`]; chosen before queuing so a caller can wait on it.
    pub id: TaskId,
    pub app: String,
    pub input: Bytes,
    /// Re-runs allowed after a trap, crash or timeout.
    pub retries: u32,
    pub timeout: Duration,
    /// How long it may wait in the queue.
    pub ttl: Duration,
    /// How long its result is kept once it ends.
    pub result_ttl: Duration,
    /// Largest output accepted, in bytes.
    pub max_result_size: u64,
    /// Where to POST the result when the task ends.
    pub callback_url: Option<String>,
    /// Refuse the task when this many of the app's tasks are already queued.
    pub max_queued: u32,
    /// Journal the task so it survives a restart. Calls whose caller waits
    /// on the connection (REST invoke, HTTP) are not: a crash ends both.
    pub durable: bool,
}

impl NewTask {
    /// The task as queued at `now`, before any run.
    pub(crate) fn pending_record(&self, now: u64) -> TaskRecord {
        TaskRecord {
            id: self.id.clone(),
            app: self.app.clone(),
            status: TaskStatus::Pending,
            attempts: 0,
            created_at: now,
            started_at: None,
            ended_at: None,
            error: None,
            callback_url: self.callback_url.clone(),
            callback: None,
            durable: self.durable,
        }
    }
}

/// A task handed to a worker.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub id: TaskId,
    pub app: String,
    pub input: Bytes,
    /// 1 for the first run.
    pub attempt: u32,
    pub timeout: Duration,
    pub max_result_size: u64,
}

/// How a run ended, from the queue's side.
#[derive(Debug, Clone)]
pub(crate) enum Finish {
    Complete(Bytes),
    /// Final whatever the retries left: the handler itself said no.
    Rejected(TaskError),
    /// Retried while attempts remain: a trap, a timeout, a lost replica.
    Retryable(TaskError),
    Cancelled,
}

/// Queued and running tasks of one app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Counts {
    pub queued: u64,
    pub running: u64,
}

/// What to look at when the embedded task store cannot write.
pub(crate) const STORE_HINT: &str = "is the data dir's disk full, or the store not writable?";

#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    #[error(
        "app {app:?} already has {limit} queued task(s) waiting for a worker (max_queued); retry later or raise \
         [task_queue] max_queued"
    )]
    Full { app: String, limit: u32 },
    #[error(
        "the node holds {} for its tasks (inputs not yet run, results kept for result_ttl) and may hold {} \
         (serve --max-task-bytes); retry later, or keep results for less time ([task_queue] result_ttl)",
        crate::config::describe_size(*held),
        crate::config::describe_size(*budget)
    )]
    NodeFull { held: u64, budget: u64 },
    #[error("no task {0:?}")]
    UnknownTask(TaskId),
    #[error("task {id:?} already ended as {}", status.as_str())]
    AlreadyEnded { id: TaskId, status: TaskStatus },
    #[error("the task store could not save the task; see the node's log ({hint})", hint = STORE_HINT)]
    Store,
    /// The shared task store lost the task (Redis restarted without its
    /// data), or this node was taken for dead and its calls cancelled.
    #[error(
        "the task store lost task {0:?} before it ended: Redis restarted without its data, or this node did not \
         answer Redis for a while and was taken for dead (its calls were cancelled); call again"
    )]
    Lost(TaskId),
    /// The shared task store (Redis) failed.
    #[error("the task store (Redis) failed: {0}")]
    Backend(String),
    #[error(
        "the node is shutting down and takes no more calls; call again once it is back (tasks sent to /tasks are kept)"
    )]
    ShuttingDown,
    /// The node stopped (its shutdown grace ran out) while the call ran.
    #[error("the node stopped before the call ended (its shutdown grace ran out); call again once it is back")]
    CutOff,
}

/// Which queued tasks [`Queue::end_queued`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    All,
    /// Calls (their callers wait, the tasks are not durable), whichever
    /// node of a cluster took them.
    Calls,
    /// Calls this node took: its callers'.
    CallsTakenHere,
}

/// What cancelling did.
#[derive(Debug, Clone)]
pub(crate) enum Cancelled {
    /// It was queued and is gone from the queue.
    Queued(TaskRecord),
    /// It was running; the worker must be told to stop it.
    Running(TaskRecord),
}

/// The storage behind the task lifecycle. Implementations apply each change
/// atomically; [`Dispatch`] does all waiting and waking.
pub(crate) trait Queue: Send + Sync + 'static {
    fn enqueue(&self, task: NewTask, now: u64) -> Result<TaskRecord, QueueError>;
    /// Takes the app's oldest queued task, marking it running.
    fn lease(&self, app: &str, now: u64) -> Option<Lease>;
    /// Takes the app's oldest queued task for a replica that will start it
    /// once one of its workers frees. It is running from then on, but the
    /// store records that only at [`Queue::started`]: a restart meanwhile
    /// finds it queued, its attempt not counted.
    fn lease_ahead(&self, app: &str, now: u64) -> Option<Lease>;
    /// A task leased ahead has started.
    fn started(&self, id: &str, now: u64);
    /// A task leased ahead never started (its replica was lost): back to the
    /// front of the queue, its attempt not counted.
    fn release(&self, id: &str) -> Option<TaskRecord>;
    /// Ended tasks whose callback was not delivered yet (after a restart),
    /// oldest end first, with their outputs.
    fn pending_callbacks(&self) -> Vec<(TaskRecord, Option<Bytes>)>;
    /// The task's callback was delivered, or given up on.
    fn callback_settled(&self, id: &str, delivered: bool);
    /// Records how a run ended, and returns the task with its output; a
    /// retryable failure with attempts left goes back to the queue as
    /// `Retry`. Unknown or already-ended tasks are `None` (a cancelled task
    /// whose worker reports late). A call (not durable) that ended, taken
    /// on this node, is forgotten at once: what this returns is its answer.
    fn finish(&self, id: &str, finish: Finish, now: u64) -> Option<Ended>;
    /// [`Queue::finish`], then with `next` (an app) the [`Queue::lease`] of
    /// that app's next task for the worker the run freed: one round trip
    /// where the store is remote.
    fn finish_and_lease(
        &self,
        id: &str,
        finish: Finish,
        now: u64,
        next: Option<&str>,
    ) -> (Option<Ended>, Option<Lease>) {
        let ended = self.finish(id, finish, now);
        (ended, next.and_then(|app| self.lease(app, now)))
    }
    /// Ends a queued or running task as cancelled, `why` its error message.
    fn cancel(&self, id: &str, why: &str, now: u64) -> Result<Cancelled, QueueError>;
    fn get(&self, id: &str) -> Option<TaskRecord>;
    fn output(&self, id: &str) -> Option<Bytes>;
    /// Drops an ended task at once (a call whose caller has its answer).
    fn forget(&self, id: &str);
    fn counts(&self, app: &str) -> Counts;
    /// [`Queue::counts`] as last read, for a caller that asks often and
    /// need not be exact (a shared store is not asked again).
    fn recent_counts(&self, app: &str) -> Counts {
        self.counts(app)
    }
    /// The app's tasks, newest first, optionally only those in `status`,
    /// and only those older than the task `before` (the last of the page
    /// before: ids are time-ordered).
    fn list(&self, app: &str, status: Option<TaskStatus>, before: Option<&str>, limit: usize) -> Vec<TaskRecord>;
    /// Expires queued tasks past their ttl and forgets finished tasks past
    /// their result ttl; returns the tasks it expired.
    fn sweep(&self, now: u64) -> Vec<TaskRecord>;
    /// Whether the store answered its last calls (a shared store can be
    /// down for a while); a task missing from a store that does not answer
    /// is not lost.
    fn is_available(&self) -> bool {
        true
    }
    /// Whether the store saves changes now, so the node can take new work
    /// (a store on a full disk answers reads from memory but saves nothing).
    fn saves(&self) -> bool {
        self.is_available()
    }
    /// Whether a lease that finds nothing costs next to nothing (in
    /// memory), so a replica may look for more runs to send in one write.
    fn leases_are_cheap(&self) -> bool {
        true
    }
    /// Resolves once every change made so far is durable (at once for a
    /// store that keeps nothing); an error if it could not be made durable.
    fn sync(&self) -> oneshot::Receiver<()>;
    /// Forgets a task whose submit was refused because the store could not
    /// make it durable: its caller was told so, and would run it twice by
    /// submitting it again. A store whose enqueue is durable when it
    /// returns has nothing to undo.
    fn abandon(&self, _id: &str) {}
    /// Ends the queued tasks of `app` that `which` says with `status` and
    /// `error`.
    fn end_queued(&self, app: &str, which: Queued, status: TaskStatus, error: TaskError, now: u64) -> Vec<TaskRecord>;
}

/// Milliseconds since the Unix epoch: the queue's clock.
pub(crate) fn now_ms() -> u64 {
    millis_since_epoch(std::time::SystemTime::now())
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn millis_since_epoch(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, millis)
}

pub(crate) fn new_task_id() -> TaskId {
    uuid::Uuid::now_v7().to_string()
}

/// A durable task of app `a` (tests of the stores): input `{"x":1}`, a 1 s
/// timeout, a 10 s ttl, results kept 60 s.
#[cfg(test)]
pub(crate) fn sample_task(retries: u32, max_queued: u32) -> NewTask {
    NewTask {
        id: new_task_id(),
        app: "a".into(),
        input: Bytes::from_static(b"{\"x\":1}"),
        retries,
        timeout: Duration::from_secs(1),
        ttl: Duration::from_secs(10),
        result_ttl: Duration::from_secs(60),
        max_result_size: 1024,
        callback_url: None,
        max_queued,
        durable: true,
    }
}

/// A run that trapped (retried while attempts remain).
#[cfg(test)]
pub(crate) fn trapped() -> Finish {
    Finish::Retryable(TaskError { code: ErrorCode::GuestTrap, message: "boom".into() })
}

/// A task store file in a fresh directory of its own, removed when dropped
/// (tests of the durable store).
#[cfg(test)]
pub(crate) struct ScratchStore(std::path::PathBuf);

#[cfg(test)]
impl ScratchStore {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("beamlet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> std::path::PathBuf {
        self.0.join("tasks.db")
    }
}

#[cfg(test)]
impl Drop for ScratchStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
