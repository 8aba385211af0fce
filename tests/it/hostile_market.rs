//! A hostile peer against a real agent on loopback: tampered, unsigned and wrongly signed
//! requests, offers and notices are refused with the reason, and an acceptance whose signature
//! does not verify never becomes an agreement (nothing is stored, nothing runs); an agreed spec
//! that names the provider's own files fails before it runs. Reservations: a forged or tampered
//! ask holds nothing, a stranger can neither release, keep nor run a task in another consumer's
//! reservation, and a task asking more than its reservation is refused.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hearth::identity::Identity;
use hearth::jobs::JobState;
use hearth::net::advert::Prices;
use hearth::net::negotiate::{
    self, AGREEMENT_TAG, Allocation, JobRequest, Message, NOTICE_TAG, Notice, RELEASE_TAG, REQUEST_TAG,
    RESERVATION_TAG, RESERVE_TAG, Release, Reply, Reservation, ReserveRequest, Signed, Terms, VERSION,
};
use hearth_tests::{Agent, json_of};
use libp2p::futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};

type Behaviour = request_response::json::Behaviour<Message, Reply>;

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Sends `message` to `peer` and waits for the reply, answering nothing else meanwhile.
pub(crate) async fn ask(swarm: &mut Swarm<Behaviour>, peer: PeerId, message: Message) -> Result<Reply> {
    let id = swarm.behaviour_mut().send_request(&peer, message);
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(until, swarm.select_next_some()).await.context("no reply")?;
        match event {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            }) if request_id == id => return Ok(response),
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                if request_id == id =>
            {
                bail!("the message failed: {error}")
            }
            _ => {}
        }
    }
}

fn refused_for_signature(reply: &Reply) -> bool {
    match reply {
        Reply::Refused { reason } | Reply::Declined { reason } => reason.contains("bad signature"),
        _ => false,
    }
}

pub(crate) fn tampered_and_unsigned_documents_are_rejected() -> Result<()> {
    let agent = Agent::start()?;
    let (address, provider) = agent.address()?;
    let provider: PeerId = provider.parse()?;
    let address: Multiaddr = address.parse()?;
    let keys = tempfile::tempdir()?;
    let (me, _) = Identity::load_or_create(keys.path())?;
    let (stranger, _) = Identity::load_or_create(tempfile::tempdir()?.path())?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(me.keypair().clone())
            .with_tokio()
            .with_tcp(Default::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)?
            .with_behaviour(|_| {
                Behaviour::new([(negotiate::PROTOCOL, ProtocolSupport::Full)], request_response::Config::default())
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(address)?;

        let request = JobRequest {
            version: VERSION,
            request_id: "hostile-1".into(),
            consumer: me.peer_id().to_string().into(),
            provider: provider.to_string().into(),
            issued_at: now(),
            expires_at: now() + 600,
            spec: "kind = \"native\"\ncommand = [\"/bin/true\"]\n".into(),
            files: BTreeMap::new(),
            resources: Allocation { cpu_millis: 100, memory_bytes: 64 << 20, disk_bytes: 16 << 20, ..Allocation::default() },
            time_limit_s: 60,
            network: false,
            hosted: false,
            max_price_per_hour: None,
            reservation: None,
        };
        let signed = Signed::sign(&me, REQUEST_TAG, &request)?;

        // A request changed after signing, one without a signature, one signed by someone else.
        let mut tampered = signed.clone();
        tampered.body["resources"]["cpu_millis"] = 1.into();
        let unsigned = Signed { signature: String::new(), ..signed.clone() };
        let foreign = Signed::sign(&stranger, REQUEST_TAG, &request)?;
        for (what, bad) in [("tampered", tampered), ("unsigned", unsigned), ("foreign", foreign)] {
            let reply = ask(&mut swarm, provider, Message::Request { request: bad }).await?;
            ensure!(refused_for_signature(&reply), "a {what} request was not refused for its signature: {reply:?}");
        }
        // Offers and notices the agent never asked for, tampered or unsigned.
        let terms = Terms {
            version: VERSION,
            agreement_id: "hostile-a".into(),
            request_id: "nothing".into(),
            request_hash: "00".repeat(32),
            provider: me.peer_id().to_string().into(),
            consumer: provider.to_string().into(),
            resources: request.resources,
            prices: Prices::default(),
            price_per_hour: 0,
            window: [now(), now() + 60],
            access_key: "00".repeat(32),
            hosted: false,
            network: false,
            gpus: Vec::new(),
            issued_at: now(),
            expires_at: now() + 60,
        };
        let mut offer = Signed::sign(&me, AGREEMENT_TAG, &terms)?;
        offer.body["price_per_hour"] = 5.into();
        let reply = ask(&mut swarm, provider, Message::Offer { terms: offer }).await?;
        ensure!(refused_for_signature(&reply), "a tampered offer was not declined for its signature: {reply:?}");
        let notice = Notice {
            version: VERSION,
            agreement_id: "hostile-a".into(),
            provider: me.peer_id().to_string().into(),
            consumer: provider.to_string().into(),
            seq: 1,
            at: now(),
            job: JobState::Running,
            reason: None,
            outputs: None,
            receipt: None,
        };
        let unsigned = Signed { signature: "zz".into(), ..Signed::sign(&me, NOTICE_TAG, &notice)? };
        let reply = ask(&mut swarm, provider, Message::Notice { notice: unsigned }).await?;
        ensure!(refused_for_signature(&reply), "an unsigned notice was not refused: {reply:?}");
        // A countersignature for a receipt the agent never issued changes nothing, and an agent
        // holds no checkpoint of a stranger's ledger.
        let forged = Message::Countersign {
            agreement_id: "hostile-a".into(),
            signature: "00".repeat(64),
            checkpoint: None,
        };
        let reply = ask(&mut swarm, provider, forged).await?;
        ensure!(matches!(reply, Reply::Refused { .. }), "a stray countersignature was taken: {reply:?}");
        let reply = ask(&mut swarm, provider, Message::Witness).await?;
        ensure!(reply == Reply::Checkpoint { checkpoint: None }, "a checkpoint of a stranger: {reply:?}");

        // A genuine request: the agent queues it and offers terms it really signed; a forged
        // acceptance must not make an agreement.
        let reply = ask(&mut swarm, provider, Message::Request { request: signed.clone() }).await?;
        ensure!(matches!(reply, Reply::Queued { .. }), "a valid request was not queued: {reply:?}");
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let event = tokio::time::timeout_at(until, swarm.select_next_some()).await.context("no offer came")?;
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request: Message::Offer { terms }, channel, .. },
                ..
            }) = event
            {
                ensure!(peer == provider, "an offer from {peer}");
                let opened: Terms = terms.open(AGREEMENT_TAG, &provider).context("the agent's own offer does not verify")?;
                ensure!(opened.request_id == "hostile-1" && opened.consumer == me.peer_id().to_string());
                let forged = Reply::Accepted { signature: "ab".repeat(64) };
                let _ = swarm.behaviour_mut().send_response(channel, forged);
                break;
            }
        }
        // Let the answer reach the agent.
        let settle = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(_event) = tokio::time::timeout_at(settle, swarm.select_next_some()).await {}

        // An agreed job whose spec names a file of the provider's machine, not one of its own
        // files: it must fail before it runs, and the provider says why in a signed notice.
        let sneaky = JobRequest {
            request_id: "hostile-2".into(),
            issued_at: now(),
            expires_at: now() + 600,
            spec: "kind = \"native\"\ncommand = [\"/bin/cat\", \"/in/hostname\"]\ninputs = [\"/etc/hostname\"]\n\
                   [resources]\ncpu = 0.1\nmemory = \"64MiB\"\ndisk = \"16MiB\"\n[limits]\ntime = \"60s\"\n"
                .into(),
            ..request
        };
        let signed = Signed::sign(&me, REQUEST_TAG, &sneaky)?;
        let reply = ask(&mut swarm, provider, Message::Request { request: signed }).await?;
        ensure!(matches!(reply, Reply::Queued { .. }), "the request was not queued: {reply:?}");
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(until, swarm.select_next_some())
                .await
                .context("no notice that the job failed came")?;
            let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            }) = event
            else {
                continue;
            };
            match request {
                Message::Offer { terms } => {
                    let signature = negotiate::sign_detached(&me, AGREEMENT_TAG, &terms.body)?;
                    let _ = swarm.behaviour_mut().send_response(channel, Reply::Accepted { signature });
                }
                Message::Notice { notice } => {
                    let notice: Notice = notice.open(NOTICE_TAG, &provider)?;
                    let _ = swarm.behaviour_mut().send_response(channel, Reply::Done);
                    match notice.job {
                        JobState::Failed { reason } => {
                            ensure!(reason.contains("not one of the job's files"), "failed for another reason: {reason}");
                            ensure!(notice.outputs.is_none(), "a job that never ran has outputs");
                            // Let the answer go out before the swarm is dropped.
                            let settle = tokio::time::Instant::now() + Duration::from_secs(2);
                            while let Ok(_event) = tokio::time::timeout_at(settle, swarm.select_next_some()).await {}
                            break;
                        }
                        JobState::Transferring => {}
                        other => bail!("the job got to {other:?}"),
                    }
                }
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;

    let until = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("an acceptance did not verify") {
        ensure!(Instant::now() < until, "the agent did not notice the forged acceptance:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let jobs = json_of(&agent.cli(&["jobs", "--json"])?)?;
    ensure!(jobs.as_array().is_some_and(Vec::is_empty), "a job ran without an agreement: {jobs}");
    let db = rusqlite::Connection::open_with_flags(
        agent.data_dir().join("hearth.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let forged: i64 =
        db.query_row("SELECT count(*) FROM agreements WHERE document LIKE '%hostile-1%'", [], |row| {
            row.get(0)
        })?;
    ensure!(forged == 0, "{forged} agreement(s) stored from a forged acceptance");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome: Option<String> =
            db.query_row("SELECT outcome FROM agreements WHERE document LIKE '%hostile-2%'", [], |row| {
                row.get(0)
            })?;
        if outcome.as_deref() == Some("failed") {
            break;
        }
        ensure!(Instant::now() < until, "the sneaky job's agreement ended {outcome:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A raw negotiating peer with `identity`, dialling `address`.
pub(crate) fn raw_peer(identity: &Identity, address: Multiaddr) -> Result<Swarm<Behaviour>> {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone())
        .with_tokio()
        .with_tcp(Default::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)?
        .with_behaviour(|_| {
            Behaviour::new(
                [(negotiate::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.dial(address)?;
    Ok(swarm)
}

/// The ids of the reservations `agent` holds now.
fn held_ids(agent: &Agent) -> Result<Vec<String>> {
    let held = json_of(&agent.cli(&["reservations", "--json"])?)?;
    Ok(held.as_array().into_iter().flatten().filter_map(|r| r["id"].as_str().map(str::to_owned)).collect())
}

pub(crate) fn reservations_hold_only_for_their_signer_and_only_what_they_say() -> Result<()> {
    let agent = Agent::start()?;
    let (address, provider) = agent.address()?;
    let provider: PeerId = provider.parse()?;
    let address: Multiaddr = address.parse()?;
    let (me, _) = Identity::load_or_create(tempfile::tempdir()?.path())?;
    let (stranger, _) = Identity::load_or_create(tempfile::tempdir()?.path())?;
    let ask_for = |id: &str| ReserveRequest {
        version: VERSION,
        reservation_id: id.into(),
        request_id: "hostile-package".into(),
        resource: "prep".into(),
        consumer: me.peer_id().to_string().into(),
        provider: provider.to_string().into(),
        issued_at: now(),
        resources: Allocation {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            disk_bytes: 16 << 20,
            ..Allocation::default()
        },
        network: false,
        max_price_per_hour: None,
        hold_s: 600,
    };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut mine = raw_peer(&me, address.clone())?;
        let mut theirs = raw_peer(&stranger, address)?;

        // Forged, tampered and misaddressed asks hold nothing.
        let honest = Signed::sign(&me, RESERVE_TAG, &ask_for("hostile-r1"))?;
        let forged = Signed::sign(&stranger, RESERVE_TAG, &ask_for("hostile-r2"))?;
        let mut tampered = honest.clone();
        tampered.body["resources"]["cpu_millis"] = 100.into();
        for (what, request) in [("forged", forged.clone()), ("tampered", tampered)] {
            let reply = ask(&mut mine, provider, Message::Reserve { request }).await?;
            ensure!(
                refused_for_signature(&reply),
                "a {what} ask was not refused for its signature: {reply:?}"
            );
        }
        // Signed by the stranger but naming me as the consumer: refused for who sent it.
        let reply = ask(&mut theirs, provider, Message::Reserve { request: forged }).await?;
        ensure!(matches!(&reply, Reply::Refused { reason } if reason.contains("came from")), "{reply:?}");
        let huge = ReserveRequest {
            resources: Allocation { cpu_millis: 1 << 40, memory_bytes: 1 << 20, ..Allocation::default() },
            ..ask_for("hostile-r3")
        };
        let reply =
            ask(&mut mine, provider, Message::Reserve { request: Signed::sign(&me, RESERVE_TAG, &huge)? })
                .await?;
        ensure!(
            matches!(&reply, Reply::Refused { reason } if reason.contains("offers at most")),
            "{reply:?}"
        );

        // The honest ask is held, under a grant the provider signed.
        let reply = ask(&mut mine, provider, Message::Reserve { request: honest.clone() }).await?;
        let Reply::Reserved { reservation } = reply else { bail!("an honest ask was not held: {reply:?}") };
        let grant: Reservation = reservation.open(RESERVATION_TAG, &provider)?;
        ensure!(
            grant.reservation_id == "hostile-r1" && grant.consumer == me.peer_id().to_string(),
            "{grant:?}"
        );
        // Asked again (an answer lost), the same grant; the same id from the stranger is taken.
        let again = ask(&mut mine, provider, Message::Reserve { request: honest }).await?;
        ensure!(again == Reply::Reserved { reservation: reservation.clone() }, "{again:?}");

        // The stranger can neither keep nor release it, even with a release it signed itself.
        let reply = ask(&mut theirs, provider, Message::Keep { reservation_id: "hostile-r1".into() }).await?;
        ensure!(matches!(reply, Reply::Refused { .. }), "a stranger kept my reservation: {reply:?}");
        let release = |consumer: &Identity| Release {
            version: VERSION,
            reservation_id: "hostile-r1".into(),
            consumer: consumer.peer_id().to_string().into(),
            provider: provider.to_string().into(),
            at: now(),
            reason: "hostile".into(),
        };
        let theirs_signed = Signed::sign(&stranger, RELEASE_TAG, &release(&stranger))?;
        let reply = ask(&mut theirs, provider, Message::Release { release: theirs_signed }).await?;
        ensure!(reply == Reply::Done, "{reply:?}");
        let forged_mine = Signed::sign(&stranger, RELEASE_TAG, &release(&me))?;
        let reply = ask(&mut theirs, provider, Message::Release { release: forged_mine }).await?;
        ensure!(
            matches!(&reply, Reply::Refused { reason } if reason.contains("other parties")),
            "a release in my name from a stranger was not refused: {reply:?}"
        );
        ensure!(held_ids(&agent)? == ["hostile-r1"], "held: {:?}", held_ids(&agent)?);

        // A task in it asking more than it holds is refused; so is one from the stranger.
        let task = |consumer: &Identity, cpu_millis: u64| JobRequest {
            version: VERSION,
            request_id: format!("hostile-task-{cpu_millis}").into(),
            consumer: consumer.peer_id().to_string().into(),
            provider: provider.to_string().into(),
            issued_at: now(),
            expires_at: now() + 600,
            spec: "kind = \"native\"\ncommand = [\"/bin/true\"]\n".into(),
            files: BTreeMap::new(),
            resources: Allocation {
                cpu_millis,
                memory_bytes: 64 << 20,
                disk_bytes: 16 << 20,
                ..Allocation::default()
            },
            time_limit_s: 60,
            network: false,
            hosted: false,
            max_price_per_hour: None,
            reservation: Some("hostile-r1".into()),
        };
        let bigger = Signed::sign(&me, REQUEST_TAG, &task(&me, 1000))?;
        let reply = ask(&mut mine, provider, Message::Request { request: bigger }).await?;
        ensure!(
            matches!(&reply, Reply::Refused { reason } if reason.contains("more than its reservation")),
            "{reply:?}"
        );
        let strangers = Signed::sign(&stranger, REQUEST_TAG, &task(&stranger, 500))?;
        let reply = ask(&mut theirs, provider, Message::Request { request: strangers }).await?;
        ensure!(
            matches!(&reply, Reply::Refused { reason } if reason.contains("no reservation")),
            "{reply:?}"
        );

        // My own signed release frees it at once.
        let mine_signed = Signed::sign(&me, RELEASE_TAG, &release(&me))?;
        let reply = ask(&mut mine, provider, Message::Release { release: mine_signed }).await?;
        ensure!(reply == Reply::Done, "{reply:?}");
        ensure!(held_ids(&agent)?.is_empty(), "still held after my release: {:?}", held_ids(&agent)?);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
