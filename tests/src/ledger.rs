//! Ledger helpers for the crash test's writer and benchmark B5: countersigned receipts made the
//! way agents make them, with real signatures by both sides.

use anyhow::Result;
use hearth::identity::Identity;
use hearth::ledger::record::{self, RECEIPT_TAG, Receipt, ReceiptBody, Usage, VERSION};
use hearth::net::advert::Prices;
use hearth::net::negotiate::Signed;

/// A receipt `provider` signed and `consumer` countersigned for a job of one core and 1 GiB that
/// ran `running_ms` under `agreement_id` (`agreement_hash` is what it cites the terms by).
pub fn receipt(
    provider: &Identity,
    consumer: &Identity,
    agreement_id: &str,
    agreement_hash: &str,
    running_ms: u64,
) -> Result<Receipt> {
    let prices = Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 };
    let charges = record::charges(&prices, 1000, 1 << 30, 0, running_ms);
    let body = ReceiptBody {
        version: VERSION,
        agreement_id: agreement_id.to_owned().into(),
        agreement_hash: agreement_hash.to_owned(),
        provider: provider.peer_id().to_string().into(),
        consumer: consumer.peer_id().to_string().into(),
        outcome: "finished".into(),
        exit_code: Some(0),
        result: Some("cd".repeat(32)),
        usage: Usage { running_ms, cpu_core_ms: running_ms.saturating_sub(1000), ..Usage::default() },
        prices,
        price_per_hour: 1100,
        charges,
        amount: charges.total(),
        started_at: 1_796_472_000,
        ended_at: 1_796_472_060,
    };
    let signed = Signed::sign(provider, RECEIPT_TAG, &body)?;
    Ok(Receipt::countersign(consumer, signed)?)
}
