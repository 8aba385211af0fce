//! The serving side: one task per incoming stream, answering only for blobs granted to the peer
//! that asks, and closing a stream that stays idle.
//!
//! Every answer, a refusal included, ends with a clean close: the write side is closed (a FIN
//! after the last byte) and the task then waits up to [`LINGER`] for the asker to end its side.
//! A stream dropped with its write side open is reset instead, which is how the sender says that
//! an answer broke off part-way; a reset after a whole answer made clients take it for a failure
//! (issue 23).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bao_tree::io::sync::encode_ranges;
use libp2p::PeerId;
use libp2p::futures::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::io::SyncIoBridge;

use super::wire::{Answer, MAX_REQUEST_BYTES, Request, Status};
use super::{IDLE_TIMEOUT, Inner, MAX_SERVES, blocking, wire};

/// How long a sender waits, after its answer, for the asker to end its side of the stream.
const LINGER: Duration = Duration::from_secs(5);

type Served = Idle<Compat<libp2p::Stream>>;

/// Answers one incoming stream.
pub(super) async fn serve(inner: Arc<Inner>, peer: PeerId, stream: libp2p::Stream) {
    match answer(&inner, peer, Idle::new(stream.compat())).await {
        Ok(stream) => {
            let stop = inner.stop.clone();
            if let Err(error) = finish(stream.into_inner().into_inner(), stop).await {
                tracing::debug!(%peer, %error, "a blob answer could not be closed");
            }
        }
        // The stream is dropped with its write side open: a reset, as the answer is incomplete.
        Err(error) => tracing::debug!(%peer, %error, "a blob request ended early"),
    }
}

/// Reads the request and writes the whole answer; returns the stream for [`finish`].
async fn answer(inner: &Inner, peer: PeerId, mut stream: Served) -> Result<Served, wire::WireError> {
    let request = match Request::read(&mut stream).await {
        Ok(request) => request,
        Err(e) => {
            let answer = Answer::Refused { status: Status::BadRequest, reason: e.to_string() };
            answer.write(&mut stream).await?;
            return Ok(stream);
        }
    };
    let Ok(_slot) = Arc::clone(&inner.serve_slots).try_acquire_owned() else {
        let answer =
            Answer::Refused { status: Status::Busy, reason: format!("{MAX_SERVES} transfers are running") };
        answer.write(&mut stream).await?;
        return Ok(stream);
    };
    let hash = request.hash;
    let granted = inner.db.blob_granted(&peer.to_string(), &hash.to_hex()).await.unwrap_or(false);
    let blobs = inner.blobs.clone();
    let opened = if granted { blocking(move || blobs.open_complete(hash)).await.ok() } else { None };
    let Some((data, outboard)) = opened else {
        let answer =
            Answer::Refused { status: Status::NotFound, reason: format!("no blob {hash} here for {peer}") };
        answer.write(&mut stream).await?;
        return Ok(stream);
    };
    Answer::Ok { size: outboard.tree.size() }.write(&mut stream).await?;
    let writer = SyncIoBridge::new(stream);
    let ranges = request.ranges;
    let sent = tokio::task::spawn_blocking(move || {
        let mut writer = io::BufWriter::with_capacity(256 * 1024, writer);
        let result = encode_ranges(&data, &outboard, &ranges, &mut writer).map_err(io::Error::from);
        result.and_then(|()| io::Write::flush(&mut writer))?;
        writer.into_inner().map_err(|e| e.into_error())
    })
    .await
    .map_err(io::Error::other)??;
    Ok(sent.into_inner())
}

/// Ends an answer cleanly: closes the write side (a FIN after the last byte, once every byte
/// before it is out), then reads what the asker still sends, discarding it, until it ends its
/// side, [`LINGER`] passes or the agent stops. Dropping the read side early would make QUIC tell
/// the asker to stop sending, which some clients report as a reset.
async fn finish(mut stream: libp2p::Stream, stop: tokio_util::sync::CancellationToken) -> io::Result<()> {
    stream.close().await?;
    let drain = async {
        let mut rest = [0; 1024];
        let mut left = u64::from(MAX_REQUEST_BYTES);
        while left > 0 {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = tokio::time::sleep(LINGER) => {}
        () = stop.cancelled() => {}
    }
    Ok(())
}

/// A reader that fails with `TimedOut` when nothing arrives for [`IDLE_TIMEOUT`], so a sender
/// that vanished without closing its connection ends a fetch instead of hanging it.
pub(super) struct Idle<S> {
    inner: S,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    pub(super) fn new(inner: S) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }

    pub(super) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.deadline.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing arrived for {} s", IDLE_TIMEOUT.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Idle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
