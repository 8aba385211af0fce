//! A request's driver: it takes one request package from wherever its record says it is to its
//! end (acquire, roll back, run, release; see the module above), recording each step before the
//! next, so that a restart resumes it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Acquisition, HoldState, Inner, RequestState, RequestStatus, TaskState, ended};
use crate::clock::unix_now;
use crate::events::Event;
use crate::market::MarketError;
use crate::net::negotiate::{ReserveRequest, VERSION};
use hearth_api::ids::{JobId, RequestId};

/// How many fitting providers one try of an acquisition asks, one after the other, before it
/// waits for the next try.
const ASK_PER_TRY: usize = 3;

/// The longest wait between two tries of one acquisition.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often an undelivered release is sent again before the reservation is left to lapse.
const RELEASE_TRIES: u32 = 3;

/// Takes one request from wherever its record says it is to its end. Returns early, leaving the
/// record as it is, when the agent stops.
pub(super) async fn drive(inner: Arc<Inner>, id: RequestId) {
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
    let reservation_id = crate::proto::random_id(16);
    let ask = ReserveRequest {
        version: VERSION,
        reservation_id: reservation_id.clone(),
        request_id: id.to_owned().into(),
        resource: resource.name.clone(),
        consumer: inner.me.to_string().into(),
        provider: provider.to_string().into(),
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
) -> Result<JobId, String> {
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
async fn keep_alive(inner: Arc<Inner>, id: RequestId, stop: CancellationToken) {
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
