//! A remote job's output, read from its provider for the control API.
//!
//! A read that asks to `wait` is passed on as a waiting `logs` message: the provider holds it
//! until the job's log grows or the job ends (see `provider::logs`). While the job has no
//! provider yet, the wait is on this agent's own `remote_job_changed` events instead. Either way
//! the answer comes within [`LOG_WAIT`] of the ask, empty if nothing came.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::broadcast::error::RecvError;

use super::job_of;
use crate::events::Event;
use crate::jobs::Stream;
use crate::market::{Inner, MarketError, RemoteJob};
use crate::net::negotiate::{LOG_WAIT, Message, Reply};

/// How soon a provider that answered a waiting read at once (an agent that does not hold reads,
/// or one holding as many as it will) is asked again: a safety interval, so that such a provider
/// costs a read a second rather than a busy loop.
const UNHELD_AGAIN: Duration = Duration::from_secs(1);

/// The job's output from its provider: the text, where the next read starts, and whether the job
/// has ended. With `wait`, an answer that would be empty waits for more, at most [`LOG_WAIT`].
pub(in crate::market) async fn logs(
    inner: &Arc<Inner>,
    id: &str,
    stream: Stream,
    offset: u64,
    wait: bool,
) -> Result<(String, u64, bool), MarketError> {
    // Subscribed before the first read: a provider agreed after it wakes the wait below.
    let mut changes = wait.then(|| inner.parts.events.subscribe());
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    loop {
        let job = job_of(inner, id)?;
        let asked = tokio::time::Instant::now();
        let answer = read(inner, &job, stream, offset, wait).await?;
        let Some(changes) = changes.as_mut() else { return Ok(answer) };
        if !answer.0.is_empty() || answer.2 || asked >= deadline {
            return Ok(answer);
        }
        let until = if job.provider.is_some() { deadline.min(asked + UNHELD_AGAIN) } else { deadline };
        loop {
            let event = tokio::select! {
                () = inner.stop.cancelled() => return Ok(answer),
                () = tokio::time::sleep_until(until) => break,
                event = changes.recv() => event,
            };
            match event {
                Ok(Event::RemoteJobChanged { job }) if job.id == id => break,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return Ok(answer),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            // One last read, so an answer at the deadline says what is there now.
            return read(inner, &job_of(inner, id)?, stream, offset, false).await;
        }
    }
}

/// One read of the job's log at its provider (none while it has none).
async fn read(
    inner: &Arc<Inner>,
    job: &RemoteJob,
    stream: Stream,
    offset: u64,
    wait: bool,
) -> Result<(String, u64, bool), MarketError> {
    let (Some(provider), Some(agreement_id)) = (job.provider.clone(), job.agreement_id.clone()) else {
        return Ok((String::new(), offset, job.state.is_terminal()));
    };
    let provider: PeerId = provider.parse().map_err(|_| MarketError::Provider("bad provider id".into()))?;
    let message = Message::Logs { agreement_id, stream, offset, wait };
    match inner.parts.network.negotiate(provider, message).await {
        Ok(Reply::Logs { text, next_offset, finished }) => Ok((text, next_offset, finished)),
        Ok(Reply::Refused { reason }) if job.state.is_terminal() => {
            tracing::debug!(%reason, "the provider no longer has the job's logs");
            Ok((String::new(), offset, true))
        }
        Ok(Reply::Refused { reason }) => Err(MarketError::Provider(reason)),
        Ok(other) => Err(MarketError::Provider(format!("the provider answered {other:?}"))),
        // A provider gone after the end has nothing more to say.
        Err(_) if job.state.is_terminal() => Ok((String::new(), offset, true)),
        Err(error) => Err(MarketError::Provider(error)),
    }
}
