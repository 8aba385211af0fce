//! A consumer and two providers of different capacity, three agent processes on loopback: a job
//! runs on the provider it fits best and its outputs come home byte-identical; cancel, an owner's
//! pause (shown by `hearth job notices` at the consumer) and a provider killed mid-job all reach
//! the consumer.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hearth_tests::jobs::{JobDir, pids_with, wasm_module};
use hearth_tests::{ALWAYS_SHARE, Agent, json_of, pseudo_random};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::network::{address, joining, wait_to_know};

/// A provider keeping half the cores and 90% of the memory for its owner: the smaller machine.
const SMALL: &str = "[reserve]\ncpu = 50\nmemory = 90\n";

/// A consumer, and a small and a big provider that joined it; with their peer ids.
struct Market {
    consumer: Agent,
    small: Agent,
    big: Agent,
    small_id: String,
    big_id: String,
}

impl Market {
    fn start() -> Result<Self> {
        let consumer = Agent::start()?;
        let (bootstrap, _) = address(&consumer)?;
        let small = joining(&bootstrap)?;
        let policy = format!("{ALWAYS_SHARE}{SMALL}");
        let file = small.data_dir().join("small-policy.toml");
        fs::write(&file, policy)?;
        let set = small.cli(&["policy", "set", file.to_str().context("path")?])?;
        ensure!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
        let big = joining(&bootstrap)?;
        let (_, small_id) = address(&small)?;
        let (_, big_id) = address(&big)?;
        let market = Self { consumer, small, big, small_id, big_id };
        market.wait_for_offers()?;
        Ok(market)
    }

    /// Waits until the consumer has both providers' adverts, the small one's with its reserve.
    fn wait_for_offers(&self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let offers =
                wait_to_know(&self.consumer, &[&self.small_id, &self.big_id], Duration::from_secs(30))?;
            let (small, big) = (free_cpu(&offers, &self.small_id), free_cpu(&offers, &self.big_id));
            if small > 0 && big > small {
                return Ok(());
            }
            ensure!(Instant::now() < until, "the small provider never advertised less than the big one");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn free_cpu(offers: &[Value], peer: &str) -> u64 {
    offers.iter().find(|o| o["peer_id"] == peer).and_then(|o| o["free"]["cpu_millis"].as_u64()).unwrap_or(0)
}

/// `hearth submit SPEC` on `agent`; the id from stdout's first line.
pub(crate) fn submit(agent: &Agent, spec: &Path) -> Result<String> {
    let output = agent.cli(&["submit", spec.to_str().context("path")?])?;
    ensure!(output.status.success(), "submit failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout)?;
    let id = stdout.lines().next().context("no id")?.trim().to_owned();
    ensure!(!id.is_empty() && !id.contains(' '), "the first line is not an id alone: {stdout:?}");
    Ok(id)
}

/// The job `id` as `hearth jobs --json` on `agent` lists it.
pub(crate) fn job(agent: &Agent, id: &str) -> Result<Value> {
    let jobs = json_of(&agent.cli(&["jobs", "--json"])?)?;
    jobs.as_array().and_then(|all| all.iter().find(|j| j["id"] == id).cloned()).context("no such job")
}

/// Waits until the job `id` on `agent` satisfies `done`.
pub(crate) fn wait_job(
    agent: &Agent,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let until = Instant::now() + within;
    loop {
        let now = job(agent, id)?;
        if done(&now) {
            return Ok(now);
        }
        if Instant::now() > until {
            bail!("job {id} never got there; it is {now}\n--- agent log ---\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn a_job_runs_on_the_provider_it_fits_best_and_its_outputs_come_home() -> Result<()> {
    let market = Market::start()?;
    let dir = JobDir::new()?;
    fs::copy(wasm_module("copy")?, dir.path().join("copy.wasm"))?;
    let data = pseudo_random(3 << 20, 8);
    fs::write(dir.path().join("data.bin"), &data)?;
    let spec = |cpu: f64| {
        format!(
            "kind = \"wasi\"\nmodule = \"copy.wasm\"\nargs = [\"data.bin\", \"reversed.bin\"]\n\
             inputs = [\"data.bin\"]\nmax_price = 50\n[resources]\ncpu = {cpu}\nmemory = \"64MiB\"\n\
             [limits]\ntime = \"120s\"\n"
        )
    };

    // Fits both: the small provider, which it fills more, gets it.
    let small_job = dir.file("small.toml", spec(1.0).as_bytes())?;
    let output = market.consumer.cli(&["submit", small_job.to_str().context("path")?, "--wait"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "submit --wait failed: {stderr}\n{}", market.consumer.log());
    let id = String::from_utf8(output.stdout)?.lines().next().context("no id")?.to_owned();
    // `--wait` polls, and the job is over within a poll or two: which state between the search
    // and the end it catches (transferring or running) depends on timing; it catches one.
    ensure!(
        stderr.contains("looking for a provider")
            && (stderr.contains("transferring") || stderr.contains("running"))
            && stderr.contains("finished"),
        "the states were not shown: {stderr}"
    );
    let done = job(&market.consumer, &id)?;
    ensure!(
        done["provider"] == market.small_id.as_str(),
        "ran on {} instead of the small provider",
        done["provider"]
    );
    ensure!(done["state"] == "finished" && done["exit_code"] == 0, "{done}");
    let agreement = &done["agreement"];
    ensure!(
        agreement["provider_signature"].as_str().is_some_and(|s| s.len() == 128)
            && agreement["consumer_signature"].as_str().is_some_and(|s| s.len() == 128),
        "the agreement is not signed by both: {agreement}"
    );

    let ran = json_array(&market.small, &["jobs", "--json"])?;
    ensure!(
        ran.iter().any(|j| j["state"] == "finished" && j["provider"].is_null()),
        "the small provider has no record of running the job: {ran:?}"
    );

    let out = dir.path().join("results");
    let results = market.consumer.cli(&["results", &id, "--out", out.to_str().context("path")?])?;
    ensure!(results.status.success(), "results: {}", String::from_utf8_lossy(&results.stderr));
    let mut reversed = data.clone();
    reversed.reverse();
    ensure!(fs::read(out.join("reversed.bin"))? == reversed, "the output did not come back byte-identical");

    // More than the small provider has: the big one gets it.
    let small_free = free_cpu(&json_array(&market.consumer, &["offers", "--json"])?, &market.small_id);
    let bigger = (small_free + 500) as f64 / 1000.0;
    let big_job = dir.file("big.toml", spec(bigger).as_bytes())?;
    let id = submit(&market.consumer, &big_job)?;
    let done = wait_job(&market.consumer, &id, Duration::from_secs(120), |j| j["state"] == "finished")?;
    ensure!(
        done["provider"] == market.big_id.as_str(),
        "a job too big for the small provider ran on {}",
        done["provider"]
    );

    // Too expensive for everyone: refused with the reason, nothing runs.
    let dear = dir.file("dear.toml", spec(1.0).replace("max_price = 50", "max_price = 0.01").as_bytes())?;
    let id = submit(&market.consumer, &dear)?;
    let failed = wait_job(&market.consumer, &id, Duration::from_secs(90), |j| j["state"] == "failed")?;
    ensure!(failed["reason"].as_str().is_some_and(|r| r.contains("fits")), "{failed}");
    Ok(())
}

pub(crate) fn json_array(agent: &Agent, args: &[&str]) -> Result<Vec<Value>> {
    Ok(json_of(&agent.cli(args)?)?.as_array().cloned().unwrap_or_default())
}

pub(crate) fn cancel_pause_and_a_vanished_provider_reach_the_consumer() -> Result<()> {
    let mut market = Market::start()?;
    let dir = JobDir::new()?;
    let marker = format!("888.{}", std::process::id());
    // Needs more than the small provider offers, so it runs on the big one.
    let small_free = free_cpu(&json_array(&market.consumer, &["offers", "--json"])?, &market.small_id);
    let cpu = (small_free + 200) as f64 / 1000.0;
    let spec = dir.file(
        "sleep.toml",
        format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"echo started; sleep {marker}\"]\n\
             [resources]\ncpu = {cpu}\nmemory = \"64MiB\"\n[limits]\ntime = \"600s\"\n"
        )
        .as_bytes(),
    )?;

    let id = submit(&market.consumer, &spec)?;
    wait_job(&market.consumer, &id, Duration::from_secs(60), |j| j["state"] == "running")?;
    ensure!(!pids_with(&marker).is_empty(), "the job's process is not running at the provider");
    let logs = market.consumer.cli(&["job", "logs", &id])?;
    ensure!(
        String::from_utf8_lossy(&logs.stdout).contains("started"),
        "the provider's logs did not come: {logs:?}"
    );

    // The provider's owner pauses: the consumer sees it, with the reason.
    ensure!(market.big.cli(&["pause"])?.status.success());
    let paused = wait_job(&market.consumer, &id, Duration::from_secs(20), |j| j["state"] == "paused")?;
    ensure!(
        paused["note"].as_str().is_some_and(|n| n.contains("owner")),
        "no reason came with the pause: {paused}"
    );
    // The consumer shows the provider's signed notices of the job, the pause with its reason.
    let notices = json_array(&market.consumer, &["job", "notices", &id, "--json"])?;
    ensure!(
        notices.iter().any(|n| n["kind"] == "paused"
            && n["job_id"] == id.as_str()
            && n["reason"].as_str().is_some_and(|r| r.contains("owner"))),
        "the pause is not among the remote job's notices: {notices:?}"
    );
    let text = market.consumer.cli(&["job", "notices", &id])?;
    ensure!(
        String::from_utf8_lossy(&text.stdout).lines().any(|l| l.contains("paused") && l.contains("owner")),
        "notices for people: {text:?}"
    );
    ensure!(market.big.cli(&["resume"])?.status.success());
    wait_job(&market.consumer, &id, Duration::from_secs(20), |j| j["state"] == "running")?;

    // Cancel at the consumer kills it at the provider.
    let cancel = market.consumer.cli(&["job", "cancel", &id])?;
    ensure!(cancel.status.success(), "cancel: {}", String::from_utf8_lossy(&cancel.stderr));
    wait_job(&market.consumer, &id, Duration::from_secs(20), |j| j["state"] == "cancelled")?;
    let until = Instant::now() + Duration::from_secs(10);
    while !pids_with(&marker).is_empty() {
        ensure!(Instant::now() < until, "the job's process outlived its cancel at the provider");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The provider dies mid-job: the consumer marks the job failed and says why.
    let id = submit(&market.consumer, &spec)?;
    wait_job(&market.consumer, &id, Duration::from_secs(60), |j| j["state"] == "running")?;
    market.big.stop_with(Signal::SIGKILL)?;
    let failed = wait_job(&market.consumer, &id, Duration::from_secs(60), |j| j["state"] == "failed")?;
    ensure!(
        failed["reason"].as_str().is_some_and(|r| r.contains("stopped answering")),
        "the failure does not say the provider is gone: {failed}"
    );
    Ok(())
}
