//! The agents this one is connected to, and whether others can reach it.

use crate::ids::PeerId;
use serde::{Deserialize, Serialize};

/// A connected peer, as `hearth peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: PeerId,
    /// The addresses of its connections; a relayed one contains `/p2p-circuit`.
    pub addresses: Vec<String>,
    /// Whether any connection to it is direct, or every one goes through a relay.
    pub path: Path,
    /// The last ping's round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// How the last hole punch (DCUtR) with this peer ended, when one was tried.
    pub hole_punch: Option<HolePunch>,
}

/// How this agent's traffic reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// At least one connection goes straight to the peer.
    Direct,
    /// Every connection goes through a relay.
    Relayed,
}

/// The outcome of a hole punch: a relayed connection upgraded to a direct one, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum HolePunch {
    /// A direct connection was made.
    Succeeded,
    /// Every attempt failed; the relayed connection stays.
    Failed {
        /// libp2p's reason.
        reason: String,
    },
}

/// Whether other agents can dial this one directly, as AutoNAT last found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Not tested yet, or no peer could test it (AutoNAT only dials back public addresses).
    #[default]
    Unknown,
    /// Peers dialled this agent back on a public address.
    Public,
    /// Peers could not dial this agent: it is behind a NAT or firewall, reachable through relays.
    Private,
}
