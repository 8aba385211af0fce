//! Flooding: an agent under a storm of connections and oversized messages refuses what is over
//! its limits, keeps its memory bounded, and still serves an honest peer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, rss_bytes};
use libp2p::Multiaddr;
use libp2p::futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::network::{address, advert_body, hostile_identity, joining, json, publish_from, wait_to_know};

/// Distinct identities that each open one full connection: more than the agent's 256.
const IDENTITIES: usize = 300;
/// Raw TCP connections that send junk instead of a handshake.
const JUNK_SOCKETS: usize = 1000;
/// Connections one identity tries at once: more than the 4 allowed per peer.
const ONE_PEER_DIALS: usize = 12;

pub(crate) fn a_flood_is_refused_memory_stays_bounded_and_an_honest_peer_gets_through() -> Result<()> {
    let mut target = Agent::start()?;
    let (target_addr, _) = address(&target)?;
    let mut honest = joining(&target_addr)?;
    let (_, honest_id) = address(&honest)?;
    wait_to_know(&target, &[&honest_id], Duration::from_secs(30))?;
    let pid = target.pid().context("pid")?;
    let before = rss_bytes(pid).context("rss")?;

    let peak = Arc::new(AtomicUsize::new(before as usize));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while !sampling.is_cancelled() {
                if let Some(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss as usize, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Oversized adverts from an outsider, beside the connection flood.
    let oversize = std::thread::spawn({
        let target_addr = target_addr.clone();
        move || -> Result<usize> {
            let (identity, _dir) = hostile_identity()?;
            let mut body = advert_body(&identity, 1, hearth::clock::unix_now(), 7);
            body.paused_because = vec!["x".repeat(60_000)];
            let wire = hearth::net::advert::sign(&identity, body)?.wire;
            let mut sent = 0;
            for _ in 0..5 {
                // The agent refuses the frame and may drop the connection: an error is expected.
                if publish_from(&identity, &target_addr, wire.clone()).is_ok() {
                    sent += 1;
                }
            }
            Ok(sent)
        }
    });

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let flood_stop = CancellationToken::new();
    let target_multiaddr: Multiaddr = target_addr.parse()?;
    let tcp_port = tcp_port(&target_multiaddr).context("the agent's TCP port")?;

    // One identity tries many connections at once, and keeps trying.
    let one_peer = {
        let (address, stop) = (target_multiaddr.clone(), flood_stop.clone());
        runtime.spawn(async move { hold_one(address, ONE_PEER_DIALS, stop).await })
    };
    // The oversized adverts go first: once the connection limit is reached, their sender would be
    // refused like any other newcomer.
    let oversized_sent = oversize.join().map_err(|_| anyhow::anyhow!("the oversize thread panicked"))??;
    // Every other identity wants one connection, and keeps trying until the flood ends.
    let mut flooders = Vec::new();
    for _ in 0..IDENTITIES {
        let (address, stop) = (target_multiaddr.clone(), flood_stop.clone());
        flooders.push(runtime.spawn(async move { hold_one(address, 1, stop).await }));
    }
    // And raw sockets send junk where a handshake belongs; the agent must close every one.
    let junk = runtime.spawn(async move {
        let mut closed = 0usize;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..JUNK_SOCKETS {
            tasks.spawn(async move {
                let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await else {
                    return true; // refused outright
                };
                let _ = socket.write_all(&[0xAB; 4096]).await;
                let mut buf = [0u8; 1024];
                // Closed by the agent (EOF or reset) before the deadline.
                loop {
                    match tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf)).await {
                        Ok(Ok(0) | Err(_)) => return true,
                        Ok(Ok(_)) => continue,
                        Err(_) => return false,
                    }
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            closed += usize::from(result.unwrap_or(false));
        }
        closed
    });

    // While all that goes on, the honest peer's news still reaches the target.
    std::thread::sleep(Duration::from_secs(3));
    let paused = hearth_tests::hearth(&honest.data_dir(), &["pause"])?;
    ensure!(paused.status.success(), "pause: {paused:?}");
    let paused_at = Instant::now();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let offers = json(&target, &["offers", "--json"])?;
        let honest_offer =
            offers.as_array().and_then(|o| o.iter().find(|o| o["peer_id"] == honest_id.as_str()).cloned());
        if honest_offer.as_ref().is_some_and(|o| o["state"] == "paused") {
            break;
        }
        ensure!(
            Instant::now() < until,
            "the honest peer's paused advert never arrived during the flood: {honest_offer:?}\nhonest peers: {}\nhonest offers: {}\ntarget knows honest: {}",
            json(&honest, &["peers", "--json"])?,
            json(&honest, &["offers", "--json"])?,
            json(&target, &["peers", "--json"])?
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["peer_id"] == honest_id.as_str()))
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("paused advert arrived after {:?}", paused_at.elapsed());
    // What the agent holds, seen from its side (a dialler sees a connection the agent closes at
    // once as established for a moment).
    let (mut most_peers, mut most_per_peer) = (0, 0);
    for _ in 0..10 {
        let peers = json(&target, &["peers", "--json"])?;
        let list = peers.as_array().cloned().unwrap_or_default();
        most_peers = most_peers.max(list.len());
        let per_peer = list.iter().map(|p| p["addresses"].as_array().map_or(0, Vec::len)).max();
        most_per_peer = most_per_peer.max(per_peer.unwrap_or(0));
        std::thread::sleep(Duration::from_millis(300));
    }

    let closed = runtime.block_on(junk)?;
    flood_stop.cancel();
    for flooder in flooders {
        runtime.block_on(flooder)?;
    }
    runtime.block_on(one_peer)?;
    runtime.shutdown_timeout(Duration::from_secs(5));
    sampling.cancel();
    sampler.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))?;

    let peak = peak.load(Ordering::Relaxed) as u64;
    eprintln!(
        "flood: {IDENTITIES} identities and one with {ONE_PEER_DIALS} dials: the agent held {most_peers} peers \
         at most (limit 256) and {most_per_peer} connections to one peer at most (limit 4); \
         {closed} of {JUNK_SOCKETS} junk sockets closed; {oversized_sent} oversized adverts sent; \
         RSS {} MiB before, {} MiB at the peak",
        before >> 20,
        peak >> 20
    );
    ensure!(most_peers <= 256, "the agent had {most_peers} peers, over its limit of 256");
    ensure!(most_per_peer <= 4, "the agent held {most_per_peer} connections to one peer; the limit is 4");
    ensure!(most_peers > 200, "the flood never came near the limit ({most_peers} peers): it tested nothing");
    ensure!(closed == JUNK_SOCKETS, "{} junk sockets were left open", JUNK_SOCKETS - closed);
    ensure!(peak < before + (256 << 20), "memory grew from {} to {} MiB", before >> 20, peak >> 20);

    // The agent is still whole: the oversized adverts went nowhere, and a newcomer joins at once.
    let offers = json(&target, &["offers", "--json"])?;
    ensure!(offers.as_array().is_some_and(|o| o.len() == 2), "only the two honest adverts: {offers}");
    let mut newcomer = joining(&target_addr)?;
    let (_, newcomer_id) = address(&newcomer)?;
    wait_to_know(&target, &[&newcomer_id, &honest_id], Duration::from_secs(30))?;
    for agent in [&mut newcomer, &mut honest, &mut target] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

fn tcp_port(address: &Multiaddr) -> Option<u16> {
    address.iter().find_map(|part| match part {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

/// A fresh identity that keeps `dials` connections to `address` wanted (dialling again as the
/// agent refuses or closes them) until `stop`.
async fn hold_one(address: Multiaddr, dials: usize, stop: CancellationToken) {
    let Ok(builder) = libp2p::SwarmBuilder::with_new_identity().with_tokio().with_tcp(
        Default::default(),
        libp2p::noise::Config::new,
        libp2p::yamux::Config::default,
    ) else {
        return;
    };
    let Ok(builder) = builder.with_behaviour(|_| libp2p::swarm::dummy::Behaviour);
    let mut swarm =
        builder.with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120))).build();
    let (mut mine, mut dialling) = (0usize, 0usize);
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = retry.tick() => {
                while mine + dialling < dials {
                    if swarm.dial(DialOpts::unknown_peer_id().address(address.clone()).build()).is_err() {
                        break;
                    }
                    dialling += 1;
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { .. } => {
                    dialling = dialling.saturating_sub(1);
                    mine += 1;
                }
                SwarmEvent::ConnectionClosed { .. } => mine = mine.saturating_sub(1),
                SwarmEvent::OutgoingConnectionError { .. } => dialling = dialling.saturating_sub(1),
                _ => {}
            }
        }
    }
}
