//! The ledger's SQL: appending rows to the hash chain in one transaction, the head, the checkpoints
//! counterparties signed of their own ledgers (held for them), and a read-only reader for
//! verifying and exporting a ledger file, which may be a copy and may be read while the daemon
//! writes (WAL).
//!
//! The chain is the `ledger` table; triggers refuse every `UPDATE` and `DELETE`, so only a hand
//! that drops them first can change history (and `hearth ledger verify` then names the row).

use std::path::{Path, PathBuf};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{Store, StoreError};
use crate::proto::{GENESIS, Kind, Row, entry_bytes_of_canonical, row_hash};

/// Migration 6: the chain and the checkpoints held for counterparties.
pub(super) const MIGRATION: &str = "CREATE TABLE ledger (
     seq  INTEGER PRIMARY KEY,
     at   INTEGER NOT NULL,
     kind TEXT NOT NULL,
     body TEXT NOT NULL,
     prev TEXT NOT NULL,
     hash TEXT NOT NULL
 ) STRICT;
 CREATE INDEX ledger_by_kind ON ledger (kind);
 CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
     BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
 CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
     BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
 CREATE TABLE ledger_receipts (
     agreement_id TEXT PRIMARY KEY NOT NULL,
     seq          INTEGER NOT NULL
 ) STRICT;
 CREATE TABLE witnessed (
     peer        TEXT NOT NULL,
     seq         INTEGER NOT NULL,
     document    TEXT NOT NULL,
     received_at INTEGER NOT NULL,
     PRIMARY KEY (peer, seq)
 ) STRICT;";

/// A record to append: its time, kind and body as canonical JSON text.
#[derive(Debug, Clone)]
pub struct NewRow {
    /// Unix seconds.
    pub at: i64,
    /// What it records.
    pub kind: Kind,
    /// Canonical JSON.
    pub body: String,
}

/// A checkpoint another agent signed of its own ledger, as this agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// Whose ledger (the signer).
    pub peer: String,
    /// The row it pins.
    pub seq: u64,
    /// The signed checkpoint's JSON.
    pub document: String,
    /// Unix seconds when it arrived.
    pub received_at: i64,
}

/// The last row of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
}

impl Store {
    /// Appends `rows` to the chain in one transaction (one commit, synced), in order; the new head.
    /// With no rows, the head as it is. A receipt for an agreement the chain already holds a
    /// receipt of is left out, so a receipt offered twice (a retry, a restart) counts once.
    pub async fn append_ledger(&self, rows: Vec<NewRow>) -> Result<Option<Head>, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut head = head(&tx)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO ledger (seq, at, kind, body, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                let (mut seq, mut prev) = match &head {
                    Some(head) => (head.seq, decode_hash(&head.hash)),
                    None => (0, GENESIS),
                };
                let mut receipt_of = tx.prepare_cached(
                    "INSERT INTO ledger_receipts (agreement_id, seq) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )?;
                for row in rows {
                    if row.kind == Kind::Receipt {
                        let agreement = receipt_agreement(&row.body).ok_or_else(|| {
                            rusqlite::Error::ToSqlConversionFailure(
                                "a receipt without an agreement_id".into(),
                            )
                        })?;
                        let next = i64::try_from(seq + 1).unwrap_or(i64::MAX);
                        if receipt_of.execute(params![agreement, next])? == 0 {
                            continue;
                        }
                    }
                    seq += 1;
                    let hash = row_hash(&prev, &entry_bytes_of_canonical(seq, row.at, row.kind, &row.body));
                    let seq_sql = i64::try_from(seq).unwrap_or(i64::MAX);
                    insert.execute(params![
                        seq_sql,
                        row.at,
                        row.kind.name(),
                        row.body,
                        hex::encode(prev),
                        hex::encode(hash)
                    ])?;
                    prev = hash;
                    head = Some(Head { seq, hash: hex::encode(hash) });
                }
            }
            tx.commit()?;
            Ok(head)
        })
        .await
    }

    /// The chain's last row, if it has one.
    pub async fn ledger_head(&self) -> Result<Option<Head>, StoreError> {
        self.call(|conn| head(conn)).await
    }

    /// The bodies of every row of `kind`, in chain order, with their sequence and time.
    pub async fn ledger_bodies(&self, kind: Kind) -> Result<Vec<(u64, i64, String)>, StoreError> {
        self.call(move |conn| {
            let mut statement =
                conn.prepare("SELECT seq, at, body FROM ledger WHERE kind = ?1 ORDER BY seq")?;
            statement
                .query_map([kind.name()], |row| {
                    Ok((row.get::<_, i64>(0)?.unsigned_abs(), row.get(1)?, row.get(2)?))
                })?
                .collect()
        })
        .await
    }

    /// Keeps a checkpoint `peer` signed of its own ledger (`document`: its JSON).
    pub async fn put_witnessed(
        &self,
        peer: &str,
        seq: u64,
        document: String,
        received_at: i64,
    ) -> Result<(), StoreError> {
        let peer = peer.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO witnessed (peer, seq, document, received_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (peer, seq) DO NOTHING",
                params![peer, i64::try_from(seq).unwrap_or(i64::MAX), document, received_at],
            )?;
            Ok(())
        })
        .await
    }

    /// The newest checkpoint this agent holds of `peer`'s ledger (its JSON).
    pub async fn witnessed(&self, peer: &str) -> Result<Option<String>, StoreError> {
        let peer = peer.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT document FROM witnessed WHERE peer = ?1 ORDER BY seq DESC LIMIT 1",
                [peer],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    /// Every checkpoint this agent holds of other agents' ledgers (`peer`'s alone, if given), by
    /// peer, oldest first.
    pub async fn all_witnessed(&self, peer: Option<String>) -> Result<Vec<Witness>, StoreError> {
        self.call(move |conn| witnessed_rows(conn, peer.as_deref())).await
    }

    /// Every peer this agent made an agreement with: the witnesses of its ledger.
    pub async fn counterparties(&self) -> Result<Vec<String>, StoreError> {
        self.call(|conn| {
            let mut statement = conn.prepare("SELECT DISTINCT peer FROM agreements ORDER BY peer")?;
            statement.query_map([], |row| row.get(0))?.collect()
        })
        .await
    }
}

fn witnessed_rows(conn: &Connection, peer: Option<&str>) -> rusqlite::Result<Vec<Witness>> {
    let mut statement = conn.prepare(
        "SELECT peer, seq, document, received_at FROM witnessed
         WHERE ?1 IS NULL OR peer = ?1 ORDER BY peer, seq",
    )?;
    statement
        .query_map([peer], |row| {
            Ok(Witness {
                peer: row.get(0)?,
                seq: row.get::<_, i64>(1)?.unsigned_abs(),
                document: row.get(2)?,
                received_at: row.get(3)?,
            })
        })?
        .collect()
}

/// The agreement a receipt row's body cites.
fn receipt_agreement(body: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Cites {
        receipt: Agreement,
    }
    #[derive(serde::Deserialize)]
    struct Agreement {
        agreement_id: String,
    }
    serde_json::from_str::<Cites>(body).ok().map(|cites| cites.receipt.agreement_id)
}

fn head(conn: &Connection) -> rusqlite::Result<Option<Head>> {
    conn.query_row("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1", [], |row| {
        Ok(Head { seq: row.get::<_, i64>(0)?.unsigned_abs(), hash: row.get(1)? })
    })
    .optional()
}

/// A stored hash as bytes; one that is not 64 hex digits (a damaged row) chains on as zeros, and
/// verification names that row.
fn decode_hash(text: &str) -> [u8; 32] {
    let mut out = [0; 32];
    if let Ok(bytes) = hex::decode(text)
        && bytes.len() == 32
    {
        out.copy_from_slice(&bytes);
    }
    out
}

/// Reads a ledger file without writing to it: a live agent's store (beside its daemon) or a copy.
#[derive(Debug)]
pub struct LedgerReader {
    conn: Connection,
    path: PathBuf,
}

impl LedgerReader {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let sqlite = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sqlite)?;
        Ok(Self { conn, path: path.to_owned() })
    }

    /// The peer id the store belongs to.
    pub fn owner(&self) -> Result<String, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'peer_id'", [], |row| row.get(0))
            .map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }

    /// The checkpoints the store's owner holds of other agents' ledgers (`peer`'s alone, if
    /// given), by peer, oldest first.
    pub fn witnessed(&self, peer: Option<&str>) -> Result<Vec<Witness>, StoreError> {
        witnessed_rows(&self.conn, peer)
            .map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }

    /// Calls `each` with every row in storage order (by `seq`), inside one read transaction so the
    /// rows are one consistent snapshot; stops early when `each` returns false.
    pub fn for_each(&mut self, each: impl FnMut(Row) -> bool) -> Result<(), StoreError> {
        self.for_each_from(1, each)
    }

    /// [`LedgerReader::for_each`] for the rows from `first` on.
    pub fn for_each_from(&mut self, first: u64, mut each: impl FnMut(Row) -> bool) -> Result<(), StoreError> {
        let sqlite = |source| StoreError::Sqlite { path: self.path.clone(), source };
        let first = i64::try_from(first).unwrap_or(i64::MAX);
        let tx = self.conn.transaction().map_err(sqlite)?;
        {
            let mut statement = tx
                .prepare("SELECT seq, at, kind, body, prev, hash FROM ledger WHERE seq >= ?1 ORDER BY seq")
                .map_err(sqlite)?;
            let mut rows = statement.query([first]).map_err(sqlite)?;
            while let Some(row) = rows.next().map_err(sqlite)? {
                // Text is read as bytes and made UTF-8 lossily: a damaged row still reads (and
                // then fails its hash, which names it) instead of stopping the whole read.
                let text = |index: usize| -> rusqlite::Result<String> {
                    Ok(match row.get_ref(index)? {
                        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        ValueRef::Integer(n) => n.to_string(),
                        ValueRef::Real(x) => x.to_string(),
                        ValueRef::Null => String::new(),
                    })
                };
                let read = || -> rusqlite::Result<Row> {
                    Ok(Row {
                        seq: row.get::<_, i64>(0)?.unsigned_abs(),
                        at: row.get(1)?,
                        kind: text(2)?,
                        body: text(3)?,
                        prev: text(4)?,
                        hash: text(5)?,
                    })
                };
                if !each(read().map_err(sqlite)?) {
                    break;
                }
            }
        }
        tx.finish().map_err(sqlite)
    }
}
