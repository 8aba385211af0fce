//! What the agent tells its watchers: the one place where events that cross modules are declared.
//!
//! The daemon publishes [`Event`]s on a [`Bus`] (a bounded broadcast channel); the control API
//! streams them to WebSocket clients as JSON objects tagged by `type`. A subscriber that falls
//! behind loses the oldest events and is told how many it missed, never blocking the publisher.

use tokio::sync::broadcast;

pub use hearth_api::events::{AgentState, Event};

/// How many events a slow subscriber may fall behind before it misses some.
const BUS_CAPACITY: usize = 256;

/// The publishing side of the event stream. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus(broadcast::Sender<Event>);

impl Default for Bus {
    fn default() -> Self {
        Self(broadcast::channel(BUS_CAPACITY).0)
    }
}

impl Bus {
    /// Sends `event` to every current subscriber; with none, it is dropped.
    pub fn publish(&self, event: Event) {
        let _ = self.0.send(event);
    }

    /// A new subscriber that sees events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.subscribe()
    }
}
