//! Capacity adverts: what an agent offers now and when, signed by its key. Wire type and rules
//! only, no network and no clock (the time is passed in); the byte layout is in
//! `docs/protocol.md`.
//!
//! On the wire an advert is the JSON object `{"advert": BODY, "signature": HEX}`. The signature is
//! Ed25519 by the advertiser's key over `b"hearth/advert/v1"` followed by the canonical bytes of
//! BODY: RFC 8785 (JCS) canonical JSON, which for the integers, strings, booleans, arrays and
//! objects an advert holds is JSON with no whitespace and object keys sorted by code point. A
//! receiver canonicalises the BODY it received, not a re-encoding of its own, so fields it does
//! not know are still covered by the signature.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::PublicKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{self, ClockError};
use crate::identity::{self, DomainTag, Identity};
use crate::proto::NotCanonical;
pub use crate::proto::canonical_json;
pub use hearth_api::market::{AdvertBody, AdvertGpu, Free, Prices, Reputation};

/// The domain-separation tag of adverts.
pub const ADVERT_TAG: DomainTag = DomainTag::new(b"hearth/advert/v1");

/// The advert format this code writes and reads.
pub const ADVERT_VERSION: u64 = 1;

/// The largest advert accepted, whole message included.
pub const MAX_ADVERT_BYTES: usize = 16 * 1024;

/// The longest an advert may claim to stay valid.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// What an advert may claim about its own time.
const CLOCK_RULES: clock::Rules =
    clock::Rules { max_skew: clock::MAX_SKEW, max_lifetime: MAX_LIFETIME, max_age: None };

/// An advert whose signature, age and sequence were checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Advert {
    /// The signed body.
    pub body: AdvertBody,
    /// The exact bytes received (or sent), for forwarding.
    #[serde(skip)]
    pub wire: Vec<u8>,
}

/// Why an advert is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Larger than [`MAX_ADVERT_BYTES`].
    #[error("advert of {0} bytes is larger than {MAX_ADVERT_BYTES}")]
    Oversized(usize),
    /// Not the document it should be (an advert, or any signed document of the negotiation or
    /// the ledger, which share this type).
    #[error("malformed document: {0}")]
    Malformed(String),
    /// A version this code does not read.
    #[error("advert version {0} is not supported")]
    Version(u64),
    /// The signature does not verify against the advertiser's key.
    #[error("bad signature")]
    BadSignature,
    /// The advertiser is not the peer the message came from.
    #[error("advert for {advertised} published by {source_peer}")]
    WrongPeer {
        /// Who the advert names.
        advertised: String,
        /// Who published it.
        source_peer: String,
    },
    /// `issued_at` or `expires_at` is refused: expired, from the future, or valid too long.
    #[error("the advert {0}")]
    Clock(#[from] ClockError),
    /// Not newer than one already seen.
    #[error("sequence {seq} is not newer than {known}")]
    Replayed {
        /// This advert's sequence.
        seq: u64,
        /// The newest seen.
        known: u64,
    },
}

impl From<NotCanonical> for Rejection {
    fn from(error: NotCanonical) -> Self {
        Self::Malformed(error.to_string())
    }
}

/// Signs `body` with the agent's key and returns the advert with its wire bytes.
pub fn sign(identity: &Identity, body: AdvertBody) -> Result<Advert, Rejection> {
    let value = serde_json::to_value(&body).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let canonical = canonical_json(&value)?;
    let signature = identity.sign(ADVERT_TAG, &canonical);
    let wire = canonical_json(&serde_json::json!({ "advert": value, "signature": hex::encode(signature) }))?;
    Ok(Advert { body, wire })
}

/// Checks an advert received from `source` at `now` (Unix seconds), given the newest sequence
/// already accepted from that advertiser.
pub fn verify(
    bytes: &[u8],
    source: &PeerId,
    now: i64,
    newest_seen: Option<u64>,
) -> Result<Advert, Rejection> {
    if bytes.len() > MAX_ADVERT_BYTES {
        return Err(Rejection::Oversized(bytes.len()));
    }
    let message: Value = serde_json::from_slice(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let (Some(value), Some(signature)) =
        (message.get("advert"), message.get("signature").and_then(Value::as_str))
    else {
        return Err(Rejection::Malformed("expected {\"advert\": …, \"signature\": …}".into()));
    };
    let version = value.get("version").and_then(Value::as_u64).unwrap_or(0);
    if version != ADVERT_VERSION {
        return Err(Rejection::Version(version));
    }
    let body: AdvertBody =
        serde_json::from_value(value.clone()).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let advertiser: PeerId = body.peer_id.parse().map_err(|_| Rejection::Malformed("peer_id".into()))?;
    if advertiser != *source {
        return Err(Rejection::WrongPeer {
            advertised: body.peer_id.to_string(),
            source_peer: source.to_string(),
        });
    }
    let public = public_key(&advertiser).ok_or(Rejection::BadSignature)?;
    let signature = hex::decode(signature).map_err(|_| Rejection::BadSignature)?;
    if !identity::verify(&public, ADVERT_TAG, &canonical_json(value)?, &signature) {
        return Err(Rejection::BadSignature);
    }
    clock::check(body.issued_at, Some(body.expires_at), now, &CLOCK_RULES)?;
    if let Some(known) = newest_seen
        && body.seq <= known
    {
        return Err(Rejection::Replayed { seq: body.seq, known });
    }
    Ok(Advert { body, wire: bytes.to_vec() })
}

/// How often this agent may publish its own advert (see [`Pacer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Adverts that may go out back to back after a quiet spell.
    pub burst: u32,
    /// After the burst, one more advert per this much time.
    pub refill: Duration,
    /// How long after a peer subscribes to adverts the advert is published again (gossipsub does
    /// not replay what was published before); the peers that subscribe within it share one advert.
    pub join_delay: Duration,
    /// Adverts for peers that joined have their own allowance, so that the changes of an agent's
    /// first seconds do not keep a newcomer waiting: this many back to back…
    pub join_burst: u32,
    /// …then one per this much time, however many peers join.
    pub join_refill: Duration,
}

impl Default for Pace {
    /// Three at once, then one per 20 s: at most 183 an hour however the machine flaps, while a
    /// pause and the resume after it still reach peers at once. For joining peers, three more at
    /// once, then one per 10 s (at most 363 an hour, only while peers keep joining).
    fn default() -> Self {
        Self {
            burst: 3,
            refill: Duration::from_secs(20),
            join_delay: Duration::from_secs(2),
            join_burst: 3,
            join_refill: Duration::from_secs(10),
        }
    }
}

/// When to publish this agent's own advert: on a change a consumer acts on
/// ([`material_change`]), when a peer joins, and before the last one published expires (at half
/// its lifetime); never faster than [`Pace`] allows. A change that comes while the rate holds
/// adverts back waits and is coalesced with the ones after it: only the latest body goes out,
/// and none at all if by then it no longer differs materially from the last one published. Pure:
/// every call is given the time.
#[derive(Debug, Clone)]
pub struct Pacer {
    pace: Pace,
    /// The newest body the agent handed over.
    latest: Option<AdvertBody>,
    /// The last body published, and when.
    sent: Option<(AdvertBody, Instant)>,
    /// The earliest a wanted advert may go out (a change, or a peer that joined).
    wanted: Option<Instant>,
    /// A peer joined since the last advert: publish even if nothing changed.
    joined: bool,
    /// The rate limit's state (GCRA): when the budget is next back to empty plus one refill.
    budget_at: Option<Instant>,
    /// The same for adverts published because peers joined.
    join_budget_at: Option<Instant>,
    /// The sequence number of the last advert published.
    seq: u64,
}

impl Pacer {
    /// A pacer that has published nothing yet.
    pub fn new(pace: Pace) -> Self {
        Self {
            pace,
            latest: None,
            sent: None,
            wanted: None,
            joined: false,
            budget_at: None,
            join_budget_at: None,
            seq: 0,
        }
    }

    /// The agent's advert is now `body` (its `seq` and times are set when it is signed).
    pub fn update(&mut self, body: AdvertBody, now: Instant) {
        let material = self.sent.as_ref().is_none_or(|(sent, _)| material_change(sent, &body));
        self.latest = Some(body);
        if material {
            self.want(now);
        }
    }

    /// A peer subscribed to adverts: it hears the advert after [`Pace::join_delay`].
    pub fn peer_joined(&mut self, now: Instant) {
        self.joined = true;
        self.want(now + self.pace.join_delay);
    }

    fn want(&mut self, at: Instant) {
        self.wanted = Some(self.wanted.map_or(at, |wanted| wanted.min(at)));
    }

    /// The advert to sign and publish now, if any, counted as published at `now`: the latest
    /// body, issued at `unix_ms` (milliseconds since the Unix epoch) for the lifetime the agent
    /// gave it, with the next sequence number (`unix_ms`, or one more than the last if that is
    /// larger: it grows across restarts without being stored).
    pub fn poll(&mut self, now: Instant, unix_ms: i64) -> Option<AdvertBody> {
        let latest = self.latest.as_ref()?;
        let refresh = match &self.sent {
            None => true,
            Some((sent, at)) => {
                let lifetime = u64::try_from(sent.expires_at.saturating_sub(sent.issued_at)).unwrap_or(0);
                now >= *at + Duration::from_secs(lifetime) / 2
            }
        };
        let wanted = self.wanted.is_some_and(|at| now >= at);
        if !refresh && !wanted {
            return None;
        }
        let changed = self.sent.as_ref().is_none_or(|(sent, _)| material_change(sent, latest));
        // A refresh or a change draws on the agent's own allowance; an advert for peers that
        // joined on theirs, also when it carries a change the agent's own rate holds back.
        let own = (refresh || changed) && allowed(self.budget_at, self.pace.burst, self.pace.refill, now);
        let for_joins = !own
            && self.joined
            && allowed(self.join_budget_at, self.pace.join_burst, self.pace.join_refill, now);
        if !own && !for_joins {
            return None; // Held back by the rate: `wanted` stays, so it goes out later.
        }
        if !refresh && !self.joined {
            // A change that has flapped back by now needs no advert.
            if let Some((sent, _)) = &self.sent
                && !material_change(sent, latest)
            {
                self.wanted = None;
                return None;
            }
        }
        let mut body = latest.clone();
        // The agent's own body, set by this agent; saturating all the same, as every clock sum is.
        let lifetime = body.expires_at.saturating_sub(body.issued_at);
        let issued_at = unix_ms.div_euclid(1000);
        (body.issued_at, body.expires_at) = (issued_at, issued_at.saturating_add(lifetime));
        self.seq = u64::try_from(unix_ms).unwrap_or(0).max(self.seq.saturating_add(1));
        body.seq = self.seq;
        let (budget, refill) = if for_joins {
            (&mut self.join_budget_at, self.pace.join_refill)
        } else {
            (&mut self.budget_at, self.pace.refill)
        };
        *budget = Some(budget.map_or(now, |at| at.max(now)) + refill);
        self.sent = Some((body.clone(), now));
        self.wanted = None;
        self.joined = false;
        Some(body)
    }
}

/// Whether a rate of `burst` back to back, then one per `refill`, whose budget is back to empty
/// plus one refill at `budget_at` (GCRA), lets one more advert out at `now`.
fn allowed(budget_at: Option<Instant>, burst: u32, refill: Duration, now: Instant) -> bool {
    let Some(budget_at) = budget_at else { return true };
    let tolerance = refill * burst.saturating_sub(1);
    budget_at.checked_sub(tolerance).is_none_or(|earliest| now >= earliest)
}

/// Whether `new` offers something a consumer would act on differently from `old`: the state
/// (sharing or paused), the capacity (cores, memory, disk or a GPU's memory moved by more than a
/// sixteenth, or from or to zero; a GPU came or went), the prices, or the windows (other than
/// the first one's start and the last one's end, which move with the clock). Not: the sequence,
/// the times, the reasons for a pause (a figure in them changes every second while the machine
/// is busy; the consumer only needs to know it is paused) or the reputation (a ranking detail
/// that rides on the next refresh).
pub fn material_change(old: &AdvertBody, new: &AdvertBody) -> bool {
    fn moved(a: u64, b: u64) -> bool {
        let (small, large) = (u128::from(a.min(b)), u128::from(a.max(b)));
        (small == 0 && large > 0) || (large - small) * 16 > large
    }
    fn windows(body: &AdvertBody) -> Vec<[i64; 2]> {
        let mut windows = body.windows.clone();
        if let Some(first) = windows.first_mut() {
            first[0] = 0;
        }
        if let Some(last) = windows.last_mut() {
            last[1] = 0;
        }
        windows
    }
    let (a, b) = (&old.free, &new.free);
    old.version != new.version
        || old.peer_id != new.peer_id
        || old.state != new.state
        || old.prices != new.prices
        || moved(a.cpu_millis, b.cpu_millis)
        || moved(a.memory_bytes, b.memory_bytes)
        || moved(a.disk_bytes, b.disk_bytes)
        || a.gpus.len() != b.gpus.len()
        || a.gpus.iter().zip(&b.gpus).any(|(x, y)| {
            x.model != y.model
                || x.compute_capability != y.compute_capability
                || moved(x.memory_bytes, y.memory_bytes)
        })
        || windows(old) != windows(new)
}

/// The Ed25519 public key inside an Ed25519 peer id (which embeds it whole).
pub(crate) fn public_key(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return None; // Not an identity multihash: the key is not in the id.
    }
    PublicKey::try_decode_protobuf(multihash.digest()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(seed: u8) -> Identity {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identity.key"), [seed; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("identity.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        Identity::load_or_create(dir.path()).unwrap().0
    }

    fn body(identity: &Identity, seq: u64, now: i64) -> AdvertBody {
        AdvertBody {
            version: ADVERT_VERSION,
            peer_id: identity.peer_id().to_string().into(),
            seq,
            issued_at: now,
            expires_at: now + 600,
            state: "sharing".into(),
            paused_because: Vec::new(),
            free: Free { cpu_millis: 6000, memory_bytes: 1 << 34, disk_bytes: 1 << 36, gpus: Vec::new() },
            windows: vec![[now, now + 3600]],
            prices: Prices { core_hour: 10, memory_gib_hour: 1, gpu_hour: 500 },
            reputation: Reputation::default(),
        }
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signed_advert_verifies_and_every_bad_case_is_rejected() {
        let alice = identity(1);
        let mallory = identity(2);
        let peer = alice.peer_id();
        let good = sign(&alice, body(&alice, 5, NOW)).unwrap();
        assert_eq!(verify(&good.wire, &peer, NOW + 1, Some(4)).unwrap().body, good.body);

        // A changed field breaks the signature.
        let tampered = String::from_utf8(good.wire.clone())
            .unwrap()
            .replace("\"cpu_millis\":6000", "\"cpu_millis\":9000");
        assert_eq!(verify(tampered.as_bytes(), &peer, NOW, None), Err(Rejection::BadSignature));
        // Signed by another key in alice's name.
        let forged = sign(&mallory, body(&alice, 6, NOW)).unwrap();
        assert_eq!(verify(&forged.wire, &peer, NOW, None), Err(Rejection::BadSignature));
        // Published by someone else.
        assert!(matches!(
            verify(&good.wire, &mallory.peer_id(), NOW, None),
            Err(Rejection::WrongPeer { .. })
        ));
        assert!(matches!(
            verify(&good.wire, &peer, NOW + 600, None),
            Err(Rejection::Clock(ClockError::Expired { .. }))
        ));
        let future = sign(&alice, body(&alice, 7, NOW + 3600)).unwrap();
        assert!(matches!(
            verify(&future.wire, &peer, NOW, None),
            Err(Rejection::Clock(ClockError::FromTheFuture { ahead: 3600 }))
        ));
        // Fields chosen to overflow `expires_at - issued_at` are refused, not wrapped.
        let forever =
            sign(&alice, AdvertBody { issued_at: i64::MIN, expires_at: i64::MAX, ..body(&alice, 9, NOW) })
                .unwrap();
        assert!(matches!(
            verify(&forever.wire, &peer, NOW, None),
            Err(Rejection::Clock(ClockError::TooLong { .. }))
        ));
        assert_eq!(verify(&good.wire, &peer, NOW, Some(5)), Err(Rejection::Replayed { seq: 5, known: 5 }));
        let mut big = body(&alice, 8, NOW);
        big.paused_because = vec!["x".repeat(MAX_ADVERT_BYTES)];
        let big = sign(&alice, big).unwrap();
        assert!(matches!(verify(&big.wire, &peer, NOW, None), Err(Rejection::Oversized(_))));
        assert!(matches!(verify(b"{\"advert\":1}", &peer, NOW, None), Err(Rejection::Malformed(_))));
    }

    #[test]
    fn only_what_a_consumer_acts_on_is_a_material_change() {
        let alice = identity(1);
        let base = body(&alice, 1, NOW);
        let paused = |reason: &str| AdvertBody {
            state: "paused".into(),
            paused_because: vec![reason.into()],
            free: Free::default(),
            ..base.clone()
        };
        let gpu =
            |memory_bytes| AdvertGpu { model: "RTX".into(), memory_bytes, compute_capability: "8.9".into() };
        let with_free = |free: Free| AdvertBody { free, ..base.clone() };
        let table: Vec<(&str, AdvertBody, AdvertBody, bool)> = vec![
            ("only seq and times", base.clone(), body(&alice, 9, NOW + 100), false),
            ("shares → paused", base.clone(), paused("paused by the owner"), true),
            (
                "a figure in the reason",
                paused("other programs use 87% of the CPU"),
                paused("other programs use 93% of the CPU"),
                false,
            ),
            ("another reason", paused("paused by the owner"), paused("on battery"), false),
            (
                "cores −1/32",
                base.clone(),
                with_free(Free { cpu_millis: 6000 - 6000 / 32, ..base.free.clone() }),
                false,
            ),
            (
                "cores −1/8",
                base.clone(),
                with_free(Free { cpu_millis: 6000 - 6000 / 8, ..base.free.clone() }),
                true,
            ),
            (
                "disk −100 MiB of 64 GiB",
                base.clone(),
                with_free(Free { disk_bytes: (1 << 36) - (100 << 20), ..base.free.clone() }),
                false,
            ),
            ("disk to zero", base.clone(), with_free(Free { disk_bytes: 0, ..base.free.clone() }), true),
            (
                "a GPU came",
                base.clone(),
                with_free(Free { gpus: vec![gpu(8 << 30)], ..base.free.clone() }),
                true,
            ),
            (
                "a GPU's memory −1/2",
                with_free(Free { gpus: vec![gpu(8 << 30)], ..base.free.clone() }),
                with_free(Free { gpus: vec![gpu(4 << 30)], ..base.free.clone() }),
                true,
            ),
            (
                "a price",
                base.clone(),
                AdvertBody { prices: Prices { core_hour: 11, ..base.prices.clone() }, ..base.clone() },
                true,
            ),
            (
                "the window starts now",
                base.clone(),
                AdvertBody { windows: vec![[NOW + 30, NOW + 3600]], ..base.clone() },
                false,
            ),
            (
                "a window ends earlier",
                base.clone(),
                AdvertBody { windows: vec![[NOW, NOW + 1800], [NOW + 7200, NOW + 9000]], ..base.clone() },
                true,
            ),
            (
                "reputation",
                base.clone(),
                AdvertBody { reputation: Reputation { completed: 1, failed: 0 }, ..base.clone() },
                false,
            ),
        ];
        for (what, old, new, expected) in table {
            assert_eq!(material_change(&old, &new), expected, "{what}");
            assert_eq!(material_change(&new, &old), expected, "{what}, the other way");
        }
    }

    /// A clock for the pacer: `t` seconds after `start`, with the Unix milliseconds that go with it.
    struct Sim {
        start: Instant,
        pacer: Pacer,
        published: Vec<(u64, AdvertBody)>,
    }

    impl Sim {
        fn new() -> Self {
            Self { start: Instant::now(), pacer: Pacer::new(Pace::default()), published: Vec::new() }
        }

        fn at(&self, t: u64) -> Instant {
            self.start + Duration::from_secs(t)
        }

        /// Second `t`: the agent hands over `body` (when given), and the event loop polls twice,
        /// as its 500 ms tick does.
        fn second(&mut self, t: u64, body: Option<AdvertBody>) {
            if let Some(body) = body {
                self.pacer.update(body, self.at(t));
            }
            for half in [0, 500] {
                let now = self.at(t) + Duration::from_millis(half);
                let unix_ms = (NOW + t as i64) * 1000 + half as i64;
                if let Some(advert) = self.pacer.poll(now, unix_ms) {
                    self.published.push((t, advert));
                }
            }
        }

        fn most_in_any(&self, window: u64) -> usize {
            self.published
                .iter()
                .map(|(from, _)| {
                    self.published.iter().filter(|(t, _)| (*from..*from + window).contains(t)).count()
                })
                .max()
                .unwrap_or(0)
        }
    }

    #[test]
    fn a_flapping_agent_publishes_a_bounded_number_of_adverts_and_ends_on_its_latest_state() {
        let alice = identity(1);
        let sharing = body(&alice, 0, NOW);
        let paused = |cpu: u64| AdvertBody {
            state: "paused".into(),
            paused_because: vec![format!("other programs use {cpu}% of the CPU")],
            free: Free::default(),
            ..sharing.clone()
        };
        // Issue 23: paused because the CPU is busy, the figure changing every second. Before,
        // that was 25 adverts in 45 s; a consumer needs only the first.
        let mut sim = Sim::new();
        for t in 0..3600 {
            sim.second(t, Some(paused(60 + t % 40)));
        }
        assert_eq!(sim.published.iter().filter(|(t, _)| *t < 45).count(), 1, "{:?}", sim.published);
        // Over the hour only the refreshes follow, one per half lifetime (300 s).
        assert_eq!(sim.published.len(), 12);

        // The state itself flaps every 3 s for an hour (the agent hands a body over each second).
        let mut sim = Sim::new();
        for t in 0..3600 {
            let body = if (t / 3) % 2 == 0 { sharing.clone() } else { paused(90) };
            sim.second(t, Some(body));
        }
        let pace = Pace::default();
        let bound = |window: u64| pace.burst as usize + (window / pace.refill.as_secs()) as usize;
        for window in [10, 45, 60, 600, 3600] {
            assert!(sim.most_in_any(window) <= bound(window), "{window} s: {}", sim.most_in_any(window));
        }
        assert!(sim.published.len() >= 3600 / 20 / 2, "it kept telling the changes: {}", sim.published.len());
        // Sequence numbers grow; each advert is issued when published.
        for pair in sim.published.windows(2) {
            assert!(pair[1].1.seq > pair[0].1.seq);
        }
        // When the flapping stops, the last state is what peers are told, within one refill.
        let last_state = paused(90);
        for t in 3600..3600 + 60 {
            sim.second(t, Some(last_state.clone()));
        }
        let (at, last) = sim.published.last().unwrap();
        assert_eq!(last.state, "paused");
        assert!(*at < 3600 + pace.refill.as_secs() + 1, "told at {at}");
    }

    #[test]
    fn an_unchanged_agent_refreshes_its_advert_before_it_expires() {
        let alice = identity(1);
        let mut sim = Sim::new();
        // The agent hands over the same body only at the start, then never again.
        sim.second(0, Some(body(&alice, 0, NOW)));
        for t in 1..4 * 3600 {
            sim.second(t, None);
        }
        // Every second of the four hours is covered by an advert that has not expired.
        let mut covered_until = 0;
        for (t, advert) in &sim.published {
            assert!(*t as i64 + NOW < covered_until || covered_until == 0, "a gap before {t}");
            assert_eq!(advert.expires_at - advert.issued_at, 600, "the lifetime is kept");
            assert_eq!(advert.issued_at, NOW + *t as i64, "issued when published");
            covered_until = advert.expires_at;
        }
        assert!(covered_until > NOW + 4 * 3600);
        assert_eq!(sim.published.len(), 4 * 12, "every 300 s, no more");
    }

    #[test]
    fn a_peer_that_joins_hears_the_advert_and_joins_are_paced_too() {
        let alice = identity(1);
        let mut sim = Sim::new();
        sim.second(0, Some(body(&alice, 0, NOW)));
        assert_eq!(sim.published.len(), 1);
        sim.pacer.peer_joined(sim.at(10));
        for t in 10..13 {
            sim.second(t, None);
        }
        assert_eq!(sim.published.last().map(|(t, _)| *t), Some(12), "2 s after the join");
        // A hundred peers joining one a second: bounded all the same, by the joins' allowance.
        for t in 100..200 {
            sim.pacer.peer_joined(sim.at(t));
            sim.second(t, None);
        }
        let during = sim.published.iter().filter(|(t, _)| (100..200).contains(t)).count();
        assert!(during <= 3 + 100 / 10, "{during}");
    }

    #[test]
    fn a_peer_that_joins_while_changes_spent_the_budget_hears_the_advert_at_once() {
        // An agent's first seconds: its state changes three times, which spends the burst.
        let alice = identity(1);
        let mut sim = Sim::new();
        sim.second(0, Some(body(&alice, 0, NOW)));
        let mut paused = body(&alice, 0, NOW);
        paused.state = "paused".into();
        sim.second(1, Some(paused));
        sim.second(2, Some(body(&alice, 0, NOW)));
        assert_eq!(sim.published.len(), 3);
        // A consumer subscribes: it hears the advert 2 s later, not once the changes' rate
        // allows another (20 s on).
        sim.pacer.peer_joined(sim.at(3));
        for t in 3..6 {
            sim.second(t, None);
        }
        assert_eq!(sim.published.last().map(|(t, _)| *t), Some(5), "{:?}", sim.published);
        // A change right after is still held to the changes' own rate.
        let mut paused = body(&alice, 0, NOW);
        paused.state = "paused".into();
        sim.second(6, Some(paused));
        assert_eq!(sim.published.len(), 4, "the changes' burst is spent");
    }

    #[test]
    fn canonical_json_sorts_keys_and_has_no_whitespace() {
        let value = serde_json::json!({"b": [1, {"z": "é\n", "a": true}], "a": null, "A": -3});
        // JCS: keys by code point, no whitespace, non-ASCII as UTF-8, control characters escaped.
        let expected = "{\"A\":-3,\"a\":null,\"b\":[1,{\"a\":true,\"z\":\"é\\n\"}]}";
        assert_eq!(String::from_utf8(canonical_json(&value).unwrap()).unwrap(), expected);
        assert!(canonical_json(&serde_json::json!({"x": 1.5})).is_err());
    }
}
