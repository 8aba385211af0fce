//! The job runner: takes a validated spec to a terminal state under the sandbox, on the agent's
//! side. `hearth run --local` and the daemon's supervisor both use it, so a job behaves the same
//! whoever started it.
//!
//! One run: make the job folder, stage the inputs and compile a WASI module (`transferring`),
//! create the cgroup, write the sandbox plan, spawn the shim (`running`), then watch four things at
//! once: the shim's exit, the wall-clock deadline (paused time does not count), the scratch disk,
//! and control requests (pause, resume, cancel). However it ends, the cgroup is killed and removed,
//! so no process of the job outlives the run. Output is captured to bounded `stdout.log` and
//! `stderr.log` files in the job folder and streamed as [`RunEvent::Output`]; the log files'
//! growth is announced as [`RunEvent::Logged`], a few times a second at most.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytesize::ByteSize;
use hearth_api::jobs::Stream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

mod disk;
mod scratch;

use super::sandbox::cgroup::{self, JobCgroup};
use super::sandbox::ids::IdMap;
use super::sandbox::network::NetworkPlan;
use super::sandbox::nvidia::DriverFiles;
use super::sandbox::{self, Payload, Plan, RootFs};
use super::{Image, JobKind, JobSpec, JobState, image, wasi};
use hearth_api::ids::JobId;

/// Most bytes of each of stdout and stderr kept in the job folder; the stream goes on beyond it.
pub const LOG_LIMIT: u64 = 8 << 20;

/// Most processes and threads a job may have at once.
pub const MAX_PROCESSES: u64 = 512;

/// Memory the WASI runtime itself (wasmtime, its compiled code and threads) may use on top of the
/// module's linear memory, which the store's limiter caps at the spec's `memory`.
pub const WASI_RUNTIME_MEMORY: u64 = 64 << 20;

/// Events of one run in flight to whoever follows it. The pumps wait when it is full, so a
/// job that writes faster than its follower reads is slowed, never buffered: a run holds at most
/// this many reads of its output (16 KiB each) in memory.
pub const EVENT_BUFFER: usize = 64;

/// How long the pumps may take, once the job is dead, to hand the last of its output to a
/// follower that has stopped reading; past it the rest is only in the log files.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The least time between two [`RunEvent::Logged`] of one stream: a job writing fast must not
/// flood the event bus, and a follower is a tenth of a second behind at most.
pub const LOGGED_EVERY: Duration = Duration::from_millis(100);

/// How often the scratch disk is measured.
const DISK_CHECK: Duration = Duration::from_millis(200);

/// The file in the job folder where a run leaves what the job used ([`Measured`]).
pub const USAGE_FILE: &str = "usage.json";

/// What a job used, as measured on this machine: the basis of a receipt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    /// Wall-clock time from `running` to the end, paused time excluded, in milliseconds.
    pub running_ms: u64,
    /// CPU time of every process of the job, as its cgroup counted it, in microseconds.
    pub cpu_usec: u64,
    /// The most scratch disk (`out`, `work`, `tmp`) measured at once, in bytes.
    pub disk_peak_bytes: u64,
    /// Bytes received and sent through the job's granted network (its namespace's interfaces
    /// but loopback, as last sampled while it ran); 0 without network.
    #[serde(default)]
    pub network_bytes: u64,
}

impl Measured {
    /// What the run of the job in `job_dir` left; `None` when it never ran (or left nothing).
    pub fn read(job_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(job_dir.join(USAGE_FILE)).ok()?).ok()
    }
}

/// What a run reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The job moved to this state.
    State(JobState),
    /// The job wrote this.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, as they came.
        data: Vec<u8>,
    },
    /// The stream's log file is now `length` bytes long (flushed: a reader finds them). Sent at
    /// most every [`LOGGED_EVERY`] per stream, and once more at the stream's end if it grew.
    Logged {
        /// Which stream.
        stream: Stream,
        /// The log file's length.
        length: u64,
    },
}

/// A request to a running job, answered when done.
#[derive(Debug)]
pub enum Control {
    /// Freeze every process; answered with the time it took to be frozen.
    Pause(oneshot::Sender<anyhow::Result<Duration>>),
    /// Thaw; answered with the time it took.
    Resume(oneshot::Sender<anyhow::Result<Duration>>),
    /// Kill everything and end as `cancelled`.
    Cancel,
    /// Kill everything and end as `cancelled`, with the reason (the owner took the machine back).
    Stop(String),
}

/// A GPU granted to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuGrant {
    /// NVML's UUID, which the job sees in `NVIDIA_VISIBLE_DEVICES` and `CUDA_VISIBLE_DEVICES`.
    pub uuid: String,
    /// What of the GPU goes into the sandbox.
    pub device: GpuDevice,
}

/// How a granted GPU reaches the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuDevice {
    /// A real GPU: `/dev/nvidiaN` with this N, the shared control and unified-memory nodes, and
    /// the driver's user-space libraries.
    Node {
        /// The N of `/dev/nvidiaN`.
        minor_number: u32,
    },
    /// TEST SETTING: a GPU of `[testing] fake_gpus`, which the machine does not have. The job
    /// gets the environment variables naming it and nothing else: no device node, no driver.
    Fake,
}

/// A job to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Unique among this agent's jobs; names the job folder and cgroup.
    pub id: JobId,
    /// What to run.
    pub spec: JobSpec,
    /// The GPUs granted, as many as the spec asked for.
    pub gpus: Vec<GpuGrant>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `finished`, `failed` or `cancelled`.
    pub state: JobState,
    /// The job folder, holding `out/` and the logs.
    pub job_dir: PathBuf,
}

/// Runs jobs under the sandbox.
#[derive(Debug)]
pub struct Runner {
    exe: PathBuf,
    jobs_dir: PathBuf,
    cache_dir: PathBuf,
    engine: OnceLock<wasmtime::Engine>,
    /// How a job's disk is limited on this machine, found out when first needed.
    disk: OnceLock<disk::Limit>,
    /// Who a job's users are on the host.
    ids: IdMap,
}

impl Runner {
    /// A runner keeping job folders under `jobs_dir`, compiled modules and unpacked images under
    /// `cache_dir`, and starting the sandbox through `exe` (the `hearth` binary).
    pub fn new(exe: PathBuf, jobs_dir: PathBuf, cache_dir: PathBuf) -> Self {
        let ids = IdMap::for_this_agent();
        Self { exe, jobs_dir, cache_dir, engine: OnceLock::new(), disk: OnceLock::new(), ids }
    }

    /// How a job's disk is limited here; the first call tries an image in the jobs folder.
    fn disk_limit(&self) -> &disk::Limit {
        self.disk.get_or_init(|| match self.make_jobs_dir() {
            Ok(()) => disk::Limit::for_this_host(&self.jobs_dir),
            Err(error) => disk::Limit::Watched { why: format!("{error:#}") },
        })
    }

    /// The folder of every job, private to the agent's user: job folders hold other people's
    /// inputs and outputs.
    fn make_jobs_dir(&self) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.jobs_dir)
            .with_context(|| format!("creating {}", self.jobs_dir.display()))
    }

    /// Why a job's disk is not a limit the kernel enforces here, if it is not. Blocks for the
    /// first call's trial mount.
    pub fn disk_not_enforced(&self) -> Option<&str> {
        match self.disk_limit() {
            disk::Limit::Kernel { .. } => None,
            disk::Limit::Watched { why } => Some(why),
        }
    }

    /// A runner for this very `hearth` binary (through `/proc/self/exe`, so an upgrade of the file
    /// on disk cannot mix versions) with its folders under `data_dir`.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        Self::new(PathBuf::from("/proc/self/exe"), data_dir.join("jobs"), data_dir.join("cache"))
    }

    /// The folder a job with this id runs in.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id)
    }

    /// Ends and removes what a previous run of the agent left when it died (SIGKILL, a crash,
    /// power loss): the job cgroups of agents no longer running, with their processes (a frozen
    /// job's too), and the scratch (`in`, `root` and the `scratch` folder or image) of every job
    /// folder but those of a `hearth run --local` still running. The logs stay, and the outputs of
    /// a job that ended; a job the death cut short has none.
    /// The folders that were cleaned are returned, to be logged.
    pub fn sweep_previous_run(&self) -> usize {
        sandbox::cgroup::sweep_dead_agents();
        let Ok(entries) = fs::read_dir(&self.jobs_dir) else { return 0 };
        let mut cleaned = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if local_run_alive(&name) {
                continue;
            }
            let job_dir = entry.path();
            let mut had = false;
            for name in [sandbox::SCRATCH, "root"] {
                let dir = job_dir.join(name);
                if fs::symlink_metadata(&dir).is_ok() {
                    had = true;
                    if let Err(error) = scratch::reclaim(&dir) {
                        warn!(dir = %dir.display(), %error, "cannot reclaim a folder a dead run left");
                    }
                }
            }
            if let Err(error) = remove_scratch(&job_dir) {
                warn!(dir = %job_dir.display(), %error, "cannot remove what a dead run left");
            }
            cleaned += usize::from(had);
        }
        cleaned
    }

    /// Runs the job to its end. Errors are reported as a `failed` outcome, never lost.
    pub async fn run(
        &self,
        request: Job,
        controls: mpsc::Receiver<Control>,
        events: mpsc::Sender<RunEvent>,
    ) -> Outcome {
        let job_dir = self.job_dir(&request.id);
        let state = match self.try_run(&request, &job_dir, controls, &events).await {
            Ok(state) => state,
            Err(error) => JobState::Failed { reason: format!("{error:#}") },
        };
        // The job is dead: make everything it left the agent's again, leave only safe outputs,
        // and drop the scratch. Walks of a tree the job made may be long: off the runtime.
        let (dir, disk) = (job_dir.clone(), request.spec.resources.disk_bytes);
        let cleaned = tokio::task::spawn_blocking(move || clean_up(&dir, disk))
            .await
            .unwrap_or_else(|error| Err(format!("the clean-up stopped: {error}")));
        let state = match cleaned {
            Ok(()) => state,
            Err(reason) => {
                warn!(job = %request.id, %reason, "none of the job's outputs are kept");
                match state {
                    JobState::Finished { .. } => JobState::Failed { reason },
                    other => other,
                }
            }
        };
        let _ = events.send(RunEvent::State(state.clone())).await;
        Outcome { state, job_dir }
    }

    async fn try_run(
        &self,
        request: &Job,
        job_dir: &Path,
        mut controls: mpsc::Receiver<Control>,
        events: &mpsc::Sender<RunEvent>,
    ) -> anyhow::Result<JobState> {
        let spec = &request.spec;
        let _ = events.send(RunEvent::State(JobState::Transferring)).await;
        // Planned before anything is created, so a missing slirp4netns fails the job at once.
        let network = match spec.limits.network {
            true => Some(tokio::task::spawn_blocking(NetworkPlan::for_this_host).await??),
            false => None,
        };
        self.make_jobs_dir()?;
        fs::create_dir(job_dir).with_context(|| format!("creating the job folder {}", job_dir.display()))?;
        // `out/` receives the outputs once the job is dead; until then they are in the scratch.
        for name in ["out", "root"] {
            fs::create_dir(job_dir.join(name))?;
        }
        let (staged, owner) = (job_dir.to_owned(), self.ids.host_root());
        let (inputs, disk, bytes) =
            (spec.inputs.clone(), self.disk_limit().clone(), spec.resources.disk_bytes);
        tokio::task::spawn_blocking(move || {
            // The inputs are in the scratch too, read-only to the job, so an image holds them
            // beside the job's disk.
            let input_bytes = inputs
                .iter()
                .try_fold(0u64, |sum, input| Ok::<_, io::Error>(sum.saturating_add(tree_bytes(input)?)))?;
            let scratch = disk::create(&staged, bytes, input_bytes, &disk, owner)?;
            stage_inputs(&inputs, &scratch.join("in"), owner)
        })
        .await??;
        let prepared = self.prepare(spec).await?;

        let runtime_memory = match spec.kind {
            JobKind::Wasi { .. } => WASI_RUNTIME_MEMORY,
            JobKind::Native { .. } => 0,
        };
        let limits = cgroup::Limits {
            cpu_millis: spec.resources.cpu_millis,
            memory_bytes: spec.resources.memory_bytes + runtime_memory,
            pids: MAX_PROCESSES,
        };
        let cgroup = Arc::new(JobCgroup::create(&request.id, &limits)?);
        let real = request.gpus.iter().any(|gpu| matches!(gpu.device, GpuDevice::Node { .. }));
        let driver = match real {
            false => DriverFiles::default(),
            true => tokio::task::spawn_blocking(DriverFiles::find).await?,
        };
        let plan = sandbox_plan(request, job_dir, prepared, &cgroup, network, driver, self.ids);
        let result = self.supervise(request, plan, &cgroup, &mut controls, events).await;
        let cleanup = {
            let cgroup = Arc::clone(&cgroup);
            tokio::task::spawn_blocking(move || cgroup.kill_all()).await
        };
        if let Ok(Err(error)) = cleanup {
            warn!(job = %request.id, %error, "could not empty the job's cgroup");
        }
        if let Ok(cgroup) = Arc::try_unwrap(cgroup)
            && let Err(error) = cgroup.destroy()
        {
            warn!(job = %request.id, %error, "could not remove the job's cgroup");
        }
        result
    }

    /// What runs, and its environment.
    async fn prepare(&self, spec: &JobSpec) -> anyhow::Result<Prepared> {
        Ok(match &spec.kind {
            JobKind::Wasi { module } => {
                let engine = match self.engine.get() {
                    Some(engine) => engine.clone(),
                    None => {
                        let engine = wasi::engine()?;
                        self.engine.get_or_init(|| engine).clone()
                    }
                };
                let (module, cache_dir) = (module.clone(), self.cache_dir.join("wasm"));
                let compiled =
                    tokio::task::spawn_blocking(move || wasi::compile_cached(&engine, &module, &cache_dir))
                        .await??;
                let name = spec_module_name(&spec.kind);
                let mut args = vec![name];
                args.extend(spec.args.iter().cloned());
                let payload = Payload::Wasi {
                    compiled,
                    args,
                    memory_bytes: spec.resources.memory_bytes,
                    time: spec.limits.time,
                };
                Prepared { payload, env: spec.env.clone() }
            }
            JobKind::Native { image: root_image, command } => {
                let (root, config) = match root_image {
                    Image::Base => (RootFs::Base, image::ImageConfig::default()),
                    Image::Archive(path) => {
                        let (archive, cache_dir) = (path.clone(), self.cache_dir.join("images"));
                        let unpacked =
                            tokio::task::spawn_blocking(move || image::unpack_cached(&archive, &cache_dir))
                                .await??;
                        (RootFs::Image(unpacked.rootfs), unpacked.config)
                    }
                };
                let launch = config.launch(command.as_deref(), &spec.args, &spec.env)?;
                let payload = Payload::Native { root, command: launch.command, workdir: launch.workdir };
                Prepared { payload, env: launch.env }
            }
        })
    }

    async fn supervise(
        &self,
        request: &Job,
        plan: Plan,
        cgroup: &Arc<JobCgroup>,
        controls: &mut mpsc::Receiver<Control>,
        events: &mpsc::Sender<RunEvent>,
    ) -> anyhow::Result<JobState> {
        let spec = &request.spec;
        let job_dir = plan.job_dir.as_path();
        fs::write(job_dir.join(sandbox::PLAN_FILE), serde_json::to_vec_pretty(&plan)?)?;

        // Started in the job folder and given the plan's name only: the shim's command line is
        // init's, which the job reads in /proc/1/cmdline, and it names no host path.
        let mut shim = tokio::process::Command::new(&self.exe)
            .arg(sandbox::SHIM_COMMAND)
            .arg(sandbox::PLAN_FILE)
            .current_dir(job_dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the sandbox with {}", self.exe.display()))?;
        let pumps = [
            (
                shim.stdout.take().map(|out| Box::new(out) as Box<dyn AsyncRead + Send + Unpin>),
                Stream::Stdout,
            ),
            (
                shim.stderr.take().map(|err| Box::new(err) as Box<dyn AsyncRead + Send + Unpin>),
                Stream::Stderr,
            ),
        ]
        .into_iter()
        .filter_map(|(reader, stream)| {
            let reader = reader?;
            Some(tokio::spawn(pump(reader, stream, job_dir.join(stream.file_name()), events.clone())))
        })
        .collect::<Vec<_>>();
        // The shim joins the cgroup as its first act; until it has, killing the cgroup would miss
        // it, so a cancel or a deadline must not be acted on before.
        let shim_pid = shim.id().map(|pid| pid as i32);
        // It takes the shim about a millisecond. Poll with short sleeps on the blocking pool: a
        // timer tick would cost a whole millisecond, and spinning would take the CPU the shim needs.
        if let Some(pid) = shim_pid {
            let waiting = Arc::clone(cgroup);
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                while !waiting.processes().contains(&pid) && started.elapsed() < Duration::from_secs(10) {
                    // A shim that failed before joining is a zombie (or gone): stop waiting.
                    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    if state.rsplit(')').next().is_none_or(|rest| rest.trim_start().starts_with('Z')) {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
            .await?;
        }
        let _ = events.send(RunEvent::State(JobState::Running)).await;

        let started = Instant::now();
        let mut paused_for = Duration::ZERO;
        let disk_peak = Arc::new(AtomicU64::new(0));
        let mut deadline = tokio::time::Instant::now() + spec.limits.time;
        let mut disk =
            tokio::spawn(watch_disk(job_dir.to_owned(), spec.resources.disk_bytes, Arc::clone(&disk_peak)));
        let network_bytes = Arc::new(AtomicU64::new(0));
        let network = match (spec.limits.network, shim_pid) {
            (true, Some(pid)) => Some(tokio::spawn(watch_network(pid, Arc::clone(&network_bytes)))),
            _ => None,
        };
        let mut paused_since: Option<Instant> = None;
        let mut controls_open = true;
        let ending = loop {
            tokio::select! {
                status = shim.wait() => break Ending::Exited(status.context("waiting for the sandbox")?),
                () = tokio::time::sleep_until(deadline), if paused_since.is_none() => break Ending::TimedOut,
                over = &mut disk => break over?,
                control = controls.recv(), if controls_open => match control {
                    None => controls_open = false,
                    Some(Control::Cancel) => break Ending::Cancelled(None),
                    Some(Control::Stop(reason)) => break Ending::Cancelled(Some(reason)),
                    Some(Control::Pause(reply)) => {
                        let result = blocking(cgroup, JobCgroup::freeze).await;
                        if result.is_ok() && paused_since.is_none() {
                            paused_since = Some(Instant::now());
                            let _ = events.send(RunEvent::State(JobState::Paused)).await;
                        }
                        let _ = reply.send(result);
                    }
                    Some(Control::Resume(reply)) => {
                        let result = blocking(cgroup, JobCgroup::thaw).await;
                        if result.is_ok() && let Some(since) = paused_since.take() {
                            deadline += since.elapsed();
                            paused_for += since.elapsed();
                            let _ = events.send(RunEvent::State(JobState::Running)).await;
                        }
                        let _ = reply.send(result);
                    }
                },
            }
        };
        disk.abort();
        if let Some(network) = network {
            network.abort();
            // The shim's last count, taken in the namespace after the job ended on its own.
            if let Ok(text) = fs::read_to_string(job_dir.join(sandbox::NETWORK_COUNTERS)) {
                network_bytes.fetch_max(net_dev_bytes(&text), Ordering::Relaxed);
            }
        }
        let running = started
            .elapsed()
            .saturating_sub(paused_for + paused_since.map_or(Duration::ZERO, |since| since.elapsed()));
        // Whatever ended the run, nothing of the job may be left; this also closes the pipes.
        let killed = blocking(cgroup, JobCgroup::kill_all).await;
        let usage = Measured {
            running_ms: u64::try_from(running.as_millis()).unwrap_or(u64::MAX),
            cpu_usec: cgroup
                .cpu_usage()
                .map_or(0, |used| u64::try_from(used.as_micros()).unwrap_or(u64::MAX)),
            disk_peak_bytes: disk_peak.load(Ordering::Relaxed),
            network_bytes: network_bytes.load(Ordering::Relaxed),
        };
        if let Err(error) = serde_json::to_vec(&usage)
            .map_err(io::Error::from)
            .and_then(|bytes| fs::write(job_dir.join(USAGE_FILE), bytes))
        {
            warn!(job = %request.id, %error, "cannot record what the job used");
        }
        let _ = shim.start_kill();
        if tokio::time::timeout(Duration::from_secs(10), shim.wait()).await.is_err() {
            warn!(job = %request.id, "the sandbox did not exit after being killed");
        }
        for pump in pumps {
            let abort = pump.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
                abort.abort();
                warn!(job = %request.id, "the job's follower stopped reading; the rest of its output is in the logs");
            }
        }
        killed.context("killing the job")?;
        debug!(job = %request.id, ?ending, "job ended");
        Ok(self.verdict(ending, spec, job_dir, cgroup))
    }

    fn verdict(&self, ending: Ending, spec: &JobSpec, job_dir: &Path, cgroup: &JobCgroup) -> JobState {
        let failed = |reason: String| JobState::Failed { reason };
        match ending {
            Ending::Cancelled(reason) => JobState::Cancelled { reason },
            Ending::TimedOut => {
                let mut reason =
                    format!("time limit of {} exceeded", humantime::format_duration(spec.limits.time));
                let hits = cgroup.pids_limit_hits();
                if hits > 0 {
                    reason.push_str(&format!(
                        " (it also hit the limit of {MAX_PROCESSES} processes {hits} times)"
                    ));
                }
                failed(reason)
            }
            Ending::DiskFull(used) => failed(format!(
                "disk limit of {} exceeded (over {} in /out, /work, /tmp and the logs)",
                ByteSize(spec.resources.disk_bytes),
                ByteSize(used)
            )),
            Ending::Hidden(path) => failed(format!(
                "the job made {} unreadable, so its disk use could not be checked",
                path.strip_prefix(job_dir.join(sandbox::SCRATCH)).unwrap_or(&path).display()
            )),
            Ending::Exited(status) => {
                use std::os::unix::process::ExitStatusExt;
                if cgroup.oom_kills() > 0 {
                    return failed(format!(
                        "memory limit of {} exceeded; the kernel killed the job",
                        ByteSize(spec.resources.memory_bytes)
                    ));
                }
                let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                if code == sandbox::SETUP_FAILED {
                    let reason = fs::read_to_string(job_dir.join(sandbox::ERROR_FILE)).unwrap_or_default();
                    if !reason.trim().is_empty() {
                        return failed(reason.trim().to_owned());
                    }
                }
                JobState::Finished { exit_code: code }
            }
        }
    }
}

#[derive(Debug)]
enum Ending {
    Exited(std::process::ExitStatus),
    TimedOut,
    DiskFull(u64),
    Hidden(PathBuf),
    Cancelled(Option<String>),
}

/// Whether the job folder `name` is a `hearth run --local` (`local-<seconds>-<pid>`) whose
/// process still runs: its folder is in use by it, not left by a dead run.
fn local_run_alive(name: &str) -> bool {
    name.strip_prefix("local-")
        .and_then(|rest| rest.rsplit_once('-'))
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Makes everything a dead job left the agent's again (reporting what could not be), leaves in
/// its outputs only regular files and folders without setuid, setgid or sticky bits, moves them
/// from the scratch to the job folder's `out/`, and removes the scratch. When the outputs cannot
/// be made safe, or their files at their full size (sparse files count whole) add up to more than
/// the job's `disk`, none are kept and the reason is returned: no import then multiplies a few
/// allocated blocks into gigabytes of blob store.
fn clean_up(job_dir: &Path, disk: u64) -> Result<(), String> {
    let scratch_dir = job_dir.join(sandbox::SCRATCH);
    if let Err(error) = scratch::reclaim(&scratch_dir) {
        warn!(dir = %scratch_dir.display(), %error, "cannot reclaim a job's scratch");
    }
    let (scratch_out, out) = (scratch_dir.join("out"), job_dir.join("out"));
    let outputs = match scratch::sanitize_outputs(&scratch_out) {
        Ok(done) => {
            if done != scratch::Sanitized::default() {
                debug!(removed = done.removed, cleared = done.cleared, "outputs made safe");
            }
            match scratch::logical_size(&scratch_out, disk) {
                Ok(size) if size > disk => Err(format!(
                    "its outputs add up to more than its disk of {} at their full size (sparse files \
                     count whole); none are kept",
                    ByteSize(disk)
                )),
                Ok(_) => scratch::move_outputs(&scratch_out, &out)
                    .map_err(|error| format!("its outputs could not be kept ({error}); none are")),
                Err(error) => Err(format!("its outputs could not be measured ({error}); none are kept")),
            }
        }
        Err(error) => Err(format!("its outputs could not be made safe ({error}); none are kept")),
    };
    if outputs.is_err() {
        let _ = fs::remove_dir_all(&out).and_then(|()| fs::create_dir(&out));
    }
    if let Err(error) = remove_scratch(job_dir) {
        warn!(dir = %job_dir.display(), %error, "cannot remove a job's scratch");
    }
    outputs
}

/// Removes a dead job's `root/` and scratch (unmounting its image).
fn remove_scratch(job_dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(job_dir.join("root")) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    disk::remove(job_dir)
}

/// Measures the scratch and the job's two log files every [`DISK_CHECK`] on the blocking pool,
/// apart from the watch loop so a slow walk never delays a cancel or a deadline; returns once the
/// job is over its limit. The logs are the job's writing too, so they count against its disk.
async fn watch_disk(job_dir: PathBuf, limit: u64, peak: Arc<AtomicU64>) -> Ending {
    let dirs = disk::WRITABLE.map(|name| job_dir.join(sandbox::SCRATCH).join(name));
    let logs = [Stream::Stdout, Stream::Stderr].map(|stream| job_dir.join(stream.file_name()));
    loop {
        tokio::time::sleep(DISK_CHECK).await;
        let (dirs, logs) = (dirs.clone(), logs.clone());
        let result = tokio::task::spawn_blocking(move || {
            let logged: u64 =
                logs.iter().filter_map(|log| fs::metadata(log).ok()).map(|m| m.blocks() * 512).sum();
            scratch::usage(&dirs, limit.saturating_sub(logged)).map(|used| used.saturating_add(logged))
        })
        .await;
        if let Ok(Ok(used)) = &result {
            peak.fetch_max(*used, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(used)) if used > limit => return Ending::DiskFull(used),
            Ok(Err(scratch::Unmeasurable::Hidden(path))) => return Ending::Hidden(path),
            _ => {}
        }
    }
}

/// Samples the job's network counters every [`DISK_CHECK`] while it runs, for a job that does not
/// end on its own (the shim, killed with it, then leaves no last count).
async fn watch_network(shim: i32, bytes: Arc<AtomicU64>) {
    loop {
        tokio::time::sleep(DISK_CHECK).await;
        bytes.fetch_max(network_counters(shim), Ordering::Relaxed);
    }
}

/// Bytes received plus sent on every interface but loopback of the network namespace `pid` is
/// in (`/proc/PID/net/dev`); 0 when it cannot be read.
fn network_counters(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/net/dev")).map_or(0, |text| net_dev_bytes(&text))
}

/// The sum of the receive and transmit byte counts of `/proc/net/dev`'s text, loopback aside.
fn net_dev_bytes(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .filter_map(|(_, counters)| {
            let fields: Vec<u64> = counters.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
            Some(fields.first()?.saturating_add(*fields.get(8)?))
        })
        .fold(0, u64::saturating_add)
}

/// Runs a blocking cgroup operation off the async threads, timing it.
async fn blocking(
    cgroup: &Arc<JobCgroup>,
    operation: fn(&JobCgroup) -> Result<(), cgroup::CgroupError>,
) -> anyhow::Result<Duration> {
    let cgroup = Arc::clone(cgroup);
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        operation(&cgroup)?;
        Ok(start.elapsed())
    })
    .await?
}

fn spec_module_name(kind: &JobKind) -> String {
    match kind {
        JobKind::Wasi { module } => module
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "job.wasm".into()),
        JobKind::Native { .. } => String::new(),
    }
}

/// Copies each input into the job's `in/` under its own name, owned by `owner` when the job's root
/// is not the agent's user (so a file only its owner may read is the job's to read too). Symlinks
/// are copied as links, never followed, so an input cannot smuggle in a file it points to.
fn stage_inputs(inputs: &[PathBuf], into: &Path, owner: Option<u32>) -> anyhow::Result<()> {
    for input in inputs {
        let name =
            input.file_name().with_context(|| format!("input {} has no file name", input.display()))?;
        copy_tree(input, &into.join(name), owner)
            .with_context(|| format!("staging input {}", input.display()))?;
    }
    Ok(())
}

/// The bytes of the regular files in `path` (a file, or a folder and all below it, links not
/// followed), at their logical size.
fn tree_bytes(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    fs::read_dir(path)?.try_fold(0u64, |sum, entry| Ok(sum.saturating_add(tree_bytes(&entry?.path())?)))
}

fn copy_tree(from: &Path, to: &Path, owner: Option<u32>) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if meta.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()), owner)?;
        }
    } else {
        fs::copy(from, to)?;
    }
    match owner {
        Some(id) => std::os::unix::fs::lchown(to, Some(id), Some(id)),
        None => Ok(()),
    }
}

/// What runs, prepared on this machine.
struct Prepared {
    payload: Payload,
    /// The job's environment before the grants add theirs: the spec's, laid over the image's
    /// `Env` for a native job from an image archive.
    env: BTreeMap<String, String>,
}

/// What the shim needs to build the job's sandbox.
fn sandbox_plan(
    request: &Job,
    job_dir: &Path,
    prepared: Prepared,
    cgroup: &JobCgroup,
    network: Option<NetworkPlan>,
    driver: DriverFiles,
    ids: IdMap,
) -> Plan {
    let Prepared { payload, mut env } = prepared;
    let mut devices = Vec::new();
    if !request.gpus.is_empty() {
        let uuids: Vec<&str> = request.gpus.iter().map(|gpu| gpu.uuid.as_str()).collect();
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), uuids.join(","));
        env.insert("CUDA_VISIBLE_DEVICES".into(), uuids.join(","));
        devices = gpu_devices(&request.gpus);
        if !devices.is_empty() {
            // The driver's folders come first, so an image's stale copy of a driver library
            // never shadows the one matching the kernel module.
            prepend_path(&mut env, "LD_LIBRARY_PATH", &DriverFiles::library_dir(), "");
            prepend_path(&mut env, "PATH", &DriverFiles::program_dir(), sandbox::DEFAULT_PATH);
        }
    }
    Plan {
        job_dir: job_dir.to_owned(),
        ids,
        cgroups: cgroup.join_dirs(),
        payload,
        env,
        devices,
        driver,
        disk_bytes: request.spec.resources.disk_bytes,
        agent_pid: std::process::id(),
        network,
    }
}

/// Puts `dir` in front of the colon-separated list `key` (or of `default` when it is unset).
fn prepend_path(env: &mut BTreeMap<String, String>, key: &str, dir: &str, default: &str) {
    let rest = env.get(key).map_or(default, String::as_str);
    let value = if rest.is_empty() { dir.to_owned() } else { format!("{dir}:{rest}") };
    env.insert(key.to_owned(), value);
}

/// The device nodes for granted GPUs: each real GPU's own node, plus the control and
/// unified-memory nodes every CUDA program opens, where they exist; none for fake GPUs alone.
fn gpu_devices(gpus: &[GpuGrant]) -> Vec<PathBuf> {
    let mut devices: Vec<PathBuf> = gpus
        .iter()
        .filter_map(|gpu| match gpu.device {
            GpuDevice::Node { minor_number } => Some(PathBuf::from(format!("/dev/nvidia{minor_number}"))),
            GpuDevice::Fake => None,
        })
        .collect();
    if devices.is_empty() {
        return devices;
    }
    for shared in ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
        if Path::new(shared).exists() {
            devices.push(PathBuf::from(shared));
        }
    }
    devices
}

/// Copies one output stream into its log file, up to [`LOG_LIMIT`], and onto the event channel.
///
/// Every write is flushed before its [`RunEvent::Logged`] goes out, so whoever reads the file on
/// that event finds the bytes. A job that writes fast gets one `Logged` per stream every
/// [`LOGGED_EVERY`] at most (the last length always goes out), not one per write; once the log is
/// full it grows no more, and so sends no more.
async fn pump(
    mut reader: impl AsyncRead + Unpin,
    stream: Stream,
    path: PathBuf,
    events: mpsc::Sender<RunEvent>,
) -> io::Result<()> {
    let mut file = tokio::fs::File::create(&path).await?;
    // The job's own bytes kept, and the file's length (with the truncation note).
    let (mut written, mut length) = (0u64, 0u64);
    let mut truncated = false;
    let mut buffer = vec![0u8; 16 << 10];
    // Whether the file grew since the last `Logged`, and when the next one may go.
    let mut unsaid = false;
    let mut next_say = tokio::time::Instant::now();
    loop {
        let n = tokio::select! {
            // Cancel-safe: a read that loses the race has read nothing.
            read = reader.read(&mut buffer) => read?,
            () = tokio::time::sleep_until(next_say), if unsaid => {
                let _ = events.send(RunEvent::Logged { stream, length }).await;
                unsaid = false;
                next_say = tokio::time::Instant::now() + LOGGED_EVERY;
                continue;
            }
        };
        if n == 0 {
            break;
        }
        let data = &buffer[..n];
        let room = usize::try_from(LOG_LIMIT.saturating_sub(written)).unwrap_or(usize::MAX);
        let before = length;
        if room > 0 {
            let keep = &data[..n.min(room)];
            file.write_all(keep).await?;
            written += keep.len() as u64;
            length += keep.len() as u64;
        } else if !truncated {
            truncated = true;
            let note = format!("\n[hearth: output beyond {} not kept]\n", ByteSize(LOG_LIMIT));
            file.write_all(note.as_bytes()).await?;
            length += note.len() as u64;
        }
        if length != before {
            // A tokio file writes in the background: the bytes are in the file once flushed.
            file.flush().await?;
            unsaid = true;
        }
        let _ = events.send(RunEvent::Output { stream, data: data.to_vec() }).await;
        let now = tokio::time::Instant::now();
        if unsaid && now >= next_say {
            let _ = events.send(RunEvent::Logged { stream, length }).await;
            unsaid = false;
            next_say = now + LOGGED_EVERY;
        }
    }
    file.flush().await?;
    if unsaid {
        let _ = events.send(RunEvent::Logged { stream, length }).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_counters_add_both_directions_of_every_interface_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:  500000     100    0    0    0     0          0         0   500000     100    0    0    0     0       0          0\n  \
            tap0:    1200      10    0    0    0     0          0         0      345       5    0    0    0     0       0          0\n";
        assert_eq!(net_dev_bytes(text), 1545);
        assert_eq!(net_dev_bytes(""), 0);
    }
}
