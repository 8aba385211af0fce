//! Job commands that go through the daemon: `hearth run JOB.toml` (without `--local`), `hearth jobs`
//! and `hearth job logs|cancel|pause|resume ID`.
//!
//! Following a job (`hearth run`, `hearth job logs -f`) waits on the daemon's events (`job_log`,
//! `job_changed`), never on a timer.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use hearth_api::jobs::{JobAction, JobRecord, JobState, LogChunk, Stream};
use hearth_api::{Client, ClientError, Event};

use super::output;
use super::terminal::Terminal;

/// Exit code when the job hit its time limit, as `timeout(1)` has it.
const TIMED_OUT: u8 = 124;
/// Exit code when the sandbox stopped the job for any other reason, or could not start it.
const FAILED: u8 = 125;
/// Exit code of a cancelled job, as a shell has it after Ctrl-C.
const CANCELLED: u8 = 130;

/// The exit code `hearth run` ends with for a job that ended in `state`, after saying why on stderr
/// when the job itself did not choose it.
pub(super) fn exit_code(state: &JobState) -> ExitCode {
    let code = match state {
        JobState::Finished { exit_code } => u8::try_from(*exit_code).unwrap_or(1),
        JobState::Failed { reason } => {
            eprintln!("hearth: job failed: {reason}");
            if reason.starts_with("time limit") { TIMED_OUT } else { FAILED }
        }
        JobState::Cancelled { reason } => {
            match reason {
                Some(reason) => eprintln!("hearth: job cancelled: {reason}"),
                None => eprintln!("hearth: job cancelled"),
            }
            CANCELLED
        }
        other => {
            eprintln!("hearth: job is still {}", other.name());
            FAILED
        }
    };
    ExitCode::from(code)
}

/// Hands the spec to the daemon, follows the job's output to its end, and returns its exit code.
/// A reader that stops reading (`| head`) does not stop the job: its end is still waited for, so
/// the exit code is the job's.
pub(super) async fn run(client: &Client, spec: &Path, terminal: Terminal) -> anyhow::Result<ExitCode> {
    let job = client.submit(spec).await?;
    eprintln!("hearth: job {} accepted", job.id);
    let job = match follow(client, &job.id, &[Stream::Stdout, Stream::Stderr], true, terminal).await {
        Err(error) if error.is::<output::StdoutClosed>() => wait_for_end(client, &job.id).await?,
        other => other?,
    };
    Ok(exit_code(&job.state))
}

/// Waits, on the daemon's events, until job `id` has ended; as it stands if the daemon stops first.
async fn wait_for_end(client: &Client, id: &str) -> anyhow::Result<JobRecord> {
    // Subscribed before the read, so an end in between is announced.
    let mut events = client.events().await?;
    loop {
        let job = client.job(id).await?;
        if job.state.is_terminal() {
            events.close().await;
            return Ok(job);
        }
        let ended = |event: &Event| matches!(event, Event::JobChanged { job } if job.id == id);
        if !events.changed(ended).await? {
            return Ok(client.job(id).await?);
        }
    }
}

/// Prints the job's logs from the start; with `follow`, keeps printing until the job ends, reading
/// again each time the daemon says the job's log grew or its state changed.
pub(super) async fn follow(
    client: &Client,
    id: &str,
    streams: &[Stream],
    follow: bool,
    terminal: Terminal,
) -> anyhow::Result<JobRecord> {
    // Subscribed before the first read: whatever the job writes after it is announced.
    let mut events = if follow { Some(client.events().await?) } else { None };
    let mut offsets = vec![0u64; streams.len()];
    loop {
        let finished =
            print_new(streams, &mut offsets, terminal, |stream, offset| client.log(id, stream, offset))
                .await?;
        let Some(events) = events.as_mut().filter(|_| !finished) else { break };
        let wanted = |event: &Event| match event {
            Event::JobLog { id: of, stream, .. } => of == id && streams.contains(stream),
            Event::JobChanged { job } => job.id == id,
            _ => false,
        };
        if !events.changed(wanted).await? {
            // The daemon is stopping: what it wrote last is read above, once more.
            print_new(streams, &mut offsets, terminal, |stream, offset| client.log(id, stream, offset))
                .await?;
            break;
        }
    }
    if let Some(events) = events {
        events.close().await;
    }
    Ok(client.job(id).await?)
}

/// Prints what `streams` have past `offsets`, each chunk as `read` gives it (a job's own log, or a
/// remote job's from its provider), and moves the offsets on; whether every stream says it is
/// finished. A chunk is bounded by the log's kept limit, so memory is too.
pub(super) async fn print_new<F, R>(
    streams: &[Stream],
    offsets: &mut [u64],
    terminal: Terminal,
    read: F,
) -> anyhow::Result<bool>
where
    F: Fn(Stream, u64) -> R,
    R: Future<Output = Result<LogChunk, ClientError>>,
{
    let mut finished = true;
    for (stream, offset) in streams.iter().zip(offsets.iter_mut()) {
        let chunk = read(*stream, *offset).await?;
        *offset = chunk.next_offset;
        finished &= chunk.finished;
        let text = terminal.show(*stream, &chunk.text);
        match stream {
            // A reader that went away ends the printing (`StdoutClosed`); the job goes on.
            Stream::Stdout => output::out(&text)?,
            // Where stderr goes is the terminal's business; losing it stops nothing.
            Stream::Stderr => {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    }
    Ok(finished)
}

/// `hearth job cancel|pause|resume ID`.
pub(super) async fn act(client: &Client, id: &str, action: JobAction, json: bool) -> anyhow::Result<()> {
    let job = client.act(id, action).await?;
    output::print(&job, json, output::job)
}
