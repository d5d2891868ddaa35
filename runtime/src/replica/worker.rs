//! One worker: a store and an instance of the app's component, running one
//! task at a time. A trap or timeout discards the instance; the next task gets
//! a fresh one (with `init` run again), so one bad task never poisons another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::Replies;
use super::cancel::Cancels;
use crate::host::WorkerState;
use crate::host::bindings::{Function, FunctionPre, GuestError, TaskContext};
use crate::ipc::{FromReplica, Outcome, ReplicaSpec, RunTask, TaskDone};

/// A live instance and the store that owns it.
struct Live {
    store: Store<WorkerState>,
    bindings: Function,
}

pub(crate) struct Worker {
    index: u32,
    spec: Arc<ReplicaSpec>,
    pre: FunctionPre<WorkerState>,
    replies: Replies,
    cancel: Arc<AtomicBool>,
    live: Option<Live>,
}

/// The tail of a guest's stderr quoted in a trap message (panic messages land there).
const STDERR_TAIL: usize = 2048;

impl Worker {
    /// Creates the worker's first instance and runs `init`, logging the start.
    pub(crate) fn start(
        index: u32,
        spec: Arc<ReplicaSpec>,
        pre: FunctionPre<WorkerState>,
        replies: Replies,
    ) -> Result<Self> {
        let mut worker = Self { index, spec, pre, replies, cancel: Arc::new(AtomicBool::new(false)), live: None };
        worker.instantiate().with_context(|| format!("failed to start worker {index}"))?;
        Ok(worker)
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    fn instantiate(&mut self) -> Result<()> {
        self.live = None;
        let started = Instant::now();
        let mut store =
            Store::new(self.pre.engine(), WorkerState::new(self.spec.memory_per_worker, self.cancel.clone()));
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            Ok(if ctx.data().should_stop() { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(1) })
        });
        let bindings =
            self.pre.instantiate(&mut store).map_err(anyhow::Error::from).context("failed to instantiate")?;
        let instantiate_us = micros(started.elapsed());
        let init_started = Instant::now();
        store.data_mut().deadline = Some(init_started + Duration::from_millis(self.spec.init_timeout_ms));
        let init = bindings.call_init(&mut store);
        store.data_mut().deadline = None;
        let (stdout, stderr) = (store.data().stdout.take(), store.data().stderr.take());
        match init {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(anyhow!("init returned an error: {message}{}", stderr_note(&stderr))),
            Err(trap) => {
                let outcome = classify_trap(&mut store, trap, &stderr);
                return Err(anyhow!("init did not finish: {}", describe(&outcome)));
            }
        }
        let init_us = micros(init_started.elapsed());
        // The node logs the start when this frame arrives.
        self.replies.send(&FromReplica::WorkerStarted { worker: self.index, instantiate_us, init_us, stdout, stderr });
        self.live = Some(Live { store, bindings });
        Ok(())
    }

    /// Takes tasks until the queue closes (the replica drains).
    pub(crate) fn run(mut self, queue: &Mutex<Receiver<RunTask>>, cancels: &Cancels) {
        loop {
            let task = match queue.lock().unwrap().recv() {
                Ok(task) => task,
                Err(_) => return,
            };
            let seq = task.seq;
            let done = if cancels.begin(seq, &self.cancel) {
                let done = self.run_one(task);
                cancels.end(seq);
                done
            } else {
                TaskDone {
                    seq,
                    worker: self.index,
                    outcome: Outcome::Cancelled,
                    stdout: vec![],
                    stderr: vec![],
                    run_us: 0,
                }
            };
            self.replies.send(&FromReplica::Done(done));
            if self.live.is_none()
                && let Err(e) = self.instantiate()
            {
                // A replacement that cannot start leaves the replica short a
                // worker: exit so the supervisor starts a whole new one.
                tracing::error!(app = %self.spec.app, replica = %self.spec.replica, "{e:#}");
                std::process::exit(2);
            }
        }
    }

    fn run_one(&mut self, task: RunTask) -> TaskDone {
        let started = Instant::now();
        let mut done = TaskDone {
            seq: task.seq,
            worker: self.index,
            outcome: Outcome::Cancelled,
            stdout: vec![],
            stderr: vec![],
            run_us: 0,
        };
        if self.live.is_none()
            && let Err(e) = self.instantiate()
        {
            done.outcome = Outcome::Trap(format!("{e:#}"));
            return done;
        }
        let live = self.live.as_mut().expect("instantiated above");
        let timeout = Duration::from_millis(task.timeout_ms);
        let ctx = TaskContext {
            task_id: task.task_id,
            attempt: task.attempt,
            app: self.spec.app.clone(),
            replica: self.spec.replica.clone(),
            worker: self.index,
            deadline_ms: unix_ms(SystemTime::now() + timeout),
        };
        live.store.data_mut().deadline = Some(started + timeout);
        let result = live.bindings.call_handle(&mut live.store, &ctx, &task.input);
        live.store.data_mut().deadline = None;
        done.stdout = live.store.data().stdout.take();
        done.stderr = live.store.data().stderr.take();
        done.run_us = micros(started.elapsed());
        let keep = match result {
            Ok(Ok(output)) => {
                done.outcome = Outcome::Complete(output);
                true
            }
            Ok(Err(GuestError::BadInput(message))) => {
                done.outcome = Outcome::BadInput(message);
                true
            }
            Ok(Err(GuestError::Failed(message))) => {
                done.outcome = Outcome::Failed(message);
                true
            }
            Err(trap) => {
                done.outcome = classify_trap(&mut live.store, trap, &done.stderr);
                false
            }
        };
        if !keep || self.spec.fresh_instance_per_task {
            self.live = None;
        }
        done
    }
}

/// Says why a guest stopped: cancelled, timed out, out of memory, or a trap.
fn classify_trap(store: &mut Store<WorkerState>, error: wasmtime::Error, stderr: &[u8]) -> Outcome {
    let state = store.data_mut();
    let interrupted = error.downcast_ref::<Trap>() == Some(&Trap::Interrupt);
    if interrupted && state.cancel_requested() {
        return Outcome::Cancelled;
    }
    if interrupted {
        return Outcome::Timeout;
    }
    if let Some(desired) = state.limiter.take_refused() {
        return Outcome::OutOfMemory(format!(
            "guest exceeded its memory limit of {} per worker (it asked for {}): {}{}",
            crate::config::format_size(state.limiter.limit()),
            crate::config::format_size(desired),
            trap_message(&error),
            stderr_note(stderr)
        ));
    }
    Outcome::Trap(format!("guest trapped: {}{}", trap_message(&error), stderr_note(stderr)))
}

fn trap_message(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}

fn stderr_note(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let start = text.len().saturating_sub(STDERR_TAIL);
    let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
    format!("; guest stderr: {}", &text[start..])
}

/// A short description of an outcome, for logs and init failures.
pub(crate) fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Complete(_) => "complete".into(),
        Outcome::BadInput(m) | Outcome::Failed(m) | Outcome::Trap(m) | Outcome::OutOfMemory(m) => m.clone(),
        Outcome::Timeout => "timed out".into(),
        Outcome::Cancelled => "cancelled".into(),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl WorkerState {
    fn should_stop(&self) -> bool {
        self.cancel_requested() || self.deadline.is_some_and(|deadline| Instant::now() >= deadline)
    }

    fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
