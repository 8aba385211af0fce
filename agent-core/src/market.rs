//! The market: who runs which job. A consumer picks providers from their adverts and sends each a
//! signed request ([`consumer`]); a provider checks and queues requests and, whenever idle capacity
//! appears, chooses among them with [`matching::choose`] and offers signed terms ([`provider`]);
//! the consumer countersigns the best offer, and the two signatures make the agreement. Then the
//! provider fetches the job's files from the consumer, runs the job under its [`Supervisor`], and
//! sends signed notices of its states; the outputs come back as a folder blob.
//!
//! [`Market::spawn`] starts one task that answers the negotiation messages peers send (each
//! answered in a task of its own, so a slow answer holds up no other) and one that matches pending
//! requests against idle capacity; every job under an agreement, on either side, has a task that
//! follows it. All of them are tracked and end on [`MarketTask::shutdown`]. The market owns the
//! pending requests and the agreements in progress; the store keeps signed agreements and the
//! consumer's remote jobs, so `hearth jobs` still lists them after a restart.

pub mod matching;

mod consumer;
mod holding;
mod provider;
mod receipts;
mod reservations;

/// The checks a provider runs on a peer's job request and reservation ask, for the fuzz targets.
#[cfg(test)]
pub(crate) use provider::check as check_request;
#[cfg(test)]
pub(crate) use reservations::check as check_ask;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use libp2p::PeerId;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use consumer::RemoteJob;
pub use holding::Failure;
pub use reservations::{HeldReservation, MAX_HOLD_S};

use crate::availability::Availability;
use crate::config::FAKE_GPU_PREFIX;
use crate::events::{Bus, Event};
use crate::identity::Identity;
use crate::jobs::{SpecError, Stream, Supervisor};
use crate::ledger::Ledger;
use crate::net::advert::{Prices, Rejection};
use crate::net::negotiate::{Allocation, Message, Reply, Reservation, ReserveRequest, Signed};
use crate::net::{Inbound, Network};
use crate::resources::Resources;
use crate::store::{Store, StoreError};
use crate::transfer::{FetchRequest, Imported, TransferError, Transfers};
use crate::uploads::Staged;
use hearth_api::jobs::OwnerNotice;
pub use hearth_api::market::credits;

/// What this agent charges, in thousandths of a credit per resource-hour: one credit per core, a
/// tenth per GiB of memory, ten per GPU. Adverts show these; offers use them.
pub const PRICES: Prices = Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 };

/// Why a market request failed.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    /// The spec is not acceptable; nothing was sent.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No remote job has this id.
    #[error("no remote job {0} on this agent")]
    NotFound(String),
    /// Not possible in the job's state.
    #[error("{0}")]
    Conflict(String),
    /// The provider could not be reached or refused.
    #[error("{0}")]
    Provider(String),
    /// A file could not be imported or the outputs written.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// Everything the market works with.
pub struct Parts {
    /// This agent's key, which signs requests, terms and notices.
    pub identity: Identity,
    /// The swarm, for negotiation messages and adverts.
    pub network: Network,
    /// Blobs: the job's files go out, its outputs come back.
    pub transfers: Transfers,
    /// Runs the jobs this agent agreed to run.
    pub jobs: Supervisor,
    /// Keeps agreements and remote jobs.
    pub store: Store,
    /// Records every interaction, and keeps receipts and checkpoints.
    pub ledger: Ledger,
    /// Where job changes are published.
    pub events: Bus,
    /// Whether the machine shares, and what.
    pub availability: watch::Receiver<Availability>,
    /// The machine's hardware: the granted GPUs' device nodes and models.
    pub resources: watch::Receiver<Resources>,
    /// A folder of its own, under the data dir: the files of the jobs run for others.
    pub dir: PathBuf,
}

/// The market. Cheap to clone.
#[derive(Clone)]
pub struct Market {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Market {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Market").finish_non_exhaustive()
    }
}

struct Inner {
    parts: Parts,
    provider: Mutex<provider::State>,
    consumer: Mutex<consumer::State>,
    issued: Mutex<receipts::Issued>,
    /// Wakes the matcher: a request arrived or capacity was freed.
    wake: Notify,
    /// Wakes offers that wait for a better-ranked provider (see `consumer::on_offer`): a
    /// negotiation changed (a provider refused, an offer was taken or let go, the job was
    /// cancelled).
    negotiated: Notify,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Inner {
    fn provider(&self) -> MutexGuard<'_, provider::State> {
        self.provider.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn consumer(&self) -> MutexGuard<'_, consumer::State> {
        self.consumer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issued(&self) -> MutexGuard<'_, receipts::Issued> {
        self.issued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The market's tasks, for the daemon to stop.
#[must_use = "dropping the task handle leaves the market running until the daemon's token fires"]
pub struct MarketTask {
    inner: Arc<Inner>,
}

impl Market {
    /// Starts answering negotiation messages from `inbound` and matching requests against idle
    /// capacity; remote jobs a previous run left following are followed again.
    pub async fn spawn(
        parts: Parts,
        mut inbound: mpsc::Receiver<Inbound>,
        cancel: &CancellationToken,
    ) -> Result<(Self, MarketTask), MarketError> {
        let remote = consumer::load(&parts.store).await?;
        let inner = Arc::new(Inner {
            parts,
            provider: Mutex::default(),
            consumer: Mutex::new(consumer::State::new(remote)),
            issued: Mutex::default(),
            wake: Notify::new(),
            negotiated: Notify::new(),
            tasks: TaskTracker::new(),
            stop: cancel.child_token(),
        });
        consumer::resume(&inner).await;

        let answering = Arc::clone(&inner);
        inner.tasks.spawn(async move {
            loop {
                let message = tokio::select! {
                    () = answering.stop.cancelled() => break,
                    message = inbound.recv() => match message {
                        Some(message) => message,
                        None => break,
                    },
                };
                let inner = Arc::clone(&answering);
                answering.tasks.spawn(async move {
                    let Inbound { peer, message, reply } = message;
                    let answer = answer(&inner, peer, message).await;
                    let _ = reply.send(answer);
                });
            }
        });
        let matcher = Arc::clone(&inner);
        inner.tasks.spawn(async move { provider::match_forever(matcher).await });
        Ok((Self { inner: Arc::clone(&inner) }, MarketTask { inner }))
    }

    /// Validates an uploaded spec, imports its files into the blob store, records the remote job
    /// and starts looking for a provider; returns at once. The files are in the store when this
    /// returns, so the staging folder may go.
    pub async fn submit_staged(&self, staged: &Staged) -> Result<RemoteJob, MarketError> {
        consumer::submit(&self.inner, &staged.spec(), &staged.files()).await
    }

    /// Records a task of request package `package` and asks `provider`, which holds
    /// `reservation` for it at `prices`, to run it there; returns at once.
    pub async fn submit_in(
        &self,
        spec_path: &Path,
        package: &str,
        provider: PeerId,
        reservation: &str,
        prices: Prices,
    ) -> Result<RemoteJob, MarketError> {
        consumer::submit_in(&self.inner, spec_path, package, provider, reservation, prices).await
    }

    /// Asks `ask.provider` to hold resources (`ask` is signed here); its verified grant, or why
    /// not. The ask and the grant go into the ledger.
    pub async fn reserve(&self, ask: &ReserveRequest) -> Result<Reservation, Failure> {
        holding::reserve(&self.inner, ask).await
    }

    /// Asks `provider` to hold reservation `id` another hold period.
    pub async fn keep(&self, provider: PeerId, id: &str) -> Result<(), Failure> {
        holding::keep(&self.inner, provider, id).await
    }

    /// Sends `provider` a signed release of reservation `id`, and records it.
    pub async fn release(&self, provider: PeerId, id: &str, reason: &str) -> Result<(), Failure> {
        holding::release(&self.inner, provider, id, reason).await
    }

    /// The sharing providers whose adverts fit `demand` (for `time_s`, under the price ceiling),
    /// best first, with the prices their adverts show.
    pub async fn providers_for(
        &self,
        demand: &Allocation,
        time_s: u64,
        max_price_per_hour: Option<u64>,
    ) -> Vec<(PeerId, Prices)> {
        consumer::providers_for(&self.inner, demand, time_s, max_price_per_hour).await
    }

    /// The reservations this agent holds for other agents' request packages.
    pub fn reservations(&self) -> Vec<HeldReservation> {
        reservations::list(&self.inner)
    }

    /// Every remote job, oldest first.
    pub fn remote_jobs(&self) -> Vec<RemoteJob> {
        self.inner.consumer().list()
    }

    /// One remote job.
    pub fn remote_job(&self, id: &str) -> Result<RemoteJob, MarketError> {
        consumer::job_of(&self.inner, id)
    }

    /// Stops a remote job: withdraws its requests, or asks its provider to cancel it.
    pub async fn cancel(&self, id: &str) -> Result<RemoteJob, MarketError> {
        consumer::cancel(&self.inner, id).await
    }

    /// A remote job's output from `offset` on, read from its provider: the text, where the next
    /// read starts, and whether the job has ended. With `wait`, an answer that would be empty is
    /// held until there is more or the job ended, at most [`LOG_WAIT`](crate::net::negotiate::LOG_WAIT).
    pub async fn logs(
        &self,
        id: &str,
        stream: Stream,
        offset: u64,
        wait: bool,
    ) -> Result<(String, u64, bool), MarketError> {
        consumer::logs(&self.inner, id, stream, offset, wait).await
    }

    /// The signed notices the provider of remote job `id` sent about it, oldest first: each state
    /// it put the job in, and why (the provider's owner paused or stopped it, say).
    pub async fn notices(&self, id: &str) -> Result<Vec<OwnerNotice>, MarketError> {
        consumer::notices(&self.inner, id).await
    }

    /// A finished remote job's outputs, already fetched from its provider: their folder blob.
    pub async fn results(&self, id: &str) -> Result<Imported, MarketError> {
        consumer::results(&self.inner, id).await
    }
}

impl Market {
    /// Asks every agent this one made agreements with (or `only` that one) for the newest
    /// checkpoint of this agent's ledger it holds; each answer, or why there was none.
    pub async fn witnesses(&self, only: Option<&str>) -> Vec<(String, Result<Option<Signed>, String>)> {
        receipts::ask_witnesses(&self.inner, only).await
    }
}

impl MarketTask {
    /// Stops answering and matching, and waits for every task. Jobs run for others are stopped by
    /// the supervisor's own shutdown; remote jobs are followed again at the next start.
    pub async fn shutdown(self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Answers one negotiation message from `peer`.
async fn answer(inner: &Arc<Inner>, peer: PeerId, message: Message) -> Reply {
    match message {
        Message::Request { request } => provider::on_request(inner, peer, request).await,
        Message::Withdraw { request_id } => provider::on_withdraw(inner, peer, &request_id),
        Message::Cancel { agreement_id } => provider::on_cancel(inner, peer, &agreement_id).await,
        Message::Status { agreement_id } => provider::on_status(inner, peer, &agreement_id).await,
        Message::Logs { agreement_id, stream, offset, wait } => {
            provider::on_logs(inner, peer, &agreement_id, stream, offset, wait).await
        }
        Message::Offer { terms } => consumer::on_offer(inner, peer, terms).await,
        Message::Notice { notice } => consumer::on_notice(inner, peer, notice).await,
        Message::Countersign { agreement_id, signature, checkpoint } => {
            receipts::on_countersign(inner, peer, &agreement_id, signature, checkpoint).await
        }
        Message::Witness => receipts::on_witness(inner, peer).await,
        Message::Reserve { request } => reservations::on_reserve(inner, peer, request).await,
        Message::Keep { reservation_id } => reservations::on_keep(inner, peer, &reservation_id),
        Message::Release { release } => reservations::on_release(inner, peer, release).await,
    }
}

/// How a fetch the market waited on ended.
enum Fetched {
    /// Complete and verified: its size.
    Done(u64),
    /// Failed, and why.
    Failed(String),
    /// `stop` fired first; the fetch (its id) runs on, for the caller to cancel or leave.
    Stopped(String),
}

/// Starts a fetch and waits until it ends or `stop` fires, woken by the fetch's own
/// `transfer_changed` events.
async fn fetch_to_end(
    transfers: &Transfers,
    events: &Bus,
    request: FetchRequest,
    stop: &CancellationToken,
) -> Fetched {
    // Subscribed before the fetch starts: no change after it goes unseen.
    let mut changes = events.subscribe();
    let fetch = match transfers.fetch(request).await {
        Ok(fetch) => fetch,
        Err(error) => return Fetched::Failed(error.to_string()),
    };
    loop {
        match transfers.get(&fetch.id) {
            Ok(now) if now.state.is_terminal() => {
                return match now.error {
                    None => Fetched::Done(now.bytes_total.unwrap_or(0)),
                    Some(error) => Fetched::Failed(error),
                };
            }
            Ok(_) => {}
            Err(error) => return Fetched::Failed(error.to_string()),
        }
        tokio::select! {
            () = stop.cancelled() => return Fetched::Stopped(fetch.id),
            changed = changed(&mut changes, &fetch.id) => {
                if !changed {
                    return Fetched::Stopped(fetch.id);
                }
            }
        }
    }
}

/// Waits for a change of the fetch `id`: true once one came (or events were missed, so one may
/// have), false when the bus is gone with the agent.
async fn changed(changes: &mut broadcast::Receiver<Event>, id: &str) -> bool {
    loop {
        match changes.recv().await {
            Ok(Event::TransferChanged { transfer }) if transfer.id == id => return true,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// What matching weighs of a request's or an agreement's resources.
fn amount(resources: &Allocation) -> matching::Amount {
    matching::Amount {
        cpu_millis: resources.cpu_millis,
        memory_bytes: resources.memory_bytes,
        gpus: resources.gpus,
        vram_bytes: resources.vram_bytes,
    }
}

/// The least memory each GPU of `resources` must have: the request carries the sum over its GPUs
/// (`vram_bytes`), which the consumer sets to the spec's `gpu_memory` times `gpus`.
fn gpu_memory_each(resources: &Allocation) -> u64 {
    match resources.gpus {
        0 => 0,
        gpus => resources.vram_bytes.div_ceil(u64::from(gpus)),
    }
}

/// The model of the GPU `uuid` of this machine, as receipts count GPU-seconds by it; a GPU of the
/// `[testing] fake_gpus` test setting is `fake GPU (test setting)`, as its advert says.
fn gpu_model(resources: &Resources, uuid: &str) -> String {
    match resources.gpus.iter().find(|gpu| gpu.uuid == uuid) {
        Some(gpu) if !gpu.name.is_empty() => gpu.name.clone(),
        Some(_) => "unknown GPU".to_owned(),
        None if uuid.starts_with(FAKE_GPU_PREFIX) => "fake GPU (test setting)".to_owned(),
        None => "unknown GPU".to_owned(),
    }
}

/// The price of `resources` for an hour at `prices`, in thousandths of a credit, rounded up.
pub fn price_per_hour(prices: &Prices, resources: &Allocation) -> u64 {
    const GIB: u128 = 1 << 30;
    let cores = (u128::from(prices.core_hour) * u128::from(resources.cpu_millis)).div_ceil(1000);
    let memory = (u128::from(prices.memory_gib_hour) * u128::from(resources.memory_bytes)).div_ceil(GIB);
    let gpus = u128::from(prices.gpu_hour) * u128::from(resources.gpus);
    u64::try_from(cores + memory + gpus).unwrap_or(u64::MAX)
}

/// A rejected document, as the peer is told.
fn rejected(what: &str, rejection: &Rejection) -> Reply {
    Reply::Refused { reason: format!("{what} rejected: {rejection}") }
}

/// The reputation of a peer from the agreements with it: finished ÷ ended, with one success and
/// one failure assumed (so a newcomer is at 0.5).
fn reputation((ended, finished): (u64, u64)) -> f64 {
    (finished as f64 + 1.0) / (ended as f64 + 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_add_up_per_resource_and_round_up() {
        let one_core = Allocation { cpu_millis: 1000, memory_bytes: 1 << 30, ..Allocation::default() };
        assert_eq!(price_per_hour(&PRICES, &one_core), 1100);
        let tiny = Allocation { cpu_millis: 1, memory_bytes: 1, ..Allocation::default() };
        assert_eq!(price_per_hour(&PRICES, &tiny), 2);
        let gpu = Allocation { gpus: 2, ..Allocation::default() };
        assert_eq!(price_per_hour(&PRICES, &gpu), 20_000);
        assert_eq!(credits(1025), "1.025");
        assert_eq!(credits(20_000), "20.000");
    }

    #[test]
    fn reputation_starts_neutral_and_follows_the_outcomes() {
        assert_eq!(reputation((0, 0)), 0.5);
        assert!(reputation((10, 10)) > 0.9);
        assert!(reputation((10, 0)) < 0.1);
    }
}
