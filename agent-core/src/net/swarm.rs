//! Building the swarm: its transports, its behaviours and their limits, and the gossipsub score
//! parameters that keep a flood of identities from sinking honest peers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Swarm, autonat, connection_limits, dcutr, identify, mdns, memory_connection_limits, noise, ping, relay,
    tcp, yamux,
};

use super::{ADVERT_TOPIC, KAD_PROTOCOL, NEGOTIATE_TIMEOUT, NetError, negotiate};
use super::{advert, inbound};
use crate::config::NetworkConfig;
use crate::identity::Identity;

/// The identify protocol version string.
const IDENTIFY_VERSION: &str = "/hearth/1.0.0";

/// Connections at once, and per peer.
const MAX_CONNECTIONS: u32 = 256;
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
const MAX_PENDING_INCOMING: u32 = 64;

/// New connections are refused above this share of the machine's memory in use.
const MAX_MEMORY_PERCENT: f64 = 0.9;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) connection_limits: connection_limits::Behaviour,
    pub(super) memory_limits: memory_connection_limits::Behaviour,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) autonat: autonat::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
    /// Raw streams for protocols served outside the event loop (blob transfer): outbound here,
    pub(super) streams: libp2p_stream::Behaviour,
    /// inbound here, queued rather than reset while the server is busy.
    pub(super) inbound: inbound::Behaviour,
    pub(super) negotiate: request_response::json::Behaviour<negotiate::Message, negotiate::Reply>,
}

pub(super) fn build_swarm(identity: &Identity, config: &NetworkConfig) -> Result<Swarm<Behaviour>, NetError> {
    let start = |error: &dyn std::fmt::Display| NetError::Start(error.to_string());
    let keypair = identity.keypair().clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| start(&e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| start(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let gossipsub_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(advert::MAX_ADVERT_BYTES + 1024)
                .heartbeat_interval(Duration::from_secs(1))
                .build()
                .map_err(|e| e.to_string())?;
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub_config,
            )?;
            gossipsub.with_peer_score(score_params(), gossipsub::PeerScoreThresholds::default())?;
            gossipsub.subscribe(&IdentTopic::new(ADVERT_TOPIC)).map_err(|e| e.to_string())?;
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            // Every agent answers routing queries: a home agent is reachable through its relay.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if config.mdns {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?)
            } else {
                None
            };
            let relay = config.relay.then(|| {
                let mut relay = relay::Behaviour::new(peer_id, relay_config());
                // The owner said this agent is a relay: offer it now, not only once AutoNAT has
                // confirmed a public address (which it cannot do on a LAN or in a test network).
                relay.set_status(Some(relay::Status::Enable));
                relay
            });
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(MAX_CONNECTIONS))
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
            Ok(Behaviour {
                connection_limits: connection_limits::Behaviour::new(limits),
                memory_limits: memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_PERCENT),
                relay_client,
                relay: relay.into(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                        .with_agent_version(format!("hearth/{}", env!("CARGO_PKG_VERSION")))
                        // A new relayed address reaches peers (and so the DHT) at once.
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                kad,
                mdns: mdns.into(),
                gossipsub,
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
                dcutr: dcutr::Behaviour::new(peer_id),
                streams: libp2p_stream::Behaviour::new(),
                inbound: inbound::Behaviour::default(),
                negotiate: request_response::json::Behaviour::new(
                    [(negotiate::PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(NEGOTIATE_TIMEOUT),
                ),
            })
        })
        .map_err(|e| start(&e))?
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// A relay's limits. Circuits carry negotiation and the hole punch that replaces them, and
/// transfers only when no direct connection can be made, so each may last 15 minutes and carry
/// 32 MiB; libp2p's per-peer and per-IP rate limits on reservations and circuits stay.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuits: 64,
        max_circuit_duration: Duration::from_secs(15 * 60),
        max_circuit_bytes: 32 << 20,
        ..relay::Config::default()
    }
}

/// Peer scoring for the advert topic: every rejected advert costs its sender (a handful puts it
/// below the graylist threshold, where its messages are ignored), while the rarity of adverts is
/// never held against honest peers (no penalty for delivering few messages in the mesh).
fn score_params() -> gossipsub::PeerScoreParams {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        ..gossipsub::TopicScoreParams::default()
    };
    let mut params = gossipsub::PeerScoreParams::default();
    params.topics.insert(IdentTopic::new(ADVERT_TOPIC).hash(), topic);
    // Many identities behind one address cost each of them (Sybil defence), except on loopback,
    // where every agent of this machine (and of a test or benchmark) lives: a flood of identities
    // from there would otherwise sink the honest agents beside it.
    params.ip_colocation_factor_whitelist =
        [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)].into_iter().collect();
    params
}
