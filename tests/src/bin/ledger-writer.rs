//! A program the ledger crash test kills: it appends countersigned receipts to a store's ledger as
//! fast as it can, forever, and after each append has returned (so the receipt is on disk) prints
//! the receipt's sequence number on its own line and flushes, so the test knows exactly what was
//! acknowledged when its SIGKILL landed.
//!
//! `ledger-writer DB_PATH KEY_DIR MODE`: the store at DB_PATH belongs to the identity in KEY_DIR
//! (the provider, created if missing); the consumer who countersigns is the identity in
//! KEY_DIR/consumer. MODE is `realtime` (each receipt its own transaction) or `batch` (a few
//! records wait, then go in one transaction with the next receipt). It never returns on its own;
//! it stops with an error when stdout is gone.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use hearth::identity::Identity;
use hearth::ledger::record::Kind;
use hearth::ledger::{Ledger, Mode};
use hearth::store::Store;
use hearth_tests::ledger::receipt;

/// Records that wait for each receipt in batch mode.
const RECORDS_PER_RECEIPT: u64 = 3;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [db, keys, mode] = args.as_slice() else { bail!("usage: ledger-writer DB_PATH KEY_DIR MODE") };
    let mode = match mode.as_str() {
        "realtime" => Mode::Realtime,
        "batch" => Mode::Batch,
        other => bail!("MODE is realtime or batch, not {other:?}"),
    };
    let keys = PathBuf::from(keys);
    let consumer_dir = keys.join("consumer");
    std::fs::create_dir_all(&consumer_dir)?;
    let (provider, _) = Identity::load_or_create(&keys).context("the provider's identity")?;
    let (consumer, _) = Identity::load_or_create(&consumer_dir).context("the consumer's identity")?;
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let store = Store::open(db.as_ref(), &provider.peer_id()).await?;
        let ledger = Ledger::new(store, provider.clone(), mode);
        // Agreement ids unique across runs on the same file.
        let run = std::process::id();
        let mut stdout = std::io::stdout().lock();
        for n in 0u64.. {
            let agreement_id = format!("agreement-{run}-{n}");
            if mode == Mode::Batch {
                for step in 0..RECORDS_PER_RECEIPT {
                    let kind = if step + 1 == RECORDS_PER_RECEIPT { Kind::Release } else { Kind::Transfer };
                    let body = serde_json::json!({ "agreement_id": agreement_id, "step": step });
                    ledger.record(kind, &body).await?;
                }
            }
            let head = ledger
                .append_receipt(&receipt(
                    &provider,
                    &consumer,
                    &agreement_id,
                    &"ab".repeat(32),
                    60_000 + n % 1000,
                )?)
                .await?;
            writeln!(stdout, "{}", head.seq)?;
            stdout.flush()?;
        }
        Ok(())
    })
}
