//! A hostile peer's clock fields against a real agent built in debug mode, where an `i64`
//! overflow panics: adverts, job requests and reservation asks whose `issued_at` and
//! `expires_at` sit at the ends of `i64` are refused with a reason about the clock, and the agent
//! goes on serving honest peers afterwards (its swarm task did not die).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use hearth::net::advert::sign;
use hearth::net::negotiate::{
    Allocation, JobRequest, Message, REQUEST_TAG, RESERVE_TAG, Reply, ReserveRequest, Signed, VERSION,
};
use hearth_tests::{Agent, eventually};
use libp2p::{Multiaddr, PeerId};

use crate::hostile_market::{ask, now, raw_peer};
use crate::network::{advert_body, hostile_identity, publish_from, rejections, wait_to_know_offer};

/// The extremes a hostile peer may choose, as `(issued_at, expires_at)`.
fn extremes(now: i64) -> [(i64, i64); 4] {
    [(i64::MIN, now + 600), (now, i64::MAX), (i64::MIN, i64::MAX), (i64::MAX, i64::MAX)]
}

fn refused_for_the_clock(reply: &Reply, what: &str) -> bool {
    match reply {
        Reply::Refused { reason } | Reply::Declined { reason } => {
            reason.starts_with(what)
                && ["in the future", "valid for", "issued", "expire"].iter().any(|w| reason.contains(w))
        }
        _ => false,
    }
}

pub(crate) fn extreme_clock_fields_are_refused_without_a_panic() -> Result<()> {
    // The advert rejections are logged at debug.
    let mut agent = Agent::start_with("", &[("RUST_LOG", "info,hearth::net=debug")])?;
    let (address, provider) = agent.address()?;
    let provider: PeerId = provider.parse()?;
    let dial: Multiaddr = address.parse()?;
    let (me, _keys) = hostile_identity()?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut swarm = raw_peer(&me, dial)?;
        for (i, (issued_at, expires_at)) in extremes(now()).into_iter().enumerate() {
            let request = JobRequest {
                version: VERSION,
                request_id: format!("clock-{i}").into(),
                consumer: me.peer_id().to_string().into(),
                provider: provider.to_string().into(),
                issued_at,
                expires_at,
                spec: "kind = \"native\"\ncommand = [\"/bin/true\"]\n".into(),
                files: BTreeMap::new(),
                resources: Allocation {
                    cpu_millis: 100,
                    memory_bytes: 64 << 20,
                    disk_bytes: 16 << 20,
                    ..Allocation::default()
                },
                time_limit_s: 60,
                network: false,
                hosted: false,
                max_price_per_hour: None,
                reservation: None,
            };
            let reply = ask(
                &mut swarm,
                provider,
                Message::Request { request: Signed::sign(&me, REQUEST_TAG, &request)? },
            )
            .await?;
            ensure!(
                refused_for_the_clock(&reply, "the request"),
                "a request issued {issued_at}, expiring {expires_at} was not refused for its clock: {reply:?}"
            );
        }
        for issued_at in [i64::MIN, i64::MAX, now() - 3600] {
            let ask_body = ReserveRequest {
                version: VERSION,
                reservation_id: format!("clock-ask-{}", issued_at.rem_euclid(1000)),
                request_id: "clock-package".into(),
                resource: "prep".into(),
                consumer: me.peer_id().to_string().into(),
                provider: provider.to_string().into(),
                issued_at,
                resources: Allocation {
                    cpu_millis: 100,
                    memory_bytes: 64 << 20,
                    disk_bytes: 16 << 20,
                    ..Allocation::default()
                },
                network: false,
                max_price_per_hour: None,
                hold_s: 600,
            };
            let request = Signed::sign(&me, RESERVE_TAG, &ask_body)?;
            let reply = ask(&mut swarm, provider, Message::Reserve { request }).await?;
            ensure!(
                refused_for_the_clock(&reply, "the ask"),
                "an ask issued {issued_at} was not refused for its clock: {reply:?}"
            );
        }
        anyhow::Ok(())
    })?;

    // Adverts, each from an identity of its own (the agent stops listening to a peer whose adverts
    // it keeps rejecting).
    let now = now();
    for (issued_at, expires_at) in extremes(now) {
        let (identity, _dir) = hostile_identity()?;
        let body = hearth::net::AdvertBody { issued_at, expires_at, ..advert_body(&identity, 1, now, 7) };
        let before = rejections(&agent);
        publish_from(&identity, &address, sign(&identity, body)?.wire)?;
        let judged = format!("the agent to judge the advert issued {issued_at}, expiring {expires_at}");
        eventually(Duration::from_secs(10), &judged, || Ok((rejections(&agent) > before).then_some(())))?;
        let last =
            agent.log().lines().rfind(|l| l.contains("advert rejected")).unwrap_or_default().to_owned();
        ensure!(
            ["in the future", "valid for", "expired"].iter().any(|w| last.contains(w)),
            "the advert issued {issued_at}, expiring {expires_at} was rejected as: {last}"
        );
    }

    // The swarm task lives on: an honest outsider's advert is still taken, and nothing panicked.
    let (honest, _dir) = hostile_identity()?;
    publish_from(&honest, &address, sign(&honest, advert_body(&honest, 1, now, 1000))?.wire)?;
    wait_to_know_offer(&agent, &honest.peer_id().to_string())?;
    let log = agent.log();
    ensure!(!log.contains("panicked"), "the agent panicked:\n{log}");
    ensure!(agent.terminate()?.success(), "the agent did not stop cleanly:\n{}", agent.log());
    Ok(())
}
