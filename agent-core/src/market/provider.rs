//! The provider's side of the market: requests are checked (signature, address, policy state,
//! fit, price) and queued; the matcher offers signed terms to the requests [`matching::choose`]
//! picks whenever idle capacity appears (a GPU job's GPUs named by UUID, see `gpus`); an
//! accepted offer becomes an agreement whose job this agent runs: its files are fetched from the
//! consumer, the job runs under the supervisor with the GPUs the terms grant, every
//! state change goes to the consumer as a signed notice, and the outputs are kept and granted to
//! the consumer when it ends.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::matching::{self, Amount, Class, Pending, Weights};
use super::reservations::{self, Reservations};
use super::{
    Fetched, Inner, PRICES, amount, credits, fetch_to_end, gpu_memory_each, price_per_hour, receipts,
    rejected, reputation,
};
use crate::availability::{Availability, Capacity};
use crate::clock::{self, unix_now};
use crate::events::Event;
use crate::jobs::runner::Measured;
use crate::jobs::{Image, JobAction, JobKind, JobSpec, JobState};
use crate::ledger::record::Kind;
use crate::net::negotiate::{
    AGREEMENT_TAG, Agreement, Allocation, JobRequest, Message, NOTICE_TAG, Notice, REQUEST_TAG, Reply,
    Signed, Terms, VERSION, verify_detached,
};
use crate::transfer::{BlobRef, FetchRequest, Imported};
use hearth_api::ids::{AgreementId, JobId, RequestId};

mod gpus;
mod logs;
use gpus::{grant, pick_gpus};
pub(super) use logs::on_logs;

/// The most requests waiting at once; more are refused.
const MAX_PENDING: usize = 10_000;

/// The most requests of one consumer waiting at once.
const MAX_PENDING_PER_PEER: usize = 16;

/// What a request may claim about its own time: it may ask to stay queued an hour at most.
const REQUEST_CLOCK: clock::Rules =
    clock::Rules { max_skew: clock::MAX_SKEW, max_lifetime: Duration::from_secs(60 * 60), max_age: None };

/// The largest job spec a request may carry, and the most files it may name.
const MAX_SPEC_BYTES: usize = 64 * 1024;
const MAX_FILES: usize = 64;

/// The most log text one reply carries (well under the protocol's reply limit even when every
/// byte needs escaping).
const LOG_CHUNK: usize = 1 << 20;

/// How long a consumer has to accept an offer.
const OFFER_LIFETIME: Duration = Duration::from_secs(60);

/// How often the matcher looks again even when nothing woke it (waiting times grow).
const MATCH_EVERY: Duration = Duration::from_secs(2);

/// The least a job's files may add up to, whatever scratch disk it asked for.
const MIN_FILES_CAP: u64 = 1 << 30;

/// How a notice that did not reach the consumer is retried (it also asks for the latest).
const NOTICE_TRIES: u32 = 3;

/// Requests, offers and agreements in progress.
#[derive(Default)]
pub(super) struct State {
    /// In arrival order.
    pending: Vec<Waiting>,
    /// Capacity set aside for offers not answered yet, by consumer and request id, with the
    /// GPUs (UUIDs) the terms grant.
    offering: HashMap<(PeerId, RequestId), (Allocation, Vec<String>)>,
    /// Agreements of this run, by id; ended ones stay for their last notice and logs.
    agreements: HashMap<AgreementId, Running>,
    /// Resources held for other agents' request packages.
    pub(super) reservations: Reservations,
}

impl State {
    /// What is taken now: agreements running, offers out, and reservations held (the tasks in a
    /// reservation take nothing beside it).
    pub(super) fn busy(&self) -> Amount {
        self.agreements
            .values()
            .filter(|running| !running.ended)
            .map(|running| running.resources)
            .chain(self.offering.values().map(|(resources, _)| *resources))
            .chain(self.reservations.values().map(|held| held.resources))
            .fold(Amount::default(), |sum, r| sum.saturating_add(&amount(&r)))
    }

    /// The GPUs (UUIDs) granted to running agreements, offered, or held for a reservation.
    pub(super) fn gpus_taken(&self) -> HashSet<String> {
        self.agreements
            .values()
            .filter(|running| !running.ended)
            .flat_map(|running| &running.gpus)
            .chain(self.offering.values().flat_map(|(_, gpus)| gpus))
            .chain(self.reservations.values().flat_map(|held| &held.gpus))
            .cloned()
            .collect()
    }
}

struct Waiting {
    request: JobRequest,
    /// The GPUs (UUIDs) the terms will grant, picked when the request is chosen.
    gpus: Vec<String>,
    /// [`Signed::hash`] of the request, which the terms cite.
    hash: String,
    consumer: PeerId,
    arrived: Instant,
    reputation: f64,
}

struct Running {
    consumer: PeerId,
    resources: Allocation,
    /// The GPUs (UUIDs) the terms grant.
    gpus: Vec<String>,
    job: Option<(JobId, PathBuf)>,
    seq: u64,
    latest: Option<Signed>,
    cancel: CancellationToken,
    ended: bool,
}

/// Checks a request and queues it.
pub(super) async fn on_request(inner: &Arc<Inner>, peer: PeerId, signed: Signed) -> Reply {
    let request: JobRequest = match signed.open(REQUEST_TAG, &peer) {
        Ok(request) => request,
        Err(rejection) => return rejected("request", &rejection),
    };
    let capacity = match &*inner.parts.availability.borrow() {
        Availability::Sharing { capacity, .. } => capacity.clone(),
        Availability::Paused { reasons } => {
            let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            return refused(format!("this agent is paused: {}", reasons.join("; ")));
        }
    };
    if let Err(reason) = check(&request, &peer, &inner.parts.identity.peer_id(), &capacity, unix_now()) {
        return refused(reason);
    }
    let hash = match signed.hash() {
        Ok(hash) => hash,
        Err(rejection) => return rejected("request", &rejection),
    };
    if let Some(reservation) = request.reservation.clone() {
        return in_reservation(inner, peer, request, hash, &reservation, &signed).await;
    }
    let history = inner.parts.store.agreement_history(&peer.to_string(), "provider").await.unwrap_or((0, 0));
    let queued = {
        let mut state = inner.provider();
        let known = state
            .pending
            .iter()
            .position(|w| w.consumer == peer && w.request.request_id == request.request_id);
        let offered = state.offering.contains_key(&(peer, request.request_id.clone()));
        let mine = state.pending.iter().filter(|w| w.consumer == peer).count();
        match known {
            Some(position) => Ok((position, false)),
            None if offered => Err(refused("terms for this request are on their way to you".into())),
            None if mine >= MAX_PENDING_PER_PEER => {
                Err(refused(format!("{MAX_PENDING_PER_PEER} of your requests already wait here")))
            }
            None if state.pending.len() >= MAX_PENDING => {
                Err(refused(format!("{MAX_PENDING} requests already wait here; try later")))
            }
            None => {
                let waiting = Waiting {
                    request,
                    gpus: Vec::new(),
                    hash,
                    consumer: peer,
                    arrived: Instant::now(),
                    reputation: reputation(history),
                };
                state.pending.push(waiting);
                Ok((state.pending.len() - 1, true))
            }
        }
    };
    let (position, new) = match queued {
        Ok(queued) => queued,
        Err(reply) => return reply,
    };
    inner.wake.notify_one();
    if new {
        inner.parts.ledger.note(Kind::Request, &signed).await;
    }
    Reply::Queued { position: position as u64 }
}

pub(super) fn refused(reason: String) -> Reply {
    Reply::Refused { reason }
}

/// A task of a request package, to run in resources held for its consumer: offered terms at
/// once, from the reservation, without waiting for the matcher.
async fn in_reservation(
    inner: &Arc<Inner>,
    peer: PeerId,
    request: JobRequest,
    hash: String,
    reservation: &str,
    signed: &Signed,
) -> Reply {
    if let Err(reason) = reservations::check_task(inner, &peer, &request, reservation) {
        return refused(reason);
    }
    let gpus = {
        let mut state = inner.provider();
        let key = (peer, request.request_id.clone());
        if state.offering.contains_key(&key) {
            return refused("terms for this request are on their way to you".into());
        }
        // The task's GPUs are among those the reservation holds.
        let held = state.reservations.get(reservation).map(|held| held.gpus.clone()).unwrap_or_default();
        let gpus: Vec<String> = held.into_iter().take(request.resources.gpus as usize).collect();
        // Nothing beside the reservation: the task runs in what it holds.
        state.offering.insert(key, (Allocation::default(), Vec::new()));
        gpus
    };
    inner.parts.ledger.note(Kind::Request, signed).await;
    let waiting = Waiting { request, gpus, hash, consumer: peer, arrived: Instant::now(), reputation: 0.5 };
    let task_inner = Arc::clone(inner);
    inner.tasks.spawn(async move { offer(task_inner, waiting).await });
    Reply::Queued { position: 0 }
}

/// Whether this agent can take `request` at all (now or once busy capacity frees up).
pub(crate) fn check(
    request: &JobRequest,
    from: &PeerId,
    me: &PeerId,
    capacity: &Capacity,
    now: i64,
) -> Result<(), String> {
    if request.consumer != from.to_string() {
        return Err(format!("the request names {} but came from {from}", request.consumer));
    }
    if request.provider != me.to_string() {
        return Err(format!("the request is addressed to {}, not to this agent", request.provider));
    }
    clock::check(request.issued_at, Some(request.expires_at), now, &REQUEST_CLOCK)
        .map_err(|e| format!("the request {e}"))?;
    if request.spec.len() > MAX_SPEC_BYTES || request.files.len() > MAX_FILES {
        return Err(format!("the spec is over {MAX_SPEC_BYTES} bytes or names over {MAX_FILES} files"));
    }
    for path in request.files.keys() {
        let path = Path::new(path);
        if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("the file path {path:?} leaves the job's folder"));
        }
    }
    let wanted = &request.resources;
    if wanted.cpu_millis == 0 || wanted.memory_bytes == 0 {
        return Err("the request asks for no cores or no memory".into());
    }
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    if wanted.gpus == 0 && wanted.vram_bytes > 0 {
        return Err("the request asks for GPU memory but no GPUs".into());
    }
    let each = gpu_memory_each(wanted);
    let fitting = capacity.gpus.iter().filter(|gpu| gpu.memory_bytes >= each).count();
    if fitting < wanted.gpus as usize {
        let most = capacity.gpus.iter().map(|gpu| gpu.memory_bytes).max().unwrap_or(0);
        return Err(if each == 0 || fitting == capacity.gpus.len() {
            format!("the job needs {} GPUs; this agent offers {}", wanted.gpus, capacity.gpus.len())
        } else {
            format!(
                "the job needs {} GPUs with {:.2} GiB each; this agent offers {} such (its largest has {:.2} GiB)",
                wanted.gpus,
                gib(each),
                fitting,
                gib(most)
            )
        });
    }
    if wanted.cpu_millis > capacity.cpu_millis {
        return Err(format!(
            "the job needs {} cores; this agent offers at most {}",
            wanted.cpu_millis as f64 / 1000.0,
            capacity.cpu_millis as f64 / 1000.0
        ));
    }
    if wanted.memory_bytes > capacity.memory_bytes {
        return Err(format!(
            "the job needs {:.2} GiB of memory; this agent offers at most {:.2} GiB",
            gib(wanted.memory_bytes),
            gib(capacity.memory_bytes)
        ));
    }
    let price = price_per_hour(&PRICES, wanted);
    if let Some(ceiling) = request.max_price_per_hour
        && price > ceiling
    {
        return Err(format!(
            "the job costs {} credits/h here, above its ceiling of {}",
            credits(price),
            credits(ceiling)
        ));
    }
    Ok(())
}

/// The consumer no longer wants the request.
pub(super) fn on_withdraw(inner: &Arc<Inner>, peer: PeerId, request_id: &str) -> Reply {
    inner.provider().pending.retain(|w| !(w.consumer == peer && w.request.request_id == request_id));
    Reply::Done
}

/// The consumer asks to stop the job under an agreement.
pub(super) async fn on_cancel(inner: &Arc<Inner>, peer: PeerId, agreement_id: &str) -> Reply {
    let state = inner.provider();
    match state.agreements.get(agreement_id) {
        Some(running) if running.consumer == peer && !running.ended => {
            running.cancel.cancel();
            Reply::Done
        }
        Some(running) if running.consumer == peer => {
            refused(format!("the job of agreement {agreement_id} has ended"))
        }
        _ => refused(format!("no agreement {agreement_id} with you here")),
    }
}

/// The latest notice of an agreement.
pub(super) async fn on_status(inner: &Arc<Inner>, peer: PeerId, agreement_id: &str) -> Reply {
    let latest = inner
        .provider()
        .agreements
        .get(agreement_id)
        .filter(|running| running.consumer == peer)
        .map(|running| running.latest.clone());
    match latest {
        Some(Some(notice)) => Reply::Notice { notice },
        Some(None) => Reply::Queued { position: 0 },
        None => match inner.parts.store.agreement(agreement_id).await {
            Ok(Some(_)) => refused(format!(
                "agreement {agreement_id} is not running here any more: this agent restarted and its job was stopped"
            )),
            _ => refused(format!("no agreement {agreement_id} with you here")),
        },
    }
}

/// Matches whenever woken (a request arrived, capacity was freed), when the availability changes
/// (a window opened, the owner left) and every [`MATCH_EVERY`], until the market stops.
pub(super) async fn match_forever(inner: Arc<Inner>) {
    let mut availability = inner.parts.availability.clone();
    let mut tick = tokio::time::interval(MATCH_EVERY);
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => break,
            () = inner.wake.notified() => {}
            changed = availability.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        reservations::expire(&inner, unix_now()).await;
        match_once(&inner);
    }
}

fn match_once(inner: &Arc<Inner>) {
    let Availability::Sharing { capacity, .. } = inner.parts.availability.borrow().clone() else { return };
    let now = unix_now();
    let whole = capacity_amount(&capacity);
    let mut state = inner.provider();
    // Expired requests go, and so do ones the machine no longer offers room for at all (the
    // owner raised a reserve): held for, they would block the matcher for ever.
    state.pending.retain(|w| w.request.expires_at > now && amount(&w.request.resources).fits_in(&whole));
    if state.pending.is_empty() {
        return;
    }
    let idle = whole.saturating_sub(&state.busy());
    let pending: Vec<Pending> = state
        .pending
        .iter()
        .map(|w| Pending {
            demand: amount(&w.request.resources),
            // Family sharing will tell family members' requests apart.
            class: Class::Other,
            reputation: w.reputation,
            waited: w.arrived.elapsed(),
        })
        .collect();
    let mut chosen = matching::choose(&idle, &pending, &Weights::default());
    if chosen.is_empty() {
        return;
    }
    // Taken out from the back first, so the other indices stay valid.
    let mut order = chosen.clone();
    order.sort_unstable_by(|a, b| b.cmp(a));
    let mut taken: HashMap<usize, Waiting> =
        order.into_iter().map(|i| (i, state.pending.remove(i))).collect();
    let mut gpus_taken = state.gpus_taken();
    for i in chosen.drain(..) {
        let Some(mut waiting) = taken.remove(&i) else { continue };
        // The knapsack counts GPUs and their memory in sums; which GPUs fit is decided here.
        let Some(gpus) = pick_gpus(&waiting.request.resources, &capacity.gpus, &gpus_taken) else {
            state.pending.push(waiting);
            continue;
        };
        gpus_taken.extend(gpus.iter().cloned());
        waiting.gpus = gpus.clone();
        state.offering.insert(
            (waiting.consumer, waiting.request.request_id.clone()),
            (waiting.request.resources, gpus),
        );
        let task_inner = Arc::clone(inner);
        inner.tasks.spawn(async move { offer(task_inner, waiting).await });
    }
}

pub(super) fn capacity_amount(capacity: &Capacity) -> Amount {
    Amount {
        cpu_millis: capacity.cpu_millis,
        memory_bytes: capacity.memory_bytes,
        gpus: capacity.gpus.len() as u32,
        vram_bytes: capacity.gpus.iter().map(|gpu| gpu.memory_bytes).sum(),
    }
}

/// Offers signed terms for a chosen request; on acceptance, records the agreement and runs it.
async fn offer(inner: Arc<Inner>, waiting: Waiting) {
    let request = waiting.request;
    // A guessable access key would let anyone open sessions under the agreement: no offer then.
    let Some(access_key) = crate::proto::random_secret(32) else {
        tracing::error!(consumer = %waiting.consumer, "no randomness for an access key; no offer made");
        inner.provider().offering.remove(&(waiting.consumer, request.request_id.clone()));
        inner.wake.notify_one();
        return;
    };
    let now = unix_now();
    let terms = Terms {
        version: VERSION,
        agreement_id: crate::proto::new_id(),
        request_id: request.request_id.clone(),
        request_hash: waiting.hash,
        provider: inner.parts.identity.peer_id().to_string().into(),
        consumer: request.consumer.clone(),
        resources: request.resources,
        prices: PRICES,
        price_per_hour: price_per_hour(&PRICES, &request.resources),
        window: [now, now.saturating_add(i64::try_from(request.time_limit_s).unwrap_or(i64::MAX))],
        access_key,
        hosted: request.hosted,
        network: request.network,
        gpus: waiting.gpus.clone(),
        issued_at: now,
        expires_at: now + OFFER_LIFETIME.as_secs() as i64,
    };
    let agreement = match Signed::sign(&inner.parts.identity, AGREEMENT_TAG, &terms) {
        Ok(offer) => {
            inner.parts.ledger.note(Kind::Offer, &offer).await;
            let message = Message::Offer { terms: offer.clone() };
            match inner.parts.network.negotiate(waiting.consumer, message).await {
                Ok(Reply::Accepted { signature }) => {
                    match verify_detached(AGREEMENT_TAG, &offer.body, &signature, &waiting.consumer) {
                        Ok(()) => Some(Agreement {
                            terms: offer.body,
                            provider_signature: offer.signature,
                            consumer_signature: signature,
                        }),
                        Err(rejection) => {
                            tracing::warn!(consumer = %waiting.consumer, %rejection, "an acceptance did not verify");
                            None
                        }
                    }
                }
                Ok(reply) => {
                    tracing::info!(consumer = %waiting.consumer, ?reply, "the offer was not taken");
                    None
                }
                Err(error) => {
                    tracing::info!(consumer = %waiting.consumer, %error, "the offer did not reach the consumer");
                    None
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot sign an offer");
            None
        }
    };
    let cancel = inner.stop.child_token();
    {
        let mut state = inner.provider();
        state.offering.remove(&(waiting.consumer, request.request_id.clone()));
        if agreement.is_some() {
            if let Some(reservation) = &request.reservation
                && let Some(held) = state.reservations.get_mut(reservation)
            {
                held.in_use += 1;
            }
            let running = Running {
                consumer: waiting.consumer,
                // A task in a reservation takes nothing beside it.
                resources: if request.reservation.is_some() {
                    Allocation::default()
                } else {
                    request.resources
                },
                gpus: terms.gpus.clone(),
                job: None,
                seq: 0,
                latest: None,
                cancel: cancel.clone(),
                ended: false,
            };
            state.agreements.insert(terms.agreement_id.clone(), running);
        }
    }
    let Some(agreement) = agreement else {
        inner.wake.notify_one();
        return;
    };
    let id = terms.agreement_id.clone();
    let document = serde_json::to_string(&agreement).unwrap_or_default();
    if let Err(error) =
        inner.parts.store.put_agreement(&id, "provider", &request.consumer, document, now).await
    {
        tracing::error!(agreement = %id, %error, "cannot record the agreement");
    }
    inner.parts.ledger.note(Kind::Agreement, &agreement).await;
    tracing::info!(agreement = %id, consumer = %waiting.consumer, "agreed to run a job");
    let (mut state, mut reason, outputs) =
        execute(&inner, &id, &request, &terms.gpus, waiting.consumer, &cancel).await;
    if inner.stop.is_cancelled() {
        // The agent is stopping: its jobs were stopped with it, not by the consumer.
        state = JobState::Failed { reason: "the provider's agent stopped".into() };
        reason = None;
    }
    let folder = inner.parts.dir.join(id.as_str());
    if let Err(error) = tokio::fs::remove_dir_all(&folder).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(agreement = %id, %error, "cannot remove the job's files");
    }
    let outcome = state.name();
    let job_dir =
        inner.provider().agreements.get(&id).and_then(|running| running.job.clone()).map(|(_, dir)| dir);
    let measured = job_dir.as_deref().and_then(Measured::read);
    let models: Vec<String> = {
        let resources = inner.parts.resources.borrow();
        terms.gpus.iter().map(|uuid| super::gpu_model(&resources, uuid)).collect()
    };
    let receipt = receipts::issue(&inner, &agreement, &terms, &state, measured, &models, outputs.as_ref());
    notify(&inner, &id, state, reason, outputs.map(|imported| imported.blob), receipt).await;
    if let Some(running) = inner.provider().agreements.get_mut(&id) {
        running.ended = true;
    }
    if let Some(reservation) = &request.reservation {
        reservations::task_ended(&inner, reservation);
    }
    receipts::release(&inner, &id, outcome).await;
    if let Err(error) = inner.parts.store.end_agreement(&id, outcome).await {
        tracing::error!(agreement = %id, %error, "cannot record how the agreement ended");
    }
    inner.wake.notify_one();
}

/// Runs the job of an agreement to its end: its final state, why, and its outputs.
async fn execute(
    inner: &Arc<Inner>,
    agreement_id: &str,
    request: &JobRequest,
    gpus: &[String],
    consumer: PeerId,
    cancel: &CancellationToken,
) -> (JobState, Option<String>, Option<Imported>) {
    let failed = |reason: String| (JobState::Failed { reason }, None, None);
    notify(inner, agreement_id, JobState::Transferring, None, None, None).await;
    let dir = inner.parts.dir.join(agreement_id);
    if let Err(error) = tokio::fs::create_dir_all(&dir).await {
        return failed(format!("cannot create the job's folder: {error}"));
    }
    // The files together may take the job's scratch disk (at least MIN_FILES_CAP), no more.
    let mut left = request.resources.disk_bytes.max(MIN_FILES_CAP);
    for (path, blob) in &request.files {
        let out = dir.join(path);
        if let Some(parent) = out.parent()
            && let Err(error) = tokio::fs::create_dir_all(parent).await
        {
            return failed(format!("cannot create the folder of {path}: {error}"));
        }
        let fetch = FetchRequest {
            peer: consumer.to_string().into(),
            blob: *blob,
            max_bytes: Some(left),
            out: Some(out),
        };
        match fetch_to_end(&inner.parts.transfers, &inner.parts.events, fetch, cancel).await {
            Fetched::Done(size) => left = left.saturating_sub(size),
            Fetched::Stopped(fetch) => {
                // What it downloaded goes with it.
                let _ = inner.parts.transfers.cancel(&fetch);
                return (JobState::Cancelled { reason: None }, None, None);
            }
            Fetched::Failed(error) => return failed(format!("cannot get the job's file {path}: {error}")),
        }
    }
    let arrived = serde_json::json!({
        "agreement_id": agreement_id,
        "what": "inputs",
        "blobs": request.files.values().map(|blob| blob.hash.to_string()).collect::<Vec<_>>(),
        "bytes": request.resources.disk_bytes.max(MIN_FILES_CAP) - left,
    });
    inner.parts.ledger.note(Kind::Transfer, &arrived).await;
    let spec_path = dir.join("job.toml");
    if let Err(error) = tokio::fs::write(&spec_path, &request.spec).await {
        return failed(format!("cannot write the job's spec: {error}"));
    }
    let loaded = spec_path.clone();
    let spec = match tokio::task::spawn_blocking(move || JobSpec::load(&loaded)).await {
        Ok(Ok(spec)) => spec,
        Ok(Err(error)) => return failed(format!("the spec is not acceptable: {error}")),
        Err(error) => return failed(error.to_string()),
    };
    if let Err(reason) = within(&spec, request) {
        return failed(reason);
    }
    if let Err(reason) = confined(&spec, &dir, request) {
        return failed(reason);
    }
    // As many of the agreement's GPUs as the spec asks for (`within`: never more).
    let grants = match grant(
        &inner.parts.resources.borrow().gpus,
        &gpus[..(spec.resources.gpus as usize).min(gpus.len())],
    ) {
        Ok(grants) => grants,
        Err(reason) => return failed(reason),
    };
    // Subscribed before the job exists, so none of its changes is missed.
    let mut events = inner.parts.events.subscribe();
    let job = match inner.parts.jobs.submit_granted(&spec_path, grants).await {
        Ok(job) => job,
        Err(error) => return failed(format!("the job could not start: {error}")),
    };
    if let Some(running) = inner.provider().agreements.get_mut(agreement_id) {
        running.job = Some((job.id.clone(), job.job_dir.clone()));
    }
    let mut state = job.state.clone();
    let mut reason = None;
    let mut cancelled = false;
    while !state.is_terminal() {
        let event = tokio::select! {
            () = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                if let Err(error) = inner.parts.jobs.act(&job.id, JobAction::Cancel).await {
                    tracing::info!(job = %job.id, %error, "cannot cancel the job");
                }
                continue;
            }
            event = events.recv() => event,
        };
        match event {
            Ok(Event::JobChanged { job: changed }) if changed.id == job.id => {
                state = changed.state.clone();
                if !state.is_terminal() {
                    notify(inner, agreement_id, state.clone(), reason.clone(), None, None).await;
                }
            }
            Ok(Event::OwnerNotice { notice }) if notice.job_id == job.id => {
                reason = Some(format!("the provider's owner {} the job: {}", notice.kind, notice.reason));
                if !state.is_terminal() {
                    notify(inner, agreement_id, state.clone(), reason.clone(), None, None).await;
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                if let Ok(now) = inner.parts.jobs.get(&job.id).await {
                    state = now.state;
                }
            }
            Err(RecvError::Closed) => break,
        }
    }
    if let JobState::Cancelled { reason: Some(why) } = &state {
        reason = Some(why.clone());
    }
    let outputs = match inner.parts.transfers.results(&job.id, job.job_dir.join("out")).await {
        Ok(imported) => match inner.parts.transfers.grant(consumer, imported.blob).await {
            Ok(()) => Some(imported),
            Err(error) => {
                tracing::error!(job = %job.id, %error, "cannot grant the outputs");
                None
            }
        },
        Err(error) => {
            tracing::error!(job = %job.id, %error, "cannot keep the outputs");
            None
        }
    };
    (state, reason, outputs)
}

/// Whether the spec the consumer sent stays within what the request (and so the agreement) said.
fn within(spec: &JobSpec, request: &JobRequest) -> Result<(), String> {
    let agreed = &request.resources;
    let asked = &spec.resources;
    let over = u64::from(asked.cpu_millis) > agreed.cpu_millis
        || asked.memory_bytes > agreed.memory_bytes
        || asked.disk_bytes > agreed.disk_bytes
        || asked.gpus > agreed.gpus
        || asked.gpu_memory_bytes.saturating_mul(u64::from(asked.gpus)) > agreed.vram_bytes
        || spec.limits.time.as_secs() > request.time_limit_s
        || (spec.limits.network && !request.network);
    if over { Err("the job's spec asks for more than the agreement grants".into()) } else { Ok(()) }
}

/// Whether every file the spec names (module, image, inputs) is one of the request's files in the
/// job's folder: a spec naming anything else of this machine (`/home/…`, `../identity.key`) would
/// copy the owner's files into the job.
fn confined(spec: &JobSpec, dir: &Path, request: &JobRequest) -> Result<(), String> {
    let dir = dir.canonicalize().map_err(|e| format!("cannot resolve the job's folder: {e}"))?;
    let mut named: Vec<&Path> = spec.inputs.iter().map(PathBuf::as_path).collect();
    match &spec.kind {
        JobKind::Wasi { module } => named.push(module),
        JobKind::Native { image: Image::Archive(archive), .. } => named.push(archive),
        JobKind::Native { image: Image::Base, .. } => {}
    }
    for path in named {
        let inside = path.strip_prefix(&dir).ok().and_then(Path::to_str);
        if !inside.is_some_and(|relative| request.files.contains_key(relative)) {
            return Err(format!("the spec names {}, which is not one of the job's files", path.display()));
        }
    }
    Ok(())
}

/// Signs a notice of the job's state and sends it to the consumer (which also asks for the
/// latest one, so a notice that cannot be delivered is not lost).
async fn notify(
    inner: &Arc<Inner>,
    agreement_id: &str,
    job: JobState,
    reason: Option<String>,
    outputs: Option<BlobRef>,
    receipt: Option<Signed>,
) {
    let signed = {
        let mut state = inner.provider();
        let Some(running) = state.agreements.get_mut(agreement_id) else { return };
        running.seq += 1;
        let notice = Notice {
            version: VERSION,
            agreement_id: agreement_id.to_owned().into(),
            provider: inner.parts.identity.peer_id().to_string().into(),
            consumer: running.consumer.to_string().into(),
            seq: running.seq,
            at: unix_now(),
            job,
            reason,
            outputs,
            receipt,
        };
        match Signed::sign(&inner.parts.identity, NOTICE_TAG, &notice) {
            Ok(signed) => {
                running.latest = Some(signed.clone());
                (running.consumer, signed)
            }
            Err(error) => {
                tracing::error!(%error, "cannot sign a notice");
                return;
            }
        }
    };
    let (consumer, notice) = signed;
    inner.parts.ledger.note(Kind::Notice, &notice).await;
    let tries = if inner.stop.is_cancelled() { 1 } else { NOTICE_TRIES };
    for attempt in 1..=tries {
        let message = Message::Notice { notice: notice.clone() };
        match inner.parts.network.negotiate(consumer, message).await {
            Ok(_) => return,
            Err(error) if attempt == tries => {
                tracing::info!(%consumer, %error, "a notice did not reach the consumer");
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn request(consumer: &PeerId, provider: &PeerId) -> JobRequest {
        JobRequest {
            version: VERSION,
            request_id: "r".into(),
            consumer: consumer.to_string().into(),
            provider: provider.to_string().into(),
            issued_at: 1000,
            expires_at: 2000,
            spec: String::new(),
            files: BTreeMap::new(),
            resources: Allocation { cpu_millis: 1000, memory_bytes: 1 << 30, ..Allocation::default() },
            time_limit_s: 60,
            network: false,
            hosted: false,
            max_price_per_hour: None,
            reservation: None,
        }
    }

    #[test]
    fn requests_that_cannot_be_taken_are_refused_with_the_reason() {
        let (consumer, me, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let gpu = |uuid: &str, gib: u64| hearth_api::availability::GpuCapacity {
            uuid: uuid.into(),
            memory_bytes: gib << 30,
        };
        let capacity =
            Capacity { cpu_millis: 2000, memory_bytes: 2 << 30, gpus: vec![gpu("G8", 8), gpu("G24", 24)] };
        let ok = request(&consumer, &me);
        assert_eq!(check(&ok, &consumer, &me, &capacity, 1500), Ok(()));
        let gpus = |gpus: u32, gib_each: u64| JobRequest {
            resources: Allocation { gpus, vram_bytes: u64::from(gpus) * (gib_each << 30), ..ok.resources },
            max_price_per_hour: None,
            ..ok.clone()
        };
        // Two GPUs of any size, or one with up to 24 GiB, fit.
        for fits in [gpus(1, 0), gpus(2, 0), gpus(2, 8), gpus(1, 24)] {
            assert_eq!(check(&fits, &consumer, &me, &capacity, 1500), Ok(()), "{:?}", fits.resources);
        }

        let cases: Vec<(JobRequest, PeerId, i64, &str)> = vec![
            (ok.clone(), other, 1500, "but came from"),
            (request(&consumer, &other), consumer, 1500, "addressed to"),
            (ok.clone(), consumer, 2000, "expired"),
            (JobRequest { issued_at: 1700, ..ok.clone() }, consumer, 1500, "future"),
            (
                JobRequest { files: [("../x".to_owned(), blob())].into(), ..ok.clone() },
                consumer,
                1500,
                "leaves the job's folder",
            ),
            (
                JobRequest { resources: Allocation { cpu_millis: 3000, ..ok.resources }, ..ok.clone() },
                consumer,
                1500,
                "needs 3 cores; this agent offers at most 2",
            ),
            (
                JobRequest { resources: Allocation { memory_bytes: 3 << 30, ..ok.resources }, ..ok.clone() },
                consumer,
                1500,
                "3.00 GiB of memory",
            ),
            (gpus(3, 0), consumer, 1500, "needs 3 GPUs; this agent offers 2"),
            (
                gpus(1, 32),
                consumer,
                1500,
                "needs 1 GPUs with 32.00 GiB each; this agent offers 0 such (its largest has 24.00 GiB)",
            ),
            (gpus(2, 16), consumer, 1500, "needs 2 GPUs with 16.00 GiB each; this agent offers 1 such"),
            (
                JobRequest { resources: Allocation { vram_bytes: 1, ..ok.resources }, ..ok.clone() },
                consumer,
                1500,
                "GPU memory but no GPUs",
            ),
            (
                JobRequest { max_price_per_hour: Some(1000), ..ok.clone() },
                consumer,
                1500,
                "costs 1.100 credits/h here, above its ceiling of 1.000",
            ),
        ];
        for (request, from, now, expected) in cases {
            let reason = check(&request, &from, &me, &capacity, now).unwrap_err();
            assert!(reason.contains(expected), "{reason:?} should say {expected:?}");
        }
    }

    #[test]
    fn a_spec_may_name_only_the_files_that_came_with_the_request() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("files/in/0")).unwrap();
        std::fs::write(dir.path().join("files/in/0/data.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("files/m.wasm"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        let root = dir.path().canonicalize().unwrap();
        let consumer = PeerId::random();
        let mut request = request(&consumer, &PeerId::random());
        request.files =
            [("files/in/0/data.txt".to_owned(), blob()), ("files/m.wasm".to_owned(), blob())].into();
        let spec = |module: PathBuf, inputs: Vec<PathBuf>| JobSpec {
            kind: JobKind::Wasi { module },
            args: Vec::new(),
            env: Default::default(),
            inputs,
            resources: crate::jobs::Demand {
                cpu_millis: 1000,
                memory_bytes: 1 << 20,
                disk_bytes: 1 << 20,
                gpus: 0,
                gpu_memory_bytes: 0,
            },
            limits: crate::jobs::Limits { time: Duration::from_secs(60), network: false },
            max_price_per_hour: None,
        };
        let good = spec(root.join("files/m.wasm"), vec![root.join("files/in/0/data.txt")]);
        assert_eq!(confined(&good, dir.path(), &request), Ok(()));
        for bad in [
            spec(root.join("files/m.wasm"), vec![PathBuf::from("/etc/passwd")]),
            spec(root.join("files/m.wasm"), vec![root.join("secret")]),
            spec(root.join("secret"), Vec::new()),
            spec(root.join("files/m.wasm"), vec![root.join("files")]),
        ] {
            let reason = confined(&bad, dir.path(), &request).unwrap_err();
            assert!(reason.contains("not one of the job's files"), "{reason}");
        }
    }

    fn blob() -> BlobRef {
        BlobRef { hash: "00".repeat(32).parse().unwrap(), format: crate::transfer::Format::Raw }
    }
}
