//! Reservations, the consumer's side: asking a provider to hold resources for a request package,
//! keeping them held, and releasing them. Each ask and release is signed by this agent, each
//! grant checked against the provider's key and the ask, and all three go into the ledger.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::Inner;
use crate::clock::{self, unix_now};
use crate::ledger::record::Kind;
use crate::net::negotiate::{
    Message, RELEASE_TAG, RESERVATION_TAG, RESERVE_TAG, Release, Reply, Reservation, ReserveRequest, Signed,
    VERSION,
};

/// Why a reservation message did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Whether the provider answered (a refusal); otherwise the message or its answer was lost,
    /// and what the provider did is unknown.
    pub answered: bool,
    /// Why, for people.
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

fn refused(reason: String) -> Failure {
    Failure { answered: true, reason }
}

fn lost(reason: String) -> Failure {
    Failure { answered: false, reason }
}

/// Sends `message` to `provider` and reads a `done`.
async fn done(inner: &Inner, provider: PeerId, message: Message) -> Result<(), Failure> {
    match inner.parts.network.negotiate(provider, message).await.map_err(lost)? {
        Reply::Done => Ok(()),
        Reply::Refused { reason } => Err(refused(reason)),
        other => Err(refused(format!("answered {other:?}"))),
    }
}

/// Signs `ask` and sends it to its provider; the grant, checked, or why there is none.
pub(super) async fn reserve(inner: &Arc<Inner>, ask: &ReserveRequest) -> Result<Reservation, Failure> {
    let provider: PeerId =
        ask.provider.parse().map_err(|_| refused(format!("{:?} is not a peer id", ask.provider)))?;
    let signed = Signed::sign(&inner.parts.identity, RESERVE_TAG, ask).map_err(|e| refused(e.to_string()))?;
    let request_hash = signed.hash().map_err(|e| refused(e.to_string()))?;
    let asked = serde_json::json!({ "event": "reserve", "document": signed });
    let grant = match inner
        .parts
        .network
        .negotiate(provider, Message::Reserve { request: signed })
        .await
        .map_err(lost)?
    {
        Reply::Reserved { reservation } => reservation,
        Reply::Refused { reason } => return Err(refused(reason)),
        other => return Err(lost(format!("answered {other:?}"))),
    };
    // A grant that does not check may still hold resources there: answered as lost, so the
    // caller releases it.
    let reservation: Reservation =
        grant.open(RESERVATION_TAG, &provider).map_err(|e| lost(format!("its grant is not valid: {e}")))?;
    let matches = reservation.reservation_id == ask.reservation_id
        && reservation.request_hash == request_hash
        && reservation.consumer == ask.consumer
        && reservation.provider == ask.provider
        && reservation.resources == ask.resources
        && reservation.gpus.len() == ask.resources.gpus as usize;
    if !matches {
        return Err(lost("its grant does not answer the ask".into()));
    }
    // It may be held `hold_s` from when it was granted, give or take the clocks' disagreement.
    let grant_clock = clock::Rules {
        max_skew: clock::MAX_SKEW,
        max_lifetime: clock::MAX_SKEW.saturating_add(Duration::from_secs(ask.hold_s)),
        max_age: None,
    };
    clock::check(reservation.issued_at, Some(reservation.expires_at), unix_now(), &grant_clock)
        .map_err(|e| lost(format!("its grant {e}")))?;
    // An ask refused changed nothing on either side and leaves no record; a held one leaves the
    // ask and the grant, together.
    let granted = serde_json::json!({ "event": "granted", "document": grant });
    if let Err(error) = inner
        .parts
        .ledger
        .record_together(&[(Kind::Reservation, &asked), (Kind::Reservation, &granted)])
        .await
    {
        tracing::error!(%error, "cannot write a reservation's records");
    }
    Ok(reservation)
}

/// Asks `provider` to hold reservation `id` another hold period.
pub(super) async fn keep(inner: &Arc<Inner>, provider: PeerId, id: &str) -> Result<(), Failure> {
    done(inner, provider, Message::Keep { reservation_id: id.to_owned() }).await
}

/// Sends a signed release of reservation `id` to `provider`, after recording it.
pub(super) async fn release(
    inner: &Arc<Inner>,
    provider: PeerId,
    id: &str,
    reason: &str,
) -> Result<(), Failure> {
    let release = Release {
        version: VERSION,
        reservation_id: id.to_owned(),
        consumer: inner.parts.identity.peer_id().to_string().into(),
        provider: provider.to_string().into(),
        at: unix_now(),
        reason: reason.to_owned(),
    };
    let signed =
        Signed::sign(&inner.parts.identity, RELEASE_TAG, &release).map_err(|e| refused(e.to_string()))?;
    inner
        .parts
        .ledger
        .note(Kind::Reservation, &serde_json::json!({ "event": "released", "document": signed }))
        .await;
    done(inner, provider, Message::Release { release: signed }).await
}
