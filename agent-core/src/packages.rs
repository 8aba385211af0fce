//! Request packages, the consumer's side: several resources in one request, all acquired or none.
//!
//! [`Packages::submit`] validates a package ([`package`]), puts it on the request queue and its
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

mod driver;

pub use hearth_api::jobs::ended;
pub use hearth_api::package;
pub use package::{
    Acquisition, HoldState, Package, PackageError, RequestState, RequestStatus, TaskState, TaskStatus,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use libp2p::PeerId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::driver::drive;
use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::market::Market;
use crate::store::{Durability, RequestRow, Store, StoreError, TaskRow};
use crate::uploads::{Staged, Uploads};
use hearth_api::ids::RequestId;

/// How many requests acquire or run at once; the others wait on the queue, `queued`.
const ACTIVE: usize = 64;

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
            id: self.id.to_string(),
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
                    job_id: task.job_id.clone().map(String::from),
                    reason: task.reason.clone(),
                })
                .collect(),
        })
    }
}

/// The request packages of this agent. Cheap to clone.
#[derive(Clone)]
pub struct Packages {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Packages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packages").finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    market: Market,
    events: Bus,
    me: PeerId,
    /// Where uploaded packages are staged; a request's folder goes when the request ends.
    uploads: Uploads,
    all: Mutex<HashMap<RequestId, RequestStatus>>,
    active: Semaphore,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Inner {
    fn all(&self) -> MutexGuard<'_, HashMap<RequestId, RequestStatus>> {
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
pub struct PackagesTask {
    inner: Arc<Inner>,
}

impl PackagesTask {
    /// Stops every driver where it is (each resumes at the next start) and waits for them.
    pub async fn shutdown(self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Packages {
    /// Loads the requests of earlier runs and resumes every unfinished one.
    pub async fn spawn(
        store: Store,
        market: Market,
        events: Bus,
        me: PeerId,
        uploads: Uploads,
        cancel: &CancellationToken,
    ) -> Result<(Self, PackagesTask), RequestError> {
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
        let mut unfinished: Vec<(i64, RequestId)> = inner
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
        Ok((Self { inner: Arc::clone(&inner) }, PackagesTask { inner }))
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
            id: crate::proto::new_id(),
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
