//! Benchmark B4, verified transfer: a blob (default 1 GiB) between two agents on loopback, beside a
//! raw TCP copy of the same file on loopback and `b3sum --num-threads 1` of it, in the same run.
//!
//! `bench-b4 [MIB] [TRIALS]` (defaults 1024 and 3). Each trial of ours starts a fresh receiver
//! (bootstrapped from the sender) and times `hearth blob get` into its store from the request to
//! `finished`, polled every 20 ms. The raw copy writes what it reads to a file too, as the agent
//! does. Then resume: a receiver is killed with SIGKILL half-way, the 16 KiB groups it had
//! written are counted on disk, it is restarted, and its fetch's `resumed_from` tells how many of
//! those groups were sent again.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, LOOPBACK_NETWORK, json_of, pseudo_random};
use nix::sys::signal::Signal;
use serde_json::Value;

const GROUP: u64 = 16 * 1024;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1024);
    let trials: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(3);
    let size = mib << 20;
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    fs::write(&blob, pseudo_random(usize::try_from(size)?, 1))?;

    let mut raw = Vec::new();
    for _ in 0..trials {
        raw.push(raw_tcp_copy(&blob, &work.path().join("raw-copy.bin"))?);
        fs::remove_file(work.path().join("raw-copy.bin"))?;
    }
    let mut b3 = Vec::new();
    for _ in 0..trials {
        let start = Instant::now();
        let out = Command::new("b3sum").args(["--num-threads", "1"]).arg(&blob).output().context("b3sum")?;
        ensure!(out.status.success(), "b3sum failed");
        b3.push(start.elapsed());
    }

    let sender = Agent::start()?;
    let (address, sender_id) = sender.address()?;
    let config =
        LOOPBACK_NETWORK.replace("mdns = false\n", &format!("mdns = false\nbootstrap = [\"{address}\"]\n"));
    let mut receivers = Vec::new();
    for _ in 0..=trials {
        let receiver = Agent::start_with_config(&config)?;
        let (_, id) = receiver.address()?;
        receivers.push((receiver, id));
    }
    let share: Vec<&str> = receivers.iter().flat_map(|(_, id)| ["--share", id.as_str()]).collect();
    let mut add = vec!["blob", "add", blob.to_str().context("path")?, "--json"];
    add.extend(share);
    let hash = json_of(&sender.cli(&add)?)?["hash"].as_str().context("hash")?.to_owned();

    let mut ours = Vec::new();
    for (receiver, _) in &receivers[..trials] {
        let start = Instant::now();
        let id = start_fetch(receiver, &hash, &sender_id)?;
        let t = wait(receiver, &id, |t| t["state"] != "queued" && t["state"] != "running")?;
        ours.push(start.elapsed());
        ensure!(t["state"] == "finished" && t["bytes_received"] == size, "{t}");
    }

    // Resume after a kill -9 of the receiver half-way.
    let (receiver, _) = receivers.last_mut().context("receiver")?;
    let id = start_fetch(receiver, &hash, &sender_id)?;
    wait(receiver, &id, |t| t["bytes_done"].as_u64() >= Some(size / 2))?;
    receiver.stop_with(Signal::SIGKILL)?;
    let partial = fs::read(receiver.data_dir().join("blobs/partial").join(&hash))?;
    let written = partial.chunks(GROUP as usize).filter(|g| g.iter().any(|&b| b != 0)).count() as u64;
    drop(partial);
    let restarted = Instant::now();
    receiver.restart()?;
    let t = wait(receiver, &id, |t| t["state"] != "queued" && t["state"] != "running")?;
    let resume_time = restarted.elapsed();
    ensure!(t["state"] == "finished", "{t}");
    let resumed_groups = t["resumed_from"].as_u64().context("resumed_from")? / GROUP;
    let resent = written.saturating_sub(resumed_groups);

    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let rate = |d: Duration| size as f64 / d.as_secs_f64() / (1 << 20) as f64;
    let (raw_m, b3_m, ours_m) = (median(&mut raw), median(&mut b3), median(&mut ours));
    println!("B4: {mib} MiB on loopback, median of {trials} (one run, this machine)\n");
    println!("| what | time | MiB/s |");
    println!("|---|---|---|");
    println!(
        "| raw TCP copy (std, 1 MiB buffers, written to a file) | {:.2} s | {:.0} |",
        raw_m.as_secs_f64(),
        rate(raw_m)
    );
    println!("| `b3sum --num-threads 1` | {:.2} s | {:.0} |", b3_m.as_secs_f64(), rate(b3_m));
    println!(
        "| hearth blob get (verified, into the store) | {:.2} s | {:.0} |",
        ours_m.as_secs_f64(),
        rate(ours_m)
    );
    println!(
        "\nhearth / raw TCP: {:.2}x (target >= 0.5x); hearth / b3sum: {:.2}x",
        raw_m.as_secs_f64() / ours_m.as_secs_f64(),
        b3_m.as_secs_f64() / ours_m.as_secs_f64()
    );
    println!(
        "resume: killed at {:.0}% with {written} groups of 16 KiB on disk; restarted, it resumed from {resumed_groups} \
         groups, re-sent {resent} (target <= 2), and finished {:.2} s after the restart",
        written as f64 * GROUP as f64 * 100.0 / size as f64,
        resume_time.as_secs_f64()
    );
    Ok(())
}

fn start_fetch(receiver: &Agent, hash: &str, from: &str) -> Result<String> {
    let out = receiver.cli(&["blob", "get", hash, "--from", from, "--detach"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().next().context("id")?.to_owned())
}

fn wait(agent: &Agent, id: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        let all = json_of(&agent.cli(&["transfers", "--json"])?)?;
        let t = all.as_array().and_then(|a| a.iter().find(|t| t["id"] == id)).cloned().context("transfer")?;
        if done(&t) {
            return Ok(t);
        }
        ensure!(Instant::now() < until, "{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends the file over a loopback TCP connection and writes what arrives to `dest`; returns the
/// time from connect to the last byte written.
fn raw_tcp_copy(source: &Path, dest: &Path) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let source = source.to_owned();
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let mut file = io::BufReader::with_capacity(1 << 20, fs::File::open(source)?);
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        io::copy(&mut file, &mut stream)
    });
    let (mut stream, _) = listener.accept()?;
    let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(dest)?);
    io::copy(&mut stream, &mut out)?;
    out.flush()?;
    let elapsed = start.elapsed();
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(elapsed)
}
