//! This agent's capacity advert: built from the availability, the machine's figures and the
//! policy's windows, and handed to the network whenever the availability changes and every few
//! seconds. The network's `advert::Pacer` decides when it is signed and published (on a change a
//! consumer acts on, before it expires, for a peer that joins, at a bounded rate).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::availability::evaluate::upcoming_windows;
use crate::availability::{Availability, OwnerControls};
use crate::clock::unix_now;
use crate::config::FAKE_GPU_PREFIX;
use crate::identity::Identity;
use crate::jobs::{JobState, Supervisor};
use crate::market::PRICES;
use crate::net::Network;
use crate::net::advert::{ADVERT_VERSION, AdvertBody, AdvertGpu, Free, Reputation};
use crate::resources::Resources;

/// How long an advert stays valid.
const LIFETIME: Duration = Duration::from_secs(10 * 60);

/// How far ahead the windows reach.
const HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often the advert is built again from its inputs (the free capacity moves without an
/// availability change).
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Everything the advert is made of.
pub(crate) struct Sources {
    pub identity: Identity,
    pub network: Network,
    pub availability: watch::Receiver<Availability>,
    pub resources: watch::Receiver<Resources>,
    pub owner: Arc<OwnerControls>,
    pub jobs: Supervisor,
}

/// Handle to the advertising task.
#[must_use = "dropping the handle leaves the task running until the daemon's token is cancelled"]
pub(crate) struct AdvertTask {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl AdvertTask {
    pub(crate) fn spawn(sources: Sources, cancel: &CancellationToken) -> Self {
        let stop = cancel.child_token();
        let task_stop = stop.clone();
        let task = tokio::spawn(async move {
            let mut availability = sources.availability.clone();
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                sources.network.publish(body(&sources).await).await;
                tokio::select! {
                    () = task_stop.cancelled() => break,
                    _ = availability.changed() => {}
                    _ = tick.tick() => {}
                }
            }
        });
        Self { stop, task }
    }

    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the advert task panicked");
        }
    }
}

async fn body(sources: &Sources) -> AdvertBody {
    let now = unix_now();
    let availability = sources.availability.borrow().clone();
    let resources = sources.resources.borrow().clone();
    let policy = sources.owner.policy();
    let (state, paused_because, free) = match &availability {
        Availability::Sharing { capacity, .. } => {
            let gpus = capacity
                .gpus
                .iter()
                .filter_map(|offered| match resources.gpus.iter().find(|gpu| gpu.uuid == offered.uuid) {
                    Some(gpu) => Some(AdvertGpu {
                        model: gpu.name.clone(),
                        memory_bytes: offered.memory_bytes,
                        compute_capability: gpu
                            .compute_capability
                            .as_ref()
                            .map(|cc| format!("{}.{}", cc.major, cc.minor))
                            .unwrap_or_default(),
                    }),
                    // A GPU the machine does not have: the `[testing] fake_gpus` test setting.
                    None if offered.uuid.starts_with(FAKE_GPU_PREFIX) => Some(AdvertGpu {
                        model: "fake GPU (test setting)".to_owned(),
                        memory_bytes: offered.memory_bytes,
                        compute_capability: String::new(),
                    }),
                    None => None,
                })
                .collect();
            let free = Free {
                cpu_millis: capacity.cpu_millis,
                memory_bytes: capacity.memory_bytes,
                disk_bytes: resources.disk.free_bytes,
                gpus,
            };
            ("sharing", Vec::new(), free)
        }
        Availability::Paused { reasons } => {
            ("paused", reasons.iter().map(ToString::to_string).collect(), Free::default())
        }
    };
    let windows = upcoming_windows(&policy, &policy.time_zone(), jiff::Timestamp::now(), HORIZON)
        .into_iter()
        .map(|(from, to)| [from.as_second(), to.as_second()])
        .collect();
    let jobs = sources.jobs.list().await.unwrap_or_default();
    let reputation = Reputation {
        completed: jobs.iter().filter(|job| matches!(job.state, JobState::Finished { .. })).count() as u64,
        failed: jobs.iter().filter(|job| matches!(job.state, JobState::Failed { .. })).count() as u64,
    };
    AdvertBody {
        version: ADVERT_VERSION,
        peer_id: sources.identity.peer_id().to_string().into(),
        seq: 0,
        issued_at: now,
        expires_at: now + LIFETIME.as_secs() as i64,
        state: state.to_owned(),
        paused_because,
        free,
        windows,
        prices: PRICES,
        reputation,
    }
}
