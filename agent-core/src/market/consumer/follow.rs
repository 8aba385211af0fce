//! Following a remote job once agreed: the provider's signed notices move its state (in `seq`
//! order) and are kept in the ledger (read back by [`notices`]), the provider is asked for the
//! latest every [`STATUS_EVERY`] and the job fails when it stops answering, and the outputs are
//! fetched when the job ended there. The notices are what moves the job; the status question is
//! the liveness check that finds a provider gone (or a notice lost), so it stays on a timer.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::{MIN_OUTPUTS_CAP, MISSED_STATUS, STATUS_EVERY, update};
use crate::clock::unix_now;
use crate::jobs::JobState;
use crate::ledger::record::Kind;
use crate::market::receipts;
use crate::market::{Fetched, Inner, MarketError, fetch_to_end, rejected};
use crate::net::negotiate::{Agreement, Message, NOTICE_TAG, Notice, Reply, Signed};
use crate::transfer::{BlobRef, FetchRequest, Format};
use hearth_api::ids::{AgreementId, JobId};
use hearth_api::jobs::OwnerNotice;

/// How long past the agreed window a job may go without its provider ending it.
const OVERDUE_AFTER: Duration = Duration::from_secs(10 * 60);

/// A notice from the provider of one of this agent's jobs.
pub(in crate::market) async fn on_notice(inner: &Arc<Inner>, peer: PeerId, signed: Signed) -> Reply {
    match signed.open::<Notice>(NOTICE_TAG, &peer) {
        Ok(notice) => match apply(inner, &peer, notice, &signed).await {
            Ok(()) => Reply::Done,
            Err(reason) => Reply::Refused { reason },
        },
        Err(rejection) => rejected("notice", &rejection),
    }
}

/// The provider's signed notices about remote job `id` that reached this agent (kept in the
/// ledger), oldest first, each as the state the provider put the job in and why. Each is checked
/// again against the provider's key: the ledger holds what was received, and only what verifies
/// is shown.
pub(in crate::market) async fn notices(
    inner: &Arc<Inner>,
    id: &str,
) -> Result<Vec<OwnerNotice>, MarketError> {
    let job = super::job_of(inner, id)?;
    let provider = job.provider.as_deref().and_then(|p| p.parse::<PeerId>().ok());
    let (Some(agreement_id), Some(provider)) = (job.agreement_id, provider) else {
        // Not agreed yet: no provider has said anything.
        return Ok(Vec::new());
    };
    let mut notices: Vec<Notice> = inner
        .parts
        .ledger
        .bodies(Kind::Notice)
        .await?
        .iter()
        .filter_map(|body| serde_json::from_str::<Signed>(body).ok())
        // Cheap before the signature: most notices in a ledger are about other agreements.
        .filter(|signed| signed.body.get("agreement_id").and_then(|a| a.as_str()) == Some(&agreement_id))
        .filter_map(|signed| signed.open::<Notice>(NOTICE_TAG, &provider).ok())
        .filter(|notice| notice.agreement_id == agreement_id)
        .collect();
    notices.sort_by_key(|notice| notice.seq);
    notices.dedup_by_key(|notice| notice.seq);
    Ok(notices
        .into_iter()
        .map(|notice| OwnerNotice {
            job_id: id.to_owned().into(),
            kind: notice.job.name().to_owned(),
            reason: notice.reason.unwrap_or_default(),
            at: notice.at,
        })
        .collect())
}

/// Moves the job to the notice's state (and records the notice); when the job ended there,
/// fetches its outputs first.
async fn apply(inner: &Arc<Inner>, peer: &PeerId, notice: Notice, signed: &Signed) -> Result<(), String> {
    let fetch = {
        let mut state = inner.consumer();
        let entry = state.by_agreement(&notice.agreement_id).ok_or("no such agreement here")?;
        if entry.job.provider.as_deref() != Some(&peer.to_string()) {
            return Err("the agreement is not with you".into());
        }
        if notice.seq <= entry.notice_seq || entry.ended_there || entry.job.state.is_terminal() {
            return Ok(());
        }
        entry.notice_seq = notice.seq;
        if notice.job.is_terminal() {
            entry.ended_there = true;
            entry.job.note = Some("the job ended; fetching its outputs".into());
            entry.job.state = JobState::Transferring;
            let agreement = entry.job.agreement.clone();
            Some((
                entry.job.id.clone(),
                notice.outputs,
                notice.job.clone(),
                notice.reason.clone(),
                notice.receipt.clone(),
                agreement,
            ))
        } else {
            entry.job.state = notice.job.clone();
            entry.job.note = Some(notice.reason.clone().unwrap_or_else(|| format!("at {peer}")));
            None
        }
    };
    inner.parts.ledger.note(Kind::Notice, signed).await;
    let id = match &fetch {
        Some((id, ..)) => id.clone(),
        None => {
            inner.consumer().by_agreement(&notice.agreement_id).map(|e| e.job.id.clone()).unwrap_or_default()
        }
    };
    update(inner, &id, |_| {}).await;
    if let Some((id, outputs, ended, reason, receipt, agreement)) = fetch {
        let task_inner = Arc::clone(inner);
        let provider = *peer;
        let ending = Ending { ended, reason, receipt, agreement };
        inner.tasks.spawn(async move { fetch_outputs(task_inner, id, provider, outputs, ending).await });
    }
    Ok(())
}

/// What the provider's last notice said of the end of a job.
struct Ending {
    ended: JobState,
    reason: Option<String>,
    /// The provider's signed receipt.
    receipt: Option<Signed>,
    /// The agreement it was done under.
    agreement: Option<Agreement>,
}

/// Fetches a job's outputs, records them and the end of the agreement, countersigns the receipt,
/// and gives the job its final state.
async fn fetch_outputs(
    inner: Arc<Inner>,
    id: JobId,
    provider: PeerId,
    outputs: Option<BlobRef>,
    ending: Ending,
) {
    let Ending { ended, reason, receipt, agreement } = ending;
    let disk = inner
        .consumer()
        .get(&id)
        .and_then(|job| job.agreement)
        .and_then(|agreement| agreement.terms.get("resources")?.get("disk_bytes")?.as_u64());
    let cap = disk.unwrap_or(0).max(MIN_OUTPUTS_CAP);
    let fetched = match outputs.filter(|blob| blob.format == Format::Folder) {
        Some(blob) => {
            let request =
                FetchRequest { peer: provider.to_string().into(), blob, max_bytes: Some(cap), out: None };
            match fetch_to_end(&inner.parts.transfers, &inner.parts.events, request, &inner.stop).await {
                Fetched::Done(size) => Ok(Some((blob, size))),
                Fetched::Failed(error) => Err(error),
                // Left to resume with the agent: returned from just below.
                Fetched::Stopped(_) => Err(String::new()),
            }
        }
        None => Ok(None),
    };
    if inner.stop.is_cancelled() {
        // Left `transferring`: the next start asks the provider again and resumes the fetch.
        return;
    }
    let agreement_id =
        agreement.as_ref().and_then(|a| a.terms.get("agreement_id")?.as_str().map(str::to_owned));
    let (mut charged, mut unreceipted) = (None, None);
    if let (Ok(blob), Some(agreement_id)) = (&fetched, &agreement_id) {
        if let Some((blob, size)) = blob {
            let arrived = serde_json::json!({
                "agreement_id": agreement_id,
                "what": "outputs",
                "blobs": [blob.hash.to_string()],
                "bytes": size,
            });
            inner.parts.ledger.note(Kind::Transfer, &arrived).await;
        }
        receipts::release(&inner, agreement_id, ended.name()).await;
        let root = blob.map(|(blob, _)| blob.hash.to_string());
        match (receipt, &agreement) {
            (Some(receipt), Some(agreement)) => {
                match receipts::countersign(&inner, provider, agreement, receipt, &ended, root.as_deref())
                    .await
                {
                    Ok(body) => charged = Some(body.amount),
                    Err(why) => {
                        tracing::warn!(%provider, agreement = %agreement_id, "receipt not countersigned: {why}");
                        unreceipted = Some(format!("its receipt was not countersigned: {why}"));
                    }
                }
            }
            _ => {
                tracing::warn!(%provider, agreement = %agreement_id, "the job ended without a receipt");
                unreceipted = Some("the provider sent no receipt".to_owned());
            }
        }
    }
    update(&inner, &id, |job| match fetched {
        Ok(blob) => {
            job.outputs = blob.map(|(blob, _)| blob);
            job.state = ended;
            // What the job owner should know: the provider owner's reason, and a receipt that
            // could not be countersigned.
            job.note = match (reason, unreceipted) {
                (Some(reason), Some(problem)) => Some(format!("{reason}; {problem}")),
                (reason, problem) => reason.or(problem),
            };
            job.charged = charged;
        }
        Err(error) => {
            job.state = JobState::Failed {
                reason: format!(
                    "the job ended ({}) but its outputs could not be fetched: {error}",
                    ended.name()
                ),
            };
        }
    })
    .await;
}

pub(super) fn spawn_follow(inner: &Arc<Inner>, id: JobId, agreement_id: AgreementId) {
    let task_inner = Arc::clone(inner);
    inner.tasks.spawn(async move { follow(task_inner, id, agreement_id).await });
}

/// Asks the provider for the latest notice every [`STATUS_EVERY`] until the job ended there; a
/// provider that stops answering fails the job.
async fn follow(inner: Arc<Inner>, id: JobId, agreement_id: AgreementId) {
    let mut missed = 0;
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(STATUS_EVERY) => {}
        }
        let (provider, window_end) = {
            let state = inner.consumer();
            let Some(entry) = state.jobs.get(&id) else { return };
            if entry.ended_there || entry.job.state.is_terminal() {
                return;
            }
            let window_end =
                entry.job.agreement.as_ref().and_then(|a| a.terms.get("window")?.get(1)?.as_i64());
            (entry.job.provider.as_deref().and_then(|p| p.parse::<PeerId>().ok()), window_end)
        };
        let Some(provider) = provider else { return };
        if window_end.is_some_and(|end| unix_now() > end.saturating_add(OVERDUE_AFTER.as_secs() as i64)) {
            // A provider that keeps the job past its window (and its own time limit) is not
            // going to end it: fail it here and ask the provider to stop it.
            let cancel = Message::Cancel { agreement_id: agreement_id.clone() };
            let _ = inner.parts.network.negotiate(provider, cancel).await;
            let reason =
                format!("the provider {provider} kept the job past its agreed window without ending it");
            update(&inner, &id, |job| {
                if !job.state.is_terminal() {
                    job.state = JobState::Failed { reason };
                }
            })
            .await;
            return;
        }
        let message = Message::Status { agreement_id: agreement_id.clone() };
        let failure = match inner.parts.network.negotiate(provider, message).await {
            Ok(Reply::Notice { notice }) => match notice.open::<Notice>(NOTICE_TAG, &provider) {
                Ok(opened) => {
                    missed = 0;
                    let _ = apply(&inner, &provider, opened, &notice).await;
                    continue;
                }
                Err(rejection) => {
                    // Not an answer: it counts as a missed one.
                    tracing::warn!(%provider, %rejection, "a status notice did not verify");
                    missed += 1;
                    (missed >= MISSED_STATUS)
                        .then(|| format!("the provider {provider} sends notices that do not verify"))
                }
            },
            Ok(Reply::Refused { reason }) => Some(reason),
            Ok(_) => {
                missed = 0;
                continue;
            }
            Err(error) => {
                missed += 1;
                (missed >= MISSED_STATUS)
                    .then(|| format!("the provider {provider} stopped answering: {error}"))
            }
        };
        if let Some(reason) = failure {
            update(&inner, &id, |job| {
                if !job.state.is_terminal() {
                    job.state = JobState::Failed { reason };
                }
            })
            .await;
            return;
        }
    }
}
