//! The Redis queue (`beamlet serve --redis URL`): the task lifecycle kept in
//! one Redis server that several nodes share. Any node takes a call or a
//! task; a replica of the app on any node runs it; the node whose caller
//! waits hears of its end on the `beamlet:events` channel. Each node keeps a
//! heartbeat there: when one stops beating, another retries the tasks it was
//! running, cancels the calls it took, and delivers its pending callbacks.

mod apps;
mod events;
mod resp;
mod scripts;

use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use tokio::sync::oneshot;

pub(crate) use self::apps::{Elsewhere, Published};
pub(crate) use self::events::{AppsChanged, Event, spawn as spawn_cluster};
use self::resp::{Client, RedisError, RedisUrl, Reply};
use self::scripts as lua;
use super::{
    CallbackState, Cancelled, Counts, Ended, ErrorCode, Finish, Lease, NewTask, Queue, QueueError, Queued, TaskError,
    TaskRecord, TaskStatus, millis,
};

/// How long a node counts as alive after its last heartbeat.
const NODE_TTL: Duration = Duration::from_secs(10);

pub(crate) struct RedisQueue {
    client: Client,
    /// This node's id: stable across restarts (kept in the data dir), so a
    /// restarted node finds the tasks it was running.
    node: String,
    /// Set once the node has left ([`RedisQueue::leave`]): no more heartbeats.
    left: std::sync::atomic::AtomicBool,
    /// What this node tells the others about itself (JSON), with each beat.
    info: std::sync::Mutex<Vec<u8>>,
    /// When a failure was last logged, and how many since were not.
    last_failure_log: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
    /// Ends of runs Redis did not take (it was down), to save once it is back.
    unsaved: std::sync::Mutex<Vec<Unsaved>>,
    /// A call failed since the last heartbeat that went through.
    failing: std::sync::atomic::AtomicBool,
    /// Each app's counts as Redis last gave them: what `/metrics` and the
    /// app listings show while it does not answer, rather than wait 10 s
    /// per app for it.
    last_counts: std::sync::Mutex<std::collections::HashMap<String, Counts>>,
    /// The tasks this node leased and has not ended or released yet.
    held: std::sync::Mutex<std::collections::HashMap<String, Held>>,
    /// Tasks Redis says run on this node that it does not hold, with when
    /// each was first seen so (see [`RedisQueue::release_orphans`]).
    orphans: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// A change to a task that failed to reach Redis, kept to be made again
/// (`Abandon`: a task whose enqueue failed, which Redis may have taken all
/// the same).
enum Unsaved {
    Finish { id: String, finish: Finish, at: u64, held: Option<Held> },
    Release { id: String },
    Abandon { id: String },
}

/// A run this node holds: enough to answer its caller should Redis lose
/// the task before the run's end is recorded.
#[derive(Debug, Clone)]
struct Held {
    app: String,
    attempt: u32,
    leased_at: u64,
}

/// What a change saved late did.
pub(crate) enum Saved {
    Finished(Ended),
    Released(TaskRecord),
}

/// Ended tasks and undelivered callbacks a node took over from a dead one.
#[derive(Debug, Default)]
pub(crate) struct Reaped {
    /// Tasks whose retries were spent: they ended here.
    pub ended: Vec<TaskRecord>,
    /// Ended tasks whose callbacks this node now delivers, with outputs.
    pub callbacks: Vec<(TaskRecord, Option<Bytes>)>,
    /// Tasks queued again.
    pub retried: u64,
}

impl RedisQueue {
    /// Connects as node `node`, and takes back what this node was running
    /// when it last stopped (retried, as the embedded queue does on start).
    pub(crate) fn open(url: &str, node: String, now: u64) -> Result<Self> {
        let url = RedisUrl::parse(url).map_err(anyhow::Error::msg)?;
        let client = Client::connect(url.clone())
            .map_err(|e| anyhow::anyhow!("{e}; is a Redis server listening there (--redis)?"))?;
        let info = client
            .call(&[b"INFO", b"server"])
            .map_err(|e| anyhow::anyhow!("{}: {e}; is it a Redis server (--redis)?", url.addr))?
            .into_string()
            .unwrap_or_default();
        let version = info.lines().find_map(|line| line.strip_prefix("redis_version:")).unwrap_or("0");
        let major: u32 = version.split('.').next().and_then(|major| major.parse().ok()).unwrap_or(0);
        anyhow::ensure!(major >= 5, "Redis at {} is version {version}; beamlet needs 5 or later", url.addr);
        let queue = Self {
            client,
            node,
            left: Default::default(),
            info: Default::default(),
            last_failure_log: Default::default(),
            unsaved: Default::default(),
            failing: Default::default(),
            last_counts: Default::default(),
            held: Default::default(),
            orphans: Default::default(),
        };
        queue.check_id_free()?;
        let reaped = queue.reap(&queue.node, now, true).context("failed to recover this node's tasks from Redis")?;
        if let Some(reaped) = reaped.filter(|r| r.retried + r.ended.len() as u64 > 0) {
            tracing::info!(
                retried = reaped.retried,
                failed = reaped.ended.len(),
                "took back the tasks this node was running when it stopped"
            );
        }
        queue.heartbeat()?;
        Ok(queue)
    }

    /// Refuses to start as a node id another live node beats under (a copy
    /// of its data dir): taking back "its" tasks would run them twice. A
    /// heartbeat left by this node's own last process (it died moments
    /// ago) runs out; a live one is renewed within a beat or two.
    fn check_id_free(&self) -> Result<()> {
        let key = self.alive_key();
        let ttl = || -> Result<i64> { Ok(self.client.call(&[b"PTTL", key.as_bytes()])?.as_int().unwrap_or(-2)) };
        let mut last = ttl()?;
        if last < 0 {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + 3 * Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = ttl()?;
            if now < 0 {
                return Ok(());
            }
            anyhow::ensure!(
                now <= last,
                "node id {} is in use by another live node (was this data dir copied from it?); delete the file \
                 `node-id` in this node's --data-dir to give it an id of its own",
                self.node
            );
            last = now;
        }
        Ok(())
    }

    /// Says what is wrong with a `--redis` URL before anything starts.
    pub(crate) fn check_url(url: &str) -> Result<()> {
        RedisUrl::parse(url).map(drop).map_err(|e| anyhow::anyhow!("--redis: {e}"))
    }

    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// The start of node id `node`, as replica ids and messages name nodes.
    pub(crate) fn node_tag(node: &str) -> String {
        node.chars().take(8).collect()
    }

    pub(crate) fn url(&self) -> &RedisUrl {
        self.client.url()
    }

    /// The key this node's heartbeat keeps alive (the scripts read it as
    /// `node:{id}`).
    fn alive_key(&self) -> String {
        format!("beamlet:node:{}", self.node)
    }

    /// Marks this node alive for [`NODE_TTL`].
    pub(crate) fn heartbeat(&self) -> Result<(), RedisError> {
        if self.has_left() {
            return Ok(());
        }
        let ttl = millis(NODE_TTL).to_string();
        let key = self.alive_key();
        let beat = || {
            self.client.call(&[b"SET", key.as_bytes(), b"1", b"PX", ttl.as_bytes()])?;
            self.client.call(&[b"SADD", b"beamlet:nodes", self.node.as_bytes()])?;
            let info = self.info.lock().unwrap().clone();
            if !info.is_empty() {
                self.client.call(&[b"HSET", b"beamlet:node-info", self.node.as_bytes(), &info])?;
            }
            Ok(())
        };
        let result = beat();
        // An idle node learns here that Redis stopped answering.
        self.failing.store(result.is_err(), std::sync::atomic::Ordering::SeqCst);
        result
    }

    /// Sets what this node tells the others about itself (what it can run),
    /// and says it now.
    pub(crate) fn advertise(&self, info: Vec<u8>) -> Result<(), RedisError> {
        *self.info.lock().unwrap() = info;
        self.heartbeat()
    }

    /// A clean exit: the other nodes take over what is left at once, not
    /// after the heartbeat runs out.
    pub(crate) fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::SeqCst);
        let key = self.alive_key();
        self.logged("leave the cluster", self.client.call(&[b"DEL", key.as_bytes()]));
    }

    /// Whether [`RedisQueue::leave`] was called: the node is stopping.
    pub(crate) fn has_left(&self) -> bool {
        self.left.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes over the work of every node whose heartbeat stopped.
    pub(crate) fn reap_dead(&self, now: u64) -> Result<Reaped, RedisError> {
        let mut reaped = Reaped::default();
        for node in self.client.call(&[b"SMEMBERS", b"beamlet:nodes"])?.into_array() {
            let Some(node) = node.into_string().filter(|node| *node != self.node) else { continue };
            let Some(one) = self.reap(&node, now, false)? else { continue };
            tracing::warn!(
                node = %node, retried = one.retried, failed = one.ended.len(), callbacks = one.callbacks.len(),
                "a node left or stopped beating: its running tasks are queued again (`failed`: those out of \
                 retries), the calls it took are cancelled, its pending callbacks are delivered from here"
            );
            reaped.ended.extend(one.ended);
            reaped.callbacks.extend(one.callbacks);
        }
        Ok(reaped)
    }

    /// `None` when the node is alive (and `force` is off).
    fn reap(&self, node: &str, now: u64, force: bool) -> Result<Option<Reaped>, RedisError> {
        let now = now.to_string();
        let reply =
            self.client.eval(&lua::REAP, &[node.as_bytes(), now.as_bytes(), self.node.as_bytes(), flag(force)])?;
        if reply == Reply::Nil {
            return Ok(None);
        }
        let mut parts = reply.into_array().into_iter();
        let ended = parts.next().map(Reply::into_array).unwrap_or_default();
        let adopted = parts.next().map(Reply::into_array).unwrap_or_default();
        let retried = parts.next().and_then(|n| n.as_int()).unwrap_or(0) as u64;
        let callbacks = adopted
            .into_iter()
            .filter_map(Reply::into_string)
            .filter_map(|id| Some((self.get(&id)?, self.output(&id))))
            .collect();
        Ok(Some(Reaped { ended: ended.into_iter().filter_map(record).collect(), callbacks, retried }))
    }

    /// The end of a run as the finish script records it: `None` when the
    /// task is not running (ended or cancelled meanwhile).
    fn try_finish(
        &self,
        id: &str,
        finish: &Finish,
        now: u64,
        held: Option<&Held>,
    ) -> Result<Option<Ended>, RedisError> {
        Ok(self.try_finish_and_lease(id, finish, now, held, None)?.0)
    }

    /// Records how a run ended and, with `next` (the app), leases the app's
    /// next task for the worker it freed in the same script.
    fn try_finish_and_lease<'a>(
        &self,
        id: &str,
        finish: &'a Finish,
        ended_at: u64,
        held: Option<&Held>,
        next: Option<&str>,
    ) -> Result<(Option<Ended>, Option<Lease>), RedisError> {
        let now = ended_at.to_string();
        let task = id;
        let (id, me) = (id.as_bytes(), self.node.as_bytes());
        let error = |e: &'a TaskError| vec![e.code.as_str().as_bytes(), e.message.as_bytes()];
        let (kind, detail): (&[u8], Vec<&[u8]>) = match finish {
            Finish::Complete(output) => (b"complete", vec![output]),
            Finish::Cancelled => (b"cancelled", Vec::new()),
            Finish::Rejected(e) => (b"rejected", error(e)),
            Finish::Retryable(e) => (b"retryable", error(e)),
        };
        let (ended, lease) = match next {
            None => {
                let mut args = vec![id, kind, now.as_bytes(), me];
                args.extend(detail);
                (self.client.eval(&lua::FINISH, &args)?, None)
            }
            Some(app) => {
                let mut args = vec![app.as_bytes(), now.as_bytes(), me, id, kind];
                args.extend(detail);
                let mut both = self.client.eval(&lua::FINISH_LEASE, &args)?.into_array().into_iter();
                let ended = both.next().unwrap_or(Reply::Nil);
                let next = both.next().filter(|reply| *reply != Reply::Nil).and_then(|reply| lease(app, reply));
                (ended, self.hold(next, ended_at))
            }
        };
        let mut parts = ended.into_array().into_iter();
        let first = parts.next();
        if first.as_ref().is_some_and(|first| *first == Reply::Data(b"stale".to_vec())) {
            let mut said = parts.filter_map(Reply::into_string);
            let (status, node) = (said.next().unwrap_or_default(), said.next().unwrap_or_default());
            let now_on = if node.is_empty() { String::new() } else { format!(" on node {node}") };
            tracing::warn!(
                "task {}: this run's end does not count: the task is {status}{now_on} since this node was \
                 taken for dead (it did not beat its heartbeat in Redis for {NODE_TTL:?})",
                task,
            );
            return Ok((None, lease));
        }
        if first.as_ref().is_some_and(|first| *first == Reply::Data(b"gone".to_vec())) {
            return Ok((held.map(|held| gone(task, finish, ended_at, held)), lease));
        }
        let Some(record) = first.and_then(record) else { return Ok((None, lease)) };
        let output = parts.next().and_then(Reply::into_bytes).map(Bytes::from);
        Ok((Some(Ended { output: output.filter(|_| record.status == TaskStatus::Complete), record }), lease))
    }

    /// Records the ends of runs (and releases) that Redis did not take while
    /// it was down, oldest first; returns what they did. Stops at the first
    /// failure, keeping the rest for the next beat.
    pub(crate) fn save_unsaved(&self) -> Vec<Saved> {
        let pending = std::mem::take(&mut *self.unsaved.lock().unwrap());
        let mut saved = Vec::new();
        let mut pending = pending.into_iter();
        for unsaved in pending.by_ref() {
            let result = match &unsaved {
                Unsaved::Finish { id, finish, at, held } => {
                    self.try_finish(id, finish, *at, held.as_ref()).map(|e| e.map(Saved::Finished))
                }
                Unsaved::Release { id } => self.try_release(id).map(|released| released.map(Saved::Released)),
                Unsaved::Abandon { id } => {
                    let held = flag(self.held.lock().unwrap().contains_key(id));
                    self.client.eval(&lua::ABANDON, &[id.as_bytes(), self.node.as_bytes(), held]).map(|status| {
                        match status.into_string().as_deref() {
                            None => {}
                            Some("PENDING" | "RETRY") => tracing::warn!(
                                "task {id}: Redis queued it after this node had refused it (STORE_FAILED); dropped \
                                 before it ran"
                            ),
                            Some("RUNNING") => tracing::warn!(
                                "task {id}: Redis queued it after this node had refused it (STORE_FAILED), and it \
                                 was leased since; dropped, and stopped where it runs"
                            ),
                            Some(status) => tracing::warn!(
                                "task {id}: Redis queued it after this node had refused it (STORE_FAILED), and it \
                                 ended {status} already"
                            ),
                        }
                        None
                    })
                }
            };
            match result {
                Ok(done) => saved.extend(done),
                Err(_) => {
                    let mut left = self.unsaved.lock().unwrap();
                    let newer = std::mem::take(&mut *left);
                    left.push(unsaved);
                    left.extend(pending);
                    left.extend(newer);
                    break;
                }
            }
        }
        saved
    }

    /// How many run ends and releases wait for Redis (see [`RedisQueue::save_unsaved`]).
    pub(crate) fn unsaved(&self) -> usize {
        self.unsaved.lock().unwrap().len()
    }

    /// Logs a failed call, at most once a second (an outage fails every
    /// call: thousands a second under load), with how many went unsaid.
    fn log_failure(&self, what: &str, error: &RedisError) {
        self.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut last = self.last_failure_log.lock().unwrap();
        let (said, unsaid) = &mut *last;
        if said.is_some_and(|said| said.elapsed() < Duration::from_secs(1)) {
            *unsaid += 1;
            return;
        }
        let more = std::mem::take(unsaid);
        *said = Some(std::time::Instant::now());
        drop(last);
        if more > 0 {
            tracing::error!(
                "failed to {what} in Redis: {error} ({more} more failed calls since the last such message)"
            );
        } else {
            tracing::error!("failed to {what} in Redis: {error}");
        }
    }

    /// Logs a failed call; the interface's answer is then "nothing".
    fn logged<T>(&self, what: &str, result: Result<T, RedisError>) -> Option<T> {
        result.inspect_err(|e| self.log_failure(what, e)).ok()
    }

    fn eval(&self, what: &str, script: &resp::Script, args: &[&[u8]]) -> Option<Reply> {
        self.logged(what, self.client.eval(script, args)).filter(|reply| *reply != Reply::Nil)
    }

    /// Leases the app's next task; `ahead`: for a replica whose workers are
    /// all busy (see [`Queue::lease_ahead`]).
    fn take(&self, app: &str, now: u64, ahead: bool) -> Option<Lease> {
        let at = now.to_string();
        let args = [app.as_bytes(), at.as_bytes(), self.node.as_bytes(), flag(ahead)];
        self.hold(lease(app, self.eval("lease a task", &lua::LEASE, &args)?), now)
    }

    /// Puts task `id`, leased to this node, back in its queue with no
    /// attempt spent: its record then, or `None` when it does not run here.
    fn try_release(&self, id: &str) -> Result<Option<TaskRecord>, RedisError> {
        Ok(record(self.client.eval(&lua::RELEASE, &[id.as_bytes(), self.node.as_bytes()])?))
    }

    /// Notes a lease this node got as one it holds (see `release_orphans`).
    fn hold(&self, lease: Option<Lease>, now: u64) -> Option<Lease> {
        if let Some(lease) = &lease {
            let held = Held { app: lease.app.clone(), attempt: lease.attempt, leased_at: now };
            self.held.lock().unwrap().insert(lease.id.clone(), held);
        }
        lease
    }

    /// Releases the tasks Redis says run on this node but the node does not
    /// hold, once seen so for `after`: leases Redis made after the node gave
    /// up waiting for its answer (it was slow or frozen), which never reached
    /// a replica and would otherwise stay RUNNING while the node lives. Not
    /// while ends of runs wait to be saved (those still run here in Redis).
    pub(crate) fn release_orphans(&self, after: Duration) -> Result<Vec<TaskRecord>, RedisError> {
        if self.unsaved() > 0 {
            return Ok(Vec::new());
        }
        let key = format!("beamlet:running:{}", self.node);
        let running = self.client.call(&[b"SMEMBERS", key.as_bytes()])?.into_array();
        let now = std::time::Instant::now();
        let due: Vec<String> = {
            let held = self.held.lock().unwrap();
            let mut orphans = self.orphans.lock().unwrap();
            let unheld: Vec<String> =
                running.into_iter().filter_map(Reply::into_string).filter(|id| !held.contains_key(id)).collect();
            orphans.retain(|id, _| unheld.contains(id));
            let due: Vec<String> = unheld
                .into_iter()
                .filter(|id| now.duration_since(*orphans.entry(id.clone()).or_insert(now)) >= after)
                .collect();
            for id in &due {
                orphans.remove(id);
            }
            due
        };
        let mut released = Vec::new();
        for id in due {
            if let Some(record) = self.try_release(&id)? {
                tracing::warn!(
                    "task {id}: Redis leased it to this node after the node gave up waiting for the answer; it never \
                     reached a replica and is queued again"
                );
                released.push(record);
            }
        }
        Ok(released)
    }
}

/// A task record from the fields `scripts::FIELDS` lists, in order.
fn record(reply: Reply) -> Option<TaskRecord> {
    let mut fields = reply.into_array().into_iter();
    let mut next = || fields.next().unwrap_or(Reply::Nil);
    let id = next().into_string()?;
    let app = next().into_string()?;
    let status = TaskStatus::parse(&next().into_string()?)?;
    let number = |reply: Reply| reply.as_int().and_then(|n| u64::try_from(n).ok());
    let attempts = number(next()).unwrap_or(0) as u32;
    let created_at = number(next()).unwrap_or(0);
    let started_at = number(next());
    let ended_at = number(next());
    let code = next().into_string().and_then(|code| ErrorCode::parse(&code));
    let message = next().into_string();
    let error = code.map(|code| TaskError { code, message: message.unwrap_or_default() });
    let callback_url = next().into_string();
    let durable = next().into_string().as_deref() != Some("0");
    let _origin = next();
    let callback = next().into_string().as_deref().and_then(CallbackState::parse);
    Some(TaskRecord {
        id,
        app,
        status,
        attempts,
        created_at,
        started_at,
        ended_at,
        error,
        callback_url,
        callback,
        durable,
    })
}

fn flag(on: bool) -> &'static [u8] {
    if on { b"1" } else { b"0" }
}

impl Queue for RedisQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> Result<TaskRecord, QueueError> {
        let expires_at = now.saturating_add(millis(task.ttl));
        let numbers = [
            now.to_string(),
            expires_at.to_string(),
            task.max_queued.to_string(),
            task.retries.to_string(),
            millis(task.timeout).to_string(),
            millis(task.result_ttl).to_string(),
            task.max_result_size.to_string(),
        ];
        let [created, expires, max_queued, retries, timeout, result_ttl, max_result_size] =
            numbers.each_ref().map(|n| n.as_bytes());
        let (id, app, node) = (task.id.as_bytes(), task.app.as_bytes(), self.node.as_bytes());
        let mut args: Vec<&[u8]> = vec![app, id, max_queued, created, expires, node, flag(task.durable)];
        args.extend_from_slice(&[
            b"id",
            id,
            b"app",
            app,
            b"status",
            b"PENDING",
            b"attempts",
            b"0",
            b"retries",
            retries,
            b"timeout_ms",
            timeout,
            b"result_ttl_ms",
            result_ttl,
            b"max_result_size",
            max_result_size,
            b"created_at",
            created,
            b"expires_at",
            expires,
            b"input",
            &task.input,
            b"durable",
            flag(task.durable),
            b"origin",
            node,
        ]);
        if let Some(url) = &task.callback_url {
            args.extend_from_slice(&[b"callback_url", url.as_bytes()]);
        }
        let added = self.client.eval(&lua::ENQUEUE, &args).map_err(|e| {
            self.log_failure("queue a task", &e);
            // Redis may have got it and answer late: the caller is told it
            // was refused, so it must not run.
            self.unsaved.lock().unwrap().push(Unsaved::Abandon { id: task.id.clone() });
            QueueError::Backend(e.to_string())
        })?;
        if added.as_int() == Some(0) {
            return Err(QueueError::Full { app: task.app, limit: task.max_queued });
        }
        Ok(task.pending_record(now))
    }

    fn lease(&self, app: &str, now: u64) -> Option<Lease> {
        self.take(app, now, false)
    }

    fn lease_ahead(&self, app: &str, now: u64) -> Option<Lease> {
        self.take(app, now, true)
    }

    fn started(&self, id: &str, now: u64) {
        let now = now.to_string();
        self.eval("mark a task started", &lua::STARTED, &[id.as_bytes(), now.as_bytes(), self.node.as_bytes()]);
    }

    fn release(&self, id: &str) -> Option<TaskRecord> {
        self.held.lock().unwrap().remove(id);
        match self.try_release(id) {
            Ok(released) => released,
            Err(e) => {
                self.log_failure("release a task", &e);
                self.unsaved.lock().unwrap().push(Unsaved::Release { id: id.to_owned() });
                None
            }
        }
    }

    fn pending_callbacks(&self) -> Vec<(TaskRecord, Option<Bytes>)> {
        let Some(reply) = self.eval("list pending callbacks", &lua::PENDING_CALLBACKS, &[self.node.as_bytes()]) else {
            return Vec::new();
        };
        let mut pending: Vec<_> = reply
            .into_array()
            .into_iter()
            .filter_map(|pair| {
                let mut pair = pair.into_array().into_iter();
                let record = record(pair.next()?)?;
                Some((record, pair.next().and_then(Reply::into_bytes).map(Bytes::from)))
            })
            .collect();
        pending.sort_by_key(|(record, _)| record.ended_at);
        pending
    }

    fn callback_settled(&self, id: &str, delivered: bool) {
        let state = if delivered { CallbackState::Delivered } else { CallbackState::Failed };
        self.eval("settle a callback", &lua::SETTLE_CALLBACK, &[id.as_bytes(), state.as_str().as_bytes()]);
    }

    fn finish(&self, id: &str, finish: Finish, now: u64) -> Option<Ended> {
        self.finish_and_lease(id, finish, now, None).0
    }

    fn finish_and_lease(
        &self,
        id: &str,
        finish: Finish,
        now: u64,
        next: Option<&str>,
    ) -> (Option<Ended>, Option<Lease>) {
        let held = self.held.lock().unwrap().remove(id);
        match self.try_finish_and_lease(id, &finish, now, held.as_ref(), next) {
            Ok(both) => both,
            Err(e) => {
                // Kept, and saved once Redis answers again (see `save_unsaved`):
                // dropping it would leave the task running forever.
                self.log_failure("finish a task", &e);
                self.unsaved.lock().unwrap().push(Unsaved::Finish { id: id.to_owned(), finish, at: now, held });
                (None, None)
            }
        }
    }

    fn cancel(&self, id: &str, why: &str, now: u64) -> Result<Cancelled, QueueError> {
        let now = now.to_string();
        let args: [&[u8]; 4] = [id.as_bytes(), why.as_bytes(), now.as_bytes(), self.node.as_bytes()];
        let reply = self.client.eval(&lua::CANCEL, &args).map_err(|e| QueueError::Backend(e.to_string()))?;
        let mut parts = reply.into_array().into_iter();
        let kind = parts.next().and_then(Reply::into_string).unwrap_or_default();
        let detail = parts.next().unwrap_or(Reply::Nil);
        let ended = |record: Option<TaskRecord>| {
            record.ok_or_else(|| QueueError::Backend("Redis returned a task without its fields".into()))
        };
        match kind.as_str() {
            "ended" => {
                let status = detail.into_string().and_then(|s| TaskStatus::parse(&s)).unwrap_or(TaskStatus::Failed);
                Err(QueueError::AlreadyEnded { id: id.to_owned(), status })
            }
            "queued" => Ok(Cancelled::Queued(ended(record(detail))?)),
            "running" => Ok(Cancelled::Running(ended(record(detail))?)),
            _ => Err(QueueError::UnknownTask(id.to_owned())),
        }
    }

    fn get(&self, id: &str) -> Option<TaskRecord> {
        let key = format!("beamlet:t:{id}");
        let mut args: Vec<&[u8]> = vec![b"HMGET", key.as_bytes()];
        args.extend(FIELDS.iter().map(|field| field.as_bytes()));
        record(self.logged("read a task", self.client.call(&args))?)
    }

    fn output(&self, id: &str) -> Option<Bytes> {
        let key = format!("beamlet:t:{id}");
        let reply = self.logged("read a result", self.client.call(&[b"HGET", key.as_bytes(), b"output"]))?;
        reply.into_bytes().map(Bytes::from)
    }

    fn forget(&self, id: &str) {
        self.eval("forget a call", &lua::FORGET, &[id.as_bytes(), self.node.as_bytes()]);
    }

    fn counts(&self, app: &str) -> Counts {
        let last = || self.last_counts.lock().unwrap().get(app).copied().unwrap_or_default();
        // Not asked again until it answers the heartbeat (within a second).
        if !self.is_available() {
            return last();
        }
        let Some(reply) = self.eval("count tasks", &lua::COUNTS, &[app.as_bytes()]) else { return last() };
        let counts = reply.into_array();
        let count = |i: usize| counts.get(i).and_then(Reply::as_int).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        let counts = Counts { queued: count(0), running: count(1) };
        self.last_counts.lock().unwrap().insert(app.to_owned(), counts);
        counts
    }

    /// Asked of every app each second by the autoscaler.
    fn recent_counts(&self, app: &str) -> Counts {
        self.last_counts.lock().unwrap().get(app).copied().unwrap_or_default()
    }

    fn list(&self, app: &str, status: Option<TaskStatus>, before: Option<&str>, limit: usize) -> Vec<TaskRecord> {
        let status = status.map_or("", TaskStatus::as_str);
        let limit = limit.min(i64::MAX as usize).to_string();
        let args = [app.as_bytes(), status.as_bytes(), limit.as_bytes(), before.unwrap_or_default().as_bytes()];
        let reply = self.eval("list tasks", &lua::LIST, &args);
        reply.map(Reply::into_array).unwrap_or_default().into_iter().filter_map(record).collect()
    }

    fn sweep(&self, now: u64) -> Vec<TaskRecord> {
        let now = now.to_string();
        let reply = self.eval("sweep the queue", &lua::SWEEP, &[now.as_bytes(), self.node.as_bytes()]);
        reply.map(Reply::into_array).unwrap_or_default().into_iter().filter_map(record).collect()
    }

    fn is_available(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Each is a round trip to Redis.
    fn leases_are_cheap(&self) -> bool {
        false
    }

    /// Redis has each change once it answers; how durable that is, is the
    /// server's setting (`appendonly yes` keeps tasks across its restarts).
    fn sync(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(());
        rx
    }

    fn end_queued(&self, app: &str, which: Queued, status: TaskStatus, error: TaskError, now: u64) -> Vec<TaskRecord> {
        let now = now.to_string();
        let args: [&[u8]; 7] = [
            app.as_bytes(),
            match which {
                Queued::All => b"all",
                Queued::Calls => b"calls",
                Queued::CallsTakenHere => b"own",
            },
            status.as_str().as_bytes(),
            error.code.as_str().as_bytes(),
            error.message.as_bytes(),
            now.as_bytes(),
            self.node.as_bytes(),
        ];
        let reply = self.eval("end queued tasks", &lua::END_QUEUED, &args);
        reply.map(Reply::into_array).unwrap_or_default().into_iter().filter_map(record).collect()
    }
}

/// The record fields the scripts return, in `record`'s order.
const FIELDS: [&str; 13] = [
    "id",
    "app",
    "status",
    "attempts",
    "created_at",
    "started_at",
    "ended_at",
    "error_code",
    "error_message",
    "callback_url",
    "durable",
    "origin",
    "callback",
];

fn lease(app: &str, reply: Reply) -> Option<Lease> {
    let mut parts = reply.into_array().into_iter();
    let id = parts.next()?.into_string()?;
    let input = Bytes::from(parts.next()?.into_bytes().unwrap_or_default());
    let attempt = parts.next()?.as_int()? as u32;
    let timeout = Duration::from_millis(parts.next()?.as_int()?.max(0) as u64);
    let max_result_size = parts.next()?.as_int()?.max(0) as u64;
    Some(Lease { id, app: app.to_owned(), input, attempt, timeout, max_result_size })
}

/// The end of a run whose task Redis no longer has, as this node saw it.
/// Either this end was sent before and Redis took it late (the node had
/// given up waiting), which dropped the call it ended; or Redis lost the
/// task. Either way the run ended so, and its caller is told that.
fn gone(id: &str, finish: &Finish, ended_at: u64, held: &Held) -> Ended {
    let (status, error, output) = match finish {
        Finish::Complete(output) => (TaskStatus::Complete, None, Some(output.clone())),
        Finish::Cancelled => {
            let error = TaskError { code: ErrorCode::Cancelled, message: "the task was cancelled".into() };
            (TaskStatus::Cancelled, Some(error), None)
        }
        Finish::Rejected(error) => (TaskStatus::Failed, Some(error.clone()), None),
        // A run that could go again would have been queued again, not dropped.
        Finish::Retryable(error) => {
            let status = if error.code == ErrorCode::Timeout { TaskStatus::Timeout } else { TaskStatus::Failed };
            (status, Some(error.clone()), None)
        }
    };
    let created_at = uuid::Uuid::parse_str(id).ok().and_then(|id| id.get_timestamp()).map_or(held.leased_at, |at| {
        let (secs, nanos) = at.to_unix();
        secs * 1000 + u64::from(nanos / 1_000_000)
    });
    let record = TaskRecord {
        id: id.to_owned(),
        app: held.app.clone(),
        status,
        attempts: held.attempt,
        created_at,
        started_at: Some(held.leased_at),
        ended_at: Some(ended_at),
        error,
        callback_url: None,
        callback: None,
        durable: false,
    };
    Ended { record, output }
}

#[cfg(test)]
#[path = "../../../../tests/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    use super::redis_server::TestRedis;
    use super::*;
    use crate::queue::{sample_task, trapped};

    fn task(retries: u32) -> NewTask {
        sample_task(retries, 3)
    }

    fn node(redis: &TestRedis, name: &str) -> RedisQueue {
        RedisQueue::open(&redis.url, name.into(), 0).unwrap()
    }

    #[test]
    fn lifecycle_with_retries_and_a_full_queue() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let id = q.enqueue(task(1), 0).unwrap().id;
        assert_eq!(q.counts("a"), Counts { queued: 1, running: 0 });
        let lease = q.lease("a", 1).unwrap();
        assert_eq!((lease.id.as_str(), lease.attempt, lease.input.as_ref()), (id.as_str(), 1, &b"{\"x\":1}"[..]));
        assert_eq!((lease.timeout, lease.max_result_size), (Duration::from_secs(1), 1024));
        assert_eq!(q.counts("a"), Counts { queued: 0, running: 1 });
        assert_eq!(q.finish(&id, trapped(), 2).unwrap().record.status, TaskStatus::Retry);
        assert_eq!(q.lease("a", 3).unwrap().attempt, 2);
        let record = q.finish(&id, trapped(), 4).unwrap().record;
        assert_eq!((record.status, record.attempts), (TaskStatus::Failed, 2));
        assert_eq!(record.error.unwrap().code, ErrorCode::GuestTrap);
        assert_eq!(q.counts("a"), Counts::default());
        assert!(q.finish(&id, Finish::Complete(Bytes::new()), 5).is_none(), "an ended task stays ended");

        let done = q.enqueue(task(0), 10).unwrap().id;
        q.lease("a", 11).unwrap();
        q.finish(&done, Finish::Complete(Bytes::from_static(b"out")), 12).unwrap();
        assert_eq!(q.output(&done).unwrap(), Bytes::from_static(b"out"));
        for _ in 0..3 {
            q.enqueue(task(0), 13).unwrap();
        }
        assert!(matches!(q.enqueue(task(0), 13), Err(QueueError::Full { limit: 3, .. })));
        let listed = q.list("a", None, None, 10);
        assert_eq!(listed.len(), 5, "newest first, every task of the app");
        assert_eq!(listed.last().unwrap().id, id);
        assert_eq!(q.list("a", Some(TaskStatus::Complete), None, 10).len(), 1);
        assert_eq!(q.list("a", Some(TaskStatus::Pending), None, 2).len(), 2);
        // Pages: each goes on after the last task of the one before, also
        // when that task has been forgotten since.
        let ids = |records: Vec<TaskRecord>| records.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let all = ids(listed);
        let first = ids(q.list("a", None, None, 2));
        assert_eq!(first, all[..2]);
        assert_eq!(ids(q.list("a", None, Some(&first[1]), 2)), all[2..4]);
        assert_eq!(ids(q.list("a", None, Some(&all[3]), 2)), all[4..]);
        q.forget(&done);
        assert_eq!(all[3], done);
        assert_eq!(ids(q.list("a", None, Some(&done), 2)), vec![id.clone()]);
        assert_eq!(ids(q.list("a", Some(TaskStatus::Pending), Some(&all[0]), 10)), all[1..3]);
    }

    #[test]
    fn a_call_taken_by_one_node_runs_on_another_and_only_its_node_forgets_it() {
        let Some(redis) = TestRedis::start() else { return };
        let (a, b) = (node(&redis, "a"), node(&redis, "b"));
        let id = a.enqueue(NewTask { durable: false, ..task(0) }, 0).unwrap().id;
        assert_eq!(b.lease("a", 1).unwrap().id, id);
        let record = b.finish(&id, Finish::Complete(Bytes::from_static(b"hi")), 2).unwrap().record;
        assert!(!record.durable);
        b.forget(&id);
        assert_eq!(a.get(&id).unwrap().status, TaskStatus::Complete, "the node whose caller waits still sees it");
        assert_eq!(a.output(&id).unwrap(), Bytes::from_static(b"hi"));
        a.forget(&id);
        assert!(a.get(&id).is_none() && b.get(&id).is_none());

        // A call that ends on the node that took it is dropped as it ends.
        let id = a.enqueue(NewTask { durable: false, ..task(0) }, 3).unwrap().id;
        a.lease("a", 4).unwrap();
        let ended = a.finish(&id, Finish::Complete(Bytes::from_static(b"yo")), 5).unwrap();
        assert_eq!((ended.record.status, ended.output.as_deref()), (TaskStatus::Complete, Some(&b"yo"[..])));
        assert!(a.get(&id).is_none());
    }

    #[test]
    fn cancelling_queued_running_and_ended_tasks() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let queued = q.enqueue(task(0), 0).unwrap().id;
        let running = q.enqueue(task(0), 0).unwrap().id;
        q.lease_ahead("a", 1).unwrap();
        // The first in line was leased; cancel the other while queued.
        let (leased, waiting) = (queued, running);
        assert!(matches!(q.cancel(&waiting, "no", 2), Ok(Cancelled::Queued(r)) if r.status == TaskStatus::Cancelled));
        let Ok(Cancelled::Running(record)) = q.cancel(&leased, "stop", 2) else { panic!("leased: a run") };
        assert_eq!(record.error.unwrap().message, "stop");
        assert_eq!((record.attempts, record.started_at), (0, None), "leased ahead, never started: no attempt spent");
        assert!(matches!(
            q.cancel(&leased, "again", 3),
            Err(QueueError::AlreadyEnded { status: TaskStatus::Cancelled, .. })
        ));
        assert!(matches!(q.cancel("nope", "x", 3), Err(QueueError::UnknownTask(_))));
        assert_eq!(q.counts("a"), Counts::default());
        assert!(q.finish(&leased, Finish::Complete(Bytes::new()), 4).is_none(), "its worker's late report is ignored");
    }

    #[test]
    fn sweep_expires_waiting_tasks_and_keeps_results_with_pending_callbacks() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let waiting = q.enqueue(task(1), 0).unwrap().id;
        let mut hooked = task(1);
        hooked.callback_url = Some("http://127.0.0.1:9/hook".into());
        let hooked = q.enqueue(hooked, 0).unwrap().id;
        assert_eq!(q.lease("a", 1).unwrap().id, waiting);
        q.finish(&waiting, trapped(), 2).unwrap();
        // `waiting` is a retry now, first in line: ttl no longer applies to it.
        assert_eq!(q.lease("a", 3).unwrap().id, waiting);
        q.release(&waiting).unwrap();
        let fresh = q.enqueue(task(0), 5).unwrap().id;
        let expired: Vec<String> = q.sweep(10_000).into_iter().map(|r| r.id).collect();
        assert_eq!(expired, vec![hooked.clone()], "only the never-run task past its ttl: {expired:?}");
        assert_eq!(q.get(&waiting).unwrap().status, TaskStatus::Retry);
        assert_eq!(q.get(&fresh).unwrap().status, TaskStatus::Pending);
        let pending = q.pending_callbacks();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].0.id.as_str(), pending[0].0.status), (hooked.as_str(), TaskStatus::Expired));
        q.sweep(100_000);
        assert!(q.get(&hooked).is_some(), "kept until its callback is delivered");
        assert_eq!(q.get(&hooked).unwrap().callback, Some(CallbackState::Pending));
        q.callback_settled(&hooked, true);
        assert_eq!(q.get(&hooked).unwrap().callback, Some(CallbackState::Delivered));
        q.sweep(200_000);
        assert!(q.get(&hooked).is_none(), "then forgotten");
        assert!(q.pending_callbacks().is_empty());
    }

    #[test]
    fn ending_queued_calls_keeps_queued_tasks() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let kept = q.enqueue(task(0), 0).unwrap().id;
        let call = q.enqueue(NewTask { durable: false, ..task(0) }, 0).unwrap().id;
        let error = TaskError { code: ErrorCode::NoCapacity, message: "full".into() };
        let other = node(&redis, "n2");
        let elsewhere = other.enqueue(NewTask { durable: false, ..task(0) }, 0).unwrap().id;
        let ended = q.end_queued("a", Queued::CallsTakenHere, TaskStatus::Failed, error.clone(), 1);
        assert_eq!(ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![call.as_str()]);
        assert_eq!(q.counts("a").queued, 2, "the task, and the call another node took");
        let ended = q.end_queued("a", Queued::Calls, TaskStatus::Failed, error.clone(), 1);
        assert_eq!(ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![elsewhere.as_str()]);
        assert_eq!(q.counts("a").queued, 1);
        let ended = q.end_queued("a", Queued::All, TaskStatus::Cancelled, error, 2);
        assert_eq!(
            ended.iter().map(|r| (r.id.as_str(), r.status)).collect::<Vec<_>>(),
            vec![(kept.as_str(), TaskStatus::Cancelled)]
        );
        assert_eq!(q.counts("a"), Counts::default());
    }

    #[test]
    fn a_dead_nodes_work_is_taken_over() {
        let Some(redis) = TestRedis::start() else { return };
        let (a, b) = (node(&redis, "a"), node(&redis, "b"));
        let mut hooked = task(0);
        hooked.callback_url = Some("http://127.0.0.1:9/hook".into());
        let hooked = b.enqueue(NewTask { max_queued: 10, ..hooked }, 0).unwrap().id;
        let started = b.enqueue(NewTask { max_queued: 10, ..task(1) }, 0).unwrap().id;
        let spent = b.enqueue(NewTask { max_queued: 10, ..task(0) }, 0).unwrap().id;
        let ahead = b.enqueue(NewTask { max_queued: 10, ..task(0) }, 0).unwrap().id;
        let call = b.enqueue(NewTask { max_queued: 10, durable: false, ..task(0) }, 0).unwrap().id;
        assert_eq!(b.lease("a", 1).unwrap().id, hooked);
        b.finish(&hooked, Finish::Complete(Bytes::from_static(b"out")), 2).unwrap();
        assert_eq!(b.lease("a", 3).unwrap().id, started);
        assert_eq!(b.lease("a", 3).unwrap().id, spent);
        assert_eq!(b.lease_ahead("a", 3).unwrap().id, ahead);
        assert!(a.reap_dead(4).unwrap().ended.is_empty(), "b is alive: nothing taken");

        a.client.call(&[b"DEL", b"beamlet:node:b"]).unwrap();
        let reaped = a.reap_dead(5).unwrap();
        assert_eq!(reaped.ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![spent.as_str()]);
        assert_eq!(reaped.ended[0].error.as_ref().unwrap().code, ErrorCode::ReplicaLost);
        assert_eq!(reaped.callbacks.len(), 1, "b's undelivered callback is a's now");
        assert_eq!(
            (reaped.callbacks[0].0.id.as_str(), reaped.callbacks[0].1.as_deref()),
            (hooked.as_str(), Some(&b"out"[..]))
        );
        let retried = a.get(&started).unwrap();
        assert_eq!((retried.status, retried.attempts), (TaskStatus::Retry, 1));
        let waiting = a.get(&ahead).unwrap();
        assert_eq!((waiting.status, waiting.attempts), (TaskStatus::Pending, 0), "it never started: no attempt spent");
        assert!(a.get(&call).is_none(), "its caller is gone with b");
        assert_eq!(a.counts("a"), Counts { queued: 2, running: 0 });
        let mut next = [a.lease("a", 6).unwrap().id, a.lease("a", 6).unwrap().id];
        next.sort();
        let mut expected = [ahead.clone(), started.clone()];
        expected.sort();
        assert_eq!(next, expected, "both first in line again, ahead of nothing else");
        assert!(a.reap_dead(7).unwrap().ended.is_empty(), "b is reaped once");
        // b was only frozen: its late starts, ends and releases of runs now a's change nothing.
        b.started(&started, 100);
        assert_ne!(a.get(&started).unwrap().started_at, Some(100));
        assert!(b.finish(&started, Finish::Complete(Bytes::from_static(b"late")), 8).is_none());
        assert!(b.release(&ahead).is_none());
        let running = a.get(&started).unwrap();
        assert_eq!((running.status, running.attempts), (TaskStatus::Running, 2), "a's run stands");
        assert_eq!(a.finish(&started, Finish::Complete(Bytes::from_static(b"a's")), 9).unwrap().record.attempts, 2);
        assert_eq!(a.output(&started).unwrap(), Bytes::from_static(b"a's"));
    }

    #[test]
    fn a_task_whose_enqueue_failed_does_not_run_if_redis_took_it_after_all() {
        let Some(mut redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        // Redis took it, but (say) answered after the node gave up: the node
        // refused its caller and drops it once Redis answers again.
        let id = q.enqueue(task(0), 0).unwrap().id;
        q.unsaved.lock().unwrap().push(Unsaved::Abandon { id: id.clone() });
        assert!(q.save_unsaved().is_empty());
        assert!(q.get(&id).is_none());
        assert_eq!(q.counts("a"), Counts::default());
        assert!(q.lease("a", 1).is_none());
        // Leased meanwhile, here (a lease whose answer this node also gave
        // up on) or by another node: dropped all the same, its end not taken.
        let other = node(&redis, "n2");
        for leaser in [&q, &other] {
            let id = q.enqueue(task(0), 1).unwrap().id;
            assert_eq!(leaser.lease("a", 1).unwrap().id, id);
            q.unsaved.lock().unwrap().push(Unsaved::Abandon { id: id.clone() });
            assert!(q.save_unsaved().is_empty());
            assert!(q.get(&id).is_none());
            assert_eq!(q.counts("a"), Counts::default());
            leaser.finish(&id, Finish::Complete(Bytes::from_static(b"late")), 2);
            assert!(q.get(&id).is_none(), "its end brings nothing back");
        }
        // A failed enqueue is kept to be abandoned so.
        redis.stop();
        assert!(q.enqueue(task(0), 2).is_err());
        assert_eq!(q.unsaved(), 1);
        redis.restart();
        assert!(q.save_unsaved().is_empty());
        assert_eq!(q.unsaved(), 0);
    }

    #[test]
    fn a_call_whose_end_redis_took_late_is_answered_with_that_end() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let call = |q: &RedisQueue| q.enqueue(NewTask { durable: false, ..task(0) }, 0).unwrap().id;
        // The node sent the end, gave up waiting (Redis frozen) and kept it
        // to send again; Redis then took the first, which dropped the call.
        let id = call(&q);
        assert_eq!(q.lease("a", 1).unwrap().id, id);
        let held = q.held.lock().unwrap().get(&id).cloned();
        let output = Bytes::from_static(b"{\"y\":2}");
        assert!(q.finish(&id, Finish::Complete(output.clone()), 3).is_some());
        assert!(q.get(&id).is_none(), "its end dropped the call");
        q.unsaved.lock().unwrap().push(Unsaved::Finish {
            id: id.clone(),
            finish: Finish::Complete(output.clone()),
            at: 3,
            held,
        });
        let saved = q.save_unsaved();
        let [Saved::Finished(Ended { record, output: Some(answer) })] = &saved[..] else {
            panic!("the caller is answered with the run's end, got {} saved", saved.len())
        };
        assert_eq!((record.id.as_str(), record.app.as_str(), record.status), (id.as_str(), "a", TaskStatus::Complete));
        assert_eq!((record.attempts, record.started_at, record.ended_at), (1, Some(1), Some(3)));
        assert_eq!(answer, &output);
        assert!(q.get(&id).is_none(), "and it is not made again");
        // A task Redis lost while it ran (restarted empty, say): its end is its caller's answer too.
        let id = call(&q);
        q.lease("a", 4).unwrap();
        q.client.call(&[b"DEL", format!("beamlet:t:{id}").as_bytes()]).unwrap();
        let error = TaskError { code: ErrorCode::Timeout, message: "ran past its 1s timeout".into() };
        let ended = q.finish(&id, Finish::Retryable(error.clone()), 5).expect("answered");
        assert_eq!((ended.record.status, ended.record.error), (TaskStatus::Timeout, Some(error)));
    }

    #[test]
    fn a_lease_whose_answer_the_node_never_got_is_released() {
        let Some(redis) = TestRedis::start() else { return };
        let q = node(&redis, "n1");
        let lost = q.enqueue(NewTask { max_queued: 10, ..task(0) }, 0).unwrap().id;
        let held = q.enqueue(NewTask { max_queued: 10, ..task(0) }, 0).unwrap().id;
        // Redis leases it, but its answer never reaches the node (the call timed out).
        q.client.eval(&lua::LEASE, &[b"a", b"1", b"n1", b"0"]).unwrap();
        assert_eq!(q.lease("a", 2).unwrap().id, held);
        assert!(q.release_orphans(Duration::from_secs(60)).unwrap().is_empty(), "not before it was seen so long");
        let released = q.release_orphans(Duration::ZERO).unwrap();
        assert_eq!(released.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![lost.as_str()]);
        let record = q.get(&lost).unwrap();
        assert_eq!((record.status, record.attempts), (TaskStatus::Pending, 0), "it never ran");
        assert_eq!(q.get(&held).unwrap().status, TaskStatus::Running, "what the node holds stays");
        assert!(q.release_orphans(Duration::ZERO).unwrap().is_empty());
        assert_eq!(q.lease("a", 3).unwrap().id, lost);
    }

    #[test]
    fn a_restarted_node_takes_back_what_it_was_running() {
        let Some(redis) = TestRedis::start() else { return };
        let id = {
            let q = node(&redis, "n1");
            let id = q.enqueue(task(1), 0).unwrap().id;
            q.lease("a", 1).unwrap();
            id
        };
        let q = node(&redis, "n1");
        let record = q.get(&id).unwrap();
        assert_eq!((record.status, record.attempts), (TaskStatus::Retry, 1));
        assert_eq!(q.lease("a", 2).unwrap().attempt, 2);
    }

    #[test]
    fn the_sweep_cancels_tasks_left_queued_for_a_deleted_app() {
        let Some(redis) = TestRedis::start() else { return };
        let (a, b) = (node(&redis, "a"), node(&redis, "b"));
        let record = br#"{"name":"a","version":1,"digest":"d1"}"#;
        a.publish_app("a", record, None, "d1", b"w1").unwrap();
        let running = b.enqueue(NewTask { max_queued: 10, ..task(1) }, 0).unwrap().id;
        let queued = b.enqueue(NewTask { max_queued: 10, ..task(0) }, 0).unwrap().id;
        assert_eq!(b.lease("a", 1).unwrap().id, running);
        assert!(a.sweep(2).is_empty(), "the app is deployed: its tasks wait");
        // b deletes the app and dies before it cancels the app's tasks; its
        // run goes back to the queue when a takes over.
        b.unpublish_app("a", record).unwrap();
        a.client.call(&[b"DEL", b"beamlet:node:b"]).unwrap();
        assert!(a.reap_dead(3).unwrap().ended.is_empty());
        assert_eq!(a.get(&running).unwrap().status, TaskStatus::Retry);
        let mut ended = a.sweep(4);
        ended.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [running.as_str(), queued.as_str()]);
        for record in &ended {
            assert_eq!(record.status, TaskStatus::Cancelled);
            assert_eq!(record.error.as_ref().unwrap().message, r#"app "a" was removed"#);
        }
        assert_eq!(a.counts("a"), Counts::default());
        // Deployed again: its new tasks are left to run.
        a.publish_app("a", record, None, "d1", b"w1").unwrap();
        let new = a.enqueue(task(0), 5).unwrap().id;
        assert!(a.sweep(6).is_empty());
        assert_eq!(a.get(&new).unwrap().status, TaskStatus::Pending);
    }

    #[test]
    fn an_app_is_published_only_over_the_record_its_deploy_read() {
        let Some(redis) = TestRedis::start() else { return };
        let (a, b) = (node(&redis, "a"), node(&redis, "b"));
        let record = |version: u32, digest: &str| format!(r#"{{"name":"x","version":{version},"digest":"{digest}"}}"#);
        let v1 = record(1, "d1");
        assert_eq!(a.publish_app("x", v1.as_bytes(), None, "d1", b"w1").unwrap(), Published::Current);
        assert_eq!(a.publish_app("x", v1.as_bytes(), None, "d1", b"w1").unwrap(), Published::Current, "the same again");
        // Both nodes read version 1 and deploy version 2 at once: the first counts.
        let (ours, theirs) = (record(2, "d2a"), record(2, "d2b"));
        assert_eq!(
            a.publish_app("x", ours.as_bytes(), Some(v1.as_bytes()), "d2a", b"w2a").unwrap(),
            Published::Current
        );
        let late = b.publish_app("x", theirs.as_bytes(), Some(v1.as_bytes()), "d2b", b"w2b").unwrap();
        assert_eq!(late, Published::Superseded(Some(2)));
        assert_eq!(b.app("x").unwrap().unwrap(), ours.as_bytes());
        // Deleted meanwhile: a deploy that read the old record does not bring it back.
        b.unpublish_app("x", ours.as_bytes()).unwrap();
        let v3 = record(3, "d3");
        assert_eq!(
            a.publish_app("x", v3.as_bytes(), Some(ours.as_bytes()), "d3", b"w3").unwrap(),
            Published::Superseded(None)
        );
        assert!(a.app("x").unwrap().is_none());
        // Deleted and deployed again as version 1 meanwhile: not overwritten by a later number.
        let again = record(1, "d1b");
        assert_eq!(b.publish_app("x", again.as_bytes(), None, "d1b", b"w1b").unwrap(), Published::Current);
        assert_eq!(
            a.publish_app("x", v3.as_bytes(), Some(ours.as_bytes()), "d3", b"w3").unwrap(),
            Published::Superseded(Some(1))
        );
        assert_eq!(a.app("x").unwrap().unwrap(), again.as_bytes());
        // Only the components of current records are kept.
        assert!(a.component("d2b").unwrap().is_none(), "a superseded deploy stores none");
        assert!(a.component("d2a").unwrap().is_none(), "one no app uses any more is deleted");
        assert_eq!(a.component("d1b").unwrap().unwrap(), b"w1b");
        // Content-addressed: one shared by two apps stays while either uses it.
        let twin = r#"{"name":"y","version":1,"digest":"d1b"}"#;
        assert_eq!(a.publish_app("y", twin.as_bytes(), None, "d1b", b"w1b").unwrap(), Published::Current);
        b.unpublish_app("x", again.as_bytes()).unwrap();
        assert_eq!(a.component("d1b").unwrap().unwrap(), b"w1b", "y still uses it");
        b.unpublish_app("y", twin.as_bytes()).unwrap();
        assert!(a.component("d1b").unwrap().is_none());
    }
}
