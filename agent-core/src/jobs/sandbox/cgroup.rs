//! A job's cgroup: CPU, memory and pid limits, the freezer, the kill, and what the kernel counted.
//!
//! Two layouts, one interface. Under cgroup v2 (most desktops) the job gets one folder below the
//! agent's own cgroup, which must be delegated to the agent's user (a systemd service with
//! `Delegate=yes`, or `systemd-run --user --scope -p Delegate=yes`). v2 forbids processes in a
//! cgroup whose children have controllers, so the agent first moves itself into a `hearth-agent`
//! leaf beside its jobs. Under cgroup v1 (older hosts, many containers) the job gets one folder per
//! controller: `cpu`, `memory`, `pids`, and `freezer` where mounted; without a v1 freezer, pausing
//! falls back to SIGSTOP of every process in the cgroup.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where cgroups are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The CFS period used for CPU quotas.
const CPU_PERIOD_US: u64 = 100_000;

/// How long freezing, or emptying on kill, may take before it is an error.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a job's cgroup enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Thousandths of a core.
    pub cpu_millis: u32,
    /// Memory in bytes, swap included where the kernel accounts it.
    pub memory_bytes: u64,
    /// The most processes and threads at once.
    pub pids: u64,
}

/// Why no cgroup could be made for a job.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither layout is usable here.
    #[error(
        "no writable cgroup for the job's limits: {0}. Run the agent as root, as a systemd service \
         with Delegate=yes, or under `systemd-run --user --scope -p Delegate=yes`"
    )]
    Unavailable(String),
    /// A cgroup file could not be written.
    #[error("cgroup {}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_owned(), source }
}

/// One job's cgroup, removed by [`JobCgroup::destroy`].
#[derive(Debug)]
pub struct JobCgroup {
    layout: Layout,
}

#[derive(Debug)]
enum Layout {
    V2 { dir: PathBuf },
    V1 { cpu: PathBuf, memory: PathBuf, pids: PathBuf, freezer: Option<PathBuf>, cpuacct: Option<PathBuf> },
}

impl JobCgroup {
    /// Creates the cgroup for job `name` with these limits. Its folder is named after this agent's
    /// pid too (`a<pid>-<name>`), so job cgroups left by an agent that died (SIGKILL, a crash, even
    /// while a job was frozen) are recognised and removed here, by the next job of any agent.
    pub fn create(name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        let name = &format!("a{}-{name}", std::process::id());
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|error| CgroupError::Unavailable(format!("cannot read /proc/self/cgroup: {error}")))?;
        let root = Path::new(CGROUP_ROOT);
        let layout = if root.join("cgroup.controllers").exists() {
            Layout::V2 { dir: create_v2(root, &own, name)? }
        } else {
            let dir = |controller: &str| -> Result<Option<PathBuf>, CgroupError> {
                let mount = root.join(controller);
                if !mount.join("cgroup.procs").exists() {
                    return Ok(None);
                }
                let base = own_path(&own, controller)
                    .map(|path| mount.join(path.trim_start_matches('/')))
                    .filter(|path| path.is_dir())
                    .unwrap_or(mount);
                sweep_orphans(&base.join("hearth"));
                let dir = base.join("hearth").join(name);
                fs::create_dir_all(&dir).map_err(|error| {
                    CgroupError::Unavailable(format!("cannot create {}: {error}", dir.display()))
                })?;
                Ok(Some(dir))
            };
            let required = |controller: &str| {
                dir(controller)?.ok_or_else(|| {
                    CgroupError::Unavailable(format!("the v1 `{controller}` controller is not mounted"))
                })
            };
            Layout::V1 {
                cpu: required("cpu")?,
                memory: required("memory")?,
                pids: required("pids")?,
                freezer: dir("freezer")?,
                // Where `cpuacct` is its own hierarchy, so the jobs' CPU time can be read.
                cpuacct: dir("cpuacct")?.filter(|dir| !dir.join("cpu.cfs_quota_us").exists()),
            }
        };
        let cgroup = Self { layout };
        if let Err(error) = cgroup.set_limits(limits) {
            // Nothing has joined yet: the folders can go at once.
            for dir in cgroup.join_dirs() {
                let _ = fs::remove_dir(dir);
            }
            return Err(error);
        }
        Ok(cgroup)
    }

    fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        match &self.layout {
            Layout::V2 { dir } => {
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                write_if_present(&dir.join("memory.swap.max"), "0")?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            Layout::V1 { cpu, memory, pids, .. } => {
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&memory.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                // memory+swap, so swapping out does not stretch the limit; absent without swap
                // accounting.
                write_if_present(
                    &memory.join("memory.memsw.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// The folders a process joins to be inside this cgroup (`cgroup.procs` in each).
    pub fn join_dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { dir } => vec![dir.clone()],
            Layout::V1 { cpu, memory, pids, freezer, cpuacct } => {
                [Some(cpu), Some(memory), Some(pids), freezer.as_ref(), cpuacct.as_ref()]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect()
            }
        }
    }

    fn procs_dir(&self) -> &Path {
        match &self.layout {
            Layout::V2 { dir } => dir,
            Layout::V1 { pids, .. } => pids,
        }
    }

    /// The host pids of every process in the cgroup.
    pub fn processes(&self) -> Vec<i32> {
        let file = self.procs_dir().join("cgroup.procs");
        fs::read_to_string(file)
            .map(|text| text.lines().filter_map(|line| line.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Stops every process of the job and returns once all are stopped.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { dir } => {
                write(&dir.join("cgroup.freeze"), "1")?;
                settle(|| read_key(&dir.join("cgroup.events"), "frozen") == Some(1))
            }
            Layout::V1 { freezer: Some(dir), .. } => {
                write(&dir.join("freezer.state"), "FROZEN")?;
                settle(|| {
                    fs::read_to_string(dir.join("freezer.state")).is_ok_and(|state| state.trim() == "FROZEN")
                })
            }
            Layout::V1 { freezer: None, .. } => {
                // Without a freezer: stop what is there until nothing new appears. A process forked
                // in between is caught on the next pass.
                let mut stopped = Vec::new();
                settle(|| {
                    let now = self.processes();
                    let fresh: Vec<i32> = now.iter().copied().filter(|pid| !stopped.contains(pid)).collect();
                    for &pid in &fresh {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                    }
                    stopped.extend(fresh.iter().copied());
                    fresh.is_empty()
                })
            }
        }
    }

    /// Lets a frozen job run again.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { dir } => {
                write(&dir.join("cgroup.freeze"), "0")?;
                settle(|| read_key(&dir.join("cgroup.events"), "frozen") == Some(0))
            }
            Layout::V1 { freezer: Some(dir), .. } => {
                write(&dir.join("freezer.state"), "THAWED")?;
                settle(|| {
                    fs::read_to_string(dir.join("freezer.state")).is_ok_and(|state| state.trim() == "THAWED")
                })
            }
            Layout::V1 { freezer: None, .. } => {
                for pid in self.processes() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                }
                Ok(())
            }
        }
    }

    /// Kills every process of the job, frozen or not, and returns once the cgroup is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let Layout::V2 { dir } = &self.layout {
            let kill_file = dir.join("cgroup.kill");
            if kill_file.exists() {
                write(&kill_file, "1")?;
                return settle(|| self.processes().is_empty());
            }
        }
        // Freeze first so nothing forks between reading the list and the signals landing; a
        // SIGKILL to a frozen task takes effect on thaw. Thaw whether or not the freeze settled:
        // a cgroup left FREEZING would keep its killed processes forever.
        let _ = self.freeze();
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.thaw()?;
        settle(|| {
            let left = self.processes();
            for &pid in &left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            left.is_empty()
        })
    }

    /// How many times the kernel's OOM killer killed a process of this job.
    pub fn oom_kills(&self) -> u64 {
        match &self.layout {
            Layout::V2 { dir } => read_key(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
            Layout::V1 { memory, .. } => {
                read_key(&memory.join("memory.oom_control"), "oom_kill").unwrap_or(0)
            }
        }
    }

    /// The CPU time every process of the job has used so far (v2 `cpu.stat` `usage_usec`, v1
    /// `cpuacct.usage`); `None` where the hierarchy does not count it.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match &self.layout {
            Layout::V2 { dir } => read_key(&dir.join("cpu.stat"), "usage_usec").map(Duration::from_micros),
            Layout::V1 { cpu, cpuacct, .. } => {
                let dir = cpuacct.as_ref().unwrap_or(cpu);
                let nanos = fs::read_to_string(dir.join("cpuacct.usage")).ok()?;
                Some(Duration::from_nanos(nanos.trim().parse().ok()?))
            }
        }
    }

    /// How many forks were refused at the pid limit.
    pub fn pids_limit_hits(&self) -> u64 {
        let dir = match &self.layout {
            Layout::V2 { dir } => dir,
            Layout::V1 { pids, .. } => pids,
        };
        read_key(&dir.join("pids.events"), "max").unwrap_or(0)
    }

    /// Kills what is left and removes the cgroup's folders.
    pub fn destroy(self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for dir in self.join_dirs() {
            fs::remove_dir(&dir).map_err(io_error(&dir))?;
        }
        Ok(())
    }
}

/// The CPU time all of this machine's Hearth jobs have used, as the cgroups count it: the sum
/// over every job cgroup, live or gone, of this agent's cgroup parent. `None` where it cannot be
/// read (no cgroup accounting, or no job has run yet).
pub fn jobs_cpu_time() -> Option<Duration> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        // v2: the jobs and the agent's `hearth-agent` leaf share a parent.
        let leaf = root.join(own_path(&own, "")?.trim_start_matches('/'));
        if leaf.file_name()? != "hearth-agent" {
            return None;
        }
        let usage = |dir: &Path| read_key(&dir.join("cpu.stat"), "usage_usec");
        let jobs = usage(leaf.parent()?)?.saturating_sub(usage(&leaf)?);
        return Some(Duration::from_micros(jobs));
    }
    // v1: every controller's `cpuacct.usage` in nanoseconds, with cpu and cpuacct mounted
    // together or apart.
    ["cpuacct", "cpu"].iter().find_map(|controller| {
        let mount = root.join(controller);
        let base = own_path(&own, controller)
            .map(|path| mount.join(path.trim_start_matches('/')))
            .filter(|path| path.is_dir())
            .unwrap_or(mount);
        let nanos = fs::read_to_string(base.join("hearth").join("cpuacct.usage")).ok()?;
        Some(Duration::from_nanos(nanos.trim().parse().ok()?))
    })
}

/// The v2 job folder below the agent's own cgroup, after making sure controllers are delegated.
fn create_v2(root: &Path, own: &str, name: &str) -> Result<PathBuf, CgroupError> {
    let path = own_path(own, "")
        .ok_or_else(|| CgroupError::Unavailable("no v2 entry in /proc/self/cgroup".into()))?;
    let base = root.join(path.trim_start_matches('/'));
    let wanted = ["cpu", "memory", "pids"];
    let enabled = |base: &Path| {
        let text = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
        wanted.iter().all(|controller| text.split_whitespace().any(|word| word == *controller))
    };
    if !enabled(&base) {
        let unavailable = |what: &str, error: io::Error| {
            CgroupError::Unavailable(format!("{what} in {} failed: {error}", base.display()))
        };
        // Leave room for controllers: no process may sit in a cgroup whose children have them.
        if base != root {
            let leaf = base.join("hearth-agent");
            fs::create_dir_all(&leaf).map_err(|error| unavailable("creating hearth-agent", error))?;
            fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
                .map_err(|error| unavailable("moving the agent into hearth-agent", error))?;
        }
        let change: Vec<String> = wanted.iter().map(|controller| format!("+{controller}")).collect();
        fs::write(base.join("cgroup.subtree_control"), change.join(" "))
            .map_err(|error| unavailable("enabling cpu, memory and pids", error))?;
    }
    sweep_orphans(&base);
    let dir = base.join(format!("hearth-job-{name}"));
    fs::create_dir_all(&dir)
        .map_err(|error| CgroupError::Unavailable(format!("cannot create {}: {error}", dir.display())))?;
    Ok(dir)
}

/// Kills and removes the job cgroups of agents that are no longer running, where this agent's
/// jobs would go: at the agent's start, so the jobs of a run that died (a frozen one included)
/// are ended before the agent says it is ready, not when some later job starts.
pub fn sweep_dead_agents() {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else { return };
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        let Some(path) = own_path(&own, "") else { return };
        let base = root.join(path.trim_start_matches('/'));
        // Jobs are siblings of the agent's `hearth-agent` leaf, or children of where it starts.
        let parent = if base.file_name().is_some_and(|name| name == "hearth-agent") {
            base.parent().map(Path::to_owned).unwrap_or(base)
        } else {
            base
        };
        sweep_orphans(&parent);
        return;
    }
    for controller in ["cpu", "memory", "pids", "freezer", "cpuacct"] {
        let mount = root.join(controller);
        let base = own_path(&own, controller)
            .map(|path| mount.join(path.trim_start_matches('/')))
            .filter(|path| path.is_dir())
            .unwrap_or(mount);
        sweep_orphans(&base.join("hearth"));
    }
}

/// Kills and removes the job cgroups under `parent` whose agent is no longer running.
fn sweep_orphans(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(agent) = name.to_str().and_then(agent_of) else { continue };
        // Any live process with that pid counts (the agent may be a library user, not `hearth`):
        // a reused pid only delays the sweep.
        if Path::new(&format!("/proc/{agent}")).exists() {
            continue;
        }
        let dir = entry.path();
        // v1 keeps one folder per controller; each is swept where it is found.
        let layout = if dir.join("cgroup.freeze").exists() || dir.join("cgroup.kill").exists() {
            Layout::V2 { dir: dir.clone() }
        } else {
            Layout::V1 {
                cpu: dir.clone(),
                memory: dir.clone(),
                pids: dir.clone(),
                freezer: None,
                cpuacct: None,
            }
        };
        // Thaw first: a SIGKILL to a process frozen by the v1 freezer waits for the thaw.
        if let Some(freezer) = sibling(&dir, "freezer") {
            let _ = fs::write(freezer.join("freezer.state"), "THAWED");
        }
        let _ = JobCgroup { layout }.kill_all();
        if fs::remove_dir(&dir).is_ok() {
            tracing::info!(cgroup = %dir.display(), "removed the cgroup of a job whose agent died");
        }
    }
}

/// The agent pid in a job cgroup's folder name (`a<pid>-<id>` or `hearth-job-a<pid>-<id>`).
fn agent_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("hearth-job-").unwrap_or(name).strip_prefix('a')?;
    rest.split_once('-')?.0.parse().ok()
}

/// For a v1 folder under `/sys/fs/cgroup/<controller>/…`, the same folder in another hierarchy.
fn sibling(dir: &Path, controller: &str) -> Option<PathBuf> {
    let relative = dir.strip_prefix(CGROUP_ROOT).ok()?;
    let mut parts = relative.components();
    parts.next()?;
    let other = Path::new(CGROUP_ROOT).join(controller).join(parts.as_path());
    other.is_dir().then_some(other)
}

/// This process's path in the hierarchy holding `controller` (`""` for v2) from /proc/self/cgroup.
fn own_path<'a>(own: &'a str, controller: &str) -> Option<&'a str> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|name| name == controller)
        };
        matches.then_some(path)
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_error(path))
}

fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() { write(path, value) } else { Ok(()) }
}

/// The number after `key` in a flat-keyed cgroup file such as `memory.events`.
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

/// Polls `done` until it holds, for at most [`SETTLE_TIMEOUT`]. The first checks come quickly: a
/// freeze usually settles in well under a millisecond.
fn settle(mut done: impl FnMut() -> bool) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    while !done() {
        if start.elapsed() > SETTLE_TIMEOUT {
            return Err(CgroupError::Io {
                path: PathBuf::from(CGROUP_ROOT),
                source: io::Error::new(io::ErrorKind::TimedOut, "the cgroup did not settle in 5 s"),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/a30a\n2:cpuacct:/\n1:cpu:/\n0::/user.slice/x.scope\n";

    #[test]
    fn finds_each_controllers_path() {
        assert_eq!(own_path(HYBRID, "memory"), Some("/process_api/a30a"));
        assert_eq!(own_path(HYBRID, "cpu"), Some("/"));
        assert_eq!(own_path(HYBRID, ""), Some("/user.slice/x.scope"));
        assert_eq!(own_path(HYBRID, "freezer"), None);
        assert_eq!(own_path("3:cpu,cpuacct:/a\n", "cpuacct"), Some("/a"));
    }

    #[test]
    fn job_folders_name_their_agent() {
        assert_eq!(agent_of("a123-local-1-2"), Some(123));
        assert_eq!(agent_of("hearth-job-a77-abcdef"), Some(77));
        assert_eq!(agent_of("hearth-agent"), None);
        assert_eq!(agent_of("local-1-2"), None);
    }

    #[test]
    fn reads_flat_keyed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("memory.events");
        fs::write(&file, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").expect("write");
        assert_eq!(read_key(&file, "oom_kill"), Some(2));
        assert_eq!(read_key(&file, "oom"), Some(1));
        assert_eq!(read_key(&file, "absent"), None);
    }
}
