//! Inbound streams of the protocols served outside the event loop (blob transfer), queued for
//! their server instead of reset.
//!
//! libp2p-stream's `accept` hands streams over a channel that holds one: a stream negotiated while
//! it is full is dropped, which the peer sees as a reset right after the protocol was agreed. A
//! connection task negotiates every stream whose first frames arrived together before the server
//! runs, so a client that asks for several blobs at once had most of its streams reset (issue 23).
//! Here each protocol has a queue of [`QUEUE`] streams, shared by every connection; the server
//! answers what it cannot serve yet with `busy`. Only a peer that opens more streams than that
//! before the server takes one still meets a reset.
//!
//! Outbound streams still go through libp2p-stream's `Control`. This behaviour owns no task: its
//! handlers push into the queues, which end when the server drops its receiver.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{Endpoint, InboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

/// Streams of one protocol negotiated but not yet taken by its server.
pub const QUEUE: usize = 64;

/// A new stream and who opened it.
pub type Incoming = (PeerId, Stream);

type Queues = Arc<Mutex<HashMap<StreamProtocol, mpsc::Sender<Incoming>>>>;

/// The protocol is served already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the protocol is already served")]
pub struct AlreadyServed;

/// Registers the protocols served; cheap to clone.
#[derive(Clone, Default)]
pub(super) struct Control {
    queues: Queues,
}

impl Control {
    /// Starts answering `protocol`: its inbound streams arrive on the receiver, until it drops.
    pub(super) fn accept(&self, protocol: StreamProtocol) -> Result<mpsc::Receiver<Incoming>, AlreadyServed> {
        let mut queues = lock(&self.queues);
        queues.retain(|_, queue| !queue.is_closed());
        if queues.contains_key(&protocol) {
            return Err(AlreadyServed);
        }
        let (queue, receiver) = mpsc::channel(QUEUE);
        queues.insert(protocol, queue);
        Ok(receiver)
    }
}

/// The behaviour: one [`Handler`] per connection, all pushing into the same queues.
#[derive(Default)]
pub(super) struct Behaviour {
    control: Control,
}

impl Behaviour {
    /// The handle that registers protocols.
    pub(super) fn control(&self) -> Control {
        self.control.clone()
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler { peer, queues: Arc::clone(&self.control.queues) }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's side: offers the registered protocols and queues what is negotiated.
pub(super) struct Handler {
    peer: PeerId,
    queues: Queues,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        let queues = lock(&self.queues);
        let served = queues.iter().filter(|(_, queue)| !queue.is_closed()).map(|(p, _)| p.clone()).collect();
        SubstreamProtocol::new(Protocols(served), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Self::OutboundOpenInfo>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
            let Some(queue) = lock(&self.queues).get(&protocol).cloned() else {
                tracing::debug!(peer = %self.peer, %protocol, "nobody serves the protocol now");
                return;
            };
            // Dropping the stream resets it: the peer learns at once that it was not taken.
            if let Err(error) = queue.try_send((self.peer, stream)) {
                let why = match error {
                    mpsc::error::TrySendError::Full(_) => "the queue is full",
                    mpsc::error::TrySendError::Closed(_) => "nobody serves the protocol now",
                };
                tracing::debug!(peer = %self.peer, %protocol, "resetting an inbound stream: {why}");
            }
        }
    }
}

/// The protocols offered to a peer that opens a stream.
pub(super) struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
