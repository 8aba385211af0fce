//! What the agent tells its watchers: the one place where events that cross modules are declared.
//!
//! The daemon publishes [`Event`]s on a [`Bus`] (a bounded broadcast channel); the control API
//! streams them to WebSocket clients as JSON objects tagged by `type`. A subscriber that falls
//! behind loses the oldest events and is told how many it missed, never blocking the publisher.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::availability::Availability;
use crate::jobs::{JobRecord, Stream};
use crate::market::RemoteJob;
use crate::net::AdvertBody;
use crate::requests::RequestStatus;
use crate::resources::Resources;
use crate::store::OwnerNotice;
use crate::transfer::Fetch;

/// How many events a slow subscriber may fall behind before it misses some.
const BUS_CAPACITY: usize = 256;

/// The agent's life-cycle state as the owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Opening its files and starting its parts.
    Starting,
    /// Running and answering.
    Ready,
    /// Shutting down after a signal.
    Stopping,
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
        })
    }
}

/// Something that changed, pushed to every watcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The agent's state changed.
    StateChanged {
        /// The new state.
        state: AgentState,
    },
    /// Fresh figures for CPU, memory, disk and GPUs.
    ResourcesRefreshed {
        /// The figures.
        resources: Box<Resources>,
    },
    /// A job was accepted or changed state; the whole record as it now stands.
    JobChanged {
        /// The job.
        job: Box<JobRecord>,
    },
    /// Whether the machine shares changed, or what it offers did.
    AvailabilityChanged {
        /// Sharing with its capacity, or paused with the reasons.
        availability: Availability,
    },
    /// The owner paused, resumed or stopped a job; recorded for the job's consumer.
    OwnerNotice {
        /// What happened and why.
        notice: OwnerNotice,
    },
    /// A peer connected or disconnected; `GET /api/v1/peers` has the list.
    PeersChanged,
    /// A valid advert arrived (a new offer, or a newer one from the same agent).
    OfferChanged {
        /// What it offers.
        offer: Box<AdvertBody>,
    },
    /// A fetch started, progressed (a few times a second: bytes, rate, ETA) or ended.
    TransferChanged {
        /// The fetch as it now stands.
        transfer: Box<Fetch>,
    },
    /// A job this agent asked another agent to run changed: looking, agreed, its provider's
    /// notices, its outputs fetched.
    RemoteJobChanged {
        /// The job as it now stands.
        job: Box<RemoteJob>,
    },
    /// A request package changed: queued, a resource acquired or released, a task's progress.
    RequestChanged {
        /// The request as it now stands.
        request: Box<RequestStatus>,
    },
    /// A job wrote to stdout or stderr (invalid UTF-8 is replaced).
    JobOutput {
        /// The job's id.
        id: String,
        /// Which stream.
        stream: Stream,
        /// What it wrote.
        text: String,
    },
    /// A job's log file grew: `GET /api/v1/jobs/{id}/logs/{stream}` has bytes up to `length`.
    /// Coalesced: a few a second per stream at most while the job writes, the last length always
    /// sent, none once the log is full.
    JobLog {
        /// The job's id.
        id: String,
        /// Which stream.
        stream: Stream,
        /// The log's length in bytes.
        length: u64,
    },
}

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
