//! The peer-to-peer network: one libp2p swarm in one task, driven through a cloneable [`Network`]
//! handle.
//!
//! The swarm speaks TCP (noise, yamux) and QUIC; runs identify and ping; finds peers through
//! Kademlia under Hearth's own protocol name (seeded from the bootstrap list) and through mDNS on
//! the LAN; reaches peers behind NAT through relays, DCUtR hole punching and AutoNAT; and can be a
//! relay itself (`hearth daemon --relay`). Connection counts and the process's memory are limited.
//! Capacity adverts travel on one gossipsub topic; each message is checked by
//! [`advert::verify`] before gossipsub forwards it, and a rejected one lowers its sender's score.
//!
//! The task owns the swarm and the cache of valid adverts; commands come in on a bounded channel,
//! each with a oneshot reply. It ends on [`Network::shutdown`] or when the daemon's token fires.

pub mod advert;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, mdns,
    memory_connection_limits, noise, ping, relay, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::NetworkConfig;
use crate::events::{Bus, Event};
use crate::identity::Identity;
pub use advert::{Advert, AdvertBody};

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

/// A connected peer, as `hearth peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses of its connections.
    pub addresses: Vec<String>,
    /// The last ping's round trip, in microseconds.
    pub rtt_us: Option<u64>,
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
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Offers(oneshot::Sender<Vec<AdvertBody>>),
    Publish(Box<AdvertBody>),
}

/// Handle to the network task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
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
    ) -> Result<(Self, NetworkTask), NetError> {
        let listen = parse_all("network.listen", &config.listen)?;
        let bootstrap = parse_all("network.bootstrap", &config.bootstrap)?;
        let mut swarm = build_swarm(identity, config)?;
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
        let stop = cancel.child_token();
        let mut event_loop = EventLoop {
            identity: identity.clone(),
            swarm,
            commands: receiver,
            events,
            listen_addrs: Vec::new(),
            peers: HashMap::new(),
            offers: BTreeMap::new(),
            own: None,
            republish_at: None,
        };
        let task_stop = stop.clone();
        let task = tokio::spawn(async move { event_loop.run(task_stop).await });
        Ok((Self { commands, peer_id: identity.peer_id() }, NetworkTask { stop, task }))
    }

    /// This agent's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the swarm listens on, each ending in `/p2p/PEER_ID`.
    pub async fn listen_addrs(&self) -> Vec<String> {
        let addrs = self.ask(Command::ListenAddrs).await.unwrap_or_default();
        addrs.into_iter().map(|a| a.with(Protocol::P2p(self.peer_id)).to_string()).collect()
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
            let relay = config.relay.then(|| relay::Behaviour::new(peer_id, relay::Config::default()));
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
                        .with_agent_version(format!("hearth/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::default(),
                kad,
                mdns: mdns.into(),
                gossipsub,
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
                dcutr: dcutr::Behaviour::new(peer_id),
            })
        })
        .map_err(|e| start(&e))?
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
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
    params
}

struct PeerState {
    addresses: Vec<Multiaddr>,
    rtt: Option<Duration>,
}

struct EventLoop {
    identity: Identity,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: Bus,
    listen_addrs: Vec<Multiaddr>,
    peers: HashMap<PeerId, PeerState>,
    offers: BTreeMap<PeerId, AdvertBody>,
    /// This agent's latest advert, signed afresh and published again when peers join.
    own: Option<AdvertBody>,
    /// When to publish `own` again (a peer joined, or the last publish found nobody).
    republish_at: Option<Instant>,
}

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
                _ = tick.tick() => {
                    if self.republish_at.is_some_and(|at| Instant::now() >= at) {
                        self.republish_at = None;
                        self.publish_own();
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
            Command::Peers(reply) => {
                let peers = self
                    .peers
                    .iter()
                    .map(|(peer, state)| PeerInfo {
                        peer_id: peer.to_string(),
                        addresses: state.addresses.iter().map(ToString::to_string).collect(),
                        rtt_us: state.rtt.map(|rtt| rtt.as_micros() as u64),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Offers(reply) => {
                let now = unix_now();
                self.offers.retain(|_, body| body.expires_at > now);
                let _ = reply.send(self.offers.values().cloned().collect());
            }
            Command::Publish(body) => {
                self.own = Some(*body);
                self.publish_own();
            }
        }
    }

    /// Signs the own advert with the next sequence number and publishes it.
    fn publish_own(&mut self) {
        let Some(body) = &mut self.own else { return };
        let now = unix_now();
        let lifetime = body.expires_at - body.issued_at;
        // Milliseconds since the epoch: grows across restarts without being stored.
        let clock = u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0);
        body.seq = clock.max(body.seq + 1);
        (body.issued_at, body.expires_at) = (now, now + lifetime);
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
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listen_addrs.retain(|a| *a != address),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                let state =
                    self.peers.entry(peer_id).or_insert(PeerState { addresses: Vec::new(), rtt: None });
                let address = endpoint.get_remote_address().clone();
                if !state.addresses.contains(&address) {
                    state.addresses.push(address);
                }
                // Subscriptions are exchanged first; then the newcomer should hear our advert.
                self.republish_at = Some(Instant::now() + Duration::from_secs(2));
                self.events.publish(Event::PeersChanged);
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, endpoint, .. } => {
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                } else if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.addresses.retain(|a| a != endpoint.get_remote_address());
                }
                self.events.publish(Event::PeersChanged);
            }
            SwarmEvent::Behaviour(event) => self.handle_behaviour(event),
            _ => {}
        }
    }

    fn handle_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })
                if info.protocols.contains(&KAD_PROTOCOL) =>
            {
                for address in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, address);
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

/// Unix seconds now.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}
