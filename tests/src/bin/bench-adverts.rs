//! Advert churn (issue 23, item 7): how many adverts an agent publishes an hour, idle and under
//! flapping load.
//!
//! `bench-adverts [REAL_SECONDS]` (default 60). Two parts:
//!
//! 1. A scaled clock: the agent's own `advert::Pacer`, fed one simulated hour per scenario the
//!    way the daemon feeds it (a body every 2 s, and at once on every availability change) and
//!    polled on the event loop's 500 ms tick, in virtual time. The anchor beside it is the rule
//!    before issue 23, run on the same inputs: publish whenever the body differs in anything but
//!    `seq`, the times, the ends of the window list and disk below a GiB, and every 300 s.
//! 2. Real agents: A and B on loopback; A's log (debug) names every advert it publishes. Then
//!    REAL_SECONDS idle, and REAL_SECONDS of flapping (A's owner pauses and resumes every 2 s):
//!    adverts published by A in each, and the newest `seq` B holds of A at the end.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth::net::AdvertBody;
use hearth::net::advert::{ADVERT_VERSION, Free, Pace, Pacer, Prices, Reputation};
use hearth_tests::{Agent, LOOPBACK_NETWORK, hearth, json_of};

const NOW: i64 = 1_800_000_000;
const HOUR: u64 = 3600;

fn sharing() -> AdvertBody {
    AdvertBody {
        version: ADVERT_VERSION,
        peer_id: "12D3KooWQK1wnefoLrcVHbbnf5tLzbopUd3K3bFAoJpA7YJgL5pV".to_owned().into(),
        seq: 0,
        issued_at: NOW,
        expires_at: NOW + 600,
        state: "sharing".into(),
        paused_because: Vec::new(),
        free: Free { cpu_millis: 6000, memory_bytes: 24 << 30, disk_bytes: 200 << 30, gpus: Vec::new() },
        windows: vec![[NOW, NOW + 7 * 24 * 3600]],
        prices: Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10000 },
        reputation: Reputation::default(),
    }
}

fn paused(reason: String) -> AdvertBody {
    AdvertBody { state: "paused".into(), paused_because: vec![reason], free: Free::default(), ..sharing() }
}

/// The body the daemon builds at second `t` of a scenario, and whether the availability changed
/// at `t` (the daemon then hands it over at once, not on its 2 s check).
type Scenario = fn(u64) -> (AdvertBody, bool);

fn idle(_t: u64) -> (AdvertBody, bool) {
    (sharing(), false)
}

/// Issue 23's agent: paused because other programs keep the CPU busy; the figure in the reason
/// moves every second (the availability task re-evaluates each second).
fn busy_cpu(t: u64) -> (AdvertBody, bool) {
    (paused(format!("other programs use {}% of the CPU", 55 + (t * 7919) % 45)), true)
}

/// Busy for a minute, idle for a minute (the policy's `min_paused` of 1 min makes this about the
/// fastest the CPU rule itself can flap): a state change every 60 s, the figure every second
/// while paused.
fn busy_minutes(t: u64) -> (AdvertBody, bool) {
    if (t / 60) % 2 == 1 { busy_cpu(t) } else { (sharing(), t.is_multiple_of(60)) }
}

/// The worst case: the state itself flaps every 3 s (an owner's script pausing and resuming).
fn flap_3s(t: u64) -> (AdvertBody, bool) {
    if (t / 3) % 2 == 1 {
        (paused("paused by the owner".into()), t.is_multiple_of(3))
    } else {
        (sharing(), t.is_multiple_of(3))
    }
}

/// The rule before issue 23, the anchor: the daemon's advert task published a body that differed
/// from the last in this (then `daemon::adverts::same_offer`), and every 5 minutes.
fn old_same_offer(a: &AdvertBody, b: &AdvertBody) -> bool {
    let strip = |body: &AdvertBody| {
        let mut windows = body.windows.clone();
        if let Some(first) = windows.first_mut() {
            first[0] = 0;
        }
        if let Some(last) = windows.last_mut() {
            last[1] = 0;
        }
        let free = Free { disk_bytes: body.free.disk_bytes >> 30, ..body.free.clone() };
        AdvertBody { seq: 0, issued_at: 0, expires_at: 0, windows, free, ..body.clone() }
    };
    strip(a) == strip(b)
}

struct Count {
    total: usize,
    most_in_a_minute: usize,
    most_in_45s: usize,
}

fn count(times: &[u64]) -> Count {
    let most = |window: u64| {
        times.iter().map(|from| times.iter().filter(|t| (*from..*from + window).contains(t)).count()).max()
    };
    Count { total: times.len(), most_in_a_minute: most(60).unwrap_or(0), most_in_45s: most(45).unwrap_or(0) }
}

/// One simulated hour under the pacer: the seconds at which an advert went out.
fn new_rule(scenario: Scenario) -> Vec<u64> {
    let start = Instant::now();
    let mut pacer = Pacer::new(Pace::default());
    let mut out = Vec::new();
    for t in 0..HOUR {
        let (body, changed) = scenario(t);
        if changed || t.is_multiple_of(2) {
            pacer.update(body, start + Duration::from_secs(t));
        }
        for half in [0, 500] {
            let now = start + Duration::from_secs(t) + Duration::from_millis(half);
            if pacer.poll(now, (NOW + t as i64) * 1000 + half as i64).is_some() {
                out.push(t);
            }
        }
    }
    out
}

/// One simulated hour under the rule before: the daemon published on every change it saw (each
/// second on an availability change, else on its 2 s check) and every 300 s.
fn old_rule(scenario: Scenario) -> Vec<u64> {
    let mut last: Option<(AdvertBody, u64)> = None;
    let mut out = Vec::new();
    for t in 0..HOUR {
        let (body, changed) = scenario(t);
        if !(changed || t.is_multiple_of(2)) {
            continue;
        }
        let due =
            last.as_ref().is_none_or(|(previous, at)| !old_same_offer(previous, &body) || t - at >= 300);
        if due {
            out.push(t);
            last = Some((body, t));
        }
    }
    out
}

fn simulated() {
    println!("## Scaled clock: one simulated hour per scenario (the agent's Pacer, in virtual time)\n");
    let pace = Pace::default();
    println!(
        "pace: {} at once, then one per {} s; for joining peers {} at once, then one per {} s, \
         after they subscribe ({} s later); adverts live 600 s\n",
        pace.burst,
        pace.refill.as_secs(),
        pace.join_burst,
        pace.join_refill.as_secs(),
        pace.join_delay.as_secs()
    );
    println!(
        "| scenario | adverts/hour, before | adverts/hour, now | most in any 45 s, before → now | most in any 60 s, before → now |"
    );
    println!("|---|---:|---:|---:|---:|");
    let scenarios: [(&str, Scenario); 4] = [
        ("idle, sharing, nothing changes", idle),
        ("paused: CPU busy all hour, its figure moving each second (issue 23)", busy_cpu),
        ("CPU busy a minute, idle a minute (the policy's 1 min minimum pause)", busy_minutes),
        ("state flapping every 3 s (owner's script pauses/resumes)", flap_3s),
    ];
    for (name, scenario) in scenarios {
        let (old, new) = (count(&old_rule(scenario)), count(&new_rule(scenario)));
        println!(
            "| {name} | {} | **{}** | {} → {} | {} → {} |",
            old.total,
            new.total,
            old.most_in_45s,
            new.most_in_45s,
            old.most_in_a_minute,
            new.most_in_a_minute
        );
    }
    println!();
}

/// Adverts A's log says it published so far.
fn published(agent: &Agent) -> usize {
    agent.log().lines().filter(|line| line.contains("advert published")).count()
}

fn real(seconds: u64) -> Result<()> {
    println!("## Real agents on loopback: A's adverts, counted in its log\n");
    let env = [("RUST_LOG", "info,hearth::net::event_loop=debug")];
    let mut a = Agent::start_with(LOOPBACK_NETWORK, &env)?;
    let (a_addr, a_id) = a.address()?;
    let network =
        LOOPBACK_NETWORK.replace("mdns = false\n", &format!("mdns = false\nbootstrap = [\"{a_addr}\"]\n"));
    let mut b = Agent::start_with_config(&network)?;
    let until = Instant::now() + Duration::from_secs(30);
    while !json_of(&b.cli(&["offers", "--json"])?)?.to_string().contains(&a_id) {
        ensure!(Instant::now() < until, "B never heard A's advert");
        std::thread::sleep(Duration::from_millis(250));
    }
    let joined = published(&a);
    std::thread::sleep(Duration::from_secs(seconds));
    let idle = published(&a) - joined;
    let flapping_from = Instant::now();
    let mut flips: u32 = 0;
    while flapping_from.elapsed() < Duration::from_secs(seconds) {
        let verb = if flips.is_multiple_of(2) { "pause" } else { "resume" };
        ensure!(hearth(&a.data_dir(), &[verb])?.status.success(), "hearth {verb}");
        flips += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let flapping = published(&a) - joined - idle;
    ensure!(hearth(&a.data_dir(), &["resume"])?.status.success(), "hearth resume");
    // The last state reaches B within the pace's refill.
    std::thread::sleep(Pace::default().refill + Duration::from_secs(2));
    let offers = json_of(&b.cli(&["offers", "--json"])?)?;
    let a_offer =
        offers.as_array().and_then(|o| o.iter().find(|o| o["peer_id"] == a_id.as_str())).context("A")?;
    let pace = Pace::default();
    let bound = pace.burst as u64 + seconds / pace.refill.as_secs();
    println!(
        "| phase | seconds | owner pause/resume calls | adverts A published | the pace's bound for the window |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!("| start and B joining | — | 0 | {joined} | — |");
    println!("| idle | {seconds} | 0 | {idle} | {bound} |");
    println!("| flapping every 2 s | {seconds} | {flips} | {flapping} | {bound} |");
    println!(
        "\nafter the flapping ended (resumed) and {} s: B holds A as `{}`",
        Pace::default().refill.as_secs() + 2,
        a_offer["state"].as_str().unwrap_or("?")
    );
    for agent in [&mut a, &mut b] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

fn main() -> Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(60);
    println!("# Advert churn (issue 23): adverts an hour, idle and under flapping load\n");
    simulated();
    real(seconds)
}
