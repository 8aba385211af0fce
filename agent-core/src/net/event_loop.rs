//! The network task: it owns the swarm and the cache of valid adverts, takes commands from the
//! [`Network`](super::Network) handles, answers identify, Kademlia, relay, AutoNAT and
//! hole-punching events, checks every advert, publishes this agent's own when its
//! [`advert::Pacer`] says (on its 500 ms tick), and carries negotiation messages both ways.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::futures::StreamExt;
use libp2p::futures::future::BoxFuture;
use libp2p::futures::stream::FuturesUnordered;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, mdns, ping, relay};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::advert::{self, Advert};
use super::swarm::{Behaviour, BehaviourEvent};
use super::{ADVERT_TOPIC, Command, ConnectError, Inbound, KAD_PROTOCOL, MAX_RELAYS, negotiate};
use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::identity::Identity;
use hearth_api::peers::{HolePunch, Path, PeerInfo, Reachability};

/// The most adverts kept, one per advertiser.
const MAX_OFFERS: usize = 4096;

/// How long a relay that refused a reservation is left alone.
const RELAY_BACKOFF: Duration = Duration::from_secs(60);

/// How long [`Network::connect`](super::Network::connect) looks for a peer before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct PeerState {
    pub(super) connections: Vec<(ConnectionId, Multiaddr)>,
    pub(super) rtt: Option<Duration>,
    pub(super) hole_punch: Option<HolePunch>,
    /// Where this agent dialled it directly, for listening through it if it is a relay.
    pub(super) dialled: Option<Multiaddr>,
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
            peer_id: peer.to_string().into(),
            addresses,
            path: if direct { Path::Direct } else { Path::Relayed },
            rtt_us: self.rtt.map(|rtt| rtt.as_micros() as u64),
            hole_punch: self.hole_punch.clone(),
        }
    }
}

/// A `hearth connect` waiting for its connection.
pub(super) struct Connecting {
    pub(super) deadline: Instant,
    pub(super) replies: Vec<oneshot::Sender<Result<PeerInfo, ConnectError>>>,
    pub(super) last_error: Option<String>,
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

pub(super) struct EventLoop {
    pub(super) identity: Identity,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: Bus,
    /// This agent is a relay itself (and so needs none).
    pub(super) is_relay: bool,
    pub(super) reachability: Reachability,
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) peers: HashMap<PeerId, PeerState>,
    /// Connected peers that offer to relay.
    pub(super) relays: HashSet<PeerId>,
    /// The relay listeners, each a reservation on one relay.
    pub(super) reservations: HashMap<ListenerId, PeerId>,
    /// Relays that refused or lost a reservation, and when to ask them again.
    pub(super) relay_backoff: HashMap<PeerId, Instant>,
    pub(super) connecting: HashMap<PeerId, Connecting>,
    /// The newest valid advert of each advertiser, own included, with the bytes it came in.
    pub(super) offers: BTreeMap<PeerId, Advert>,
    /// This agent's advert: the latest body and when to sign and publish it.
    pub(super) own: advert::Pacer,
    /// Negotiation messages from peers go to the market here.
    pub(super) inbound: mpsc::Sender<Inbound>,
    /// This agent's negotiation messages waiting for their reply.
    pub(super) outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<negotiate::Reply, String>>>,
    /// The market's answers to peers' messages, each with the channel it goes back on.
    pub(super) answers: FuturesUnordered<BoxFuture<'static, (PeerAnswer, Option<negotiate::Reply>)>>,
}

type PeerAnswer = request_response::ResponseChannel<negotiate::Reply>;

impl EventLoop {
    pub(super) async fn run(&mut self, stop: CancellationToken) {
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
                    self.publish_own();
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
                self.offers.retain(|_, advert| advert.body.expires_at > now);
                let _ = reply.send(self.offers.values().cloned().collect());
            }
            Command::Publish(body) => {
                self.own.update(*body, Instant::now());
                self.publish_own();
            }
            Command::Negotiate(peer, message, reply) => {
                let id = self.swarm.behaviour_mut().negotiate.send_request(&peer, *message);
                self.outbound.insert(id, reply);
            }
        }
    }

    /// Signs and publishes the own advert if the pacer says it is time.
    fn publish_own(&mut self) {
        let Some(body) = self.own.poll(Instant::now(), jiff::Timestamp::now().as_millisecond()) else {
            return;
        };
        let advert = match advert::sign(&self.identity, body) {
            Ok(advert) => advert,
            Err(error) => {
                tracing::error!(%error, "cannot sign the advert");
                return;
            }
        };
        tracing::debug!(seq = advert.body.seq, state = %advert.body.state, "advert published");
        let wire = advert.wire.clone();
        self.offers.insert(*self.swarm.local_peer_id(), advert);
        let topic = IdentTopic::new(ADVERT_TOPIC);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, wire) {
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
                        let newest = self.offers.get(&source).map(|advert| advert.body.seq);
                        match advert::verify(&message.data, &source, unix_now(), newest) {
                            Ok(advert) => {
                                let offer = Box::new(advert.body.clone());
                                self.remember(source, advert);
                                self.events.publish(Event::OfferChanged { offer });
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
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if topic == IdentTopic::new(ADVERT_TOPIC).hash() =>
            {
                // A peer that can hear adverts now: gossipsub replays nothing published before,
                // so it hears ours again (see `advert::Pacer::peer_joined`).
                self.own.peer_joined(Instant::now());
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

    /// Keeps `advert` as `source`'s offer; when full, the advert that expires first makes room.
    fn remember(&mut self, source: PeerId, advert: Advert) {
        if self.offers.len() >= MAX_OFFERS && !self.offers.contains_key(&source) {
            let now = unix_now();
            self.offers.retain(|_, advert| advert.body.expires_at > now);
            if self.offers.len() >= MAX_OFFERS
                && let Some(first) =
                    self.offers.iter().min_by_key(|(_, advert)| advert.body.expires_at).map(|(peer, _)| *peer)
            {
                self.offers.remove(&first);
            }
        }
        self.offers.insert(source, advert);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
