//! Benchmark B7, idle footprint: a Hearth agent connected to 3 peers and doing no work, beside
//! `syncthing` and `boinc-client` (Debian's packages) running idle at the same time.
//!
//! `bench-b7 [SECONDS]` (default 600). Needs root: everything runs in a network namespace of its
//! own with only a loopback, so nothing any of the three programs tries can leave the machine.
//! The agent under test and its 3 peers are release builds on that loopback. syncthing gets a
//! fresh home (no folders, GUI and sync port on loopback, global discovery, relays, NAT traversal,
//! usage and crash reporting and upgrades off); boinc-client a fresh dir with no project
//! (`--skip_cpu_benchmarks --no_info_fetch --no_gpus`). After a 30 s settling time, each
//! program's process tree (syncthing's monitor process included) is sampled every 5 s: resident
//! memory (mean and peak), and CPU time over the whole window as a share of one core.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::netns::{self, Netns};
use hearth_tests::{Agent, json_of};

/// How long each program settles before measuring.
const SETTLE: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

fn main() -> Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(600);
    netns::support().map_err(|why| anyhow::anyhow!("B7 runs its programs in a namespace: {why}"))?;
    for program in ["syncthing", "boinc"] {
        ensure!(
            netns::installed(program),
            "{program} is not installed (`apt install syncthing boinc-client`)"
        );
    }
    let ns = Netns::create("b7")?;
    let dir = tempfile::tempdir()?;

    let config =
        "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\", \"/ip4/127.0.0.1/udp/0/quic-v1\"]\nmdns = false\n";
    let mut agent = Agent::start_in(&ns, config)?;
    let (address, _) = agent.address()?;
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(Agent::start_in(&ns, &format!("{config}bootstrap = [\"{address}\"]\n"))?);
    }
    let until = Instant::now() + Duration::from_secs(30);
    while json_of(&agent.cli(&["peers", "--json"])?)?.as_array().map_or(0, Vec::len) < 3 {
        ensure!(Instant::now() < until, "the agent did not get its 3 peers within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut syncthing = start_syncthing(&ns, &dir.path().join("syncthing"))?;
    let mut boinc = start_boinc(&ns, &dir.path().join("boinc"))?;
    std::thread::sleep(SETTLE);

    let hearth_pid = agent.pid().context("pid")?;
    let roots = [
        ("hearth daemon (3 peers)", hearth_pid),
        ("syncthing", syncthing.id()),
        ("boinc-client", boinc.id()),
    ];
    let ticks_before: Vec<u64> = roots.iter().map(|(_, pid)| tree(*pid).1).collect();
    let started = Instant::now();
    let mut rss: Vec<Vec<u64>> = vec![Vec::new(); roots.len()];
    while started.elapsed() < Duration::from_secs(seconds) {
        for (samples, (_, pid)) in rss.iter_mut().zip(&roots) {
            samples.push(tree(*pid).0);
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let window = started.elapsed().as_secs_f64();
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;

    println!(
        "B7 idle footprint over {window:.0} s (after {} s settling), sampled every {} s",
        SETTLE.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    println!("{:<26} {:>14} {:>14} {:>16}", "", "RSS mean [MB]", "RSS peak [MB]", "CPU [% of core]");
    for (i, (name, pid)) in roots.iter().enumerate() {
        let samples = &rss[i];
        let mean = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64;
        let peak = samples.iter().max().copied().unwrap_or(0) as f64;
        let cpu = (tree(*pid).1 - ticks_before[i]) as f64 / ticks_per_second / window * 100.0;
        println!("{name:<26} {:>14.1} {:>14.1} {:>16.3}", mean / 1e6, peak / 1e6, cpu);
    }

    for child in [&mut syncthing, &mut boinc] {
        stop(child);
    }
    for peer in &mut peers {
        let _ = peer.terminate();
    }
    let _ = agent.terminate();
    Ok(())
}

/// The resident memory (bytes) and CPU time (clock ticks, user and system, children that have
/// exited included) of `root` and every process below it.
fn tree(root: u32) -> (u64, u64) {
    let mut stats = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, rest)| rest.to_owned()) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        // ppid is field 4 of stat, utime 14, stime 15, cutime 16, cstime 17; `rest` starts at 3.
        let ticks = number(11) + number(12) + number(13) + number(14);
        stats.push((pid, number(1) as u32, ticks, hearth_tests::rss_bytes(pid).unwrap_or(0)));
    }
    let mut members = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _, _) in &stats {
            if members.contains(ppid) && !members.contains(pid) {
                members.push(*pid);
                grew = true;
            }
        }
    }
    stats
        .iter()
        .filter(|(pid, ..)| members.contains(pid))
        .fold((0, 0), |(rss, ticks), (_, _, t, r)| (rss + r, ticks + t))
}

fn start_syncthing(ns: &Netns, home: &std::path::Path) -> Result<Child> {
    let home_arg = format!("--home={}", home.display());
    let generated = Command::new("syncthing")
        .args(["generate", &home_arg, "--no-default-folder", "--skip-port-probing"])
        .output()?;
    ensure!(generated.status.success(), "syncthing generate: {}", String::from_utf8_lossy(&generated.stderr));
    let path = home.join("config.xml");
    let mut config = fs::read_to_string(&path)?;
    for (from, to) in [
        ("<globalAnnounceEnabled>true<", "<globalAnnounceEnabled>false<"),
        ("<relaysEnabled>true<", "<relaysEnabled>false<"),
        ("<natEnabled>true<", "<natEnabled>false<"),
        ("<startBrowser>true<", "<startBrowser>false<"),
        ("<crashReportingEnabled>true<", "<crashReportingEnabled>false<"),
        ("<autoUpgradeIntervalH>12<", "<autoUpgradeIntervalH>0<"),
        ("<urAccepted>0<", "<urAccepted>-1<"),
        ("<listenAddress>default<", "<listenAddress>tcp://127.0.0.1:22000<"),
    ] {
        ensure!(config.contains(from), "syncthing's generated config has no {from:?}");
        config = config.replace(from, to);
    }
    fs::write(&path, config)?;
    let mut serve = Command::new("syncthing");
    serve
        .args(["serve", &home_arg, "--no-browser", "--no-upgrade", "--gui-address=127.0.0.1:8384"])
        .env("STNOUPGRADE", "1");
    spawn_quiet(ns.wrap(&serve), home)
}

fn start_boinc(ns: &Netns, dir: &std::path::Path) -> Result<Child> {
    fs::create_dir_all(dir)?;
    let mut boinc = Command::new("boinc");
    boinc.arg("--dir").arg(dir).args([
        "--skip_cpu_benchmarks",
        "--no_info_fetch",
        "--no_gpus",
        "--allow_multiple_clients",
        "--gui_rpc_port",
        "31416",
    ]);
    spawn_quiet(ns.wrap(&boinc), dir)
}

fn spawn_quiet(mut command: Command, dir: &std::path::Path) -> Result<Child> {
    fs::create_dir_all(dir)?;
    let log = fs::File::create(dir.join("bench-b7.log"))?;
    let child = command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
    Ok(child)
}

fn stop(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
