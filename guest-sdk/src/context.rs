use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::__bindings;

/// Who is running the current task, and until when.
///
/// Passed by reference to every handler. The runtime fills it in per task;
/// in unit tests of your own handler, build one with a struct literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The task's id, as returned by the API in `x-beamlet-task-id`.
    pub task_id: String,
    /// 1 for the first run of the task; retries count up from there.
    pub attempt: u32,
    /// The app's name, as given to `beamlet deploy --name`.
    pub app: String,
    /// The replica (process) running the task.
    pub replica: String,
    /// The worker (wasm instance) within the replica, counting from 0.
    pub worker: u32,
    /// The moment after which the runtime stops the task (`TIMEOUT`).
    pub deadline: SystemTime,
}

impl Context {
    /// Time left before [`Context::deadline`]; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
    }
}

impl From<__bindings::Context> for Context {
    fn from(ctx: __bindings::Context) -> Self {
        Context {
            task_id: ctx.task_id,
            attempt: ctx.attempt,
            app: ctx.app,
            replica: ctx.replica,
            worker: ctx.worker,
            deadline: UNIX_EPOCH + Duration::from_millis(ctx.deadline_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_comes_from_unix_millis() {
        let ctx = Context::from(__bindings::Context {
            task_id: "t".into(),
            attempt: 1,
            app: "a".into(),
            replica: "r".into(),
            worker: 0,
            deadline_ms: 1_500,
        });
        assert_eq!(ctx.deadline, UNIX_EPOCH + Duration::from_millis(1_500));
        assert_eq!(ctx.remaining(), Duration::ZERO, "a deadline in 1970 has passed");
    }

    #[test]
    fn remaining_counts_down_to_a_future_deadline() {
        let ctx = Context {
            task_id: "t".into(),
            attempt: 1,
            app: "a".into(),
            replica: "r".into(),
            worker: 0,
            deadline: SystemTime::now() + Duration::from_secs(60),
        };
        let left = ctx.remaining();
        assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60), "{left:?}");
    }
}
