//! The ledger's stored formats: what a row holds, how it is hashed into the chain, and the
//! receipts and checkpoints signed into it. Types and byte rules only, no I/O; the layout is
//! written down byte for byte in `docs/ledger.md`.
//!
//! A row is an entry `{"at": T, "body": B, "kind": K, "seq": N}` and two hashes: `prev`, the
//! `hash` of row N-1 (64 zeros for row 1), and `hash` = SHA-256(`prev` as 32 raw bytes ‖ the RFC
//! 8785 canonical bytes of the entry). Changing, removing, inserting or reordering any row breaks
//! the chain at that row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::{DomainTag, Identity};
use crate::net::advert::{Prices, Rejection};
use crate::net::negotiate::{Signed, peer_field, sign_detached, verify_detached};
pub use crate::proto::{GENESIS, Kind, Row, entry_bytes, entry_bytes_of_canonical, row_hash};
use hearth_api::ids::{self, AgreementId};
pub use hearth_api::ledger::Charges;

/// The format of every ledger document this code writes and reads.
pub const VERSION: u64 = 1;

/// Domain tag of a receipt: the provider signs it, the consumer countersigns the same bytes.
pub const RECEIPT_TAG: DomainTag = DomainTag::new(b"hearth/receipt/v1");

/// Domain tag of a checkpoint: an agent's signed statement of its ledger's head.
pub const CHECKPOINT_TAG: DomainTag = DomainTag::new(b"hearth/checkpoint/v1");

/// What a job used, as the provider measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Wall-clock time the job ran, paused time excluded, in milliseconds.
    pub running_ms: u64,
    /// CPU time the job's processes used (the cgroup's count), in core-milliseconds.
    pub cpu_core_ms: u64,
    /// Cores set aside for the job over its running time, in core-milliseconds: what is charged.
    pub reserved_core_ms: u64,
    /// Memory set aside over the running time, in MiB-seconds: what is charged.
    pub memory_mib_s: u64,
    /// GPU time by GPU model, in GPU-seconds.
    pub gpu_s: BTreeMap<String, u64>,
    /// The most scratch disk (`/out`, `/work`, `/tmp`) the job held at once, in bytes.
    pub disk_peak_bytes: u64,
    /// The size of the outputs, in bytes.
    pub outputs_bytes: u64,
    /// Bytes the job sent and received over its granted network; 0 without network.
    pub network_bytes: u64,
}

/// What finished (or stopped, or failed) work used and costs. The provider signs it under
/// [`RECEIPT_TAG`]; the consumer checks it and countersigns the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// [`VERSION`].
    pub version: u64,
    /// The agreement the work was done under.
    pub agreement_id: AgreementId,
    /// BLAKE3 (hex) of the agreement's canonical terms, as both signed them.
    pub agreement_hash: String,
    /// Who did the work.
    pub provider: ids::PeerId,
    /// Whose work it was.
    pub consumer: ids::PeerId,
    /// `finished`, `failed` or `cancelled`.
    pub outcome: String,
    /// The job's exit code, when it finished.
    pub exit_code: Option<i32>,
    /// The outputs' root: the BLAKE3 (hex) of the folder blob that carries them, when there are any.
    pub result: Option<String>,
    /// What was used.
    pub usage: Usage,
    /// The agreed prices per resource-hour, in thousandths of a credit.
    pub prices: Prices,
    /// The agreed price of the resources for an hour, in thousandths of a credit.
    pub price_per_hour: u64,
    /// What each kind of resource costs for `usage`.
    pub charges: Charges,
    /// `charges` together, in thousandths of a credit.
    pub amount: u64,
    /// Unix seconds: when the agreement was made.
    pub started_at: i64,
    /// Unix seconds: when the job ended.
    pub ended_at: i64,
}

/// A receipt with both signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The receipt as the provider signed it.
    pub receipt: Value,
    /// The provider's signature (hex) under [`RECEIPT_TAG`].
    pub provider_signature: String,
    /// The consumer's signature (hex) over the same bytes.
    pub consumer_signature: String,
}

impl Receipt {
    /// The consumer's countersignature over a receipt the provider signed.
    pub fn countersign(consumer: &Identity, signed: Signed) -> Result<Self, Rejection> {
        let consumer_signature = sign_detached(consumer, RECEIPT_TAG, &signed.body)?;
        Ok(Self { receipt: signed.body, provider_signature: signed.signature, consumer_signature })
    }

    /// Checks both signatures against the peers the receipt names, and reads it.
    pub fn verify(&self) -> Result<ReceiptBody, Rejection> {
        let issued = Signed { body: self.receipt.clone(), signature: self.provider_signature.clone() };
        let body: ReceiptBody = issued.open(RECEIPT_TAG, &peer_field(&self.receipt, "provider")?)?;
        let consumer = peer_field(&self.receipt, "consumer")?;
        verify_detached(RECEIPT_TAG, &self.receipt, &self.consumer_signature, &consumer)?;
        Ok(body)
    }
}

/// An agent's signed statement of its ledger's head. Signed under [`CHECKPOINT_TAG`] by `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`VERSION`].
    pub version: u64,
    /// Whose ledger.
    pub peer: ids::PeerId,
    /// Its last row.
    pub seq: u64,
    /// That row's hash (hex).
    pub head: String,
    /// Unix seconds.
    pub at: i64,
}

/// What `reserved` × `running_ms` costs at `prices`: each kind rounded up to a thousandth of a
/// credit. Charged on what was set aside, as the agreement priced it, not on what the job chose
/// to use of it.
pub fn charges(prices: &Prices, cpu_millis: u64, memory_bytes: u64, gpus: u32, running_ms: u64) -> Charges {
    const HOUR_MS: u128 = 3_600_000;
    const GIB: u128 = 1 << 30;
    let ms = u128::from(running_ms);
    let cost = |numerator: u128, denominator: u128| {
        u64::try_from(numerator.div_ceil(denominator)).unwrap_or(u64::MAX)
    };
    Charges {
        cpu: cost(u128::from(prices.core_hour) * u128::from(cpu_millis) * ms, 1000 * HOUR_MS),
        memory: cost(u128::from(prices.memory_gib_hour) * u128::from(memory_bytes) * ms, GIB * HOUR_MS),
        gpu: cost(u128::from(prices.gpu_hour) * u128::from(gpus) * ms, HOUR_MS),
    }
}

/// GPU-seconds by GPU model: each granted GPU (named by its model) counts `running_ms`, the
/// time the job ran with its GPUs, paused time excluded, as [`charges`] charges it; rounded down
/// to whole seconds per model.
pub fn gpu_seconds<'a>(models: impl IntoIterator<Item = &'a str>, running_ms: u64) -> BTreeMap<String, u64> {
    let mut gpus: BTreeMap<String, u64> = BTreeMap::new();
    for model in models {
        *gpus.entry(model.to_owned()).or_default() += 1;
    }
    gpus.into_iter()
        .map(|(model, count)| {
            (model, u64::try_from(u128::from(count) * u128::from(running_ms) / 1000).unwrap_or(u64::MAX))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::canonical_json;
    use ring::digest::{SHA256, digest};

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.name()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), Value::from(kind.name()));
        }
        assert_eq!(Kind::parse("payment"), None);
    }

    #[test]
    fn an_entry_is_canonical_and_its_hash_chains_on_the_one_before() {
        let body = serde_json::json!({ "b": 2, "a": "x" });
        let entry = entry_bytes(3, 1_700_000_000, "release", &body).unwrap();
        assert_eq!(
            String::from_utf8(entry.clone()).unwrap(),
            r#"{"at":1700000000,"body":{"a":"x","b":2},"kind":"release","seq":3}"#
        );
        let text = String::from_utf8(canonical_json(&body).unwrap()).unwrap();
        assert_eq!(entry_bytes_of_canonical(3, 1_700_000_000, Kind::Release, &text), entry);
        let first = row_hash(&GENESIS, &entry);
        assert_ne!(row_hash(&first, &entry), first, "the same entry after another row hashes differently");
        // SHA-256 over 32 zero bytes followed by the entry, computed apart.
        let mut message = vec![0u8; 32];
        message.extend_from_slice(&entry);
        assert_eq!(first.as_slice(), digest(&SHA256, &message).as_ref());
    }

    #[test]
    fn charges_follow_the_agreed_prices_and_round_up() {
        let prices = Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 };
        // Two cores and 1 GiB for half an hour.
        let half_hour = charges(&prices, 2000, 1 << 30, 0, 1_800_000);
        assert_eq!(half_hour, Charges { cpu: 1000, memory: 50, gpu: 0 });
        assert_eq!(half_hour.total(), 1050);
        // One millisecond of anything costs a thousandth of a credit, not nothing.
        assert_eq!(charges(&prices, 1, 1, 1, 1), Charges { cpu: 1, memory: 1, gpu: 1 });
        assert_eq!(charges(&prices, 4000, 1 << 34, 2, 0), Charges::default());
    }

    #[test]
    fn gpu_seconds_count_each_gpu_by_its_model() {
        type Case = (&'static [&'static str], u64, &'static [(&'static str, u64)]);
        let cases: [Case; 4] = [
            (&[], 60_000, &[]),
            (&["RTX 4090"], 2_500, &[("RTX 4090", 2)]),
            (&["RTX 4090", "RTX 4090", "A100"], 90_000, &[("A100", 90), ("RTX 4090", 180)]),
            (&["A100"], 999, &[("A100", 0)]),
        ];
        for (models, running_ms, expected) in cases {
            let expected: BTreeMap<String, u64> =
                expected.iter().map(|(m, s)| ((*m).to_owned(), *s)).collect();
            assert_eq!(gpu_seconds(models.iter().copied(), running_ms), expected, "{models:?}");
        }
    }
}
