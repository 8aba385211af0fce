//! The peer-to-peer network: one libp2p swarm in one task, driven through a cloneable [`Network`]
//! handle.
//!
//! The swarm speaks TCP (noise, yamux) and QUIC; runs identify and ping; finds peers through
//! Kademlia under Hearth's own protocol name (seeded from the bootstrap list) and through mDNS on
//! the LAN; reaches peers behind NAT through relays, DCUtR hole punching and AutoNAT; and can be a
//! relay itself (`hearth daemon --relay`). Connection counts and the process's memory are limited.
//! An agent that AutoNAT has not found publicly reachable listens through up to [`MAX_RELAYS`]
//! relays it dialled (a reservation each), so others reach it by a `/p2p-circuit` address found
//! through Kademlia; DCUtR then tries to turn each relayed connection into a direct one.
//! Capacity adverts travel on one gossipsub topic; each message is checked by
//! [`advert::verify`] before gossipsub forwards it, and a rejected one lowers its sender's score.
//!
//! The task owns the swarm and the cache of valid adverts; commands come in on a bounded channel,
//! each with a oneshot reply. It ends on [`Network::shutdown`] or when the daemon's token fires.

pub mod advert;
pub mod negotiate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::futures::StreamExt;
use libp2p::futures::future::BoxFuture;
use libp2p::futures::stream::FuturesUnordered;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, mdns,
    memory_connection_limits, noise, ping, relay, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_now;
use crate::config::NetworkConfig;
use crate::events::{Bus, Event};
use crate::identity::Identity;
pub use advert::{Advert, AdvertBody};
pub use hearth_api::peers::{HolePunch, Path, PeerInfo, Reachability};

/// Hearth's Kademlia protocol: a DHT of Hearth agents only.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/kad/1.0.0");

/// The gossipsub topic of capacity adverts.
pub const ADVERT_TOPIC: &str = "hearth/adverts/1";

/// The identify protocol version string.
const IDENTIFY_VERSION: &str = "/hearth/1.0.0";

/// The most adverts kept, one per advertiser.
const MAX_OFFERS: usize = 4096;

/// Connections at once, and per peer.
const MAX_CONNECTIONS: u32 = 256;
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
const MAX_PENDING_INCOMING: u32 = 64;

/// New connections are refused above this share of the machine's memory in use.
const MAX_MEMORY_PERCENT: f64 = 0.9;

/// The most relays this agent listens through while it is not known to be publicly reachable.
pub const MAX_RELAYS: usize = 2;

/// How long a relay that refused a reservation is left alone.
const RELAY_BACKOFF: Duration = Duration::from_secs(60);

/// How long [`Network::connect`] looks for a peer before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A configured address is not a multiaddr.
    #[error("`{field}`: {value:?} is not a multiaddr ({reason})")]
    BadAddress {
        /// `network.listen` or `network.bootstrap`.
        field: &'static str,
        /// The text.
        value: String,
        /// Why.
        reason: String,
    },
    /// The swarm could not be built or could not listen.
    #[error("cannot start the network: {0}")]
    Start(String),
}

/// Why [`Network::connect`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The text names neither a peer id nor a multiaddr ending in `/p2p/PEER_ID`.
    #[error("{0:?} is neither a peer id nor a multiaddr ending in /p2p/PEER_ID")]
    BadTarget(String),
    /// That is this agent's own id.
    #[error("{0} is this agent")]
    Itself(PeerId),
    /// Nobody reachable knew an address that worked within the time allowed.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The peer.
        peer: PeerId,
        /// The last dial error, or that no address was found.
        reason: String,
    },
    /// The network task has stopped.
    #[error("the network is shutting down")]
    Stopped,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    connection_limits: connection_limits::Behaviour,
    memory_limits: memory_connection_limits::Behaviour,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossipsub::Behaviour,
    autonat: autonat::Behaviour,
    dcutr: dcutr::Behaviour,
    /// Raw streams for protocols served outside the event loop (blob transfer).
    streams: libp2p_stream::Behaviour,
    negotiate: request_response::json::Behaviour<negotiate::Message, negotiate::Reply>,
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Reachability(oneshot::Sender<Reachability>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Connect(PeerId, Option<Multiaddr>, oneshot::Sender<Result<PeerInfo, ConnectError>>),
    Offers(oneshot::Sender<Vec<AdvertBody>>),
    Publish(Box<AdvertBody>),
    Negotiate(PeerId, Box<negotiate::Message>, oneshot::Sender<Result<negotiate::Reply, String>>),
}

/// A negotiation message from a peer, for the market to answer on `reply`. Dropping `reply`
/// without an answer closes the peer's request with an error.
#[derive(Debug)]
pub struct Inbound {
    /// Who sent it (authenticated by the connection).
    pub peer: PeerId,
    /// What it says.
    pub message: negotiate::Message,
    /// Where the answer goes.
    pub reply: oneshot::Sender<negotiate::Reply>,
}

/// Negotiation messages waiting for the market; beyond this the network answers that it is busy.
const MAX_INBOUND: usize = 256;

/// How long a negotiation message waits for its answer.
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(20);

/// Handle to the network task. Cheap to clone.
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    streams: libp2p_stream::Control,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

/// The task itself, for the daemon to stop.
#[must_use = "dropping the task handle leaves the network running until the daemon's token fires"]
pub struct NetworkTask {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Network {
    /// Builds the swarm, starts listening and dialling the bootstrap list, and spawns the task.
    pub async fn spawn(
        identity: &Identity,
        config: &NetworkConfig,
        events: Bus,
        cancel: &CancellationToken,
    ) -> Result<(Self, NetworkTask, mpsc::Receiver<Inbound>), NetError> {
        let listen = parse_all("network.listen", &config.listen)?;
        let bootstrap = parse_all("network.bootstrap", &config.bootstrap)?;
        let mut swarm = build_swarm(identity, config)?;
        let streams = swarm.behaviour().streams.new_control();
        for address in listen {
            swarm
                .listen_on(address.clone())
                .map_err(|e| NetError::Start(format!("listening on {address}: {e}")))?;
        }
        for address in bootstrap {
            if let Some(Protocol::P2p(peer)) = address.iter().last() {
                swarm.behaviour_mut().kad.add_address(&peer, address.clone());
            }
            if let Err(error) = swarm.dial(address.clone()) {
                tracing::warn!(%address, %error, "cannot dial a bootstrap peer");
            }
        }
        let (commands, receiver) = mpsc::channel(64);
        let (inbound, inbound_rx) = mpsc::channel(MAX_INBOUND);
        let stop = cancel.child_token();
        let mut event_loop = EventLoop {
            identity: identity.clone(),
            swarm,
            commands: receiver,
            events,
            is_relay: config.relay,
            reachability: Reachability::Unknown,
            listen_addrs: Vec::new(),
            peers: HashMap::new(),
            relays: HashSet::new(),
            reservations: HashMap::new(),
            relay_backoff: HashMap::new(),
            connecting: HashMap::new(),
            offers: BTreeMap::new(),
            own: None,
            republish_at: None,
            inbound,
            outbound: HashMap::new(),
            answers: FuturesUnordered::new(),
        };
        let task_stop = stop.clone();
        let task = tokio::spawn(async move { event_loop.run(task_stop).await });
        Ok((Self { commands, peer_id: identity.peer_id(), streams }, NetworkTask { stop, task }, inbound_rx))
    }

    /// This agent's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Opens and accepts raw streams of protocols served outside the event loop (blob transfer).
    /// Opening a stream to a peer dials it when no connection exists.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// The addresses the swarm listens on, each ending in `/p2p/PEER_ID`.
    pub async fn listen_addrs(&self) -> Vec<String> {
        let addrs = self.ask(Command::ListenAddrs).await.unwrap_or_default();
        let own = Protocol::P2p(self.peer_id);
        // A relayed address already ends in this agent's id.
        addrs
            .into_iter()
            .map(|a| {
                if a.ends_with(&Multiaddr::empty().with(own.clone())) { a } else { a.with(own.clone()) }
                    .to_string()
            })
            .collect()
    }

    /// Whether peers can dial this agent directly, as AutoNAT last found.
    pub async fn reachability(&self) -> Reachability {
        self.ask(Command::Reachability).await.unwrap_or_default()
    }

    /// Connects to a peer named by its id (its addresses found through Kademlia, a relayed one
    /// included) or by a multiaddr ending in `/p2p/PEER_ID`, and returns it as `peers` shows it.
    /// An existing connection is reused.
    pub async fn connect(&self, target: &str) -> Result<PeerInfo, ConnectError> {
        let (peer, address) = parse_target(target)?;
        if peer == self.peer_id {
            return Err(ConnectError::Itself(peer));
        }
        self.ask(|reply| Command::Connect(peer, address, reply)).await.unwrap_or(Err(ConnectError::Stopped))
    }

    /// The connected peers.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.ask(Command::Peers).await.unwrap_or_default()
    }

    /// The valid, unexpired adverts known, own included.
    pub async fn offers(&self) -> Vec<AdvertBody> {
        self.ask(Command::Offers).await.unwrap_or_default()
    }

    /// Signs and publishes this agent's advert now, and again (with a new sequence number, so no
    /// receiver takes it for a replay) whenever a peer joins.
    pub async fn publish(&self, body: AdvertBody) {
        let _ = self.commands.send(Command::Publish(Box::new(body))).await;
    }

    /// Sends a negotiation message to `peer` (dialling it when needed) and waits for its reply;
    /// the error says why none came (unreachable, timed out, refused the protocol).
    pub async fn negotiate(
        &self,
        peer: PeerId,
        message: negotiate::Message,
    ) -> Result<negotiate::Reply, String> {
        self.ask(|reply| Command::Negotiate(peer, Box::new(message), reply))
            .await
            .unwrap_or_else(|| Err("the network is shutting down".to_owned()))
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.ok()?;
        answer.await.ok()
    }
}

impl NetworkTask {
    /// Stops the swarm and waits for its task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the network task panicked");
        }
    }
}

fn parse_all(field: &'static str, values: &[String]) -> Result<Vec<Multiaddr>, NetError> {
    values
        .iter()
        .map(|value| {
            value.parse::<Multiaddr>().map_err(|error| NetError::BadAddress {
                field,
                value: value.clone(),
                reason: error.to_string(),
            })
        })
        .collect()
}

/// A peer id alone, or a multiaddr whose last part is `/p2p/PEER_ID`.
fn parse_target(target: &str) -> Result<(PeerId, Option<Multiaddr>), ConnectError> {
    let bad = || ConnectError::BadTarget(target.to_owned());
    if let Ok(peer) = target.parse::<PeerId>() {
        return Ok((peer, None));
    }
    let address = target.parse::<Multiaddr>().map_err(|_| bad())?;
    match address.iter().last() {
        Some(Protocol::P2p(peer)) => Ok((peer, Some(address))),
        _ => Err(bad()),
    }
}

fn build_swarm(identity: &Identity, config: &NetworkConfig) -> Result<Swarm<Behaviour>, NetError> {
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

#[derive(Default)]
struct PeerState {
    connections: Vec<(ConnectionId, Multiaddr)>,
    rtt: Option<Duration>,
    hole_punch: Option<HolePunch>,
    /// Where this agent dialled it directly, for listening through it if it is a relay.
    dialled: Option<Multiaddr>,
}

impl PeerState {
    fn info(&self, peer: &PeerId) -> PeerInfo {
        let mut addresses: Vec<String> = Vec::new();
        for (_, address) in &self.connections {
            let address = address.to_string();
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        let direct = self.connections.iter().any(|(_, address)| !is_relayed(address));
        PeerInfo {
            peer_id: peer.to_string(),
            addresses,
            path: if direct { Path::Direct } else { Path::Relayed },
            rtt_us: self.rtt.map(|rtt| rtt.as_micros() as u64),
            hole_punch: self.hole_punch.clone(),
        }
    }
}

/// A `hearth connect` waiting for its connection.
struct Connecting {
    deadline: Instant,
    replies: Vec<oneshot::Sender<Result<PeerInfo, ConnectError>>>,
    last_error: Option<String>,
}

fn is_loopback(address: &Multiaddr) -> bool {
    address.iter().any(|part| match part {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_relayed(address: &Multiaddr) -> bool {
    address.iter().any(|part| part == Protocol::P2pCircuit)
}

struct EventLoop {
    identity: Identity,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: Bus,
    /// This agent is a relay itself (and so needs none).
    is_relay: bool,
    reachability: Reachability,
    listen_addrs: Vec<Multiaddr>,
    peers: HashMap<PeerId, PeerState>,
    /// Connected peers that offer to relay.
    relays: HashSet<PeerId>,
    /// The relay listeners, each a reservation on one relay.
    reservations: HashMap<ListenerId, PeerId>,
    /// Relays that refused or lost a reservation, and when to ask them again.
    relay_backoff: HashMap<PeerId, Instant>,
    connecting: HashMap<PeerId, Connecting>,
    offers: BTreeMap<PeerId, AdvertBody>,
    /// This agent's latest advert, signed afresh and published again when peers join.
    own: Option<AdvertBody>,
    /// When to publish `own` again (a peer joined, or the last publish found nobody).
    republish_at: Option<Instant>,
    /// Negotiation messages from peers go to the market here.
    inbound: mpsc::Sender<Inbound>,
    /// This agent's negotiation messages waiting for their reply.
    outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<negotiate::Reply, String>>>,
    /// The market's answers to peers' messages, each with the channel it goes back on.
    answers: FuturesUnordered<BoxFuture<'static, (PeerAnswer, Option<negotiate::Reply>)>>,
}

type PeerAnswer = request_response::ResponseChannel<negotiate::Reply>;

impl EventLoop {
    async fn run(&mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.handle_event(event),
                Some((channel, answer)) = self.answers.next(), if !self.answers.is_empty() => {
                    let answer = answer.unwrap_or_else(|| negotiate::Reply::Refused {
                        reason: "the agent is shutting down".to_owned(),
                    });
                    // The peer may have gone meanwhile; nothing to do then.
                    let _ = self.swarm.behaviour_mut().negotiate.send_response(channel, answer);
                }
                _ = tick.tick() => {
                    if self.republish_at.is_some_and(|at| Instant::now() >= at) {
                        self.republish_at = None;
                        self.publish_own();
                    }
                    self.expire_connecting();
                    let now = Instant::now();
                    let before = self.relay_backoff.len();
                    self.relay_backoff.retain(|_, until| *until > now);
                    if self.relay_backoff.len() < before {
                        self.reserve_relays();
                    }
                }
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Reachability(reply) => {
                let _ = reply.send(self.reachability);
            }
            Command::Peers(reply) => {
                let peers = self.peers.iter().map(|(peer, state)| state.info(peer)).collect();
                let _ = reply.send(peers);
            }
            Command::Connect(peer, address, reply) => self.connect(peer, address, reply),
            Command::Offers(reply) => {
                let now = unix_now();
                self.offers.retain(|_, body| body.expires_at > now);
                let _ = reply.send(self.offers.values().cloned().collect());
            }
            Command::Publish(body) => {
                self.own = Some(*body);
                self.publish_own();
            }
            Command::Negotiate(peer, message, reply) => {
                let id = self.swarm.behaviour_mut().negotiate.send_request(&peer, *message);
                self.outbound.insert(id, reply);
            }
        }
    }

    /// Signs the own advert with the next sequence number and publishes it.
    fn publish_own(&mut self) {
        let Some(body) = &mut self.own else { return };
        let now = unix_now();
        // The own body, set by this agent; saturating all the same, as every clock sum is.
        let lifetime = body.expires_at.saturating_sub(body.issued_at);
        // Milliseconds since the epoch: grows across restarts without being stored.
        let clock = u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0);
        body.seq = clock.max(body.seq + 1);
        (body.issued_at, body.expires_at) = (now, now.saturating_add(lifetime));
        let advert = match advert::sign(&self.identity, body.clone()) {
            Ok(advert) => advert,
            Err(error) => {
                tracing::error!(%error, "cannot sign the advert");
                return;
            }
        };
        self.offers.insert(*self.swarm.local_peer_id(), advert.body);
        let topic = IdentTopic::new(ADVERT_TOPIC);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, advert.wire) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => {
                // Nobody to tell yet: the next peer that joins gets it.
            }
            Err(error) => tracing::warn!(%error, "cannot publish the advert"),
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if self.is_relay && !is_loopback(&address) {
                    // A relay's owner says it is reachable where it listens; a relay's answer to a
                    // reservation must name such an address, and AutoNAT cannot confirm one on a
                    // LAN. AutoNAT still adds the public addresses it confirms.
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if self.is_relay {
                    self.swarm.remove_external_address(&address);
                }
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                let state = self.peers.entry(peer_id).or_default();
                let address = endpoint.get_remote_address().clone();
                if let ConnectedPoint::Dialer { .. } = endpoint
                    && !is_relayed(&address)
                {
                    state.dialled = Some(address.clone());
                }
                state.connections.push((connection_id, address));
                if let Some(connecting) = self.connecting.remove(&peer_id) {
                    let info = state.info(&peer_id);
                    for reply in connecting.replies {
                        let _ = reply.send(Ok(info.clone()));
                    }
                }
                // Subscriptions are exchanged first; then the newcomer should hear our advert.
                self.republish_at = Some(Instant::now() + Duration::from_secs(2));
                self.events.publish(Event::PeersChanged);
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.relays.remove(&peer_id);
                } else if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections.retain(|(id, _)| *id != connection_id);
                }
                self.events.publish(Event::PeersChanged);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                if let Some(connecting) = self.connecting.get_mut(&peer) {
                    connecting.last_error = Some(error.to_string());
                }
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                if let Some(relay) = self.reservations.remove(&listener_id) {
                    match reason {
                        Ok(()) => tracing::info!(%relay, "no longer listening through the relay"),
                        Err(error) => {
                            tracing::warn!(%relay, %error, "the relay reservation failed or ended");
                            self.relay_backoff.insert(relay, Instant::now() + RELAY_BACKOFF);
                        }
                    }
                    self.reserve_relays();
                }
            }
            SwarmEvent::Behaviour(event) => self.handle_behaviour(event),
            _ => {}
        }
    }

    fn handle_negotiate(&mut self, event: request_response::Event<negotiate::Message, negotiate::Reply>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message { peer, message: M::Request { request, channel, .. }, .. } => {
                let (reply, answer) = oneshot::channel();
                match self.inbound.try_send(Inbound { peer, message: request, reply }) {
                    Ok(()) => self.answers.push(Box::pin(async move { (channel, answer.await.ok()) })),
                    Err(_) => {
                        let busy =
                            negotiate::Reply::Refused { reason: "the agent is busy; try again".into() };
                        let _ = self.swarm.behaviour_mut().negotiate.send_response(channel, busy);
                    }
                }
            }
            E::Message { message: M::Response { request_id, response }, .. } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            E::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(format!("{peer}: {error}")));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "a negotiation message from a peer failed");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn handle_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Negotiate(event) => self.handle_negotiate(event),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for address in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, address);
                    }
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    // Identify runs on every connection: a relay that dialled this agent first
                    // qualifies once this agent has dialled it too.
                    self.relays.insert(peer_id);
                    self.reserve_relays();
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => tracing::info!(relay = %relay_peer_id, "reachable through a relay"),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.reachability = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                tracing::info!(reachability = ?self.reachability, "reachability changed");
                if self.reachability == Reachability::Public {
                    // Dialable directly: the relays' capacity is for those who are not.
                    for listener in self.reservations.keys().copied().collect::<Vec<_>>() {
                        self.swarm.remove_listener(listener);
                    }
                } else {
                    self.reserve_relays();
                }
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => {
                let outcome = match result {
                    Ok(_) => {
                        tracing::info!(peer = %remote_peer_id, "hole punch succeeded: direct connection");
                        HolePunch::Succeeded
                    }
                    Err(error) => {
                        tracing::info!(peer = %remote_peer_id, %error, "hole punch failed: staying relayed");
                        HolePunch::Failed { reason: error.to_string() }
                    }
                };
                if let Some(state) = self.peers.get_mut(&remote_peer_id) {
                    state.hole_punch = Some(outcome);
                }
                self.events.publish(Event::PeersChanged);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            }) => {
                let found = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                for peer in found {
                    if self.connecting.contains_key(&peer.peer_id) && !peer.addrs.is_empty() {
                        let dial = DialOpts::peer_id(peer.peer_id)
                            .condition(PeerCondition::Disconnected)
                            .addresses(peer.addrs)
                            .extend_addresses_through_behaviour()
                            .build();
                        if let Err(error) = self.swarm.dial(dial)
                            && let Some(connecting) = self.connecting.get_mut(&peer.peer_id)
                        {
                            connecting.last_error = Some(error.to_string());
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, address) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, address.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(address);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance = match message.source {
                    Some(source) => {
                        let newest = self.offers.get(&source).map(|body| body.seq);
                        match advert::verify(&message.data, &source, unix_now(), newest) {
                            Ok(advert) => {
                                self.remember(source, advert.body.clone());
                                self.events.publish(Event::OfferChanged { offer: Box::new(advert.body) });
                                MessageAcceptance::Accept
                            }
                            Err(rejection) => {
                                tracing::debug!(%source, %propagation_source, %rejection, "advert rejected");
                                MessageAcceptance::Reject
                            }
                        }
                    }
                    None => MessageAcceptance::Reject,
                };
                let _ = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            _ => {}
        }
    }

    /// Listens through connected relays, up to [`MAX_RELAYS`], unless this agent is a relay or is
    /// publicly reachable. Only relays this agent dialled qualify: the address it dialled is one
    /// that works, and it becomes the front of this agent's `/p2p-circuit` address.
    fn reserve_relays(&mut self) {
        if self.is_relay || self.reachability == Reachability::Public {
            return;
        }
        let reserved: HashSet<PeerId> = self.reservations.values().copied().collect();
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|relay| !reserved.contains(relay) && !self.relay_backoff.contains_key(relay))
            .filter_map(|relay| Some((*relay, self.peers.get(relay)?.dialled.clone()?)))
            .collect();
        for (relay, address) in candidates {
            if self.reservations.len() >= MAX_RELAYS {
                break;
            }
            let mut circuit = address;
            if let Some(Protocol::P2p(_)) = circuit.iter().last() {
                circuit.pop();
            }
            let circuit = circuit.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    self.reservations.insert(listener, relay);
                }
                Err(error) => tracing::warn!(%circuit, %error, "cannot listen through the relay"),
            }
        }
    }

    /// Starts connecting to `peer`: at `address` when given, else wherever the routing table and a
    /// Kademlia lookup say it is. The reply comes when a connection is up or the time is over.
    fn connect(
        &mut self,
        peer: PeerId,
        address: Option<Multiaddr>,
        reply: oneshot::Sender<Result<PeerInfo, ConnectError>>,
    ) {
        if let Some(state) = self.peers.get(&peer) {
            let _ = reply.send(Ok(state.info(&peer)));
            return;
        }
        let connecting = self.connecting.entry(peer).or_insert_with(|| Connecting {
            deadline: Instant::now() + CONNECT_TIMEOUT,
            replies: Vec::new(),
            last_error: None,
        });
        connecting.replies.push(reply);
        let dial = match address {
            Some(address) => DialOpts::peer_id(peer).addresses(vec![address]).build(),
            None => DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build(),
        };
        if let Err(error) = self.swarm.dial(dial) {
            connecting.last_error = Some(error.to_string());
        }
        self.swarm.behaviour_mut().kad.get_closest_peers(peer);
    }

    /// Answers the `connect` calls whose time is over.
    fn expire_connecting(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerId> =
            self.connecting.iter().filter(|(_, c)| c.deadline <= now).map(|(peer, _)| *peer).collect();
        for peer in expired {
            let Some(connecting) = self.connecting.remove(&peer) else { continue };
            let reason = connecting
                .last_error
                .unwrap_or_else(|| "no agent this one knows has an address for it".to_owned());
            for reply in connecting.replies {
                let _ = reply.send(Err(ConnectError::Unreachable { peer, reason: reason.clone() }));
            }
        }
    }

    /// Keeps `body` as `source`'s offer; when full, the advert that expires first makes room.
    fn remember(&mut self, source: PeerId, body: AdvertBody) {
        if self.offers.len() >= MAX_OFFERS && !self.offers.contains_key(&source) {
            let now = unix_now();
            self.offers.retain(|_, body| body.expires_at > now);
            if self.offers.len() >= MAX_OFFERS
                && let Some(first) =
                    self.offers.iter().min_by_key(|(_, body)| body.expires_at).map(|(peer, _)| *peer)
            {
                self.offers.remove(&first);
            }
        }
        self.offers.insert(source, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_target_is_a_peer_id_or_a_p2p_multiaddr() {
        let peer = PeerId::random();
        assert_eq!(parse_target(&peer.to_string()), Ok((peer, None)));
        let address: Multiaddr = format!("/ip4/192.0.2.1/tcp/4001/p2p/{peer}").parse().unwrap();
        assert_eq!(parse_target(&address.to_string()), Ok((peer, Some(address))));
        for bad in ["", "hello", "/ip4/192.0.2.1/tcp/4001", "/p2p/notapeer"] {
            assert_eq!(parse_target(bad), Err(ConnectError::BadTarget(bad.to_owned())), "{bad}");
        }
    }

    #[test]
    fn a_peer_reached_only_through_relays_is_relayed() {
        let peer = PeerId::random();
        let relayed: Multiaddr =
            format!("/ip4/192.0.2.1/tcp/4001/p2p/{}/p2p-circuit/p2p/{peer}", PeerId::random())
                .parse()
                .unwrap();
        let direct: Multiaddr = "/ip4/192.0.2.2/udp/4001/quic-v1".parse().unwrap();
        let mut state = PeerState::default();
        state.connections.push((ConnectionId::new_unchecked(1), relayed.clone()));
        assert_eq!(state.info(&peer).path, Path::Relayed);
        state.connections.push((ConnectionId::new_unchecked(2), direct.clone()));
        state.connections.push((ConnectionId::new_unchecked(3), direct.clone()));
        let info = state.info(&peer);
        assert_eq!(info.path, Path::Direct);
        assert_eq!(info.addresses, vec![relayed.to_string(), direct.to_string()], "each address once");
    }
}
