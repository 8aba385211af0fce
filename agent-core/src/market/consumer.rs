//! The consumer's side of the market: a submitted spec becomes a remote job. Its files go into the
//! blob store; the providers whose adverts fit are ranked with [`matching::rank`] and the best few
//! get a signed request each. The first offer from the best-ranked provider still in play is
//! countersigned at once; an offer from a lesser one waits [`BETTER_OFFER_GRACE`] for a better one.
//! Once agreed, the files are granted to the provider, its signed notices move the job's state,
//! and it is asked for the latest every [`STATUS_EVERY`]: after [`MISSED_STATUS`] unanswered
//! asks the job fails with the reason. The outputs are fetched when the job ends.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use hearth_api::market::RemoteJob;
use libp2p::PeerId;
use tokio::sync::broadcast::error::RecvError;

use super::matching::{self, Amount, Candidate};
use super::{Inner, MarketError, price_per_hour};
use crate::clock::unix_now;
use crate::events::Event;
use crate::jobs::{Image, JobKind, JobSpec, JobState, SpecError};
use crate::ledger::record::Kind;
use crate::net::advert::{AdvertBody, Prices};
use crate::net::negotiate::{Allocation, JobRequest, Message, REQUEST_TAG, Reply, Signed, VERSION};
use crate::store::Store;
use crate::transfer::{BlobRef, Imported};
use hearth_api::ids::{self, JobId, RequestId};
use hearth_api::upload::MAX_SPEC_BYTES;

mod follow;
mod logs;
mod offers;

use follow::spawn_follow;
pub(super) use follow::{notices, on_notice};
pub(super) use logs::logs;
pub(super) use offers::on_offer;

/// How many providers are asked at once.
const ASK_AT_ONCE: usize = 3;

/// How long a consumer looks for a provider that fits and accepts before the job fails.
const SEARCH_FOR: Duration = Duration::from_secs(60);

/// How long a request stays valid at a provider.
const REQUEST_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How often the provider of a running job is asked for its latest notice.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How long a cancel waits for the provider's `cancelled` notice before it answers.
const CANCEL_NOTICE_WAIT: Duration = Duration::from_secs(10);

/// Unanswered asks in a row after which the provider is taken for gone.
const MISSED_STATUS: u32 = 3;

/// The least the outputs may add up to, whatever scratch disk the job asked for.
const MIN_OUTPUTS_CAP: u64 = 1 << 30;

/// The remote jobs of this run.
pub(super) struct State {
    jobs: HashMap<JobId, Entry>,
}

struct Entry {
    job: RemoteJob,
    negotiation: Option<Negotiation>,
    notice_seq: u64,
    /// The provider said the job ended; its outputs are being fetched.
    ended_there: bool,
}

/// What only a job still looking for its provider needs.
struct Negotiation {
    /// The request without its provider, which each copy names.
    template: JobRequest,
    asked: Vec<Asked>,
    decided: bool,
}

struct Asked {
    peer: PeerId,
    /// 0 for the best-fitting provider.
    rank: usize,
    request_hash: String,
    refused: bool,
    /// The prices its advert showed: its terms may not ask more.
    prices: Prices,
}

impl State {
    pub(super) fn new(jobs: Vec<RemoteJob>) -> Self {
        let jobs = jobs
            .into_iter()
            .map(|job| (job.id.clone(), Entry { job, negotiation: None, notice_seq: 0, ended_there: false }))
            .collect();
        Self { jobs }
    }

    pub(super) fn list(&self) -> Vec<RemoteJob> {
        let mut all: Vec<RemoteJob> = self.jobs.values().map(|entry| entry.job.clone()).collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    pub(super) fn get(&self, id: &str) -> Option<RemoteJob> {
        self.jobs.get(id).map(|entry| entry.job.clone())
    }

    fn by_agreement(&mut self, agreement_id: &str) -> Option<&mut Entry> {
        self.jobs.values_mut().find(|entry| entry.job.agreement_id.as_deref() == Some(agreement_id))
    }
}

/// The remote jobs recorded by earlier runs.
pub(super) async fn load(store: &Store) -> Result<Vec<RemoteJob>, MarketError> {
    let records = store.remote_jobs().await?;
    Ok(records
        .iter()
        .filter_map(|record| match serde_json::from_str(record) {
            Ok(job) => Some(job),
            Err(error) => {
                tracing::error!(%error, "a remote job's record cannot be read; it is left out");
                None
            }
        })
        .collect())
}

/// After a restart: jobs that had a provider are followed again; one still looking had lost its
/// request state with the process, so it fails and can be submitted again.
pub(super) async fn resume(inner: &Arc<Inner>) {
    let jobs = inner.consumer().list();
    for job in jobs.into_iter().filter(|job| !job.state.is_terminal()) {
        match job.agreement_id.clone() {
            Some(agreement_id) => spawn_follow(inner, job.id, agreement_id),
            None => {
                let reason = "the agent stopped while it looked for a provider; submit the job again";
                update(inner, &job.id, |job| job.state = JobState::Failed { reason: reason.into() }).await;
            }
        }
    }
}

/// Records the job and starts looking for a provider.
pub(super) async fn submit(
    inner: &Arc<Inner>,
    spec_path: &Path,
    base: &Path,
) -> Result<RemoteJob, MarketError> {
    let (job, template) = prepare(inner, spec_path, base, None).await?;
    record(inner, &job, template).await;
    let (task_inner, id) = (Arc::clone(inner), job.id.clone());
    inner.tasks.spawn(async move { search(task_inner, id).await });
    Ok(job)
}

/// Records a task of request package `package` and sends its request to the provider holding
/// reservation `reservation` for it, at the reservation's `prices`: the provider offers terms at
/// once, from what it holds. Refused, the job fails with the provider's reason.
pub(super) async fn submit_in(
    inner: &Arc<Inner>,
    spec_path: &Path,
    package: &str,
    provider: PeerId,
    reservation: &str,
    prices: Prices,
) -> Result<RemoteJob, MarketError> {
    let base = spec_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (mut job, template) = prepare(inner, spec_path, base, Some(reservation.to_owned())).await?;
    job.request = Some(package.to_owned().into());
    job.note = Some(format!("asking {provider}, which holds resources for request {package}"));
    record(inner, &job, template.clone()).await;
    let request = JobRequest { provider: provider.to_string().into(), ..template };
    let signed = Signed::sign(&inner.parts.identity, REQUEST_TAG, &request)
        .map_err(|error| MarketError::Provider(error.to_string()))?;
    inner.parts.ledger.note(Kind::Request, &signed).await;
    if let Some(negotiation) = inner.consumer().jobs.get_mut(&job.id).and_then(|e| e.negotiation.as_mut()) {
        let request_hash = signed.hash().unwrap_or_default();
        negotiation.asked.push(Asked { peer: provider, rank: 0, request_hash, refused: false, prices });
    }
    let (task_inner, id) = (Arc::clone(inner), job.id.clone());
    inner.tasks.spawn(async move {
        let why =
            match task_inner.parts.network.negotiate(provider, Message::Request { request: signed }).await {
                Ok(Reply::Queued { .. }) => return await_offer(&task_inner, &id, request.expires_at).await,
                Ok(Reply::Refused { reason }) => reason,
                Ok(other) => format!("answered {other:?}"),
                Err(error) => error,
            };
        let reason = format!("{provider} refused the task: {why}");
        update(&task_inner, &id, |job| {
            if job.provider.is_none() && !job.state.is_terminal() {
                job.refusals.push(format!("{provider}: {why}"));
                job.state = JobState::Failed { reason };
            }
        })
        .await;
    });
    Ok(job)
}

/// Reads and checks the spec, imports its files and makes the job and its request (addressed to
/// no provider yet).
async fn prepare(
    inner: &Arc<Inner>,
    spec_path: &Path,
    base: &Path,
    reservation: Option<String>,
) -> Result<(RemoteJob, JobRequest), MarketError> {
    let (path, base) = (spec_path.to_owned(), base.to_owned());
    let (spec, text) = tokio::task::spawn_blocking(move || {
        let spec = JobSpec::load_in(&path, &base)?;
        let text = hearth_api::local_file::read_text(&path, MAX_SPEC_BYTES as u64, "job spec")?;
        Ok::<_, SpecError>((spec, text))
    })
    .await
    .map_err(|error| MarketError::Conflict(error.to_string()))??;
    let (spec_text, files) = package(inner, &spec, &text, spec_path).await?;
    // The remote job's id is also the id of the request that looks for its provider.
    let id: JobId = crate::proto::new_id();
    let now = unix_now();
    let resources = Allocation {
        cpu_millis: u64::from(spec.resources.cpu_millis),
        memory_bytes: spec.resources.memory_bytes,
        disk_bytes: spec.resources.disk_bytes,
        gpus: spec.resources.gpus,
        // The request carries the sum; the provider asks it of each GPU divided again.
        vram_bytes: spec.resources.gpu_memory_bytes.saturating_mul(u64::from(spec.resources.gpus)),
    };
    let template = JobRequest {
        version: VERSION,
        request_id: RequestId::from(id.as_str()),
        consumer: inner.parts.identity.peer_id().to_string().into(),
        provider: ids::PeerId::default(),
        issued_at: now,
        expires_at: now + REQUEST_LIFETIME.as_secs() as i64,
        spec: spec_text,
        files,
        resources,
        time_limit_s: spec.limits.time.as_secs(),
        network: spec.limits.network,
        hosted: false,
        max_price_per_hour: spec.max_price_per_hour,
        reservation,
    };
    let job = RemoteJob {
        id,
        kind: match spec.kind {
            JobKind::Wasi { .. } => "wasi",
            JobKind::Native { .. } => "native",
        }
        .to_owned(),
        spec_path: spec_path.to_owned(),
        state: JobState::Queued,
        note: Some("looking for a provider".into()),
        provider: None,
        agreement_id: None,
        price_per_hour: None,
        agreement: None,
        refusals: Vec::new(),
        outputs: None,
        charged: None,
        request: None,
        created_at: now,
        updated_at: now,
    };
    Ok((job, template))
}

/// Keeps a new job in the store and in memory, and tells watchers.
async fn record(inner: &Arc<Inner>, job: &RemoteJob, template: JobRequest) {
    save(inner, job).await;
    let negotiation = Negotiation { template, asked: Vec::new(), decided: false };
    inner.consumer().jobs.insert(
        job.id.clone(),
        Entry { job: job.clone(), negotiation: Some(negotiation), notice_seq: 0, ended_there: false },
    );
    inner.parts.events.publish(Event::RemoteJobChanged { job: Box::new(job.clone()) });
}

/// Imports the files the spec names and rewrites the spec to name them where the provider will
/// put them: `files/module/NAME`, `files/image/NAME`, `files/in/N/NAME` (an input keeps its name,
/// which is how the job sees it under `/in`).
async fn package(
    inner: &Arc<Inner>,
    spec: &JobSpec,
    text: &str,
    spec_path: &Path,
) -> Result<(String, BTreeMap<String, BlobRef>), MarketError> {
    let bad = |message: String| MarketError::Spec(SpecError::Parse { path: spec_path.to_owned(), message });
    let mut table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut files = BTreeMap::new();
    let name = |path: &Path| path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut add = async |path: &Path, at: String| -> Result<String, MarketError> {
        let imported = inner.parts.transfers.add(path.to_owned(), &[]).await?;
        files.insert(at.clone(), imported.blob);
        Ok(at)
    };
    match &spec.kind {
        JobKind::Wasi { module } => {
            let at = add(module, format!("files/module/{}", name(module))).await?;
            table.insert("module".into(), toml::Value::String(at));
        }
        JobKind::Native { image: Image::Archive(archive), .. } => {
            let at = add(archive, format!("files/image/{}", name(archive))).await?;
            table.insert("image".into(), toml::Value::String(at));
        }
        JobKind::Native { image: Image::Base, .. } => {}
    }
    let mut inputs = Vec::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        inputs.push(toml::Value::String(add(input, format!("files/in/{i}/{}", name(input))).await?));
    }
    if !inputs.is_empty() {
        table.insert("inputs".into(), toml::Value::Array(inputs));
    }
    let text = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
    Ok((text, files))
}

/// Looks for providers and asks the best ones, until one is asked that queues the request, or
/// [`SEARCH_FOR`] has passed.
async fn search(inner: Arc<Inner>, id: JobId) {
    let deadline = Instant::now() + SEARCH_FOR;
    let mut refused: BTreeMap<PeerId, String> = BTreeMap::new();
    let mut seen_any = false;
    // Subscribed before each look at the adverts, so one that arrives after it wakes the search.
    let mut changes = inner.parts.events.subscribe();
    loop {
        let Some(template) = template_of(&inner, &id) else { return };
        let mut adverts = sharing(&inner).await;
        adverts.retain(|(peer, _)| !refused.contains_key(peer));
        seen_any |= !adverts.is_empty();
        let ranked = rank(&template.resources, template.time_limit_s, template.max_price_per_hour, &adverts);
        if ranked.is_empty() {
            if Instant::now() >= deadline || inner.stop.is_cancelled() {
                let reason = if !refused.is_empty() {
                    let reasons: Vec<String> =
                        refused.iter().map(|(peer, why)| format!("{peer}: {why}")).collect();
                    format!("no provider took the job: {}", reasons.join("; "))
                } else if let Some(why) = no_gpu_fits(&template.resources, &adverts) {
                    why
                } else if seen_any {
                    "no provider's advert fits the job (resources, price ceiling)".to_owned()
                } else {
                    "no provider is sharing on the network".to_owned()
                };
                update(&inner, &id, |job| job.state = JobState::Failed { reason }).await;
                return;
            }
            // Until an advert arrives or changes (a provider starts sharing, or frees capacity),
            // or the search's time is up.
            let until = tokio::time::Instant::from_std(deadline);
            loop {
                tokio::select! {
                    () = inner.stop.cancelled() => return,
                    () = tokio::time::sleep_until(until) => break,
                    event = changes.recv() => match event {
                        Ok(Event::OfferChanged { .. }) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                        Ok(_) => {}
                    },
                }
            }
            continue;
        }
        let chosen: Vec<(PeerId, Prices)> =
            ranked.iter().take(ASK_AT_ONCE).map(|&i| (adverts[i].0, adverts[i].1.prices.clone())).collect();
        let mut sends = Vec::new();
        for (peer, prices) in chosen {
            let peer = &peer;
            let request = JobRequest { provider: peer.to_string().into(), ..template.clone() };
            let signed = match Signed::sign(&inner.parts.identity, REQUEST_TAG, &request) {
                Ok(signed) => signed,
                Err(error) => {
                    tracing::error!(%error, "cannot sign a request");
                    return;
                }
            };
            let hash = signed.hash().unwrap_or_default();
            inner.parts.ledger.note(Kind::Request, &signed).await;
            {
                let mut state = inner.consumer();
                let Some(negotiation) = state.jobs.get_mut(&id).and_then(|e| e.negotiation.as_mut()) else {
                    return;
                };
                let rank = negotiation.asked.len();
                negotiation.asked.push(Asked {
                    peer: *peer,
                    rank,
                    request_hash: hash,
                    refused: false,
                    prices,
                });
            }
            let network = inner.parts.network.clone();
            let peer = *peer;
            sends.push(
                async move { (peer, network.negotiate(peer, Message::Request { request: signed }).await) },
            );
        }
        let mut queued = 0;
        for (peer, reply) in libp2p::futures::future::join_all(sends).await {
            let why = match reply {
                Ok(Reply::Queued { .. }) => {
                    queued += 1;
                    continue;
                }
                Ok(Reply::Refused { reason }) => reason,
                Ok(other) => format!("answered {other:?}"),
                Err(error) => error,
            };
            refused.insert(peer, why.clone());
            let mut state = inner.consumer();
            if let Some(entry) = state.jobs.get_mut(&id) {
                entry.job.refusals.push(format!("{peer}: {why}"));
                if let Some(asked) =
                    entry.negotiation.as_mut().and_then(|n| n.asked.iter_mut().find(|a| a.peer == peer))
                {
                    asked.refused = true;
                    inner.negotiated.notify_waiters();
                }
            }
        }
        if queued > 0 {
            let note = format!("waiting for an offer from {queued} provider(s)");
            update(&inner, &id, |job| {
                if job.provider.is_none() {
                    job.note = Some(note);
                }
            })
            .await;
            await_offer(&inner, &id, template.expires_at).await;
            return;
        }
    }
}

/// Waits until an offer is taken or the request expires at the providers, which then fails the
/// job (the providers drop expired requests themselves). Taking an offer, a cancel and a failure
/// all go through [`update`], which publishes the job's change: that is what wakes it.
async fn await_offer(inner: &Arc<Inner>, id: &str, expires_at: i64) {
    // Subscribed before each look, so a change after it is not missed.
    let mut changes = inner.parts.events.subscribe();
    loop {
        if template_of(inner, id).is_none() {
            return; // Agreed, cancelled or failed.
        }
        let left = u64::try_from(expires_at.saturating_sub(unix_now())).unwrap_or(0);
        if left == 0 {
            let reason =
                "no provider that queued the request offered terms before it expired; submit it again";
            update(inner, id, |job| {
                if job.provider.is_none() && !job.state.is_terminal() {
                    job.state = JobState::Failed { reason: reason.into() };
                }
            })
            .await;
            return;
        }
        let expired = tokio::time::sleep(Duration::from_secs(left));
        tokio::pin!(expired);
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => return,
                () = &mut expired => break,
                event = changes.recv() => match event {
                    Ok(Event::RemoteJobChanged { job }) if job.id == id => break,
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                    Ok(_) => {}
                },
            }
        }
    }
}

fn template_of(inner: &Arc<Inner>, id: &str) -> Option<JobRequest> {
    let state = inner.consumer();
    let entry = state.jobs.get(id)?;
    if entry.job.state.is_terminal() {
        return None;
    }
    entry.negotiation.as_ref().map(|n| n.template.clone())
}

/// The sharing providers whose adverts fit `demand`, best first, with their advertised prices.
pub(super) async fn providers_for(
    inner: &Arc<Inner>,
    demand: &Allocation,
    time_s: u64,
    max_price_per_hour: Option<u64>,
) -> Vec<(PeerId, Prices)> {
    let adverts = sharing(inner).await;
    rank(demand, time_s, max_price_per_hour, &adverts)
        .into_iter()
        .map(|i| (adverts[i].0, adverts[i].1.prices.clone()))
        .collect()
}

/// The adverts of other agents that share now.
async fn sharing(inner: &Arc<Inner>) -> Vec<(PeerId, AdvertBody)> {
    let me = inner.parts.identity.peer_id();
    inner
        .parts
        .network
        .offers()
        .await
        .into_iter()
        .filter_map(|advert| Some((advert.peer_id.parse::<PeerId>().ok()?, advert)))
        .filter(|(peer, advert)| *peer != me && advert.state == "sharing")
        .collect()
}

/// Why no advert fits a job asking for GPUs, when the GPUs are why: no sharing provider offers
/// as many GPUs with the memory asked of each. `None` for a job without GPUs, or when some
/// provider has such GPUs (something else does not fit).
fn no_gpu_fits(resources: &Allocation, adverts: &[(PeerId, AdvertBody)]) -> Option<String> {
    if resources.gpus == 0 {
        return None;
    }
    let each = super::gpu_memory_each(resources);
    let enough = |advert: &AdvertBody| {
        advert.free.gpus.iter().filter(|gpu| gpu.memory_bytes >= each).count() >= resources.gpus as usize
    };
    if adverts.iter().any(|(_, advert)| enough(advert)) {
        return None;
    }
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    let largest = adverts.iter().flat_map(|(_, advert)| &advert.free.gpus).map(|gpu| gpu.memory_bytes).max();
    Some(match largest {
        None => format!("no provider offers a GPU; the job asks for {}", resources.gpus),
        Some(largest) if each > largest => format!(
            "no provider offers a GPU with {:.2} GiB of memory; the largest on offer has {:.2} GiB",
            gib(each),
            gib(largest)
        ),
        Some(_) => format!(
            "no provider offers {} GPUs with {:.2} GiB of memory each on one machine",
            resources.gpus,
            gib(each)
        ),
    })
}

/// The adverts that fit `resources` for `time_s` under the price ceiling, best first (see
/// [`matching::rank`]).
fn rank(
    resources: &Allocation,
    time_s: u64,
    max_price_per_hour: Option<u64>,
    adverts: &[(PeerId, AdvertBody)],
) -> Vec<usize> {
    let demand = super::amount(resources);
    let now = unix_now();
    let until = now.saturating_add(i64::try_from(time_s).unwrap_or(i64::MAX));
    let candidates: Vec<Candidate> = adverts
        .iter()
        .map(|(_, advert)| {
            // Only the GPUs with the memory asked of each count.
            let each = super::gpu_memory_each(resources);
            let gpus: Vec<u64> =
                advert.free.gpus.iter().map(|gpu| gpu.memory_bytes).filter(|bytes| *bytes >= each).collect();
            let free = Amount {
                cpu_millis: advert.free.cpu_millis,
                memory_bytes: advert.free.memory_bytes,
                gpus: gpus.len() as u32,
                vram_bytes: gpus.iter().sum(),
            };
            let (completed, failed) = (advert.reputation.completed, advert.reputation.failed);
            Candidate {
                free,
                price_per_hour: price_per_hour(&advert.prices, resources),
                reputation: super::reputation((completed + failed, completed)),
                window_covers: advert.windows.iter().any(|[from, to]| *from <= now && *to >= until),
            }
        })
        .collect();
    matching::rank(&demand, max_price_per_hour, &candidates)
}

/// Cancels a remote job: withdraws its requests, or asks its provider to stop it and waits a
/// little for the provider's notice.
pub(super) async fn cancel(inner: &Arc<Inner>, id: &str) -> Result<RemoteJob, MarketError> {
    let (job, asked) = {
        let mut state = inner.consumer();
        let entry = state.jobs.get_mut(id).ok_or_else(|| MarketError::NotFound(id.to_owned()))?;
        if entry.job.state.is_terminal() {
            return Err(MarketError::Conflict(format!(
                "job {id} is {}; it cannot be cancelled",
                entry.job.state.name()
            )));
        }
        if entry.negotiation.as_ref().is_some_and(|n| n.decided) {
            return Err(MarketError::Conflict(format!(
                "job {id} is being agreed with a provider; cancel it again in a moment"
            )));
        }
        let asked: Vec<PeerId> = entry
            .negotiation
            .take()
            .map(|n| n.asked.into_iter().map(|a| a.peer).collect())
            .unwrap_or_default();
        inner.negotiated.notify_waiters();
        (entry.job.clone(), asked)
    };
    let (Some(provider), Some(agreement_id)) = (job.provider.as_deref(), job.agreement_id.clone()) else {
        for peer in asked {
            let _ = inner
                .parts
                .network
                .negotiate(peer, Message::Withdraw { request_id: id.to_owned().into() })
                .await;
        }
        update(inner, id, |job| job.state = JobState::Cancelled { reason: None }).await;
        return job_of(inner, id);
    };
    let provider: PeerId = provider.parse().map_err(|_| MarketError::Provider("bad provider id".into()))?;
    // Subscribed before asking: the provider's notice may come before its answer.
    let mut changes = inner.parts.events.subscribe();
    match inner.parts.network.negotiate(provider, Message::Cancel { agreement_id }).await {
        Ok(Reply::Done) => {
            // The provider's `cancelled` notice follows; wait for it a little (the job is
            // answered as it stands then, and the notice still moves it when it comes).
            let ended = || inner.consumer().get(id).is_none_or(|job| job.state.is_terminal());
            let _ = tokio::time::timeout(CANCEL_NOTICE_WAIT, async {
                while !ended() {
                    loop {
                        match changes.recv().await {
                            Err(RecvError::Closed) => return,
                            Ok(Event::RemoteJobChanged { job }) if job.id == id => break,
                            Err(RecvError::Lagged(_)) => break,
                            Ok(_) => {}
                        }
                    }
                }
            })
            .await;
        }
        Ok(Reply::Refused { reason }) => {
            return Err(MarketError::Provider(format!("the provider refused: {reason}")));
        }
        Ok(other) => return Err(MarketError::Provider(format!("the provider answered {other:?}"))),
        Err(error) => {
            let reason = format!("the provider could not be told: {error}");
            update(inner, id, |job| job.state = JobState::Cancelled { reason: Some(reason) }).await;
        }
    }
    job_of(inner, id)
}

/// Writes the fetched outputs to `dest`.
pub(super) async fn results(inner: &Arc<Inner>, id: &str) -> Result<Imported, MarketError> {
    let job = job_of(inner, id)?;
    let Some(outputs) = job.outputs.filter(|_| job.state.is_terminal()) else {
        return Err(MarketError::Conflict(format!(
            "job {id} is {}; its outputs are here once it has ended and they were fetched",
            job.state.name()
        )));
    };
    Ok(inner.parts.transfers.summary(outputs).await?)
}

/// One remote job, or that there is none.
pub(super) fn job_of(inner: &Inner, id: &str) -> Result<RemoteJob, MarketError> {
    inner.consumer().get(id).ok_or_else(|| MarketError::NotFound(id.to_owned()))
}

/// Changes a job, records it and tells watchers.
async fn update(inner: &Arc<Inner>, id: &str, change: impl FnOnce(&mut RemoteJob)) {
    let job = {
        let mut state = inner.consumer();
        let Some(entry) = state.jobs.get_mut(id) else { return };
        change(&mut entry.job);
        entry.job.updated_at = unix_now();
        entry.job.clone()
    };
    save(inner, &job).await;
    inner.parts.events.publish(Event::RemoteJobChanged { job: Box::new(job) });
}

async fn save(inner: &Arc<Inner>, job: &RemoteJob) {
    let record = match serde_json::to_string(job) {
        Ok(record) => record,
        Err(error) => return tracing::error!(%error, "cannot encode a remote job"),
    };
    if let Err(error) = inner.parts.store.put_remote_job(&job.id, record, job.created_at).await {
        tracing::error!(job = %job.id, %error, "cannot record a remote job");
    }
}
