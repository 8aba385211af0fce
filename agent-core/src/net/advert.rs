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

use std::time::Duration;

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
    /// Not an advert.
    #[error("malformed advert: {0}")]
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
    fn canonical_json_sorts_keys_and_has_no_whitespace() {
        let value = serde_json::json!({"b": [1, {"z": "é\n", "a": true}], "a": null, "A": -3});
        // JCS: keys by code point, no whitespace, non-ASCII as UTF-8, control characters escaped.
        let expected = "{\"A\":-3,\"a\":null,\"b\":[1,{\"a\":true,\"z\":\"é\\n\"}]}";
        assert_eq!(String::from_utf8(canonical_json(&value).unwrap()).unwrap(), expected);
        assert!(canonical_json(&serde_json::json!({"x": 1.5})).is_err());
    }
}
