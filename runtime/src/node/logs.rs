//! Recent guest output per app, for `beamlet logs`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Lines kept per app; older ones are dropped.
const LINES_PER_APP: usize = 2000;

#[derive(Default)]
pub(crate) struct AppLogs {
    apps: Mutex<HashMap<String, VecDeque<String>>>,
}

impl AppLogs {
    pub(crate) fn push(&self, app: &str, line: String) {
        let mut apps = self.apps.lock().unwrap();
        let lines = apps.entry(app.to_owned()).or_default();
        if lines.len() == LINES_PER_APP {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// Records a guest's stdout and stderr, one line each, tagged with `source`.
    pub(crate) fn capture(&self, app: &str, source: &str, stdout: &[u8], stderr: &[u8]) {
        for (stream, bytes) in [("stdout", stdout), ("stderr", stderr)] {
            for line in String::from_utf8_lossy(bytes).lines() {
                tracing::debug!(app, "[{source} {stream}] {line}");
                self.push(app, format!("[{source} {stream}] {line}"));
            }
        }
    }

    pub(crate) fn tail(&self, app: &str, lines: usize) -> Vec<String> {
        let apps = self.apps.lock().unwrap();
        let Some(all) = apps.get(app) else { return Vec::new() };
        all.iter().skip(all.len().saturating_sub(lines)).cloned().collect()
    }

    pub(crate) fn remove(&self, app: &str) {
        self.apps.lock().unwrap().remove(app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_splits_lines_and_tail_keeps_the_newest() {
        let logs = AppLogs::default();
        logs.capture("a", "task 1", b"one\ntwo\n", b"oops\n");
        assert_eq!(logs.tail("a", 2), vec!["[task 1 stdout] two", "[task 1 stderr] oops"]);
        for i in 0..LINES_PER_APP {
            logs.push("a", i.to_string());
        }
        assert_eq!(logs.tail("a", LINES_PER_APP).len(), LINES_PER_APP);
        assert_eq!(logs.tail("a", 1), vec![(LINES_PER_APP - 1).to_string()]);
    }
}
