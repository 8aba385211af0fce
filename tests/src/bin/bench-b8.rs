//! Benchmark B8, the swarm: N agents (default 50) as processes on loopback.
//!
//! `bench-b8 [AGENTS] [TRIALS]` (defaults 50 and 20). Agent 0 starts alone; each later agent is
//! told up to three earlier ones (its predecessor, the one halfway back, and agent 0) as its
//! bootstrap list, so the agents form one connected graph without a hub everyone dials. Once every
//! agent lists every advert, each trial pauses or resumes one agent (a different one each time)
//! and times, from the request, the `offer_changed` events on the WebSocket of every other agent
//! that carry its new state: the time until 95% of them have it, and how many had it after 5 s.
//! Then agent 0 submits a small native job once per trial and times, from the API's answer, the
//! `remote_job_changed` event that shows the job with its provider: request to signed agreement.
//! Memory per connection: each agent's RSS against its number of connected peers (a least-squares
//! slope), and the mean RSS above a lone agent's divided by the mean number of peers.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use hearth_tests::{Agent, LOOPBACK_NETWORK, api_post, percentile_ms, raw_http, rss_bytes};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

/// A seen advert: which agent's WebSocket, whose advert, its state, when.
type Sighting = (usize, String, String, Instant);

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(50);
    let trials: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(20);
    ensure!(count >= 3, "at least 3 agents");

    let mut lone = Agent::start()?;
    std::thread::sleep(Duration::from_secs(3));
    let lone_rss = rss_bytes(lone.pid().context("pid")?).context("rss")?;
    let _ = lone.terminate();

    let started = Instant::now();
    let mut agents: Vec<Agent> = Vec::new();
    let mut addresses: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..count {
        let mut bootstrap: Vec<usize> =
            [i.wrapping_sub(1), i / 2, 0].into_iter().filter(|&j| j < i).collect();
        bootstrap.dedup();
        let list: Vec<String> = bootstrap.iter().map(|&j| format!("\"{}\"", addresses[j])).collect();
        let network = LOOPBACK_NETWORK
            .replace("mdns = false\n", &format!("mdns = false\nbootstrap = [{}]\n", list.join(", ")));
        let agent = Agent::start_with_config(&network)?;
        let (address, id) = agent.address()?;
        agents.push(agent);
        addresses.push(address);
        ids.push(id);
    }
    let all_up = started.elapsed();

    // Converged: every agent lists every advert.
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let mut missing = 0;
        for agent in &agents {
            missing += count - get(agent, "/api/v1/offers")?.as_array().map_or(0, Vec::len);
        }
        if missing == 0 {
            break;
        }
        ensure!(Instant::now() < until, "not converged after 120 s: {missing} adverts missing in all");
        std::thread::sleep(Duration::from_millis(500));
    }
    let converged = started.elapsed();

    // A WebSocket on every agent; every offer_changed event goes to one channel.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (sightings_tx, sightings) = mpsc::channel::<Sighting>();
    for (index, agent) in agents.iter().enumerate() {
        let mut request = format!("ws://127.0.0.1:{}/api/v1/events", agent.port()?).into_client_request()?;
        request.headers_mut().insert("Authorization", format!("Bearer {}", agent.token()?).parse()?);
        let (mut socket, _) = runtime.block_on(tokio_tungstenite::connect_async(request))?;
        let tx = sightings_tx.clone();
        runtime.spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(event) = serde_json::from_str::<Value>(&text) else { continue };
                if event["type"] == "offer_changed" {
                    let offer = &event["offer"];
                    let (peer, state) = (offer["peer_id"].as_str(), offer["state"].as_str());
                    if let (Some(peer), Some(state)) = (peer, state)
                        && tx.send((index, peer.to_owned(), state.to_owned(), Instant::now())).is_err()
                    {
                        break;
                    }
                }
            }
        });
    }

    let others = count - 1;
    let wanted = (others * 95).div_ceil(100);
    let mut to_95 = Vec::new();
    let mut reached_5s = Vec::new();
    for trial in 0..trials {
        let source = (trial * 7 + 1) % count;
        // Each agent is paused at its first trial, resumed at its second.
        let pausing = (0..trial).filter(|t| (t * 7 + 1) % count == source).count() % 2 == 0;
        let (path, state) = if pausing { ("/api/v1/pause", "paused") } else { ("/api/v1/resume", "sharing") };
        while sightings.try_recv().is_ok() {}
        let agent = &agents[source];
        let start = Instant::now();
        api_post(agent.port()?, &agent.token()?, path, if pausing { "{}" } else { "" })?;
        let mut seen = HashSet::new();
        let mut at_95 = None;
        let deadline = start + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok((index, peer, got, at)) = sightings.recv_timeout(left) else { break };
            if index != source
                && peer == ids[source]
                && got == state
                && seen.insert(index)
                && seen.len() == wanted
            {
                at_95 = Some(at.duration_since(start));
            }
        }
        reached_5s.push(seen.len());
        if let Some(at) = at_95 {
            to_95.push(at);
        }
    }

    // Request to signed agreement: agent 0 submits a small job; the clock runs from the API's
    // answer (the search starts then) to the event that shows the job with its agreement.
    for agent in &agents {
        api_post(agent.port()?, &agent.token()?, "/api/v1/resume", "")?;
    }
    let until = Instant::now() + Duration::from_secs(30);
    while get(&agents[0], "/api/v1/offers")?
        .as_array()
        .is_none_or(|offers| offers.iter().any(|o| o["state"] != "sharing"))
    {
        ensure!(Instant::now() < until, "the agents did not all share again within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let spec_dir = tempfile::tempdir()?;
    let spec = spec_dir.path().join("true.toml");
    std::fs::write(
        &spec,
        "kind = \"native\"\ncommand = [\"/bin/true\"]\n[resources]\ncpu = 0.1\nmemory = \"16MiB\"\n\
         disk = \"1MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    let (agreed_tx, agreed) = mpsc::channel::<(String, String, Instant)>();
    let consumer = &agents[0];
    let mut request = format!("ws://127.0.0.1:{}/api/v1/events", consumer.port()?).into_client_request()?;
    request.headers_mut().insert("Authorization", format!("Bearer {}", consumer.token()?).parse()?);
    let (mut socket, _) = runtime.block_on(tokio_tungstenite::connect_async(request))?;
    runtime.spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else { continue };
            let Ok(event) = serde_json::from_str::<Value>(&text) else { continue };
            let job = &event["job"];
            if event["type"] == "remote_job_changed"
                && let (Some(id), Some(provider)) = (job["id"].as_str(), job["provider"].as_str())
                && agreed_tx.send((id.to_owned(), provider.to_owned(), Instant::now())).is_err()
            {
                break;
            }
        }
    });
    let body = serde_json::json!({ "spec": spec }).to_string();
    let mut agreements = Vec::new();
    let mut providers = HashSet::new();
    for _ in 0..trials {
        while agreed.try_recv().is_ok() {}
        let answer = api_post(consumer.port()?, &consumer.token()?, "/api/v1/remote-jobs", &body)?;
        let start = Instant::now();
        let id = serde_json::from_str::<Value>(&answer)?["id"].as_str().context("no id")?.to_owned();
        let deadline = start + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok((job, provider, at)) = agreed.recv_timeout(left) else { break };
            if job == id {
                agreements.push(at.duration_since(start));
                providers.insert(provider);
                break;
            }
        }
    }

    // Memory against connections.
    let mut points = Vec::new();
    for agent in &agents {
        let peers = get(agent, "/api/v1/peers")?.as_array().map_or(0, Vec::len) as f64;
        let rss = rss_bytes(agent.pid().context("pid")?).context("rss")? as f64;
        points.push((peers, rss));
    }
    let n = points.len() as f64;
    let (mean_peers, mean_rss) =
        (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let covariance: f64 = points.iter().map(|(x, y)| (x - mean_peers) * (y - mean_rss)).sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_peers).powi(2)).sum();
    let slope = if variance > 0.0 { covariance / variance } else { f64::NAN };
    let above_lone = (mean_rss - lone_rss as f64) / mean_peers.max(1.0);

    println!("B8 swarm: {count} agents as processes on loopback, {trials} trials");
    println!(
        "all started in {:.1} s; every agent listed all {count} adverts after {:.1} s",
        all_up.as_secs_f64(),
        converged.as_secs_f64()
    );
    println!(
        "advert to 95% ({wanted} of {others}): reached in {} of {trials} trials; p50 {:.0} ms, max {:.0} ms",
        to_95.len(),
        percentile_ms(&to_95, 50.0),
        percentile_ms(&to_95, 100.0)
    );
    println!(
        "agents holding the new state after 5 s: min {} of {others}, mean {:.1}",
        reached_5s.iter().min().copied().unwrap_or(0),
        reached_5s.iter().sum::<usize>() as f64 / reached_5s.len().max(1) as f64
    );
    println!(
        "memory: lone agent {:.1} MiB; in the swarm mean {:.1} MiB with {mean_peers:.1} peers; \
         per connection {:.0} KiB (slope over agents), {:.0} KiB (above the lone agent)",
        lone_rss as f64 / 1048576.0,
        mean_rss / 1048576.0,
        slope / 1024.0,
        above_lone / 1024.0
    );
    println!(
        "request to signed agreement: {} of {trials} agreed within 10 s, on {} provider(s); \
         p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        agreements.len(),
        providers.len(),
        percentile_ms(&agreements, 50.0),
        percentile_ms(&agreements, 90.0),
        percentile_ms(&agreements, 100.0)
    );
    for agent in &mut agents {
        let _ = agent.terminate();
    }
    Ok(())
}

fn get(agent: &Agent, path: &str) -> Result<Value> {
    let port = agent.port()?;
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {}", agent.token()?);
    let response = raw_http(port, &head)?;
    ensure!(response.status == 200, "{path}: {}", response.status);
    Ok(serde_json::from_str(&response.body)?)
}
