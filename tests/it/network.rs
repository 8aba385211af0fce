//! Agents meeting on loopback: real daemons, real libp2p between them, no mDNS (a test's traffic
//! stays on this machine), one bootstrap address.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, hearth, json_of};
use serde_json::Value;

pub(crate) fn json(agent: &Agent, args: &[&str]) -> Result<Value> {
    json_of(&agent.cli(args)?)
}

/// The agent's first listen address, ending in /p2p/PEER_ID, and its peer id.
pub(crate) fn address(agent: &Agent) -> Result<(String, String)> {
    agent.address()
}

pub(crate) fn joining(bootstrap: &str) -> Result<Agent> {
    Agent::start_with_config(&format!(
        "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nbootstrap = [\"{bootstrap}\"]\n"
    ))
}

/// Waits until `agent`'s peers and offers both name every one of `others`; returns its offers.
pub(crate) fn wait_to_know(agent: &Agent, others: &[&str], within: Duration) -> Result<Vec<Value>> {
    let until = Instant::now() + within;
    loop {
        let peers = json(agent, &["peers", "--json"])?;
        let offers = json(agent, &["offers", "--json"])?;
        let names = |list: &Value| -> Vec<String> {
            list.as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["peer_id"].as_str().map(str::to_owned))
                .collect()
        };
        let (peer_ids, offer_ids) = (names(&peers), names(&offers));
        if others.iter().all(|o| peer_ids.iter().any(|p| p == o) && offer_ids.iter().any(|p| p == o)) {
            return Ok(offers.as_array().cloned().unwrap_or_default());
        }
        ensure!(
            Instant::now() < until,
            "after {within:?}: peers {peer_ids:?}, offers {offer_ids:?}, wanted {others:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn three_agents_meet_through_one_bootstrap_and_find_a_restarted_one() -> Result<()> {
    let mut a = Agent::start()?;
    let (a_addr, a_id) = address(&a)?;
    let mut b = joining(&a_addr)?;
    let mut c = joining(&a_addr)?;
    let (_, b_id) = address(&b)?;
    let (_, c_id) = address(&c)?;
    let within = Duration::from_secs(30);
    wait_to_know(&a, &[&b_id, &c_id], within)?;
    wait_to_know(&b, &[&a_id, &c_id], within)?;
    let offers = wait_to_know(&c, &[&a_id, &b_id], within)?;
    // Each advert says what its agent offers and until when.
    let b_offer = offers.iter().find(|o| o["peer_id"] == b_id.as_str()).context("b's offer")?;
    ensure!(b_offer["state"] == "sharing" && b_offer["free"]["cpu_millis"].as_u64() > Some(0), "{b_offer}");
    ensure!(b_offer["expires_at"].as_i64() > b_offer["issued_at"].as_i64(), "{b_offer}");
    let peers = json(&c, &["peers", "--json"])?;
    let to_a =
        peers.as_array().and_then(|p| p.iter().find(|p| p["peer_id"] == a_id.as_str())).context("a")?;
    ensure!(to_a["addresses"][0].as_str().is_some_and(|a| a.starts_with("/ip4/127.0.0.1/")), "{to_a}");
    let text = String::from_utf8_lossy(&hearth(&c.data_dir(), &["offers"])?.stdout).into_owned();
    ensure!(text.contains(&b_id) && text.contains("cores"), "{text}");

    // B restarts (same identity, a new port) and is found again, with a newer advert.
    let before = b_offer["seq"].as_u64().context("seq")?;
    ensure!(b.terminate()?.success(), "b did not stop cleanly");
    b.restart()?;
    wait_to_know(&c, &[&b_id], within)?;
    let until = Instant::now() + within;
    loop {
        let offers = json(&c, &["offers", "--json"])?.as_array().cloned().unwrap_or_default();
        let seq = offers.iter().find(|o| o["peer_id"] == b_id.as_str()).and_then(|o| o["seq"].as_u64());
        if seq.is_some_and(|seq| seq > before) {
            break;
        }
        ensure!(Instant::now() < until, "no newer advert from the restarted agent");
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_to_know(&a, &[&b_id], within)?;
    for agent in [&mut a, &mut b, &mut c] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

pub(crate) fn a_paused_agent_says_so_in_its_advert() -> Result<()> {
    let mut a = Agent::start()?;
    let (a_addr, a_id) = address(&a)?;
    let mut b = joining(&a_addr)?;
    wait_to_know(&b, &[&a_id], Duration::from_secs(30))?;
    ensure!(hearth(&a.data_dir(), &["pause"])?.status.success());
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let offers = json(&b, &["offers", "--json"])?;
        let a_offer =
            offers.as_array().and_then(|o| o.iter().find(|o| o["peer_id"] == a_id.as_str()).cloned());
        if let Some(offer) = a_offer
            && offer["state"] == "paused"
        {
            ensure!(offer["free"]["cpu_millis"] == 0, "{offer}");
            ensure!(
                offer["paused_because"][0].as_str().is_some_and(|r| r.contains("paused by the owner")),
                "{offer}"
            );
            break;
        }
        ensure!(Instant::now() < until, "the pause was not advertised: {offers}");
        std::thread::sleep(Duration::from_millis(250));
    }
    for agent in [&mut a, &mut b] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

/// A peer that speaks only gossipsub (no Kademlia, so nobody else learns of it): it connects to
/// one agent, waits until that agent subscribes it to the advert topic, publishes `data` as
/// `identity`, and goes away.
pub(crate) fn publish_from(identity: &hearth::identity::Identity, agent: &str, data: Vec<u8>) -> Result<()> {
    use libp2p::futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .heartbeat_interval(Duration::from_millis(200))
            .max_transmit_size(64 * 1024)
            .build()?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone())
            .with_tokio()
            .with_tcp(Default::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)?
            .with_behaviour(|key| {
                let behaviour: gossipsub::Behaviour =
                    gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(behaviour)
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .build();
        let topic = gossipsub::IdentTopic::new(hearth::net::ADVERT_TOPIC);
        swarm.behaviour_mut().subscribe(&topic)?;
        swarm.dial(agent.parse::<libp2p::Multiaddr>()?)?;
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let event = tokio::time::timeout_at(until, swarm.select_next_some())
                .await
                .context("the agent never subscribed")?;
            if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) = event {
                break;
            }
        }
        swarm.behaviour_mut().publish(topic, data)?;
        // Let the message go out before the connection closes.
        let flush = tokio::time::Instant::now() + Duration::from_millis(500);
        while tokio::time::timeout_at(flush, swarm.select_next_some()).await.is_ok() {}
        Ok(())
    })
}

pub(crate) fn hostile_identity() -> Result<(hearth::identity::Identity, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let (identity, _) = hearth::identity::Identity::load_or_create(dir.path())?;
    Ok((identity, dir))
}

pub(crate) fn advert_body(
    identity: &hearth::identity::Identity,
    seq: u64,
    issued_at: i64,
    marker: u64,
) -> hearth::net::AdvertBody {
    use hearth::net::advert::*;
    AdvertBody {
        version: ADVERT_VERSION,
        peer_id: identity.peer_id().to_string().into(),
        seq,
        issued_at,
        expires_at: issued_at + 600,
        state: "sharing".into(),
        paused_because: Vec::new(),
        free: Free { cpu_millis: 1000, memory_bytes: 1 << 30, disk_bytes: 1 << 30, gpus: Vec::new() },
        windows: Vec::new(),
        prices: Prices { core_hour: marker, memory_gib_hour: 1, gpu_hour: 1 },
        reputation: Reputation::default(),
    }
}

pub(crate) fn bad_adverts_are_rejected_and_not_forwarded_to_a_third_agent() -> Result<()> {
    use hearth::net::advert::sign;
    // A logs each rejection (at debug), which shows each bad advert did reach it.
    let mut a = Agent::start_with("", &[("RUST_LOG", "info,hearth::net=debug")])?;
    let (a_addr, a_id) = address(&a)?;
    let mut c = joining(&a_addr)?;
    wait_to_know(&c, &[&a_id], Duration::from_secs(30))?;
    let now = hearth::clock::unix_now();

    // The control: a good advert from an outsider reaches C through A.
    let (honest, _dir) = hostile_identity()?;
    let honest_id = honest.peer_id().to_string();
    publish_from(&honest, &a_addr, sign(&honest, advert_body(&honest, 10, now, 1000))?.wire)?;
    wait_to_know_offer(&c, &honest_id)?;

    // Each bad advert comes from an identity of its own, except the replay, which must be the
    // honest outsider's: A lowers the score of a peer whose adverts it rejects, and ignores it
    // altogether after a few, which would hide the later cases.
    let (other, _other_dir) = hostile_identity()?;
    let fresh: Vec<(hearth::identity::Identity, tempfile::TempDir)> =
        (0..5).map(|_| hostile_identity()).collect::<Result<_>>()?;
    let tampered = String::from_utf8(sign(&fresh[0].0, advert_body(&fresh[0].0, 20, now, 1001))?.wire)?
        .replace("\"cpu_millis\":1000", "\"cpu_millis\":64000");
    let cases: Vec<(&str, &hearth::identity::Identity, Vec<u8>)> = vec![
        ("is not newer", &honest, sign(&honest, advert_body(&honest, 10, now, 1004))?.wire),
        ("bad signature", &fresh[0].0, tampered.into_bytes()),
        ("expired", &fresh[1].0, sign(&fresh[1].0, advert_body(&fresh[1].0, 21, now - 3600, 1002))?.wire),
        (
            "issued in the future",
            &fresh[2].0,
            sign(&fresh[2].0, advert_body(&fresh[2].0, 22, now + 7200, 1003))?.wire,
        ),
        ("published by", &fresh[3].0, sign(&other, advert_body(&other, 1, now, 1005))?.wire),
        ("malformed", &fresh[4].0, b"{\"advert\": \"no\"}".to_vec()),
    ];
    for (expected, identity, data) in cases {
        let before = rejections(&a);
        publish_from(identity, &a_addr, data)?;
        let until = Instant::now() + Duration::from_secs(10);
        while rejections(&a) == before {
            ensure!(Instant::now() < until, "A never judged the {expected:?} advert:\n{}", a.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let last = a.log().lines().rfind(|l| l.contains("advert rejected")).unwrap_or_default().to_owned();
        ensure!(last.contains(expected), "the {expected:?} advert was rejected as: {last}");
    }
    let oversized = {
        let mut body = advert_body(&fresh[1].0, 30, now, 1007);
        body.paused_because = vec!["x".repeat(20_000)];
        body
    };
    // Too large for the wire: A's gossipsub refuses the frame before validation.
    publish_from(&fresh[1].0, &a_addr, sign(&fresh[1].0, oversized)?.wire).ok();

    // A marker published after all of them: once C has it, anything A forwarded before it has
    // arrived too (gossip between two peers keeps its order), so no sleep decides the absence.
    let (marker, _marker_dir) = hostile_identity()?;
    publish_from(&marker, &a_addr, sign(&marker, advert_body(&marker, 1, now, 1008))?.wire)?;
    wait_to_know_offer(&c, &marker.peer_id().to_string())?;
    // Nothing of it reached C: the honest outsider's offer is still the control, and the other
    // identity has no offer at all.
    for agent in [&a, &c] {
        let offers = json(agent, &["offers", "--json"])?;
        let list = offers.as_array().context("list")?;
        let from_honest: Vec<&Value> = list.iter().filter(|o| o["peer_id"] == honest_id.as_str()).collect();
        ensure!(from_honest.len() == 1 && from_honest[0]["prices"]["core_hour"] == 1000, "{offers}");
        let strangers = [&other]
            .into_iter()
            .chain(fresh.iter().map(|(identity, _)| identity))
            .map(|identity| identity.peer_id().to_string())
            .collect::<Vec<_>>();
        ensure!(!list.iter().any(|o| strangers.iter().any(|s| o["peer_id"] == s.as_str())), "{offers}");
    }
    for agent in [&mut a, &mut c] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

pub(crate) fn rejections(agent: &Agent) -> usize {
    agent.log().lines().filter(|line| line.contains("advert rejected")).count()
}

/// A consumer and a provider that joined it, each knowing the other and the consumer knowing the
/// provider's advert: the smallest market.
pub(crate) fn consumer_and_provider() -> Result<(Agent, Agent)> {
    let consumer = Agent::start()?;
    let (bootstrap, consumer_id) = address(&consumer)?;
    let provider = joining(&bootstrap)?;
    let (_, provider_id) = address(&provider)?;
    wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))?;
    wait_to_know(&provider, &[&consumer_id], Duration::from_secs(30))?;
    wait_to_know_offer(&consumer, &provider_id)?;
    Ok((consumer, provider))
}

pub(crate) fn wait_to_know_offer(agent: &Agent, peer: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let offers = json(agent, &["offers", "--json"])?;
        if offers.as_array().is_some_and(|o| o.iter().any(|o| o["peer_id"] == peer)) {
            return Ok(());
        }
        ensure!(Instant::now() < until, "{peer}'s advert never arrived: {offers}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn two_agents_on_one_lan_find_each_other_by_mdns() -> Result<()> {
    use hearth_tests::netns::{Netns, veth};
    let left = Netns::create("ml")?;
    let right = Netns::create("mr")?;
    let pid = std::process::id();
    let (left_if, right_if) = (format!("vl{pid}"), format!("vr{pid}"));
    veth(&left, &left_if, &right, &right_if)?;
    left.ip(&["addr", "add", "192.168.50.1/24", "dev", &left_if])?;
    right.ip(&["addr", "add", "192.168.50.2/24", "dev", &right_if])?;
    // The defaults a home user has: every interface, mDNS on, no bootstrap. A third agent on B's
    // side is started first with mDNS turned off by its flag (as the README's quickstart does).
    let config = "[network]\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\nmdns = true\n";
    let mut quiet = Agent::start_in_with(&right, config, &[("HEARTH_NO_MDNS", "true")])?;
    let mut a = Agent::start_in(&left, config)?;
    let mut b = Agent::start_in(&right, config)?;
    let id = |agent: &Agent| -> Result<String> {
        let status = json_of(&agent.cli(&["status", "--json"])?)?;
        Ok(status["peer_id"].as_str().context("peer_id")?.to_owned())
    };
    let (a_id, b_id, quiet_id) = (id(&a)?, id(&b)?, id(&quiet)?);
    let until = Instant::now() + Duration::from_secs(30);
    for (agent, other) in [(&a, &b_id), (&b, &a_id)] {
        loop {
            let peers = json_of(&agent.cli(&["peers", "--json"])?)?;
            let found =
                peers.as_array().and_then(|p| p.iter().find(|p| p["peer_id"] == other.as_str()).cloned());
            if let Some(peer) = found {
                ensure!(
                    peer["addresses"][0].as_str().is_some_and(|a| a.contains("/ip4/192.168.50.")),
                    "{peer}"
                );
                break;
            }
            ensure!(Instant::now() < until, "no mDNS discovery after 30 s: {peers}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // A and B found each other by mDNS while the quiet agent ran on the same LAN: it met nobody,
    // and nobody met it.
    let peers = json_of(&quiet.cli(&["peers", "--json"])?)?;
    ensure!(peers.as_array().is_some_and(Vec::is_empty), "an agent with mDNS off met {peers}");
    for agent in [&a, &b] {
        let peers = json_of(&agent.cli(&["peers", "--json"])?)?;
        ensure!(
            !peers.as_array().is_some_and(|p| p.iter().any(|p| p["peer_id"] == quiet_id.as_str())),
            "an agent found one whose mDNS is off: {peers}"
        );
    }
    for agent in [&mut a, &mut b, &mut quiet] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

/// Two homes, each behind its own router's NAT (nftables masquerade, inbound only for answers),
/// and a relay agent on the "internet" between them. Each home agent is told only the relay's
/// address. The agent in one home lists a `/p2p-circuit` address through the relay; the agent in
/// the other connects to it by peer id alone (its address found through the relay's DHT), over
/// the relay; then DCUtR tries a direct connection and both report how it went.
pub(crate) fn agents_behind_nats_reach_each_other_through_a_relay() -> Result<()> {
    use hearth_tests::netns::{Netns, veth};
    let pid = std::process::id();
    let wan = Netns::create("nw")?;
    wan.forward()?;
    let mut homes = Vec::new();
    for home in 1..=2 {
        let router = Netns::create(&format!("nr{home}"))?;
        let host = Netns::create(&format!("nh{home}"))?;
        let (wan_if, uplink, lan_if, host_if) = (
            format!("w{home}{pid}"),
            format!("u{home}{pid}"),
            format!("l{home}{pid}"),
            format!("h{home}{pid}"),
        );
        veth(&wan, &wan_if, &router, &uplink)?;
        veth(&router, &lan_if, &host, &host_if)?;
        wan.ip(&["addr", "add", &format!("10.77.{home}.1/24"), "dev", &wan_if])?;
        router.ip(&["addr", "add", &format!("10.77.{home}.2/24"), "dev", &uplink])?;
        router.ip(&["route", "add", "default", "via", &format!("10.77.{home}.1")])?;
        router.ip(&["addr", "add", &format!("10.78.{home}.1/24"), "dev", &lan_if])?;
        router.masquerade(&uplink)?;
        host.ip(&["addr", "add", &format!("10.78.{home}.2/24"), "dev", &host_if])?;
        host.ip(&["route", "add", "default", "via", &format!("10.78.{home}.1")])?;
        homes.push((router, host));
    }
    let listen = "listen = [\"/ip4/0.0.0.0/tcp/0\", \"/ip4/0.0.0.0/udp/0/quic-v1\"]\nmdns = false";
    let mut relay = Agent::start_in(&wan, &format!("[network]\n{listen}\nrelay = true\n"))?;
    let relay_status = json_of(&relay.cli(&["status", "--json"])?)?;
    let relay_id = relay_status["peer_id"].as_str().context("peer_id")?.to_owned();
    let relay_addr = |home: u8| -> Result<String> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let status = json_of(&relay.cli(&["status", "--json"])?)?;
            let prefix = format!("/ip4/10.77.{home}.1/tcp/");
            let found = status["listen_addrs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .find(|a| a.starts_with(&prefix));
            if let Some(address) = found {
                return Ok(address.to_owned());
            }
            ensure!(Instant::now() < until, "the relay has no address on home {home}'s side: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut agents = Vec::new();
    for (home, (_, host)) in (1..=2).zip(&homes) {
        let config = format!("[network]\n{listen}\nbootstrap = [\"{}\"]\n", relay_addr(home)?);
        agents.push(Agent::start_in(host, &config)?);
    }
    let ids: Vec<String> = agents
        .iter()
        .map(|agent| {
            Ok(json_of(&agent.cli(&["status", "--json"])?)?["peer_id"].as_str().context("id")?.to_owned())
        })
        .collect::<Result<_>>()?;

    // The first home's agent becomes reachable through the relay.
    let circuit = format!("/p2p/{relay_id}/p2p-circuit/p2p/{}", ids[0]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = json_of(&agents[0].cli(&["status", "--json"])?)?;
        let addrs = status["listen_addrs"].as_array().cloned().unwrap_or_default();
        if addrs.iter().filter_map(Value::as_str).any(|a| a.ends_with(&circuit)) {
            ensure!(status["reachability"] != "public", "{status}");
            break;
        }
        ensure!(
            Instant::now() < until,
            "no relayed address after 30 s: {status}\npeers: {}\nagent log:\n{}\nrelay log:\n{}",
            String::from_utf8_lossy(&agents[0].cli(&["peers", "--json"])?.stdout),
            agents[0].log(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Nothing in the second home can reach the first directly; by its id alone, it connects
    // through the relay (the DHT may already have led it there, and a hole punch may already have
    // made a direct connection beside the relayed one).
    let connect = agents[1].cli(&["connect", &ids[0], "--json"])?;
    let peer = json_of(&connect)
        .with_context(|| format!("hearth connect failed\nagent log:\n{}", agents[1].log()))?;
    ensure!(peer["peer_id"] == ids[0].as_str(), "{peer}");
    let addresses: Vec<&str> =
        peer["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    ensure!(
        addresses.iter().any(|a| a.contains(&format!("/p2p/{relay_id}/p2p-circuit"))),
        "no connection through the relay: {peer}"
    );

    // DCUtR tries a direct connection; the side that led the attempt reports how it went, and
    // the path shown agrees with it.
    let until = Instant::now() + Duration::from_secs(30);
    let outcome = 'outcome: loop {
        for (agent, other) in [(&agents[0], &ids[1]), (&agents[1], &ids[0])] {
            let peers = json_of(&agent.cli(&["peers", "--json"])?)?;
            let entry =
                peers.as_array().and_then(|p| p.iter().find(|p| p["peer_id"] == other.as_str()).cloned());
            if let Some(entry) = entry.filter(|e| !e["hole_punch"].is_null()) {
                break 'outcome entry;
            }
        }
        ensure!(
            Instant::now() < until,
            "no hole punch attempted within 30 s\nfirst agent:\n{}\nsecond agent:\n{}",
            agents[0].log(),
            agents[1].log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    if outcome["hole_punch"]["outcome"] == "succeeded" {
        ensure!(outcome["path"] == "direct", "{outcome}");
    }
    eprintln!("hole punch between two masquerading NATs: {}", outcome["hole_punch"]);

    for agent in agents.iter_mut().chain([&mut relay]) {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}
