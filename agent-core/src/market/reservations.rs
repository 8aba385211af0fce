//! Reservations, the provider's side: resources held for one resource of another agent's request
//! package. A signed ask (`reserve`) is granted at once when the resources are idle now, or
//! refused with the reason; the grant is a signed [`Reservation`]. While held, the resources count
//! as busy for the matcher, and the consumer's tasks under it draw on them (their requests name
//! the reservation and are offered terms at once, not matched). A reservation ends when the
//! consumer sends a signed release, or lapses by itself `hold_s` after it was granted, last kept,
//! or last used, so a consumer that vanished leaves nothing held for long.

use std::collections::HashMap;
use std::sync::Arc;

pub use hearth_api::market::HeldReservation;
use libp2p::PeerId;

use super::matching::Amount;
use super::provider::{capacity_amount, refused};
use super::{Inner, PRICES, amount, credits, price_per_hour, rejected};
use crate::availability::Availability;
use crate::clock::{self, unix_now};
use crate::ledger::record::Kind;
use crate::net::negotiate::{
    Allocation, JobRequest, RELEASE_TAG, RESERVATION_TAG, RESERVE_TAG, Release, Reply, Reservation,
    ReserveRequest, Signed, VERSION,
};
use hearth_api::ids::RequestId;

/// The longest a reservation may be held idle between two keeps.
pub const MAX_HOLD_S: u64 = 60 * 60;

/// What an ask may claim about its own time: it carries no expiry, so it must be fresh.
const ASK_CLOCK: clock::Rules =
    clock::Rules { max_skew: clock::MAX_SKEW, max_lifetime: clock::MAX_SKEW, max_age: Some(clock::MAX_SKEW) };

/// The most reservations one consumer may hold here at once.
const MAX_PER_PEER: usize = 64;

/// The most reservations held here at once.
const MAX_HELD: usize = 4096;

/// One reservation held here.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) consumer: PeerId,
    pub(super) request_id: RequestId,
    pub(super) resource: String,
    pub(super) resources: Allocation,
    pub(super) network: bool,
    pub(super) gpus: Vec<String>,
    hold_s: u64,
    pub(super) expires_at: i64,
    /// The grant as signed, answered again to a repeated ask.
    grant: Signed,
    /// Agreements of tasks running in it.
    pub(super) in_use: u32,
}

/// The reservations held now, by id.
pub(super) type Reservations = HashMap<String, Held>;

/// Checks an ask and holds the resources, or says why not.
pub(super) async fn on_reserve(inner: &Arc<Inner>, peer: PeerId, signed: Signed) -> Reply {
    let ask: ReserveRequest = match signed.open(RESERVE_TAG, &peer) {
        Ok(ask) => ask,
        Err(rejection) => return rejected("reservation request", &rejection),
    };
    let capacity = match &*inner.parts.availability.borrow() {
        Availability::Sharing { capacity, .. } => capacity.clone(),
        Availability::Paused { reasons } => {
            let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            return refused(format!("this agent is paused: {}", reasons.join("; ")));
        }
    };
    let now = unix_now();
    if let Err(reason) = check(&ask, &peer, &inner.parts.identity.peer_id(), now) {
        return refused(reason);
    }
    let request_hash = match signed.hash() {
        Ok(hash) => hash,
        Err(rejection) => return rejected("reservation request", &rejection),
    };
    let granted = {
        let mut state = inner.provider();
        if let Some(held) = state.reservations.get(&ask.reservation_id) {
            // The answer to an earlier ask was lost: the same grant again.
            return if held.consumer == peer {
                Reply::Reserved { reservation: held.grant.clone() }
            } else {
                refused("that reservation id is taken".into())
            };
        }
        if state.reservations.len() >= MAX_HELD {
            return refused(format!("{MAX_HELD} reservations are held here already; try later"));
        }
        if state.reservations.values().filter(|held| held.consumer == peer).count() >= MAX_PER_PEER {
            return refused(format!("you hold {MAX_PER_PEER} reservations here already"));
        }
        let whole = capacity_amount(&capacity);
        let idle = whole.saturating_sub(&state.busy());
        let wanted = amount(&ask.resources);
        if !wanted.fits_in(&whole) {
            return refused(too_big(&ask.resources, &whole));
        }
        if !wanted.fits_in(&idle) {
            return refused(format!(
                "busy: {} of what it asks is held or in use now; try later",
                short(&ask.resources)
            ));
        }
        // Not one granted to a running agreement, offered, or held already.
        let taken = state.gpus_taken();
        let gpus: Vec<String> = capacity
            .gpus
            .iter()
            .map(|gpu| gpu.uuid.clone())
            .filter(|uuid| !taken.contains(uuid))
            .take(ask.resources.gpus as usize)
            .collect();
        if gpus.len() < ask.resources.gpus as usize {
            return refused("busy: its GPUs are held for someone else now; try later".into());
        }
        let grant = Reservation {
            version: VERSION,
            reservation_id: ask.reservation_id.clone(),
            request_hash,
            provider: inner.parts.identity.peer_id().to_string().into(),
            consumer: peer.to_string().into(),
            resources: ask.resources,
            prices: PRICES,
            gpus: gpus.clone(),
            issued_at: now,
            expires_at: now.saturating_add(ask.hold_s as i64),
        };
        let grant = match Signed::sign(&inner.parts.identity, RESERVATION_TAG, &grant) {
            Ok(grant) => grant,
            Err(error) => return refused(format!("cannot sign the reservation: {error}")),
        };
        state.reservations.insert(
            ask.reservation_id.clone(),
            Held {
                consumer: peer,
                request_id: ask.request_id.clone(),
                resource: ask.resource.clone(),
                resources: ask.resources,
                network: ask.network,
                gpus,
                hold_s: ask.hold_s,
                expires_at: now.saturating_add(ask.hold_s as i64),
                grant: grant.clone(),
                in_use: 0,
            },
        );
        grant
    };
    tracing::info!(reservation = %ask.reservation_id, consumer = %peer, "holding resources");
    let asked = serde_json::json!({ "event": "reserve", "document": signed });
    let held = serde_json::json!({ "event": "granted", "document": granted });
    if let Err(error) =
        inner.parts.ledger.record_together(&[(Kind::Reservation, &asked), (Kind::Reservation, &held)]).await
    {
        tracing::error!(%error, "cannot write a reservation's records");
    }
    Reply::Reserved { reservation: granted }
}

/// Whether an ask can be held at all (now or later).
pub(crate) fn check(ask: &ReserveRequest, from: &PeerId, me: &PeerId, now: i64) -> Result<(), String> {
    if ask.consumer != from.to_string() {
        return Err(format!("the ask names {} but came from {from}", ask.consumer));
    }
    if ask.provider != me.to_string() {
        return Err(format!("the ask is addressed to {}, not to this agent", ask.provider));
    }
    clock::check(ask.issued_at, None, now, &ASK_CLOCK).map_err(|e| format!("the ask {e}"))?;
    let id_ok = (8..=64).contains(&ask.reservation_id.len())
        && ask.reservation_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !id_ok {
        return Err("the reservation id is not 8 to 64 letters and digits".into());
    }
    if ask.request_id.len() > 64 || ask.resource.len() > 64 {
        return Err("the request id or the resource name is over 64 bytes".into());
    }
    if !(1..=MAX_HOLD_S).contains(&ask.hold_s) {
        return Err(format!("a reservation is held idle from 1 s to {MAX_HOLD_S} s"));
    }
    let wanted = &ask.resources;
    if wanted.cpu_millis == 0 || wanted.memory_bytes == 0 {
        return Err("the ask holds no cores or no memory".into());
    }
    let price = price_per_hour(&PRICES, wanted);
    if let Some(ceiling) = ask.max_price_per_hour
        && price > ceiling
    {
        return Err(format!(
            "it costs {} credits/h here, above its ceiling of {}",
            credits(price),
            credits(ceiling)
        ));
    }
    Ok(())
}

fn short(resources: &Allocation) -> String {
    let mut parts = vec![format!("{} cores", resources.cpu_millis as f64 / 1000.0)];
    parts.push(format!("{:.2} GiB", resources.memory_bytes as f64 / f64::from(1u32 << 30)));
    if resources.gpus > 0 {
        parts.push(format!("{} GPUs", resources.gpus));
    }
    parts.join(", ")
}

fn too_big(resources: &Allocation, whole: &Amount) -> String {
    format!(
        "it asks {}; this agent offers at most {} cores, {:.2} GiB and {} GPUs",
        short(resources),
        whole.cpu_millis as f64 / 1000.0,
        whole.memory_bytes as f64 / f64::from(1u32 << 30),
        whole.gpus
    )
}

/// The consumer still wants the reservation: it is held another `hold_s`.
pub(super) fn on_keep(inner: &Arc<Inner>, peer: PeerId, reservation_id: &str) -> Reply {
    let mut state = inner.provider();
    match state.reservations.get_mut(reservation_id) {
        Some(held) if held.consumer == peer => {
            held.expires_at = held.expires_at.max(unix_now().saturating_add(held.hold_s as i64));
            Reply::Done
        }
        _ => refused(format!(
            "no reservation {reservation_id} of yours is held here (it lapsed or was released)"
        )),
    }
}

/// The consumer releases a reservation: its resources are free again. A release of what is not
/// held (any more) is answered `done` too, so a consumer may repeat it safely.
pub(super) async fn on_release(inner: &Arc<Inner>, peer: PeerId, signed: Signed) -> Reply {
    let release: Release = match signed.open(RELEASE_TAG, &peer) {
        Ok(release) => release,
        Err(rejection) => return rejected("release", &rejection),
    };
    if release.consumer != peer.to_string() || release.provider != inner.parts.identity.peer_id().to_string()
    {
        return refused("the release names other parties".into());
    }
    let freed = {
        let mut state = inner.provider();
        match state.reservations.get(&release.reservation_id) {
            Some(held) if held.consumer == peer => state.reservations.remove(&release.reservation_id),
            _ => None,
        }
    };
    if freed.is_some() {
        tracing::info!(reservation = %release.reservation_id, reason = %release.reason, "released");
        inner
            .parts
            .ledger
            .note(Kind::Reservation, &serde_json::json!({ "event": "released", "document": signed }))
            .await;
        inner.wake.notify_one();
    }
    Reply::Done
}

/// A task's request that names a reservation: whether it fits in what is held for its consumer.
pub(super) fn check_task(
    inner: &Inner,
    peer: &PeerId,
    request: &JobRequest,
    reservation_id: &str,
) -> Result<(), String> {
    let state = inner.provider();
    let held = state
        .reservations
        .get(reservation_id)
        .filter(|held| held.consumer == *peer)
        .ok_or_else(|| format!("no reservation {reservation_id} of yours is held here"))?;
    let (asked, has) = (&request.resources, &held.resources);
    if asked.cpu_millis > has.cpu_millis
        || asked.memory_bytes > has.memory_bytes
        || asked.disk_bytes > has.disk_bytes
        || asked.gpus > has.gpus
        // A reservation holds GPUs by count: a task asking memory of each asks more than that.
        || asked.vram_bytes > has.vram_bytes
    {
        return Err("the task asks for more than its reservation holds".into());
    }
    if request.network && !held.network {
        return Err("the task asks for network; its reservation was not for network".into());
    }
    Ok(())
}

/// A task's agreement in the reservation ended: the reservation is kept another `hold_s` from
/// now, for the next task.
pub(super) fn task_ended(inner: &Inner, reservation_id: &str) {
    if let Some(held) = inner.provider().reservations.get_mut(reservation_id) {
        held.in_use = held.in_use.saturating_sub(1);
        held.expires_at = held.expires_at.max(unix_now().saturating_add(held.hold_s as i64));
    }
}

/// Drops reservations that lapsed (not kept, not in use); each is recorded.
pub(super) async fn expire(inner: &Arc<Inner>, now: i64) {
    let lapsed: Vec<(String, Held)> = {
        let mut state = inner.provider();
        let ids: Vec<String> = state
            .reservations
            .iter()
            .filter(|(_, held)| held.in_use == 0 && held.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter().filter_map(|id| state.reservations.remove(&id).map(|held| (id, held))).collect()
    };
    for (id, held) in &lapsed {
        tracing::info!(reservation = %id, consumer = %held.consumer, "a reservation lapsed: not kept or released in time");
        let body = serde_json::json!({
            "event": "lapsed",
            "reservation_id": id,
            "consumer": held.consumer.to_string(),
            "at": now,
        });
        inner.parts.ledger.note(Kind::Reservation, &body).await;
    }
    if !lapsed.is_empty() {
        inner.wake.notify_one();
    }
}

/// The reservations held now, oldest to lapse first.
pub(super) fn list(inner: &Inner) -> Vec<HeldReservation> {
    let mut all: Vec<HeldReservation> = inner
        .provider()
        .reservations
        .iter()
        .map(|(id, held)| HeldReservation {
            id: id.clone(),
            consumer: held.consumer.to_string().into(),
            request_id: held.request_id.clone(),
            resource: held.resource.clone(),
            cpu_millis: held.resources.cpu_millis,
            memory_bytes: held.resources.memory_bytes,
            disk_bytes: held.resources.disk_bytes,
            gpus: held.gpus.clone(),
            in_use: held.in_use,
            expires_at: held.expires_at,
        })
        .collect();
    all.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(consumer: &PeerId, provider: &PeerId) -> ReserveRequest {
        ReserveRequest {
            version: VERSION,
            reservation_id: "0123456789abcdef".into(),
            request_id: "r".into(),
            resource: "train".into(),
            consumer: consumer.to_string().into(),
            provider: provider.to_string().into(),
            issued_at: 1000,
            resources: Allocation {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                gpus: 2,
                ..Allocation::default()
            },
            network: false,
            max_price_per_hour: None,
            hold_s: 600,
        }
    }

    #[test]
    fn asks_that_cannot_be_held_are_refused_with_the_reason() {
        let (consumer, me, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let ok = ask(&consumer, &me);
        assert_eq!(check(&ok, &consumer, &me, 1000), Ok(()));
        let cases: Vec<(ReserveRequest, PeerId, i64, &str)> = vec![
            (ok.clone(), other, 1000, "came from"),
            (
                ReserveRequest { provider: other.to_string().into(), ..ok.clone() },
                consumer,
                1000,
                "addressed to",
            ),
            (ok.clone(), consumer, 1000 + 3600, "stale"),
            (ReserveRequest { issued_at: 5000, ..ok.clone() }, consumer, 1000, "future"),
            (ReserveRequest { reservation_id: "x".into(), ..ok.clone() }, consumer, 1000, "8 to 64"),
            (
                ReserveRequest { reservation_id: "../../etc/passwd".into(), ..ok.clone() },
                consumer,
                1000,
                "8 to 64",
            ),
            (ReserveRequest { hold_s: 0, ..ok.clone() }, consumer, 1000, "held idle"),
            (ReserveRequest { hold_s: MAX_HOLD_S + 1, ..ok.clone() }, consumer, 1000, "held idle"),
            (
                ReserveRequest { resources: Allocation { cpu_millis: 0, ..ok.resources }, ..ok.clone() },
                consumer,
                1000,
                "no cores",
            ),
            (
                ReserveRequest { max_price_per_hour: Some(1), ..ok.clone() },
                consumer,
                1000,
                "above its ceiling",
            ),
            (ReserveRequest { resource: "x".repeat(65), ..ok.clone() }, consumer, 1000, "over 64 bytes"),
        ];
        for (ask, from, now, expected) in cases {
            let reason = check(&ask, &from, &me, now).unwrap_err();
            assert!(reason.contains(expected), "{reason:?} should say {expected:?}");
        }
    }

    #[test]
    fn a_grant_opens_only_for_its_provider() {
        let dir = tempfile::tempdir().unwrap();
        let provider = crate::identity::Identity::load_or_create(dir.path()).unwrap().0;
        let consumer = PeerId::random();
        let grant = Reservation {
            version: VERSION,
            reservation_id: "0123456789abcdef".into(),
            request_hash: "00".repeat(32),
            provider: provider.peer_id().to_string().into(),
            consumer: consumer.to_string().into(),
            resources: ask(&consumer, &provider.peer_id()).resources,
            prices: PRICES,
            gpus: vec!["FAKE-GPU-0".into(), "FAKE-GPU-1".into()],
            issued_at: 1000,
            expires_at: 1600,
        };
        let signed = Signed::sign(&provider, RESERVATION_TAG, &grant).unwrap();
        assert_eq!(signed.open::<Reservation>(RESERVATION_TAG, &provider.peer_id()).unwrap(), grant);
        assert!(signed.open::<Reservation>(RESERVATION_TAG, &consumer).is_err());
        assert!(signed.open::<Reservation>(RELEASE_TAG, &provider.peer_id()).is_err());
        let mut longer = signed;
        longer.body["expires_at"] = 9999.into();
        assert!(longer.open::<Reservation>(RESERVATION_TAG, &provider.peer_id()).is_err());
    }
}
