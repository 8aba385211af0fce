//! The owner comes first, end to end: a running daemon, a running job, and the owner's pause, a
//! closing window and a long pause acting on it; the policy set and shown from the CLI.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::{JobDir, is_stopped, pids_with};
use hearth_tests::{ALWAYS_SHARE, Agent, command, hearth, json_of};

/// A job that appends a line to /out/ticks ten times a second, from a child process of its own.
struct Ticker {
    cli: Child,
    id: String,
    ticks: PathBuf,
    marker: String,
    _job: JobDir,
}

impl Ticker {
    fn start(agent: &Agent, tag: &str) -> Result<Self> {
        let job = JobDir::new()?;
        let marker = format!("777.{}{tag}", std::process::id());
        let script = format!("(while :; do echo tick >> /out/ticks; sleep 0.1; done) & sleep {marker}");
        let spec = job.file(
            "ticker.toml",
            format!(
                "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n[limits]\ntime = \"300s\"\n"
            )
            .as_bytes(),
        )?;
        let cli = command(&agent.data_dir())
            .args(["run", spec.to_str().context("path")?])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let until = Instant::now() + Duration::from_secs(30);
        let id = loop {
            let jobs = json_of(&hearth(&agent.data_dir(), &["jobs", "--json"])?)?;
            let running =
                jobs.as_array().and_then(|jobs| jobs.iter().find(|j| j["state"] == "running").cloned());
            if let Some(job) = running
                && !pids_with(&marker).is_empty()
            {
                break job["id"].as_str().context("id")?.to_owned();
            }
            ensure!(Instant::now() < until, "the job never started");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The job's /out while it runs.
        let ticks = agent.data_dir().join("jobs").join(&id).join("scratch/out/ticks");
        let ticker = Self { cli, id, ticks, marker, _job: job };
        ticker.wait_for_ticks()?;
        Ok(ticker)
    }

    fn count(&self) -> usize {
        fs::read_to_string(&self.ticks).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// Fails unless the job ticks again within a few seconds.
    fn wait_for_ticks(&self) -> Result<()> {
        let (before, until) = (self.count(), Instant::now() + Duration::from_secs(10));
        while self.count() < before + 3 {
            ensure!(Instant::now() < until, "the job does not run: {} ticks", self.count());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Fails unless every process of the job is stopped and it ticks no more.
    fn ensure_stopped(&self) -> Result<()> {
        let pids = self.processes();
        ensure!(!pids.is_empty(), "the job has no processes");
        for pid in &pids {
            ensure!(is_stopped(*pid), "process {pid} of the job still runs");
        }
        // The freezer's own word (every process stopped) is checked above. This is the user's view
        // of it, and can only be a window: a running job ticks every 100 ms, so 600 ms would see
        // about six ticks, and a frozen one must show none.
        let before = self.count();
        std::thread::sleep(Duration::from_millis(600));
        ensure!(self.count() == before, "the job ticked while paused");
        Ok(())
    }

    /// The job's processes: the marker's sleep, and every process in the same cgroup.
    fn processes(&self) -> Vec<i32> {
        let Some(first) = pids_with(&self.marker).first().copied() else { return Vec::new() };
        let cgroup = fs::read_to_string(format!("/proc/{first}/cgroup")).unwrap_or_default();
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c == cgroup))
            .collect()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let _ = self.cli.kill();
        let _ = self.cli.wait();
    }
}

fn status(agent: &Agent) -> Result<serde_json::Value> {
    json_of(&hearth(&agent.data_dir(), &["status", "--json"])?)
}

/// Waits until `hearth status` shows `state`, and returns it.
fn wait_for_state(agent: &Agent, state: &str, within: Duration) -> Result<serde_json::Value> {
    let until = Instant::now() + within;
    loop {
        let status = status(agent)?;
        if status["state"] == state {
            return Ok(status);
        }
        ensure!(Instant::now() < until, "still {} after {within:?}: {status}", status["state"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job_state(agent: &Agent, id: &str) -> Result<serde_json::Value> {
    let jobs = json_of(&hearth(&agent.data_dir(), &["jobs", "--json"])?)?;
    jobs.as_array().and_then(|jobs| jobs.iter().find(|j| j["id"] == id).cloned()).context("no such job")
}

pub(crate) fn owner_pause_freezes_the_job_and_resume_runs_it_again() -> Result<()> {
    let mut agent = Agent::start()?;
    let ticker = Ticker::start(&agent, "1")?;

    let paused = hearth(&agent.data_dir(), &["pause"])?;
    ensure!(paused.status.success(), "{}", String::from_utf8_lossy(&paused.stderr));
    // The answer comes once the pause is recorded; the freeze follows within the task's round.
    let status = wait_for_state(&agent, "paused", Duration::from_secs(5))?;
    ensure!(status["reasons"][0]["reason"] == "owner_paused", "{status}");
    let until = Instant::now() + Duration::from_secs(5);
    while job_state(&agent, &ticker.id)?["state"] != "paused" {
        ensure!(Instant::now() < until, "the job was not paused");
        std::thread::sleep(Duration::from_millis(50));
    }
    ticker.ensure_stopped()?;
    let text = String::from_utf8_lossy(&hearth(&agent.data_dir(), &["status"])?.stdout).into_owned();
    ensure!(text.contains("paused: paused by the owner"), "{text}");

    let resumed = hearth(&agent.data_dir(), &["resume", "--json"])?;
    ensure!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    wait_for_state(&agent, "sharing", Duration::from_secs(5))?;
    ticker.wait_for_ticks()?;
    ensure!(job_state(&agent, &ticker.id)?["state"] == "running");

    // Each pause and resume is recorded for the job's consumer, with its reason.
    let notices = json_of(&hearth(&agent.data_dir(), &["job", "notices", &ticker.id, "--json"])?)?;
    let kinds: Vec<&str> =
        notices.as_array().context("list")?.iter().filter_map(|n| n["kind"].as_str()).collect();
    ensure!(kinds == ["paused", "resumed"], "{notices}");
    ensure!(notices[0]["reason"].as_str().is_some_and(|r| r.contains("paused by the owner")), "{notices}");

    // A pause with a duration ends by itself.
    ensure!(hearth(&agent.data_dir(), &["pause", "--for", "2s"])?.status.success());
    wait_for_state(&agent, "paused", Duration::from_secs(5))?;
    wait_for_state(&agent, "sharing", Duration::from_secs(10))?;
    ticker.wait_for_ticks()?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_closing_window_freezes_the_job_without_a_command() -> Result<()> {
    let mut agent = Agent::start()?;
    let ticker = Ticker::start(&agent, "2")?;
    // A window that closes a few seconds from now, by the wall clock in UTC. (Top-level keys
    // come before the policy's tables.)
    let clock = |offset: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let t = (now + offset).rem_euclid(86_400);
        format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
    };
    let policy = format!(
        "timezone = \"UTC\"\n[[window]]\ndays = [\"all\"]\nfrom = \"{}\"\nto = \"{}\"\n{ALWAYS_SHARE}",
        clock(-1800),
        clock(4)
    );
    let file = agent.data_dir().join("night.toml");
    fs::write(&file, &policy)?;
    let set = hearth(&agent.data_dir(), &["policy", "set", file.to_str().context("path")?])?;
    ensure!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    ensure!(String::from_utf8_lossy(&set.stdout).contains("applied"));
    ensure!(status(&agent)?["state"] == "sharing");
    let status = wait_for_state(&agent, "paused", Duration::from_secs(15))?;
    ensure!(status["reasons"][0]["reason"] == "outside_window", "{status}");
    let until = Instant::now() + Duration::from_secs(5);
    while job_state(&agent, &ticker.id)?["state"] != "paused" {
        ensure!(Instant::now() < until, "the job was not paused");
        std::thread::sleep(Duration::from_millis(50));
    }
    ticker.ensure_stopped()?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_long_pause_stops_the_job_with_the_owners_reason() -> Result<()> {
    let mut agent = Agent::start()?;
    let file = agent.data_dir().join("short.toml");
    fs::write(&file, format!("{ALWAYS_SHARE}stop_after = \"2s\"\n"))?;
    ensure!(hearth(&agent.data_dir(), &["policy", "set", file.to_str().context("path")?])?.status.success());
    let ticker = Ticker::start(&agent, "3")?;
    ensure!(hearth(&agent.data_dir(), &["pause"])?.status.success());
    let until = Instant::now() + Duration::from_secs(15);
    let record = loop {
        let record = job_state(&agent, &ticker.id)?;
        if record["state"] == "cancelled" {
            break record;
        }
        ensure!(Instant::now() < until, "the job was not stopped: {record}");
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(record["reason"].as_str().is_some_and(|r| r.contains("stopped by the owner")), "{record}");
    let until = Instant::now() + Duration::from_secs(10);
    while !pids_with(&ticker.marker).is_empty() {
        ensure!(Instant::now() < until, "processes of the stopped job survived");
        std::thread::sleep(Duration::from_millis(50));
    }
    let notices = json_of(&hearth(&agent.data_dir(), &["job", "notices", &ticker.id, "--json"])?)?;
    ensure!(notices.as_array().is_some_and(|n| n.iter().any(|n| n["kind"] == "stopped")), "{notices}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn policy_is_shown_and_a_bad_one_is_refused_whole() -> Result<()> {
    let mut agent = Agent::start()?;
    let data = agent.data_dir();
    let bad = data.join("bad.toml");
    fs::write(&bad, "[reserve]\ncpu = 150\n")?;
    let refused = hearth(&data, &["policy", "set", bad.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("reserve.cpu") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    ensure!(
        fs::read_to_string(data.join("policy.toml"))? == ALWAYS_SHARE,
        "a refused policy changed the file"
    );

    let good = data.join("good.toml");
    fs::write(
        &good,
        "[reserve]\ncpu = 50\nmemory = 10\n[owner]\nidle = \"0s\"\nbusy_cpu = 0\nonly_on_ac = false\n",
    )?;
    ensure!(hearth(&data, &["policy", "set", good.to_str().context("path")?])?.status.success());
    let shown = json_of(&hearth(&data, &["policy", "show", "--json"])?)?;
    ensure!(shown["reserve"]["cpu"] == 50.0 && shown["owner"]["idle"] == "0s", "{shown}");
    // The offered capacity shrinks at once: half of the cores.
    let until = Instant::now() + Duration::from_secs(5);
    let threads = std::thread::available_parallelism()?.get() as u64;
    loop {
        let status = status(&agent)?;
        if status["availability"]["capacity"]["cpu_millis"] == threads * 500 {
            break;
        }
        ensure!(Instant::now() < until, "capacity not halved: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without a daemon, the file itself is read and written.
    ensure!(agent.terminate()?.success());
    let offline = json_of(&hearth(&data, &["policy", "show", "--json"])?)?;
    ensure!(offline["reserve"]["memory"] == 10.0, "{offline}");
    Ok(())
}
