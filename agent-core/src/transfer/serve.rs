//! The serving side: one task per incoming stream, answering only for blobs granted to the peer
//! that asks, and closing a stream that stays idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bao_tree::io::sync::encode_ranges;
use libp2p::PeerId;
use libp2p::futures::AsyncWriteExt as _;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::io::SyncIoBridge;

use super::wire::{Answer, Request, Status};
use super::{IDLE_TIMEOUT, Inner, MAX_SERVES, blocking, wire};

/// Answers one incoming stream.
pub(super) async fn serve(inner: Arc<Inner>, peer: PeerId, stream: libp2p::Stream) {
    let mut stream = Idle::new(stream.compat());
    let result = async {
        let request = match Request::read(&mut stream).await {
            Ok(request) => request,
            Err(e) => {
                let answer = Answer::Refused { status: Status::BadRequest, reason: e.to_string() };
                return answer.write(&mut stream).await.map(|()| false);
            }
        };
        let Ok(_slot) = Arc::clone(&inner.serve_slots).try_acquire_owned() else {
            let answer = Answer::Refused {
                status: Status::Busy,
                reason: format!("{MAX_SERVES} transfers are running"),
            };
            return answer.write(&mut stream).await.map(|()| false);
        };
        let hash = request.hash;
        let granted = inner.db.blob_granted(&peer.to_string(), &hash.to_hex()).await.unwrap_or(false);
        let blobs = inner.blobs.clone();
        let opened = if granted { blocking(move || blobs.open_complete(hash)).await.ok() } else { None };
        let Some((data, outboard)) = opened else {
            let answer = Answer::Refused {
                status: Status::NotFound,
                reason: format!("no blob {hash} here for {peer}"),
            };
            return answer.write(&mut stream).await.map(|()| false);
        };
        Answer::Ok { size: outboard.tree.size() }.write(&mut stream).await?;
        let writer = SyncIoBridge::new(stream.into_inner());
        let ranges = request.ranges;
        let sent = tokio::task::spawn_blocking(move || {
            let mut writer = io::BufWriter::with_capacity(256 * 1024, writer);
            let result = encode_ranges(&data, &outboard, &ranges, &mut writer).map_err(io::Error::from);
            result.and_then(|()| io::Write::flush(&mut writer))?;
            writer.into_inner().map_err(|e| e.into_error())
        })
        .await
        .map_err(io::Error::other)??;
        let mut stream = sent.into_inner().into_inner();
        stream.close().await?;
        Ok::<_, wire::WireError>(true)
    }
    .await;
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "a blob request ended early");
    }
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
