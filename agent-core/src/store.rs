//! The agent's SQLite file: the only module that writes SQL.
//!
//! One writer thread owns the read-write connection; [`Store`] is a cheap, cloneable handle that
//! sends it typed operations over a bounded channel and awaits each reply on a oneshot. SQLite is
//! blocking, so the writer is a plain OS thread rather than a tokio task. The thread ends when
//! [`Store::shutdown`] is awaited (which checkpoints the WAL and closes the file) or when the last
//! handle is dropped.
//!
//! The file uses WAL with `synchronous=FULL`, so a committed row survives a power cut (the one
//! exception, a request package's progress, is [`Durability::Progress`]), and its schema is
//! versioned by migrations in code ([`migrations`]). A store remembers the peer id it was created
//! for and refuses to open under another identity, so one agent's records never mix with another's.

mod ledger;
mod packages;

use std::path::{Path, PathBuf};
use std::thread;

use libp2p_identity::PeerId;
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

pub use ledger::{Head, LedgerReader, NewRow, Witness};
pub use packages::{Durability, RequestRow, TaskRow};

use hearth_api::jobs::{JobRecord, JobState, OwnerNotice};
use tokio::sync::{mpsc, oneshot};

/// Bound on operations waiting for the writer; senders wait when it is full.
const QUEUE_DEPTH: usize = 64;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The schema could not be brought up to date, for example because a newer Hearth wrote it.
    #[error("store {path}: cannot migrate the schema: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// The migration error.
        source: rusqlite_migration::Error,
    },
    /// The store belongs to another identity.
    #[error(
        "store {path} belongs to peer {stored}, but this agent's identity is {current}; was identity.key \
         replaced? Put the matching key back, or use another data dir"
    )]
    ForeignIdentity {
        /// The database file.
        path: PathBuf,
        /// The peer id recorded in the store.
        stored: String,
        /// The peer id of the identity that tried to open it.
        current: String,
    },
    /// The writer thread could not be started.
    #[error("cannot start the store's writer thread: {0}")]
    Thread(std::io::Error),
    /// The writer thread is gone (the store was shut down).
    #[error("the store is closed")]
    Closed,
}

/// The schema, one migration per version. Append only: never edit a migration that has shipped.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE meta (
             key   TEXT PRIMARY KEY NOT NULL,
             value TEXT NOT NULL
         ) STRICT;
         CREATE TABLE daemon_runs (
             id         INTEGER PRIMARY KEY,
             version    TEXT NOT NULL,
             started_at INTEGER NOT NULL,
             stopped_at INTEGER
         ) STRICT;",
        ),
        M::up(
            "CREATE TABLE jobs (
             id         TEXT PRIMARY KEY NOT NULL,
             kind       TEXT NOT NULL,
             spec_path  TEXT NOT NULL,
             job_dir    TEXT NOT NULL,
             state      TEXT NOT NULL,
             exit_code  INTEGER,
             reason     TEXT,
             created_at INTEGER NOT NULL,
             updated_at INTEGER NOT NULL
         ) STRICT;
         CREATE INDEX jobs_by_creation ON jobs (created_at);",
        ),
        // What the owner did to jobs (pause, resume, stop) and why: the outbox of notices for
        // the consumers' agents, kept until the network delivers them.
        M::up(
            "CREATE TABLE owner_notices (
             seq       INTEGER PRIMARY KEY,
             job_id    TEXT NOT NULL REFERENCES jobs (id),
             kind      TEXT NOT NULL,
             reason    TEXT NOT NULL,
             at        INTEGER NOT NULL,
             delivered INTEGER NOT NULL DEFAULT 0
         ) STRICT;
         CREATE INDEX owner_notices_by_job ON owner_notices (job_id);",
        ),
        // Blob transfer: which peer may fetch which blob from this agent, and this agent's own
        // fetches, so a restart resumes them.
        M::up(
            "CREATE TABLE blob_grants (
             peer       TEXT NOT NULL,
             hash       TEXT NOT NULL,
             created_at INTEGER NOT NULL,
             PRIMARY KEY (peer, hash)
         ) STRICT, WITHOUT ROWID;
         CREATE TABLE fetches (
             id         TEXT PRIMARY KEY NOT NULL,
             record     TEXT NOT NULL,
             created_at INTEGER NOT NULL
         ) STRICT;",
        ),
        // The market: agreements this agent signed (as provider or consumer), with how each
        // ended, and the jobs this agent asked other agents to run.
        M::up(
            "CREATE TABLE agreements (
             id         TEXT PRIMARY KEY NOT NULL,
             role       TEXT NOT NULL CHECK (role IN ('provider', 'consumer')),
             peer       TEXT NOT NULL,
             document   TEXT NOT NULL,
             outcome    TEXT,
             created_at INTEGER NOT NULL
         ) STRICT;
         CREATE INDEX agreements_by_peer ON agreements (peer, role);
         CREATE TABLE remote_jobs (
             id         TEXT PRIMARY KEY NOT NULL,
             record     TEXT NOT NULL,
             created_at INTEGER NOT NULL
         ) STRICT;",
        ),
        // The ledger: the hash chain of records and receipts, and the checkpoints counterparties
        // signed of theirs.
        M::up(ledger::MIGRATION),
        // Request packages: the request queue and the task queue.
        M::up(packages::MIGRATION),
    ])
}

/// What [`Store::begin_run`] learnt about the run before this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousRun {
    /// When it started, in Unix seconds.
    pub started_at: i64,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<i64>,
}

/// Identifies one daemon run in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunId(i64);

/// What the writer does after an operation.
enum Next {
    Continue,
    /// Close the connection, then say so on the sender.
    Close(oneshot::Sender<()>),
}

type Op = Box<dyn FnOnce(&mut Connection) -> Next + Send>;

/// A handle to the store's writer. Clones share one writer.
#[derive(Debug, Clone)]
pub struct Store {
    ops: mpsc::Sender<Op>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) and migrates the store at `path` for the agent `peer_id`, and starts
    /// its writer thread.
    pub async fn open(path: &Path, peer_id: &PeerId) -> Result<Self, StoreError> {
        let (ops, mut queue) = mpsc::channel::<Op>(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_path = path.to_owned();
        let peer_id = peer_id.to_string();
        thread::Builder::new()
            .name("hearth-store".into())
            .spawn(move || {
                let mut conn = match open_connection(&thread_path, &peer_id) {
                    Ok(conn) => {
                        let _ = ready_tx.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut closed = None;
                while let Some(op) = queue.blocking_recv() {
                    if let Next::Close(done) = op(&mut conn) {
                        closed = Some(done);
                        break;
                    }
                }
                // Refuse further operations, then close the file (SQLite checkpoints the WAL).
                drop(queue);
                drop(conn);
                if let Some(done) = closed {
                    let _ = done.send(());
                }
            })
            .map_err(StoreError::Thread)?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Self { ops, path: path.to_owned() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the start of a daemon run and tells how the previous one ended.
    pub async fn begin_run(
        &self,
        version: &str,
        now: i64,
    ) -> Result<(RunId, Option<PreviousRun>), StoreError> {
        let version = version.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let previous = tx
                .query_row(
                    "SELECT started_at, stopped_at FROM daemon_runs ORDER BY id DESC LIMIT 1",
                    [],
                    |row| Ok(PreviousRun { started_at: row.get(0)?, stopped_at: row.get(1)? }),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO daemon_runs (version, started_at) VALUES (?1, ?2)",
                params![version, now],
            )?;
            let id = RunId(tx.last_insert_rowid());
            tx.commit()?;
            Ok((id, previous))
        })
        .await
    }

    /// Records that the run ended cleanly.
    pub async fn end_run(&self, run: RunId, now: i64) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute("UPDATE daemon_runs SET stopped_at = ?1 WHERE id = ?2", params![now, run.0])?;
            Ok(())
        })
        .await
    }

    /// Records a new job.
    pub async fn insert_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let job = job.clone();
        self.call(move |conn| {
            let (state, exit_code, reason) = state_columns(&job.state);
            conn.execute(
                "INSERT INTO jobs (id, kind, spec_path, job_dir, state, exit_code, reason, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    job.id.as_str(),
                    job.kind,
                    job.spec_path.to_string_lossy(),
                    job.job_dir.to_string_lossy(),
                    state,
                    exit_code,
                    reason,
                    job.created_at,
                    job.updated_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a job's new state.
    pub async fn set_job_state(&self, id: &str, state: &JobState, now: i64) -> Result<(), StoreError> {
        let (id, state) = (id.to_owned(), state.clone());
        self.call(move |conn| {
            let (name, exit_code, reason) = state_columns(&state);
            conn.execute(
                "UPDATE jobs SET state = ?2, exit_code = ?3, reason = ?4, updated_at = ?5 WHERE id = ?1",
                params![id, name, exit_code, reason, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a notice for a job's consumer.
    pub async fn add_owner_notice(&self, notice: &OwnerNotice) -> Result<(), StoreError> {
        let notice = notice.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO owner_notices (job_id, kind, reason, at) VALUES (?1, ?2, ?3, ?4)",
                params![notice.job_id.as_str(), notice.kind, notice.reason, notice.at],
            )?;
            Ok(())
        })
        .await
    }

    /// Every notice about `job_id`, oldest first.
    pub async fn owner_notices(&self, job_id: &str) -> Result<Vec<OwnerNotice>, StoreError> {
        let job_id = job_id.to_owned();
        self.call(move |conn| {
            let mut statement = conn.prepare(
                "SELECT job_id, kind, reason, at FROM owner_notices WHERE job_id = ?1 ORDER BY seq",
            )?;
            statement
                .query_map([job_id], |row| {
                    Ok(OwnerNotice {
                        job_id: row.get::<_, String>(0)?.into(),
                        kind: row.get(1)?,
                        reason: row.get(2)?,
                        at: row.get(3)?,
                    })
                })?
                .collect()
        })
        .await
    }

    /// Lets `peer` fetch each of `hashes` (hex) from this agent.
    pub async fn grant_blobs(&self, peer: &str, hashes: Vec<String>, now: i64) -> Result<(), StoreError> {
        let peer = peer.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            for hash in hashes {
                tx.execute(
                    "INSERT OR IGNORE INTO blob_grants (peer, hash, created_at) VALUES (?1, ?2, ?3)",
                    params![peer, hash, now],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// Whether `peer` may fetch the blob `hash` (hex).
    pub async fn blob_granted(&self, peer: &str, hash: &str) -> Result<bool, StoreError> {
        let (peer, hash) = (peer.to_owned(), hash.to_owned());
        self.call(move |conn| {
            conn.query_row(
                "SELECT 1 FROM blob_grants WHERE peer = ?1 AND hash = ?2",
                params![peer, hash],
                |_| Ok(()),
            )
            .optional()
            .map(|row| row.is_some())
        })
        .await
    }

    /// Inserts or replaces a fetch's record (JSON, owned by the transfer module).
    pub async fn put_fetch(&self, id: &str, record: String, created_at: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO fetches (id, record, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                params![id, record, created_at],
            )?;
            Ok(())
        })
        .await
    }

    /// Every fetch's record, oldest first.
    pub async fn fetches(&self) -> Result<Vec<String>, StoreError> {
        self.call(|conn| {
            let mut statement = conn.prepare("SELECT record FROM fetches ORDER BY created_at, id")?;
            statement.query_map([], |row| row.get(0))?.collect()
        })
        .await
    }

    /// Records an agreement both sides signed (`document`: its JSON); `role` is this agent's,
    /// `provider` or `consumer`, and `peer` the other side.
    pub async fn put_agreement(
        &self,
        id: &str,
        role: &'static str,
        peer: &str,
        document: String,
        created_at: i64,
    ) -> Result<(), StoreError> {
        let (id, peer) = (id.to_owned(), peer.to_owned());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO agreements (id, role, peer, document, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, role, peer, document, created_at],
            )?;
            Ok(())
        })
        .await
    }

    /// Records how the job under an agreement ended (a job state's name).
    pub async fn end_agreement(&self, id: &str, outcome: &'static str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute("UPDATE agreements SET outcome = ?2 WHERE id = ?1", params![id, outcome])?;
            Ok(())
        })
        .await
    }

    /// One agreement's document and outcome.
    pub async fn agreement(&self, id: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.query_row("SELECT document, outcome FROM agreements WHERE id = ?1", params![id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
        })
        .await
    }

    /// Of the agreements with `peer` in which this agent had `role`: how many ended, and how many
    /// of those finished.
    pub async fn agreement_history(&self, peer: &str, role: &'static str) -> Result<(u64, u64), StoreError> {
        let peer = peer.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT count(outcome), count(CASE outcome WHEN 'finished' THEN 1 END)
                 FROM agreements WHERE peer = ?1 AND role = ?2",
                params![peer, role],
                |row| Ok((row.get::<_, i64>(0)?.unsigned_abs(), row.get::<_, i64>(1)?.unsigned_abs())),
            )
        })
        .await
    }

    /// Inserts or replaces a remote job's record (JSON, owned by the market).
    pub async fn put_remote_job(&self, id: &str, record: String, created_at: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO remote_jobs (id, record, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                params![id, record, created_at],
            )?;
            Ok(())
        })
        .await
    }

    /// Every remote job's record, oldest first.
    pub async fn remote_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.call(|conn| {
            let mut statement = conn.prepare("SELECT record FROM remote_jobs ORDER BY created_at, id")?;
            statement.query_map([], |row| row.get(0))?.collect()
        })
        .await
    }

    /// Every job, oldest first.
    pub async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.call(|conn| {
            let mut statement = conn.prepare(
                "SELECT id, kind, spec_path, job_dir, state, exit_code, reason, created_at, updated_at
                 FROM jobs ORDER BY created_at, id",
            )?;
            statement.query_map([], job_from_row)?.collect()
        })
        .await
    }

    /// Marks every job that was not in a terminal state as failed with `reason`: after the agent
    /// stopped, none of their processes is left. Returns how many there were.
    pub async fn fail_unfinished_jobs(&self, reason: &str, now: i64) -> Result<usize, StoreError> {
        let reason = reason.to_owned();
        self.call(move |conn| {
            conn.execute(
                "UPDATE jobs SET state = 'failed', reason = ?1, updated_at = ?2
                 WHERE state NOT IN ('finished', 'failed', 'cancelled')",
                params![reason, now],
            )
        })
        .await
    }

    /// Finishes queued work, checkpoints the WAL into the main file and closes it. Other handles
    /// get [`StoreError::Closed`] afterwards.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        let (closed_tx, closed) = oneshot::channel();
        let checkpoint = self
            .submit(Next::Close(closed_tx), |conn| {
                conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);")
            })
            .await;
        // Returns once the file is closed, so a lock released after this protects nothing open.
        closed.await.map_err(|_| StoreError::Closed)?;
        checkpoint
    }

    /// Runs `op` on the writer thread, in order with every other operation.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(Next::Continue, op).await
    }

    async fn submit<T: Send + 'static>(
        &self,
        then: Next,
        op: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, result) = oneshot::channel();
        let job: Op = Box::new(move |conn| {
            let _ = reply.send(op(conn));
            then
        });
        self.ops.send(job).await.map_err(|_| StoreError::Closed)?;
        result
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }
}

/// A job state as the `state`, `exit_code` and `reason` columns.
fn state_columns(state: &JobState) -> (&'static str, Option<i32>, Option<String>) {
    match state {
        JobState::Finished { exit_code } => (state.name(), Some(*exit_code), None),
        JobState::Failed { reason } => (state.name(), None, Some(reason.clone())),
        JobState::Cancelled { reason } => (state.name(), None, reason.clone()),
        other => (other.name(), None, None),
    }
}

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let name: String = row.get(4)?;
    let exit_code: Option<i32> = row.get(5)?;
    let reason: Option<String> = row.get(6)?;
    let state = match name.as_str() {
        "queued" => JobState::Queued,
        "transferring" => JobState::Transferring,
        "running" => JobState::Running,
        "paused" => JobState::Paused,
        "finished" => JobState::Finished { exit_code: exit_code.unwrap_or_default() },
        "cancelled" => JobState::Cancelled { reason },
        _ => JobState::Failed {
            reason: reason.unwrap_or_else(|| format!("unknown state {name:?} in the store")),
        },
    };
    Ok(JobRecord {
        id: row.get::<_, String>(0)?.into(),
        kind: row.get(1)?,
        spec_path: PathBuf::from(row.get::<_, String>(2)?),
        job_dir: PathBuf::from(row.get::<_, String>(3)?),
        state,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
    })
}

fn open_connection(path: &Path, peer_id: &str) -> Result<Connection, StoreError> {
    let sqlite = |source| StoreError::Sqlite { path: path.to_owned(), source };
    let mut conn = Connection::open(path).map_err(sqlite)?;
    // journal_mode answers with a row, so it is read rather than executed.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(store = %path.display(), mode, "the store could not switch to WAL");
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;",
    )
    .map_err(sqlite)?;
    migrations()
        .to_latest(&mut conn)
        .map_err(|source| StoreError::Migration { path: path.to_owned(), source })?;
    claim_for(&conn, path, peer_id)?;
    Ok(conn)
}

/// Records `peer_id` as the store's owner on first open; refuses a store owned by another.
fn claim_for(conn: &Connection, path: &Path, peer_id: &str) -> Result<(), StoreError> {
    let sqlite = |source| StoreError::Sqlite { path: path.to_owned(), source };
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('peer_id', ?1) ON CONFLICT (key) DO NOTHING",
        [peer_id],
    )
    .map_err(sqlite)?;
    let stored: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'peer_id'", [], |row| row.get(0))
        .map_err(sqlite)?;
    if stored != peer_id {
        return Err(StoreError::ForeignIdentity {
            path: path.to_owned(),
            stored,
            current: peer_id.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([n; 32]).unwrap().public().to_peer_id()
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[tokio::test]
    async fn runs_are_recorded_and_an_unclean_stop_is_visible_next_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        let store = Store::open(&path, &peer(1)).await.unwrap();
        let (first, previous) = store.begin_run("0.1.0", 100).await.unwrap();
        assert_eq!(previous, None);
        store.end_run(first, 150).await.unwrap();
        let (_second, previous) = store.begin_run("0.1.0", 200).await.unwrap();
        assert_eq!(previous, Some(PreviousRun { started_at: 100, stopped_at: Some(150) }));
        // The second run never ends: the process "crashes".
        drop(store);

        let store = Store::open(&path, &peer(1)).await.unwrap();
        let (_, previous) = store.begin_run("0.1.0", 300).await.unwrap();
        assert_eq!(previous, Some(PreviousRun { started_at: 200, stopped_at: None }));
        store.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_file_is_wal_with_full_sync_and_intact_after_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        let store = Store::open(&path, &peer(1)).await.unwrap();
        let other = store.clone();
        store.begin_run("0.1.0", 1).await.unwrap();
        store.shutdown().await.unwrap();
        assert!(matches!(other.begin_run("0.1.0", 2).await, Err(StoreError::Closed)));

        let conn = Connection::open(&path).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 7);
    }

    #[tokio::test]
    async fn a_request_and_its_tasks_are_written_together_and_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let store = Store::open(&path, &peer(1)).await.unwrap();
        let task = |index: u32, state: &str, job: Option<&str>| TaskRow {
            index,
            resource: if index == 0 { "prep".into() } else { "train".into() },
            spec_path: format!("/specs/{index}.toml"),
            state: state.into(),
            job_id: job.map(str::to_owned),
            reason: None,
        };
        let mut row = RequestRow {
            id: "r1".into(),
            state: "queued".into(),
            record: "{}".into(),
            created_at: 10,
            updated_at: 10,
            tasks: vec![task(0, "waiting", None), task(1, "waiting", None)],
        };
        store.put_request(row.clone(), Durability::Synced).await.unwrap();
        row.state = "running".into();
        row.updated_at = 12;
        row.tasks[0] = task(0, "succeeded", Some("j1"));
        row.tasks[1] = task(1, "running", Some("j2"));
        store.put_request(row.clone(), Durability::Progress).await.unwrap();
        // A progress write relaxes syncing for itself only: FULL again for what follows.
        let sync: i64 =
            store.call(|conn| conn.query_row("PRAGMA synchronous", [], |r| r.get(0))).await.unwrap();
        assert_eq!(sync, 2, "synchronous is {sync}, not FULL (2)");
        store.shutdown().await.unwrap();

        let store = Store::open(&path, &peer(1)).await.unwrap();
        assert_eq!(store.requests().await.unwrap(), vec![row]);
        store.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn job_records_keep_their_state_and_unfinished_ones_fail_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.db"), &peer(1)).await.unwrap();
        let record = |id: &str| JobRecord {
            id: id.into(),
            kind: "native".into(),
            spec_path: "/specs/a.toml".into(),
            job_dir: format!("/jobs/{id}").into(),
            state: JobState::Queued,
            created_at: 10,
            updated_at: 10,
        };
        store.insert_job(&record("a")).await.unwrap();
        store.insert_job(&record("b")).await.unwrap();
        store.set_job_state("a", &JobState::Finished { exit_code: 3 }, 11).await.unwrap();
        store.set_job_state("b", &JobState::Running, 12).await.unwrap();
        assert_eq!(store.fail_unfinished_jobs("the agent stopped", 13).await.unwrap(), 1);
        let jobs = store.jobs().await.unwrap();
        assert_eq!(jobs[0].state, JobState::Finished { exit_code: 3 });
        assert_eq!(jobs[0].updated_at, 11);
        assert_eq!(jobs[1].state, JobState::Failed { reason: "the agent stopped".into() });
        assert_eq!(jobs[1].spec_path, std::path::Path::new("/specs/a.toml"));
    }

    #[tokio::test]
    async fn a_store_refuses_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        Store::open(&path, &peer(1)).await.unwrap().shutdown().await.unwrap();
        let err = Store::open(&path, &peer(2)).await.unwrap_err();
        assert!(matches!(err, StoreError::ForeignIdentity { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&peer(1).to_string()) && message.contains(&peer(2).to_string()));
    }

    #[tokio::test]
    async fn a_store_from_a_newer_hearth_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        Store::open(&path, &peer(1)).await.unwrap().shutdown().await.unwrap();
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        let err = Store::open(&path, &peer(1)).await.unwrap_err();
        assert!(matches!(err, StoreError::Migration { .. }), "{err}");
    }
}
