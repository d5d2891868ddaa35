//! The embedded queue (the default): the task lifecycle kept in memory for
//! speed and journaled to SQLite under `--data-dir` for durability. On open,
//! every stored task comes back; tasks that were running when the node died
//! are queued again (or fail, when their retries are spent).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::CallbackState;
use super::sqlite::{Journal, TaskRow};
use super::{
    Cancelled, Counts, Ended, ErrorCode, Finish, Lease, NewTask, Queue, QueueError, Queued, TaskError, TaskRecord,
    TaskStatus, millis,
};

pub(crate) struct EmbeddedQueue {
    inner: Mutex<Inner>,
    /// `None`: nothing is kept across restarts (unit tests).
    journal: Option<Journal>,
    /// Most bytes the tasks may hold in memory (`serve --max-task-bytes`:
    /// inputs waiting, results kept): a backlog of large inputs, or a pile
    /// of large results, must not take the node's memory.
    budget: u64,
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<String, Entry>,
    /// Queued task ids per app, next first.
    queued: HashMap<String, VecDeque<String>>,
    running: HashMap<String, u64>,
    /// Bytes the tasks hold in memory: the inputs of those not yet ended,
    /// the results of those ended and not yet forgotten.
    held: u64,
}

struct Entry {
    record: TaskRecord,
    input: Bytes,
    output: Option<Bytes>,
    retries: u32,
    timeout: Duration,
    result_ttl: Duration,
    max_result_size: u64,
    /// When a still-queued task expires (ms).
    expires_at: u64,
    /// Leased ahead, waiting in a replica for a worker: not started yet.
    held: bool,
}

impl Entry {
    /// What it holds in memory: its input until it ends, its result after.
    fn held_bytes(&self) -> u64 {
        (self.input.len() + self.output.as_ref().map_or(0, Bytes::len)) as u64
    }

    /// It ended and its callback is not delivered yet.
    fn callback_pending(&self) -> bool {
        self.record.callback == Some(CallbackState::Pending)
    }

    fn row(&self, with_input: bool) -> TaskRow {
        let r = &self.record;
        TaskRow {
            id: r.id.clone(),
            app: r.app.clone(),
            status: r.status.as_str().to_owned(),
            attempts: r.attempts,
            retries: self.retries,
            timeout_ms: millis(self.timeout),
            result_ttl_ms: millis(self.result_ttl),
            max_result_size: self.max_result_size,
            created_at: r.created_at,
            started_at: r.started_at,
            ended_at: r.ended_at,
            expires_at: self.expires_at,
            error_code: r.error.as_ref().map(|e| e.code.as_str().to_owned()),
            error_message: r.error.as_ref().map(|e| e.message.clone()),
            input: if with_input { self.input.clone() } else { Bytes::new() },
            output: self.output.clone(),
            callback_url: r.callback_url.clone(),
            callback: r.callback,
        }
    }

    fn from_row(row: TaskRow) -> Self {
        let error = match (row.error_code.as_deref().and_then(ErrorCode::parse), row.error_message) {
            (Some(code), Some(message)) => Some(TaskError { code, message }),
            _ => None,
        };
        Entry {
            record: TaskRecord {
                id: row.id,
                app: row.app,
                status: TaskStatus::parse(&row.status).unwrap_or(TaskStatus::Failed),
                attempts: row.attempts,
                created_at: row.created_at,
                started_at: row.started_at,
                ended_at: row.ended_at,
                error,
                callback_url: row.callback_url,
                callback: row.callback,
                durable: true,
            },
            input: row.input,
            output: row.output,
            retries: row.retries,
            timeout: Duration::from_millis(row.timeout_ms),
            result_ttl: Duration::from_millis(row.result_ttl_ms),
            max_result_size: row.max_result_size,
            expires_at: row.expires_at,
            held: false,
        }
    }
}

impl Inner {
    fn running_mut(&mut self, app: &str) -> &mut u64 {
        self.running.entry(app.to_owned()).or_default()
    }

    /// Ends a queued or running task.
    fn end(&mut self, id: &str, status: TaskStatus, error: Option<TaskError>, now: u64) -> Option<&Entry> {
        let entry = self.tasks.get_mut(id)?;
        let was_running = entry.record.status == TaskStatus::Running;
        entry.record.status = status;
        entry.record.error = error;
        entry.record.ended_at = Some(now);
        let input = std::mem::take(&mut entry.input);
        self.held = self.held.saturating_sub(input.len() as u64);
        // Written with the end itself: a restart before delivery delivers it then.
        entry.record.callback = entry.record.callback_url.as_ref().map(|_| CallbackState::Pending);
        let app = entry.record.app.clone();
        if was_running {
            let running = self.running_mut(&app);
            *running = running.saturating_sub(1);
        } else if let Some(queue) = self.queued.get_mut(&app) {
            queue.retain(|queued| queued != id);
        }
        self.tasks.get(id)
    }

    /// Takes a task out, with what it held.
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.tasks.remove(id)?;
        self.held = self.held.saturating_sub(entry.held_bytes());
        Some(entry)
    }

    /// Puts a task back in its app's queue, ahead of tasks never run.
    fn requeue(&mut self, id: &str, error: TaskError) -> &Entry {
        let entry = self.tasks.get_mut(id).expect("requeued tasks are known");
        entry.record.status = TaskStatus::Retry;
        entry.record.error = Some(error);
        let app = entry.record.app.clone();
        self.queued.entry(app).or_default().push_front(id.to_owned());
        &self.tasks[id]
    }
}

impl EmbeddedQueue {
    /// A queue that keeps nothing across restarts.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Self {
        Self { inner: Mutex::default(), journal: None, budget: u64::MAX }
    }

    /// Refuses a task whose input would take what the tasks hold (see
    /// `Inner::held`) past `bytes`.
    pub(crate) fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Opens the durable queue at `path`, restoring every stored task.
    pub(crate) fn open(path: &Path, now: u64) -> Result<Self> {
        let (journal, rows) = Journal::open(path)?;
        let queue = Self { inner: Mutex::default(), journal: Some(journal), budget: u64::MAX };
        {
            let mut inner = queue.inner.lock().unwrap();
            let mut retried = Vec::new();
            for row in rows {
                let entry = Entry::from_row(row);
                let (id, app, status) = (entry.record.id.clone(), entry.record.app.clone(), entry.record.status);
                inner.held += entry.held_bytes();
                inner.tasks.insert(id.clone(), entry);
                match status {
                    TaskStatus::Pending => inner.queued.entry(app).or_default().push_back(id),
                    TaskStatus::Retry | TaskStatus::Running => retried.push((id, status)),
                    _ => {}
                }
            }
            // Rows come oldest first; pushing each to the front would reverse them.
            for (id, status) in retried.into_iter().rev() {
                if status == TaskStatus::Retry {
                    let app = inner.tasks[&id].record.app.clone();
                    inner.queued.entry(app).or_default().push_front(id);
                    continue;
                }
                let message = "the node stopped while the task was running".to_owned();
                let error = TaskError { code: ErrorCode::ReplicaLost, message };
                let entry = &inner.tasks[&id];
                let entry = if entry.record.attempts > entry.retries {
                    inner.end(&id, TaskStatus::Failed, Some(error), now).expect("known")
                } else {
                    inner.requeue(&id, error)
                };
                queue.update(entry);
            }
        }
        Ok(queue)
    }

    fn update(&self, entry: &Entry) {
        if let Some(journal) = self.journal.as_ref().filter(|_| entry.record.durable) {
            journal.update(entry.row(false));
        }
    }

    /// Pops the app's oldest queued task and marks it running; `record`:
    /// write that to the store now.
    fn take(&self, app: &str, now: u64, record: bool) -> Option<Lease> {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.queued.get_mut(app)?.pop_front()?;
        *inner.running_mut(app) += 1;
        let entry = inner.tasks.get_mut(&id).expect("queued tasks are known");
        entry.record.status = TaskStatus::Running;
        entry.record.attempts += 1;
        entry.record.started_at = Some(now);
        entry.held = !record;
        if record {
            self.update(entry);
        }
        Some(Lease {
            id,
            app: app.to_owned(),
            input: entry.input.clone(),
            attempt: entry.record.attempts,
            timeout: entry.timeout,
            max_result_size: entry.max_result_size,
        })
    }
}

impl Queue for EmbeddedQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> Result<TaskRecord, QueueError> {
        let mut inner = self.inner.lock().unwrap();
        let size = task.input.len() as u64;
        if inner.held.saturating_add(size) > self.budget {
            return Err(QueueError::NodeFull { held: inner.held, budget: self.budget });
        }
        let queue = inner.queued.entry(task.app.clone()).or_default();
        if queue.len() >= task.max_queued as usize {
            return Err(QueueError::Full { app: task.app, limit: task.max_queued });
        }
        queue.push_back(task.id.clone());
        inner.held += size;
        let record = task.pending_record(now);
        let id = task.id;
        let entry = Entry {
            record: record.clone(),
            input: task.input,
            output: None,
            retries: task.retries,
            timeout: task.timeout,
            result_ttl: task.result_ttl,
            max_result_size: task.max_result_size,
            expires_at: now.saturating_add(millis(task.ttl)),
            held: false,
        };
        if let Some(journal) = self.journal.as_ref().filter(|_| entry.record.durable) {
            journal.insert(entry.row(true));
        }
        inner.tasks.insert(id, entry);
        Ok(record)
    }

    fn lease(&self, app: &str, now: u64) -> Option<Lease> {
        self.take(app, now, true)
    }

    fn lease_ahead(&self, app: &str, now: u64) -> Option<Lease> {
        self.take(app, now, false)
    }

    fn started(&self, id: &str, now: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(entry) = inner.tasks.get_mut(id).filter(|entry| entry.record.status == TaskStatus::Running) {
            entry.record.started_at = Some(now);
            entry.held = false;
            self.update(entry);
        }
    }

    fn release(&self, id: &str) -> Option<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let entry = inner.tasks.get_mut(id).filter(|entry| entry.record.status == TaskStatus::Running)?;
        entry.record.attempts -= 1;
        entry.record.started_at = None;
        entry.held = false;
        // Back where it was: first in line, as queued or as waiting for a retry.
        entry.record.status = if entry.record.error.is_some() { TaskStatus::Retry } else { TaskStatus::Pending };
        let app = entry.record.app.clone();
        let running = inner.running_mut(&app);
        *running = running.saturating_sub(1);
        inner.queued.entry(app).or_default().push_front(id.to_owned());
        let entry = &inner.tasks[id];
        self.update(entry);
        Some(entry.record.clone())
    }

    fn pending_callbacks(&self) -> Vec<(TaskRecord, Option<Bytes>)> {
        let inner = self.inner.lock().unwrap();
        let mut pending: Vec<_> = inner
            .tasks
            .values()
            .filter(|entry| entry.callback_pending())
            .map(|entry| (entry.record.clone(), entry.output.clone()))
            .collect();
        pending.sort_by_key(|(record, _)| record.ended_at);
        pending
    }

    fn callback_settled(&self, id: &str, delivered: bool) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(entry) = inner.tasks.get_mut(id).filter(|entry| entry.callback_pending()) {
            entry.record.callback = Some(if delivered { CallbackState::Delivered } else { CallbackState::Failed });
            self.update(entry);
        }
    }

    fn finish(&self, id: &str, finish: Finish, now: u64) -> Option<Ended> {
        let mut inner = self.inner.lock().unwrap();
        let entry = inner.tasks.get_mut(id)?;
        if entry.record.status != TaskStatus::Running {
            return None;
        }
        let entry = match finish {
            Finish::Complete(output) => {
                let size = output.len() as u64;
                entry.output = Some(output);
                inner.held += size;
                inner.end(id, TaskStatus::Complete, None, now)?
            }
            Finish::Cancelled => {
                let error = TaskError { code: ErrorCode::Cancelled, message: "the task was cancelled".into() };
                inner.end(id, TaskStatus::Cancelled, Some(error), now)?
            }
            Finish::Rejected(error) => inner.end(id, TaskStatus::Failed, Some(error), now)?,
            Finish::Retryable(error) if entry.record.attempts > entry.retries => {
                let status = if error.code == ErrorCode::Timeout { TaskStatus::Timeout } else { TaskStatus::Failed };
                inner.end(id, status, Some(error), now)?
            }
            Finish::Retryable(error) => {
                let app = entry.record.app.clone();
                let running = inner.running_mut(&app);
                *running = running.saturating_sub(1);
                inner.requeue(id, error)
            }
        };
        self.update(entry);
        let ended = Ended { record: entry.record.clone(), output: entry.output.clone() };
        if ended.record.status.is_terminal() && !ended.record.durable {
            inner.remove(id);
        }
        Some(ended)
    }

    fn cancel(&self, id: &str, why: &str, now: u64) -> Result<Cancelled, QueueError> {
        let mut inner = self.inner.lock().unwrap();
        let status = inner.tasks.get(id).ok_or_else(|| QueueError::UnknownTask(id.to_owned()))?.record.status;
        if status.is_terminal() {
            return Err(QueueError::AlreadyEnded { id: id.to_owned(), status });
        }
        let entry = inner.tasks.get_mut(id).expect("checked above");
        if entry.held {
            // It never started: no attempt spent.
            entry.record.attempts -= 1;
            entry.record.started_at = None;
            entry.held = false;
        }
        let error = TaskError { code: ErrorCode::Cancelled, message: why.to_owned() };
        let entry = inner.end(id, TaskStatus::Cancelled, Some(error), now).expect("checked above");
        self.update(entry);
        let record = entry.record.clone();
        Ok(if status == TaskStatus::Running { Cancelled::Running(record) } else { Cancelled::Queued(record) })
    }

    fn abandon(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap();
        // Out of its queue, or off the running count.
        if inner.tasks.get(id).is_some_and(|entry| !entry.record.status.is_terminal()) {
            inner.end(id, TaskStatus::Cancelled, None, 0);
        }
        if let Some(entry) = inner.remove(id)
            && let Some(journal) = self.journal.as_ref().filter(|_| entry.record.durable)
        {
            journal.delete(entry.record.id);
        }
    }

    fn get(&self, id: &str) -> Option<TaskRecord> {
        self.inner.lock().unwrap().tasks.get(id).map(|entry| entry.record.clone())
    }

    fn output(&self, id: &str) -> Option<Bytes> {
        self.inner.lock().unwrap().tasks.get(id)?.output.clone()
    }

    fn forget(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner.tasks.get(id).is_some_and(|entry| entry.record.status.is_terminal()) {
            let entry = inner.remove(id).expect("checked above");
            if let Some(journal) = self.journal.as_ref().filter(|_| entry.record.durable) {
                journal.delete(entry.record.id);
            }
        }
    }

    fn counts(&self, app: &str) -> Counts {
        let inner = self.inner.lock().unwrap();
        Counts {
            queued: inner.queued.get(app).map_or(0, |queue| queue.len() as u64),
            running: inner.running.get(app).copied().unwrap_or(0),
        }
    }

    fn list(&self, app: &str, status: Option<TaskStatus>, before: Option<&str>, limit: usize) -> Vec<TaskRecord> {
        let inner = self.inner.lock().unwrap();
        let mut records: Vec<TaskRecord> = inner
            .tasks
            .values()
            .filter(|entry| entry.record.app == app && status.is_none_or(|status| entry.record.status == status))
            .filter(|entry| before.is_none_or(|before| entry.record.id.as_str() < before))
            .map(|entry| entry.record.clone())
            .collect();
        // Ids are time-ordered (UUIDv7): newest first.
        records.sort_by(|a, b| b.id.cmp(&a.id));
        records.truncate(limit);
        records
    }

    fn sweep(&self, now: u64) -> Vec<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let forget: Vec<String> = inner
            .tasks
            .values()
            // A task whose callback is not delivered yet is kept (and
            // journaled) until it is: a restart must still find it to send.
            .filter(|entry| {
                !entry.callback_pending()
                    && entry.record.ended_at.is_some_and(|ended| now.saturating_sub(ended) >= millis(entry.result_ttl))
            })
            .map(|entry| entry.record.id.clone())
            .collect();
        for id in forget {
            let durable = inner.remove(&id).is_some_and(|entry| entry.record.durable);
            if let Some(journal) = self.journal.as_ref().filter(|_| durable) {
                journal.delete(id);
            }
        }
        let expired: Vec<String> = inner
            .tasks
            .values()
            // `ttl` bounds the wait for a first run: a task that has run
            // (a retry, or one the node's crash interrupted) is not dropped.
            .filter(|entry| entry.record.status == TaskStatus::Pending && entry.expires_at <= now)
            .map(|entry| entry.record.id.clone())
            .collect();
        expired
            .iter()
            .filter_map(|id| {
                let message = "the task waited in the queue past its ttl".into();
                let entry =
                    inner.end(id, TaskStatus::Expired, Some(TaskError { code: ErrorCode::Expired, message }), now)?;
                self.update(entry);
                Some(entry.record.clone())
            })
            .collect()
    }

    fn end_queued(&self, app: &str, which: Queued, status: TaskStatus, error: TaskError, now: u64) -> Vec<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let queued: Vec<String> = inner.queued.remove(app).map(Vec::from).unwrap_or_default();
        let (kept, queued): (Vec<String>, Vec<String>) =
            // Every call here was taken here: one node.
            queued.into_iter().partition(|id| which != Queued::All && inner.tasks.get(id).is_some_and(|e| e.record.durable));
        if !kept.is_empty() {
            inner.queued.insert(app.to_owned(), kept.into());
        }
        queued
            .iter()
            .filter_map(|id| {
                let entry = inner.end(id, status, Some(error.clone()), now)?;
                self.update(entry);
                Some(entry.record.clone())
            })
            .collect()
    }

    fn saves(&self) -> bool {
        self.journal.as_ref().is_none_or(|journal| !journal.is_failing())
    }

    fn sync(&self) -> oneshot::Receiver<()> {
        match &self.journal {
            Some(journal) => journal.sync(),
            None => {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(());
                rx
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{ScratchStore, new_task_id, sample_task, trapped};

    fn task(retries: u32) -> NewTask {
        sample_task(retries, 2)
    }

    /// Waits until everything `q` changed is on disk.
    fn synced(q: &EmbeddedQueue) {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(q.sync()).unwrap();
    }

    #[test]
    fn an_abandoned_task_is_gone_and_stays_gone() {
        let store = ScratchStore::new("queue-abandon");
        let path = store.path();
        {
            let q = EmbeddedQueue::open(&path, 0).unwrap();
            let mut t = task(0);
            t.max_queued = 10;
            let queued = q.enqueue(NewTask { id: new_task_id(), ..t.clone() }, 0).unwrap().id;
            let running = q.enqueue(NewTask { id: new_task_id(), ..t }, 0).unwrap().id;
            assert_eq!(q.lease("a", 1).unwrap().id, queued);
            q.abandon(&queued);
            q.abandon(&running);
            assert_eq!(q.counts("a"), Counts::default());
            assert!(q.get(&queued).is_none() && q.get(&running).is_none());
            assert!(q.finish(&queued, Finish::Complete(Bytes::new()), 2).is_none(), "its run's end is ignored");
            synced(&q);
        }
        let q = EmbeddedQueue::open(&path, 3).unwrap();
        assert!(q.list("a", None, None, 10).is_empty(), "not run again after a restart");
    }

    #[test]
    fn results_kept_count_until_forgotten() {
        let q = EmbeddedQueue::in_memory().with_budget(14);
        let id = q.enqueue(task(0), 0).unwrap().id;
        q.lease("a", 1).unwrap();
        q.finish(&id, Finish::Complete(Bytes::from_static(b"12345678")), 2).unwrap();
        // Its 8-byte result is kept: a 7-byte input no longer fits beside it.
        assert!(matches!(q.enqueue(task(0), 3), Err(QueueError::NodeFull { held: 8, .. })));
        q.forget(&id);
        q.enqueue(task(0), 4).unwrap();
    }

    #[test]
    fn inputs_held_past_the_node_budget_are_refused_until_tasks_end() {
        // Each sample input is 7 bytes: room for two.
        let q = EmbeddedQueue::in_memory().with_budget(14);
        let first = q.enqueue(task(1), 0).unwrap().id;
        q.enqueue(task(1), 0).unwrap();
        let Err(error) = q.enqueue(task(1), 0) else { panic!("a third input is past the budget") };
        assert!(matches!(error, QueueError::NodeFull { held: 14, budget: 14 }), "{error}");
        assert!(error.to_string().contains("serve --max-task-bytes"), "{error}");
        // A retry keeps its input; an end gives it back.
        q.lease("a", 1).unwrap();
        q.finish(&first, trapped(), 2).unwrap();
        assert!(q.enqueue(task(1), 3).is_err(), "a retried task still holds its input");
        q.lease("a", 4).unwrap();
        q.finish(&first, Finish::Complete(Bytes::new()), 5).unwrap();
        q.enqueue(task(1), 6).unwrap();
    }

    #[test]
    fn lifecycle_with_retries() {
        let q = EmbeddedQueue::in_memory();
        let id = q.enqueue(task(1), 0).unwrap().id;
        assert_eq!(q.counts("a"), Counts { queued: 1, running: 0 });
        let lease = q.lease("a", 1).unwrap();
        assert_eq!(lease.attempt, 1);
        assert_eq!(q.counts("a"), Counts { queued: 0, running: 1 });
        assert_eq!(q.finish(&id, trapped(), 2).unwrap().record.status, TaskStatus::Retry);
        assert_eq!(q.lease("a", 3).unwrap().attempt, 2);
        let record = q.finish(&id, trapped(), 4).unwrap().record;
        assert_eq!((record.status, record.attempts), (TaskStatus::Failed, 2));
        assert_eq!(q.counts("a"), Counts::default());
        assert!(q.finish(&id, Finish::Complete(Bytes::new()), 5).is_none(), "an ended task stays ended");
    }

    #[test]
    fn full_queue_is_refused() {
        let q = EmbeddedQueue::in_memory();
        q.enqueue(task(0), 0).unwrap();
        q.enqueue(task(0), 0).unwrap();
        assert!(matches!(q.enqueue(task(0), 0), Err(QueueError::Full { limit: 2, .. })));
    }

    #[test]
    fn expiry_cancel_and_retention() {
        let q = EmbeddedQueue::in_memory();
        let a = q.enqueue(task(0), 0).unwrap().id;
        let b = q.enqueue(task(0), 0).unwrap().id;
        assert!(matches!(q.cancel(&b, "no", 1), Ok(Cancelled::Queued(_))));
        assert!(matches!(q.cancel(&b, "no", 1), Err(QueueError::AlreadyEnded { .. })));
        let expired = q.sweep(10_000);
        assert_eq!(expired.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![a.as_str()]);
        assert_eq!(q.get(&a).unwrap().status, TaskStatus::Expired);
        assert!(q.lease("a", 10_001).is_none());
        assert_eq!(q.list("a", Some(TaskStatus::Cancelled), None, 10).len(), 1);
        let newest = q.list("a", None, None, 1);
        assert_eq!(newest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![b.as_str()]);
        let next = q.list("a", None, Some(&b), 10);
        assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![a.as_str()], "the page after b");
        q.sweep(200_000);
        assert!(q.get(&a).is_none() && q.get(&b).is_none(), "finished tasks are forgotten after their result ttl");
    }

    #[test]
    fn ttl_bounds_only_the_wait_for_a_first_run() {
        let q = EmbeddedQueue::in_memory();
        let ran = q.enqueue(task(1), 0).unwrap().id;
        q.lease("a", 1).unwrap();
        q.finish(&ran, trapped(), 2).unwrap();
        let waiting = q.enqueue(task(1), 0).unwrap().id;
        let expired: Vec<_> = q.sweep(10_000).into_iter().map(|r| r.id).collect();
        assert_eq!(expired, vec![waiting], "the retry of a task that ran is kept");
        assert_eq!(q.get(&ran).unwrap().status, TaskStatus::Retry);
    }

    #[test]
    fn a_result_whose_callback_is_pending_outlives_its_result_ttl() {
        let q = EmbeddedQueue::in_memory();
        let mut t = task(0);
        t.callback_url = Some("http://127.0.0.1:9/hook".into());
        let id = q.enqueue(t, 0).unwrap().id;
        q.lease("a", 1).unwrap();
        q.finish(&id, Finish::Complete(Bytes::from_static(b"out")), 2).unwrap();
        q.sweep(200_000);
        assert!(q.get(&id).is_some(), "kept (and journaled) until delivered");
        assert_eq!(q.get(&id).unwrap().callback, Some(CallbackState::Pending));
        q.callback_settled(&id, true);
        assert_eq!(q.get(&id).unwrap().callback, Some(CallbackState::Delivered));
        q.sweep(200_001);
        assert!(q.get(&id).is_none(), "then forgotten");
    }

    #[test]
    fn timeout_on_last_attempt_ends_as_timeout() {
        let q = EmbeddedQueue::in_memory();
        let id = q.enqueue(task(0), 0).unwrap().id;
        q.lease("a", 0).unwrap();
        let error = TaskError { code: ErrorCode::Timeout, message: "slow".into() };
        assert_eq!(q.finish(&id, Finish::Retryable(error), 1).unwrap().record.status, TaskStatus::Timeout);
    }

    #[test]
    fn reopening_restores_queued_requeues_running_and_keeps_results() {
        let store = ScratchStore::new("queue-test");
        let path = store.path();
        let (done, running, spent, queued);
        {
            let q = EmbeddedQueue::open(&path, 0).unwrap();
            let mut t = task(1);
            t.max_queued = 10;
            let fresh = |t: &NewTask| NewTask { id: new_task_id(), ..t.clone() };
            done = q.enqueue(fresh(&t), 0).unwrap().id;
            running = q.enqueue(fresh(&t), 1).unwrap().id;
            spent = q.enqueue(NewTask { retries: 0, ..fresh(&t) }, 2).unwrap().id;
            queued = q.enqueue(fresh(&t), 3).unwrap().id;
            q.lease("a", 4).unwrap();
            q.finish(&done, Finish::Complete(Bytes::from_static(b"out")), 5).unwrap();
            q.lease("a", 6).unwrap();
            q.lease("a", 7).unwrap();
            synced(&q);
        }
        let q = EmbeddedQueue::open(&path, 100).unwrap();
        assert_eq!(q.get(&done).unwrap().status, TaskStatus::Complete);
        assert_eq!(q.output(&done).unwrap(), Bytes::from_static(b"out"));
        let requeued = q.get(&running).unwrap();
        assert_eq!((requeued.status, requeued.attempts), (TaskStatus::Retry, 1));
        assert_eq!(q.get(&spent).unwrap().status, TaskStatus::Failed, "no retries left");
        assert_eq!(q.counts("a"), Counts { queued: 2, running: 0 });
        let next = q.lease("a", 101).unwrap();
        assert_eq!((next.id.as_str(), next.attempt, next.input.as_ref()), (running.as_str(), 2, &br#"{"x":1}"#[..]));
        assert_eq!(q.lease("a", 102).unwrap().id, queued);
    }

    #[test]
    fn an_undelivered_callback_survives_a_restart_until_settled() {
        let store = ScratchStore::new("queue-callback");
        let path = store.path();
        let id;
        {
            let q = EmbeddedQueue::open(&path, 0).unwrap();
            let mut t = task(0);
            t.callback_url = Some("http://127.0.0.1:9/hook".into());
            id = q.enqueue(t, 0).unwrap().id;
            q.enqueue(task(0), 0).unwrap();
            assert!(q.pending_callbacks().is_empty(), "nothing to deliver before the end");
            q.lease("a", 1).unwrap();
            q.finish(&id, Finish::Complete(Bytes::from_static(b"out")), 2).unwrap();
            synced(&q);
        }
        {
            let q = EmbeddedQueue::open(&path, 3).unwrap();
            let pending = q.pending_callbacks();
            assert_eq!(pending.len(), 1, "only the task with a callback URL");
            assert_eq!((pending[0].0.id.as_str(), pending[0].1.as_deref()), (id.as_str(), Some(&b"out"[..])));
            q.callback_settled(&id, false);
            synced(&q);
        }
        let q = EmbeddedQueue::open(&path, 4).unwrap();
        assert!(q.pending_callbacks().is_empty(), "a settled callback is not sent again");
        let record = q.get(&id).unwrap();
        assert_eq!((record.status, record.callback), (TaskStatus::Complete, Some(CallbackState::Failed)), "journaled");
    }

    #[test]
    fn a_task_leased_ahead_counts_as_started_only_once_it_starts() {
        let store = ScratchStore::new("queue-ahead");
        let path = store.path();
        let (started, waiting);
        {
            let q = EmbeddedQueue::open(&path, 0).unwrap();
            let mut t = task(0);
            t.max_queued = 10;
            started = q.enqueue(NewTask { id: new_task_id(), ..t.clone() }, 0).unwrap().id;
            waiting = q.enqueue(NewTask { id: new_task_id(), ..t.clone() }, 0).unwrap().id;
            assert_eq!(q.lease_ahead("a", 1).unwrap().attempt, 1);
            assert_eq!(q.lease_ahead("a", 1).unwrap().attempt, 1);
            assert_eq!(q.counts("a"), Counts { queued: 0, running: 2 });
            q.started(&started, 2);
            synced(&q);
        }
        // The node died: the started task had its one attempt; the other never ran.
        let q = EmbeddedQueue::open(&path, 100).unwrap();
        assert_eq!(q.get(&started).unwrap().status, TaskStatus::Failed, "no retries left");
        let record = q.get(&waiting).unwrap();
        assert_eq!((record.status, record.attempts), (TaskStatus::Pending, 0));

        // A replica lost with it still waiting: back first in line, no attempt spent.
        let mut t = task(0);
        t.max_queued = 10;
        let later = q.enqueue(t, 101).unwrap().id;
        assert_eq!(q.lease_ahead("a", 102).unwrap().id, waiting);
        let record = q.release(&waiting).unwrap();
        assert_eq!((record.status, record.attempts, record.started_at), (TaskStatus::Pending, 0, None));
        assert_eq!(q.counts("a"), Counts { queued: 2, running: 0 });
        assert_eq!(q.lease("a", 103).unwrap().id, waiting);
        assert_eq!(q.lease("a", 104).unwrap().id, later);
        assert!(q.release(&later).is_some_and(|r| r.status == TaskStatus::Pending));
        assert!(q.finish(&waiting, Finish::Cancelled, 105).is_some());
        assert!(q.release(&waiting).is_none(), "an ended task is not released");

        // Cancelled while waiting in a replica: it never ran.
        assert_eq!(q.lease_ahead("a", 107).unwrap().id, later);
        let Ok(Cancelled::Running(record)) = q.cancel(&later, "cancelled", 108) else { panic!("held: a run") };
        assert_eq!((record.status, record.attempts, record.started_at), (TaskStatus::Cancelled, 0, None));
    }
}
