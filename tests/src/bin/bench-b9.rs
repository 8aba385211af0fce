//! Benchmark B9, request packages: PACKAGES packages (default 1,000) of three resources each,
//! across PROVIDERS provider agents (default 10), with injected failures.
//!
//! `bench-b9 [PACKAGES] [PROVIDERS]`. The providers and one consumer run as processes on loopback
//! (provider 0 alone, the others bootstrapping to providers 0 and 1). One package file, with
//! resources a, c and b after a (waves [a, c] then [b]), each holding half a core and running a
//! WASI `true.wasm` task, is submitted PACKAGES times, each submission its own request. The
//! failures are real ones: capacity contention (a provider has room for three halves of a core,
//! so asks are refused `busy`); the owners of two providers (the two the consumer asks most then)
//! pause sharing once 10% of the packages are accepted and resume at 70% (at least 1 s later);
//! one provider, the one holding the most then, is killed with SIGKILL at 30%, taking the
//! reservations it held with it. Provider 0, everyone's bootstrap, is spared. (The run is short:
//! most requests end within a second or so of their submission, so "mid-run" is measured by the
//! submissions.)
//!
//! Acceptance: the POSTs to `/api/v1/packages` from four threads over keep-alive connections,
//! timed from the first POST to the last 201, beside the same number of `GET /api/v1/status`
//! calls over the same client path as the baseline. Then it waits (at most 20 minutes) for every
//! request to end, and checks for leaks: what every live provider still holds right after the
//! last request ended, and again within the hold period plus 5 s; and that no request's resource
//! ended held or asking. It exits non-zero on a leak or on a request that never ended. With
//! `B9_LOGS=DIR` set, every agent's log is kept in DIR.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use hearth_tests::jobs::wasm_module;
use hearth_tests::{Agent, LOOPBACK_NETWORK, hearth_bin, percentile_ms};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The package's `hold`, in seconds.
const HOLD_S: u64 = 30;

/// Client threads that submit at once.
const CLIENTS: usize = 4;

/// The accepted rate B9 asks for, in packages per second.
const TARGET_RATE: f64 = 200.0;

/// The longest wait for every request to end.
const SETTLE_LIMIT: Duration = Duration::from_secs(20 * 60);

/// How often the consumer's requests are looked at while they settle.
const POLL: Duration = Duration::from_secs(1);

/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Fractions of the packages accepted at which the owners of two providers pause sharing, one
/// provider is killed, and the owners resume (but no sooner than `MIN_PAUSE` seconds after the
/// pause, so every agent has seen it).
const PAUSE_AT: f64 = 0.10;
const KILL_AT: f64 = 0.30;
const RESUME_AT: f64 = 0.70;
const MIN_PAUSE: f64 = 1.0;

/// The package: a and c first (in parallel), then b after a.
const PACKAGE: &str = "name = \"b9\"\nretries = 2\nbackoff = \"100ms\"\nhold = \"30s\"\n\n\
                       [resources.a]\ncpu = 0.5\nmemory = \"32MiB\"\ndisk = \"16MiB\"\n\n\
                       [resources.b]\ncpu = 0.5\nmemory = \"32MiB\"\ndisk = \"16MiB\"\nafter = [\"a\"]\n\n\
                       [resources.c]\ncpu = 0.5\nmemory = \"32MiB\"\ndisk = \"16MiB\"\n\n\
                       [[tasks]]\nresource = \"a\"\nspec = \"true.toml\"\n\n\
                       [[tasks]]\nresource = \"b\"\nspec = \"true.toml\"\n\n\
                       [[tasks]]\nresource = \"c\"\nspec = \"true.toml\"\n";

/// Each task: a WASI module that exits 0 at once, in what its resource holds.
const TASK: &str = "kind = \"wasi\"\nmodule = \"true.wasm\"\n\
                    [resources]\ncpu = 0.5\nmemory = \"32MiB\"\ndisk = \"16MiB\"\n\
                    [limits]\ntime = \"60s\"\n";

const TERMINAL: [&str; 3] = ["completed", "failed", "rolled_back"];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("bench-b9: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The whole benchmark; false when a leak was found or a request never ended.
fn run() -> Result<bool> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut args = std::env::args().skip(1);
    let packages: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let provider_count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(10);
    ensure!(packages >= 1, "at least one package");
    ensure!(provider_count >= 4, "at least 4 providers (the bootstrap, 2 to pause, 1 to kill)");

    // The files: one package, one task spec, the module beside them.
    let files = tempfile::tempdir()?;
    fs::copy(wasm_module("true")?, files.path().join("true.wasm")).context("copying true.wasm")?;
    fs::write(files.path().join("true.toml"), TASK)?;
    let package_path = files.path().join("b9.package.toml");
    fs::write(&package_path, PACKAGE)?;

    // The agents: provider 0 alone, every other one (and the consumer) told providers 0 and 1.
    let started = Instant::now();
    let mut providers: Vec<Agent> = Vec::new();
    let mut addresses: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..provider_count {
        let bootstrap: Vec<&str> = addresses.iter().take(2).map(String::as_str).collect();
        let agent = Agent::start_with_config(&network_with(&bootstrap))?;
        let (address, id) = agent.address()?;
        println!("provider {i}: {id} in {}", agent.data_dir().display());
        providers.push(agent);
        addresses.push(address);
        ids.push(id);
    }
    let bootstrap: Vec<&str> = addresses.iter().take(2).map(String::as_str).collect();
    let consumer = Agent::start_with_config(&network_with(&bootstrap))?;
    let (_, consumer_id) = consumer.address()?;
    println!("consumer: {consumer_id} in {}", consumer.data_dir().display());
    let mut api = Http::new(&consumer)?;
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let offers = api.get_json("/api/v1/offers")?;
        let sharing: HashSet<&str> = offers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|offer| offer["state"] == "sharing")
            .filter_map(|offer| offer["peer_id"].as_str())
            .collect();
        let missing = ids.iter().filter(|id| !sharing.contains(id.as_str())).count();
        if missing == 0 {
            break;
        }
        ensure!(Instant::now() < until, "after 120 s the consumer lists {missing} providers not sharing");
        std::thread::sleep(Duration::from_millis(250));
    }
    let converged = started.elapsed();
    println!(
        "{} agents up; the consumer lists all {provider_count} providers sharing after {:.1} s",
        provider_count + 1,
        converged.as_secs_f64()
    );

    // The baseline, then the submissions, over the same client path.
    let baseline = hammer(&consumer, packages, "GET", "/api/v1/status", "", None)?;
    let baseline = Rate::of(&baseline, 200);
    println!(
        "baseline: {} GET /api/v1/status in {:.2} s, {:.0}/s",
        baseline.ok, baseline.seconds, baseline.per_s
    );
    let fsync = fsync_cost()?;
    let body = serde_json::json!({ "path": package_path }).to_string();
    let accepted_so_far = AtomicUsize::new(0);
    let injector_api = Http::new(&consumer)?;
    let finished = AtomicBool::new(false);
    let run_start = Instant::now();
    // The injector owns the providers while requests run; the consumer is only talked to here.
    let (posts, settled, last, faults, first_post, settled_at) = std::thread::scope(|scope| -> Result<_> {
        let injector = scope.spawn(|| {
            inject(&mut providers, &ids, injector_api, packages, &accepted_so_far, &finished, run_start)
        });
        let outcome = (|| -> Result<_> {
            let posts =
                hammer(&consumer, packages, "POST", "/api/v1/packages", &body, Some(&accepted_so_far))?;
            let first_post = posts.iter().map(|c| c.start).min().context("no POST")?;
            let accepted = Rate::of(&posts, 201);
            println!(
                "accepted: {} of {packages} packages in {:.2} s, {:.0}/s ({} refused{})",
                accepted.ok,
                accepted.seconds,
                accepted.per_s,
                accepted.errors,
                accepted.first_error.as_deref().map(|e| format!(", the first: {e}")).unwrap_or_default()
            );
            let mut wanted: HashSet<String> = HashSet::new();
            for call in posts.iter().filter(|c| c.status == 201) {
                let status: Value = serde_json::from_str(&call.body).context("a 201 that is not JSON")?;
                wanted.insert(status["id"].as_str().context("a 201 without an id")?.to_owned());
            }
            ensure!(!wanted.is_empty(), "no package was accepted");
            let (settled, last, settled_at) = settle(&mut api, &wanted, first_post)?;
            Ok((posts, settled, last, first_post, settled_at))
        })();
        finished.store(true, Ordering::SeqCst);
        let faults = injector.join().map_err(|_| anyhow!("the injector panicked"))??;
        let (posts, settled, last, first_post, settled_at) = outcome?;
        Ok((posts, settled, last, faults, first_post, settled_at))
    })?;
    let accepted = Rate::of(&posts, 201);
    let last_201 = posts.iter().filter(|c| c.status == 201).map(|c| c.end).max().unwrap_or(first_post);
    let live: Vec<bool> = providers.iter().map(|p| p.pid().is_some()).collect();
    let settle_time = settled_at.duration_since(first_post);
    let after_last_201 = settled_at.duration_since(last_201);

    // Right after the last request ended: what every live provider still holds.
    let mut at_settle: Vec<(usize, Value)> = Vec::new();
    for (i, provider) in providers.iter().enumerate().filter(|(i, _)| live[*i]) {
        at_settle.extend(held(provider)?.into_iter().map(|r| (i, r)));
    }
    let at_settle_after = settled_at.elapsed();
    // Then again until the hold period plus 5 s has passed, or until nothing was held at three
    // looks in a row.
    let deadline = settled_at + Duration::from_secs(HOLD_S + 5);
    let mut empty_looks = 0;
    let (later, later_at) = loop {
        std::thread::sleep(Duration::from_secs(1));
        let mut all = Vec::new();
        for (i, provider) in providers.iter().enumerate().filter(|(i, _)| live[*i]) {
            all.extend(held(provider)?.into_iter().map(|r| (i, r)));
        }
        empty_looks = if all.is_empty() { empty_looks + 1 } else { 0 };
        if empty_looks >= 3 || Instant::now() >= deadline {
            break (all, settled_at.elapsed());
        }
    };

    // What the requests say.
    let count_state = |state: &str| last.iter().filter(|s| s["state"] == state).count();
    let (completed, failed, rolled_back) =
        (count_state("completed"), count_state("failed"), count_state("rolled_back"));
    let sum = |field: &str| last.iter().filter_map(|s| s[field].as_u64()).sum::<u64>();
    let (succeeded, tasks_failed, tasks) = (sum("succeeded"), sum("failed"), sum("tasks"));
    let resources: Vec<(&Value, &Value)> = last
        .iter()
        .flat_map(|s| s["resources"].as_array().into_iter().flatten().map(move |r| (s, r)))
        .collect();
    let attempts: u64 = resources.iter().filter_map(|(_, r)| r["attempts"].as_u64()).sum();
    let mut hold_states: BTreeMap<String, usize> = BTreeMap::new();
    for (_, r) in &resources {
        *hold_states.entry(r["state"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    let still_held: Vec<&(&Value, &Value)> =
        resources.iter().filter(|(_, r)| matches!(r["state"].as_str(), Some("held" | "asking"))).collect();
    let undelivered = resources
        .iter()
        .filter(|(_, r)| r["error"].as_str().is_some_and(|e| e.contains("release did not reach")))
        .count();
    let skipped: usize = last
        .iter()
        .flat_map(|s| s["task_list"].as_array().into_iter().flatten())
        .filter(|t| t["state"] == "skipped")
        .count();

    // Why acquisitions failed, from the consumer's log (one line per failed try).
    let log = consumer.log();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("an acquisition failed")).collect();
    let busy = failures.iter().filter(|l| l.contains("busy")).count();
    let paused = failures.iter().filter(|l| l.contains("paused")).count();
    let lapsed_lines = log.lines().filter(|l| l.contains("a reservation lapsed")).count();
    let mut task_failures: BTreeMap<String, usize> = BTreeMap::new();
    for failure in last.iter().flat_map(|s| s["failures"].as_array().into_iter().flatten()) {
        *task_failures.entry(shape(failure.as_str().unwrap_or("?"))).or_default() += 1;
    }
    let mut rollbacks: BTreeMap<String, usize> = BTreeMap::new();
    for status in last.iter().filter(|s| s["state"] == "rolled_back") {
        *rollbacks.entry(rollback_shape(status["reason"].as_str().unwrap_or("?"))).or_default() += 1;
    }

    // The requests that held a reservation at the killed provider.
    let by_id: HashMap<&str, &Value> = last.iter().filter_map(|s| Some((s["id"].as_str()?, s))).collect();
    let killed_outcomes = faults.killed.as_ref().map(|(_, killed)| {
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        let unique: HashSet<&str> = killed.holders.iter().map(String::as_str).collect();
        for id in &unique {
            let state = by_id.get(id).and_then(|s| s["state"].as_str()).unwrap_or("unknown");
            *outcomes.entry(state.to_owned()).or_default() += 1;
        }
        (unique.len(), outcomes)
    });
    let on_victim = faults.killed.as_ref().map_or(0, |(_, killed)| {
        let victim = ids[killed.index].as_str();
        resources.iter().filter(|(_, r)| r["provider"] == victim && r["order"].is_u64()).count()
    });

    let rate_pass = accepted.per_s >= TARGET_RATE && accepted.errors == 0;
    let leak_free = settled && later.is_empty() && still_held.is_empty();
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };

    println!();
    println!("## B9 request packages: summary");
    println!();
    println!("- command: `{command}` ({packages} packages × 3 resources, {provider_count} providers)");
    println!("- machine: {} cores (nproc), {}, {:.1} GiB memory", nproc(), cpu_model(), mem_gib());
    println!("- hearth: {}", hearth_bin().display());
    println!(
        "- agents: {provider_count} providers + 1 consumer as processes on loopback; all listed sharing after {:.1} s",
        converged.as_secs_f64()
    );
    println!(
        "- injected: capacity contention (each provider has room for 3 × 0.5 cores); the owners of providers \
         {:?} paused sharing {} and resumed {}; provider {} killed (SIGKILL) {}",
        faults.paused_ones,
        when(faults.paused.as_ref(), packages),
        when(faults.resumed.as_ref(), packages),
        faults.killed.as_ref().map_or("none".into(), |(_, k)| k.index.to_string()),
        when(faults.killed.as_ref().map(|(mark, _)| mark), packages),
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| accepted | {} of {packages} in {:.2} s: **{:.0} packages/s** (target ≥ {TARGET_RATE:.0}/s: {}) |",
        accepted.ok,
        accepted.seconds,
        accepted.per_s,
        verdict(rate_pass)
    );
    println!(
        "| one POST /api/v1/packages ({CLIENTS} keep-alive clients) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        accepted.p50, accepted.p99, accepted.max
    );
    println!(
        "| baseline GET /api/v1/status, same path ({} calls) | {:.0}/s; p50 {:.2} ms, p99 {:.2} ms (POST rate is {:.1}% of it) |",
        baseline.ok,
        baseline.per_s,
        baseline.p50,
        baseline.p99,
        100.0 * accepted.per_s / baseline.per_s
    );
    println!(
        "| 4 KiB write + fdatasync in the agents' temp dir (the store commits with synchronous=FULL) | p50 {:.2} ms, p99 {:.2} ms |",
        fsync.0, fsync.1
    );
    println!(
        "| settled | {} in {:.1} s from the first POST ({:.1} s after the last 201) |",
        if settled { "all ended" } else { "NOT all ended" },
        settle_time.as_secs_f64(),
        after_last_201.as_secs_f64()
    );
    println!(
        "| outcomes | completed {completed}, failed {failed}, rolled_back {rolled_back} (of {}) |",
        last.len()
    );
    println!(
        "| acquisition attempts | {attempts} over {} resources; failed tries in the log: {} ({busy} busy, {paused} paused, {} other) |",
        resources.len(),
        failures.len(),
        failures.len() - busy - paused
    );
    println!("| tasks | {tasks}: succeeded {succeeded}, failed {tasks_failed}, skipped {skipped} |");
    println!("| resources' end states | {} |", join_counts(&hold_states));
    if let Some((holders, outcomes)) = &killed_outcomes {
        println!(
            "| killed provider | held reservations of {holders} requests at the kill, which ended {}; {on_victim} resources ever held there |",
            join_counts(outcomes)
        );
    }
    println!("| reservations lapsed while in use (consumer log) | {lapsed_lines} |");
    println!("| releases that did not reach their provider | {undelivered} |");
    println!(
        "| held at live providers right after settling (looked {:.2} s after) | {} |",
        at_settle_after.as_secs_f64(),
        at_settle.len()
    );
    println!(
        "| held at live providers {:.1} s after settling (limit hold + 5 s) | {} |",
        later_at.as_secs_f64(),
        later.len()
    );
    println!("| resources ending held or asking | {} |", still_held.len());
    println!();
    println!("- ≥ {TARGET_RATE:.0} packages/s accepted: {} ({:.0}/s)", verdict(rate_pass), accepted.per_s);
    println!(
        "- no leaked acquisition after rollback: {} ({} held right after settling, {} after the wait, {} resources held/asking{})",
        verdict(leak_free),
        at_settle.len(),
        later.len(),
        still_held.len(),
        if settled { "" } else { "; NOT every request ended" }
    );
    println!();
    println!("Rollbacks by shape (the resources not acquired, the last refusal, what was released):");
    for (reason, n) in top(&rollbacks, 8) {
        println!("- {n} × {reason}");
    }
    println!("Task failures by shape:");
    for (reason, n) in top(&task_failures, 8) {
        println!("- {n} × {reason}");
    }
    let mut tries: BTreeMap<String, usize> = BTreeMap::new();
    for line in &failures {
        *tries.entry(shape(line.split_once(" last=").map_or(*line, |(_, last)| last))).or_default() += 1;
    }
    println!("Failed tries by shape (consumer log):");
    for (reason, n) in top(&tries, 8) {
        println!("- {n} × {reason}");
    }
    let mut problems: BTreeMap<String, usize> = BTreeMap::new();
    let logs =
        std::iter::once(("consumer", log.clone())).chain(providers.iter().map(|p| ("provider", p.log())));
    for (who, text) in logs {
        for line in text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
            let message = line.split_once("Z ").map_or(line, |(_, rest)| rest).trim();
            *problems.entry(format!("{who}: {}", shape(message))).or_default() += 1;
        }
    }
    println!("Warnings and errors in the agents' logs, by shape:");
    for (problem, n) in top(&problems, 12) {
        println!("- {n} × {problem}");
    }
    println!();
    println!("| provider | role | reservations granted (its log) | failed tries at it (consumer log) |");
    println!("|---|---|---|---|");
    for (i, provider) in providers.iter().enumerate() {
        let mut role = Vec::new();
        if i < 2 {
            role.push("bootstrap");
        }
        if faults.paused_ones.contains(&i) {
            role.push("paused");
        }
        if faults.killed.as_ref().is_some_and(|(_, k)| k.index == i) {
            role.push("killed");
        }
        let granted = provider.log().matches("holding resources").count();
        let refused = failures.iter().filter(|l| l.contains(&format!("last={}", ids[i]))).count();
        println!("| {i} | {} | {granted} | {refused} |", role.join(", "));
    }

    // Evidence for whatever went wrong.
    let mut suspects: Vec<&Value> = Vec::new();
    if !settled {
        suspects.extend(last.iter().filter(|s| !is_terminal(s)).take(3));
    }
    suspects.extend(still_held.iter().map(|(s, _)| *s).take(3));
    for (_, reservation) in at_settle.iter().chain(later.iter()).take(3) {
        println!("\nheld by a provider: {reservation}");
        if let Some(s) = reservation["request_id"].as_str().and_then(|id| by_id.get(id)) {
            suspects.push(s);
        }
    }
    for status in suspects.iter().take(6) {
        let id = status["id"].as_str().unwrap_or("");
        let mut shown = (*status).clone();
        if let Some(object) = shown.as_object_mut() {
            object.remove("package");
        }
        println!("\nrequest {id}: {}", serde_json::to_string_pretty(&shown)?);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        println!("consumer log lines of {id} (last 30 of {}):", lines.len());
        for line in lines.iter().rev().take(30).rev() {
            println!("  {line}");
        }
        for r in status["resources"].as_array().into_iter().flatten() {
            let (Some(reservation), Some(provider)) = (r["reservation_id"].as_str(), r["provider"].as_str())
            else {
                continue;
            };
            if let Some(i) = ids.iter().position(|p| p == provider) {
                let provider_log = providers[i].log();
                for line in provider_log.lines().filter(|l| l.contains(reservation)) {
                    println!("  provider {i}: {line}");
                }
            }
        }
    }

    for provider in providers.iter_mut().filter(|p| p.pid().is_some()) {
        let _ = provider.terminate();
    }
    let mut consumer = consumer;
    let _ = consumer.terminate();
    // B9_LOGS=DIR keeps every agent's log.
    if let Some(dir) = std::env::var_os("B9_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("consumer.log"), consumer.log())?;
        for (i, provider) in providers.iter().enumerate() {
            fs::write(dir.join(format!("provider-{i}.log")), provider.log())?;
        }
        println!("\nthe agents' logs are in {}", dir.display());
    }
    Ok(leak_free)
}

/// When an injected failure happened.
#[derive(Debug, Clone)]
struct Mark {
    /// Seconds from the first POST.
    at_s: f64,
    /// Packages accepted by then.
    accepted: usize,
    /// Whether the requests were still being submitted.
    submitting: bool,
}

fn when(mark: Option<&Mark>, total: usize) -> String {
    match mark {
        None => "never".into(),
        Some(m) => format!(
            "at {:.2} s ({} of {total} accepted{})",
            m.at_s,
            m.accepted,
            if m.submitting { "" } else { ", while settling" }
        ),
    }
}

/// The injected failures as they happened.
#[derive(Default)]
struct Faults {
    /// The providers whose owners paused.
    paused_ones: Vec<usize>,
    paused: Option<Mark>,
    killed: Option<(Mark, Killed)>,
    resumed: Option<Mark>,
}

struct Killed {
    index: usize,
    /// The requests it held reservations for when it was killed.
    holders: Vec<String>,
}

/// Injects the owners' pause, the kill and the resume as the packages are accepted: the pause at
/// `PAUSE_AT` of them, the kill at `KILL_AT`, the resume at `RESUME_AT` but no sooner than
/// `MIN_PAUSE` after the pause. The providers paused, and the one killed, are those that hold the
/// most at that moment (provider 0, the bootstrap, is spared), so the failures meet requests.
/// When the run ends first, whatever is left is skipped, and a pause is ended.
fn inject(
    providers: &mut [Agent],
    ids: &[String],
    mut consumer: Http,
    total: usize,
    accepted: &AtomicUsize,
    finished: &AtomicBool,
    start: Instant,
) -> Result<Faults> {
    let mut faults = Faults::default();
    let mark =
        |submitting: bool| Mark { at_s: since(start), accepted: accepted.load(Ordering::SeqCst), submitting };
    loop {
        let over = finished.load(Ordering::SeqCst);
        let done = accepted.load(Ordering::SeqCst);
        let submitting = done < total;
        let reached = |fraction: f64| done as f64 >= fraction * total as f64;
        if !over && faults.paused.is_none() && reached(PAUSE_AT) {
            // The two the consumer's requests hold and ask the most (provider 0, everyone's
            // bootstrap, aside), so its asks meet the pause.
            let asked = asked_of(&mut consumer, ids)?;
            let mut load: Vec<_> = (1..providers.len()).map(|i| (std::cmp::Reverse(asked[i]), i)).collect();
            load.sort();
            faults.paused_ones = load.iter().take(2).map(|(_, i)| *i).collect();
            faults.paused_ones.sort_unstable();
            let paused_ones = &faults.paused_ones;
            for &i in paused_ones {
                let output = providers[i].cli(&["pause"])?;
                ensure!(output.status.success(), "pause: {}", String::from_utf8_lossy(&output.stderr));
            }
            let m = mark(submitting);
            println!(
                "[{:>6.2} s] the owners of providers {paused_ones:?} paused sharing ({} accepted)",
                m.at_s, m.accepted
            );
            faults.paused = Some(m);
        }
        if !over && faults.paused.is_some() && faults.killed.is_none() && reached(KILL_AT) {
            // The one that holds the most now (tasks running first, then what the consumer's
            // requests hold and ask there), so requests lose reservations with it.
            let asked = asked_of(&mut consumer, ids)?;
            let mut victim: Option<(usize, Vec<Value>)> = None;
            for (i, provider) in providers.iter().enumerate().skip(1) {
                if faults.paused_ones.contains(&i) {
                    continue;
                }
                let held = held(provider)?;
                let better = |most: &(usize, Vec<Value>)| {
                    (load_of(&held), asked[i]) > (load_of(&most.1), asked[most.0])
                };
                if victim.as_ref().is_none_or(better) {
                    victim = Some((i, held));
                }
            }
            let (index, held) = victim.context("no provider to kill")?;
            let in_use = load_of(&held).0;
            providers[index].stop_with(Signal::SIGKILL)?;
            let m = mark(submitting);
            println!(
                "[{:>6.2} s] killed provider {index} (SIGKILL; {} accepted); it held {} reservations, {in_use} in use",
                m.at_s,
                m.accepted,
                held.len()
            );
            let holders = held.iter().filter_map(|r| r["request_id"].as_str()).map(str::to_owned).collect();
            faults.killed = Some((m, Killed { index, holders }));
        }
        let resume_now = match &faults.paused {
            Some(p) if faults.resumed.is_none() => {
                over || (reached(RESUME_AT) && since(start) - p.at_s >= MIN_PAUSE)
            }
            _ => false,
        };
        if resume_now {
            let paused_ones = &faults.paused_ones;
            for &i in paused_ones {
                let output = providers[i].cli(&["resume"])?;
                ensure!(output.status.success(), "resume: {}", String::from_utf8_lossy(&output.stderr));
            }
            let m = mark(submitting);
            println!(
                "[{:>6.2} s] the owners of providers {paused_ones:?} resumed sharing ({} accepted)",
                m.at_s, m.accepted
            );
            faults.resumed = Some(m);
        }
        if over {
            return Ok(faults);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls the consumer until every request in `wanted` has ended (or `SETTLE_LIMIT` from the
/// first POST): whether all ended, their last statuses, and when.
fn settle(
    api: &mut Http,
    wanted: &HashSet<String>,
    first_post: Instant,
) -> Result<(bool, Vec<Value>, Instant)> {
    let mut last_print = Instant::now();
    loop {
        let list = api.get_json("/api/v1/packages")?;
        let looked = Instant::now();
        let mine: Vec<Value> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["id"].as_str().is_some_and(|id| wanted.contains(id)))
            .cloned()
            .collect();
        let ended = mine.iter().filter(|s| is_terminal(s)).count();
        let all = ended == wanted.len();
        if all || first_post.elapsed() > SETTLE_LIMIT || last_print.elapsed() >= PROGRESS_EVERY {
            last_print = Instant::now();
            println!("[{:>6.2} s] {}", since(first_post), per_state(&mine, wanted.len()));
        }
        if all {
            return Ok((true, mine, looked));
        }
        if first_post.elapsed() > SETTLE_LIMIT {
            return Ok((false, mine, looked));
        }
        std::thread::sleep(POLL);
    }
}

/// A reason with peer ids and long hex ids taken out, so alike reasons group.
fn shape(text: &str) -> String {
    let words: Vec<String> = text
        .split(' ')
        .map(|word| {
            let core = word.trim_end_matches([':', ',', ';', ')']);
            let tail = &word[core.len()..];
            if core.contains("12D3KooW") {
                format!("PEER{tail}")
            } else if core.len() >= 12 && core.bytes().all(|b| b.is_ascii_hexdigit()) {
                format!("ID{tail}")
            } else {
                word.to_owned()
            }
        })
        .collect();
    let mut shaped = words.join(" ");
    if shaped.len() > 240 {
        let cut = (0..=240).rev().find(|&i| shaped.is_char_boundary(i)).unwrap_or(0);
        shaped.truncate(cut);
        shaped.push('…');
    }
    shaped
}

/// A rollback's reason, shortened to the resources not acquired, the kind of their last
/// refusal, and what was released.
fn rollback_shape(reason: &str) -> String {
    let (failed, released) = match reason.split_once("; released in reverse order: ") {
        Some((failed, released)) => (failed, released.to_owned()),
        None => (reason.split("; nothing was held").next().unwrap_or(reason), "nothing".to_owned()),
    };
    let mut parts = Vec::new();
    for part in failed.split("; ") {
        if let Some((name, rest)) = part.split_once(" not acquired after ") {
            let kind = if rest.contains("busy") {
                "busy"
            } else if rest.contains("paused") {
                "paused"
            } else if rest.contains("no sharing provider") {
                "no provider fits"
            } else {
                "other"
            };
            let tries = rest.split(" tries").next().unwrap_or("?");
            parts.push(format!("{name} ({tries} tries, last {kind})"));
        } else if !part.trim().is_empty() && parts.is_empty() {
            parts.push(shape(part));
        }
    }
    format!("not acquired: {}; released: {released}", parts.join(", "))
}

fn top(counts: &BTreeMap<String, usize>, n: usize) -> Vec<(String, usize)> {
    let mut all: Vec<(String, usize)> = counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// p50 and p99, in ms, of a 4 KiB write and fdatasync in the temp dir, where the agents' data
/// dirs (and stores) are.
fn fsync_cost() -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let mut file = fs::File::create(dir.path().join("probe"))?;
    let block = vec![7u8; 4096];
    let mut samples = Vec::new();
    for _ in 0..100 {
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(start.elapsed());
    }
    Ok((percentile_ms(&samples, 50.0), percentile_ms(&samples, 99.0)))
}

/// For each provider, as the consumer's requests name it now: (resources held there, resources
/// named there at all).
fn asked_of(consumer: &mut Http, ids: &[String]) -> Result<Vec<(usize, usize)>> {
    let mut counts = vec![(0, 0); ids.len()];
    let list = consumer.get_json("/api/v1/packages")?;
    for resource in
        list.as_array().into_iter().flatten().flat_map(|s| s["resources"].as_array().into_iter().flatten())
    {
        if let Some(i) = ids.iter().position(|id| resource["provider"] == id.as_str()) {
            counts[i].1 += 1;
            if resource["state"] == "held" {
                counts[i].0 += 1;
            }
        }
    }
    Ok(counts)
}

/// How much a provider's reservations are used: (with tasks running, held).
fn load_of(held: &[Value]) -> (usize, usize) {
    (held.iter().filter(|r| r["in_use"].as_u64() > Some(0)).count(), held.len())
}

/// What `agent` holds now for other agents' packages.
fn held(agent: &Agent) -> Result<Vec<Value>> {
    Ok(Http::new(agent)?.get_json("/api/v1/reservations")?.as_array().cloned().unwrap_or_default())
}

fn is_terminal(status: &Value) -> bool {
    status["state"].as_str().is_some_and(|s| TERMINAL.contains(&s))
}

fn per_state(statuses: &[Value], total: usize) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for status in statuses {
        *counts.entry(status["state"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    let ended = statuses.iter().filter(|s| is_terminal(s)).count();
    format!("{ended}/{total} ended: {}", join_counts(&counts))
}

fn join_counts(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

fn since(at: Instant) -> f64 {
    at.elapsed().as_secs_f64()
}

fn network_with(bootstrap: &[&str]) -> String {
    if bootstrap.is_empty() {
        return LOOPBACK_NETWORK.to_owned();
    }
    let list: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
    LOOPBACK_NETWORK.replace("mdns = false\n", &format!("mdns = false\nbootstrap = [{}]\n", list.join(", ")))
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
}

fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, model)| model.trim().to_owned())
}

fn mem_gib() -> f64 {
    let info = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1048576.0
}

/// One HTTP call as timed by a client.
struct Call {
    start: Instant,
    end: Instant,
    status: u16,
    body: String,
}

/// `count` calls to `agent`'s API from [`CLIENTS`] threads, each over its own keep-alive
/// connection.
fn hammer(
    agent: &Agent,
    count: usize,
    method: &str,
    path: &str,
    body: &str,
    successes: Option<&AtomicUsize>,
) -> Result<Vec<Call>> {
    let (port, token) = (agent.port()?, agent.token()?);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let token = token.clone();
                scope.spawn(move || -> Result<Vec<Call>> {
                    let mut http = Http { port, token, conn: None };
                    let mut calls = Vec::new();
                    for _ in (t..count).step_by(CLIENTS) {
                        let start = Instant::now();
                        let (status, body) = http.call(method, path, body)?;
                        if let Some(successes) = successes
                            && (200..300).contains(&status)
                        {
                            successes.fetch_add(1, Ordering::SeqCst);
                        }
                        calls.push(Call { start, end: Instant::now(), status, body });
                    }
                    Ok(calls)
                })
            })
            .collect();
        let mut all = Vec::new();
        for thread in threads {
            all.extend(thread.join().map_err(|_| anyhow!("a client thread panicked"))??);
        }
        Ok(all)
    })
}

/// How a batch of calls went.
struct Rate {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    /// From the first call's start to the last successful answer.
    seconds: f64,
    per_s: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Rate {
    fn of(calls: &[Call], success: u16) -> Self {
        let good: Vec<&Call> = calls.iter().filter(|c| c.status == success).collect();
        let first = calls.iter().map(|c| c.start).min();
        let last = good.iter().map(|c| c.end).max();
        let seconds = match (first, last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        let latencies: Vec<Duration> = calls.iter().map(|c| c.end.duration_since(c.start)).collect();
        let bad = calls.iter().find(|c| c.status != success);
        Self {
            ok: good.len(),
            errors: calls.len() - good.len(),
            first_error: bad
                .map(|c| format!("{} {}", c.status, c.body.chars().take(300).collect::<String>())),
            seconds,
            per_s: if seconds > 0.0 { good.len() as f64 / seconds } else { 0.0 },
            p50: percentile_ms(&latencies, 50.0),
            p99: percentile_ms(&latencies, 99.0),
            max: percentile_ms(&latencies, 100.0),
        }
    }
}

/// A keep-alive HTTP/1.1 client for one agent's API.
struct Http {
    port: u16,
    token: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(agent: &Agent) -> Result<Self> {
        Ok(Self { port: agent.port()?, token: agent.token()?, conn: None })
    }

    /// `GET path`, which must answer 200 with JSON.
    fn get_json(&mut self, path: &str) -> Result<Value> {
        let (status, body) = self.call("GET", path, "")?;
        ensure!(status == 200, "GET {path}: {status} {body}");
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Sends one request and reads its answer: the status code and the body. A kept-alive
    /// connection that the server closed while idle is opened again (nothing was answered on it,
    /// so nothing was done).
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let reused = self.conn.is_some();
        if let Some(answer) = self.try_call(method, path, body)? {
            return Ok(answer);
        }
        ensure!(reused, "{method} {path}: the connection closed without an answer");
        self.try_call(method, path, body)?
            .with_context(|| format!("{method} {path}: the connection closed without an answer"))
    }

    fn try_call(&mut self, method: &str, path: &str, body: &str) -> Result<Option<(u16, String)>> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(120)))?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().context("no connection")?;
        let content_type = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\n{content_type}\
             Content-Length: {}\r\n\r\n{body}",
            self.port,
            self.token,
            body.len()
        );
        let mut line = String::new();
        let first = conn.get_mut().write_all(request.as_bytes()).and_then(|()| conn.read_line(&mut line));
        match first {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                self.conn = None;
                return Ok(None);
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                self.conn = None;
                return Ok(None);
            }
            Err(e) => {
                self.conn = None;
                return Err(e.into());
            }
        }
        let answer = Self::read_answer(conn, &line);
        match answer {
            Ok((status, body, close)) => {
                if close {
                    self.conn = None;
                }
                Ok(Some((status, body)))
            }
            Err(error) => {
                self.conn = None;
                Err(error)
            }
        }
    }

    /// The rest of an answer whose status line is `status_line`: status, body, and whether the
    /// server closes the connection after it.
    fn read_answer(conn: &mut BufReader<TcpStream>, status_line: &str) -> Result<(u16, String, bool)> {
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line: {status_line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        let mut line = String::new();
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                bail!("the connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = Some(value.parse::<usize>()?),
                    "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("a bad chunk size: {line:?}"))?;
                if size == 0 {
                    loop {
                        line.clear();
                        if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                conn.read_exact(&mut body[start..])?;
                line.clear();
                conn.read_line(&mut line)?;
            }
        } else if let Some(length) = length {
            body.resize(length, 0);
            conn.read_exact(&mut body)?;
        } else {
            conn.read_to_end(&mut body)?;
            close = true;
        }
        Ok((status, String::from_utf8(body)?, close))
    }
}
