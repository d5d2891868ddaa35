//! The durable half of the embedded queue: every change to a task is written
//! to SQLite (WAL) by one writer thread that commits whatever has piled up in
//! one transaction (group commit), so durability costs one fsync per batch,
//! not per task.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::oneshot;

use super::CallbackState;

/// One task as stored.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskRow {
    pub id: String,
    pub app: String,
    pub status: String,
    pub attempts: u32,
    pub retries: u32,
    pub timeout_ms: u64,
    pub result_ttl_ms: u64,
    pub max_result_size: u64,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub expires_at: u64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub input: Bytes,
    pub output: Option<Bytes>,
    pub callback_url: Option<String>,
    /// Where its callback stands once it ended (the column
    /// `callback_pending` keeps [`CallbackState::code`]).
    pub callback: Option<CallbackState>,
}

enum Op {
    /// A new task, with its input.
    Insert(TaskRow),
    /// A changed task; its input is not rewritten.
    Update(TaskRow),
    Delete(String),
    /// Answered once everything sent before it is committed.
    Sync(oneshot::Sender<()>),
}

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 8192;

pub(crate) struct Journal {
    ops: mpsc::Sender<Op>,
    /// The last commit failed (and none went through since).
    failing: Arc<AtomicBool>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    result_ttl_ms INTEGER NOT NULL,
    max_result_size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    expires_at INTEGER NOT NULL,
    error_code TEXT,
    error_message TEXT,
    input BLOB NOT NULL,
    output BLOB,
    callback_url TEXT,
    callback_pending INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";
const SCHEMA_VERSION: &str = "2";

impl Journal {
    /// Opens (or creates) the store at `path` and returns every stored task.
    pub(crate) fn open(path: &Path) -> Result<(Self, Vec<TaskRow>)> {
        let conn = Connection::open(path).with_context(|| format!("failed to open the task store {path:?}"))?;
        let rows = prepare(&conn, path).map_err(|e| match e.downcast_ref::<rusqlite::Error>() {
            // SQLite's own words ("file is not a database") name no file.
            Some(_) => e.context(format!(
                "the task store {path:?} cannot be read; if it is damaged, move it (and its -wal and -shm files) \
                 aside: the node then starts with an empty queue"
            )),
            None => e,
        })?;
        let (ops, rx) = mpsc::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let writer_failing = failing.clone();
        std::thread::Builder::new()
            .name("task-store".into())
            .spawn(move || write_loop(conn, rx, &writer_failing))
            .context("failed to start the task store writer")?;
        Ok((Self { ops, failing }, rows))
    }

    /// Whether the store's last commit failed (a full disk): it saves no
    /// change now, so the node takes no new work.
    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub(crate) fn insert(&self, row: TaskRow) {
        let _ = self.ops.send(Op::Insert(row));
    }

    pub(crate) fn update(&self, row: TaskRow) {
        let _ = self.ops.send(Op::Update(row));
    }

    pub(crate) fn delete(&self, id: String) {
        let _ = self.ops.send(Op::Delete(id));
    }

    /// Resolves once every change sent so far is committed; an error if the
    /// store could not commit it.
    pub(crate) fn sync(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.ops.send(Op::Sync(tx));
        rx
    }
}

/// Sets the store up (WAL, schema, upgrades) and reads every task in it.
fn prepare(conn: &Connection, path: &Path) -> Result<Vec<TaskRow>> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk when it returns; group commit pays for it.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA).context("failed to create the task store schema")?;
    let version: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| row.get(0)).optional()?;
    match version.as_deref() {
        None => {
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?1)", [SCHEMA_VERSION])?;
        }
        Some(SCHEMA_VERSION) => {}
        // Version 1 had no record of undelivered callbacks.
        Some("1") => {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(
                "ALTER TABLE tasks ADD COLUMN callback_pending INTEGER NOT NULL DEFAULT 0;
                 UPDATE meta SET value = '2' WHERE key = 'schema';",
            )?;
            tx.commit().with_context(|| format!("failed to upgrade the task store {path:?}"))?;
        }
        Some(other) => {
            anyhow::bail!("the task store {path:?} has schema {other}, this beamlet reads {SCHEMA_VERSION}")
        }
    }
    load(conn)
}

fn load(conn: &Connection) -> Result<Vec<TaskRow>> {
    let mut statement = conn.prepare(
        "SELECT id, app, status, attempts, retries, timeout_ms, result_ttl_ms, max_result_size, created_at,
                started_at, ended_at, expires_at, error_code, error_message, input, output, callback_url,
                callback_pending
         FROM tasks ORDER BY created_at, id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(TaskRow {
            id: row.get(0)?,
            app: row.get(1)?,
            status: row.get(2)?,
            attempts: row.get(3)?,
            retries: row.get(4)?,
            timeout_ms: row.get(5)?,
            result_ttl_ms: row.get(6)?,
            max_result_size: row.get(7)?,
            created_at: row.get(8)?,
            started_at: row.get(9)?,
            ended_at: row.get(10)?,
            expires_at: row.get(11)?,
            error_code: row.get(12)?,
            error_message: row.get(13)?,
            input: Bytes::from(row.get::<_, Vec<u8>>(14)?),
            output: row.get::<_, Option<Vec<u8>>>(15)?.map(Bytes::from),
            callback_url: row.get(16)?,
            callback: CallbackState::from_code(row.get(17)?),
        })
    })?;
    rows.collect::<rusqlite::Result<_>>().context("failed to read the task store")
}

/// How long a failed commit waits before it is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Changes a failed commit left unsaved, kept in order and tried again with
/// every later commit: a sync answers only once everything sent before it
/// is on disk, so a write lost to a full disk is never acknowledged, and the
/// ends of runs are saved once there is room again.
#[derive(Default)]
struct Unsaved {
    ops: Vec<Op>,
    /// Failed commits since the last that went through, and when the last
    /// was logged.
    failures: u64,
    logged: Option<Instant>,
    said_failing: bool,
}

impl Unsaved {
    /// Adds a change; a deleted task's earlier changes that never reached
    /// the disk are dropped with it (its delete still runs: an older row
    /// may be there).
    fn push(&mut self, op: Op) {
        if let Op::Delete(id) = &op {
            self.ops.retain(|kept| !matches!(kept, Op::Insert(row) | Op::Update(row) if row.id == *id));
        }
        self.ops.push(op);
    }

    fn failed(&mut self, error: &anyhow::Error) {
        self.failures += 1;
        // Said at once, then at most every half minute (a full disk fails
        // many commits, and refused submits end each such run of failures).
        if self.logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
            tracing::error!(
                "failed to write to the task store: {error:#} ({} changes wait to be saved, tried again every \
                 {RETRY_EVERY:?}; {})",
                self.ops.len(),
                super::STORE_HINT
            );
            self.logged = Some(Instant::now());
            self.said_failing = true;
        }
    }

    /// Everything kept is on disk now.
    fn saved(&mut self) {
        // Said once for each failure said, when what waited was more than
        // the removal of refused submits (whose inserts never went in): the
        // disk that refused them may still refuse the next change. Once
        // said, the next failure is said at once.
        let changes = self.ops.iter().filter(|op| !matches!(op, Op::Delete(_))).count();
        if self.said_failing && changes > 0 {
            match self.failures {
                0 => tracing::info!("the task store saves its changes again"),
                failures => {
                    tracing::info!("the task store saved the {changes} changes that waited ({failures} failed tries)")
                }
            }
            self.said_failing = false;
            self.logged = None;
        }
        self.failures = 0;
        self.ops.clear();
    }
}

fn write_loop(mut conn: Connection, ops: mpsc::Receiver<Op>, failing: &AtomicBool) {
    let mut unsaved = Unsaved::default();
    loop {
        let first = if unsaved.ops.is_empty() {
            ops.recv().ok()
        } else {
            match ops.recv_timeout(RETRY_EVERY) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let closed = first.is_none() && unsaved.ops.is_empty();
        if closed {
            return;
        }
        let mut syncs = Vec::new();
        for op in first.into_iter().chain(std::iter::from_fn(|| ops.try_recv().ok())).take(MAX_BATCH) {
            match op {
                Op::Sync(sync) => syncs.push(sync),
                change => unsaved.push(change),
            }
        }
        let committed = commit(&mut conn, &unsaved.ops);
        failing.store(committed.is_err(), Ordering::Relaxed);
        match committed {
            Ok(()) => {
                unsaved.saved();
                for sync in syncs {
                    let _ = sync.send(());
                }
            }
            // Dropping the syncs tells their waiters the write failed; the
            // changes stay for the next try.
            Err(e) => unsaved.failed(&e),
        }
    }
}

fn commit(conn: &mut Connection, changes: &[Op]) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO tasks (id, app, status, attempts, retries, timeout_ms, result_ttl_ms,
                 max_result_size, created_at, started_at, ended_at, expires_at, error_code, error_message, input, output,
                 callback_url, callback_pending)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        )?;
        let mut update = tx.prepare_cached(
            "UPDATE tasks SET status = ?2, attempts = ?3, started_at = ?4, ended_at = ?5, error_code = ?6,
                 error_message = ?7, output = ?8, input = CASE WHEN ?9 THEN x'' ELSE input END,
                 callback_pending = ?10
             WHERE id = ?1",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM tasks WHERE id = ?1")?;
        for op in changes {
            match op {
                Op::Insert(r) => {
                    insert.execute(params![
                        r.id,
                        r.app,
                        r.status,
                        r.attempts,
                        r.retries,
                        int(r.timeout_ms),
                        int(r.result_ttl_ms),
                        int(r.max_result_size),
                        int(r.created_at),
                        r.started_at.map(int),
                        r.ended_at.map(int),
                        int(r.expires_at),
                        r.error_code,
                        r.error_message,
                        r.input.as_ref(),
                        r.output.as_deref(),
                        r.callback_url,
                        CallbackState::code(r.callback),
                    ])?;
                }
                Op::Update(r) => {
                    // A task that ended no longer needs its input.
                    let drop_input = r.ended_at.is_some();
                    update.execute(params![
                        r.id,
                        r.status,
                        r.attempts,
                        r.started_at.map(int),
                        r.ended_at.map(int),
                        r.error_code,
                        r.error_message,
                        r.output.as_deref(),
                        drop_input,
                        CallbackState::code(r.callback),
                    ])?;
                }
                Op::Delete(id) => {
                    delete.execute([id])?;
                }
                Op::Sync(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// A time or size as SQLite keeps it (a signed 64-bit integer): one too
/// large to be meant is kept as the largest, never refused, since a change
/// the store cannot take would fail every commit after it.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_a_failed_commit_left_are_saved_by_the_next_and_no_sync_answers_before() {
        let store = crate::queue::ScratchStore::new("store-retry");
        let path = store.path();
        let (journal, _) = Journal::open(&path).unwrap();
        let row =
            |status: &str| TaskRow { id: "t1".into(), app: "a".into(), status: status.into(), ..TaskRow::default() };
        // Another writer holds the store: the journal's commits fail (after
        // SQLite's busy wait), as they would on a full disk.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        journal.insert(row("PENDING"));
        assert!(journal.sync().blocking_recv().is_err(), "not saved: the submit is refused");
        assert!(journal.is_failing());
        journal.update(row("COMPLETE"));
        blocker.execute_batch("COMMIT").unwrap();
        // The insert that failed is saved with the next commit, before its sync answers.
        assert!(journal.sync().blocking_recv().is_ok());
        assert!(!journal.is_failing());
        let (_, rows) = Journal::open(&path).unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id.as_str(), r.status.as_str())).collect::<Vec<_>>(),
            vec![("t1", "COMPLETE")]
        );

        // A task refused, then deleted, before any commit went through: nothing of it is written.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        journal.insert(TaskRow { id: "t2".into(), ..row("PENDING") });
        assert!(journal.sync().blocking_recv().is_err());
        journal.delete("t2".into());
        blocker.execute_batch("COMMIT").unwrap();
        assert!(journal.sync().blocking_recv().is_ok());
        let (_, rows) = Journal::open(&path).unwrap();
        assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["t1"]);

        // Times past what SQLite's integers hold are kept as the largest, not refused.
        journal.insert(TaskRow { id: "t3".into(), expires_at: u64::MAX, timeout_ms: u64::MAX, ..row("PENDING") });
        assert!(journal.sync().blocking_recv().is_ok());
    }

    #[test]
    fn a_version_1_store_is_upgraded_in_place() {
        let store = crate::queue::ScratchStore::new("store-v1");
        let path = store.path();
        {
            let conn = Connection::open(&path).unwrap();
            let v1 = SCHEMA.replace(",\n    callback_pending INTEGER NOT NULL DEFAULT 0", "");
            assert!(!v1.contains("callback_pending"));
            conn.execute_batch(&v1).unwrap();
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')", []).unwrap();
            conn.execute(
                "INSERT INTO tasks (id, app, status, attempts, retries, timeout_ms, result_ttl_ms, max_result_size,
                     created_at, expires_at, input, callback_url)
                 VALUES ('t1', 'a', 'COMPLETE', 1, 0, 1000, 1000, 10, 0, 10, x'', 'http://127.0.0.1:9/')",
                [],
            )
            .unwrap();
        }
        let (_journal, rows) = Journal::open(&path).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].callback, None, "tasks of a version 1 store have no pending callback");
        let conn = Connection::open(&path).unwrap();
        let version: String = conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
