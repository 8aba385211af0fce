//! Commands that wait (`hearth job logs -f`, `hearth submit --wait`, remote `job logs -f`) wait on
//! the daemon's events: a follower prints what the job writes after it started, and every
//! follower ends within moments of the event that says the job ended, not a poll later.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use hearth_tests::jobs::JobDir;
use hearth_tests::{Agent, PROCESS_DEADLINE, command, eventually, json_of, wait_deadline};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::network::{address, joining, wait_to_know};

/// How soon after the daemon's event a follower must have ended: the event is all it needs.
const PROMPTLY: Duration = Duration::from_secs(2);

/// A job that writes once, then again a second later, on both streams, and ends.
const SLOW_WRITER: &str = "echo first; sleep 1; echo second >&2; sleep 1; echo third";

/// Subscribes to `agent`'s event stream and waits for the event `ended` accepts; when it came.
fn when_event(
    agent: &Agent,
    ended: impl Fn(&serde_json::Value) -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<Instant>>> {
    let (port, token) = (agent.port()?, agent.token()?);
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
            let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
            let _ = subscribed_tx.send(());
            loop {
                let message = tokio::time::timeout(Duration::from_secs(120), socket.next())
                    .await
                    .context("no event for two minutes")?;
                let Some(Ok(Message::Text(text))) = message else { bail!("the stream ended: {message:?}") };
                let event: serde_json::Value = serde_json::from_str(&text)?;
                if ended(&event) {
                    return Ok(Instant::now());
                }
            }
        })
    });
    subscribed.recv_timeout(Duration::from_secs(30)).context("the event stream did not open")?;
    Ok(watcher)
}

/// Starts `hearth ARGS…` on `agent` with its stdout and stderr read as they come.
fn spawn_cli(
    agent: &Agent,
    args: &[&str],
) -> Result<(Child, std::thread::JoinHandle<String>, std::thread::JoinHandle<String>)> {
    let mut cli = command(&agent.data_dir());
    cli.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cli.spawn()?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().context("stdout")?));
    let stderr = drain(Box::new(child.stderr.take().context("stderr")?));
    Ok((child, stdout, stderr))
}

pub(crate) fn job_logs_follow_prints_later_output_and_ends_with_the_job() -> Result<()> {
    let agent = Agent::start()?;
    let job = JobDir::new()?;
    let spec = job.file(
        "slow.toml",
        format!(
            "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", \"{SLOW_WRITER}\"]\n\
             [resources]\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n"
        )
        .as_bytes(),
    )?;
    let finished =
        when_event(&agent, |event| event["type"] == "job_changed" && event["job"]["state"] == "finished")?;
    let (mut run, _, _) = spawn_cli(&agent, &["run", spec.to_str().context("path")?])?;
    let id = eventually(Duration::from_secs(30), "the job to run", || {
        let jobs = json_of(&agent.cli(&["jobs", "--json"])?)?;
        Ok(jobs
            .as_array()
            .and_then(|jobs| jobs.first())
            .and_then(|job| job["id"].as_str())
            .map(str::to_owned))
    })?;
    let stdout_log = || -> Result<String> {
        let output = agent.cli(&["job", "logs", &id, "--stream", "stdout"])?;
        ensure!(output.status.success(), "job logs: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    };
    eventually(Duration::from_secs(30), "the job's first line", || {
        Ok(stdout_log()?.contains("first").then_some(()))
    })?;
    let (mut follower, stdout, stderr) = spawn_cli(&agent, &["job", "logs", "-f", &id])?;
    let status = wait_deadline(&mut follower, PROCESS_DEADLINE)?;
    let exited = Instant::now();
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    ensure!(status.success(), "job logs -f: {status}: {stderr}");
    ensure!(stdout == "first\nthird\n", "the follower's stdout: {stdout:?}");
    ensure!(stderr == "second\n", "the follower's stderr: {stderr:?}");
    let finished = finished.join().map_err(|_| anyhow::anyhow!("the watcher panicked"))??;
    ensure!(
        exited.saturating_duration_since(finished) < PROMPTLY,
        "the follower ended {:?} after the job did",
        exited.saturating_duration_since(finished)
    );
    ensure!(wait_deadline(&mut run, PROCESS_DEADLINE)?.success(), "hearth run failed");
    Ok(())
}

pub(crate) fn submit_wait_and_remote_logs_follow_end_with_the_remote_job() -> Result<()> {
    let consumer = Agent::start()?;
    let (bootstrap, consumer_id) = address(&consumer)?;
    let provider = joining(&bootstrap)?;
    let (_, provider_id) = address(&provider)?;
    wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))?;
    wait_to_know(&provider, &[&consumer_id], Duration::from_secs(30))?;
    crate::network::wait_to_know_offer(&consumer, &provider_id)?;
    let job = JobDir::new()?;
    let spec = job.file(
        "slow.toml",
        format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{SLOW_WRITER}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n"
        )
        .as_bytes(),
    )?;
    let ended = when_event(&consumer, |event| {
        event["type"] == "remote_job_changed"
            && matches!(event["job"]["state"].as_str(), Some("finished" | "failed" | "cancelled"))
    })?;
    let (mut waiter, stdout, stderr) =
        spawn_cli(&consumer, &["submit", spec.to_str().context("path")?, "--wait"])?;
    // The id comes first, at once; the follower of the logs starts while the job still runs.
    let id = eventually(Duration::from_secs(30), "the request id", || {
        let jobs = json_of(&consumer.cli(&["jobs", "--json"])?)?;
        Ok(jobs
            .as_array()
            .and_then(|jobs| {
                jobs.iter()
                    .find_map(|job| job["provider"].as_str().map(|_| job["id"].as_str().map(str::to_owned)))
            })
            .flatten())
    })?;
    let (mut follower, follower_out, follower_err) = spawn_cli(&consumer, &["job", "logs", "-f", &id])?;
    let status = wait_deadline(&mut waiter, PROCESS_DEADLINE)?;
    let waited = Instant::now();
    let followed = wait_deadline(&mut follower, PROCESS_DEADLINE)?;
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    ensure!(status.success(), "submit --wait: {status}: {stderr}\n{}", consumer.log());
    ensure!(stdout.lines().next() == Some(id.as_str()), "the id line: {stdout:?}");
    ensure!(stderr.contains("finished (exit 0)"), "the end was not said: {stderr}");
    let ended = ended.join().map_err(|_| anyhow::anyhow!("the watcher panicked"))??;
    ensure!(
        waited.saturating_duration_since(ended) < PROMPTLY,
        "submit --wait ended {:?} after the daemon said the job ended",
        waited.saturating_duration_since(ended)
    );
    // The remote follower saw every line, including those written after it started.
    let (out, err) = (follower_out.join().unwrap_or_default(), follower_err.join().unwrap_or_default());
    ensure!(followed.success(), "job logs -f of the remote job: {followed}: {err}");
    ensure!(out == "first\nthird\n" && err == "second\n", "the remote follower printed {out:?} and {err:?}");
    Ok(())
}
