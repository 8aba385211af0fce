//! Receipts for work done under an agreement, and the checkpoints traded with them.
//!
//! When a job ends, its provider measures what it used ([`Measured`] from the job folder), prices it
//! by the agreement ([`record::charges`]), signs the receipt and sends it with the last notice.
//! The consumer, once it has fetched the outputs, checks the receipt against the agreement and
//! the outputs' root ([`check`]), countersigns it, appends it to its ledger and returns the
//! countersignature with a checkpoint of its ledger; the provider verifies both signatures,
//! appends the same receipt to its own ledger and answers with its checkpoint. Each side keeps
//! the other's checkpoint, so neither can later rewrite its history unseen. Issued receipts wait
//! in memory ([`Issued`]) for their countersignature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde_json::json;

use super::Inner;
use crate::clock::unix_now;
use crate::jobs::JobState;
use crate::jobs::runner::Measured;
use crate::ledger::record::{self, Kind, RECEIPT_TAG, Receipt, ReceiptBody, Usage};
use crate::net::negotiate::{Agreement, Countersigned, Message, Reply, Signed, Terms};
use crate::transfer::Imported;
use hearth_api::ids::AgreementId;

/// How often a countersignature is offered to a provider that does not answer.
const COUNTERSIGN_TRIES: u32 = 3;

/// Slack on the agreed window when checking a receipt's running time (clocks and rounding).
const RUNNING_SLACK_MS: u64 = 5_000;

/// How long an issued receipt stays ready for its countersignature.
const COUNTERSIGN_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Receipts this agent issued as a provider in the last [`COUNTERSIGN_WAIT`], by agreement.
#[derive(Default)]
pub(super) struct Issued(HashMap<AgreementId, IssuedReceipt>);

struct IssuedReceipt {
    consumer: PeerId,
    signed: Signed,
    issued: Instant,
}

/// The provider's receipt for the job of `agreement` that ended in `state`, signed, and kept for
/// the consumer's countersignature. `None` when it cannot be made (logged).
pub(super) fn issue(
    inner: &Arc<Inner>,
    agreement: &Agreement,
    terms: &Terms,
    state: &JobState,
    measured: Option<Measured>,
    gpu_models: &[String],
    outputs: Option<&Imported>,
) -> Option<Signed> {
    let consumer: PeerId = terms.consumer.parse().ok()?;
    let measured = measured.unwrap_or_default();
    let body = receipt_body(agreement, terms, state, measured, gpu_models, outputs, unix_now());
    let signed = match Signed::sign(&inner.parts.identity, RECEIPT_TAG, &body) {
        Ok(signed) => signed,
        Err(error) => {
            tracing::error!(agreement = %terms.agreement_id, %error, "cannot sign a receipt");
            return None;
        }
    };
    let mut issued = inner.issued();
    // Receipts nobody countersigned within a day are not kept for ever.
    issued.0.retain(|_, receipt| receipt.issued.elapsed() < COUNTERSIGN_WAIT);
    let receipt = IssuedReceipt { consumer, signed: signed.clone(), issued: Instant::now() };
    issued.0.insert(terms.agreement_id.clone(), receipt);
    Some(signed)
}

/// What the provider states: the work priced by the agreement. `gpu_models` names the model of
/// each GPU the terms grant.
fn receipt_body(
    agreement: &Agreement,
    terms: &Terms,
    state: &JobState,
    measured: Measured,
    gpu_models: &[String],
    outputs: Option<&Imported>,
    now: i64,
) -> ReceiptBody {
    let resources = &terms.resources;
    let running_ms = measured.running_ms;
    let charges = record::charges(
        &terms.prices,
        resources.cpu_millis,
        resources.memory_bytes,
        resources.gpus,
        running_ms,
    );
    let usage = Usage {
        running_ms,
        cpu_core_ms: measured.cpu_usec / 1000,
        reserved_core_ms: u64::try_from(u128::from(resources.cpu_millis) * u128::from(running_ms) / 1000)
            .unwrap_or(u64::MAX),
        memory_mib_s: u64::try_from(u128::from(resources.memory_bytes >> 20) * u128::from(running_ms) / 1000)
            .unwrap_or(u64::MAX),
        gpu_s: record::gpu_seconds(gpu_models.iter().map(String::as_str), running_ms),
        disk_peak_bytes: measured.disk_peak_bytes,
        outputs_bytes: outputs.map_or(0, |imported| imported.size),
        network_bytes: measured.network_bytes,
    };
    ReceiptBody {
        version: record::VERSION,
        agreement_id: terms.agreement_id.clone(),
        agreement_hash: agreement.hash().unwrap_or_default(),
        provider: terms.provider.clone(),
        consumer: terms.consumer.clone(),
        outcome: state.name().to_owned(),
        exit_code: match state {
            JobState::Finished { exit_code } => Some(*exit_code),
            _ => None,
        },
        result: outputs.map(|imported| imported.blob.hash.to_string()),
        usage,
        prices: terms.prices.clone(),
        price_per_hour: terms.price_per_hour,
        charges,
        amount: charges.total(),
        started_at: terms.window[0],
        ended_at: now,
    }
}

/// Provider: the consumer's countersignature of the receipt of `agreement_id`. The receipt goes
/// into this agent's ledger and the consumer's checkpoint is kept; the answer is this agent's
/// checkpoint.
pub(super) async fn on_countersign(
    inner: &Arc<Inner>,
    peer: PeerId,
    agreement_id: &str,
    signature: String,
    checkpoint: Option<Signed>,
) -> Reply {
    let refused = |reason: &str| Reply::Refused { reason: reason.to_owned() };
    let signed = {
        let issued = inner.issued();
        let Some(receipt) = issued.0.get(agreement_id) else {
            return refused("no receipt of that agreement waits here");
        };
        if receipt.consumer != peer {
            return refused("the agreement is not with you");
        }
        receipt.signed.clone()
    };
    let receipt =
        Receipt { receipt: signed.body, provider_signature: signed.signature, consumer_signature: signature };
    if let Err(rejection) = receipt.verify() {
        return super::rejected("countersignature", &rejection);
    }
    // The ledger keeps one receipt per agreement: a countersignature sent again (its answer was
    // lost) counts once and is answered the same way.
    if let Err(error) = inner.parts.ledger.append_receipt(&receipt).await {
        tracing::error!(agreement = agreement_id, %error, "cannot keep a countersigned receipt");
        return refused("the provider could not keep the receipt");
    }
    tracing::info!(agreement = agreement_id, consumer = %peer, "receipt countersigned");
    if let Some(checkpoint) = checkpoint
        && let Err(error) = inner.parts.ledger.witness(&peer, &checkpoint).await
    {
        tracing::warn!(%peer, %error, "a checkpoint was not kept");
    }
    own_checkpoint(inner).await
}

/// Either side: the newest checkpoint of `peer`'s ledger this agent holds.
pub(super) async fn on_witness(inner: &Arc<Inner>, peer: PeerId) -> Reply {
    match inner.parts.ledger.held_of(&peer).await {
        Ok(checkpoint) => Reply::Checkpoint { checkpoint },
        Err(error) => Reply::Refused { reason: error.to_string() },
    }
}

/// How long a witness has to answer.
const WITNESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks every counterparty, at once, for the newest checkpoint of this agent's ledger it holds.
pub(super) async fn ask_witnesses(
    inner: &Arc<Inner>,
    only: Option<&str>,
) -> Vec<(String, Result<Option<Signed>, String>)> {
    let mut peers = match inner.parts.store.counterparties().await {
        Ok(peers) => peers,
        Err(error) => return vec![(String::new(), Err(error.to_string()))],
    };
    if let Some(only) = only {
        peers.retain(|peer| peer == only);
    }
    let asks = peers.into_iter().map(|peer| {
        let network = inner.parts.network.clone();
        async move {
            let answer = match peer.parse::<PeerId>() {
                Err(error) => Err(error.to_string()),
                Ok(id) => {
                    match tokio::time::timeout(WITNESS_TIMEOUT, network.negotiate(id, Message::Witness)).await
                    {
                        Err(_) => Err("no answer within 10 s".to_owned()),
                        Ok(Err(error)) => Err(error.to_string()),
                        Ok(Ok(Reply::Checkpoint { checkpoint })) => Ok(checkpoint),
                        Ok(Ok(Reply::Refused { reason })) => Err(format!("refused: {reason}")),
                        Ok(Ok(other)) => Err(format!("answered {other:?}")),
                    }
                }
            };
            (peer, answer)
        }
    });
    libp2p::futures::future::join_all(asks).await
}

async fn own_checkpoint(inner: &Arc<Inner>) -> Reply {
    match inner.parts.ledger.checkpoint().await {
        Ok(checkpoint) => Reply::Checkpoint { checkpoint },
        Err(error) => Reply::Refused { reason: error.to_string() },
    }
}

/// Consumer: checks the provider's receipt for the job that ended as `ended` with `outputs`
/// (fetched and verified), countersigns it, keeps it in the ledger and returns the
/// countersignature to the provider. An error says why it was not countersigned.
pub(super) async fn countersign(
    inner: &Arc<Inner>,
    provider: PeerId,
    agreement: &Agreement,
    signed: Signed,
    ended: &JobState,
    outputs: Option<&str>,
) -> Result<ReceiptBody, String> {
    let body: ReceiptBody =
        signed.open(RECEIPT_TAG, &provider).map_err(|e| format!("the receipt does not verify: {e}"))?;
    let terms = agreement.verify().map_err(|e| format!("the stored agreement does not verify: {e}"))?;
    check(&body, agreement, &terms, ended, outputs)?;
    let receipt = Receipt::countersign(&inner.parts.identity, signed).map_err(|e| e.to_string())?;
    inner.parts.ledger.append_receipt(&receipt).await.map_err(|e| e.to_string())?;
    let checkpoint = inner.parts.ledger.checkpoint().await.map_err(|e| e.to_string())?;
    let message = Message::Countersign {
        agreement_id: body.agreement_id.clone(),
        signature: receipt.consumer_signature.clone(),
        checkpoint,
    };
    for attempt in 1..=COUNTERSIGN_TRIES {
        match inner.parts.network.negotiate(provider, message.clone()).await {
            Ok(Reply::Checkpoint { checkpoint: Some(theirs) }) => {
                if let Err(error) = inner.parts.ledger.witness(&provider, &theirs).await {
                    tracing::warn!(%provider, %error, "the provider's checkpoint was not kept");
                }
                break;
            }
            Ok(reply) => {
                tracing::info!(%provider, ?reply, "the provider did not take the countersigned receipt");
                break;
            }
            Err(error) if attempt == COUNTERSIGN_TRIES => {
                tracing::info!(%provider, %error, "the countersigned receipt did not reach the provider");
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    Ok(body)
}

/// Whether a receipt states what the agreement and the fetched outputs say: the parties, the
/// agreement's hash, the agreed prices, charges that follow from them and the running time (which
/// must fit the agreed window), the outcome, and the outputs' root.
fn check(
    body: &ReceiptBody,
    agreement: &Agreement,
    terms: &Terms,
    ended: &JobState,
    outputs: Option<&str>,
) -> Result<(), String> {
    if body.agreement_id != terms.agreement_id
        || body.provider != terms.provider
        || body.consumer != terms.consumer
    {
        return Err("the receipt names another agreement or other parties".into());
    }
    if Some(&body.agreement_hash) != agreement.hash().ok().as_ref() {
        return Err("the receipt cites other terms than the agreement's".into());
    }
    if body.prices != terms.prices || body.price_per_hour != terms.price_per_hour {
        return Err("the receipt's prices are not the agreed ones".into());
    }
    let window_ms =
        u64::try_from(terms.window[1].saturating_sub(terms.window[0])).unwrap_or(0).saturating_mul(1000);
    if body.usage.running_ms > window_ms + RUNNING_SLACK_MS {
        return Err(format!(
            "the receipt counts {} ms of running, more than the agreed window",
            body.usage.running_ms
        ));
    }
    let resources = &terms.resources;
    let charges = record::charges(
        &terms.prices,
        resources.cpu_millis,
        resources.memory_bytes,
        resources.gpus,
        body.usage.running_ms,
    );
    if body.charges != charges || body.amount != charges.total() {
        return Err("the receipt's charges do not follow from the agreed prices".into());
    }
    // The models are the provider's to name; the GPU-seconds must add up to the granted GPUs'
    // running time (each model rounded down on its own, so a second less per model is fine).
    let (models, granted) = (body.usage.gpu_s.len() as u64, terms.gpus.len() as u64);
    let gpu_s = body.usage.gpu_s.values().fold(0u64, |sum, s| sum.saturating_add(*s));
    let whole =
        u64::try_from(u128::from(granted) * u128::from(body.usage.running_ms) / 1000).unwrap_or(u64::MAX);
    if models > granted || gpu_s > whole || gpu_s < whole.saturating_sub(models) {
        return Err(format!(
            "the receipt counts {gpu_s} GPU-seconds, but {granted} GPUs for {} ms make {whole}",
            body.usage.running_ms
        ));
    }
    if body.outcome != ended.name() {
        return Err(format!("the receipt says {} but the job ended {}", body.outcome, ended.name()));
    }
    if body.result.as_deref() != outputs {
        return Err("the receipt's result is not the root of the outputs received".into());
    }
    Ok(())
}

/// Records an ended agreement in the ledger (both sides).
pub(super) async fn release(inner: &Arc<Inner>, agreement_id: &str, outcome: &str) {
    inner
        .parts
        .ledger
        .note(Kind::Release, &json!({ "agreement_id": agreement_id, "outcome": outcome }))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::net::advert::Prices;
    use crate::net::negotiate::{AGREEMENT_TAG, Allocation, VERSION, sign_detached};
    use crate::transfer::{BlobRef, Format};

    fn identity() -> Identity {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap().0
    }

    fn agreement(provider: &Identity, consumer: &Identity) -> (Agreement, Terms) {
        let terms = Terms {
            version: VERSION,
            agreement_id: "a1".into(),
            request_id: "r1".into(),
            request_hash: "00".repeat(32),
            provider: provider.peer_id().to_string().into(),
            consumer: consumer.peer_id().to_string().into(),
            resources: Allocation {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                disk_bytes: 1 << 30,
                ..Allocation::default()
            },
            prices: Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 },
            price_per_hour: 2100,
            window: [1_000, 4_600],
            access_key: "ab".repeat(32),
            hosted: false,
            network: false,
            gpus: Vec::new(),
            issued_at: 1_000,
            expires_at: 1_060,
        };
        signed(provider, consumer, terms)
    }

    fn signed(provider: &Identity, consumer: &Identity, terms: Terms) -> (Agreement, Terms) {
        let offer = Signed::sign(provider, AGREEMENT_TAG, &terms).unwrap();
        let accepted = sign_detached(consumer, AGREEMENT_TAG, &offer.body).unwrap();
        let agreement = Agreement {
            terms: offer.body,
            provider_signature: offer.signature,
            consumer_signature: accepted,
        };
        (agreement, terms)
    }

    #[test]
    fn a_receipt_is_countersigned_only_when_it_follows_the_agreement_and_the_outputs() {
        let (provider, consumer) = (identity(), identity());
        let (agreement, terms) = agreement(&provider, &consumer);
        let outputs = Imported {
            blob: BlobRef {
                hash: crate::proto::blob_hash(bao_tree::blake3::hash(b"outputs")),
                format: Format::Folder,
            },
            size: 7,
            files: 1,
            skipped: Vec::new(),
        };
        let root = outputs.blob.hash.to_string();
        let finished = JobState::Finished { exit_code: 0 };
        let measured = Measured {
            running_ms: 1_800_000,
            cpu_usec: 1_700_000_000,
            disk_peak_bytes: 4096,
            network_bytes: 0,
        };
        let body = receipt_body(&agreement, &terms, &finished, measured, &[], Some(&outputs), 5_000);
        // Two cores and 1 GiB for half an hour at the agreed prices.
        assert_eq!((body.charges.cpu, body.charges.memory, body.amount), (1000, 50, 1050));
        assert_eq!(
            (body.usage.cpu_core_ms, body.usage.reserved_core_ms, body.usage.memory_mib_s),
            (1_700_000, 3_600_000, 1_843_200)
        );
        assert_eq!(body.exit_code, Some(0));
        assert_eq!(check(&body, &agreement, &terms, &finished, Some(&root)), Ok(()));

        let refused = |changed: ReceiptBody, ended: &JobState, outputs: Option<&str>| {
            check(&changed, &agreement, &terms, ended, outputs).unwrap_err()
        };
        let dearer = ReceiptBody { amount: 2000, ..body.clone() };
        assert!(refused(dearer, &finished, Some(&root)).contains("charges"));
        let padded =
            ReceiptBody { usage: Usage { running_ms: 7_200_000, ..body.usage.clone() }, ..body.clone() };
        assert!(refused(padded, &finished, Some(&root)).contains("window"));
        assert!(refused(body.clone(), &finished, Some(&"ff".repeat(32))).contains("root"));
        assert!(refused(body.clone(), &finished, None).contains("root"));
        let failed = JobState::Failed { reason: "x".into() };
        assert!(refused(body.clone(), &failed, Some(&root)).contains("ended failed"));
        let other = ReceiptBody { agreement_hash: "00".repeat(32), ..body.clone() };
        assert!(refused(other, &finished, Some(&root)).contains("other terms"));
        let cheaper = ReceiptBody { price_per_hour: 1, ..body };
        assert!(refused(cheaper, &finished, Some(&root)).contains("prices"));

        // A job that never ran is charged nothing.
        let nothing = receipt_body(&agreement, &terms, &failed, Measured::default(), &[], None, 5_000);
        assert_eq!((nothing.amount, nothing.result.as_deref()), (0, None));
        assert_eq!(check(&nothing, &agreement, &terms, &failed, None), Ok(()));
    }

    #[test]
    fn gpu_seconds_count_the_granted_gpus_by_model_and_are_checked() {
        let (provider, consumer) = (identity(), identity());
        let (_, mut terms) = agreement(&provider, &consumer);
        terms.resources.gpus = 2;
        terms.gpus = vec!["GPU-a".into(), "FAKE-GPU-0".into()];
        let (agreement, terms) = signed(&provider, &consumer, terms);
        let finished = JobState::Finished { exit_code: 0 };
        // 90 s of running, frozen time already left out by the runner.
        let measured = Measured { running_ms: 90_500, ..Measured::default() };
        let models = ["NVIDIA A100".to_owned(), "fake GPU (test setting)".to_owned()];
        let body = receipt_body(&agreement, &terms, &finished, measured, &models, None, 5_000);
        let expected: std::collections::BTreeMap<String, u64> =
            [("NVIDIA A100".to_owned(), 90), ("fake GPU (test setting)".to_owned(), 90)].into();
        assert_eq!(body.usage.gpu_s, expected);
        // 2 GPUs × 90.5 s at 10 credits per GPU-hour.
        assert_eq!(body.charges.gpu, 503);
        assert_eq!(check(&body, &agreement, &terms, &finished, None), Ok(()));

        let mut padded = body.clone();
        padded.usage.gpu_s.insert("NVIDIA A100".into(), 900);
        assert!(check(&padded, &agreement, &terms, &finished, None).unwrap_err().contains("GPU-seconds"));
        let mut missing = body;
        missing.usage.gpu_s.clear();
        assert!(check(&missing, &agreement, &terms, &finished, None).unwrap_err().contains("GPU-seconds"));
    }
}
