//! A running job's output, read by its consumer over the negotiation protocol (`logs`).
//!
//! A read that asks to `wait` and finds nothing new is held, up to [`LOG_WAIT`], until the job's
//! log grows or the job ends, both of which the supervisor publishes on the event bus: a
//! consumer following a job asks again only when there is something to send. At most
//! [`MAX_HELD`] reads are held at once; more are answered at once, as without `wait`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use libp2p::PeerId;
use tokio::sync::broadcast::error::RecvError;

use super::{LOG_CHUNK, refused};
use crate::events::Event;
use crate::jobs::Stream;
use crate::jobs::supervisor::read_log;
use crate::market::Inner;
use crate::net::negotiate::{LOG_WAIT, Reply};

/// The most reads held at once, from every consumer together.
const MAX_HELD: usize = 256;

/// Reads held now.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// One held read, counted while it lives.
struct Held;

impl Held {
    fn take() -> Option<Self> {
        HELD.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_HELD).then_some(n + 1))
            .ok()
            .map(|_| Self)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a consumer's `logs` for the job of `agreement_id`; with `wait`, holds an answer that
/// would be empty until there is more or the job ended (at most [`LOG_WAIT`]).
pub(in crate::market) async fn on_logs(
    inner: &Arc<Inner>,
    peer: PeerId,
    agreement_id: &str,
    stream: Stream,
    offset: u64,
    wait: bool,
) -> Reply {
    let held = if wait { Held::take() } else { None };
    // Subscribed before the first read: a change after it wakes the wait below.
    let mut events = held.as_ref().map(|_| inner.parts.events.subscribe());
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    // Set once the supervisor said the job ended: its log is complete then, even before the
    // agreement is marked ended (after the receipt and the notice).
    let mut job_ended = false;
    loop {
        let found = inner
            .provider()
            .agreements
            .get(agreement_id)
            .filter(|running| running.consumer == peer)
            .map(|running| (running.job.clone(), running.ended));
        let Some((job, ended)) = found else {
            return refused(format!("no agreement {agreement_id} with you here"));
        };
        let job_id = job.as_ref().map(|(id, _)| id.clone());
        if !job_ended && let Some(job_id) = &job_id {
            job_ended = inner.parts.jobs.get(job_id).await.is_ok_and(|job| job.state.is_terminal());
        }
        let reply = read(job.map(|(_, dir)| dir), stream, offset, ended || job_ended).await;
        let Some(events) = events.as_mut() else { return reply };
        if matches!(&reply, Reply::Logs { text, finished, .. } if !text.is_empty() || *finished) {
            return reply;
        }
        // Nothing yet: wait for the job's log to grow, for the job to change (or to start, when
        // it has no job yet), or for the deadline.
        let woken = loop {
            let event = tokio::select! {
                () = inner.stop.cancelled() => break false,
                () = tokio::time::sleep_until(deadline) => break false,
                event = events.recv() => event,
            };
            match event {
                Ok(Event::JobLog { id, stream: grown, .. })
                    if job_id.as_deref() == Some(id.as_str()) && grown == stream =>
                {
                    break true;
                }
                Ok(Event::JobChanged { job })
                    if job_id.is_none() || job_id.as_deref() == Some(job.id.as_str()) =>
                {
                    job_ended |= job.state.is_terminal();
                    break true;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => break true,
                Err(RecvError::Closed) => break false,
            }
        };
        if !woken {
            return reply;
        }
    }
}

/// Reads one chunk of the log in `job_dir` (none while the job has not started).
async fn read(job_dir: Option<std::path::PathBuf>, stream: Stream, offset: u64, ended: bool) -> Reply {
    let Some(job_dir) = job_dir else {
        return Reply::Logs { text: String::new(), next_offset: offset, finished: ended };
    };
    // Ended is read before the log, so a read after the end is complete.
    let mut bytes =
        tokio::task::spawn_blocking(move || read_log(&job_dir, stream, offset).unwrap_or_default())
            .await
            .unwrap_or_default();
    let whole = bytes.len() <= LOG_CHUNK;
    bytes.truncate(LOG_CHUNK);
    // A character cut at the end of the chunk comes whole in the next one.
    if let Err(error) = std::str::from_utf8(&bytes)
        && error.error_len().is_none()
        && !whole
    {
        bytes.truncate(error.valid_up_to());
    }
    Reply::Logs {
        next_offset: offset.saturating_add(bytes.len() as u64),
        text: String::from_utf8_lossy(&bytes).into_owned(),
        finished: ended && whole,
    }
}
