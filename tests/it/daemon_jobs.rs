//! Jobs run by the daemon: accepted through the API, recorded in the store, streamed on the
//! WebSocket, listed by `hearth jobs`, controlled by `hearth job …`, and never left running or
//! unaccounted for when the agent stops or crashes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use hearth_tests::jobs::{JobDir, processes_with};
use hearth_tests::{Agent, command, hearth, json_of};
use nix::sys::signal::Signal;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const SPEC: &str = r#"
kind = "native"
image = "base"
command = ["/bin/sh", "-c", "echo made by the daemon; printf out > /out/result; exit 3"]
[resources]
memory = "64MiB"
[limits]
time = "60s"
"#;

fn jobs_json(agent: &Agent) -> Result<Vec<serde_json::Value>> {
    let jobs = json_of(&hearth(&agent.data_dir(), &["jobs", "--json"])?)?;
    jobs.as_array().cloned().context("not a list")
}

pub(crate) fn daemon_runs_a_job_records_it_and_streams_its_life() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    let spec = job.file("job.toml", SPEC.as_bytes())?;
    let (port, token, data_dir) = (agent.port()?, agent.token()?, agent.data_dir());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (states, output, cli) = runtime.block_on(async {
        let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let spec = spec.clone();
        let cli =
            tokio::task::spawn_blocking(move || hearth(&data_dir, &["run", spec.to_str().unwrap_or("")]));
        let (mut states, mut output) = (Vec::new(), String::new());
        loop {
            let message =
                tokio::time::timeout(Duration::from_secs(30), socket.next()).await.context("no event")?;
            let Some(Ok(Message::Text(text))) = message else { bail!("the stream ended: {message:?}") };
            let event: serde_json::Value = serde_json::from_str(&text)?;
            match event["type"].as_str() {
                Some("job_changed") => {
                    let state = event["job"]["state"].as_str().unwrap_or("?").to_owned();
                    let done = state == "finished";
                    states.push(state);
                    if done {
                        ensure!(event["job"]["exit_code"] == 3, "{event}");
                        break;
                    }
                }
                Some("job_output") => output.push_str(event["text"].as_str().unwrap_or("")),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>((states, output, cli.await??))
    })?;
    ensure!(states == ["queued", "transferring", "running", "finished"], "states: {states:?}");
    ensure!(output == "made by the daemon\n", "streamed output: {output:?}");
    ensure!(
        cli.status.code() == Some(3),
        "hearth run exit: {:?} {}",
        cli.status,
        String::from_utf8_lossy(&cli.stderr)
    );
    ensure!(String::from_utf8_lossy(&cli.stdout) == "made by the daemon\n");

    let jobs = jobs_json(&agent)?;
    ensure!(jobs.len() == 1 && jobs[0]["state"] == "finished" && jobs[0]["exit_code"] == 3, "{jobs:?}");
    let dir = jobs[0]["job_dir"].as_str().context("job_dir")?;
    ensure!(std::fs::read(format!("{dir}/out/result"))? == b"out");
    let id = jobs[0]["id"].as_str().context("id")?;
    let logs = hearth(&agent.data_dir(), &["job", "logs", id])?;
    ensure!(String::from_utf8_lossy(&logs.stdout) == "made by the daemon\n");

    // `hearth results` puts the outputs in a folder, through the blob store.
    let results = tempfile::tempdir()?;
    let out = results.path().join("results");
    let got = hearth(&agent.data_dir(), &["results", id, "--out", out.to_str().context("out")?])?;
    ensure!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    ensure!(String::from_utf8_lossy(&got.stdout).trim() == out.to_str().context("out")?);
    ensure!(std::fs::read(out.join("result"))? == b"out", "results differ");
    let again = hearth(&agent.data_dir(), &["results", id, "--out", out.to_str().context("out")?])?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not an empty folder"),
        "a second export over the first: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The record survives a restart.
    ensure!(agent.terminate()?.success());
    agent.restart()?;
    ensure!(jobs_json(&agent)? == jobs, "the job's record changed across a restart");
    ensure!(agent.terminate()?.success());
    Ok(())
}

/// Starts a long job through `hearth run` and waits until its sleepers run; returns its id.
fn start_sleeper(agent: &Agent, job: &JobDir, marker: &str) -> Result<(std::process::Child, String)> {
    let spec = job.file(
        "sleep.toml",
        format!(
            "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", \"(sleep {marker} &); sleep {marker}\"]\n\
             [limits]\ntime = \"120s\"\n"
        )
        .as_bytes(),
    )?;
    let cli = command(&agent.data_dir())
        .args(["run", spec.to_str().context("path")?])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let until = Instant::now() + Duration::from_secs(20);
    while processes_with(marker) < 2 {
        ensure!(Instant::now() < until, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let jobs = jobs_json(agent)?;
    let id = jobs
        .iter()
        .find(|j| j["state"] == "running")
        .and_then(|j| j["id"].as_str())
        .context("no running job")?;
    Ok((cli, id.to_owned()))
}

fn wait_for_none(marker: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while processes_with(marker) > 0 {
        ensure!(Instant::now() < until, "processes of the job survived");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn pause_resume_and_cancel_from_the_cli() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    let marker = format!("888.{}1", std::process::id());
    let (mut cli, id) = start_sleeper(&agent, &job, &marker)?;
    let act = |verb: &str| -> Result<serde_json::Value> {
        json_of(&hearth(&agent.data_dir(), &["job", verb, &id, "--json"])?)
    };
    ensure!(act("pause")?["state"] == "paused");
    let again = hearth(&agent.data_dir(), &["job", "pause", &id])?;
    ensure!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("is paused"));
    ensure!(act("resume")?["state"] == "running");
    ensure!(act("cancel")?["state"] == "cancelled");
    wait_for_none(&marker)?;
    let status = hearth_tests::wait_deadline(&mut cli, Duration::from_secs(20))?;
    ensure!(status.code() == Some(130), "hearth run after cancel: {status:?}");
    let unknown = hearth(&agent.data_dir(), &["job", "cancel", "000000000000"])?;
    ensure!(String::from_utf8_lossy(&unknown.stderr).contains("no job 000000000000"));
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_crash_leaves_no_job_running_and_the_record_says_so() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    let marker = format!("888.{}2", std::process::id());
    let (mut cli, id) = start_sleeper(&agent, &job, &marker)?;
    agent.stop_with(Signal::SIGKILL)?;
    wait_for_none(&marker)?;
    let _ = cli.kill();
    let _ = cli.wait();
    agent.restart()?;
    let jobs = jobs_json(&agent)?;
    let record = jobs.iter().find(|j| j["id"] == id.as_str()).context("the job's record is gone")?;
    ensure!(record["state"] == "failed", "{record}");
    ensure!(record["reason"].as_str().is_some_and(|r| r.contains("agent stopped")), "{record}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_job_frozen_when_its_agent_died_is_swept_by_the_next_start() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    let marker = format!("888.{}3", std::process::id());
    let (mut cli, id) = start_sleeper(&agent, &job, &marker)?;
    ensure!(json_of(&hearth(&agent.data_dir(), &["job", "pause", &id, "--json"])?)?["state"] == "paused");
    agent.stop_with(Signal::SIGKILL)?;
    let _ = cli.kill();
    let _ = cli.wait();
    // Frozen, its processes cannot act on the kill the agent's death sent them; the next job
    // start, by this or any agent, finds the cgroup of a dead agent and ends it.
    agent.restart()?;
    let next = job.file("next.toml", b"kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/true\"]\n")?;
    let out = hearth(&agent.data_dir(), &["run", next.to_str().context("path")?])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_none(&marker)?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

/// After a SIGKILL the next start ends and cleans everything of the run that died before it says
/// it is ready: the frozen job's processes are gone and its scratch folders removed, with no other
/// job started to trigger it.
pub(crate) fn the_next_start_cleans_what_a_killed_run_left_before_it_is_ready() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    let marker = format!("888.{}4", std::process::id());
    let (mut cli, id) = start_sleeper(&agent, &job, &marker)?;
    let work = agent.data_dir().join("jobs").join(&id).join("scratch/work");
    ensure!(work.is_dir(), "the running job has no scratch at {}", work.display());
    ensure!(json_of(&hearth(&agent.data_dir(), &["job", "pause", &id, "--json"])?)?["state"] == "paused");
    agent.stop_with(Signal::SIGKILL)?;
    let _ = cli.kill();
    let _ = cli.wait();
    ensure!(processes_with(&marker) > 0, "the frozen job died with its agent; nothing to show");
    // `restart` returns once the agent is ready: by then nothing of the dead run may be left.
    agent.restart()?;
    ensure!(processes_with(&marker) == 0, "the dead run's frozen job still runs after the restart");
    let job_dir = agent.data_dir().join("jobs").join(&id);
    for scratch in ["in", "scratch", "scratch.img", "root"] {
        ensure!(!job_dir.join(scratch).exists(), "{scratch}/ of the dead run's job is still there");
    }
    ensure!(agent.terminate()?.success());
    Ok(())
}
