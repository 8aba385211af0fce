//! A state-machine model of the ledger, checked with proptest: random sequences of appends,
//! flushes and crashes run against a real ledger in a real SQLite file, in both modes, and after
//! every step the file verifies and holds exactly the rows the model says it must.
//!
//! A crash is what the disk holds at that instant: the store file and its write-ahead log are
//! copied while the ledger is open, and the copy is opened by a new ledger, as the next start
//! would. A crash during a write copies the log as the append left it, cut at a random byte of
//! what the append wrote: the kernel had part of it when the process died. The model: a row that
//! was acknowledged survives; the append cut short is there whole or not at all; rows waiting
//! for a batch are lost; and whatever survived verifies and goes on growing.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::json;

use super::record::Kind;
use super::tests::{identity_from, receipt};
use super::{Ledger, Mode, verify_file};
use crate::identity::Identity;
use crate::store::Store;

#[derive(Debug, Clone)]
enum Op {
    /// One record (a release).
    Record(u8),
    /// Two records in one transaction.
    Together(u8),
    /// A countersigned receipt, with every waiting record before it.
    Receipt(u8),
    /// The waiting records.
    Flush,
    /// The process dies between two writes.
    Crash,
    /// The process dies while a receipt's append is on its way to the disk, `cut` / 49152 of
    /// the way through what it wrote (past the end, a quarter of the time: it all got there).
    CrashDuringReceipt { n: u8, cut: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Record),
        2 => any::<u8>().prop_map(Op::Together),
        3 => any::<u8>().prop_map(Op::Receipt),
        2 => Just(Op::Flush),
        1 => Just(Op::Crash),
        2 => (any::<u8>(), any::<u16>()).prop_map(|(n, cut)| Op::CrashDuringReceipt { n, cut }),
    ]
}

/// What the file must hold.
#[derive(Debug, Default)]
struct Model {
    /// Rows on disk.
    rows: u64,
    /// Receipts among them.
    receipts: u64,
    /// Rows recorded but waiting for a batch (always 0 in real-time mode).
    waiting: u64,
    /// The agreements whose receipt is on disk: a receipt offered again is left out.
    receipted: std::collections::BTreeSet<u8>,
}

/// The ledger under test and the file it writes.
struct Subject {
    dir: tempfile::TempDir,
    path: PathBuf,
    owner: Identity,
    peer: Identity,
    mode: Mode,
    ledger: Ledger,
    /// How many crashes so far: each opens a new copy of the file.
    lives: u32,
}

impl Subject {
    async fn new(mode: Mode) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hearth-0.db");
        let (owner, peer) = (identity_from(7), identity_from(8));
        let ledger = open(&path, &owner, mode).await;
        Self { dir, path, owner, peer, mode, ledger, lives: 0 }
    }

    /// The file as a crash now would leave it, the log cut to `log_bytes` when given, opened by
    /// a new ledger as the next start would.
    async fn crash(&mut self, log_bytes: Option<u64>) {
        self.lives += 1;
        let copy = self.dir.path().join(format!("hearth-{}.db", self.lives));
        std::fs::copy(&self.path, &copy).expect("copying the store");
        let log = wal(&self.path);
        if log.exists() {
            std::fs::copy(&log, wal(&copy)).expect("copying the log");
            if let Some(length) = log_bytes {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(wal(&copy))
                    .expect("log")
                    .set_len(length)
                    .expect("cut");
            }
        }
        self.path = copy;
        self.ledger = open(&self.path, &self.owner, self.mode).await;
    }

    fn log_length(&self) -> u64 {
        std::fs::metadata(wal(&self.path)).map_or(0, |meta| meta.len())
    }
}

fn wal(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

async fn open(path: &Path, owner: &Identity, mode: Mode) -> Ledger {
    let store = Store::open(path, &owner.peer_id()).await.expect("opening the store");
    Ledger::new(store, owner.clone(), mode)
}

fn release(n: u8) -> serde_json::Value {
    json!({ "agreement_id": format!("agreement-{n}"), "outcome": "finished" })
}

/// Runs `ops` on a fresh ledger in `mode`, checking the file against the model after each.
async fn run(mode: Mode, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut subject = Subject::new(mode).await;
    let mut model = Model::default();
    let batch = mode == Mode::Batch;
    for (step, op) in ops.into_iter().enumerate() {
        match &op {
            Op::Record(n) => {
                subject.ledger.record(Kind::Release, &release(*n)).await.expect("record");
                if batch { model.waiting += 1 } else { model.rows += 1 }
            }
            Op::Together(n) => {
                let (first, second) = (release(*n), release(n.wrapping_add(1)));
                subject
                    .ledger
                    .record_together(&[(Kind::Release, &first), (Kind::Release, &second)])
                    .await
                    .expect("together");
                if batch { model.waiting += 2 } else { model.rows += 2 }
            }
            Op::Receipt(n) => {
                subject
                    .ledger
                    .append_receipt(&receipt(&subject.owner, &subject.peer, u64::from(*n)))
                    .await
                    .expect("receipt");
                let new = u64::from(model.receipted.insert(*n));
                model.rows += model.waiting + new;
                model.receipts += new;
                model.waiting = 0;
            }
            Op::Flush => {
                subject.ledger.flush().await.expect("flush");
                model.rows += model.waiting;
                model.waiting = 0;
            }
            Op::Crash => {
                subject.crash(None).await;
                model.waiting = 0;
            }
            Op::CrashDuringReceipt { n, cut } => {
                let before = subject.log_length();
                subject
                    .ledger
                    .append_receipt(&receipt(&subject.owner, &subject.peer, u64::from(*n)))
                    .await
                    .expect("receipt");
                let after = subject.log_length();
                // A checkpoint may have restarted the log: then the append is wholly on disk.
                let cut_at = (after > before)
                    .then(|| (before + (after - before) * u64::from(*cut) / 49_152).min(after));
                subject.crash(cut_at).await;
                let report = verify_file(&subject.path, Vec::new()).expect("verify");
                let new = u64::from(!model.receipted.contains(n));
                let (without, with) = (model.rows, model.rows + model.waiting + new);
                prop_assert!(
                    report.rows == without || report.rows == with,
                    "step {step}: an append cut short left {} rows, not {without} or {with}",
                    report.rows
                );
                if report.rows == with && new == 1 {
                    model.receipts += 1;
                    model.receipted.insert(*n);
                }
                model.rows = report.rows;
                model.waiting = 0;
            }
        }
        let report = verify_file(&subject.path, Vec::new()).expect("verify");
        prop_assert!(report.broken.is_none(), "step {step} ({op:?}): the chain broke: {:?}", report.broken);
        prop_assert_eq!(report.rows, model.rows, "step {} ({:?}): rows", step, op);
        prop_assert_eq!(report.receipts, model.receipts, "step {} ({:?}): receipts", step, op);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_realtime_ledger_keeps_every_acknowledged_row_through_crashes(ops in proptest::collection::vec(op(), 1..24)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run(Mode::Realtime, ops))?;
    }

    #[test]
    fn a_batch_ledger_keeps_every_flushed_row_through_crashes(ops in proptest::collection::vec(op(), 1..24)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run(Mode::Batch, ops))?;
    }
}
