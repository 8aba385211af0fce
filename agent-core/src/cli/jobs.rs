//! Job commands that go through the daemon: `hearth run JOB.toml` (without `--local`), `hearth jobs`
//! and `hearth job logs|cancel|pause|resume ID`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hearth::api::LogChunk;
use hearth::api::client::{Client, ClientError};
use hearth::jobs::{JobAction, JobRecord, JobState, Stream};

use super::output;

/// How often `-f` asks for more output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

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
pub(super) async fn run(client: &Client, spec: &Path) -> anyhow::Result<ExitCode> {
    let job = client.submit(spec).await?;
    eprintln!("hearth: job {} accepted", job.id);
    let job = match follow(client, &job.id, &[Stream::Stdout, Stream::Stderr], true).await {
        Err(error) if error.is::<output::StdoutClosed>() => loop {
            let job = client.job(&job.id).await?;
            if job.state.is_terminal() {
                break job;
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        },
        other => other?,
    };
    Ok(exit_code(&job.state))
}

/// Prints the job's logs from the start; with `follow`, keeps printing until the job ends.
pub(super) async fn follow(
    client: &Client,
    id: &str,
    streams: &[Stream],
    follow: bool,
) -> anyhow::Result<JobRecord> {
    print_logs(streams, follow, |stream, offset| client.log(id, stream, offset)).await?;
    Ok(client.job(id).await?)
}

/// Prints `streams` from the start, each chunk as `read` gives it (a job's own log, or a remote
/// job's from its provider); with `follow`, until every stream says it is finished.
pub(super) async fn print_logs<F, R>(streams: &[Stream], follow: bool, read: F) -> anyhow::Result<()>
where
    F: Fn(Stream, u64) -> R,
    R: Future<Output = Result<LogChunk, ClientError>>,
{
    let mut offsets = vec![0u64; streams.len()];
    loop {
        let mut finished = true;
        for (stream, offset) in streams.iter().zip(offsets.iter_mut()) {
            let chunk = read(*stream, *offset).await?;
            *offset = chunk.next_offset;
            finished &= chunk.finished;
            match stream {
                // A reader that went away ends the printing (`StdoutClosed`); the job goes on.
                Stream::Stdout => output::out(&chunk.text)?,
                // Where stderr goes is the terminal's business; losing it stops nothing.
                Stream::Stderr => {
                    let _ = std::io::stderr().lock().write_all(chunk.text.as_bytes());
                }
            }
        }
        if finished || !follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// `hearth job cancel|pause|resume ID`.
pub(super) async fn act(client: &Client, id: &str, action: JobAction, json: bool) -> anyhow::Result<()> {
    let job = client.act(id, action).await?;
    output::print(&job, json, output::job)
}
