//! The request queue and the task queue of request packages: one row per package with its
//! whole status as JSON (owned by `requests`), and one row per task, written together in one
//! transaction so the two never disagree.

use rusqlite::params;

use super::{Store, StoreError};

/// Migration 7: the two queues.
pub(super) const MIGRATION: &str = "CREATE TABLE requests (
     id         TEXT PRIMARY KEY NOT NULL,
     state      TEXT NOT NULL,
     record     TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     updated_at INTEGER NOT NULL
 ) STRICT;
 CREATE INDEX requests_by_state ON requests (state);
 CREATE TABLE request_tasks (
     request_id TEXT NOT NULL REFERENCES requests (id),
     idx        INTEGER NOT NULL,
     resource   TEXT NOT NULL,
     spec_path  TEXT NOT NULL,
     state      TEXT NOT NULL,
     job_id     TEXT,
     reason     TEXT,
     PRIMARY KEY (request_id, idx)
 ) STRICT;";

/// One task's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// Its place in the package's `tasks`.
    pub index: u32,
    /// The resource it runs on.
    pub resource: String,
    /// Its job spec.
    pub spec_path: String,
    /// `waiting`, `running`, `succeeded`, `failed` or `skipped`.
    pub state: String,
    /// The remote job running it, once submitted.
    pub job_id: Option<String>,
    /// Why it failed or was skipped.
    pub reason: Option<String>,
}

/// A request as stored: its state, its record (JSON) and its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRow {
    /// Its id.
    pub id: String,
    /// Its state's name.
    pub state: String,
    /// The whole status, as JSON.
    pub record: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// Its tasks, in order.
    pub tasks: Vec<TaskRow>,
}

/// How hard a request's write holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before it returns, like every other write: it survives a power cut. For a request
    /// accepted: its id is only given out once this returns.
    Synced,
    /// Committed, not synced (`synchronous = NORMAL` for this one transaction): it survives the
    /// agent being killed, not a power cut, which may lose the last few. For a request's progress,
    /// written many times a second under load; whatever a power cut loses, the request redoes
    /// after the restart, and what a provider held for it lapses there by itself.
    Progress,
}

impl Store {
    /// Inserts or replaces a request and all its tasks, in one transaction.
    pub async fn put_request(&self, row: RequestRow, durability: Durability) -> Result<(), StoreError> {
        self.call(move |conn| {
            if durability == Durability::Progress {
                conn.pragma_update(None, "synchronous", "NORMAL")?;
            }
            let written = write_request(conn, &row);
            if durability == Durability::Progress {
                conn.pragma_update(None, "synchronous", "FULL")?;
            }
            written
        })
        .await
    }

    /// Every request with its tasks, oldest first.
    pub async fn requests(&self) -> Result<Vec<RequestRow>, StoreError> {
        self.call(|conn| {
            let mut statement = conn.prepare(
                "SELECT id, state, record, created_at, updated_at FROM requests ORDER BY created_at, id",
            )?;
            let mut rows: Vec<RequestRow> = statement
                .query_map([], |row| {
                    Ok(RequestRow {
                        id: row.get(0)?,
                        state: row.get(1)?,
                        record: row.get(2)?,
                        created_at: row.get(3)?,
                        updated_at: row.get(4)?,
                        tasks: Vec::new(),
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut tasks = conn.prepare(
                "SELECT idx, resource, spec_path, state, job_id, reason FROM request_tasks
                 WHERE request_id = ?1 ORDER BY idx",
            )?;
            for row in &mut rows {
                row.tasks = tasks
                    .query_map([&row.id], |task| {
                        Ok(TaskRow {
                            index: task.get(0)?,
                            resource: task.get(1)?,
                            spec_path: task.get(2)?,
                            state: task.get(3)?,
                            job_id: task.get(4)?,
                            reason: task.get(5)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
            }
            Ok(rows)
        })
        .await
    }
}

fn write_request(conn: &mut rusqlite::Connection, row: &RequestRow) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO requests (id, state, record, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record,
             updated_at = excluded.updated_at",
        params![row.id, row.state, row.record, row.created_at, row.updated_at],
    )?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO request_tasks (request_id, idx, resource, spec_path, state, job_id, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (request_id, idx) DO UPDATE SET state = excluded.state,
                 job_id = excluded.job_id, reason = excluded.reason",
        )?;
        for task in &row.tasks {
            put.execute(params![
                row.id,
                task.index,
                task.resource,
                task.spec_path,
                task.state,
                task.job_id,
                task.reason
            ])?;
        }
    }
    tx.commit()
}
