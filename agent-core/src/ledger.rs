//! The ledger: every interaction with another agent recorded in an append-only hash chain in the
//! agent's SQLite file, receipts of finished work with both signatures, checkpoints of the chain's
//! head that counterparties keep (so a rewritten history is caught by someone other than its
//! owner), verification, export and earnings.
//!
//! [`Ledger`] is a cheap handle over the [`Store`], which does the appending on its writer thread
//! (one transaction per append, `synchronous=FULL`). In [`Mode::Realtime`] each record is appended
//! as it happens; in [`Mode::Batch`] records wait in memory and are appended in one transaction
//! with the next receipt (when a job completes), when [`BATCH_LIMIT`] wait, or at shutdown
//! ([`Ledger::flush`]). Both modes give the same chain. A receipt is always appended before it is
//! acknowledged. The ledger spawns nothing.
//!
//! [`record`] holds the stored formats, [`verify`] the verifier and exports, [`earnings`] the
//! credits computed from receipts.

pub mod earnings;
pub mod record;
pub mod verify;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use libp2p_identity::PeerId;
use serde::Serialize;

use self::earnings::{Earnings, Period};
use self::record::{CHECKPOINT_TAG, Checkpoint, Kind, Receipt, ReceiptBody, VERSION};
use self::verify::{ExportFormat, Report, Verifier};
use crate::clock::unix_now;
pub use crate::config::{LedgerConfig, LedgerMode as Mode};
use crate::identity::Identity;
use crate::net::advert::canonical_json;
pub use crate::net::negotiate::Signed;
use crate::store::{Head, LedgerReader, NewRow, Store, StoreError, Witness};
use hearth_api::ledger::{Broken, HeldCheckpoint, SignedDocument};

/// In batch mode, how many records may wait before they are appended anyway.
pub const BATCH_LIMIT: usize = 4096;

/// Why the ledger could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record could not be encoded or signed.
    #[error("cannot encode a ledger record: {0}")]
    Encode(String),
    /// A checkpoint from a peer was not acceptable.
    #[error("checkpoint rejected: {0}")]
    Checkpoint(String),
    /// An export could not be written.
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
}

/// The ledger. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    identity: Identity,
    mode: Mode,
    /// Batch mode: records not appended yet, oldest first.
    waiting: Mutex<Vec<NewRow>>,
    /// The rows verified so far for earnings, with their receipts: each call verifies only the
    /// rows appended since the last.
    verified: Arc<tokio::sync::Mutex<Verifier>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("mode", &self.inner.mode).finish_non_exhaustive()
    }
}

impl Ledger {
    /// The ledger of `identity`, kept in `store`.
    pub fn new(store: Store, identity: Identity, mode: Mode) -> Self {
        let verified = Verifier::new(&identity.peer_id().to_string()).counting_receipts();
        let verified = Arc::new(tokio::sync::Mutex::new(verified));
        Self { inner: Arc::new(Inner { store, identity, mode, waiting: Mutex::default(), verified }) }
    }

    /// When records are appended.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// Records an interaction: appended now, or with the next batch.
    pub async fn record(&self, kind: Kind, body: &impl Serialize) -> Result<(), LedgerError> {
        self.record_all(vec![new_row(kind, body)?]).await
    }

    /// Records interactions that belong together (a reservation's ask and its grant), in order,
    /// in one transaction.
    pub async fn record_together(&self, records: &[(Kind, &serde_json::Value)]) -> Result<(), LedgerError> {
        let rows = records.iter().map(|(kind, body)| new_row(*kind, body)).collect::<Result<Vec<_>, _>>()?;
        self.record_all(rows).await
    }

    async fn record_all(&self, rows: Vec<NewRow>) -> Result<(), LedgerError> {
        match self.inner.mode {
            Mode::Realtime => {
                self.inner.store.append_ledger(rows).await?;
            }
            Mode::Batch => {
                let full = {
                    let mut waiting = self.waiting();
                    waiting.extend(rows);
                    waiting.len() >= BATCH_LIMIT
                };
                if full {
                    self.flush().await?;
                }
            }
        }
        Ok(())
    }

    /// Records an interaction and logs a failure instead of returning it: the work goes on, and
    /// `hearth ledger verify` still holds for what was written.
    pub async fn note(&self, kind: Kind, body: &impl Serialize) {
        if let Err(error) = self.record(kind, body).await {
            tracing::error!(kind = kind.name(), %error, "cannot write a ledger record");
        }
    }

    /// Appends a countersigned receipt, after every record still waiting, in one transaction; the
    /// chain's new head. Once this returns, the receipt is on disk.
    pub async fn append_receipt(&self, receipt: &Receipt) -> Result<Head, LedgerError> {
        let mut rows = std::mem::take(&mut *self.waiting());
        rows.push(new_row(Kind::Receipt, receipt)?);
        let head = self.inner.store.append_ledger(rows).await?;
        head.ok_or_else(|| LedgerError::Encode("the chain is empty after an append".into()))
    }

    /// Appends every record still waiting (batch mode); the chain's head.
    pub async fn flush(&self) -> Result<Option<Head>, LedgerError> {
        let rows = std::mem::take(&mut *self.waiting());
        Ok(self.inner.store.append_ledger(rows).await?)
    }

    /// A signed checkpoint of the chain's head, for counterparties to keep; `None` while the chain
    /// is empty.
    pub async fn checkpoint(&self) -> Result<Option<Signed>, LedgerError> {
        let Some(head) = self.inner.store.ledger_head().await? else { return Ok(None) };
        sign_head(&self.inner.identity, &head).map(Some)
    }

    /// Keeps a checkpoint `from` signed of its own ledger, so this agent can later show it what it
    /// once said.
    pub async fn witness(&self, from: &PeerId, signed: &Signed) -> Result<(), LedgerError> {
        let checkpoint: Checkpoint =
            signed.open(CHECKPOINT_TAG, from).map_err(|e| LedgerError::Checkpoint(e.to_string()))?;
        if checkpoint.peer != from.to_string() {
            return Err(LedgerError::Checkpoint(format!(
                "a checkpoint of {}, sent by {from}",
                checkpoint.peer
            )));
        }
        let document = serde_json::to_string(signed).map_err(|e| LedgerError::Encode(e.to_string()))?;
        self.inner.store.put_witnessed(&checkpoint.peer, checkpoint.seq, document, unix_now()).await?;
        Ok(())
    }

    /// The newest checkpoint this agent holds of `peer`'s ledger.
    pub async fn held_of(&self, peer: &PeerId) -> Result<Option<Signed>, LedgerError> {
        let document = self.inner.store.witnessed(&peer.to_string()).await?;
        document
            .map(|text| serde_json::from_str(&text).map_err(|e| LedgerError::Encode(e.to_string())))
            .transpose()
    }

    /// The bodies of every record of `kind`, those still waiting for their batch included, in
    /// chain order. A record flushed while this reads may appear twice, never not at all.
    pub async fn bodies(&self, kind: Kind) -> Result<Vec<String>, LedgerError> {
        // The waiting ones first: a flush in between then duplicates a record instead of hiding it.
        let waiting: Vec<String> =
            self.waiting().iter().filter(|row| row.kind == kind).map(|row| row.body.clone()).collect();
        let mut bodies: Vec<String> =
            self.inner.store.ledger_bodies(kind).await?.into_iter().map(|(_, _, body)| body).collect();
        bodies.extend(waiting);
        Ok(bodies)
    }

    /// Every checkpoint this agent holds of other agents' ledgers (of `peer`'s alone, if given),
    /// by peer, oldest first.
    pub async fn held(&self, peer: Option<&PeerId>) -> Result<Vec<HeldCheckpoint>, LedgerError> {
        let rows = self.inner.store.all_witnessed(peer.map(ToString::to_string)).await?;
        Ok(rows.into_iter().filter_map(held_checkpoint).collect())
    }

    /// `read` of the receipts of the verified chain (one per agreement, oldest first) and of the
    /// first bad row if there is one (the receipts stop before it). Verifies only the rows
    /// appended since the last call; the first call verifies the whole chain.
    pub async fn with_verified_receipts<R: Send + 'static>(
        &self,
        read: impl FnOnce(&[ReceiptBody], Option<&Broken>) -> R + Send + 'static,
    ) -> Result<R, LedgerError> {
        let mut verifier = self.inner.verified.clone().lock_owned().await;
        let path = self.inner.store.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let mut reader = LedgerReader::open(&path)?;
            reader.for_each_from(verifier.next_seq(), |row| {
                verifier.push(row);
                true
            })?;
            verifier.settle();
            Ok(read(verifier.counted(), verifier.broken()))
        })
        .await
        .map_err(|e| LedgerError::Encode(format!("the verification stopped: {e}")))?
    }

    /// Verifies the whole ledger as it is on disk (after appending what waits), holding it
    /// against the witnesses' answers.
    pub async fn verify(
        &self,
        witnesses: Vec<(String, Result<Option<Signed>, String>)>,
    ) -> Result<Report, LedgerError> {
        self.flush().await?;
        let path = self.inner.store.path().to_owned();
        tokio::task::spawn_blocking(move || verify_file(&path, witnesses))
            .await
            .map_err(|e| LedgerError::Encode(format!("the verification stopped: {e}")))?
            .map_err(LedgerError::from)
    }

    /// Credits earned and spent, from the receipts.
    pub async fn earnings(&self, by: Option<Period>) -> Result<Earnings, LedgerError> {
        self.flush().await?;
        let owner = self.inner.identity.peer_id().to_string();
        self.with_verified_receipts(move |receipts, broken| Earnings {
            broken: broken.cloned(),
            ..earnings::summarize(&owner, receipts, by)
        })
        .await
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<NewRow>> {
        self.inner.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `identity`'s signed checkpoint of its chain's `head`.
fn sign_head(identity: &Identity, head: &Head) -> Result<Signed, LedgerError> {
    let checkpoint = Checkpoint {
        version: VERSION,
        peer: identity.peer_id().to_string().into(),
        seq: head.seq,
        head: head.hash.clone(),
        at: unix_now(),
    };
    Signed::sign(identity, CHECKPOINT_TAG, &checkpoint).map_err(|e| LedgerError::Encode(e.to_string()))
}

/// A stored checkpoint of another agent's ledger, as the API shows it; `None` for one that no
/// longer reads (it was checked when it arrived).
fn held_checkpoint(stored: Witness) -> Option<HeldCheckpoint> {
    let checkpoint: SignedDocument = serde_json::from_str(&stored.document).ok()?;
    Some(HeldCheckpoint {
        peer: stored.peer.into(),
        seq: stored.seq,
        received_at: stored.received_at,
        checkpoint,
    })
}

fn new_row(kind: Kind, body: &impl Serialize) -> Result<NewRow, LedgerError> {
    let value = serde_json::to_value(body).map_err(|e| LedgerError::Encode(e.to_string()))?;
    let canonical = canonical_json(&value).map_err(|e| LedgerError::Encode(e.to_string()))?;
    let body = String::from_utf8(canonical).map_err(|e| LedgerError::Encode(e.to_string()))?;
    Ok(NewRow { at: unix_now(), kind, body })
}

/// Verifies the ledger in the store file at `path` (read-only; the daemon may be writing it),
/// holding it against the witnesses' answers. Blocks: call it on the blocking pool.
pub fn verify_file(
    path: &Path,
    witnesses: Vec<(String, Result<Option<Signed>, String>)>,
) -> Result<Report, StoreError> {
    let mut reader = LedgerReader::open(path)?;
    let owner = reader.owner()?;
    let mut verifier = Verifier::new(&owner);
    for (peer, answer) in witnesses {
        verifier.witness(&peer, answer);
    }
    reader.for_each(|row| {
        verifier.push(row);
        true
    })?;
    Ok(verifier.finish())
}

/// The owner of the ledger in the store file at `path` and the checkpoints it holds of other
/// agents' ledgers (`peer`'s alone, if given), read-only. Blocks.
pub fn held_in_file(path: &Path, peer: Option<&str>) -> Result<(String, Vec<HeldCheckpoint>), LedgerError> {
    let reader = LedgerReader::open(path)?;
    let held = reader.witnessed(peer)?.into_iter().filter_map(held_checkpoint).collect();
    Ok((reader.owner()?, held))
}

impl From<SignedDocument> for Signed {
    fn from(document: SignedDocument) -> Self {
        Signed { body: document.body, signature: document.signature }
    }
}

/// What an export carries beyond the rows (JSON Lines only).
#[derive(Debug, Default)]
pub struct ExportExtras<'a> {
    /// The owner's key, to sign the head with; the export is unsigned without it.
    pub signer: Option<&'a Identity>,
    /// Checkpoints of this ledger its counterparties hold, each with its holder.
    pub witnesses: Vec<(String, Signed)>,
    /// Checkpoints this ledger's owner holds of other agents' ledgers.
    pub held: Vec<Signed>,
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Rows written.
    pub rows: u64,
    /// Whether it ends with the owner's signed head.
    pub signed: bool,
}

/// Writes the ledger in the store file at `path` to `out` in `format`: the header, the
/// checkpoints in `extras`, every row of one snapshot, then (with `extras.signer`, whose ledger
/// it must be) the signed head of the last row written. Blocks.
pub fn export_file(
    path: &Path,
    format: ExportFormat,
    out: &mut impl std::io::Write,
    extras: &ExportExtras<'_>,
) -> Result<Exported, LedgerError> {
    let mut reader = LedgerReader::open(path)?;
    let owner = reader.owner()?;
    let signer = extras.signer.filter(|_| format == ExportFormat::Jsonl);
    if let Some(signer) = signer
        && signer.peer_id().to_string() != owner
    {
        return Err(LedgerError::Encode(format!(
            "{} is the ledger of {owner}, not of this agent ({}): only its owner can sign its head",
            path.display(),
            signer.peer_id()
        )));
    }
    verify::write_header(out, format, &owner)?;
    if format == ExportFormat::Jsonl {
        for (witness, checkpoint) in &extras.witnesses {
            verify::write_witness(out, witness, checkpoint)?;
        }
        for checkpoint in &extras.held {
            verify::write_held(out, checkpoint)?;
        }
    }
    let mut written = 0;
    let mut head = Head { seq: 0, hash: hex::encode(record::GENESIS) };
    let mut failure = None;
    reader.for_each_from(1, |row| match verify::write_row(out, format, &row) {
        Ok(()) => {
            written += 1;
            head = Head { seq: row.seq, hash: row.hash };
            true
        }
        Err(error) => {
            failure = Some(error);
            false
        }
    })?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    if let Some(signer) = signer {
        verify::write_signed_head(out, &sign_head(signer, &head)?)?;
    }
    out.flush()?;
    Ok(Exported { rows: written, signed: signer.is_some() })
}

#[cfg(test)]
mod model;
#[cfg(test)]
pub(crate) mod tests;
