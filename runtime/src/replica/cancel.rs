//! Cancellation of runs by the node, whether or not a worker picked them up
//! yet, and runs the node takes back before any worker has.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A worker's "stop the running call" flag: the epoch callback reads it while
/// the guest runs wasm code, and [`CancelFlag::wait`] wakes a call that is
/// blocked in a host function.
#[derive(Default)]
pub(crate) struct CancelFlag {
    set: AtomicBool,
    wake: Notify,
}

impl CancelFlag {
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.set.store(true, Ordering::Relaxed);
        // `notify_one` keeps a permit when nobody waits yet, so a cancel that
        // lands just before the wait starts is not lost.
        self.wake.notify_one();
    }

    pub(crate) fn reset(&self) {
        self.set.store(false, Ordering::Relaxed);
    }

    /// Returns once the flag is set (a permit left over from an earlier run
    /// only makes it look again).
    pub(crate) async fn wait(&self) {
        while !self.is_set() {
            self.wake.notified().await;
        }
    }
}

#[derive(Default)]
pub(crate) struct Cancels {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Runs in a worker now, with the flag its epoch callback watches.
    running: HashMap<u64, Arc<CancelFlag>>,
    /// Runs received and not yet begun, with what befell them meanwhile.
    waiting: HashMap<u64, Option<Early>>,
}

/// What befell a run before a worker took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Early {
    /// It ends `Cancelled` without running.
    Cancelled,
    /// The node took it back: the worker skips it without a word.
    Recalled,
}

impl Cancels {
    /// Run `seq` arrived and waits for a worker.
    pub(crate) fn queued(&self, seq: u64) {
        self.inner.lock().unwrap().waiting.insert(seq, None);
    }

    /// Stops run `seq` if it runs, or keeps it from starting if it waits;
    /// nothing if it has ended.
    pub(crate) fn cancel(&self, seq: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(flag) = inner.running.get(&seq) {
            flag.set();
        } else if let Some(early) = inner.waiting.get_mut(&seq) {
            early.get_or_insert(Early::Cancelled);
        }
    }

    /// Takes run `seq` back if it still waits for a worker: `true` then, and
    /// the worker that comes to it skips it. A run begun, or ended, is not.
    pub(crate) fn recall(&self, seq: u64) -> bool {
        let mut inner = self.inner.lock().unwrap();
        match inner.waiting.get_mut(&seq) {
            Some(early) if *early != Some(Early::Recalled) => {
                *early = Some(Early::Recalled);
                true
            }
            _ => false,
        }
    }

    /// Registers a run about to start; `Err` if it was cancelled or
    /// recalled first.
    pub(crate) fn begin(&self, seq: u64, flag: &Arc<CancelFlag>) -> Result<(), Early> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(early) = inner.waiting.remove(&seq).flatten() {
            return Err(early);
        }
        flag.reset();
        inner.running.insert(seq, flag.clone());
        Ok(())
    }

    pub(crate) fn end(&self, seq: u64) {
        self.inner.lock().unwrap().running.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_before_and_during_a_run() {
        let cancels = Cancels::default();
        let flag = Arc::new(CancelFlag::default());
        cancels.queued(1);
        cancels.cancel(1);
        assert_eq!(cancels.begin(1, &flag), Err(Early::Cancelled), "a run cancelled early never starts");
        assert!(cancels.begin(2, &flag).is_ok());
        cancels.cancel(2);
        assert!(flag.is_set());
        cancels.end(2);
        assert!(cancels.begin(3, &flag).is_ok());
        assert!(!flag.is_set(), "the flag is reset for the next run");
    }

    #[test]
    fn only_a_run_not_yet_begun_is_recalled() {
        let cancels = Cancels::default();
        let flag = Arc::new(CancelFlag::default());
        cancels.queued(1);
        assert!(cancels.recall(1));
        assert!(!cancels.recall(1), "given back once");
        assert_eq!(cancels.begin(1, &flag), Err(Early::Recalled), "a recalled run is skipped");
        cancels.queued(2);
        assert!(cancels.begin(2, &flag).is_ok());
        assert!(!cancels.recall(2), "a run in progress ends as usual");
        cancels.end(2);
        assert!(!cancels.recall(2), "so does one that has ended (its `Done` may not have gone out yet)");
        cancels.cancel(2);
        assert!(cancels.inner.lock().unwrap().waiting.is_empty(), "nothing is kept for a run that ended");
        // A run cancelled while waiting, then recalled, is given back: the
        // node drops it either way, and nobody waits for its `Done`.
        cancels.queued(3);
        cancels.cancel(3);
        assert!(cancels.recall(3));
        assert_eq!(cancels.begin(3, &flag), Err(Early::Recalled));
    }

    #[test]
    fn wait_returns_for_a_cancel_set_before_or_during_the_wait() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cancels = Arc::new(Cancels::default());
        let flag = Arc::new(CancelFlag::default());
        assert!(cancels.begin(1, &flag).is_ok());
        cancels.cancel(1);
        runtime.block_on(flag.wait());
        cancels.end(1);

        assert!(cancels.begin(2, &flag).is_ok());
        let later = std::thread::spawn({
            let cancels = cancels.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                cancels.cancel(2);
            }
        });
        runtime.block_on(flag.wait());
        later.join().unwrap();

        // A permit left by run 2 does not end run 3's wait.
        cancels.end(2);
        assert!(cancels.begin(3, &flag).is_ok());
        let waited =
            runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_millis(20), flag.wait()).await });
        assert!(waited.is_err(), "an uncancelled run keeps waiting");
    }
}
