//! The in-process queue: the lifecycle rules with nothing durable under them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Cancelled, Counts, ErrorCode, Finish, Lease, NewTask, Queue, QueueError, TaskError, TaskRecord, TaskStatus,
    new_task_id,
};

#[derive(Default)]
pub(crate) struct MemoryQueue {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<String, Entry>,
    /// Queued task ids per app, oldest first.
    queued: HashMap<String, VecDeque<String>>,
    running: HashMap<String, u64>,
}

struct Entry {
    record: TaskRecord,
    input: Bytes,
    output: Option<Bytes>,
    retries: u32,
    timeout: Duration,
    /// When a still-queued task expires (ms).
    expires_at: u64,
}

impl Inner {
    fn running_mut(&mut self, app: &str) -> &mut u64 {
        self.running.entry(app.to_owned()).or_default()
    }

    fn end(&mut self, id: &str, status: TaskStatus, error: Option<TaskError>, now: u64) -> Option<TaskRecord> {
        let entry = self.tasks.get_mut(id)?;
        let was_running = entry.record.status == TaskStatus::Running;
        entry.record.status = status;
        entry.record.error = error;
        entry.record.ended_at = Some(now);
        entry.input = Bytes::new();
        let record = entry.record.clone();
        if was_running {
            let running = self.running_mut(&record.app);
            *running = running.saturating_sub(1);
        } else if let Some(queue) = self.queued.get_mut(&record.app) {
            queue.retain(|queued| queued != id);
        }
        Some(record)
    }
}

impl Queue for MemoryQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> Result<TaskRecord, QueueError> {
        let mut inner = self.inner.lock().unwrap();
        let queue = inner.queued.entry(task.app.clone()).or_default();
        if queue.len() >= task.max_queued as usize {
            return Err(QueueError::Full { app: task.app, limit: task.max_queued });
        }
        let id = new_task_id();
        queue.push_back(id.clone());
        let record = TaskRecord {
            id: id.clone(),
            app: task.app,
            status: TaskStatus::Pending,
            attempts: 0,
            created_at: now,
            started_at: None,
            ended_at: None,
            error: None,
        };
        let expires_at = now.saturating_add(u64::try_from(task.ttl.as_millis()).unwrap_or(u64::MAX));
        let entry = Entry {
            record: record.clone(),
            input: task.input,
            output: None,
            retries: task.retries,
            timeout: task.timeout,
            expires_at,
        };
        inner.tasks.insert(id, entry);
        Ok(record)
    }

    fn lease(&self, app: &str, now: u64) -> Option<Lease> {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.queued.get_mut(app)?.pop_front()?;
        let entry = inner.tasks.get_mut(&id).expect("queued tasks are known");
        entry.record.status = TaskStatus::Running;
        entry.record.attempts += 1;
        entry.record.started_at = Some(now);
        let lease = Lease {
            id,
            app: app.to_owned(),
            input: entry.input.clone(),
            attempt: entry.record.attempts,
            timeout: entry.timeout,
        };
        *inner.running_mut(app) += 1;
        Some(lease)
    }

    fn finish(&self, id: &str, finish: Finish, now: u64) -> Option<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let entry = inner.tasks.get_mut(id)?;
        if entry.record.status != TaskStatus::Running {
            return None;
        }
        match finish {
            Finish::Complete(output) => {
                entry.output = Some(output);
                inner.end(id, TaskStatus::Complete, None, now)
            }
            Finish::Cancelled => {
                let error = TaskError { code: ErrorCode::Cancelled, message: "the task was cancelled".into() };
                inner.end(id, TaskStatus::Cancelled, Some(error), now)
            }
            Finish::Rejected(error) => inner.end(id, TaskStatus::Failed, Some(error), now),
            Finish::Retryable(error) if entry.record.attempts > entry.retries => {
                let status = if error.code == ErrorCode::Timeout { TaskStatus::Timeout } else { TaskStatus::Failed };
                inner.end(id, status, Some(error), now)
            }
            Finish::Retryable(error) => {
                entry.record.status = TaskStatus::Retry;
                entry.record.error = Some(error);
                let record = entry.record.clone();
                let running = inner.running_mut(&record.app);
                *running = running.saturating_sub(1);
                // A retry goes to the front: it has waited longest.
                inner.queued.entry(record.app.clone()).or_default().push_front(record.id.clone());
                Some(record)
            }
        }
    }

    fn cancel(&self, id: &str, now: u64) -> Result<Cancelled, QueueError> {
        let mut inner = self.inner.lock().unwrap();
        let status = inner.tasks.get(id).ok_or_else(|| QueueError::UnknownTask(id.to_owned()))?.record.status;
        if status.is_terminal() {
            return Err(QueueError::AlreadyEnded { id: id.to_owned(), status });
        }
        let error = TaskError { code: ErrorCode::Cancelled, message: "the task was cancelled".into() };
        let record = inner.end(id, TaskStatus::Cancelled, Some(error), now).expect("checked above");
        Ok(if status == TaskStatus::Running { Cancelled::Running(record) } else { Cancelled::Queued(record) })
    }

    fn get(&self, id: &str) -> Option<TaskRecord> {
        self.inner.lock().unwrap().tasks.get(id).map(|entry| entry.record.clone())
    }

    fn output(&self, id: &str) -> Option<Bytes> {
        self.inner.lock().unwrap().tasks.get(id)?.output.clone()
    }

    fn counts(&self, app: &str) -> Counts {
        let inner = self.inner.lock().unwrap();
        Counts {
            queued: inner.queued.get(app).map_or(0, |queue| queue.len() as u64),
            running: inner.running.get(app).copied().unwrap_or(0),
        }
    }

    fn sweep(&self, now: u64, keep_finished: Duration) -> Vec<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let keep_ms = u64::try_from(keep_finished.as_millis()).unwrap_or(u64::MAX);
        inner.tasks.retain(|_, entry| entry.record.ended_at.is_none_or(|ended| now.saturating_sub(ended) < keep_ms));
        let expired: Vec<String> = inner
            .tasks
            .values()
            .filter(|entry| entry.record.status.is_queued() && entry.expires_at <= now)
            .map(|entry| entry.record.id.clone())
            .collect();
        expired
            .iter()
            .filter_map(|id| {
                let error =
                    TaskError { code: ErrorCode::Expired, message: "the task waited in the queue past its ttl".into() };
                inner.end(id, TaskStatus::Expired, Some(error), now)
            })
            .collect()
    }

    fn remove_app(&self, app: &str, now: u64) -> Vec<TaskRecord> {
        let mut inner = self.inner.lock().unwrap();
        let queued: Vec<String> = inner.queued.remove(app).map(Vec::from).unwrap_or_default();
        queued
            .iter()
            .filter_map(|id| {
                let error = TaskError { code: ErrorCode::Cancelled, message: format!("app {app:?} was removed") };
                inner.end(id, TaskStatus::Cancelled, Some(error), now)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(retries: u32) -> NewTask {
        NewTask {
            app: "a".into(),
            input: Bytes::from_static(b"{}"),
            retries,
            timeout: Duration::from_secs(1),
            ttl: Duration::from_secs(10),
            max_queued: 2,
        }
    }

    fn trap() -> Finish {
        Finish::Retryable(TaskError { code: ErrorCode::GuestTrap, message: "boom".into() })
    }

    #[test]
    fn lifecycle_with_retries() {
        let q = MemoryQueue::default();
        let id = q.enqueue(task(1), 0).unwrap().id;
        assert_eq!(q.counts("a"), Counts { queued: 1, running: 0 });
        let lease = q.lease("a", 1).unwrap();
        assert_eq!(lease.attempt, 1);
        assert_eq!(q.counts("a"), Counts { queued: 0, running: 1 });
        assert_eq!(q.finish(&id, trap(), 2).unwrap().status, TaskStatus::Retry);
        assert_eq!(q.lease("a", 3).unwrap().attempt, 2);
        let record = q.finish(&id, trap(), 4).unwrap();
        assert_eq!((record.status, record.attempts), (TaskStatus::Failed, 2));
        assert_eq!(q.counts("a"), Counts::default());
        assert!(q.finish(&id, Finish::Complete(Bytes::new()), 5).is_none(), "an ended task stays ended");
    }

    #[test]
    fn full_queue_is_refused() {
        let q = MemoryQueue::default();
        q.enqueue(task(0), 0).unwrap();
        q.enqueue(task(0), 0).unwrap();
        assert!(matches!(q.enqueue(task(0), 0), Err(QueueError::Full { limit: 2, .. })));
    }

    #[test]
    fn expiry_cancel_and_retention() {
        let q = MemoryQueue::default();
        let a = q.enqueue(task(0), 0).unwrap().id;
        let b = q.enqueue(task(0), 0).unwrap().id;
        assert!(matches!(q.cancel(&b, 1), Ok(Cancelled::Queued(_))));
        let expired = q.sweep(10_000, Duration::from_secs(60));
        assert_eq!(expired.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![a.as_str()]);
        assert_eq!(q.get(&a).unwrap().status, TaskStatus::Expired);
        assert!(q.lease("a", 10_001).is_none());
        q.sweep(200_000, Duration::from_secs(60));
        assert!(q.get(&a).is_none() && q.get(&b).is_none(), "finished tasks are forgotten after retention");
    }

    #[test]
    fn timeout_on_last_attempt_ends_as_timeout() {
        let q = MemoryQueue::default();
        let id = q.enqueue(task(0), 0).unwrap().id;
        q.lease("a", 0).unwrap();
        let error = TaskError { code: ErrorCode::Timeout, message: "slow".into() };
        assert_eq!(q.finish(&id, Finish::Retryable(error), 1).unwrap().status, TaskStatus::Timeout);
    }
}
