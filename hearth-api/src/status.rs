//! What `GET /api/v1/status` answers, and the small request bodies of the owner's controls.

use crate::ids::PeerId;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::availability::Availability;
use crate::availability::Reason;
use crate::peers::Reachability;
use crate::policy::Policy;

/// What the agent is doing, as `hearth status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Opening its files and starting its parts.
    Starting,
    /// Running, and the machine is shared.
    Sharing,
    /// Running, and sharing is paused (see the reasons).
    Paused,
    /// Shutting down.
    Stopping,
}

/// What `GET /api/v1/status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    /// The agent's peer id: its network name and signing identity.
    pub peer_id: PeerId,
    /// The agent's state.
    pub state: AgentStatus,
    /// Why sharing is paused; empty while sharing.
    pub reasons: Vec<Reason>,
    /// What the machine offers now, or why it offers nothing.
    pub availability: Availability,
    /// Where peers reach this agent, each ending in `/p2p/PEER_ID`: ready for another agent's
    /// `--bootstrap`. An address through a relay contains `/p2p-circuit`.
    pub listen_addrs: Vec<String>,
    /// Whether other agents can dial this one directly, as AutoNAT last found.
    pub reachability: Reachability,
    /// The daemon's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Where this agent keeps its files.
    #[schema(value_type = String)]
    pub data_dir: PathBuf,
    /// When the daemon started, in Unix seconds.
    pub started_at: i64,
}

/// What `POST /api/v1/peers` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// A peer id, found through the DHT, or a multiaddr ending in `/p2p/PEER_ID`.
    pub target: String,
}

/// What `POST /api/v1/pause` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// End the pause by itself after this many seconds (at most ten years); absent for a pause
    /// until resumed.
    #[serde(default)]
    pub for_seconds: Option<u64>,
}

/// The policy in force and its file's text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyDocument {
    /// The policy, every default filled in.
    pub policy: Policy,
}

/// What `PUT /api/v1/policy` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    /// The whole policy file, TOML.
    pub toml: String,
}

/// What `POST /api/v1/login-links` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginLink {
    /// Open it in a browser on this machine; it works once, within a minute.
    pub url: String,
    /// When it stops working, in Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Sharing => "sharing",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
        })
    }
}
