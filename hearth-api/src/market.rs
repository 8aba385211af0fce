//! The market as the API shows it: other agents' signed capacity adverts, the jobs this agent
//! asked others to run ([`RemoteJob`]) with the agreements both sides signed, and the
//! reservations this agent holds for others.

use crate::ids::{AgreementId, JobId, PeerId, RequestId};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blob::BlobRef;
use crate::jobs::JobState;

/// What is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdvertBody {
    /// The advert format's version (the agent's `net::advert::ADVERT_VERSION`).
    pub version: u64,
    /// The advertiser, as its base58 peer id; must be the key that signed.
    pub peer_id: PeerId,
    /// Grows with every advert of this peer; an older or equal one is a replay.
    pub seq: u64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; at most the agent's `net::advert::MAX_LIFETIME` after `issued_at`.
    pub expires_at: i64,
    /// `sharing` or `paused`.
    pub state: String,
    /// Why it is paused, for people; empty while sharing.
    pub paused_because: Vec<String>,
    /// What is free now (zero while paused).
    pub free: Free,
    /// When it shares in the next 7 days: `[from, to)` spans in Unix seconds, in order.
    pub windows: Vec<[i64; 2]>,
    /// Prices per resource-hour, in thousandths of a credit.
    pub prices: Prices,
    /// What its own ledger says of its past work.
    pub reputation: Reputation,
}

/// A capacity advert as `GET /api/v1/offers` and `hearth offers --json` show it: the body's
/// fields, and the signed message they were read from, so a client can check the signature
/// itself (docs/api.md, "Verifying an offer").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Offer {
    /// The advert's fields, as this agent read them from `signed`.
    #[serde(flatten)]
    pub body: AdvertBody,
    /// The advert message exactly as this agent received it from the network (or sent it, for
    /// its own): UTF-8 JSON `{"advert":BODY,"signature":HEX}`, the signature by `peer_id`'s key
    /// over `hearth/advert/v1` followed by the RFC 8785 canonical bytes of BODY
    /// (docs/protocol.md, "Capacity adverts"). Kept as a string so that no JSON decoder on the
    /// way rounds its integers.
    pub signed: String,
}

impl std::ops::Deref for Offer {
    type Target = AdvertBody;

    fn deref(&self) -> &AdvertBody {
        &self.body
    }
}

/// Free capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Free {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Memory.
    pub memory_bytes: u64,
    /// Scratch disk.
    pub disk_bytes: u64,
    /// Each free GPU.
    pub gpus: Vec<AdvertGpu>,
}

/// One GPU on offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdvertGpu {
    /// Its model, as NVML names it.
    pub model: String,
    /// Memory on offer.
    pub memory_bytes: u64,
    /// CUDA compute capability, such as `"8.9"`; empty when unknown.
    pub compute_capability: String,
}

/// Prices per hour, in thousandths of a credit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prices {
    /// One core for an hour.
    pub core_hour: u64,
    /// One GiB of memory for an hour.
    pub memory_gib_hour: u64,
    /// One GPU for an hour.
    pub gpu_hour: u64,
}

/// A summary of past work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reputation {
    /// Jobs finished.
    pub completed: u64,
    /// Jobs that failed on the provider's side.
    pub failed: u64,
}

/// Terms signed by both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Agreement {
    /// The terms as the provider signed them.
    #[schema(value_type = Object)]
    pub terms: Value,
    /// The provider's signature (hex) under the agreement's domain tag, `hearth/agreement/v1`.
    pub provider_signature: String,
    /// The consumer's signature (hex) over the same bytes.
    pub consumer_signature: String,
}

/// A reservation as the owner's API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HeldReservation {
    /// The consumer's id for it.
    pub id: String,
    /// For whom.
    pub consumer: PeerId,
    /// The consumer's request package.
    pub request_id: RequestId,
    /// The package's name for the resource.
    pub resource: String,
    /// Thousandths of a core held.
    pub cpu_millis: u64,
    /// Memory held, in bytes.
    pub memory_bytes: u64,
    /// Scratch disk held, in bytes.
    pub disk_bytes: u64,
    /// GPUs held, by UUID.
    pub gpus: Vec<String>,
    /// Tasks running in it now.
    pub in_use: u32,
    /// When it lapses unless kept or in use, in Unix seconds.
    pub expires_at: i64,
}

/// A job this agent asked another agent to run, as `hearth jobs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RemoteJob {
    /// Its id here (also the request's id).
    pub id: JobId,
    /// `wasi` or `native`.
    pub kind: String,
    /// The spec file it came from: its staged copy under `DATA/uploads/` (gone once its files
    /// were in the blob store), or a request package's task spec.
    #[schema(value_type = String)]
    pub spec_path: PathBuf,
    /// Where it is in its life, as its provider last said (or `queued` while no one agreed yet).
    #[serde(flatten)]
    pub state: JobState,
    /// What is going on, for people: the search, the agreement, the provider owner's reason.
    pub note: Option<String>,
    /// The provider running it, once agreed.
    pub provider: Option<PeerId>,
    /// The agreement's id.
    pub agreement_id: Option<AgreementId>,
    /// The agreed price, in thousandths of a credit per hour.
    pub price_per_hour: Option<u64>,
    /// The agreement both sides signed.
    pub agreement: Option<Agreement>,
    /// Providers that refused the request, with their reasons.
    pub refusals: Vec<String>,
    /// The job's outputs (a folder blob), once fetched.
    pub outputs: Option<BlobRef>,
    /// What the countersigned receipt charged, in thousandths of a credit.
    pub charged: Option<u64>,
    /// The request package it is a task of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestId>,
    /// When it was submitted, in Unix seconds.
    pub created_at: i64,
    /// When it last changed, in Unix seconds.
    pub updated_at: i64,
}

/// Thousandths of a credit as people read them: `1.025 credits/h`.
pub fn credits(millis: u64) -> String {
    format!("{}.{:03}", millis / 1000, millis % 1000)
}
