//! One node's view of the queue: replicas wait here for work, callers wait
//! here for results, and cancellations are routed to the replica running
//! the task.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{
    Cancelled, Counts, Ended, ErrorCode, Event, Finish, Lease, NewTask, Queue, QueueError, Queued, Saved, TaskError,
    TaskId, TaskRecord, TaskStatus, now_ms,
};

pub(crate) struct Dispatch {
    queue: Arc<dyn Queue>,
    /// Woken when an app's queue gains a task.
    arrivals: Mutex<HashMap<String, Arc<Notify>>>,
    /// Callers waiting for a task to end.
    waiters: Mutex<HashMap<TaskId, Vec<oneshot::Sender<Ended>>>>,
    /// Where to send a cancellation for each running task.
    routes: Mutex<HashMap<TaskId, mpsc::UnboundedSender<TaskId>>>,
    /// Woken when any app gains a task (the autoscaler listens).
    demand: Notify,
    /// Every task that ends with a callback URL, with its output, for delivery.
    callbacks: mpsc::UnboundedSender<(TaskRecord, Option<Bytes>)>,
    /// Set when the node shuts down ([`Dispatch::close`]).
    closing: watch::Sender<bool>,
    /// Waited-on tasks the shared store did not have at the last resync.
    missing: Mutex<HashSet<TaskId>>,
    /// Replicas taking each app's runs on this node ([`Dispatch::serving`]).
    serving: Mutex<HashMap<String, usize>>,
}

/// A replica takes an app's runs while this lives.
pub(crate) struct Serving<'a> {
    dispatch: &'a Dispatch,
    app: String,
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut serving = self.dispatch.serving.lock().unwrap();
        if let Some(count) = serving.get_mut(&self.app) {
            *count -= 1;
            if *count == 0 {
                serving.remove(&self.app);
            }
        }
    }
}

impl Dispatch {
    /// The receiver gets every task that ends with a callback URL: first
    /// those whose callback a restart interrupted, then each as it ends.
    pub(crate) fn new(queue: Arc<dyn Queue>) -> (Self, mpsc::UnboundedReceiver<(TaskRecord, Option<Bytes>)>) {
        let (callbacks, ended) = mpsc::unbounded_channel();
        for pending in queue.pending_callbacks() {
            let _ = callbacks.send(pending);
        }
        let dispatch = Self {
            queue,
            arrivals: Mutex::default(),
            waiters: Mutex::default(),
            routes: Mutex::default(),
            demand: Notify::new(),
            callbacks,
            closing: watch::Sender::new(false),
            missing: Mutex::default(),
            serving: Mutex::default(),
        };
        (dispatch, ended)
    }

    /// Counts a replica taking `app`'s runs until the guard drops.
    pub(crate) fn serving(&self, app: &str) -> Serving<'_> {
        *self.serving.lock().unwrap().entry(app.to_owned()).or_default() += 1;
        Serving { dispatch: self, app: app.to_owned() }
    }

    /// Whether one replica alone takes `app`'s runs on this node, so runs
    /// held for it wait for no other replica that sits idle. (With a shared
    /// store, other nodes' replicas may, but no runs are held then.)
    pub(crate) fn serves_alone(&self, app: &str) -> bool {
        self.serving.lock().unwrap().get(app).is_none_or(|count| *count <= 1)
    }

    fn arrivals(&self, app: &str) -> Arc<Notify> {
        self.arrivals.lock().unwrap().entry(app.to_owned()).or_default().clone()
    }

    fn wake(&self, app: &str) {
        self.arrivals(app).notify_waiters();
        self.demand.notify_waiters();
    }

    /// Completes when any app gains a task after this call's future is
    /// enabled, or [`Dispatch::wake_autoscaler`] is called.
    pub(crate) fn demand(&self) -> tokio::sync::futures::Notified<'_> {
        self.demand.notified()
    }

    /// Has the autoscaler look again now, not at its next tick (a replica
    /// went idle while another waits for the room it holds).
    pub(crate) fn wake_autoscaler(&self) {
        self.demand.notify_waiters();
    }

    /// Tells everyone waiting on a task that ended how it ended; a call whose
    /// caller waited is forgotten once told.
    fn resolve(&self, record: &TaskRecord) {
        self.settle(record, None, true);
    }

    /// [`Dispatch::resolve`] with the output when already known (`None`:
    /// read it if needed), and `forget`: whether a call is still to be
    /// forgotten.
    fn settle(&self, record: &TaskRecord, output: Option<Option<Bytes>>, forget: bool) {
        self.routes.lock().unwrap().remove(&record.id);
        let mut output = output;
        let mut output = || {
            output
                .get_or_insert_with(|| {
                    if record.status == TaskStatus::Complete { self.queue.output(&record.id) } else { None }
                })
                .clone()
        };
        if record.callback_url.is_some() {
            // The output now: a call whose caller waits is forgotten below.
            let _ = self.callbacks.send((record.clone(), output()));
        }
        let waiters = self.waiters.lock().unwrap().remove(&record.id).unwrap_or_default();
        if !waiters.is_empty() {
            let ended = Ended { record: record.clone(), output: output() };
            for waiter in waiters {
                let _ = waiter.send(ended.clone());
            }
        }
        if forget && !record.durable {
            self.queue.forget(&record.id);
        }
    }

    fn ended(&self, record: TaskRecord) -> Ended {
        let output = if record.status == TaskStatus::Complete { self.queue.output(&record.id) } else { None };
        Ended { record, output }
    }

    /// Queues a task and returns once it is durable.
    pub(crate) async fn submit(&self, task: NewTask) -> Result<TaskRecord, QueueError> {
        let wait_for_store = task.durable;
        let record = self.queue.enqueue(task, now_ms())?;
        let durable = wait_for_store.then(|| self.queue.sync());
        // Running it before the commit lands is fine: delivery is at least once.
        self.wake(&record.app);
        if let Some(durable) = durable
            && durable.await.is_err()
        {
            // Refused: it must not run (a run begun meanwhile stops), nor
            // come back after a restart.
            self.stop_run(&record.id);
            self.queue.abandon(&record.id);
            return Err(QueueError::Store);
        }
        Ok(record)
    }

    /// Queues a task whose caller waits for its end, and waits. The waiter is
    /// in place before any worker can take the task, so a fast end is seen.
    pub(crate) async fn call(&self, task: NewTask) -> Result<Ended, QueueError> {
        if *self.closing.borrow() {
            return Err(QueueError::ShuttingDown);
        }
        let id = task.id.clone();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().entry(id.clone()).or_default().push(tx);
        if let Err(e) = self.submit(task).await {
            self.waiters.lock().unwrap().remove(&id);
            return Err(e);
        }
        // The sender is dropped unanswered only if the task vanished: a
        // shared store that lost its data.
        // (Or the node stopped, giving up on the calls still running.)
        rx.await.map_err(|_| if *self.closing.borrow() { QueueError::CutOff } else { QueueError::Lost(id) })
    }

    /// Cancels task `id` when the guard drops before [`CancelOnDrop::disarm`]:
    /// a call whose caller went away (its connection closed, so the handler's
    /// future was dropped), whose result nobody would see.
    pub(crate) fn cancel_on_drop(&self, id: &str) -> CancelOnDrop<'_> {
        CancelOnDrop { dispatch: self, id: Some(id.to_owned()) }
    }

    /// Waits for the app's next task and leases it; `ahead`: for a replica
    /// whose workers are all busy (see [`Queue::lease_ahead`]). Cancel-safe:
    /// a lease is taken only in the poll that returns it.
    pub(crate) async fn next(&self, app: &str, ahead: bool) -> Lease {
        let arrivals = self.arrivals(app);
        loop {
            let notified = arrivals.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.lease(app, ahead) {
                return lease;
            }
            notified.await;
        }
    }

    /// [`Dispatch::next`] without waiting: the app's next task, if one waits now.
    fn lease(&self, app: &str, ahead: bool) -> Option<Lease> {
        let now = now_ms();
        if ahead { self.queue.lease_ahead(app, now) } else { self.queue.lease(app, now) }
    }

    /// Another task to send with the one [`Dispatch::next`] gave, if one
    /// waits and looking is cheap (not a round trip to a shared store).
    pub(crate) fn also_next(&self, app: &str, ahead: bool) -> Option<Lease> {
        self.queue.leases_are_cheap().then(|| self.lease(app, ahead)).flatten()
    }

    /// A task leased ahead has started.
    pub(crate) fn started(&self, id: &str) {
        self.queue.started(id, now_ms());
    }

    /// Puts a task leased ahead that never started back first in line.
    pub(crate) fn release(&self, id: &str) {
        self.routes.lock().unwrap().remove(id);
        if let Some(record) = self.queue.release(id) {
            self.requeued(&record.app);
        }
    }

    /// Tells the replica running `id` here, if one does, to stop it.
    fn stop_run(&self, id: &str) {
        let route = self.routes.lock().unwrap().remove(id);
        if let Some(route) = route {
            let _ = route.send(id.to_owned());
        }
    }

    /// Routes a later cancellation of `id` to `route`.
    pub(crate) fn route(&self, id: &str, route: &mpsc::UnboundedSender<TaskId>) {
        self.routes.lock().unwrap().insert(id.to_owned(), route.clone());
    }

    pub(crate) fn finish(&self, id: &str, finish: Finish) {
        self.finish_and_next(id, finish, None);
    }

    /// [`Dispatch::finish`], and with `next` (an app) that app's next task
    /// for the worker the run freed, leased with the end (see
    /// [`Queue::finish_and_lease`]).
    pub(crate) fn finish_and_next(&self, id: &str, finish: Finish, next: Option<&str>) -> Option<Lease> {
        let (ended, lease) = self.queue.finish_and_lease(id, finish, now_ms(), next);
        if let Some(Ended { record, output }) = ended {
            if record.status.is_terminal() {
                // The queue forgot a call that ended itself (see `Queue::finish`).
                self.settle(&record, Some(output), false);
            } else {
                self.routes.lock().unwrap().remove(id);
                self.requeued(&record.app);
            }
        }
        lease
    }

    /// A task went back in `app`'s queue. Once the node is closing no
    /// replica here takes a call put back: it ends now (see `close`), and
    /// its caller is not kept waiting until the node exits.
    fn requeued(&self, app: &str) {
        if *self.closing.borrow() {
            self.end_calls_taken_here(app);
        }
        self.wake(app);
    }

    /// Whether a lease costs next to nothing (see [`Queue::leases_are_cheap`]).
    pub(crate) fn leases_are_cheap(&self) -> bool {
        self.queue.leases_are_cheap()
    }

    pub(crate) fn cancel(&self, id: &str) -> Result<TaskRecord, QueueError> {
        self.cancel_because(id, "the task was cancelled")
    }

    /// Cancels a queued or running task (telling its replica to stop it),
    /// `why` its error message.
    fn cancel_because(&self, id: &str, why: &str) -> Result<TaskRecord, QueueError> {
        let route = self.routes.lock().unwrap().get(id).cloned();
        let record = match self.queue.cancel(id, why, now_ms())? {
            Cancelled::Queued(record) => record,
            Cancelled::Running(record) => {
                if let Some(route) = route {
                    let _ = route.send(id.to_owned());
                }
                record
            }
        };
        self.resolve(&record);
        Ok(record)
    }

    /// The task once it has ended, or as it is when `timeout` runs out.
    /// `None` for an unknown task.
    pub(crate) async fn wait(&self, id: &str, timeout: Duration) -> Option<Ended> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().entry(id.to_owned()).or_default().push(tx);
        // Checked after registering, so an end in between is not missed.
        match self.queue.get(id) {
            Some(record) if !record.status.is_terminal() => {}
            current => {
                drop(rx);
                self.forget_closed_waiters(id);
                return current.map(|record| self.ended(record));
            }
        }
        let mut closing = self.closing.subscribe();
        let ended = tokio::select! {
            ended = tokio::time::timeout(timeout, rx) => ended.ok().and_then(Result::ok),
            // A node shutting down answers long-polls now, not at its exit.
            _ = closing.wait_for(|closing| *closing) => None,
        };
        match ended {
            Some(ended) => Some(ended),
            None => {
                self.forget_closed_waiters(id);
                self.queue.get(id).map(|record| self.ended(record))
            }
        }
    }

    fn forget_closed_waiters(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap();
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|waiter| !waiter.is_closed());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    /// Requests open here that wait for a task to end (calls, long-polls).
    pub(crate) fn waiting(&self) -> usize {
        let waiters = self.waiters.lock().unwrap();
        waiters.values().flatten().filter(|waiter| !waiter.is_closed()).count()
    }

    /// Acts on what happened on another node (or on this one, seen through
    /// the shared queue's channel).
    pub(crate) fn on_event(&self, event: Event) {
        match event {
            Event::Arrival(app) => self.wake(&app),
            // The node acts on these (see `node::cluster`).
            Event::AppChanged(_) => {}
            Event::Ended(id) => self.answer_waiters(&id),
            Event::Cancel(id) => self.stop_run(&id),
            Event::Resync => {
                let apps: Vec<Arc<Notify>> = self.arrivals.lock().unwrap().values().cloned().collect();
                for arrivals in apps {
                    arrivals.notify_waiters();
                }
                self.demand.notify_waiters();
                let waited: Vec<TaskId> = self.waiters.lock().unwrap().keys().cloned().collect();
                let mut missing = HashSet::new();
                for id in waited {
                    match self.queue.get(&id) {
                        Some(record) => self.answer_with(record),
                        None => {
                            missing.insert(id);
                        }
                    }
                }
                // Gone from the store at two looks in a row (a call
                // registers its waiter just before queuing): the store lost
                // it, and its callers are told so rather than left waiting.
                let mut missing_before = self.missing.lock().unwrap();
                if !self.queue.is_available() {
                    // Not read is not missing: the store did not answer.
                    missing.clear();
                }
                for id in missing.intersection(&missing_before) {
                    self.waiters.lock().unwrap().remove(id);
                }
                *missing_before = missing;
            }
        }
    }

    /// Answers whoever waits here on task `id` if it has ended (on another
    /// node); a call this node took is then forgotten.
    fn answer_waiters(&self, id: &str) {
        if !self.waiters.lock().unwrap().contains_key(id) {
            return;
        }
        if let Some(record) = self.queue.get(id) {
            self.answer_with(record);
        }
    }

    /// [`Dispatch::answer_waiters`] with the task as just read.
    fn answer_with(&self, record: TaskRecord) {
        if !record.status.is_terminal() {
            return;
        }
        let id = record.id.clone();
        let ended = self.ended(record);
        let waiters = self.waiters.lock().unwrap().remove(&id).unwrap_or_default();
        // Empty: the ending (here) answered them meanwhile, and forgets.
        if waiters.is_empty() {
            return;
        }
        for waiter in waiters {
            let _ = waiter.send(ended.clone());
        }
        if !ended.record.durable {
            self.queue.forget(&id);
        }
    }

    /// A change the shared store took late (it was down when the run ended
    /// or was released): act on it as on one taken at once.
    pub(crate) fn saved_late(&self, saved: Saved) {
        match saved {
            Saved::Finished(Ended { record, output }) if record.status.is_terminal() => {
                self.settle(&record, Some(output), false);
            }
            Saved::Finished(Ended { record, .. }) | Saved::Released(record) => {
                self.routes.lock().unwrap().remove(&record.id);
                self.wake(&record.app);
            }
        }
    }

    /// Work taken over from a node that stopped: tasks that ended (their
    /// retries spent) and ended tasks whose callbacks this node now delivers.
    pub(crate) fn took_over(&self, ended: Vec<TaskRecord>, callbacks: Vec<(TaskRecord, Option<Bytes>)>) {
        for record in &ended {
            self.resolve(record);
        }
        for callback in callbacks {
            let _ = self.callbacks.send(callback);
        }
    }

    /// Resolves once every change so far is in the task store.
    pub(crate) fn sync(&self) -> oneshot::Receiver<()> {
        self.queue.sync()
    }

    /// The task's callback was delivered, or given up on.
    pub(crate) fn callback_settled(&self, id: &str, delivered: bool) {
        self.queue.callback_settled(id, delivered);
    }

    /// Whether the task store answered its last calls (see
    /// [`Queue::is_available`]).
    pub(crate) fn store_available(&self) -> bool {
        self.queue.is_available()
    }

    /// Whether the task store saves changes now (see [`Queue::saves`]).
    pub(crate) fn store_saves(&self) -> bool {
        self.queue.saves()
    }

    pub(crate) fn get(&self, id: &str) -> Option<TaskRecord> {
        self.queue.get(id)
    }

    pub(crate) fn output(&self, id: &str) -> Option<Bytes> {
        self.queue.output(id)
    }

    pub(crate) fn counts(&self, app: &str) -> Counts {
        self.queue.counts(app)
    }

    /// [`Dispatch::counts`] as last read (see [`Queue::recent_counts`]).
    pub(crate) fn recent_counts(&self, app: &str) -> Counts {
        self.queue.recent_counts(app)
    }

    pub(crate) fn list(
        &self,
        app: &str,
        status: Option<TaskStatus>,
        before: Option<&str>,
        limit: usize,
    ) -> Vec<TaskRecord> {
        self.queue.list(app, status, before, limit)
    }

    pub(crate) fn sweep(&self) {
        for record in self.queue.sweep(now_ms()) {
            self.resolve(&record);
        }
    }

    /// Cancels the queued and running tasks of a removed app: none of them
    /// may linger, to be retried or run by a later app of the same name.
    /// Returns how many it cancelled.
    pub(crate) fn remove_app(&self, app: &str) -> usize {
        let why = format!("app {app:?} was removed");
        let error = TaskError { code: ErrorCode::Cancelled, message: why.clone() };
        let mut cancelled = self.end_queued(app, Queued::All, TaskStatus::Cancelled, error);
        for record in self.queue.list(app, Some(TaskStatus::Running), None, usize::MAX) {
            cancelled += usize::from(self.cancel_because(&record.id, &why).is_ok());
        }
        cancelled
    }

    /// Fails the queued calls of an app that cannot start, saying why: their
    /// callers wait. Tasks submitted to the queue stay queued (up to their
    /// ttl): a start that fails for a while (a model store down), or a fixed
    /// redeploy, runs them then.
    pub(crate) fn fail_calls(&self, app: &str, message: String) {
        self.end_queued(app, Queued::Calls, TaskStatus::Failed, TaskError { code: ErrorCode::StartFailed, message });
    }

    /// Ends the app's queued calls (their callers wait) with `message`: no
    /// replica can run them. Queued tasks wait for capacity.
    pub(crate) fn refuse_calls(&self, app: &str, message: String) {
        self.end_queued(app, Queued::Calls, TaskStatus::Failed, TaskError { code: ErrorCode::NoCapacity, message });
    }

    /// Node shutdown: calls are refused from now on, calls still queued end
    /// at once (no replica will take them), and long-polls answer with the
    /// task as it is. Tasks submitted to the queue stay for the next start.
    pub(crate) fn close(&self, apps: &[String]) {
        // `send` would change nothing while no long-poll holds a receiver.
        self.closing.send_replace(true);
        for app in apps {
            self.end_calls_taken_here(app);
        }
    }

    /// The shutdown grace ran out: every call still waiting is answered
    /// that the node stopped (their connections would close unanswered).
    pub(crate) fn give_up_calls(&self) {
        self.waiters.lock().unwrap().clear();
    }

    /// Whether a caller still waits for a call's end (once closed: a call
    /// already running, here or on another node of a cluster).
    pub(crate) fn calls_waiting(&self) -> bool {
        self.waiters.lock().unwrap().values().flatten().any(|waiter| !waiter.is_closed())
    }

    /// Ends the app's queued calls this node took, as the node shuts down.
    /// Another node's callers are still there: their calls stay queued.
    fn end_calls_taken_here(&self, app: &str) {
        let message = "the node is shutting down before the call could run (or run again, its replica lost); call \
                       again once it is back"
            .to_owned();
        let error = TaskError { code: ErrorCode::ShuttingDown, message };
        self.end_queued(app, Queued::CallsTakenHere, TaskStatus::Cancelled, error);
    }

    fn end_queued(&self, app: &str, which: Queued, status: TaskStatus, error: TaskError) -> usize {
        let ended = self.queue.end_queued(app, which, status, error, now_ms());
        for record in &ended {
            self.resolve(record);
        }
        ended.len()
    }
}

/// See [`Dispatch::cancel_on_drop`].
pub(crate) struct CancelOnDrop<'a> {
    dispatch: &'a Dispatch,
    /// `None` once disarmed.
    id: Option<TaskId>,
}

impl CancelOnDrop<'_> {
    /// The caller has its answer (or something else now owns the task).
    pub(crate) fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = self.dispatch.cancel_because(&id, "the caller went away before the task ended");
        }
    }
}
