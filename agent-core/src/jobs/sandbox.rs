//! The one containment every job runs in, WASI and native alike.
//!
//! A job is three processes deep below the agent:
//!
//! ```text
//! agent (runner.rs)          creates the job's cgroup, spawns the shim, watches, freezes, kills
//!  └─ shim   (`__sandbox-shim`)   joins the cgroup, then unshares user, pid, net, ipc, uts and
//!      │                          cgroup namespaces, whose ids are mapped (see [`ids`])
//!      └─ init (forked)           pid 1 of the new pid namespace: builds a private root in a new
//!          │                      mount namespace, pivots into it, sets rlimits, drops every
//!          │                      capability, sets no_new_privs and loads the seccomp filter
//!          └─ the job             a native command, or (for WASI) wasmtime inside init itself
//! ```
//!
//! The shim joins the cgroup before it does anything else, so nothing of the job ever runs outside
//! it: CPU, memory and pid limits, the freezer and the kill all see every process. Each process sets
//! `PR_SET_PDEATHSIG` to SIGKILL, so the agent's death takes the shim, the shim's takes init, and
//! the kernel kills everything in a pid namespace when its init dies: a double-forked daemon cannot
//! outlive its job. Init stays pid 1 for native jobs, reaps orphans, and ends the namespace as soon
//! as the job's main process exits.
//!
//! The shim and init are plain synchronous code: `unshare(CLONE_NEWUSER)` and a safe `fork` need a
//! single-threaded process, so the binary dispatches to the shim before anything starts a thread
//! (see `main.rs`), and init is a fork of the shim. The shim reads its instructions from a [`Plan`]
//! file the runner wrote into the job's folder, and runs there: everything init needs from
//! the host is opened by the shim, and init names the job folder's contents by relative paths, so
//! neither needs the agent's data folder to be open to the job's users, and the job sees no host
//! path in `/proc/1/cmdline`. When they fail before the job runs, they write the reason to [`ERROR_FILE`] and exit with
//! [`SETUP_FAILED`], so the runner reports "sandbox setup failed: …" instead of an exit code.

pub mod cgroup;
pub mod dns;
pub mod ids;
pub mod network;
pub mod nvidia;
mod rootfs;
mod seccomp;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sched::CloneFlags;
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// Exit code of the shim or init when the sandbox could not be set up; the reason is in
/// [`ERROR_FILE`]. The same number `docker run` uses for its own failures.
pub const SETUP_FAILED: i32 = 125;

/// The file in the job folder where the shim and init write why setup failed.
pub const ERROR_FILE: &str = "sandbox-error";

/// The plan file in the job folder.
pub const PLAN_FILE: &str = "sandbox.json";

/// The file in the job folder where slirp4netns, for a job granted network, writes what it says.
pub const NETWORK_LOG: &str = "network.log";

/// The folder in the job folder holding `out`, `work` and `tmp`, all the job may write, and
/// `in`, its inputs.
pub const SCRATCH: &str = "scratch";

/// The resolver file a job granted network gets, written by the shim into the job folder.
const RESOLV_CONF: &str = "resolv.conf";

/// The hidden subcommand that runs [`shim_main`].
pub const SHIM_COMMAND: &str = "__sandbox-shim";

/// Host name inside every sandbox.
const HOSTNAME: &str = "hearth-job";

/// A native job's `PATH` unless its spec sets one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Open files a job may hold.
const MAX_OPEN_FILES: u64 = 4096;

/// Everything the shim and init need, written by the runner as JSON into the job folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The job folder on the host, holding `root` and [`SCRATCH`].
    pub job_dir: PathBuf,
    /// Who the job's users are on the host.
    pub ids: ids::IdMap,
    /// The cgroup folders the shim joins (one for v2, one per controller for v1).
    pub cgroups: Vec<PathBuf>,
    /// What runs.
    pub payload: Payload,
    /// The job's environment, besides `PATH` and `HOME`.
    pub env: BTreeMap<String, String>,
    /// Device nodes passed through (granted GPUs and their control nodes).
    pub devices: Vec<PathBuf>,
    /// The host's NVIDIA driver libraries and programs, for a job granted GPUs.
    pub driver: nvidia::DriverFiles,
    /// The scratch disk limit; also the largest file the job may write.
    pub disk_bytes: u64,
    /// The agent's pid: the shim's parent, which it checks is still alive.
    pub agent_pid: u32,
    /// Outbound network, when granted; without it the job's namespace has only loopback.
    pub network: Option<network::NetworkPlan>,
}

/// What runs inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// A program from the root filesystem.
    Native {
        /// Where the root filesystem comes from.
        root: RootFs,
        /// Program and arguments.
        command: Vec<String>,
        /// The folder it starts in: `/work`, or the image's `WorkingDir` when the image's own
        /// command runs.
        workdir: PathBuf,
    },
    /// A WASI module, run by wasmtime inside init.
    Wasi {
        /// The module compiled for this engine (see [`crate::jobs::wasi`]).
        compiled: PathBuf,
        /// `argv[0]` and the arguments.
        args: Vec<String>,
        /// The most linear memory the module may grow to.
        memory_bytes: u64,
        /// Running time before epoch interruption stops the module.
        time: Duration,
    },
}

/// A native job's root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", content = "path", rename_all = "snake_case")]
pub enum RootFs {
    /// The host's `/usr`, `/bin`, `/lib` and friends, read-only, and nothing else of the host.
    Base,
    /// An unpacked image folder, read-only.
    Image(PathBuf),
}

impl Plan {
    /// Reads a plan file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn error_file(&self) -> PathBuf {
        self.job_dir.join(ERROR_FILE)
    }
}

/// A program on `PATH`, or in the system folders a daemon's `PATH` may leave out.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Records a setup failure where the runner will find it, and returns [`SETUP_FAILED`].
fn setup_failed(error_file: &Path, error: &anyhow::Error) -> ExitCode {
    let line = format!("{error:#}");
    // If even this fails the runner still sees SETUP_FAILED and says so without details.
    let _ = File::create(error_file).and_then(|mut file| file.write_all(line.as_bytes()));
    ExitCode::from(SETUP_FAILED as u8)
}

/// The file in the job folder where the shim leaves the job's network counters (the text of
/// `/proc/net/dev` in its namespace) once init has exited, when network was granted.
pub const NETWORK_COUNTERS: &str = "network-counters";

/// The shim: joins the cgroup, enters new namespaces, and runs init as their pid 1.
pub fn shim_main(plan_path: &Path) -> ExitCode {
    let plan = match Plan::load(plan_path) {
        Ok(plan) => plan,
        Err(error) => {
            let fallback = plan_path.with_file_name(ERROR_FILE);
            return setup_failed(&fallback, &error);
        }
    };
    match shim(&plan) {
        Ok(code) => ExitCode::from(code as u8),
        Err(error) => setup_failed(&plan.error_file(), &error),
    }
}

fn shim(plan: &Plan) -> anyhow::Result<i32> {
    prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    // The agent may have died between spawning us and the line above (we would then have been
    // re-parented, to init or to a subreaper such as systemd --user).
    if nix::unistd::getppid().as_raw() as u32 != plan.agent_pid {
        bail!("the agent exited before the job started");
    }
    let pid = std::process::id().to_string();
    for dir in &plan.cgroups {
        fs::write(dir.join("cgroup.procs"), &pid)
            .with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    // What init needs of the host, opened while the shim still can: with mapped ids, the job's
    // root may not even enter the agent's data folder. Init inherits the working folder.
    std::env::set_current_dir(&plan.job_dir).context("entering the job folder")?;
    let host = HostFiles::open(plan)?;
    // Forked while the shim is still in the host's namespaces, where slirp4netns must run.
    let network = match &plan.network {
        Some(network) => Some(network::fork_helper(network, &plan.job_dir.join(NETWORK_LOG))?),
        None => None,
    };
    // The socket the job's DNS queries leave from, made while the shim is in the host's network.
    let upstream = match plan.network.as_ref().and_then(|network| network.upstream) {
        Some(resolver) => Some(dns::upstream(resolver)?),
        None => None,
    };
    let mapper = ids::prepare(plan.ids)?;
    // The pid namespace comes last, once the resolver runs: it must not be in it.
    let namespaces = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    nix::sched::unshare(namespaces).context(
        "creating namespaces (unprivileged user namespaces may be disabled: \
         see `sysctl kernel.unprivileged_userns_clone` and AppArmor's userns restriction)",
    )?;
    mapper.map()?;
    // Kept until the shim returns, after init: dropping it stops and reaps slirp4netns.
    let _link = network.map(network::Helper::connect).transpose()?;
    // Likewise the DNS forwarder, listening on the job's address once the link is up.
    let _resolver = match (upstream, &plan.network) {
        (Some(upstream), Some(network)) => {
            Some(dns::start(upstream, std::net::SocketAddr::from((network.resolver(), dns::PORT)))?)
        }
        _ => None,
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWPID).context("creating the pid namespace")?;

    // Init is a fork of this process rather than a fresh exec of the binary: it already holds the
    // plan, and an exec would cost milliseconds of every job's start (benchmark B2).
    #[allow(unsafe_code)]
    // SAFETY: the shim is single-threaded: `main` dispatches to it before anything can start a
    // thread, and it starts none. The child of a single-threaded process may run any code.
    let forked = unsafe { nix::unistd::fork() }.context("starting the sandbox's init")?;
    let init = match forked {
        ForkResult::Child => std::process::exit(init_main(plan, host)),
        ForkResult::Parent { child } => child,
    };
    let code = loop {
        match waitpid(init, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, signal, _)) => break 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => bail!("waiting for the sandbox's init: {error}"),
        }
    };
    if plan.network.is_some() {
        // The namespace and its counters end with the shim: leave them for the agent's meter.
        // Best effort: a job whose counters cannot be kept is metered from the agent's samples.
        if let Ok(counters) = fs::read_to_string("/proc/self/net/dev") {
            let _ = fs::write(plan.job_dir.join(NETWORK_COUNTERS), counters);
        }
    }
    Ok(code)
}

/// What init needs from the host, opened by the shim before the job's ids exist.
struct HostFiles {
    /// Where init writes why setup failed. An empty error file means no error; the runner
    /// ignores it.
    error: File,
    /// A WASI job's compiled module, read from the agent's cache.
    wasm: Option<Vec<u8>>,
}

impl HostFiles {
    fn open(plan: &Plan) -> anyhow::Result<Self> {
        let error = File::create(ERROR_FILE).context("creating the sandbox's error file")?;
        let wasm = match &plan.payload {
            Payload::Wasi { compiled, .. } => {
                Some(fs::read(compiled).with_context(|| format!("reading {}", compiled.display()))?)
            }
            Payload::Native { .. } => None,
        };
        if let Some(network) = &plan.network {
            fs::write(RESOLV_CONF, rootfs::resolv_conf(network)).context("writing the job's resolv.conf")?;
        }
        Ok(Self { error, wasm })
    }
}

/// Init: pid 1 of the job's pid namespace, forked from the shim. Builds the private root, locks the
/// process down, runs the job, and returns its exit code for the process to exit with.
fn init_main(plan: &Plan, host: HostFiles) -> i32 {
    let mut error_file = host.error;
    match init(plan, host.wasm) {
        Ok(code) => code,
        Err(error) => {
            let _ = error_file.write_all(format!("{error:#}").as_bytes());
            SETUP_FAILED
        }
    }
}

fn init(plan: &Plan, wasm: Option<Vec<u8>>) -> anyhow::Result<i32> {
    prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    rootfs::unshare_mounts()?;
    // A native job's unpacked image, in the agent's cache: opened while init is still the agent's
    // user, and in its own mount namespace (a bind mount's source must be in the caller's), then
    // named `/proc/self/fd/N`.
    let image = match &plan.payload {
        Payload::Native { root: RootFs::Image(dir), .. } => {
            Some(File::open(dir).with_context(|| format!("opening image {}", dir.display()))?)
        }
        _ => None,
    };
    ids::become_job_root(plan.ids)?;
    // Changing its ids cleared the parent-death signal (the kernel does on every change of
    // credentials), so that the agent's death would no longer take the job: set it again. The
    // shim dying in the few instructions between the two leaves init to its time limit.
    prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal again")?;
    let root = match (&plan.payload, &image) {
        (Payload::Native { .. }, Some(image)) => {
            use std::os::fd::AsRawFd;
            RootFs::Image(PathBuf::from(format!("/proc/self/fd/{}", image.as_raw_fd())))
        }
        // wasmtime needs nothing from the filesystem once the module is read, but the same root
        // keeps one containment for both kinds.
        _ => RootFs::Base,
    };
    close_inherited_fds()?;
    rootfs::enter(plan, &root)?;
    drop(image);
    // A session of its own: no controlling terminal, so nothing inside can reach the owner's.
    nix::unistd::setsid().context("starting a new session")?;
    nix::unistd::sethostname(HOSTNAME).context("setting the host name")?;
    limit_resources(plan.disk_bytes)?;
    lock_down()?;
    // Not dumpable: the job cannot open init's /proc/1/fd (the host's error file), its memory, or
    // ptrace it.
    prctl::set_dumpable(false).context("making init undumpable")?;
    match &plan.payload {
        Payload::Native { command, workdir, .. } => run_native(command, workdir, &plan.env),
        Payload::Wasi { args, memory_bytes, time, .. } => {
            let wasm = wasm.unwrap_or_default();
            super::wasi::run_inside(&wasm, args, &plan.env, *memory_bytes, *time)
        }
    }
}

/// Marks every descriptor above stderr close-on-exec. Rust opens everything close-on-exec, but the
/// agent may have inherited descriptors from whatever started it, and the job must see only 0–2.
fn close_inherited_fds() -> anyhow::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::BorrowedFd;
    let listing = fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")?;
    let fds: Vec<i32> = listing
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        #[allow(unsafe_code)]
        // SAFETY: the descriptor is only borrowed for this one fcntl call, which fails cleanly
        // with EBADF if it was closed since the listing (the listing's own descriptor is); nothing else in this single-threaded
        // process closes descriptors concurrently.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) | Err(nix::errno::Errno::EBADF) => {}
            Err(error) => bail!("marking descriptor {fd} close-on-exec: {error}"),
        }
    }
    Ok(())
}

fn limit_resources(disk_bytes: u64) -> anyhow::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("setting RLIMIT_CORE")?;
    setrlimit(Resource::RLIMIT_FSIZE, disk_bytes, disk_bytes).context("setting RLIMIT_FSIZE")?;
    setrlimit(Resource::RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES).context("setting RLIMIT_NOFILE")?;
    setrlimit(Resource::RLIMIT_MEMLOCK, 64 << 10, 64 << 10).context("setting RLIMIT_MEMLOCK")?;
    Ok(())
}

/// Drops every capability for good, forbids gaining privileges, and loads the seccomp filter.
fn lock_down() -> anyhow::Result<()> {
    use caps::CapSet;
    // The bounding set first: with it empty, no exec (not even of a setuid root binary, not even as
    // uid 0) can give a capability back.
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    prctl::set_no_new_privs().context("setting no_new_privs")?;
    seccomp::load().context("loading the seccomp filter")?;
    // Last: init itself needs no capability to spawn, wait and kill its own children.
    caps::clear(None, CapSet::Effective).context("clearing effective capabilities")?;
    caps::clear(None, CapSet::Permitted).context("clearing permitted capabilities")?;
    Ok(())
}

/// Runs a native job's command as init's child, reaps every orphan, and when the main process ends
/// kills whatever it left behind.
fn run_native(command: &[String], workdir: &Path, env: &BTreeMap<String, String>) -> anyhow::Result<i32> {
    let (program, args) = command.split_first().context("the command is empty")?;
    // An image's WorkingDir is not made for it: the image is read-only.
    if !workdir.is_dir() {
        bail!("the working folder {} is not a folder in the image", workdir.display());
    }
    let child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/work")
        .envs(env)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .spawn();
    let child = match child {
        Ok(child) => child,
        // What a shell says, with a shell's exit codes: the job did run, its command did not.
        Err(error) => {
            eprintln!("hearth: cannot run {program}: {error}");
            return Ok(if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    let main = Pid::from_raw(child.id() as i32);
    let code = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => break code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == main => break 128 + signal as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => bail!("waiting for the job: {error}"),
        }
    };
    // As pid 1, kill(-1) reaches every other process in the namespace; init exiting would too,
    // but reaping first means none is left even for an instant as a zombie of ours.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(status) = waitpid(None, None) {
        if matches!(status, WaitStatus::StillAlive) {
            break;
        }
    }
    Ok(code)
}
