//! A client written only against the client crate (`hearth-api`), as the desktop shell and scripts
//! will be: it finds a running agent through its data dir, reads and changes what the owner
//! controls, submits a job from its own folder, waits on the event stream, reads the job's log and
//! downloads its outputs, and stores and reads back a blob. Apart from starting the agent, nothing
//! here touches the agent's own crate or its CLI.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_api::availability::{Availability, Reason};
use hearth_api::jobs::{JobState, Stream};
use hearth_api::status::AgentStatus;
use hearth_api::{Client, ClientError, Event};
use hearth_tests::Agent;

/// How long the job in this test may take to end; far more than it needs.
const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// How long the agent may take to announce a change of its availability (it evaluates every
/// second).
const EVENT_DEADLINE: Duration = Duration::from_secs(30);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub(crate) fn a_client_of_the_client_crate_alone_does_what_the_cli_does() -> Result<()> {
    let agent = Agent::start()?;
    let client = Client::discover(&agent.data_dir())?;
    runtime()?.block_on(async {
        // What the agent is and has.
        let status = client.status().await?;
        ensure!(!status.peer_id.is_empty(), "{status:?}");
        ensure!(status.data_dir == agent.data_dir(), "{status:?}");
        ensure!(matches!(status.state, AgentStatus::Sharing | AgentStatus::Paused), "{status:?}");
        let resources = client.resources().await?;
        ensure!(resources.cpu.threads > 0 && resources.memory.total_bytes > 0, "{resources:?}");

        // The owner's controls: a pause shows in the availability (at the agent's next
        // evaluation, which the event stream announces), and resuming ends it.
        let mut events = client.events().await?;
        let pause = client.pause(Some(Duration::from_secs(600))).await?;
        ensure!(pause.until.is_some(), "{pause:?}");
        let owner_paused = |availability: &Availability| match availability {
            Availability::Paused { reasons } => {
                reasons.iter().any(|r| matches!(r, Reason::OwnerPaused { .. }))
            }
            Availability::Sharing { .. } => false,
        };
        let mut availability = client.availability().await?;
        while !owner_paused(&availability) {
            let woke = tokio::time::timeout(
                EVENT_DEADLINE,
                events.changed(|event| matches!(event, Event::AvailabilityChanged { .. })),
            )
            .await;
            ensure!(matches!(woke, Ok(Ok(true))), "no pause announced: {woke:?}; {availability:?}");
            availability = client.availability().await?;
        }
        events.close().await;
        client.resume().await?;
        let policy = client.policy().await?;
        let changed = client.set_policy("[owner]\nidle = \"7m\"\n").await?;
        ensure!(changed.policy != policy.policy, "setting the policy changed nothing");
        ensure!(changed == client.policy().await?, "the policy read back differs");

        // A job from a folder the agent never reads: its spec and files travel in the request.
        let work = tempfile::tempdir()?;
        fs::write(
            work.path().join("job.toml"),
            "kind = \"native\"\nimage = \"base\"\ninputs = [\"note.txt\"]\n\
             command = [\"/bin/sh\", \"-c\", \"cat /in/note.txt; cp /in/note.txt /out/copy.txt\"]\n\
             [resources]\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n",
        )?;
        fs::write(work.path().join("note.txt"), "sent by content\n")?;
        let mut events = client.events().await?;
        let job = client.submit(&work.path().join("job.toml")).await?;
        work.close()?;
        let ended = |event: &Event| match event {
            Event::JobChanged { job: changed } => changed.id == job.id && changed.state.is_terminal(),
            _ => false,
        };
        let mut record = client.job(&job.id).await?;
        while !record.state.is_terminal() {
            let woke = tokio::time::timeout(JOB_DEADLINE, events.changed(ended)).await;
            ensure!(matches!(woke, Ok(Ok(true))), "the event stream ended or the job never did: {woke:?}");
            record = client.job(&job.id).await?;
        }
        events.close().await;
        ensure!(record.state == JobState::Finished { exit_code: 0 }, "{record:?}\n{}", agent.log());
        let log = client.log(&job.id, Stream::Stdout, 0).await?;
        ensure!(log.text == "sent by content\n" && log.finished, "{log:?}");
        ensure!(client.jobs().await?.iter().any(|listed| listed.id == job.id), "the job is not listed");
        ensure!(client.notices(&job.id).await?.is_empty(), "notices for a job no one paused");
        let results = tempfile::tempdir()?;
        let out = results.path().join("out");
        client.results(&job.id, &out).await?;
        let copied = fs::read_to_string(out.join("copy.txt")).context("the downloaded output")?;
        ensure!(copied == "sent by content\n", "{copied:?}");

        // A blob stored and read back by its hash.
        let blob_dir = tempfile::tempdir()?;
        let file = blob_dir.path().join("blob.bin");
        let bytes = hearth_tests::pseudo_random(300_000, 7);
        fs::write(&file, &bytes)?;
        let imported = client.add_blob(&file, &[]).await?;
        ensure!(imported.size == bytes.len() as u64 && imported.files == 1, "{imported:?}");
        let back = blob_dir.path().join("back.bin");
        client.download(&imported, &back).await?;
        ensure!(fs::read(&back)? == bytes, "the blob read back differs");

        // The rest of what the owner reads.
        ensure!(client.login_link().await?.url.contains("/login?code="), "no login link");
        ensure!(client.peers().await?.is_empty(), "an agent alone has peers");
        let offers = client.offers().await?;
        ensure!(offers.iter().all(|offer| offer.peer_id == status.peer_id), "offers from no one: {offers:?}");
        ensure!(client.verify_ledger().await?.ok(), "the ledger does not verify");
        ensure!(client.earnings(None).await?.total.earned.amount == 0, "earnings from nothing");
        let missing = client.job("no-such-job").await;
        ensure!(matches!(&missing, Err(error) if error.is_not_found()), "{missing:?}");
        Ok(())
    })?;

    // A client of an agent that is not running says so, naming the data dir.
    let mut agent = agent;
    agent.terminate()?;
    let gone = runtime()?.block_on(async { Client::discover(&agent.data_dir())?.status().await });
    ensure!(matches!(gone, Err(ClientError::NoDaemon { .. })), "{gone:?}");
    Ok(())
}
