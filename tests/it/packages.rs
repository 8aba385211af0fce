//! Request packages with real agent processes on loopback: a consumer, a CPU provider and a
//! provider declaring two fake GPUs (the `[testing] fake_gpus` test setting). A package of two
//! GPUs on one machine after a CPU machine is acquired in order and runs its tasks in order; a
//! provider that refuses brings retries and then a rollback that leaves nothing held; an invalid
//! package is refused with every problem and queues nothing; a consumer killed mid-acquisition
//! ends its request cleanly after a restart, and a reservation nobody keeps lapses by itself.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use hearth_tests::jobs::{JobDir, wasm_module};
use hearth_tests::{Agent, json_of};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::network::{address, wait_to_know};

/// TEST SETTING: the GPU provider declares two GPUs it does not have.
const FAKE_GPUS: &str = "[testing]\nfake_gpus = 2\nfake_gpu_memory = \"16GiB\"\n";

/// A consumer and two providers that joined it, with their peer ids.
struct Homes {
    consumer: Agent,
    cpu: Agent,
    gpu: Agent,
    cpu_id: String,
    gpu_id: String,
}

impl Homes {
    /// The CPU provider is the others' bootstrap, so a restarted consumer finds its way back.
    fn start() -> Result<Self> {
        let cpu = Agent::start()?;
        let (bootstrap, cpu_id) = address(&cpu)?;
        let network = format!(
            "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nbootstrap = [\"{bootstrap}\"]\n"
        );
        let consumer = Agent::start_with_config(&network)?;
        let gpu = Agent::start_with_config(&format!("{FAKE_GPUS}{network}"))?;
        let (_, gpu_id) = address(&gpu)?;
        let homes = Self { consumer, cpu, gpu, cpu_id, gpu_id };
        wait_to_know(&homes.consumer, &[&homes.cpu_id], Duration::from_secs(30))?;
        homes.wait_for_gpus(&homes.consumer)?;
        Ok(homes)
    }

    /// Waits until `agent` knows the GPU provider advertising its two GPUs.
    fn wait_for_gpus(&self, agent: &Agent) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let offers = wait_to_know(agent, &[&self.gpu_id], Duration::from_secs(30))?;
            let gpus = offers
                .iter()
                .find(|o| o["peer_id"] == self.gpu_id.as_str())
                .and_then(|o| o["free"]["gpus"].as_array().map(Vec::len))
                .unwrap_or(0);
            if gpus == 2 {
                return Ok(());
            }
            ensure!(Instant::now() < until, "the GPU provider never advertised its 2 fake GPUs: {offers:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A folder with the job specs and package files of one test.
struct Files {
    dir: JobDir,
}

impl Files {
    fn new() -> Result<Self> {
        let dir = JobDir::new()?;
        fs::copy(wasm_module("copy")?, dir.path().join("copy.wasm"))?;
        fs::copy(wasm_module("true")?, dir.path().join("true.wasm"))?;
        fs::copy(wasm_module("spin")?, dir.path().join("spin.wasm"))?;
        fs::write(dir.path().join("data.bin"), b"raw data to prepare\n")?;
        let small = "[resources]\ncpu = 1\nmemory = \"64MiB\"\ndisk = \"64MiB\"\n";
        dir.file(
            "prep.toml",
            format!(
                "kind = \"wasi\"\nmodule = \"copy.wasm\"\nargs = [\"data.bin\", \"prepared.bin\"]\n\
                 inputs = [\"data.bin\"]\n{small}[limits]\ntime = \"120s\"\n"
            )
            .as_bytes(),
        )?;
        dir.file(
            "train.toml",
            format!("kind = \"wasi\"\nmodule = \"true.wasm\"\n{small}[limits]\ntime = \"120s\"\n").as_bytes(),
        )?;
        dir.file(
            "spin.toml",
            format!("kind = \"wasi\"\nmodule = \"spin.wasm\"\n{small}[limits]\ntime = \"25s\"\n").as_bytes(),
        )?;
        Ok(Self { dir })
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        self.dir.file(name, text.as_bytes())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Two GPUs on one machine, after a CPU machine for preprocessing.
fn two_gpus_after_a_cpu(retries: u32, backoff: &str, hold: &str) -> String {
    format!(
        "name = \"train\"\nretries = {retries}\nbackoff = \"{backoff}\"\nhold = \"{hold}\"\n\n\
         [resources.prep]\ncpu = 1\nmemory = \"64MiB\"\ndisk = \"64MiB\"\n\n\
         [resources.train]\ncpu = 1\nmemory = \"64MiB\"\ndisk = \"64MiB\"\ngpus = 2\nafter = [\"prep\"]\n\n\
         [[tasks]]\nresource = \"prep\"\nspec = \"prep.toml\"\n\n\
         [[tasks]]\nresource = \"train\"\nspec = \"train.toml\"\n"
    )
}

/// Holds both GPUs of the GPU provider for about 25 s (a task that spins until its time limit).
const BLOCKER: &str = "name = \"blocker\"\nhold = \"60s\"\n[resources.gpus]\ncpu = 1\nmemory = \"64MiB\"\n\
                       disk = \"64MiB\"\ngpus = 2\n[[tasks]]\nresource = \"gpus\"\nspec = \"spin.toml\"\n";

/// `hearth submit FILE` on `agent`: the request id from stdout's first line.
fn submit(agent: &Agent, file: &Path) -> Result<String> {
    let started = Instant::now();
    let output = agent.cli(&["submit", file.to_str().context("path")?])?;
    ensure!(output.status.success(), "submit failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout)?;
    let id = stdout.lines().next().context("no id")?.trim().to_owned();
    ensure!(!id.is_empty() && !id.contains(' '), "the first line is not an id alone: {stdout:?}");
    // The answer comes at once, not after the acquisition (which takes a network round trip per
    // resource at least): the status right after says so.
    let status = status(agent, &id)?;
    ensure!(
        matches!(status["state"].as_str(), Some("queued" | "acquiring" | "running")),
        "just submitted, yet {status} ({:?} after submit)",
        started.elapsed()
    );
    Ok(id)
}

/// `hearth request status ID --json`.
fn status(agent: &Agent, id: &str) -> Result<Value> {
    let output = agent.cli(&["request", "status", id, "--json"])?;
    ensure!(output.status.success(), "request status failed: {}", String::from_utf8_lossy(&output.stderr));
    json_of(&output)
}

/// Waits until request `id` on `agent` satisfies `done`, checking the counts at every look.
fn wait_request(agent: &Agent, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let until = Instant::now() + within;
    loop {
        let now = status(agent, id)?;
        counts_add_up(&now)?;
        if done(&now) {
            return Ok(now);
        }
        if Instant::now() > until {
            bail!("request {id} never got there; it is {now:#}\n--- consumer log ---\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn terminal(status: &Value) -> bool {
    matches!(status["state"].as_str(), Some("completed" | "failed" | "rolled_back"))
}

/// The counts a status shows are the counts of its task list.
fn counts_add_up(status: &Value) -> Result<()> {
    let tasks = status["task_list"].as_array().context("task_list")?;
    let count = |state: &str| tasks.iter().filter(|t| t["state"] == state).count() as u64;
    ensure!(status["tasks"].as_u64() == Some(tasks.len() as u64), "tasks: {status}");
    ensure!(status["succeeded"].as_u64() == Some(count("succeeded")), "succeeded: {status}");
    ensure!(status["failed"].as_u64() == Some(count("failed")), "failed: {status}");
    let failures = status["failures"].as_array().map_or(0, Vec::len) as u64;
    ensure!(failures == count("failed"), "a failure without its reason: {status}");
    Ok(())
}

/// The verifier written from docs/ledger.md says the export is ok, where Python is.
fn python_verifies(export: &Path) -> Result<()> {
    if !crate::python_present() {
        eprintln!(
            "SKIPPED part of {}: python3 is not installed, the Python verifier did not run",
            module_path!()
        );
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_ledger.py");
    let output = std::process::Command::new("python3").arg(script).arg(export).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.starts_with("ok "),
        "{}: {stdout}{}",
        export.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The reservations `agent` holds now (`hearth reservations --json`).
fn held(agent: &Agent) -> Result<Vec<Value>> {
    let output = agent.cli(&["reservations", "--json"])?;
    ensure!(output.status.success(), "reservations failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(json_of(&output)?.as_array().cloned().unwrap_or_default())
}

/// The reservations `agent` holds for request `id`.
fn held_for(agent: &Agent, id: &str) -> Result<Vec<Value>> {
    Ok(held(agent)?.into_iter().filter(|r| r["request_id"] == id).collect())
}

fn resource<'a>(status: &'a Value, name: &str) -> Result<&'a Value> {
    status["resources"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["resource"] == name))
        .with_context(|| format!("no resource {name} in {status}"))
}

/// Collects the `request_changed` events of the consumer's stream until one says a request
/// ended (or 150 s pass), in a thread of its own.
fn record_events(agent: &Agent) -> Result<std::thread::JoinHandle<Result<Vec<Value>>>> {
    let (port, token) = (agent.port()?, agent.token()?);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
            let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(150);
            loop {
                let message = tokio::time::timeout_at(until, socket.next()).await.context("no end event")?;
                let Some(Ok(Message::Text(text))) = message else { bail!("the stream ended: {message:?}") };
                let event: Value = serde_json::from_str(&text)?;
                if event["type"] == "request_changed" {
                    let request = event["request"].clone();
                    let end = terminal(&request);
                    seen.push(request);
                    if end {
                        return Ok(seen);
                    }
                }
            }
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).context("the event stream did not open")?;
    Ok(handle)
}

pub(crate) fn two_gpus_after_a_cpu_machine_are_acquired_in_order_and_run_their_tasks_in_order() -> Result<()>
{
    let homes = Homes::start()?;
    let files = Files::new()?;
    let package = files.write("train.package.toml", &two_gpus_after_a_cpu(3, "200ms", "60s"))?;
    let events = record_events(&homes.consumer)?;
    let id = submit(&homes.consumer, &package)?;
    let end = wait_request(&homes.consumer, &id, Duration::from_secs(120), terminal)?;
    ensure!(end["state"] == "completed", "{end:#}\n--- consumer log ---\n{}", homes.consumer.log());
    ensure!(end["tasks"] == 2 && end["succeeded"] == 2 && end["failed"] == 0, "{end:#}");

    // Acquired in order: prep first, then train, which only the GPU provider can hold (both GPUs
    // on that one machine).
    let (prep, train) = (resource(&end, "prep")?, resource(&end, "train")?);
    ensure!(prep["order"] == 1 && train["order"] == 2, "acquisition order: {prep} {train}");
    ensure!(prep["acquired_at_ms"].as_i64() <= train["acquired_at_ms"].as_i64(), "{prep} {train}");
    ensure!(train["provider"] == homes.gpu_id.as_str(), "train went to {}", train["provider"]);
    ensure!(
        train["gpus"] == serde_json::json!(["FAKE-GPU-0", "FAKE-GPU-1"]),
        "train holds {}",
        train["gpus"]
    );
    ensure!(prep["state"] == "released" && train["state"] == "released", "not released: {end:#}");
    ensure!(prep["attempts"] == 1 && train["attempts"] == 1, "tries: {end:#}");

    // Run in dependency order: train's task started after prep's ended, on their own providers.
    let tasks = end["task_list"].as_array().context("task_list")?;
    ensure!(tasks[0]["ended_at_ms"].as_i64() <= tasks[1]["started_at_ms"].as_i64(), "task order: {tasks:?}");
    let jobs = json_of(&homes.consumer.cli(&["jobs", "--json"])?)?;
    for (task, provider) in [(&tasks[0], &prep["provider"]), (&tasks[1], &train["provider"])] {
        let job = jobs
            .as_array()
            .and_then(|all| all.iter().find(|j| j["id"] == task["job_id"]))
            .with_context(|| format!("no remote job for {task}"))?;
        ensure!(job["state"] == "finished" && job["provider"] == *provider, "{job}");
        ensure!(job["request"] == id.as_str(), "the job does not name its request: {job}");
    }
    let out = files.dir.path().join("prep-results");
    let results = homes.consumer.cli(&[
        "results",
        tasks[0]["job_id"].as_str().context("job")?,
        "--out",
        out.to_str().context("out")?,
    ])?;
    ensure!(results.status.success(), "{}", String::from_utf8_lossy(&results.stderr));
    ensure!(
        fs::read(out.join("prepared.bin"))?.iter().rev().copied().collect::<Vec<u8>>()
            == b"raw data to prepare\n",
        "prep's output"
    );

    // Nothing is held anywhere now; every ledger verifies, and both sides of a reservation keep
    // the signed ask, grant and release.
    for provider in [&homes.cpu, &homes.gpu] {
        ensure!(held(provider)?.is_empty(), "still held: {:?}", held(provider)?);
    }
    for (name, agent) in [("consumer", &homes.consumer), ("cpu", &homes.cpu), ("gpu", &homes.gpu)] {
        let verify = agent.cli(&["ledger", "verify"])?;
        ensure!(verify.status.success(), "{name}'s ledger: {}", String::from_utf8_lossy(&verify.stdout));
        let file = files.dir.path().join(format!("{name}.jsonl"));
        let export = agent.cli(&["ledger", "export", "--out", file.to_str().context("path")?])?;
        ensure!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
        if name != "cpu" {
            let text = fs::read_to_string(&file)?;
            for event in ["\"reserve\"", "\"granted\"", "\"released\""] {
                ensure!(text.contains(event), "the {name}'s ledger has no {event} reservation record");
            }
        }
        python_verifies(&file)?;
    }

    // Every change was pushed on the event stream, with exact counts each time.
    let seen = events.join().map_err(|_| anyhow::anyhow!("the event thread panicked"))??;
    let mine: Vec<&Value> = seen.iter().filter(|s| s["id"] == id.as_str()).collect();
    ensure!(mine.len() >= 6, "few events: {mine:?}");
    let mut last = 0;
    for status in &mine {
        counts_add_up(status)?;
        let done = status["succeeded"].as_u64().unwrap_or(0);
        ensure!(done >= last, "succeeded went down: {status}");
        last = done;
    }
    let states: Vec<&str> = mine.iter().filter_map(|s| s["state"].as_str()).collect();
    let mut order: Vec<&str> = states.clone();
    order.dedup();
    ensure!(
        order == ["queued", "acquiring", "running", "releasing", "completed"],
        "states pushed: {order:?}"
    );
    Ok(())
}

pub(crate) fn a_refusing_provider_brings_retries_then_a_rollback_that_leaves_nothing_held() -> Result<()> {
    let homes = Homes::start()?;
    let files = Files::new()?;
    // The CPU provider takes both GPUs of the GPU provider for a while.
    homes.wait_for_gpus(&homes.cpu)?;
    let blocker = submit(&homes.cpu, &files.write("blocker.toml", BLOCKER)?)?;
    wait_request(&homes.cpu, &blocker, Duration::from_secs(60), |s| s["state"] == "running")?;

    let package = files.write("train.package.toml", &two_gpus_after_a_cpu(2, "300ms", "60s"))?;
    let id = submit(&homes.consumer, &package)?;
    let end = wait_request(&homes.consumer, &id, Duration::from_secs(60), terminal)?;
    ensure!(end["state"] == "rolled_back", "{end:#}\n--- consumer log ---\n{}", homes.consumer.log());
    let (prep, train) = (resource(&end, "prep")?, resource(&end, "train")?);
    ensure!(train["attempts"] == 3 && train["state"] == "failed", "train: {train}");
    ensure!(train["error"].as_str().is_some_and(|e| e.contains("busy")), "train's last error: {train}");
    ensure!(prep["state"] == "released" && prep["order"] == 1, "prep: {prep}");
    let reason = end["reason"].as_str().context("no reason")?;
    ensure!(reason.contains("train not acquired after 3 tries"), "{reason}");
    ensure!(reason.contains("released in reverse order: prep"), "{reason}");
    ensure!(end["tasks"] == 2 && end["succeeded"] == 0 && end["failed"] == 0, "{end:#}");
    ensure!(
        end["task_list"].as_array().is_some_and(|t| t.iter().all(|t| t["state"] == "skipped")),
        "{end:#}"
    );

    // After the rollback no provider holds anything of it; the GPU provider holds the blocker's.
    for provider in [&homes.cpu, &homes.gpu] {
        ensure!(held_for(provider, &id)?.is_empty(), "still held: {:?}", held(provider)?);
    }
    ensure!(held_for(&homes.gpu, &blocker)?.len() == 1, "the blocker's: {:?}", held(&homes.gpu)?);
    let prep_provider = if prep["provider"] == homes.cpu_id.as_str() { &homes.cpu } else { &homes.gpu };
    let export = String::from_utf8(prep_provider.cli(&["ledger", "export"])?.stdout)?;
    ensure!(
        export.lines().any(|line| line.contains("\"released\"") && line.contains("rolled back")),
        "no signed rollback release in prep's provider's ledger"
    );

    // The blocker ends (its task hits its time limit) and releases the GPUs too.
    let blocked = wait_request(&homes.cpu, &blocker, Duration::from_secs(90), terminal)?;
    ensure!(blocked["state"] == "failed" && blocked["failed"] == 1, "{blocked:#}");
    ensure!(
        blocked["failures"][0].as_str().is_some_and(|f| f.contains("time limit")),
        "the blocker's failure: {blocked:#}"
    );
    ensure!(held(&homes.gpu)?.is_empty(), "still held: {:?}", held(&homes.gpu)?);
    Ok(())
}

pub(crate) fn an_invalid_package_or_a_bad_token_is_refused_and_queues_nothing() -> Result<()> {
    let consumer = Agent::start()?;
    let files = Files::new()?;
    let bad = files.write(
        "bad.package.toml",
        "[resources.a]\ncpu = 1\nmemory = \"lots\"\nafter = [\"c\"]\n\
         [resources.b]\nafter = [\"a\"]\n[resources.c]\nafter = [\"b\", \"warmup\"]\n\
         [[tasks]]\nresource = \"a\"\nspec = \"train.toml\"\n[[tasks]]\nresource = \"b\"\nspec = \"train.toml\"\n\
         [[tasks]]\nresource = \"c\"\nspec = \"train.toml\"\n",
    )?;
    let output = consumer.cli(&["submit", bad.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "an invalid package was accepted");
    ensure!(output.stdout.is_empty(), "an id was printed for an invalid package");
    for problem in ["cycle: a -> c -> b -> a", "\"warmup\", which is not a resource", "\"lots\""] {
        ensure!(stderr.contains(problem), "{problem:?} is not among the problems: {stderr}");
    }
    ensure!(stderr.trim().lines().count() == 1, "not one line: {stderr}");

    // The daemon refuses it the same way, listing every problem; and a wrong token gets a token
    // error and nothing else.
    // The package goes by content, with the task spec and its module it names.
    let (port, token) = (consumer.port()?, consumer.token()?);
    let (package, train, module) =
        (fs::read_to_string(&bad)?, fs::read(files.path("train.toml"))?, fs::read(files.path("true.wasm"))?);
    let post = |token: &str| -> Result<(u16, String)> {
        let form = reqwest::multipart::Form::new()
            .text("package", package.clone())
            .part("file", reqwest::multipart::Part::bytes(train.clone()).file_name("train.toml"))
            .part("file", reqwest::multipart::Part::bytes(module.clone()).file_name("true.wasm"));
        let url = format!("http://127.0.0.1:{port}/api/v1/packages");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let client = reqwest::Client::builder().no_proxy().build()?;
            let response = client.post(url).bearer_auth(token).multipart(form).send().await?;
            Ok((response.status().as_u16(), response.text().await?))
        })
    };
    let code = |body: &str| serde_json::from_str::<Value>(body).ok().map(|b| b["code"].clone());
    let (status, body) = post(&token)?;
    ensure!(status == 400 && code(&body) == Some(Value::from("invalid_package")), "{status} {body}");
    let problems: Value = serde_json::from_str(&body)?;
    ensure!(problems["problems"].as_array().is_some_and(|p| p.len() >= 3), "{problems}");
    let (status, forged) = post("0000000000000000000000000000000000000000000000000000000000000000")?;
    ensure!(status == 401 && code(&forged) == Some(Value::from("unauthorized")), "{status} {forged}");
    ensure!(!forged.contains("cycle") && !forged.contains("lots"), "a token error told more: {forged}");

    let list = json_of(&consumer.cli(&["request", "list", "--json"])?)?;
    ensure!(list.as_array().is_some_and(Vec::is_empty), "something was queued: {list}");
    let unknown = consumer.cli(&["request", "status", "0123456789abcdef"])?;
    ensure!(!unknown.status.success(), "an unknown request has a status");
    ensure!(String::from_utf8_lossy(&unknown.stderr).contains("no request 0123456789abcdef"), "{unknown:?}");
    Ok(())
}

pub(crate) fn a_consumer_killed_mid_acquisition_ends_its_request_cleanly_after_a_restart() -> Result<()> {
    let mut homes = Homes::start()?;
    let files = Files::new()?;
    homes.wait_for_gpus(&homes.cpu)?;
    let blocker = submit(&homes.cpu, &files.write("blocker.toml", BLOCKER)?)?;
    wait_request(&homes.cpu, &blocker, Duration::from_secs(60), |s| s["state"] == "running")?;

    // Held idle for 3 s unless kept: the consumer keeps it while it lives.
    let package = files.write("train.package.toml", &two_gpus_after_a_cpu(6, "1s", "3s"))?;
    let id = submit(&homes.consumer, &package)?;
    let mid = wait_request(&homes.consumer, &id, Duration::from_secs(60), |s| {
        s["resources"][0]["state"] == "held" && s["resources"][1]["attempts"].as_u64() >= Some(1)
    })?;
    let prep_provider =
        if mid["resources"][0]["provider"] == homes.cpu_id.as_str() { &homes.cpu } else { &homes.gpu };
    ensure!(held_for(prep_provider, &id)?.len() == 1, "prep is not held: {:?}", held(prep_provider)?);

    // Killed in the middle of acquiring train (prep held, train refused and waiting to retry).
    homes.consumer.stop_with(Signal::SIGKILL)?;
    // Nobody keeps prep now: the provider lets it lapse by itself.
    let until = Instant::now() + Duration::from_secs(15);
    while !held_for(prep_provider, &id)?.is_empty() {
        ensure!(Instant::now() < until, "prep was never let go: {:?}", held(prep_provider)?);
        std::thread::sleep(Duration::from_millis(200));
    }

    homes.consumer.restart()?;
    let after = status(&homes.consumer, &id)?;
    counts_add_up(&after)?;
    ensure!(!terminal(&after) || after["state"] != "completed" || after["succeeded"] == 2, "{after:#}");
    let end = wait_request(&homes.consumer, &id, Duration::from_secs(120), terminal)?;
    match end["state"].as_str() {
        Some("completed") => ensure!(end["succeeded"] == 2 && end["failed"] == 0, "{end:#}"),
        Some("rolled_back") => ensure!(end["succeeded"] == 0 && end["failed"] == 0, "{end:#}"),
        _ => bail!("ended neither completed nor rolled back: {end:#}\n{}", homes.consumer.log()),
    }
    let prep = resource(&end, "prep")?;
    ensure!(
        prep["error"].as_str().is_some_and(|e| e.contains("lapsed")) || prep["attempts"].as_u64() >= Some(2),
        "the restarted consumer did not notice prep lapsed: {prep}"
    );
    for provider in [&homes.cpu, &homes.gpu] {
        ensure!(held_for(provider, &id)?.is_empty(), "leaked: {:?}", held(provider)?);
    }
    Ok(())
}
