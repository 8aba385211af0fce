//! A provider's offer for a remote job, the consumer's side: checked against the request sent to
//! that provider, taken at once from the best-ranked provider or after [`BETTER_OFFER_GRACE`]
//! from a lesser one, then accepted (files granted, terms countersigned, the agreement stored,
//! the other requests withdrawn).

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use crate::clock::{self, unix_now};
use crate::ledger::record::Kind;
use crate::market::{Inner, credits, price_per_hour};
use crate::net::negotiate::{AGREEMENT_TAG, Agreement, Message, Reply, Signed, Terms, sign_detached};
use crate::transfer::BlobRef;
use hearth_api::ids::JobId;

use super::{Negotiation, spawn_follow, update};

/// What a provider's offer may claim about its own time: providers give ten minutes at most
/// to accept (Hearth's own give one minute).
const OFFER_CLOCK: clock::Rules =
    clock::Rules { max_skew: clock::MAX_SKEW, max_lifetime: Duration::from_secs(10 * 60), max_age: None };

/// How long an offer from a provider ranked lower waits for one ranked higher.
pub(super) const BETTER_OFFER_GRACE: Duration = Duration::from_secs(2);

/// A provider offers terms: checked against what was asked, then accepted (the best offer, or the
/// best one after [`BETTER_OFFER_GRACE`]) or declined.
pub(in crate::market) async fn on_offer(inner: &Arc<Inner>, peer: PeerId, signed: Signed) -> Reply {
    let terms: Terms = match signed.open(AGREEMENT_TAG, &peer) {
        Ok(terms) => terms,
        Err(rejection) => return Reply::Declined { reason: format!("offer rejected: {rejection}") },
    };
    inner.parts.ledger.note(Kind::Offer, &signed).await;
    let declined = |reason: String| Reply::Declined { reason };
    let rank = {
        let state = inner.consumer();
        let Some(negotiation) =
            state.jobs.get(terms.request_id.as_str()).and_then(|e| e.negotiation.as_ref())
        else {
            return declined(format!("no request {} is looking for a provider", terms.request_id));
        };
        if let Err(reason) =
            check_offer(&terms, &peer, &inner.parts.identity.peer_id(), negotiation, unix_now())
        {
            return declined(reason);
        }
        negotiation.asked.iter().find(|a| a.peer == peer).map_or(usize::MAX, |a| a.rank)
    };
    // Wait while a better-ranked provider may still offer, then take this offer unless one was
    // taken meanwhile. Each change of the negotiation wakes the wait; the grace bounds it.
    let deadline = tokio::time::Instant::now() + BETTER_OFFER_GRACE;
    loop {
        let changed = inner.negotiated.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut state = inner.consumer();
            let Some(negotiation) =
                state.jobs.get_mut(terms.request_id.as_str()).and_then(|e| e.negotiation.as_mut())
            else {
                return declined("the job no longer looks for a provider".into());
            };
            if negotiation.decided {
                return declined("the consumer took another offer".into());
            }
            let better = negotiation.asked.iter().any(|a| a.rank < rank && !a.refused);
            if !better || tokio::time::Instant::now() >= deadline {
                negotiation.decided = true;
                inner.negotiated.notify_waiters();
                break;
            }
        }
        // Woken early or not, the loop looks again.
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
    match accept(inner, peer, &terms, signed).await {
        Ok(signature) => Reply::Accepted { signature },
        Err(reason) => {
            if let Some(negotiation) =
                inner.consumer().jobs.get_mut(terms.request_id.as_str()).and_then(|e| e.negotiation.as_mut())
            {
                negotiation.decided = false;
            }
            inner.negotiated.notify_waiters();
            declined(reason)
        }
    }
}

/// Whether the terms answer the request this agent sent to `peer`.
fn check_offer(
    terms: &Terms,
    peer: &PeerId,
    me: &PeerId,
    negotiation: &Negotiation,
    now: i64,
) -> Result<(), String> {
    let asked =
        negotiation.asked.iter().find(|a| a.peer == *peer).ok_or("the request was not sent to you")?;
    let wanted = &negotiation.template;
    if terms.provider != peer.to_string() || terms.consumer != me.to_string() {
        return Err("the terms name other parties".into());
    }
    if terms.request_hash != asked.request_hash {
        return Err("the terms cite another request".into());
    }
    clock::check(terms.issued_at, Some(terms.expires_at), now, &OFFER_CLOCK)
        .map_err(|e| format!("the offer {e}"))?;
    if terms.resources != wanted.resources {
        return Err("the terms grant other resources than the request asks".into());
    }
    let (offered, advertised) = (&terms.prices, &asked.prices);
    if offered.core_hour > advertised.core_hour
        || offered.memory_gib_hour > advertised.memory_gib_hour
        || offered.gpu_hour > advertised.gpu_hour
    {
        return Err("the terms' prices are above the provider's advert".into());
    }
    let distinct: std::collections::BTreeSet<&String> = terms.gpus.iter().collect();
    if terms.gpus.len() != wanted.resources.gpus as usize || distinct.len() != terms.gpus.len() {
        return Err(format!(
            "the terms grant {} distinct GPUs, not the {} asked for",
            distinct.len(),
            wanted.resources.gpus
        ));
    }
    if terms.network != wanted.network || terms.hosted != wanted.hosted {
        return Err("the terms grant other network or hosting than asked".into());
    }
    if terms.price_per_hour != price_per_hour(&terms.prices, &terms.resources) {
        return Err("the price does not follow from the terms' own prices".into());
    }
    if let Some(ceiling) = wanted.max_price_per_hour
        && terms.price_per_hour > ceiling
    {
        return Err(format!(
            "{} credits/h is above the ceiling of {}",
            credits(terms.price_per_hour),
            credits(ceiling)
        ));
    }
    Ok(())
}

/// Grants the files, countersigns, records the agreement and starts following the job.
async fn accept(inner: &Arc<Inner>, peer: PeerId, terms: &Terms, offer: Signed) -> Result<String, String> {
    let files: Vec<BlobRef> = {
        let state = inner.consumer();
        let entry = state.jobs.get(terms.request_id.as_str()).ok_or("the job is gone")?;
        entry.negotiation.as_ref().map(|n| n.template.files.values().copied().collect()).unwrap_or_default()
    };
    for blob in files {
        inner.parts.transfers.grant(peer, blob).await.map_err(|e| e.to_string())?;
    }
    let signature =
        sign_detached(&inner.parts.identity, AGREEMENT_TAG, &offer.body).map_err(|e| e.to_string())?;
    let agreement = Agreement {
        terms: offer.body,
        provider_signature: offer.signature,
        consumer_signature: signature.clone(),
    };
    let document = serde_json::to_string(&agreement).map_err(|e| e.to_string())?;
    inner
        .parts
        .store
        .put_agreement(&terms.agreement_id, "consumer", &peer.to_string(), document, unix_now())
        .await
        .map_err(|e| e.to_string())?;
    inner.parts.ledger.note(Kind::Agreement, &agreement).await;
    let others: Vec<PeerId> = {
        let mut state = inner.consumer();
        let entry = state.jobs.get_mut(terms.request_id.as_str()).ok_or("the job is gone")?;
        let negotiation = entry.negotiation.take().ok_or("the job no longer looks for a provider")?;
        inner.negotiated.notify_waiters();
        let others =
            negotiation.asked.into_iter().filter(|a| a.peer != peer && !a.refused).map(|a| a.peer).collect();
        entry.job.provider = Some(peer.to_string().into());
        entry.job.agreement_id = Some(terms.agreement_id.clone());
        entry.job.price_per_hour = Some(terms.price_per_hour);
        entry.job.agreement = Some(agreement);
        entry.job.note = Some(format!("agreed with {peer} at {} credits/h", credits(terms.price_per_hour)));
        others
    };
    update(inner, &terms.request_id, |_| {}).await;
    for other in others {
        let network = inner.parts.network.clone();
        let request_id = terms.request_id.clone();
        inner.tasks.spawn(async move {
            let _ = network.negotiate(other, Message::Withdraw { request_id }).await;
        });
    }
    spawn_follow(inner, JobId::from(terms.request_id.as_str()), terms.agreement_id.clone());
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Asked;
    use super::*;
    use crate::market::{PRICES, price_per_hour};
    use crate::net::advert::Prices;
    use crate::net::negotiate::{Allocation, JobRequest, VERSION};

    fn negotiation(provider: &PeerId, consumer: &PeerId) -> Negotiation {
        let template = JobRequest {
            version: VERSION,
            request_id: "r".into(),
            consumer: consumer.to_string().into(),
            provider: String::new().into(),
            issued_at: 0,
            expires_at: 1000,
            spec: String::new(),
            files: BTreeMap::new(),
            resources: Allocation {
                cpu_millis: 1000,
                memory_bytes: 1 << 28,
                disk_bytes: 1 << 30,
                ..Allocation::default()
            },
            time_limit_s: 60,
            network: false,
            hosted: false,
            max_price_per_hour: Some(2000),
            reservation: None,
        };
        let asked =
            Asked { peer: *provider, rank: 0, request_hash: "h".into(), refused: false, prices: PRICES };
        Negotiation { template, asked: vec![asked], decided: false }
    }

    fn terms(provider: &PeerId, consumer: &PeerId) -> Terms {
        let resources = Allocation {
            cpu_millis: 1000,
            memory_bytes: 1 << 28,
            disk_bytes: 1 << 30,
            ..Allocation::default()
        };
        Terms {
            version: VERSION,
            agreement_id: "a".into(),
            request_id: "r".into(),
            request_hash: "h".into(),
            provider: provider.to_string().into(),
            consumer: consumer.to_string().into(),
            resources,
            prices: PRICES,
            price_per_hour: price_per_hour(&PRICES, &resources),
            window: [0, 60],
            access_key: "00".repeat(32),
            hosted: false,
            network: false,
            gpus: Vec::new(),
            issued_at: 0,
            expires_at: 100,
        }
    }

    #[test]
    fn offers_that_do_not_answer_the_request_are_declined_with_the_reason() {
        let (provider, me, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let n = negotiation(&provider, &me);
        let good = terms(&provider, &me);
        assert_eq!(check_offer(&good, &provider, &me, &n, 50), Ok(()));

        let less = Allocation { cpu_millis: 500, ..good.resources };
        let cases: Vec<(Terms, PeerId, i64, &str)> = vec![
            (good.clone(), stranger, 50, "not sent to you"),
            (Terms { consumer: stranger.to_string().into(), ..good.clone() }, provider, 50, "other parties"),
            (Terms { request_hash: "other".into(), ..good.clone() }, provider, 50, "another request"),
            (good.clone(), provider, 100, "expired"),
            (
                Terms { resources: less, price_per_hour: price_per_hour(&PRICES, &less), ..good.clone() },
                provider,
                50,
                "other resources than the request",
            ),
            (Terms { network: true, ..good.clone() }, provider, 50, "network"),
            (
                Terms { gpus: vec!["GPU-a".into()], ..good.clone() },
                provider,
                50,
                "1 distinct GPUs, not the 0",
            ),
            (
                Terms { resources: Allocation { disk_bytes: u64::MAX, ..good.resources }, ..good.clone() },
                provider,
                50,
                "other resources than the request",
            ),
            (
                Terms { price_per_hour: good.price_per_hour - 1, ..good.clone() },
                provider,
                50,
                "does not follow",
            ),
            (
                Terms { prices: Prices { core_hour: 5000, ..PRICES }, price_per_hour: 5025, ..good.clone() },
                provider,
                50,
                "above the provider's advert",
            ),
        ];
        for (terms, from, now, expected) in cases {
            let reason = check_offer(&terms, &from, &me, &n, now).unwrap_err();
            assert!(reason.contains(expected), "{reason:?} should say {expected:?}");
        }

        // Dear prices the advert showed are still held to the request's ceiling.
        let mut dear = negotiation(&provider, &me);
        dear.asked[0].prices = Prices { core_hour: 5000, ..PRICES };
        let terms = Terms { prices: dear.asked[0].prices.clone(), price_per_hour: 5025, ..good };
        let reason = check_offer(&terms, &provider, &me, &dear, 50).unwrap_err();
        assert!(reason.contains("above the ceiling of 2.000"), "{reason:?}");

        // A GPU job's terms name as many distinct GPUs as it asks for.
        let mut gpu_job = negotiation(&provider, &me);
        gpu_job.template.resources.gpus = 2;
        gpu_job.template.max_price_per_hour = None;
        let resources = gpu_job.template.resources;
        let granting = |gpus: &[&str]| Terms {
            resources,
            price_per_hour: price_per_hour(&PRICES, &resources),
            prices: PRICES,
            gpus: gpus.iter().map(|uuid| (*uuid).to_owned()).collect(),
            ..terms.clone()
        };
        assert_eq!(check_offer(&granting(&["GPU-a", "GPU-b"]), &provider, &me, &gpu_job, 50), Ok(()));
        for wrong in [&["GPU-a"][..], &["GPU-a", "GPU-a"], &["GPU-a", "GPU-b", "GPU-c"]] {
            let reason = check_offer(&granting(wrong), &provider, &me, &gpu_job, 50).unwrap_err();
            assert!(reason.contains("not the 2 asked for"), "{wrong:?}: {reason:?}");
        }
    }
}
