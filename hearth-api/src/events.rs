//! What the agent tells its watchers: the [`Event`]s the daemon publishes and the messages of the
//! event stream (`/api/v1/events`), JSON objects tagged by `type`.

use crate::ids::JobId;
use serde::{Deserialize, Serialize};

use crate::availability::Availability;
use crate::jobs::{JobRecord, OwnerNotice, Stream};
use crate::market::{AdvertBody, RemoteJob};
use crate::package::RequestStatus;
use crate::resources::Resources;
use crate::status::Status;
use crate::transfer::Fetch;

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
        id: JobId,
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
        id: JobId,
        /// Which stream.
        stream: Stream,
        /// The log's length in bytes.
        length: u64,
    },
}

/// A message on the event stream (`/api/v1/events`), tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamMessage {
    /// Always the first message: everything a fresh watcher needs to draw the screen.
    Snapshot {
        /// As from `GET /api/v1/status`.
        status: Status,
        /// As from `GET /api/v1/resources`.
        resources: Box<Resources>,
    },
    /// This watcher fell behind and `missed` events were dropped; re-read the state.
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
    /// Something changed.
    #[serde(untagged)]
    Event(Event),
}
