//! GPU jobs between agents, with fake GPUs (the `[testing] fake_gpus` test setting): a consumer, a
//! provider with one 8 GiB GPU and one with two 24 GiB GPUs, three agent processes on loopback. A
//! job asking for a 16 GiB GPU runs on the big provider, granted one GPU by UUID (the job sees it
//! in `NVIDIA_VISIBLE_DEVICES`); a policy pausing that GPU freezes that job alone while the job on
//! the other GPU runs on; the countersigned receipt counts GPU-seconds without the paused time;
//! and a job asking more GPU memory than any provider offers fails saying so.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::JobDir;
use hearth_tests::{ALWAYS_SHARE, Agent};
use serde_json::Value;

use crate::market::{job, json_array, submit, wait_job};
use crate::network::{address, wait_to_know};

/// The model a fake GPU is advertised and metered as.
const FAKE_MODEL: &str = "fake GPU (test setting)";

/// A GPU job: writes its environment to `/out/env.txt`, then sleeps `seconds`.
fn gpu_spec(gpu_memory: &str, seconds: u32) -> String {
    format!(
        "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"env > /out/env.txt; sleep {seconds}\"]\n\
         [resources]\ncpu = 0.25\nmemory = \"64MiB\"\ngpus = 1\ngpu_memory = \"{gpu_memory}\"\n\
         [limits]\ntime = \"300s\"\n"
    )
}

/// Starts `agent` declaring `count` fake GPUs of `memory` each, joining `bootstrap`.
fn with_fake_gpus(bootstrap: &str, count: u32, memory: &str) -> Result<Agent> {
    Agent::start_with_config(&format!(
        "[testing]\nfake_gpus = {count}\nfake_gpu_memory = \"{memory}\"\n\
         [network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nbootstrap = [\"{bootstrap}\"]\n"
    ))
}

/// Waits until `consumer` knows each provider advertising its number of GPUs.
fn wait_for_gpus(consumer: &Agent, providers: &[(&str, usize)]) -> Result<()> {
    let ids: Vec<&str> = providers.iter().map(|(id, _)| *id).collect();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let offers = wait_to_know(consumer, &ids, Duration::from_secs(30))?;
        let gpus = |id: &str| {
            offers
                .iter()
                .find(|o| o["peer_id"] == id)
                .and_then(|o| o["free"]["gpus"].as_array().map(Vec::len))
        };
        if providers.iter().all(|(id, count)| gpus(id) == Some(*count)) {
            return Ok(());
        }
        ensure!(Instant::now() < until, "the providers never advertised their GPUs: {offers:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets `agent`'s policy to always share, plus `extra`.
fn set_policy(agent: &Agent, extra: &str) -> Result<()> {
    let file = agent.data_dir().join("gpu-policy.toml");
    fs::write(&file, format!("{ALWAYS_SHARE}{extra}"))?;
    let set = agent.cli(&["policy", "set", file.to_str().context("path")?])?;
    ensure!(set.status.success(), "policy set: {}", String::from_utf8_lossy(&set.stderr));
    Ok(())
}

/// The GPU UUIDs the agreement of the consumer's job `job` grants.
fn granted(job: &Value) -> Vec<String> {
    job["agreement"]["terms"]["gpus"]
        .as_array()
        .map(|gpus| gpus.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The receipt body of `agreement_id` in `agent`'s ledger export.
fn receipt(agent: &Agent, dir: &JobDir, agreement_id: &str) -> Result<Value> {
    let file = dir.path().join("ledger.jsonl");
    let export = agent.cli(&["ledger", "export", "--out", file.to_str().context("path")?])?;
    ensure!(export.status.success(), "export: {}", String::from_utf8_lossy(&export.stderr));
    fn find(value: &Value, id: &str) -> Option<Value> {
        match value {
            Value::Object(map)
                if map.get("agreement_id") == Some(&Value::from(id)) && map.contains_key("usage") =>
            {
                Some(value.clone())
            }
            Value::Object(map) => map.values().find_map(|v| find(v, id)),
            Value::Array(items) => items.iter().find_map(|v| find(v, id)),
            _ => None,
        }
    }
    fs::read_to_string(&file)?
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find_map(|line| find(&line, agreement_id))
        .with_context(|| format!("no receipt of {agreement_id} in the consumer's ledger"))
}

pub(crate) fn a_gpu_job_is_matched_granted_by_uuid_paused_alone_and_metered() -> Result<()> {
    let consumer = Agent::start()?;
    let (bootstrap, _) = address(&consumer)?;
    let small = with_fake_gpus(&bootstrap, 1, "8GiB")?;
    let big = with_fake_gpus(&bootstrap, 2, "24GiB")?;
    let (_, small_id) = address(&small)?;
    let (_, big_id) = address(&big)?;
    wait_for_gpus(&consumer, &[(&small_id, 1), (&big_id, 2)])?;
    let dir = JobDir::new()?;

    // More memory than any GPU on offer: it fails, saying so (after the search's minute).
    let huge = dir.file("huge.toml", gpu_spec("48GiB", 1).as_bytes())?;
    let refused = submit(&consumer, &huge)?;

    // 16 GiB fits only the big provider's GPUs; two such jobs get one GPU each.
    let spec = dir.file("train.toml", gpu_spec("16GiB", 20).as_bytes())?;
    let first = submit(&consumer, &spec)?;
    let a = wait_job(&consumer, &first, Duration::from_secs(60), |j| j["state"] == "running")?;
    let second = submit(&consumer, &spec)?;
    let b = wait_job(&consumer, &second, Duration::from_secs(60), |j| j["state"] == "running")?;
    for ran in [&a, &b] {
        ensure!(ran["provider"] == big_id.as_str(), "a 16 GiB GPU job ran on {}", ran["provider"]);
    }
    let (gpu_a, gpu_b) = (granted(&a), granted(&b));
    ensure!(
        gpu_a.len() == 1 && gpu_b.len() == 1 && gpu_a != gpu_b,
        "the agreements do not grant one GPU each, apart: {gpu_a:?} {gpu_b:?}"
    );

    // The owner pauses the first job's GPU alone: that job freezes, the other runs on.
    set_policy(&big, &format!("[[gpu]]\nuuid = \"{}\"\npause = true\n", gpu_a[0]))?;
    wait_job(&consumer, &first, Duration::from_secs(20), |j| j["state"] == "paused")?;
    let other = job(&consumer, &second)?;
    ensure!(other["state"] == "running", "the job on the other GPU was held too: {other}");
    let at_provider = json_array(&big, &["jobs", "--json"])?;
    let states: Vec<&str> = at_provider.iter().filter_map(|j| j["state"].as_str()).collect();
    ensure!(
        states.iter().filter(|s| **s == "paused").count() == 1
            && states.iter().filter(|s| **s == "running").count() == 1,
        "the provider's jobs: {states:?}"
    );
    let notices = json_array(&consumer, &["job", "notices", &first, "--json"])?;
    ensure!(
        notices
            .iter()
            .any(|n| n["kind"] == "paused" && n["reason"].as_str().is_some_and(|r| r.contains(&gpu_a[0]))),
        "the pause does not name the GPU: {notices:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    set_policy(&big, "")?;
    wait_job(&consumer, &first, Duration::from_secs(20), |j| j["state"] != "paused")?;

    let finished = |j: &Value| j["state"] == "finished" && !j["charged"].is_null();
    let a = wait_job(&consumer, &first, Duration::from_secs(120), finished)?;
    let b = wait_job(&consumer, &second, Duration::from_secs(120), finished)?;

    // Each job saw exactly its own GPU, by UUID.
    for (id, gpu) in [(&first, &gpu_a[0]), (&second, &gpu_b[0])] {
        let out = dir.path().join(format!("results-{id}"));
        let results = consumer.cli(&["results", id, "--out", out.to_str().context("path")?])?;
        ensure!(results.status.success(), "results: {}", String::from_utf8_lossy(&results.stderr));
        let env = fs::read_to_string(out.join("env.txt"))?;
        for name in ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
            ensure!(env.lines().any(|l| l == format!("{name}={gpu}")), "{name} is not {gpu}:\n{env}");
        }
    }

    // The countersigned receipts count GPU-seconds by model, without the paused time, and charge
    // the agreed price per GPU-hour for them.
    let mut running = Vec::new();
    for done in [&a, &b] {
        let agreement_id = done["agreement"]["terms"]["agreement_id"].as_str().context("no agreement id")?;
        let body = receipt(&consumer, &dir, agreement_id)?;
        let running_ms = body["usage"]["running_ms"].as_u64().context("running_ms")?;
        let gpu_s = &body["usage"]["gpu_s"];
        ensure!(
            *gpu_s == serde_json::json!({ FAKE_MODEL: running_ms / 1000 }),
            "GPU-seconds {gpu_s} for {running_ms} ms"
        );
        let gpu_hour = body["prices"]["gpu_hour"].as_u64().context("gpu_hour")?;
        let charged = body["charges"]["gpu"].as_u64().context("charges")?;
        ensure!(charged == (gpu_hour * running_ms).div_ceil(3_600_000), "GPU charge {charged}: {body}");
        ensure!(done["charged"] == body["amount"], "the job's charge is not the receipt's: {done}");
        running.push(running_ms);
    }
    ensure!(running[0] + 2000 <= running[1], "the paused time was metered: {running:?} ms");
    let verify = consumer.cli(&["ledger", "verify"])?;
    ensure!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    let failed = wait_job(&consumer, &refused, Duration::from_secs(90), |j| j["state"] == "failed")?;
    ensure!(
        failed["reason"].as_str().is_some_and(|r| r.contains("no provider offers a GPU with 48.00 GiB")),
        "{failed}"
    );
    Ok(())
}
