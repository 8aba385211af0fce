//! Request packages: `hearth submit PACKAGE.toml [--wait]`, `hearth request status|list`, and
//! `hearth reservations` (what this agent holds for other agents' packages).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use hearth_api::jobs::JobState;
use hearth_api::market::{HeldReservation, RemoteJob};
use hearth_api::package::{HoldState, Package, RequestState, RequestStatus};
use hearth_api::{Client, Event};
use serde::Serialize;

use super::output;

/// `hearth submit PACKAGE.toml`: checked here first (every problem named against the file),
/// then queued; the request id alone on stdout's first line. With `wait`, each change on stderr
/// until it ends (read again each time the daemon says the request changed); exit 0 only when it
/// completed.
pub(super) async fn submit(client: &Client, path: &Path, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let file = path.to_owned();
    tokio::task::spawn_blocking(move || Package::load(&file)).await??;
    let status = client.submit_package(path).await?;
    output::out(&format!("{}\n", status.id))?;
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    // Subscribed before the first read: no change after it goes unseen.
    let mut events = client.events().await?;
    let id = status.id;
    let mut said = String::new();
    let status = loop {
        let status = client.package(&id).await?;
        let line = headline(&status);
        if line != said {
            eprintln!("hearth: {line}");
            said = line;
        }
        if status.state.is_terminal() {
            break status;
        }
        let wanted = |event: &Event| matches!(event, Event::RequestChanged { request } if request.id == id);
        if !events.changed(wanted).await? {
            anyhow::bail!("the daemon stopped before request {id} ended; it goes on when the daemon starts");
        }
    };
    events.close().await;
    if json {
        output::print(&status, true, request)?;
    }
    Ok(if status.state == RequestState::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A plain job spec submitted alone is a package of one: its status in the same shape.
#[derive(Debug, Serialize)]
struct OneJob<'a> {
    id: &'a str,
    state: &'static str,
    tasks: u32,
    succeeded: u32,
    failed: u32,
    failures: Vec<String>,
    job: &'a RemoteJob,
}

/// `hearth request status ID`: a package's progress, or a single remote job's as a package of one.
pub(super) async fn status(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    match client.package(id).await {
        Ok(status) => output::print(&status, json, request),
        Err(error) if error.is_not_found() => match client.remote_job(id).await {
            Ok(job) => {
                let (succeeded, failed) = match &job.state {
                    JobState::Finished { exit_code: 0 } => (1, 0),
                    state if state.is_terminal() => (0, 1),
                    _ => (0, 0),
                };
                let failures = if failed == 1 {
                    vec![format!("task 0: {}", hearth_api::jobs::ended(&job.state))]
                } else {
                    Vec::new()
                };
                let one = OneJob {
                    id: &job.id,
                    state: job.state.name(),
                    tasks: 1,
                    succeeded,
                    failed,
                    failures,
                    job: &job,
                };
                output::print(&one, json, |one| {
                    let mut text = format!(
                        "{}  {}  tasks 1, succeeded {}, failed {}\n",
                        one.id, one.state, one.succeeded, one.failed
                    );
                    for failure in &one.failures {
                        let _ = writeln!(text, "  {failure}");
                    }
                    if let Some(provider) = &one.job.provider {
                        let _ = writeln!(text, "provider: {provider}");
                    }
                    text
                })
            }
            Err(remote) if remote.is_not_found() => {
                anyhow::bail!("no request {id} on this agent (neither a package nor a job)")
            }
            Err(remote) => Err(remote.into()),
        },
        Err(error) => Err(error.into()),
    }
}

/// `hearth request list`.
pub(super) async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let all = client.packages().await?;
    output::print(&all, json, |all| {
        let mut text = format!(
            "{:<16}  {:<11}  {:>5}  {:>4}  {:>6}  {}\n",
            "REQUEST", "STATE", "TASKS", "OK", "FAILED", "NAME"
        );
        for status in all {
            let _ = writeln!(
                text,
                "{:<16}  {:<11}  {:>5}  {:>4}  {:>6}  {}",
                status.id,
                status.state.name(),
                status.tasks,
                status.succeeded,
                status.failed,
                status.name.as_deref().unwrap_or("-")
            );
        }
        text
    })
}

/// `hearth reservations`.
pub(super) async fn reservations(client: &Client, json: bool) -> anyhow::Result<()> {
    let held = client.reservations().await?;
    output::print(&held, json, |held: &Vec<HeldReservation>| {
        if held.is_empty() {
            return "nothing is held for other agents\n".to_owned();
        }
        let mut text = format!(
            "{:<20}  {:<12}  {:<16}  {:>6}  {:>9}  {:>4}  {}\n",
            "RESERVATION", "CONSUMER", "REQUEST/RESOURCE", "CORES", "MEMORY", "GPUS", "IN USE"
        );
        for r in held {
            let _ = writeln!(
                text,
                "{:<20}  {:<12}  {:<16}  {:>6}  {:>9}  {:>4}  {}",
                r.id.chars().take(20).collect::<String>(),
                short(&r.consumer),
                format!("{}/{}", r.request_id, r.resource),
                r.cpu_millis as f64 / 1000.0,
                output::bytes(r.memory_bytes),
                r.gpus.len(),
                r.in_use
            );
        }
        text
    })
}

/// One line about where a package is.
fn headline(status: &RequestStatus) -> String {
    let held = status.resources.iter().filter(|a| a.state == HoldState::Held).count();
    let mut line = format!(
        "{}: {}/{} resources held, tasks {}: {} succeeded, {} failed",
        status.state.name(),
        held,
        status.resources.len(),
        status.tasks,
        status.succeeded,
        status.failed
    );
    if let Some(reason) = status.reason.as_deref().filter(|_| status.state.is_terminal()) {
        let _ = write!(line, " ({reason})");
    }
    line
}

/// A package's status for people.
fn request(status: &RequestStatus) -> String {
    let mut text = format!("{}  {}\n", status.id, headline(status));
    if let Some(name) = &status.name {
        let _ = writeln!(text, "name: {name}");
    }
    text.push_str("resources:\n");
    for a in &status.resources {
        let provider = a.provider.as_deref().map_or("-".to_owned(), short);
        let mut line =
            format!("  {:<16} {:<9} {:<12} tries {}", a.resource, a.state.name(), provider, a.attempts);
        if let Some(error) = &a.error {
            let _ = write!(line, "  ({error})");
        }
        let _ = writeln!(text, "{line}");
    }
    text.push_str("tasks:\n");
    for t in &status.task_list {
        let job = t.job_id.as_deref().unwrap_or("-");
        let mut line = format!("  {:>3} {:<16} {:<9} job {}", t.index, t.resource, t.state.name(), job);
        if let Some(reason) = &t.reason {
            let _ = write!(line, "  ({reason})");
        }
        let _ = writeln!(text, "{line}");
    }
    text
}

/// The last 8 characters of a peer id.
fn short(peer: &str) -> String {
    let tail: String = peer.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
    format!("…{tail}")
}
