//! Blobs moving between agents: a fetch from a peer as it progresses, what asks for one, and a
//! blob imported into this agent's store.

use crate::ids::PeerId;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::blob::BlobRef;

/// Where a fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FetchState {
    /// Recorded, not started.
    Queued,
    /// Downloading.
    Running,
    /// Every byte arrived and was verified (and was written to `out` when one was given).
    Finished,
    /// Given up; `error` says why.
    Failed,
    /// Cancelled by its owner; what it had downloaded was dropped.
    Cancelled,
}

impl FetchState {
    /// The state's word, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the fetch has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Failed | Self::Cancelled)
    }
}

/// One fetch as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Fetch {
    /// Its id, 12 hex digits.
    pub id: String,
    /// The peer fetched from.
    pub peer: PeerId,
    /// What is fetched.
    pub blob: BlobRef,
    /// The most bytes accepted (for a folder, of all its files together).
    pub max_bytes: Option<u64>,
    /// Where the content is written when it is complete.
    #[schema(value_type = Option<String>)]
    pub out: Option<PathBuf>,
    /// Where it stands.
    pub state: FetchState,
    /// Bytes in all, once known.
    pub bytes_total: Option<u64>,
    /// Verified bytes held.
    pub bytes_done: u64,
    /// Verified bytes that were already held when the latest run of the fetch started (a resume).
    pub resumed_from: u64,
    /// Bytes of content received over the network in the latest run.
    pub bytes_received: u64,
    /// Recent rate, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Seconds left at that rate.
    pub eta_s: Option<u64>,
    /// Groups that failed verification and were asked for again.
    pub bad_chunks: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// What to fetch.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// The peer holding it.
    pub peer: PeerId,
    /// The blob.
    #[serde(flatten)]
    pub blob: BlobRef,
    /// The most bytes accepted; a larger blob fails before any data arrives.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Where to write the content when it is complete (a file, or a folder that must not exist
    /// or be empty). Without it, the content stays in the store. A path on the daemon's machine:
    /// a local-only convenience (`hearth blob get --out`, which may `--detach`); a remote client
    /// leaves it out and reads the blob with `GET /api/v1/blobs/{hash}`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub out: Option<PathBuf>,
}

/// What an import put in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Imported {
    /// The blob (for a folder, its manifest).
    #[serde(flatten)]
    pub blob: BlobRef,
    /// Bytes of content (for a folder, of every file).
    pub size: u64,
    /// Files imported (1 for a file).
    pub files: u64,
    /// Entries of a folder left out because they are neither files nor folders (symlinks,
    /// devices, sockets), as relative paths.
    pub skipped: Vec<String>,
}
