//! Jobs run on other agents: `hearth submit JOB.toml [--wait]`, and the parts of `hearth jobs`,
//! `hearth job logs|cancel` and `hearth results` that reach a remote job when the id is not one
//! of this agent's own jobs.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hearth_api::jobs::{JobState, Stream};
use hearth_api::market::{RemoteJob, credits};
use hearth_api::package::is_package;
use hearth_api::spec::JobSpec;
use hearth_api::{Client, Event};
use indicatif::{ProgressBar, ProgressStyle};

use super::terminal::Terminal;
use super::{jobs, output, packages};

/// Which agent runs a job.
pub(super) enum Where {
    /// This one.
    Here,
    /// Another agent, for this one.
    Remote,
}

/// Finds out whether `id` names one of this agent's jobs or one of its remote jobs.
pub(super) async fn locate(client: &Client, id: &str) -> anyhow::Result<Where> {
    match client.job(id).await {
        Ok(_) => Ok(Where::Here),
        Err(error) if error.is_not_found() => match client.remote_job(id).await {
            Ok(_) => Ok(Where::Remote),
            // Neither: say it as for this agent's own jobs.
            Err(remote) if remote.is_not_found() => Err(error.into()),
            Err(remote) => Err(remote.into()),
        },
        Err(error) => Err(error.into()),
    }
}

/// `hearth submit`: the request id alone on stdout's first line at once; with `wait`, the job's
/// states on stderr until it ends, then its exit code.
pub(super) async fn submit(client: &Client, spec: &Path, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let text =
        hearth_api::local_file::read_text(spec, hearth_api::upload::MAX_SPEC_BYTES as u64, "job spec")?;
    if is_package(&text) {
        return packages::submit(client, spec, wait, json).await;
    }
    // Checked here first, so every problem is named against the file the user wrote.
    let path = spec.to_owned();
    tokio::task::spawn_blocking(move || JobSpec::load(&path)).await??;
    let job = client.submit_remote(spec).await?;
    output::out(&format!("{}\n", job.id))?;
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let job = follow(client, &job.id).await?;
    if json {
        output::print(&job, true, remote_job)?;
    } else if let Some(charged) = job.charged {
        eprintln!("hearth: charged {} credits (receipt countersigned)", credits(charged));
    }
    Ok(jobs::exit_code(&job.state))
}

/// Follows a remote job until it ends, saying each change on stderr (with a bar on a terminal):
/// it reads the job again each time the daemon says it changed.
async fn follow(client: &Client, id: &str) -> anyhow::Result<RemoteJob> {
    // Subscribed before the first read: no change after it goes unseen.
    let mut events = client.events().await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut said = String::new();
    loop {
        let job = client.remote_job(id).await?;
        let line = describe(&job);
        if line != said {
            match &bar {
                Some(bar) => {
                    bar.println(format!("hearth: {line}"));
                    bar.set_message(line.clone());
                }
                None => eprintln!("hearth: {line}"),
            }
            said = line;
        }
        if job.state.is_terminal() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            events.close().await;
            return Ok(job);
        }
        let wanted = |event: &Event| matches!(event, Event::RemoteJobChanged { job } if job.id == id);
        if !events.changed(wanted).await? {
            anyhow::bail!(
                "the daemon stopped before job {id} ended; it is followed again when the daemon starts"
            );
        }
    }
}

/// One line about where a remote job is.
fn describe(job: &RemoteJob) -> String {
    let state = match &job.state {
        JobState::Finished { exit_code } => format!("finished (exit {exit_code})"),
        JobState::Failed { reason } => format!("failed: {reason}"),
        JobState::Cancelled { reason: Some(reason) } => format!("cancelled: {reason}"),
        other => other.name().to_owned(),
    };
    match &job.note {
        Some(note) if !job.state.is_terminal() => format!("{state}: {note}"),
        _ => state,
    }
}

/// Prints a remote job's logs from the start; with `follow`, until it ends. The daemon holds
/// each read until the provider has more or the job ended (a long poll over the negotiation
/// protocol), so following asks again only when there is something to print.
pub(super) async fn logs(
    client: &Client,
    id: &str,
    streams: &[Stream],
    follow: bool,
    terminal: Terminal,
) -> anyhow::Result<()> {
    if !follow {
        let mut offsets = vec![0u64; streams.len()];
        jobs::print_new(streams, &mut offsets, terminal, |stream, offset| {
            client.remote_log(id, stream, offset, false)
        })
        .await?;
        return Ok(());
    }
    // Each stream on its own: a quiet stdout must not hold back what stderr says.
    let one = |stream: Stream| async move {
        let mut offset = [0u64];
        loop {
            let read = |stream, offset| client.remote_log(id, stream, offset, true);
            if jobs::print_new(&[stream], &mut offset, terminal, read).await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    futures_util::future::try_join_all(streams.iter().map(|&stream| one(stream))).await?;
    Ok(())
}

/// `hearth job cancel` of a remote job.
pub(super) async fn cancel(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let job = client.cancel_remote(id).await?;
    output::print(&job, json, remote_job)
}

/// `hearth jobs`: this agent's own jobs, then the ones it asked others to run.
pub(super) async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let (local, remote) = (client.jobs().await?, client.remote_jobs().await?);
    if json {
        // One list: this agent's jobs, then the remote ones (which carry `provider`).
        let mut all = serde_json::to_value(&local)?.as_array().cloned().unwrap_or_default();
        all.extend(remote.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?);
        return output::out(&(serde_json::to_string_pretty(&all)? + "\n"));
    }
    let mut text = output::jobs(&local);
    if !remote.is_empty() {
        text.push('\n');
        text.push_str(&remote_jobs(&remote));
    }
    output::out(&text)
}

fn remote_jobs(jobs: &[RemoteJob]) -> String {
    use std::fmt::Write as _;
    let mut text = format!("{:<12}  {:<6}  {:<20}  {}\n", "REMOTE ID", "KIND", "PROVIDER", "STATE");
    for job in jobs {
        let provider = job.provider.as_deref().map_or("-".to_owned(), short);
        let _ = writeln!(text, "{:<12}  {:<6}  {:<20}  {}", job.id, job.kind, provider, describe(job));
    }
    text
}

fn remote_job(job: &RemoteJob) -> String {
    let mut text = format!("{}  {}  {}\n", job.id, job.kind, describe(job));
    if let Some(provider) = &job.provider {
        text.push_str(&format!("provider: {provider}\n"));
    }
    if let Some(price) = job.price_per_hour {
        text.push_str(&format!("price: {} credits/h\n", credits(price)));
    }
    if let Some(charged) = job.charged {
        text.push_str(&format!("charged: {} credits (receipt countersigned)\n", credits(charged)));
    }
    text
}

/// The last 8 characters of a peer id, as people tell peers apart at a glance.
fn short(peer: &str) -> String {
    let tail: String = peer.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
    format!("…{tail}")
}
