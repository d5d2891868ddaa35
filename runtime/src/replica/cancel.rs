//! Cancellation of runs by the node, whether or not a worker picked them up yet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub(crate) struct Cancels {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Runs in a worker now, with the flag its epoch callback watches.
    running: HashMap<u64, Arc<AtomicBool>>,
    /// Runs cancelled before a worker took them.
    early: HashSet<u64>,
}

impl Cancels {
    pub(crate) fn cancel(&self, seq: u64) {
        let mut inner = self.inner.lock().unwrap();
        match inner.running.get(&seq) {
            Some(flag) => flag.store(true, Ordering::Relaxed),
            None => {
                inner.early.insert(seq);
            }
        }
    }

    /// Registers a run about to start; `false` if it was already cancelled.
    pub(crate) fn begin(&self, seq: u64, flag: &Arc<AtomicBool>) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if inner.early.remove(&seq) {
            return false;
        }
        flag.store(false, Ordering::Relaxed);
        inner.running.insert(seq, flag.clone());
        true
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
        let flag = Arc::new(AtomicBool::new(false));
        cancels.cancel(1);
        assert!(!cancels.begin(1, &flag), "a run cancelled early never starts");
        assert!(cancels.begin(2, &flag));
        cancels.cancel(2);
        assert!(flag.load(Ordering::Relaxed));
        cancels.end(2);
        assert!(cancels.begin(3, &flag));
        assert!(!flag.load(Ordering::Relaxed), "the flag is reset for the next run");
    }
}
