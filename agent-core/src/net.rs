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
mod event_loop;
pub mod inbound;
pub mod negotiate;
mod swarm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use libp2p::futures::stream::FuturesUnordered;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::event_loop::EventLoop;
use self::swarm::build_swarm;
use crate::config::NetworkConfig;
use crate::events::Bus;
use crate::identity::Identity;
pub use advert::{Advert, AdvertBody};
pub use hearth_api::peers::{HolePunch, Path, PeerInfo, Reachability};

/// Hearth's Kademlia protocol: a DHT of Hearth agents only.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/kad/1.0.0");

/// The gossipsub topic of capacity adverts.
pub const ADVERT_TOPIC: &str = "hearth/adverts/1";

/// The most relays this agent listens through while it is not known to be publicly reachable.
pub const MAX_RELAYS: usize = 2;

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

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Reachability(oneshot::Sender<Reachability>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Connect(PeerId, Option<Multiaddr>, oneshot::Sender<Result<PeerInfo, ConnectError>>),
    Offers(oneshot::Sender<Vec<Advert>>),
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
    inbound: inbound::Control,
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
        let accepting = swarm.behaviour().inbound.control();
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
            own: advert::Pacer::new(advert::Pace::default()),
            inbound,
            outbound: HashMap::new(),
            answers: FuturesUnordered::new(),
        };
        let task_stop = stop.clone();
        let task = tokio::spawn(async move { event_loop.run(task_stop).await });
        let network = Self { commands, peer_id: identity.peer_id(), streams, inbound: accepting };
        Ok((network, NetworkTask { stop, task }, inbound_rx))
    }

    /// This agent's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Opens raw streams of protocols served outside the event loop (blob transfer). Opening a
    /// stream to a peer dials it when no connection exists.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// Serves `protocol` outside the event loop: its inbound streams arrive on the receiver, up
    /// to [`inbound::QUEUE`] waiting, until the receiver drops.
    pub fn accept(
        &self,
        protocol: StreamProtocol,
    ) -> Result<mpsc::Receiver<inbound::Incoming>, inbound::AlreadyServed> {
        self.inbound.accept(protocol)
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
        self.adverts().await.into_iter().map(|advert| advert.body).collect()
    }

    /// The valid, unexpired adverts known, own included, each with the signed bytes it came in.
    pub async fn adverts(&self) -> Vec<Advert> {
        self.ask(Command::Offers).await.unwrap_or_default()
    }

    /// Hands this agent's current advert to the network, which signs and publishes it when it
    /// differs from the last one published in a way a consumer acts on, at a bounded rate, and
    /// again before it expires or when a peer joins (see [`advert::Pacer`]); each with a new
    /// sequence number, so no receiver takes it for a replay.
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
}
