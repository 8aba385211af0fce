//! Helpers for job tests: guest programs, specs on disk, and `hearth run --local`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};

use crate::{command, hearth_bin, run_to_end};

/// Builds a program of `tests/wasm-jobs` for wasm32-wasip1 once per run and returns the module.
pub fn wasm_module(name: &str) -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("../target/wasm-jobs");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("wasm-jobs/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!(
                "building tests/wasm-jobs failed ({status}); is the target installed? `rustup target add wasm32-wasip1`"
            ));
        }
        Ok(target.join("wasm32-wasip1/release"))
    });
    let dir = dir.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(dir.join(format!("{name}.wasm")))
}

/// The `job-probe` program (tests/src/bin/job-probe.rs), built once per run.
pub fn probe_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let profile_dir = hearth_bin().parent().map(Path::to_path_buf).unwrap_or_default();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "hearth-tests", "--bin", "job-probe"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        match build.status() {
            Ok(status) if status.success() => Ok(profile_dir.join("job-probe")),
            other => Err(format!("building job-probe failed: {other:?}")),
        }
    });
    bin.clone().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Whether this machine can run the sandbox at all: unprivileged user namespaces and a cgroup the
/// agent may write. `Err` says what is missing, for a loud skip.
pub fn sandbox_support() -> Result<(), String> {
    let userns =
        Command::new("unshare").args(["--user", "--map-root-user", "--pid", "--fork", "true"]).status();
    if !userns.is_ok_and(|s| s.success()) {
        return Err("user and pid namespaces cannot be created here (`unshare -Urpf true` fails)".into());
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let probe = if v2 {
        // Our own cgroup, which the agent must be able to create children in.
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let path = own.lines().find_map(|line| line.strip_prefix("0::")).unwrap_or("/").to_owned();
        format!("/sys/fs/cgroup{}", path.trim_end_matches('/'))
    } else {
        "/sys/fs/cgroup/memory".to_owned()
    };
    if nix::unistd::access(probe.as_str(), nix::unistd::AccessFlags::W_OK).is_err() {
        return Err(format!(
            "{probe} is not writable: no cgroup for job limits (run as root or with a delegated cgroup)"
        ));
    }
    Ok(())
}

/// A folder holding a job spec and its files, with a data dir of its own beside it.
pub struct JobDir {
    root: tempfile::TempDir,
}

impl JobDir {
    /// An empty job folder.
    pub fn new() -> Result<Self> {
        Ok(Self { root: tempfile::tempdir()? })
    }

    /// The folder specs and inputs live in.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// The agent data dir the runs use.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("agent")
    }

    /// Writes a file next to the spec.
    pub fn file(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.path().join(name);
        fs::write(&path, bytes)?;
        Ok(path)
    }

    /// Copies a file next to the spec, keeping its mode (so a program stays executable).
    pub fn copy_in(&self, from: &Path, name: &str) -> Result<PathBuf> {
        let path = self.path().join(name);
        fs::copy(from, &path).with_context(|| format!("copying {}", from.display()))?;
        Ok(path)
    }

    /// Writes `spec` as `job.toml` and runs it with `hearth run --local`.
    pub fn run(&self, spec: &str) -> Result<JobRun> {
        self.run_with(spec, |command| command)
    }

    /// Like [`JobDir::run`], with the `hearth` command passed through `wrap` first (to run it in
    /// a network namespace, say).
    pub fn run_with(&self, spec: &str, wrap: impl FnOnce(Command) -> Command) -> Result<JobRun> {
        let spec_path = self.file("job.toml", spec.as_bytes())?;
        let mut command = command(&self.data_dir());
        command.arg("run").arg(&spec_path).arg("--local");
        let output = run_to_end(wrap(command))?;
        Ok(JobRun { output, jobs: self.data_dir().join("jobs") })
    }
}

/// What `hearth run --local` did.
pub struct JobRun {
    /// The command's status and output.
    pub output: Output,
    jobs: PathBuf,
}

impl JobRun {
    /// The exit status.
    pub fn status(&self) -> ExitStatus {
        self.output.status
    }

    /// The exit code, or an error if killed by a signal.
    pub fn code(&self) -> Result<i32> {
        self.output.status.code().context("hearth run was killed by a signal")
    }

    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The one job folder this run made.
    pub fn job_dir(&self) -> Result<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.jobs)
            .with_context(|| format!("no jobs folder at {}", self.jobs.display()))?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        ensure!(dirs.len() == 1, "expected one job folder, found {dirs:?}");
        dirs.pop().context("no job folder")
    }

    /// A file the job wrote under /out.
    pub fn out(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.job_dir()?.join("out").join(name);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Fails with everything the run printed unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> Result<&Self> {
        ensure!(
            self.output.status.code() == Some(code),
            "expected exit {code}, got {:?}\nstdout: {}\nstderr: {}",
            self.output.status,
            self.stdout(),
            self.stderr()
        );
        Ok(self)
    }
}

/// How many live processes have `marker` in their command line.
pub fn processes_with(marker: &str) -> usize {
    pids_with(marker).len()
}

/// The pids of live processes with `marker` in their command line.
pub fn pids_with(marker: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).replace('\0', " ").contains(marker))
        })
        .collect()
}

/// Whether process `pid` cannot run: its cgroup is frozen (v1 freezer or v2 `cgroup.freeze`) or
/// it is stopped by a signal (state `T`).
pub fn is_stopped(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("T") {
        return true;
    }
    if let Some(state) = freezer_state_file(pid) {
        return fs::read_to_string(state).is_ok_and(|state| state.trim() == "FROZEN");
    }
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let v2 = cgroups.lines().find_map(|line| line.strip_prefix("0::"));
    v2.is_some_and(|path| {
        fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "frozen 1"))
    })
}

/// The v1 `freezer.state` file of the cgroup process `pid` is in, where there is a v1 freezer.
pub fn freezer_state_file(pid: i32) -> Option<String> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "freezer")
            .then(|| format!("/sys/fs/cgroup/freezer{path}/freezer.state"))
    })
}
