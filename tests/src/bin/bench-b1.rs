//! Benchmark B1, owner-first pause: how long from the owner's pause until every process of every
//! running job is stopped, beside `kill -STOP` of process groups as the floor.
//!
//! `bench-b1 [TRIALS]` (default 100). Starts a daemon that always shares, runs 4 jobs of 8 busy
//! threads each (`job-probe threads 8`), then per trial: sends `POST /api/v1/pause`, polls until
//! the freezer of every job's cgroup says FROZEN (the kernel's own word that every task is
//! stopped), and notes when the WebSocket has delivered the `owner_notice` of all 4 jobs (what the
//! consumers' agents will be sent); then resumes and waits until all are thawed. The anchor starts
//! the same 4 programs directly on the host, each in its own process group, and times
//! `kill(-pgid, SIGSTOP)` until every thread is in state `T`. Prints p50 and p99 of each.

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use hearth_tests::jobs::{JobDir, freezer_state_file, pids_with, probe_bin};
use hearth_tests::{Agent, api_post, command, percentile_ms};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const JOBS: usize = 4;
const THREADS: usize = 8;

fn main() -> Result<()> {
    let trials: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(100);
    let floor = anchor(trials)?;
    let (frozen, told) = hearth(trials)?;
    println!("B1 owner-first pause, {JOBS} jobs x {THREADS} busy threads, {trials} trials");
    println!("{:<52} {:>9} {:>9}", "", "p50 [ms]", "p99 [ms]");
    for (name, samples) in [
        ("kill -STOP of 4 process groups (floor)", &floor),
        ("hearth: pause request -> every job frozen", &frozen),
        ("hearth: pause request -> 4 owner notices delivered", &told),
    ] {
        println!("{name:<52} {:>9.2} {:>9.2}", percentile_ms(samples, 50.0), percentile_ms(samples, 99.0));
    }
    Ok(())
}
/// The floor: SIGSTOP to each group, until every thread of every process is stopped.
fn anchor(trials: usize) -> Result<Vec<Duration>> {
    let probe = probe_bin()?;
    let mut children: Vec<Child> = (0..JOBS)
        .map(|_| {
            Command::new(&probe)
                .args(["threads", &THREADS.to_string()])
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    std::thread::sleep(Duration::from_millis(300));
    let all_in = |state: char| pids.iter().all(|pid| threads_in(*pid, state));
    let mut samples = Vec::new();
    for _ in 0..trials {
        let start = Instant::now();
        for pid in &pids {
            kill(Pid::from_raw(-pid), Signal::SIGSTOP)?;
        }
        while !all_in('T') {
            std::hint::spin_loop();
        }
        samples.push(start.elapsed());
        for pid in &pids {
            kill(Pid::from_raw(-pid), Signal::SIGCONT)?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(samples)
}

/// Whether every thread of `pid` is in `state` (`T`: stopped).
fn threads_in(pid: i32, state: char) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) == Some(state)
    })
}

fn hearth(trials: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut agent = Agent::start()?;
    let (port, token) = (agent.port()?, agent.token()?);
    let job = JobDir::new()?;
    job.copy_in(&probe_bin()?, "job-probe")?;
    let spec = job.file(
        "busy.toml",
        format!(
            "kind = \"native\"\nimage = \"base\"\ncommand = [\"/in/job-probe\", \"threads\", \"{THREADS}\"]\n\
             inputs = [\"job-probe\"]\n[resources]\ncpu = 2.0\n[limits]\ntime = \"1h\"\n"
        )
        .as_bytes(),
    )?;
    let mut clis: Vec<Child> = (0..JOBS)
        .map(|_| {
            command(&agent.data_dir())
                .arg("run")
                .arg(&spec)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let until = Instant::now() + Duration::from_secs(60);
    let freezers = loop {
        let pids = pids_with("/in/job-probe");
        let freezers: Vec<String> = pids
            .iter()
            .filter_map(|pid| freezer_state_file(*pid))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if freezers.len() == JOBS {
            break freezers;
        }
        ensure!(Instant::now() < until, "the jobs did not start ({} running)", freezers.len());
        std::thread::sleep(Duration::from_millis(100));
    };

    // The WebSocket reader: the arrival time of every paused notice.
    let (notices_tx, notices) = mpsc::channel::<Instant>();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = runtime.block_on(tokio_tungstenite::connect_async(request))?;
    runtime.spawn(async move {
        let mut socket = socket;
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message
                && text.contains("\"owner_notice\"")
                && text.contains("\"kind\":\"paused\"")
                && notices_tx.send(Instant::now()).is_err()
            {
                break;
            }
        }
    });

    let mut frozen = Vec::new();
    let mut told = Vec::new();
    let all = |state: &str| freezers.iter().all(|f| fs::read_to_string(f).is_ok_and(|s| s.trim() == state));
    for _ in 0..trials {
        while notices.try_recv().is_ok() {}
        let start = Instant::now();
        api_post(port, &token, "/api/v1/pause", "{}")?;
        while !all("FROZEN") {
            std::hint::spin_loop();
        }
        frozen.push(start.elapsed());
        let mut last = start;
        for _ in 0..JOBS {
            last = notices.recv_timeout(Duration::from_secs(10)).context("a notice did not arrive")?;
        }
        told.push(last.duration_since(start));
        api_post(port, &token, "/api/v1/resume", "")?;
        let until = Instant::now() + Duration::from_secs(10);
        while !all("THAWED") {
            ensure!(Instant::now() < until, "the jobs did not thaw");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for cli in &mut clis {
        let _ = cli.kill();
        let _ = cli.wait();
    }
    ensure!(agent.terminate()?.success(), "the agent did not stop cleanly");
    Ok((frozen, told))
}
