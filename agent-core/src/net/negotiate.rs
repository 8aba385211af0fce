//! The negotiation protocol `/hearth/negotiate/1.0.0`: the messages a consumer and a provider
//! exchange, and the signed documents among them (requests, terms, agreements, notices). Wire
//! types and signature rules only, no decisions; the byte layout is in `docs/protocol.md`.
//!
//! Each exchange is one libp2p request-response round trip with a JSON body. The transport (noise)
//! already names the peer a message came from; signatures make the documents that outlive the
//! connection (a request, the terms, the agreement, a notice) checkable by anyone later. A signed
//! document is `{"body": BODY, "signature": HEX}`: Ed25519 by the signer's key over a domain tag
//! followed by the RFC 8785 canonical bytes of BODY as received, as adverts are signed.

use std::collections::BTreeMap;

use libp2p::{PeerId, StreamProtocol};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::advert::{Prices, Rejection, canonical_json, public_key};
use crate::identity::{self, DomainTag, Identity};
use crate::jobs::{JobState, Stream};
use crate::proto::BlobRef;
use hearth_api::ids::{self, AgreementId, RequestId};
pub use hearth_api::market::Agreement;
pub use hearth_api::resources::Allocation;

/// The protocol's name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/negotiate/1.0.0");

/// The format of every document this code writes and reads.
pub const VERSION: u64 = 1;

/// The longest a provider holds a `logs` read that asked to `wait` (well under the 20 s a
/// negotiation may take, and the control API client's 15 s).
pub const LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Domain tag of a consumer's job request.
pub const REQUEST_TAG: DomainTag = DomainTag::new(b"hearth/request/v1");
/// Domain tag of agreement terms: the provider signs them as its offer, the consumer to accept.
pub const AGREEMENT_TAG: DomainTag = DomainTag::new(b"hearth/agreement/v1");
/// Domain tag of a provider's notice about a job under an agreement.
pub const NOTICE_TAG: DomainTag = DomainTag::new(b"hearth/notice/v1");
/// Domain tag of a consumer's ask to hold resources for one resource of a request package.
pub const RESERVE_TAG: DomainTag = DomainTag::new(b"hearth/reserve/v1");
/// Domain tag of a provider's grant of a reservation.
pub const RESERVATION_TAG: DomainTag = DomainTag::new(b"hearth/reservation/v1");
/// Domain tag of a consumer's release of a reservation.
pub const RELEASE_TAG: DomainTag = DomainTag::new(b"hearth/release/v1");

/// A document and its signer's signature over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The document, kept as received so that fields this code does not know stay signed.
    pub body: Value,
    /// Hex Ed25519 signature over the tag and the canonical bytes of `body`.
    pub signature: String,
}

impl Signed {
    /// Signs `body` with `identity` under `tag`.
    pub fn sign<T: Serialize>(identity: &Identity, tag: DomainTag, body: &T) -> Result<Self, Rejection> {
        let body = serde_json::to_value(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
        let signature = sign_detached(identity, tag, &body)?;
        Ok(Self { body, signature })
    }

    /// Checks that `signer` signed the body under `tag`, that it is of [`VERSION`], and reads it.
    pub fn open<T: DeserializeOwned>(&self, tag: DomainTag, signer: &PeerId) -> Result<T, Rejection> {
        let version = self.body.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version != VERSION {
            return Err(Rejection::Version(version));
        }
        verify_detached(tag, &self.body, &self.signature, signer)?;
        serde_json::from_value(self.body.clone()).map_err(|e| Rejection::Malformed(e.to_string()))
    }

    /// The BLAKE3 hash (hex) of the canonical body: what another document cites it by.
    pub fn hash(&self) -> Result<String, Rejection> {
        Ok(bao_tree::blake3::hash(&canonical_json(&self.body)?).to_hex().to_string())
    }
}

/// Signs `body` under `tag`; the signature in hex.
pub fn sign_detached(identity: &Identity, tag: DomainTag, body: &Value) -> Result<String, Rejection> {
    Ok(hex::encode(identity.sign(tag, &canonical_json(body)?)))
}

/// Checks a hex signature by `signer` over `body` under `tag`.
pub fn verify_detached(
    tag: DomainTag,
    body: &Value,
    signature: &str,
    signer: &PeerId,
) -> Result<(), Rejection> {
    let public = public_key(signer).ok_or(Rejection::BadSignature)?;
    let signature = hex::decode(signature).map_err(|_| Rejection::BadSignature)?;
    if identity::verify(&public, tag, &canonical_json(body)?, &signature) {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// A consumer's request for a job to run, addressed to one provider. Signed under [`REQUEST_TAG`]
/// by `consumer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// [`VERSION`].
    pub version: u64,
    /// The consumer's id for the request (and the remote job it becomes).
    pub request_id: RequestId,
    /// Who asks.
    pub consumer: ids::PeerId,
    /// Whom it is addressed to: another provider refuses it.
    pub provider: ids::PeerId,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; an offer for it is not made after this.
    pub expires_at: i64,
    /// The job spec as TOML, its file paths pointing into `files`.
    pub spec: String,
    /// Each file the spec names (module, image, inputs), by the path the spec uses, as a blob the
    /// provider fetches from the consumer once they agree.
    pub files: BTreeMap<String, BlobRef>,
    /// What the job needs.
    pub resources: Allocation,
    /// The wall-clock limit of the job, in seconds.
    pub time_limit_s: u64,
    /// Whether the job asks for outbound network.
    pub network: bool,
    /// Whether the consumer wants a hosted agreement (interactive sessions), not only a batch job.
    pub hosted: bool,
    /// The most the consumer pays for the job's resources, in thousandths of a credit per hour.
    pub max_price_per_hour: Option<u64>,
    /// The reservation (see [`Reservation`]) the job runs in, for a task of a request package:
    /// the provider takes its resources from what it holds for the consumer. Absent otherwise,
    /// and then not part of the signed bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
}

/// A consumer's ask that a provider hold resources for one resource of a request package, until
/// released or lapsed. Signed under [`RESERVE_TAG`] by `consumer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// [`VERSION`].
    pub version: u64,
    /// Chosen by the consumer before it asks, so that an ask whose answer was lost can still be
    /// released.
    pub reservation_id: String,
    /// The request package it is for.
    pub request_id: RequestId,
    /// The package's name for the resource.
    pub resource: String,
    /// Who asks.
    pub consumer: ids::PeerId,
    /// Whom it is addressed to.
    pub provider: ids::PeerId,
    /// Unix seconds.
    pub issued_at: i64,
    /// What to hold.
    pub resources: Allocation,
    /// Whether the tasks run in it may open outbound connections.
    pub network: bool,
    /// The most the consumer pays for `resources`, in thousandths of a credit per hour.
    pub max_price_per_hour: Option<u64>,
    /// How long the provider holds it idle without a [`Message::Keep`] before it lapses.
    pub hold_s: u64,
}

/// A provider's grant of a [`ReserveRequest`]: the resources are set aside for the consumer's
/// tasks until `expires_at`, which each [`Message::Keep`] moves on. Signed under
/// [`RESERVATION_TAG`] by `provider`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// [`VERSION`].
    pub version: u64,
    /// The consumer's id for it.
    pub reservation_id: String,
    /// [`Signed::hash`] of the ask.
    pub request_hash: String,
    /// Who holds the resources.
    pub provider: ids::PeerId,
    /// For whom.
    pub consumer: ids::PeerId,
    /// What is held.
    pub resources: Allocation,
    /// The prices the tasks run in it are offered at, per resource-hour.
    pub prices: Prices,
    /// The GPUs held, by UUID.
    pub gpus: Vec<String>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds: the reservation lapses then unless kept or in use.
    pub expires_at: i64,
}

/// A consumer's release of a reservation (its package finished, failed or was rolled back).
/// Signed under [`RELEASE_TAG`] by `consumer`; the provider frees the resources and keeps the
/// release in its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// [`VERSION`].
    pub version: u64,
    /// The reservation.
    pub reservation_id: String,
    /// Who releases it.
    pub consumer: ids::PeerId,
    /// Who held it.
    pub provider: ids::PeerId,
    /// Unix seconds.
    pub at: i64,
    /// Why, for people: `completed`, `rolled back: …`, `cancelled`.
    pub reason: String,
}

/// The terms of an agreement. The provider signs them under [`AGREEMENT_TAG`] as its offer; the
/// consumer signs the same body to accept, and the two signatures make the agreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// [`VERSION`].
    pub version: u64,
    /// The agreement's id, chosen by the provider.
    pub agreement_id: AgreementId,
    /// The request it answers.
    pub request_id: RequestId,
    /// [`Signed::hash`] of the request: the job, its files and its limits are bound by it.
    pub request_hash: String,
    /// Who runs the job.
    pub provider: ids::PeerId,
    /// Whose job it is.
    pub consumer: ids::PeerId,
    /// What the provider sets aside for the job.
    pub resources: Allocation,
    /// The provider's prices per resource-hour.
    pub prices: Prices,
    /// The price of `resources` for an hour, in thousandths of a credit.
    pub price_per_hour: u64,
    /// `[from, to)` in Unix seconds: when the job may run.
    pub window: [i64; 2],
    /// A secret of this agreement (hex), for the consumer to open sessions under it.
    pub access_key: String,
    /// Whether the agreement is hosted (interactive sessions allowed).
    pub hosted: bool,
    /// Whether the job may open outbound connections.
    pub network: bool,
    /// The GPUs granted, by UUID; none unless the request asked for them.
    pub gpus: Vec<String>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; the consumer cannot accept the offer after this.
    pub expires_at: i64,
}

/// What the agent does with an agreement both sides signed.
pub trait Countersigned {
    /// BLAKE3 (hex) of the canonical terms: what a receipt cites the agreement by.
    fn hash(&self) -> Result<String, Rejection>;

    /// Checks both signatures against the peers the terms name, and reads the terms.
    fn verify(&self) -> Result<Terms, Rejection>;
}

impl Countersigned for Agreement {
    fn hash(&self) -> Result<String, Rejection> {
        Ok(bao_tree::blake3::hash(&canonical_json(&self.terms)?).to_hex().to_string())
    }

    fn verify(&self) -> Result<Terms, Rejection> {
        let offer = Signed { body: self.terms.clone(), signature: self.provider_signature.clone() };
        let provider = peer_field(&self.terms, "provider")?;
        let terms: Terms = offer.open(AGREEMENT_TAG, &provider)?;
        let consumer = peer_field(&self.terms, "consumer")?;
        verify_detached(AGREEMENT_TAG, &self.terms, &self.consumer_signature, &consumer)?;
        Ok(terms)
    }
}

/// A peer id in a document's field.
pub(crate) fn peer_field(body: &Value, field: &str) -> Result<PeerId, Rejection> {
    body.get(field)
        .and_then(Value::as_str)
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Rejection::Malformed(format!("`{field}` is not a peer id")))
}

/// What a provider tells the consumer about the job under an agreement. Signed under
/// [`NOTICE_TAG`] by the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// [`VERSION`].
    pub version: u64,
    /// The agreement.
    pub agreement_id: AgreementId,
    /// Who sends it.
    pub provider: ids::PeerId,
    /// To whom.
    pub consumer: ids::PeerId,
    /// Grows with each notice of the agreement: an older one changes nothing.
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// The job's state at the provider.
    pub job: JobState,
    /// Why, when the provider's owner paused or stopped it, or it failed before it ran.
    pub reason: Option<String>,
    /// The job's outputs as a folder blob, granted to the consumer, once it ended.
    pub outputs: Option<BlobRef>,
    /// Once the job ended: the receipt for the work, signed by the provider (a signed document
    /// under `hearth/receipt/v1`, see `docs/ledger.md`), for the consumer to countersign.
    pub receipt: Option<Signed>,
}

/// A message from either side; each has one [`Reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Consumer to provider: a signed [`JobRequest`]. Answered `queued` or `refused`.
    Request {
        /// The request.
        request: Signed,
    },
    /// Provider to consumer: signed [`Terms`]. Answered `accepted` (with the consumer's signature)
    /// or `declined`.
    Offer {
        /// The terms.
        terms: Signed,
    },
    /// Consumer to provider: the request is no longer wanted. Answered `done`.
    Withdraw {
        /// The request.
        request_id: RequestId,
    },
    /// Consumer to provider: stop the job. Answered `done` or `refused`.
    Cancel {
        /// The agreement.
        agreement_id: AgreementId,
    },
    /// Provider to consumer: a signed [`Notice`]. Answered `done`.
    Notice {
        /// The notice.
        notice: Signed,
    },
    /// Consumer to provider: the latest notice (also how the consumer finds the provider gone).
    /// Answered `notice` or `refused`.
    Status {
        /// The agreement.
        agreement_id: AgreementId,
    },
    /// Consumer to provider: its countersignature of the receipt in the last notice, and its own
    /// ledger's checkpoint (which now holds the receipt) for the provider to keep. Answered
    /// `checkpoint` (the provider's, once the receipt is in its ledger too) or `refused`.
    Countersign {
        /// The agreement.
        agreement_id: AgreementId,
        /// Hex Ed25519 by the consumer over the receipt under `hearth/receipt/v1`.
        signature: String,
        /// The consumer's signed checkpoint.
        checkpoint: Option<Signed>,
    },
    /// Either side to the other: the newest checkpoint of the sender's ledger that the receiver
    /// holds. Answered `checkpoint`.
    Witness,
    /// Consumer to provider: a signed [`ReserveRequest`]. Answered at once `reserved` (a signed
    /// [`Reservation`]) or `refused`.
    Reserve {
        /// The ask.
        request: Signed,
    },
    /// Consumer to provider: the reservation is still wanted; hold it another `hold_s`. Answered
    /// `done`, or `refused` when it lapsed or was never held.
    Keep {
        /// The reservation.
        reservation_id: String,
    },
    /// Consumer to provider: a signed [`Release`]. Answered `done`, also when nothing is held
    /// under that id (a release is safe to repeat).
    Release {
        /// The release.
        release: Signed,
    },
    /// Consumer to provider: the job's output from a byte offset. Answered `logs` or `refused`.
    Logs {
        /// The agreement.
        agreement_id: AgreementId,
        /// Which stream.
        stream: Stream,
        /// From where.
        offset: u64,
        /// Hold an answer that would be empty (no bytes past `offset`, the job not ended) until
        /// there are some or the job ended, at most [`LOG_WAIT`]. Absent means no.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
    },
}

/// The answer to a [`Message`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The request waits at the provider for capacity.
    Queued {
        /// How many requests wait before it.
        position: u64,
    },
    /// Not done, and why.
    Refused {
        /// For people.
        reason: String,
    },
    /// The consumer accepts the offer: its signature over the terms.
    Accepted {
        /// Hex Ed25519 under [`AGREEMENT_TAG`].
        signature: String,
    },
    /// The consumer does not take the offer.
    Declined {
        /// For people.
        reason: String,
    },
    /// Done.
    Done,
    /// The latest notice.
    Notice {
        /// The notice.
        notice: Signed,
    },
    /// The provider holds the resources: its signed [`Reservation`].
    Reserved {
        /// The grant.
        reservation: Signed,
    },
    /// A signed ledger checkpoint (`hearth/checkpoint/v1`, see `docs/ledger.md`), or none held.
    Checkpoint {
        /// The checkpoint.
        checkpoint: Option<Signed>,
    },
    /// Output of the job.
    Logs {
        /// The text (invalid UTF-8 replaced).
        text: String,
        /// Where the next read starts.
        next_offset: u64,
        /// Whether the job has ended (nothing more will come).
        finished: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    fn identity() -> Identity {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap().0
    }

    fn terms(provider: &Identity, consumer: &Identity) -> Terms {
        Terms {
            version: VERSION,
            agreement_id: "a1".into(),
            request_id: "r1".into(),
            request_hash: "00".repeat(32),
            provider: provider.peer_id().to_string().into(),
            consumer: consumer.peer_id().to_string().into(),
            resources: Allocation { cpu_millis: 1000, memory_bytes: 1 << 28, ..Allocation::default() },
            prices: Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 0 },
            price_per_hour: 1025,
            window: [100, 200],
            access_key: "ab".repeat(32),
            hosted: false,
            network: false,
            gpus: Vec::new(),
            issued_at: 100,
            expires_at: 160,
        }
    }

    #[test]
    fn a_signed_document_opens_only_for_its_signer_and_unchanged() {
        let (provider, consumer) = (identity(), identity());
        let offer = Signed::sign(&provider, AGREEMENT_TAG, &terms(&provider, &consumer)).unwrap();
        let opened: Terms = offer.open(AGREEMENT_TAG, &provider.peer_id()).unwrap();
        assert_eq!(opened, terms(&provider, &consumer));

        assert_eq!(offer.open::<Terms>(AGREEMENT_TAG, &consumer.peer_id()), Err(Rejection::BadSignature));
        assert_eq!(offer.open::<Terms>(NOTICE_TAG, &provider.peer_id()), Err(Rejection::BadSignature));

        let mut tampered = offer.clone();
        tampered.body["price_per_hour"] = Value::from(1);
        assert_eq!(tampered.open::<Terms>(AGREEMENT_TAG, &provider.peer_id()), Err(Rejection::BadSignature));

        // A field this code does not know is still covered by the signature.
        let mut extended = offer.clone();
        extended.body["extra"] = Value::from("added later");
        assert_eq!(extended.open::<Terms>(AGREEMENT_TAG, &provider.peer_id()), Err(Rejection::BadSignature));

        let unsigned = Signed { signature: String::new(), ..offer.clone() };
        assert_eq!(unsigned.open::<Terms>(AGREEMENT_TAG, &provider.peer_id()), Err(Rejection::BadSignature));

        let mut future = offer;
        future.body["version"] = Value::from(2);
        assert_eq!(future.open::<Terms>(AGREEMENT_TAG, &provider.peer_id()), Err(Rejection::Version(2)));
    }

    #[test]
    fn an_agreement_needs_both_signatures_over_the_same_terms() {
        let (provider, consumer) = (identity(), identity());
        let offer = Signed::sign(&provider, AGREEMENT_TAG, &terms(&provider, &consumer)).unwrap();
        let accepted = sign_detached(&consumer, AGREEMENT_TAG, &offer.body).unwrap();
        let agreement = Agreement {
            terms: offer.body.clone(),
            provider_signature: offer.signature.clone(),
            consumer_signature: accepted.clone(),
        };
        assert_eq!(agreement.verify().unwrap(), terms(&provider, &consumer));

        let stranger = identity();
        let forged = sign_detached(&stranger, AGREEMENT_TAG, &offer.body).unwrap();
        let bad = Agreement { consumer_signature: forged, ..agreement.clone() };
        assert_eq!(bad.verify(), Err(Rejection::BadSignature));

        let swapped = Agreement {
            provider_signature: accepted,
            consumer_signature: offer.signature,
            ..agreement.clone()
        };
        assert_eq!(swapped.verify(), Err(Rejection::BadSignature));

        let mut changed = agreement;
        changed.terms["gpus"] = serde_json::json!(["GPU-1"]);
        assert_eq!(changed.verify(), Err(Rejection::BadSignature));
    }

    #[test]
    fn a_request_without_a_reservation_signs_the_same_bytes_as_before_the_field_existed() {
        let request = JobRequest {
            version: VERSION,
            request_id: "r".into(),
            consumer: "c".into(),
            provider: "p".into(),
            issued_at: 1,
            expires_at: 2,
            spec: String::new(),
            files: BTreeMap::new(),
            resources: Allocation::default(),
            time_limit_s: 60,
            network: false,
            hosted: false,
            max_price_per_hour: None,
            reservation: None,
        };
        let body = serde_json::to_value(&request).unwrap();
        assert!(body.get("reservation").is_none(), "{body}");
        let read: JobRequest = serde_json::from_value(body).unwrap();
        assert_eq!(read, request);
        let within = JobRequest { reservation: Some("0123456789abcdef".into()), ..request };
        assert_eq!(serde_json::to_value(&within).unwrap()["reservation"], "0123456789abcdef");
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let message =
            Message::Logs { agreement_id: "a".into(), stream: Stream::Stdout, offset: 7, wait: false };
        let text = serde_json::to_string(&message).unwrap();
        assert_eq!(text, r#"{"type":"logs","agreement_id":"a","stream":"stdout","offset":7}"#);
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), message);
        // A read that waits says so; one from an agent that never waits reads as not waiting.
        let waiting =
            Message::Logs { agreement_id: "a".into(), stream: Stream::Stderr, offset: 0, wait: true };
        let text = serde_json::to_string(&waiting).unwrap();
        assert_eq!(text, r#"{"type":"logs","agreement_id":"a","stream":"stderr","offset":0,"wait":true}"#);
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), waiting);
        let reply: Reply = serde_json::from_str(r#"{"type":"queued","position":2}"#).unwrap();
        assert_eq!(reply, Reply::Queued { position: 2 });
        assert!(serde_json::from_str::<Reply>(r#"{"type":"sure"}"#).is_err());
        let keep = Message::Keep { reservation_id: "0123456789abcdef".into() };
        let text = serde_json::to_string(&keep).unwrap();
        assert_eq!(text, r#"{"type":"keep","reservation_id":"0123456789abcdef"}"#);
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), keep);
    }
}
