//! Commands that wait (`hearth job logs -f`, `hearth submit --wait`, remote `job logs -f`) wait on
//! the daemon's events: a follower prints what the job writes after it started, and every
//! follower ends, with the job's outcome, when the job ends. (How soon is for benchmarks, not for
//! a timed assertion here.)

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::JobDir;
use hearth_tests::{Agent, PROCESS_DEADLINE, command, eventually, json_of, raw_http, wait_deadline};

use crate::network::{address, joining, wait_to_know};

/// A job that writes once, then again a second later, on both streams, and ends.
const SLOW_WRITER: &str = "echo first; sleep 1; echo second >&2; sleep 1; echo third";

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
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    ensure!(status.success(), "job logs -f: {status}: {stderr}");
    ensure!(stdout == "first\nthird\n", "the follower's stdout: {stdout:?}");
    ensure!(stderr == "second\n", "the follower's stderr: {stderr:?}");
    ensure!(wait_deadline(&mut run, PROCESS_DEADLINE)?.success(), "hearth run failed");
    Ok(())
}

pub(crate) fn submit_wait_and_remote_logs_follow_end_with_the_remote_job() -> Result<()> {
    let (consumer, _provider) = crate::network::consumer_and_provider()?;
    let job = JobDir::new()?;
    let spec = job.file(
        "slow.toml",
        format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{SLOW_WRITER}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n"
        )
        .as_bytes(),
    )?;
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
    let followed = wait_deadline(&mut follower, PROCESS_DEADLINE)?;
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    ensure!(status.success(), "submit --wait: {status}: {stderr}\n{}", consumer.log());
    ensure!(stdout.lines().next() == Some(id.as_str()), "the id line: {stdout:?}");
    ensure!(stderr.contains("finished (exit 0)"), "the end was not said: {stderr}");
    // The remote follower saw every line, including those written after it started.
    let (out, err) = (follower_out.join().unwrap_or_default(), follower_err.join().unwrap_or_default());
    ensure!(followed.success(), "job logs -f of the remote job: {followed}: {err}");
    ensure!(out == "first\nthird\n" && err == "second\n", "the remote follower printed {out:?} and {err:?}");
    // The routes' old prefix answers as the new one does.
    let (port, token) = (consumer.port()?, consumer.token()?);
    let read = |path: &str| {
        raw_http(
            port,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}"),
        )
    };
    let (new, old) = (read(&format!("/api/v1/remote-jobs/{id}"))?, read(&format!("/api/v1/requests/{id}"))?);
    ensure!(new.status == 200 && new.body.contains(&id), "{new:?}");
    ensure!(
        (old.status, &old.body) == (new.status, &new.body),
        "the alias answered {old:?}, the route {new:?}"
    );
    Ok(())
}

pub(crate) fn a_job_submitted_before_any_provider_shares_runs_once_one_appears() -> Result<()> {
    let consumer = Agent::start()?;
    let (bootstrap, consumer_id) = address(&consumer)?;
    let job = JobDir::new()?;
    let spec = job.file(
        "hello.toml",
        b"kind = \"native\"\ncommand = [\"/bin/echo\", \"found one\"]\nmax_price = 50\n\
          [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    let submitted = consumer.cli(&["submit", spec.to_str().context("path")?])?;
    ensure!(submitted.status.success(), "submit: {}", String::from_utf8_lossy(&submitted.stderr));
    let id = String::from_utf8(submitted.stdout)?.lines().next().context("no id")?.to_owned();
    // Nobody shares yet: the search waits for an advert, and the one that arrives is taken.
    let provider = joining(&bootstrap)?;
    let (_, provider_id) = address(&provider)?;
    wait_to_know(&provider, &[&consumer_id], Duration::from_secs(30))?;
    let done = eventually(Duration::from_secs(90), "the job to end on the provider that appeared", || {
        let jobs = json_of(&consumer.cli(&["jobs", "--json"])?)?;
        let job = jobs.as_array().and_then(|jobs| jobs.iter().find(|job| job["id"] == id.as_str()).cloned());
        Ok(job.filter(|job| matches!(job["state"].as_str(), Some("finished" | "failed" | "cancelled"))))
    })?;
    ensure!(
        done["state"] == "finished" && done["provider"] == provider_id.as_str(),
        "{done}\n{}",
        consumer.log()
    );
    Ok(())
}
