//! One worker: a store and an instance of the app's component, running one
//! task at a time. A trap or timeout discards the instance; the next task gets
//! a fresh one (with `init` run again), so one bad task never poisons another.
//!
//! Guest calls are futures driven on the worker's own thread (a
//! single-threaded runtime): a `wasi:http` response body is passed on by a
//! task on that same thread while the guest writes it, and a call blocked in
//! a host function is dropped when its deadline passes or it is cancelled
//! (the epoch callback stops one that is running wasm code).

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::Replies;
use super::cancel::{CancelFlag, Cancels, Early};
use super::flows::{Flows, RequestBody, send_early, stream_response};
use crate::host::WorkerState;
use crate::host::bindings::{Function, FunctionPre, GuestError, TaskContext};
use crate::host::gpu::WorkerGpu;
use crate::ipc::HttpRequest;
use crate::ipc::{FromReplica, Outcome, ReplicaSpec, RunTask, TaskDone};
use beamlet_gpu::{Backend, Session};
use futures_util::FutureExt as _;
use http_body_util::BodyExt as _;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

/// A component ready to instantiate, by the world it targets.
#[derive(Clone)]
pub(crate) enum GuestPre {
    Function(FunctionPre<WorkerState>),
    Proxy(ProxyPre<WorkerState>),
}

enum Guest {
    Function(Function),
    Proxy(Proxy),
}

/// A live instance and the store that owns it.
struct Live {
    store: Store<WorkerState>,
    guest: Guest,
}

pub(crate) struct Worker {
    index: u32,
    spec: Arc<ReplicaSpec>,
    pre: GuestPre,
    replies: Replies,
    cancel: Arc<CancelFlag>,
    /// Drives this worker's guest calls, on the worker's thread.
    runtime: tokio::runtime::Runtime,
    allowed_hosts: Arc<[String]>,
    /// Streamed HTTP bodies of the runs in progress (shared with the reader).
    flows: Arc<Flows>,
    /// The replica's GPU, when the app has one.
    gpu: Option<Arc<dyn Backend>>,
    /// GPU work outlived its task: the replica must exit to free the device.
    gpu_stuck: bool,
    live: Option<Live>,
}

/// How long a stopped task's GPU work may take to finish before the replica
/// is replaced to stop it.
const GPU_SETTLE: Duration = Duration::from_secs(2);

/// The tail of a guest's stderr quoted in a trap message (panic messages land there).
const STDERR_TAIL: usize = 2048;

impl Worker {
    /// Creates the worker's first instance and runs `init`, logging the start.
    pub(crate) fn start(
        index: u32,
        spec: Arc<ReplicaSpec>,
        pre: GuestPre,
        replies: Replies,
        flows: Arc<Flows>,
        gpu: Option<Arc<dyn Backend>>,
    ) -> Result<Self> {
        let allowed_hosts = spec.allowed_outbound_hosts.clone().into();
        let cancel = Arc::new(CancelFlag::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("failed to start worker {index}'s runtime"))?;
        let mut worker = Self {
            index,
            spec,
            pre,
            replies,
            cancel,
            runtime,
            allowed_hosts,
            flows,
            gpu,
            gpu_stuck: false,
            live: None,
        };
        worker.instantiate().with_context(|| format!("failed to start worker {index}"))?;
        Ok(worker)
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    fn instantiate(&mut self) -> Result<()> {
        let _running = crate::engine::guest_running();
        self.live = None;
        let started = Instant::now();
        let engine = match &self.pre {
            GuestPre::Function(pre) => pre.engine(),
            GuestPre::Proxy(pre) => pre.engine(),
        };
        let gpu = match (&self.gpu, &self.spec.gpu) {
            (Some(backend), Some(spec)) => {
                let mut session = Session::new(backend.clone(), self.index as usize, spec.quota_per_worker)
                    .map_err(|e| anyhow!("failed to open the worker's GPU stream: {e}"))?;
                // A cancelled task's GPU wait ends then, not at its deadline.
                let cancel = self.cancel.clone();
                session.set_stop(Arc::new(move || cancel.is_set()));
                WorkerGpu::Ready(session)
            }
            _ => WorkerGpu::Unavailable(format!(
                "app {:?} has no GPU; set gpu = \"any\" under [runtime] in its config",
                self.spec.app
            )),
        };
        let state = WorkerState::new(self.spec.memory_per_worker, self.cancel.clone(), self.allowed_hosts.clone(), gpu);
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        // Each tick a running guest also yields to its worker's runtime,
        // which can then send a response the guest finished while it works
        // on without calling the host.
        store.epoch_deadline_callback(|ctx| {
            Ok(if ctx.data().should_stop() { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        let guest = self.runtime.block_on(async {
            match &self.pre {
                GuestPre::Function(pre) => pre.instantiate_async(&mut store).await.map(Guest::Function),
                GuestPre::Proxy(pre) => pre.instantiate_async(&mut store).await.map(Guest::Proxy),
            }
        });
        let guest = guest.map_err(|e| {
            let limit = crate::config::describe_size(self.spec.memory_per_worker);
            anyhow!("failed to instantiate: {}", explain_instantiate_error(&format!("{e:#}"), &limit))
        })?;
        let instantiate_us = micros(started.elapsed());
        let init_started = Instant::now();
        let deadline = init_started + Duration::from_millis(self.spec.init_timeout_ms);
        store.data_mut().deadline = Some(deadline);
        // `wasi:http/proxy` has no init export.
        let init = match &guest {
            Guest::Function(bindings) => {
                self.runtime.block_on(bounded(bindings.call_init(&mut store), deadline, &self.cancel))
            }
            Guest::Proxy(..) => Ok(Ok(())),
        };
        store.data_mut().deadline = None;
        let (stdout, stderr) = (store.data().stdout.take(), store.data().stderr.take());
        match init {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(anyhow!("init returned an error: {message}{}", stderr_note(&stderr))),
            Err(trap) => match classify_trap(&mut store, trap, &stderr) {
                Outcome::Timeout => bail!(
                    "init did not finish within [runtime] timeout = {} (init gets the same time as a task); raise \
                     timeout if init needs longer",
                    crate::config::format_duration(Duration::from_millis(self.spec.init_timeout_ms))
                ),
                outcome => bail!("init did not finish: {}", describe(&outcome)),
            },
        }
        let init_us = micros(init_started.elapsed());
        // The node logs the start when this frame arrives.
        let gpu_bytes = store.data().gpu.used_bytes();
        self.replies.send(&FromReplica::WorkerStarted {
            worker: self.index,
            instantiate_us,
            init_us,
            stdout,
            stderr,
            gpu_bytes,
        });
        self.live = Some(Live { store, guest });
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
            let mut done = match cancels.begin(seq, &self.cancel) {
                Ok(()) => {
                    let done = self.run_one(task);
                    cancels.end(seq);
                    done
                }
                Err(Early::Cancelled) => TaskDone::empty(seq, self.index, Outcome::Cancelled),
                // The node took it back (and heard so): on to the next.
                Err(Early::Recalled) => continue,
            };
            let exit = if matches!(done.outcome, Outcome::DeviceLost(_)) {
                Some("GPU device lost".to_owned())
            } else if self.gpu_stuck {
                Some(format!(
                    "GPU work of a stopped task (its timeout, a cancel, or its caller gone) was still running \
                     {GPU_SETTLE:?} after it ended (a kernel or a large op that does not finish soon?); the \
                     replica exits to free the GPU"
                ))
            } else {
                None
            };
            done.exits = exit.clone();
            done.restarts = exit.is_none() && self.live.is_none();
            self.replies.send(&FromReplica::Done(done));
            if let Some(reason) = exit {
                tracing::error!(app = %self.spec.app, replica = %self.spec.replica, "{reason}; exiting");
                // `_exit`, not `exit`: the CUDA libraries' exit handlers may
                // wait for the very GPU work that never ends.
                // SAFETY: ends the process at once; nothing after it runs.
                unsafe { libc::_exit(3) };
            }
            // The cancel that stopped the last run is not for the next
            // instance: left set, the epoch callback would stop its start
            // (`wasm trap: interrupt`) whenever a tick came during it.
            self.cancel.reset();
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
        let _running = crate::engine::guest_running();
        let started = Instant::now();
        let mut done = TaskDone::empty(task.seq, self.index, Outcome::Cancelled);
        if self.live.is_none()
            && let Err(e) = self.instantiate()
        {
            done.outcome = Outcome::Trap(format!("{e:#}"));
            return done;
        }
        let live = self.live.as_mut().expect("instantiated above");
        // A growth refused in an earlier task that the guest survived (it
        // caught the failure) says nothing about how this one ends.
        live.store.data_mut().limiter.take_refused();
        let timeout = Duration::from_millis(task.timeout_ms);
        let deadline = started + timeout;
        live.store.data_mut().deadline = Some(deadline);
        let Live { store, guest } = live;
        let call = async {
            match guest {
                Guest::Function(bindings) => {
                    let ctx = TaskContext {
                        task_id: task.task_id,
                        attempt: task.attempt,
                        app: self.spec.app.clone(),
                        replica: self.spec.replica.clone(),
                        worker: self.index,
                        deadline_ms: unix_ms(SystemTime::now() + timeout),
                    };
                    let result = bindings.call_handle(&mut *store, &ctx, &task.input).await?;
                    Ok(match result {
                        Ok(output) => Outcome::Complete(output),
                        Err(GuestError::BadInput(message)) => Outcome::BadInput(message),
                        Err(GuestError::Failed(message)) => Outcome::Failed(message),
                    })
                }
                Guest::Proxy(proxy) => {
                    let (seq, flows, replies) = (task.seq, &self.flows, &self.replies);
                    let stream = Stream { seq, deadline, flows, replies, stream: task.stream };
                    serve_http(&mut *store, proxy, &task.input, stream).await
                }
            }
        };
        // `Err` is a trap (or a stop); the instance is then discarded.
        let result = self.runtime.block_on(bounded(call, deadline, &self.cancel));
        store.data_mut().deadline = None;
        done.stdout = store.data().stdout.take();
        done.stderr = store.data().stderr.take();
        done.run_us = micros(started.elapsed());
        done.gpu_bytes = store.data().gpu.used_bytes();
        let keep = result.is_ok();
        done.outcome = result.unwrap_or_else(|trap| classify_trap(store, trap, &done.stderr));
        if store.data().gpu.is_lost() {
            // A sticky device error: this context is dead for every worker.
            // The task is retried elsewhere and the replica replaced.
            done.outcome = Outcome::DeviceLost(format!(
                "the GPU failed while running the task (device lost): {}; the replica is replaced",
                describe(&done.outcome)
            ));
        }
        // A task that stopped (trap, timeout, cancel) or ran to its deadline
        // (a GPU wait cut short by it) may leave GPU work running. Only
        // destroying the context stops a kernel that never ends, and it
        // would hold the device for every later task.
        let overran = Instant::now() >= deadline;
        if !keep {
            // Its instance goes: what it queued and has not started need not run.
            store.data_mut().gpu.abandon();
        }
        if (!keep || overran) && !store.data_mut().gpu.settles(GPU_SETTLE) {
            self.gpu_stuck = true;
        }
        if !keep || self.spec.fresh_instance_per_task {
            self.live = None;
        }
        done
    }
}

/// Where a `wasi:http` run's bodies flow.
struct Stream<'a> {
    seq: u64,
    deadline: Instant,
    flows: &'a Arc<Flows>,
    replies: &'a Replies,
    /// See [`RunTask::stream`]; `false`: the response goes whole.
    stream: bool,
}

/// Runs one request through a `wasi:http/proxy` guest. The request body
/// streams in and the response streams out while the guest runs (the
/// response by a task on this worker's runtime), so neither is held whole.
/// Returns the outcome, or the trap.
async fn serve_http(
    store: &mut Store<WorkerState>,
    proxy: &Proxy,
    input: &[u8],
    stream: Stream<'_>,
) -> Result<Outcome, wasmtime::Error> {
    let request = match HttpRequest::decode(input) {
        Ok(request) => request,
        // Only the node makes these: a task submitted to the app's
        // `function` version just before a deploy made it a wasi:http app.
        Err(e) => {
            return Ok(Outcome::BadInput(format!(
                "{e:#}: the task was not an HTTP request (submitted before a deploy made the app a wasi:http app?)"
            )));
        }
    };
    let Stream { seq, deadline, flows, replies, stream } = stream;
    let mut flow = flows.open(seq, request.streamed);
    let request = match to_hyper(request, flow.request.take(), seq, replies, deadline) {
        Ok(request) => request,
        Err(e) => return Ok(Outcome::BadInput(format!("{e:#}"))),
    };
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let handles = (|| {
        let mut http = store.data_mut().http();
        let request = http.new_incoming_request(Scheme::Http, request)?;
        let out = http.new_response_outparam(sender)?;
        Ok::<_, wasmtime::Error>((request, out))
    })();
    let (request, out) = handles?;
    let (early_replies, early_credits) = (replies.clone(), flow.credits.clone());
    let (replies, credits) = (replies.clone(), flow.credits.clone());
    let collector = std::panic::AssertUnwindSafe(async move {
        let response = receiver
            .await
            .map_err(|_| "the guest returned without setting a response".to_owned())?
            .map_err(|code| format!("the guest answered with an error: {code:?}"))?;
        stream_response(response, seq, replies, credits, deadline, stream).await
    });
    // A panic reading the response fails the run, not the worker's thread.
    let collector = collector
        .catch_unwind()
        .map(|caught| caught.unwrap_or_else(|_| Err("failed to read the guest's response (it panicked)".to_owned())));
    let handled = proxy.wasi_http_incoming_handler().call_handle(&mut *store, request, out);
    // The response is collected (and streamed) while the guest runs, in this
    // same future rather than a task of its own: a hello then ends in one
    // poll, without the runtime parking in between. A trap ends both.
    tokio::pin!(collector, handled);
    let collected = tokio::select! {
        biased;
        handled_first = &mut handled => {
            if let Err(trap) = handled_first {
                // A response finished before the trap still goes out whole.
                if stream && let Some(Ok(Some(response))) = collector.as_mut().now_or_never() {
                    let _ = send_early(response, seq, &early_replies, &early_credits, deadline).await;
                }
                return Err(trap);
            }
            collector.await
        }
        collected = &mut collector => {
            // Whole while the guest still runs (work after its response):
            // the client gets it now, not when the guest returns.
            let collected = match collected {
                Ok(Some(response)) if stream => {
                    send_early(response, seq, &early_replies, &early_credits, deadline).await.map(|()| None)
                }
                other => other,
            };
            handled.await?;
            collected
        }
    };
    let outcome = match collected {
        Ok(Some(response)) => Outcome::Complete(response.encode()),
        // Streamed: the node has the response already.
        Ok(None) => Outcome::Complete(Vec::new()),
        Err(message) => Outcome::Failed(message),
    };
    drop(flow);
    Ok(outcome)
}

/// wasmtime's words for a component too big for its pool, with what the
/// user can change: its declared memory (`limit`: `[runtime] memory` per
/// worker) or its table.
fn explain_instantiate_error(message: &str, limit: &str) -> String {
    if message.contains("memory has a minimum byte size") && message.contains("exceeds the limit") {
        format!(
            "the component's memory starts larger than the {limit} each worker may have ([runtime] memory split \
             across workers): raise memory, or lower workers ({message})"
        )
    } else if message.contains("minimum element size") && message.contains("exceeds the limit") {
        format!("the component's function table starts larger than an instance may have here ({message})")
    } else {
        message.to_owned()
    }
}

/// Runs a guest call until it returns, its deadline passes or it is
/// cancelled. The epoch callback stops a guest running wasm code; this stops
/// one blocked in a host call (a sleep, a poll, a body read), by dropping the
/// call. Either way the call ends in [`Trap::Interrupt`] and the instance is
/// discarded.
async fn bounded<T>(
    call: impl Future<Output = wasmtime::Result<T>>,
    deadline: Instant,
    cancel: &CancelFlag,
) -> wasmtime::Result<T> {
    tokio::select! {
        biased;
        result = call => result,
        () = tokio::time::sleep_until(deadline.into()) => Err(Trap::Interrupt.into()),
        () = cancel.wait() => Err(Trap::Interrupt.into()),
    }
}

/// The request as hyper takes it; `parts`: the rest of a streamed body.
fn to_hyper(
    request: HttpRequest,
    parts: Option<tokio::sync::mpsc::UnboundedReceiver<Result<Vec<u8>, String>>>,
    seq: u64,
    replies: &Replies,
    deadline: Instant,
) -> Result<http::Request<BoxedBody>> {
    let host = request
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .unwrap_or("localhost")
        .to_owned();
    let mut builder = http::Request::builder()
        .method(request.method.as_str())
        .uri(format!("http://{host}{}", request.path_with_query));
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let body = match parts {
        Some(parts) => RequestBody::new(request.body, parts, seq, replies.clone(), deadline).boxed_unsync(),
        None => http_body_util::Full::new(bytes::Bytes::from(request.body))
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed_unsync(),
    };
    builder.body(body).context("the request is not valid HTTP")
}

type BoxedBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, wasmtime_wasi_http::Error>;

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
            crate::config::describe_size(state.limiter.limit()),
            crate::config::describe_size(desired),
            trap_message(&error),
            stderr_note(stderr)
        ));
    }
    Outcome::Trap(format!("guest trapped: {}{}", trap_message(&error), stderr_note(stderr)))
}

/// A trap's name, or a failed host call's reason (ahead of the wasm
/// backtrace wasmtime wraps it in, which would bury it).
fn trap_message(error: &wasmtime::Error) -> String {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            // A stack in linear memory (Rust, C) runs off its end so.
            Trap::MemoryOutOfBounds => {
                format!("{trap} (when the guest recursed deeply or has large locals: its stack overflowed)")
            }
            _ => trap.to_string(),
        };
    }
    match error.downcast_ref::<wasmtime::WasmBacktrace>() {
        Some(backtrace) => {
            let reason: Vec<String> = error.chain().skip(1).map(ToString::to_string).collect();
            format!("{}; {backtrace}", reason.join(": "))
        }
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
        Outcome::BadInput(m)
        | Outcome::Failed(m)
        | Outcome::Trap(m)
        | Outcome::OutOfMemory(m)
        | Outcome::DeviceLost(m) => m.clone(),
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
        self.cancel.is_set()
    }
}

#[cfg(test)]
mod tests {
    use super::explain_instantiate_error;

    #[test]
    fn a_component_too_big_for_its_pool_says_what_to_change() {
        let wasmtime = "module memory does not fit in pooling allocator requirements: memory index 0 is \
                        unsupported: memory has a minimum byte size of 3932160000 which exceeds the limit of \
                        0x4000000 bytes";
        let said = explain_instantiate_error(wasmtime, "64Mi");
        assert!(said.starts_with("the component's memory starts larger than the 64Mi each worker may have"), "{said}");
        assert!(said.ends_with("0x4000000 bytes)"), "wasmtime's words stay: {said}");
        assert_eq!(explain_instantiate_error("something else", "64Mi"), "something else");
    }
}
