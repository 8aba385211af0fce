//! The daemon's job supervisor: the jobs this agent runs, their records in the store, and the
//! events the API streams about them.
//!
//! Each accepted job gets a record (`queued`), a task that drives the [`Runner`], and a control
//! channel. Every state the runner reports is written to the store before it is published as an
//! [`Event::JobChanged`], so what a watcher sees is always what a restart would read back; output
//! goes out as [`Event::JobOutput`] and into the job's bounded log files, whose growth goes out as
//! [`Event::JobLog`] (a few times a second at most). When the daemon stops,
//! running jobs are cancelled and their records say so; a job left unfinished by a crash is marked
//! failed at the next start (its processes died with the agent). Jobs granted GPUs (the market's)
//! are remembered with their GPUs, so a GPU paused alone freezes only the jobs holding it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use super::JobState;
use super::runner::{Control, EVENT_BUFFER, GpuGrant, Job, RunEvent, Runner};
use super::spec::{JobKind, JobSpec, SpecError};
use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::store::{Store, StoreError};
use crate::uploads::Staged;
use hearth_api::availability::GpuPause;
use hearth_api::ids::JobId;
use hearth_api::jobs::{JobAction, JobRecord, OwnerNotice, Stream};

/// Why a request about a job was refused.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The spec is not acceptable; nothing was recorded or run.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No job has this id.
    #[error("no job {0} on this agent")]
    NotFound(String),
    /// The job is not in a state where this makes sense.
    #[error("job {id} is {state}; it cannot be {action}")]
    Conflict {
        /// The job.
        id: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// The spec asks for something the daemon does not grant yet.
    #[error("{0}")]
    Unsupported(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control request could not be carried out.
    #[error("job {id}: {message}")]
    Control {
        /// The job.
        id: String,
        /// What went wrong.
        message: String,
    },
}

/// The supervisor. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runner: Runner,
    store: Store,
    events: Bus,
    /// Control channels of the jobs whose task is running.
    live: Mutex<HashMap<JobId, mpsc::Sender<Control>>>,
    tasks: TaskTracker,
    /// Whether the owner lets jobs run now; a job waits for it before it starts.
    sharing: watch::Receiver<bool>,
    /// The jobs the owner's pause froze: thawed or stopped when it ends.
    owner_paused: Mutex<HashSet<JobId>>,
    /// The GPUs (UUIDs) of each job granted some, while its task runs.
    gpus: Mutex<HashMap<JobId, Vec<String>>>,
    /// The jobs frozen because one of their GPUs was paused alone: thawed when all are shared.
    gpu_paused: Mutex<HashSet<JobId>>,
}

impl Supervisor {
    /// Starts supervising with `runner`; jobs a previous run left unfinished are marked failed.
    /// Jobs start only while `sharing` is true.
    pub async fn start(
        runner: Runner,
        store: Store,
        events: Bus,
        sharing: watch::Receiver<bool>,
    ) -> Result<Self, StoreError> {
        let orphaned = store.fail_unfinished_jobs("the agent stopped while the job ran", unix_now()).await?;
        if orphaned > 0 {
            tracing::warn!(jobs = orphaned, "jobs left unfinished by the previous run were marked failed");
        }
        let inner = Inner {
            runner,
            store,
            events,
            live: Mutex::default(),
            tasks: TaskTracker::new(),
            sharing,
            owner_paused: Mutex::default(),
            gpus: Mutex::default(),
            gpu_paused: Mutex::default(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Validates the spec at `spec_path`, records the job and starts it.
    /// A spec asking for GPUs is refused: the daemon grants GPUs only under an agreement.
    pub async fn submit(&self, spec_path: &Path) -> Result<JobRecord, SupervisorError> {
        self.submit_granted(spec_path, Vec::new()).await
    }

    /// [`submit`](Self::submit) with `gpus` granted: exactly as many as the spec asks for (the
    /// market's jobs, whose agreement names them).
    pub async fn submit_granted(
        &self,
        spec_path: &Path,
        gpus: Vec<GpuGrant>,
    ) -> Result<JobRecord, SupervisorError> {
        let base = spec_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.submit_in(spec_path, base.to_owned(), None, gpus).await
    }

    /// Validates an uploaded spec and its files, records the job and starts it. The staging
    /// folder is kept until the job ends (the runner reads the files when the job starts, which
    /// may be long after, while the owner's pause lasts), then removed.
    pub async fn submit_staged(&self, staged: Staged) -> Result<JobRecord, SupervisorError> {
        let (spec, files) = (staged.spec(), staged.files());
        self.submit_in(&spec, files, Some(staged), Vec::new()).await
    }

    async fn submit_in(
        &self,
        spec_path: &Path,
        base: PathBuf,
        staged: Option<Staged>,
        gpus: Vec<GpuGrant>,
    ) -> Result<JobRecord, SupervisorError> {
        let path = spec_path.to_owned();
        let spec = tokio::task::spawn_blocking(move || JobSpec::load_in(&path, &base))
            .await
            .map_err(|error| SupervisorError::Control { id: String::new(), message: error.to_string() })??;
        if spec.resources.gpus > 0 && gpus.is_empty() {
            return Err(SupervisorError::Unsupported(
                "the daemon grants GPUs only to other agents' jobs under an agreement; run GPU jobs \
                 with `hearth run JOB.toml --local`"
                    .into(),
            ));
        }
        if gpus.len() != spec.resources.gpus as usize {
            return Err(SupervisorError::Unsupported(format!(
                "the job asks for {} GPUs but {} were granted",
                spec.resources.gpus,
                gpus.len()
            )));
        }
        let id: JobId = crate::proto::new_id();
        let now = unix_now();
        let record = JobRecord {
            kind: match spec.kind {
                JobKind::Wasi { .. } => "wasi",
                JobKind::Native { .. } => "native",
            }
            .to_owned(),
            spec_path: spec_path.to_owned(),
            job_dir: self.inner.runner.job_dir(&id),
            state: JobState::Queued,
            created_at: now,
            updated_at: now,
            id: id.clone(),
        };
        self.inner.store.insert_job(&record).await?;
        self.inner.events.publish(Event::JobChanged { job: Box::new(record.clone()) });

        let (controls, control_rx) = mpsc::channel(8);
        self.lock_live().insert(id.clone(), controls);
        let inner = Arc::clone(&self.inner);
        if !gpus.is_empty() {
            let uuids = gpus.iter().map(|gpu| gpu.uuid.clone()).collect();
            self.inner.lock_gpus().insert(id.clone(), uuids);
        }
        let request = Job { id, spec, gpus };
        let first = record.clone();
        self.inner.tasks.spawn(async move {
            inner.drive(first, request, control_rx).await;
            // Removing the uploaded files is disk work; keep it off the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(staged)).await;
        });
        Ok(record)
    }

    /// Every job, oldest first.
    pub async fn list(&self) -> Result<Vec<JobRecord>, SupervisorError> {
        Ok(self.inner.store.jobs().await?)
    }

    /// One job.
    pub async fn get(&self, id: &str) -> Result<JobRecord, SupervisorError> {
        self.list()
            .await?
            .into_iter()
            .find(|job| job.id == id)
            .ok_or_else(|| SupervisorError::NotFound(id.to_owned()))
    }

    /// Pauses, resumes or cancels a job; returns once it is done, with the job's record.
    pub async fn act(&self, id: &str, action: JobAction) -> Result<JobRecord, SupervisorError> {
        let job = self.get(id).await?;
        if job.state.apply(action.transition()).is_err() {
            return Err(SupervisorError::Conflict {
                id: id.to_owned(),
                state: job.state.name(),
                action: action.past_tense(),
            });
        }
        let controls = self.lock_live().get(id).cloned();
        let controls = controls.ok_or_else(|| SupervisorError::Conflict {
            id: id.to_owned(),
            state: job.state.name(),
            action: action.past_tense(),
        })?;
        let failed = |message: String| SupervisorError::Control { id: id.to_owned(), message };
        let gone = || failed("the job ended meanwhile".to_owned());
        match action {
            JobAction::Cancel => controls.send(Control::Cancel).await.map_err(|_| gone())?,
            JobAction::Pause | JobAction::Resume => {
                let (reply, answer) = oneshot::channel();
                let control =
                    if action == JobAction::Pause { Control::Pause(reply) } else { Control::Resume(reply) };
                controls.send(control).await.map_err(|_| gone())?;
                answer.await.map_err(|_| gone())?.map_err(|error| failed(format!("{error:#}")))?;
            }
        }
        // The record is updated by the job's task; wait briefly so the answer shows the effect.
        for _ in 0..100 {
            let now = self.get(id).await?;
            if now.state != job.state {
                return Ok(now);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.get(id).await
    }

    /// The ids of the running jobs; `None`, logged, when they cannot be read.
    async fn running(&self) -> Option<HashSet<JobId>> {
        match self.list().await {
            Ok(jobs) => Some(
                jobs.into_iter().filter(|job| job.state == JobState::Running).map(|job| job.id).collect(),
            ),
            Err(error) => {
                tracing::error!(%error, "cannot list the running jobs");
                None
            }
        }
    }

    /// The owner needs the machine: freezes every running job, records a `paused` notice with
    /// `reason` for each, and returns once all are frozen. Jobs that start later while the owner's
    /// pause lasts are frozen as they start.
    pub async fn owner_pause(&self, reason: &str) {
        let Some(running) = self.running().await else { return };
        // Every freeze is asked for before any answer is awaited, so they happen together.
        let mut answers = Vec::new();
        for id in running {
            let Some(controls) = self.lock_live().get(&id).cloned() else { continue };
            let (reply, answer) = oneshot::channel();
            if controls.send(Control::Pause(reply)).await.is_ok() {
                answers.push((id, answer));
            }
        }
        for (id, answer) in answers {
            match answer.await {
                Ok(Ok(_)) => {
                    self.inner.lock_owner_paused().insert(id.clone());
                    self.inner.notice(&id, "paused", reason).await;
                }
                Ok(Err(error)) => {
                    tracing::error!(job = %id, error = %format!("{error:#}"), "cannot pause the job")
                }
                Err(_) => {} // It ended meanwhile.
            }
        }
    }

    /// Sharing is back: thaws the jobs the owner's pause froze.
    pub async fn owner_resume(&self, reason: &str) {
        let paused: Vec<JobId> = self.inner.lock_owner_paused().drain().collect();
        for id in paused {
            let Some(controls) = self.lock_live().get(&id).cloned() else { continue };
            let (reply, answer) = oneshot::channel();
            if controls.send(Control::Resume(reply)).await.is_ok() && matches!(answer.await, Ok(Ok(_))) {
                self.inner.notice(&id, "resumed", reason).await;
            }
        }
    }

    /// The owner's pause outlasted its grace: stops the jobs it froze, as cancelled with `reason`.
    pub async fn owner_stop(&self, reason: &str) {
        let paused: Vec<JobId> = self.inner.lock_owner_paused().drain().collect();
        for id in paused {
            let Some(controls) = self.lock_live().get(&id).cloned() else { continue };
            if controls.send(Control::Stop(reason.to_owned())).await.is_ok() {
                self.inner.notice(&id, "stopped", reason).await;
            }
        }
    }

    /// Some GPUs are paused alone (the owner's policy, a GPU too hot): freezes each running job
    /// holding one of them, with a `paused` notice naming the GPU, and thaws the jobs this froze
    /// once all their GPUs are shared again (`resumed`). Jobs on other GPUs, and jobs without
    /// any, go on. Called with every evaluation while the machine shares (while it is paused as a
    /// whole, [`owner_pause`](Self::owner_pause) holds everything).
    pub async fn gpu_pauses(&self, paused: &[GpuPause]) {
        let holders: Vec<(JobId, Vec<String>)> =
            self.inner.lock_gpus().iter().map(|(id, uuids)| (id.clone(), uuids.clone())).collect();
        if holders.is_empty() {
            return;
        }
        let Some(running) = self.running().await else { return };
        for (id, uuids) in holders {
            let hit = paused.iter().find(|pause| uuids.contains(&pause.uuid));
            let frozen = self.inner.lock_gpu_paused().contains(&id);
            let Some(controls) = self.lock_live().get(&id).cloned() else { continue };
            match hit {
                Some(pause) if !frozen && running.contains(&id) => {
                    let (reply, answer) = oneshot::channel();
                    if controls.send(Control::Pause(reply)).await.is_err() {
                        continue; // It ended meanwhile.
                    }
                    match answer.await {
                        Ok(Ok(_)) => {
                            self.inner.lock_gpu_paused().insert(id.clone());
                            let why: Vec<String> = pause.reasons.iter().map(ToString::to_string).collect();
                            let reason = format!("GPU {} is paused: {}", pause.uuid, why.join("; "));
                            self.inner.notice(&id, "paused", &reason).await;
                        }
                        Ok(Err(error)) => {
                            let error = format!("{error:#}");
                            tracing::error!(job = %id, %error, "cannot pause the job for its GPU");
                        }
                        Err(_) => {}
                    }
                }
                None if frozen => {
                    self.inner.lock_gpu_paused().remove(&id);
                    let (reply, answer) = oneshot::channel();
                    if controls.send(Control::Resume(reply)).await.is_err() {
                        continue;
                    }
                    match answer.await {
                        Ok(Ok(_)) => self.inner.notice(&id, "resumed", "its GPUs are shared again").await,
                        Ok(Err(error)) => {
                            tracing::error!(job = %id, error = %format!("{error:#}"), "cannot thaw the job");
                        }
                        Err(_) => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Every notice recorded about a job for its consumer, oldest first.
    pub async fn notices(&self, id: &str) -> Result<Vec<OwnerNotice>, SupervisorError> {
        Ok(self.inner.store.owner_notices(id).await?)
    }

    /// Cancels every running job and waits for their records to be final.
    pub async fn shutdown(&self) {
        let live: Vec<_> = self.lock_live().values().cloned().collect();
        for controls in live {
            let _ = controls.send(Control::Cancel).await;
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, mpsc::Sender<Control>>> {
        self.inner.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn lock_owner_paused(&self) -> std::sync::MutexGuard<'_, HashSet<JobId>> {
        self.owner_paused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_gpus(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Vec<String>>> {
        self.gpus.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_gpu_paused(&self) -> std::sync::MutexGuard<'_, HashSet<JobId>> {
        self.gpu_paused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets a job whose task ended.
    fn forget(&self, id: &JobId) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
        self.lock_gpus().remove(id);
        self.lock_gpu_paused().remove(id);
    }

    /// Records a notice for the job's consumer and publishes it.
    async fn notice(&self, id: &str, kind: &str, reason: &str) {
        let notice = OwnerNotice {
            job_id: id.to_owned().into(),
            kind: kind.to_owned(),
            reason: reason.to_owned(),
            at: unix_now(),
        };
        if let Err(error) = self.store.add_owner_notice(&notice).await {
            tracing::error!(job = %id, %error, "could not record the owner's notice");
        }
        self.events.publish(Event::OwnerNotice { notice });
    }

    /// Waits until the owner shares, unless the job is cancelled first; then returns the reason
    /// for its `cancelled` state.
    async fn wait_for_sharing(&self, controls: &mut mpsc::Receiver<Control>) -> Option<Option<String>> {
        let mut sharing = self.sharing.clone();
        loop {
            tokio::select! {
                shared = sharing.wait_for(|sharing| *sharing) => {
                    // The sender is gone only at shutdown, which cancels every job anyway.
                    return if shared.is_ok() { None } else { Some(None) };
                }
                control = controls.recv() => match control {
                    Some(Control::Cancel) | None => return Some(None),
                    Some(Control::Stop(reason)) => return Some(Some(reason)),
                    // Not possible while queued: `act` refuses them, so nobody waits on a reply.
                    Some(Control::Pause(_) | Control::Resume(_)) => {}
                },
            }
        }
    }

    /// Runs one job, recording and publishing every state it passes through.
    async fn drive(&self, mut record: JobRecord, request: Job, mut controls: mpsc::Receiver<Control>) {
        let id = request.id.clone();
        if let Some(reason) = self.wait_for_sharing(&mut controls).await {
            record.state = JobState::Cancelled { reason };
            record.updated_at = unix_now();
            if let Err(error) = self.store.set_job_state(&id, &record.state, record.updated_at).await {
                tracing::error!(job = %id, %error, "could not record the job's state");
            }
            self.events.publish(Event::JobChanged { job: Box::new(record.clone()) });
            self.forget(&id);
            return;
        }
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_BUFFER);
        let run = self.runner.run(request, controls, events_tx);
        tokio::pin!(run);
        let mut outcome = None;
        loop {
            tokio::select! {
                done = &mut run, if outcome.is_none() => outcome = Some(done),
                event = events_rx.recv() => match event {
                    Some(RunEvent::State(state)) => {
                        if state == record.state {
                            continue;
                        }
                        record.state = state;
                        record.updated_at = unix_now();
                        if let Err(error) = self.store.set_job_state(&id, &record.state, record.updated_at).await {
                            tracing::error!(job = %id, %error, "could not record the job's state");
                        }
                        self.events.publish(Event::JobChanged { job: Box::new(record.clone()) });
                        if record.state == JobState::Running && !*self.sharing.borrow() {
                            self.freeze_late_starter(&id);
                        }
                    }
                    Some(RunEvent::Output { stream, data }) => {
                        let text = String::from_utf8_lossy(&data).into_owned();
                        self.events.publish(Event::JobOutput { id: id.clone(), stream, text });
                    }
                    Some(RunEvent::Logged { stream, length }) => {
                        self.events.publish(Event::JobLog { id: id.clone(), stream, length });
                    }
                    // The runner dropped its sender: every event has been seen.
                    None => break,
                },
            }
        }
        self.forget(&id);
        if let Some(outcome) = outcome {
            tracing::info!(job = %id, state = outcome.state.name(), "job ended");
        }
    }
}

impl Inner {
    /// A job that reached `running` while the owner's pause lasts (it was still starting when the
    /// pause came) is frozen like the others. Its own task must keep driving the runner meanwhile,
    /// so the freeze is asked for from a task of its own.
    fn freeze_late_starter(&self, id: &JobId) {
        let Some(controls) = self.live.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned() else {
            return;
        };
        self.lock_owner_paused().insert(id.clone());
        tokio::spawn(async move {
            let (reply, answer) = oneshot::channel();
            if controls.send(Control::Pause(reply)).await.is_ok() {
                let _ = answer.await;
            }
        });
    }
}

/// Reads a job's log from byte `offset` on (at most [`LOG_LIMIT`](super::runner::LOG_LIMIT) bytes).
pub fn read_log(job_dir: &Path, stream: Stream, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(job_dir.join(stream.file_name()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.take(super::runner::LOG_LIMIT).read_to_end(&mut bytes)?;
    Ok(bytes)
}
