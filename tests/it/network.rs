//! Agents meeting on loopback: real daemons, real libp2p between them, no mDNS (a test's traffic
//! stays on this machine), one bootstrap address.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, hearth, json_of};
use serde_json::Value;

fn json(agent: &Agent, args: &[&str]) -> Result<Value> {
    json_of(&hearth(&agent.data_dir(), args)?)
}

/// The agent's first listen address, ending in /p2p/PEER_ID, once it has one.
fn address(agent: &Agent) -> Result<(String, String)> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = json(agent, &["status", "--json"])?;
        let peer = status["peer_id"].as_str().context("peer_id")?.to_owned();
        if let Some(address) =
            status["listen_addrs"].as_array().and_then(|a| a.first()).and_then(Value::as_str)
        {
            ensure!(address.ends_with(&format!("/p2p/{peer}")), "{address}");
            return Ok((address.to_owned(), peer));
        }
        ensure!(Instant::now() < until, "no listen address: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn joining(bootstrap: &str) -> Result<Agent> {
    Agent::start_with_config(&format!(
        "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nbootstrap = [\"{bootstrap}\"]\n"
    ))
}

/// Waits until `agent`'s peers and offers both name every one of `others`; returns its offers.
fn wait_to_know(agent: &Agent, others: &[&str], within: Duration) -> Result<Vec<Value>> {
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
