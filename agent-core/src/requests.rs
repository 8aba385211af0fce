//! Request packages, the consumer's side: several resources in one request, all acquired or none.
//!
//! [`Requests::submit`] validates a package ([`package`]), puts it on the request queue and its
//! tasks on the task queue (both in the store, one transaction) and answers with the request id at
//! once. A driver task per request then works through it, each step recorded before the next:
//!
//! 1. **Acquire**, wave by wave ([`Package::waves`]: dependencies first, a wave's resources in
//!    parallel). Each resource is one signed `reserve` sub-request to a provider whose advert
//!    fits: one try asks up to three of them in turn, best-ranked first among those that have not
//!    refused it yet, until one holds it. A failed try is retried up to the package's `retries`,
//!    waiting `backoff` doubled each time. The reservation id is recorded
//!    before the ask goes out, so an ask whose answer was lost can still be released.
//! 2. Past the retries, **roll back**: every reservation held is released, in the reverse order of
//!    acquisition, each by a signed release the provider acts on.
//! 3. **Run** the tasks: the tasks on one resource in file order, a resource's tasks once every
//!    resource it comes `after` has finished its own; each task is a remote job offered at once
//!    by the provider that holds the reservation. A failed task skips the rest.
//! 4. **Release** everything, in reverse order.
//!
//! While a request holds anything it keeps each reservation alive (`keep`) every third of its hold
//! period; a provider drops one nobody keeps, so a consumer that vanished leaves nothing held for
//! long. After a restart each unfinished request resumes from its record: an ask whose answer was
//! never recorded is released and asked again, a held reservation is kept (or asked again if it
//! lapsed), a running task is followed, and a request that was releasing finishes releasing.

pub use hearth_api::package;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use hearth_api::jobs::ended;
pub use package::{
    Acquisition, HoldState, Package, PackageError, RequestState, RequestStatus, TaskState, TaskStatus,
};

use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::market::{Market, MarketError};
use crate::net::negotiate::{ReserveRequest, VERSION};
use crate::store::{Durability, RequestRow, Store, StoreError, TaskRow};
use crate::uploads::{Staged, Uploads};

/// How many requests acquire or run at once; the others wait on the queue, `queued`.
const ACTIVE: usize = 64;

/// How many fitting providers one try of an acquisition asks, one after the other, before it
/// waits for the next try.
const ASK_PER_TRY: usize = 3;

/// The longest wait between two tries of one acquisition.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often an undelivered release is sent again before the reservation is left to lapse.
const RELEASE_TRIES: u32 = 3;

/// Why a package request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The package is not acceptable; nothing was queued.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// No request has this id.
    #[error("no request package {0} on this agent")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something that cannot happen did (a record that does not encode, a task that panicked).
    #[error("{0}")]
    Internal(String),
}

/// What the queue does to a request's status.
trait Bookkeeping {
    /// Counts the tasks, the succeeded and failed ones, and words the failures.
    fn recount(&mut self);

    /// The status as the store keeps it.
    fn row(&self) -> Result<RequestRow, RequestError>;
}

impl Bookkeeping for RequestStatus {
    fn recount(&mut self) {
        self.tasks = self.task_list.len() as u32;
        self.succeeded = self.task_list.iter().filter(|t| t.state == TaskState::Succeeded).count() as u32;
        self.failed = self.task_list.iter().filter(|t| t.state == TaskState::Failed).count() as u32;
        self.failures = self
            .task_list
            .iter()
            .filter(|t| t.state == TaskState::Failed)
            .map(|t| {
                format!("task {} on {}: {}", t.index, t.resource, t.reason.as_deref().unwrap_or("failed"))
            })
            .collect();
    }

    fn row(&self) -> Result<RequestRow, RequestError> {
        Ok(RequestRow {
            id: self.id.clone(),
            state: self.state.name().to_owned(),
            record: serde_json::to_string(self).map_err(|e| RequestError::Internal(e.to_string()))?,
            created_at: self.created_at,
            updated_at: self.updated_at,
            tasks: self
                .task_list
                .iter()
                .map(|task| TaskRow {
                    index: task.index,
                    resource: task.resource.clone(),
                    spec_path: task.spec_path.to_string_lossy().into_owned(),
                    state: task.state.name().to_owned(),
                    job_id: task.job_id.clone(),
                    reason: task.reason.clone(),
                })
                .collect(),
        })
    }
}

/// The request packages of this agent. Cheap to clone.
#[derive(Clone)]
pub struct Requests {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests").finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    market: Market,
    events: Bus,
    me: PeerId,
    /// Where uploaded packages are staged; a request's folder goes when the request ends.
    uploads: Uploads,
    all: Mutex<HashMap<String, RequestStatus>>,
    active: Semaphore,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Inner {
    fn all(&self) -> MutexGuard<'_, HashMap<String, RequestStatus>> {
        self.all.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Option<RequestStatus> {
        self.all().get(id).cloned()
    }

    /// Changes a request, records it and tells watchers. Nothing is recorded for a request gone.
    async fn update(&self, id: &str, change: impl FnOnce(&mut RequestStatus)) -> Option<RequestStatus> {
        let status = {
            let mut all = self.all();
            let status = all.get_mut(id)?;
            change(status);
            status.recount();
            status.updated_at = unix_now();
            status.clone()
        };
        self.save(&status).await;
        Some(status)
    }

    async fn save(&self, status: &RequestStatus) {
        match status.row() {
            Ok(row) => {
                if let Err(error) = self.store.put_request(row, Durability::Progress).await {
                    tracing::error!(request = %status.id, %error, "cannot record a request");
                }
            }
            Err(error) => tracing::error!(request = %status.id, %error, "cannot encode a request"),
        }
        self.events.publish(Event::RequestChanged { request: Box::new(status.clone()) });
    }
}

/// The drivers, for the daemon to stop.
#[must_use = "dropping the task handle leaves the drivers running until the daemon's token fires"]
pub struct RequestsTask {
    inner: Arc<Inner>,
}

impl RequestsTask {
    /// Stops every driver where it is (each resumes at the next start) and waits for them.
    pub async fn shutdown(self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Requests {
    /// Loads the requests of earlier runs and resumes every unfinished one.
    pub async fn spawn(
        store: Store,
        market: Market,
        events: Bus,
        me: PeerId,
        uploads: Uploads,
        cancel: &CancellationToken,
    ) -> Result<(Self, RequestsTask), RequestError> {
        let mut all = HashMap::new();
        for row in store.requests().await? {
            match serde_json::from_str::<RequestStatus>(&row.record) {
                Ok(status) => {
                    all.insert(status.id.clone(), status);
                }
                Err(error) => {
                    tracing::error!(request = %row.id, %error, "a request's record cannot be read; it is left out")
                }
            }
        }
        let inner = Arc::new(Inner {
            store,
            market,
            events,
            me,
            uploads,
            all: Mutex::new(all),
            active: Semaphore::new(ACTIVE),
            tasks: TaskTracker::new(),
            stop: cancel.child_token(),
        });
        let mut unfinished: Vec<(i64, String)> = inner
            .all()
            .values()
            .filter(|status| !status.state.is_terminal())
            .map(|status| (status.created_at, status.id.clone()))
            .collect();
        unfinished.sort();
        for (_, id) in unfinished {
            tracing::info!(request = %id, "resuming a request package");
            let task_inner = Arc::clone(&inner);
            inner.tasks.spawn(async move { drive(task_inner, id).await });
        }
        Ok((Self { inner: Arc::clone(&inner) }, RequestsTask { inner }))
    }

    /// Validates an uploaded package (its task specs and their files among the uploaded files),
    /// queues it and its tasks, and starts it; answers at once. Its tasks' specs are read when
    /// each task starts, so the staging folder stays until the request ends.
    pub async fn submit_staged(&self, staged: Staged) -> Result<RequestStatus, RequestError> {
        let (file, base) = (staged.spec(), staged.files());
        let path = file.clone();
        let package = tokio::task::spawn_blocking(move || Package::load_in(&file, &base))
            .await
            .map_err(|error| RequestError::Internal(error.to_string()))??;
        let now = unix_now();
        let resources = package
            .resources
            .iter()
            .map(|resource| Acquisition {
                resource: resource.name.clone(),
                state: HoldState::Waiting,
                provider: None,
                reservation_id: None,
                attempts: 0,
                error: None,
                order: None,
                prices: None,
                gpus: Vec::new(),
                acquired_at_ms: None,
                released_at_ms: None,
            })
            .collect();
        let task_list = package
            .tasks
            .iter()
            .enumerate()
            .map(|(i, task)| TaskStatus {
                index: i as u32,
                resource: task.resource.clone(),
                spec_path: task.spec_path.clone(),
                state: TaskState::Waiting,
                job_id: None,
                reason: None,
                started_at_ms: None,
                ended_at_ms: None,
            })
            .collect();
        let mut status = RequestStatus {
            id: random_id(),
            name: package.name.clone(),
            path: path.to_owned(),
            state: RequestState::Queued,
            reason: None,
            tasks: 0,
            succeeded: 0,
            failed: 0,
            failures: Vec::new(),
            resources,
            task_list,
            outcome: None,
            package,
            created_at: now,
            updated_at: now,
        };
        status.recount();
        // On disk before the id is given out: a request answered is a request kept.
        self.inner.store.put_request(status.row()?, Durability::Synced).await?;
        // Recorded: from here its driver removes the folder when the request ends.
        let _ = staged.keep();
        self.inner.all().insert(status.id.clone(), status.clone());
        self.inner.events.publish(Event::RequestChanged { request: Box::new(status.clone()) });
        let (inner, id) = (Arc::clone(&self.inner), status.id.clone());
        self.inner.tasks.spawn(async move { drive(inner, id).await });
        Ok(status)
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<RequestStatus, RequestError> {
        self.inner.get(id).ok_or_else(|| RequestError::NotFound(id.to_owned()))
    }

    /// Every request, oldest first.
    pub fn list(&self) -> Vec<RequestStatus> {
        let mut all: Vec<RequestStatus> = self.inner.all().values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }
}

/// A new request id: 8 random bytes, hex.
fn random_id() -> String {
    crate::proto::random_id(8)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Takes one request from wherever its record says it is to its end. Returns early, leaving the
/// record as it is, when the agent stops.
async fn drive(inner: Arc<Inner>, id: String) {
    let permit = tokio::select! {
        () = inner.stop.cancelled() => return,
        permit = inner.active.acquire() => permit,
    };
    let Ok(_permit) = permit else { return };
    let Some(status) = inner.get(&id) else { return };
    // Keeps held reservations alive for as long as this driver runs.
    let keeping = inner.stop.child_token();
    {
        let (inner, id, stop) = (Arc::clone(&inner), id.clone(), keeping.clone());
        inner.tasks.clone().spawn(async move { keep_alive(inner, id, stop).await });
    }
    let mut state = status.state;
    loop {
        if inner.stop.is_cancelled() {
            break;
        }
        state = match state {
            RequestState::Queued | RequestState::Acquiring => {
                inner.update(&id, |s| s.state = RequestState::Acquiring).await;
                match acquire_all(&inner, &id).await {
                    Ok(()) => RequestState::Running,
                    Err(Stop::Stopping) => break,
                    Err(Stop::Failed(reason)) => {
                        let reason = rollback(&inner, &id, &reason).await;
                        if inner.stop.is_cancelled() {
                            // Not all released: the next start finds the failed resource out of
                            // tries and rolls back again.
                            break;
                        }
                        skip_all(&inner, &id, "its resources were not acquired").await;
                        inner
                            .update(&id, |s| {
                                s.state = RequestState::RolledBack;
                                s.reason = Some(reason);
                            })
                            .await;
                        break;
                    }
                }
            }
            RequestState::Running => {
                inner.update(&id, |s| s.state = RequestState::Running).await;
                match run_tasks(&inner, &id).await {
                    Err(Stop::Stopping) => break,
                    Err(Stop::Failed(_)) | Ok(()) => {}
                }
                let failed = inner.get(&id).is_none_or(|s| s.failed > 0);
                let outcome = if failed { RequestState::Failed } else { RequestState::Completed };
                inner
                    .update(&id, |s| {
                        s.state = RequestState::Releasing;
                        s.outcome = Some(outcome);
                        if failed {
                            s.reason = Some(s.failures.join("; "));
                        }
                    })
                    .await;
                RequestState::Releasing
            }
            RequestState::Releasing => {
                let outcome = inner.get(&id).and_then(|s| s.outcome).unwrap_or(RequestState::Failed);
                release_all(&inner, &id, outcome.name()).await;
                if !inner.stop.is_cancelled() {
                    inner.update(&id, |s| s.state = outcome).await;
                }
                break;
            }
            RequestState::Completed | RequestState::Failed | RequestState::RolledBack => break,
        };
    }
    keeping.cancel();
    if let Some(status) = inner.get(&id).filter(|status| status.state.is_terminal()) {
        // No task will read its specs again: the uploaded files can go.
        let uploads = inner.uploads.clone();
        let _ = tokio::task::spawn_blocking(move || uploads.remove_folder_of(&status.path)).await;
    }
}

/// Why a step did not complete.
enum Stop {
    /// The agent is stopping; the request resumes at the next start.
    Stopping,
    /// It failed, and why.
    Failed(String),
}

/// Acquires every resource not held yet, wave by wave.
async fn acquire_all(inner: &Arc<Inner>, id: &str) -> Result<(), Stop> {
    let Some(status) = inner.get(id) else { return Err(Stop::Stopping) };
    for wave in status.package.waves() {
        let tries = wave.iter().map(|&i| acquire(inner, id, i));
        let results = libp2p::futures::future::join_all(tries).await;
        let mut failed = Vec::new();
        for result in results {
            match result {
                Ok(()) => {}
                Err(Stop::Stopping) => return Err(Stop::Stopping),
                Err(Stop::Failed(reason)) => failed.push(reason),
            }
        }
        if !failed.is_empty() {
            return Err(Stop::Failed(failed.join("; ")));
        }
    }
    Ok(())
}

/// Acquires resource `index` of a request: resumes what its record says, then asks providers
/// until one holds it or the retries are spent.
async fn acquire(inner: &Arc<Inner>, id: &str, index: usize) -> Result<(), Stop> {
    let Some(status) = inner.get(id) else { return Err(Stop::Stopping) };
    let package = &status.package;
    let resource = &package.resources[index];
    let acquisition = &status.resources[index];
    // What a previous run left.
    match (acquisition.state, acquisition.provider.as_deref(), acquisition.reservation_id.as_deref()) {
        (HoldState::Held, Some(provider), Some(reservation)) => {
            if let Ok(peer) = provider.parse::<PeerId>()
                && inner.market.keep(peer, reservation).await.is_ok()
            {
                return Ok(());
            }
            set(inner, id, index, |a| {
                a.state = HoldState::Waiting;
                a.error = Some("the reservation lapsed at the provider while this agent was stopped".into());
            })
            .await;
        }
        (HoldState::Asking, Some(provider), Some(reservation)) => {
            // The answer was never recorded: whatever the provider did, undo it.
            if let Ok(peer) = provider.parse::<PeerId>() {
                let _ = inner.market.release(peer, reservation, "the asking agent restarted").await;
            }
            set(inner, id, index, |a| a.state = HoldState::Waiting).await;
        }
        _ => {}
    }
    let mut refused_by: HashSet<PeerId> = HashSet::new();
    let mut last = String::from("not asked");
    let mut attempts = inner.get(id).map_or(0, |s| s.resources[index].attempts);
    while attempts <= package.retries {
        if attempts > 0 {
            let backoff = Duration::from_millis(package.backoff_ms)
                .saturating_mul(1 << (attempts - 1).min(16))
                .min(MAX_BACKOFF);
            tokio::select! {
                () = inner.stop.cancelled() => return Err(Stop::Stopping),
                () = tokio::time::sleep(backoff) => {}
            }
        }
        attempts += 1;
        let mut candidates =
            inner.market.providers_for(&resource.demand, resource.time_s, resource.max_price_per_hour).await;
        if candidates.is_empty() {
            last = "no sharing provider's advert fits it".into();
        }
        // Providers that have not refused it yet first, each group best first: many requests
        // at once would otherwise all ask the same best provider.
        candidates.sort_by_key(|(peer, _)| refused_by.contains(peer));
        for (provider, _) in candidates.into_iter().take(ASK_PER_TRY) {
            match ask(inner, id, index, provider, attempts).await {
                Ok(()) => return Ok(()),
                Err(why) => {
                    last = why;
                    refused_by.insert(provider);
                }
            }
            if inner.stop.is_cancelled() {
                return Err(Stop::Stopping);
            }
        }
        // One write for the whole try (an ask writes its own before it goes out).
        set(inner, id, index, |a| {
            a.state = HoldState::Waiting;
            a.attempts = attempts;
            a.error = Some(last.clone());
        })
        .await;
    }
    set(inner, id, index, |a| a.state = HoldState::Failed).await;
    Err(Stop::Failed(format!("{} not acquired after {attempts} tries, the last: {last}", resource.name)))
}

/// Asks `provider` to hold resource `index` of request `id` in try `attempt`: recorded before it
/// goes out, then recorded held; or the reason it is not (`PROVIDER: why`), for the caller to
/// record.
async fn ask(
    inner: &Arc<Inner>,
    id: &str,
    index: usize,
    provider: PeerId,
    attempt: u32,
) -> Result<(), String> {
    let Some(status) = inner.get(id) else { return Err("the request is gone".into()) };
    let resource = &status.package.resources[index];
    let reservation_id = random_id() + &random_id();
    let ask = ReserveRequest {
        version: VERSION,
        reservation_id: reservation_id.clone(),
        request_id: id.to_owned(),
        resource: resource.name.clone(),
        consumer: inner.me.to_string(),
        provider: provider.to_string(),
        issued_at: unix_now(),
        resources: resource.demand,
        network: resource.network,
        max_price_per_hour: resource.max_price_per_hour,
        hold_s: status.package.hold_s,
    };
    // Recorded before it goes out, so a restart can release it whatever happened.
    set(inner, id, index, |a| {
        a.state = HoldState::Asking;
        a.attempts = attempt;
        a.provider = Some(provider.to_string());
        a.reservation_id = Some(reservation_id.clone());
    })
    .await;
    match inner.market.reserve(&ask).await {
        Ok(grant) => {
            let order = inner
                .get(id)
                .map_or(1, |s| s.resources.iter().filter_map(|a| a.order).max().unwrap_or(0) + 1);
            set(inner, id, index, |a| {
                a.state = HoldState::Held;
                a.error = None;
                a.order = Some(order);
                a.prices = Some(grant.prices.clone());
                a.gpus = grant.gpus.clone();
                a.acquired_at_ms = Some(now_ms());
            })
            .await;
            Ok(())
        }
        Err(failure) => {
            let last = format!("{provider}: {failure}");
            tracing::info!(request = %id, resource = %resource.name, %last, "an acquisition failed");
            // An answer lost on the way may have left it held: a release undoes that.
            if !failure.answered {
                let _ =
                    inner.market.release(provider, &reservation_id, "the answer to the ask was lost").await;
            }
            Err(last)
        }
    }
}

/// Changes one acquisition of a request.
async fn set(inner: &Inner, id: &str, index: usize, change: impl FnOnce(&mut Acquisition)) {
    inner
        .update(id, |s| {
            if let Some(acquisition) = s.resources.get_mut(index) {
                change(acquisition);
            }
        })
        .await;
}

/// Releases everything held, in reverse order of acquisition; what it says.
async fn rollback(inner: &Arc<Inner>, id: &str, reason: &str) -> String {
    let released = release_all(inner, id, &format!("rolled back: {reason}")).await;
    if released.is_empty() {
        format!("{reason}; nothing was held")
    } else {
        format!("{reason}; released in reverse order: {}", released.join(", "))
    }
}

/// Releases every reservation held or asked for, last acquired first; the names released. Stops
/// early when the agent stops (the rest are released after the next start).
async fn release_all(inner: &Arc<Inner>, id: &str, reason: &str) -> Vec<String> {
    let Some(status) = inner.get(id) else { return Vec::new() };
    let mut held: Vec<(usize, &Acquisition)> = status
        .resources
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a.state, HoldState::Held | HoldState::Asking))
        .collect();
    // Held ones by acquisition order, last first; asks never answered first of all.
    held.sort_by_key(|(_, a)| std::cmp::Reverse(a.order.unwrap_or(u32::MAX)));
    let mut names = Vec::new();
    for (index, acquisition) in held {
        if inner.stop.is_cancelled() {
            break;
        }
        let (Some(provider), Some(reservation)) = (&acquisition.provider, &acquisition.reservation_id) else {
            continue;
        };
        let mut error = None;
        if let Ok(peer) = provider.parse::<PeerId>() {
            for attempt in 1..=RELEASE_TRIES {
                match inner.market.release(peer, reservation, reason).await {
                    Ok(()) => {
                        error = None;
                        break;
                    }
                    Err(why) => error = Some(why.to_string()),
                }
                if attempt < RELEASE_TRIES {
                    tokio::select! {
                        () = inner.stop.cancelled() => return names,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        if acquisition.state == HoldState::Held {
            names.push(acquisition.resource.clone());
        }
        set(inner, id, index, |a| {
            a.state = HoldState::Released;
            a.released_at_ms = Some(now_ms());
            if let Some(why) = error {
                a.error = Some(format!(
                    "the release did not reach the provider ({why}); it lapses there by itself"
                ));
            }
        })
        .await;
    }
    names
}

/// Marks every task not run yet as skipped.
async fn skip_all(inner: &Inner, id: &str, reason: &str) {
    inner
        .update(id, |s| {
            for task in &mut s.task_list {
                if matches!(task.state, TaskState::Waiting) {
                    task.state = TaskState::Skipped;
                    task.reason = Some(reason.to_owned());
                }
            }
        })
        .await;
}

/// Runs the tasks, resource wave by resource wave; a failed task skips every task not started.
async fn run_tasks(inner: &Arc<Inner>, id: &str) -> Result<(), Stop> {
    let Some(status) = inner.get(id) else { return Err(Stop::Stopping) };
    for wave in status.package.waves() {
        let runs = wave.iter().map(|&i| run_on(inner, id, i));
        for result in libp2p::futures::future::join_all(runs).await {
            if let Err(Stop::Stopping) = result {
                return Err(Stop::Stopping);
            }
        }
        if inner.get(id).is_none_or(|s| s.failed > 0) {
            skip_all(inner, id, "an earlier task failed").await;
            return Err(Stop::Failed("a task failed".into()));
        }
    }
    Ok(())
}

/// Runs the tasks on resource `index`, one after the other.
async fn run_on(inner: &Arc<Inner>, id: &str, index: usize) -> Result<(), Stop> {
    let Some(status) = inner.get(id) else { return Err(Stop::Stopping) };
    let resource = &status.package.resources[index];
    for task in status.package.tasks_on(&resource.name) {
        let Some(now) = inner.get(id) else { return Err(Stop::Stopping) };
        if now.failed > 0 {
            return Ok(());
        }
        let job_id = match (now.task_list[task].state, now.task_list[task].job_id.clone()) {
            (TaskState::Succeeded | TaskState::Failed | TaskState::Skipped, _) => continue,
            (_, Some(job_id)) => job_id,
            (_, None) => match submit_task(inner, &now, index, task).await {
                Ok(job_id) => job_id,
                Err(reason) => {
                    end_task(inner, id, task, TaskState::Failed, Some(reason)).await;
                    return Ok(());
                }
            },
        };
        // Subscribed before each look: a change after it wakes the wait below.
        let mut changes = inner.events.subscribe();
        loop {
            let job = match inner.market.remote_job(&job_id) {
                Ok(job) => job,
                Err(error) => {
                    end_task(inner, id, task, TaskState::Failed, Some(error.to_string())).await;
                    return Ok(());
                }
            };
            if job.state.is_terminal() {
                let (state, reason) = match &job.state {
                    crate::jobs::JobState::Finished { exit_code: 0 } => (TaskState::Succeeded, None),
                    other => (TaskState::Failed, Some(ended(other))),
                };
                end_task(inner, id, task, state, reason).await;
                break;
            }
            // The market publishes every change of the job; nothing else moves it.
            loop {
                let event = tokio::select! {
                    () = inner.stop.cancelled() => return Err(Stop::Stopping),
                    event = changes.recv() => event,
                };
                match event {
                    Ok(Event::RemoteJobChanged { job }) if job.id == job_id => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    // The bus lives as long as the agent: closed means stopping.
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::Stopping),
                }
            }
        }
    }
    Ok(())
}

/// Submits task `task` to the provider holding resource `index`; the remote job's id.
async fn submit_task(
    inner: &Arc<Inner>,
    status: &RequestStatus,
    index: usize,
    task: usize,
) -> Result<String, String> {
    let acquisition = &status.resources[index];
    let (HoldState::Held, Some(provider), Some(reservation), Some(prices)) = (
        acquisition.state,
        acquisition.provider.as_deref(),
        acquisition.reservation_id.as_deref(),
        acquisition.prices.clone(),
    ) else {
        return Err(format!("{} is not held (it lapsed at the provider)", acquisition.resource));
    };
    let provider: PeerId = provider.parse().map_err(|_| format!("{provider:?} is not a peer id"))?;
    let spec = status.task_list[task].spec_path.clone();
    let job = inner
        .market
        .submit_in(&spec, &status.id, provider, reservation, prices)
        .await
        .map_err(|error: MarketError| error.to_string())?;
    inner
        .update(&status.id, |s| {
            let task = &mut s.task_list[task];
            task.state = TaskState::Running;
            task.job_id = Some(job.id.clone());
            task.started_at_ms = Some(now_ms());
        })
        .await;
    Ok(job.id)
}

async fn end_task(inner: &Inner, id: &str, task: usize, state: TaskState, reason: Option<String>) {
    inner
        .update(id, |s| {
            let task = &mut s.task_list[task];
            task.state = state;
            task.reason = reason;
            task.ended_at_ms = Some(now_ms());
        })
        .await;
}

/// Keeps every reservation of request `id` held, every third of the hold period, until `stop`.
/// One the provider no longer holds is marked lapsed: no task is sent to it.
async fn keep_alive(inner: Arc<Inner>, id: String, stop: CancellationToken) {
    let Some(status) = inner.get(&id) else { return };
    let every = Duration::from_secs(status.package.hold_s).div_f64(3.0).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(status) = inner.get(&id) else { return };
        for (index, acquisition) in status.resources.iter().enumerate() {
            let (HoldState::Held, Some(provider), Some(reservation)) =
                (acquisition.state, acquisition.provider.as_deref(), acquisition.reservation_id.as_deref())
            else {
                continue;
            };
            let Ok(peer) = provider.parse::<PeerId>() else { continue };
            if let Err(failure) = inner.market.keep(peer, reservation).await
                && failure.answered
                && !stop.is_cancelled()
            {
                let reason = failure.to_string();
                tracing::warn!(request = %id, resource = %acquisition.resource, %reason, "a reservation lapsed");
                set(&inner, &id, index, |a| {
                    if a.state == HoldState::Held {
                        a.state = HoldState::Lapsed;
                        a.released_at_ms = Some(now_ms());
                        a.error = Some(reason);
                    }
                })
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_example_package_is_valid_and_runs_count_before_report() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline/package.toml");
        let package = Package::load(&path).unwrap();
        let names: Vec<&str> = package.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["count", "report"]);
        assert_eq!(package.waves(), [vec![0], vec![1]]);
        assert_eq!((package.retries, package.backoff_ms, package.hold_s), (3, 1000, 600));
    }

    #[test]
    fn counts_follow_the_task_list() {
        let task = |index: u32, state: TaskState, reason: Option<&str>| TaskStatus {
            index,
            resource: "r".into(),
            spec_path: PathBuf::from("/x.toml"),
            state,
            job_id: None,
            reason: reason.map(str::to_owned),
            started_at_ms: None,
            ended_at_ms: None,
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline/package.toml");
        let mut status = RequestStatus {
            id: "r".into(),
            name: None,
            path: path.clone(),
            state: RequestState::Running,
            reason: None,
            tasks: 0,
            succeeded: 0,
            failed: 0,
            failures: Vec::new(),
            resources: Vec::new(),
            task_list: vec![
                task(0, TaskState::Succeeded, None),
                task(1, TaskState::Failed, Some("exited with code 3")),
                task(2, TaskState::Skipped, Some("an earlier task failed")),
            ],
            outcome: None,
            package: Package::load(&path).unwrap(),
            created_at: 0,
            updated_at: 0,
        };
        status.recount();
        assert_eq!((status.tasks, status.succeeded, status.failed), (3, 1, 1));
        assert_eq!(status.failures, ["task 1 on r: exited with code 3"]);
        let row = status.row().unwrap();
        assert_eq!(row.state, "running");
        let states: Vec<&str> = row.tasks.iter().map(|t| t.state.as_str()).collect();
        assert_eq!(states, ["succeeded", "failed", "skipped"]);
        let back: RequestStatus = serde_json::from_str(&row.record).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn only_the_last_three_states_are_terminal() {
        let all = [
            RequestState::Queued,
            RequestState::Acquiring,
            RequestState::Running,
            RequestState::Releasing,
            RequestState::Completed,
            RequestState::Failed,
            RequestState::RolledBack,
        ];
        let terminal: Vec<&str> = all.iter().filter(|s| s.is_terminal()).map(|s| s.name()).collect();
        assert_eq!(terminal, ["completed", "failed", "rolled_back"]);
        for state in all {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }
}
