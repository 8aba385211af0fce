//! The blob protocol as a client outside Hearth sees it on the wire (issue 23): a raw client
//! (TCP, noise and yamux from libp2p, multistream-select and the blob messages written by hand
//! from docs/protocol.md) asks a real agent for blobs and watches the yamux frames that come
//! back, since a yamux stream reports a reset to its reader as a plain end of stream.

use std::collections::HashSet;
use std::fs;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use hearth_tests::{Agent, json_of, pseudo_random};
use libp2p::core::muxing::StreamMuxerExt;
use libp2p::core::transport::{DialOpts, PortUse};
use libp2p::core::upgrade::OutboundConnectionUpgrade;
use libp2p::core::{Endpoint, Transport};
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, identity::Keypair, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

/// Answers asked for in a row, and in bursts after them.
const IN_A_ROW: usize = 100;
const BURSTS: usize = 4;
const BURST: usize = 12;

/// What the yamux frames from the agent said about each stream: which ended with a FIN and which
/// with a reset (RST).
#[derive(Default)]
struct Frames {
    fin: HashSet<u32>,
    rst: HashSet<u32>,
}

/// Reads yamux frame headers (12 bytes: version, type, flags, stream id, length; a data frame's
/// length bytes of body follow) from the decrypted connection as yamux reads it.
struct Sniffer<S> {
    inner: S,
    frames: Arc<Mutex<Frames>>,
    header: Vec<u8>,
    body_left: u32,
}

impl<S> Sniffer<S> {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = bytes.len().min(self.body_left as usize);
                bytes = &bytes[skip..];
                self.body_left -= skip as u32;
                continue;
            }
            let take = bytes.len().min(12 - self.header.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() == 12 {
                let h = &self.header;
                let flags = u16::from_be_bytes([h[2], h[3]]);
                let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if h[1] == 0 {
                    self.body_left = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                }
                let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
                if flags & 0x4 != 0 {
                    frames.fin.insert(stream);
                }
                if flags & 0x8 != 0 {
                    frames.rst.insert(stream);
                }
                drop(frames);
                self.header.clear();
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffer<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = read {
            this.feed(&buf[..n]);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffer<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Writes multistream-select's greeting and `protocol` (each a varint length, then the line with
/// its newline) and checks that the agent echoes both.
async fn select(io: &mut (impl AsyncRead + AsyncWrite + Unpin), protocol: &str) -> Result<()> {
    let lines = ["/multistream/1.0.0", protocol];
    let mut out = Vec::new();
    for line in lines {
        // Every line here is shorter than 128 bytes: its varint is one byte.
        out.push(line.len() as u8 + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    io.write_all(&out).await?;
    io.flush().await?;
    for line in lines {
        let mut len = [0];
        io.read_exact(&mut len).await?;
        let mut got = vec![0; len[0] as usize];
        io.read_exact(&mut got).await?;
        ensure!(
            got == format!("{line}\n").as_bytes(),
            "asked for {line}, got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    Ok(())
}

type Muxer = yamux::Muxer<Sniffer<noise::Output<tcp::tokio::TcpStream>>>;

/// Dials `address` with `key` over TCP, noise and yamux; returns a channel that opens streams
/// and what the sniffer sees. A task drives the connection, refusing the agent's own streams.
async fn connect(
    key: &Keypair,
    address: Multiaddr,
) -> Result<(mpsc::Sender<oneshot::Sender<yamux::Stream>>, Arc<Mutex<Frames>>)> {
    let mut tcp = tcp::tokio::Transport::new(tcp::Config::default());
    let mut socket = tcp.dial(address, DialOpts { role: Endpoint::Dialer, port_use: PortUse::New })?.await?;
    select(&mut socket, "/noise").await?;
    let (_, secure) = noise::Config::new(key)?.upgrade_outbound(socket, "/noise").await?;
    let frames = Arc::new(Mutex::new(Frames::default()));
    let mut secure = secure;
    select(&mut secure, "/yamux/1.0.0").await?;
    let secure = Sniffer { inner: secure, frames: Arc::clone(&frames), header: Vec::new(), body_left: 0 };
    let mut muxer: Muxer = yamux::Config::default().upgrade_outbound(secure, "/yamux/1.0.0").await?;
    let (opens, mut asks) = mpsc::channel::<oneshot::Sender<yamux::Stream>>(64);
    tokio::spawn(async move {
        let mut waiting = Vec::new();
        poll_fn(|cx| {
            loop {
                while let Poll::Ready(Some(ask)) = asks.poll_recv(cx) {
                    waiting.push(ask);
                }
                if !waiting.is_empty()
                    && let Poll::Ready(opened) = muxer.poll_outbound_unpin(cx)
                {
                    match opened {
                        Ok(stream) => {
                            let _ = waiting.remove(0).send(stream);
                        }
                        Err(_) => return Poll::Ready(()),
                    }
                    continue;
                }
                match muxer.poll_inbound_unpin(cx) {
                    Poll::Ready(Ok(refused)) => drop(refused),
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => match muxer.poll_unpin(cx) {
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    },
                }
            }
        })
        .await;
    });
    Ok((opens, frames))
}

/// What one answer turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The stream ended before any answer.
    Nothing,
    Blob,
    NotFound,
    Busy,
}

/// Asks for the whole blob `hash` on a new stream and reads the answer to its end. A client that
/// `closes_first` ends its side after the request; another keeps it open until the answer ends.
async fn ask(
    opens: &mpsc::Sender<oneshot::Sender<yamux::Stream>>,
    hash: &str,
    expected: &[u8],
    closes_first: bool,
) -> Result<Answer> {
    let (opened, stream) = oneshot::channel();
    opens.send(opened).await.context("the connection is gone")?;
    let mut stream = stream.await.context("no stream")?;
    select(&mut stream, "/hearth/blob/1.0.0").await?;
    let body = format!(r#"{{"hash":"{hash}","ranges":[[0,null]]}}"#);
    stream.write_all(&(body.len() as u32).to_be_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    if closes_first {
        stream.close().await?;
    } else {
        stream.flush().await?;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.context("reading the answer")?;
    if !closes_first {
        let _ = stream.close().await;
    }
    match answer.first() {
        None => Ok(Answer::Nothing),
        Some(0) => {
            let size = (expected.len() as u64).to_le_bytes();
            // One chunk group: no hash pairs, the encoding is the data itself.
            ensure!(answer[1..9] == size && answer[9..] == *expected, "a wrong blob: {} bytes", answer.len());
            Ok(Answer::Blob)
        }
        Some(status @ (1 | 2)) => {
            ensure!(answer.len() >= 3, "a cut reason: {answer:?}");
            let len = u16::from_be_bytes([answer[1], answer[2]]) as usize;
            ensure!(answer.len() == 3 + len, "status {status} with {} bytes after it", answer.len());
            Ok(if *status == 1 { Answer::NotFound } else { Answer::Busy })
        }
        _ => bail!("an answer of {} bytes: {answer:?}", answer.len()),
    }
}

/// Issue 23: every answer, the blob itself or a refusal, ends with the agent's FIN after its last
/// byte, never a reset; in a row or in bursts beyond what the agent serves at once, whether or not
/// the client has ended its own side first.
pub(crate) fn every_blob_answer_ends_with_a_clean_close() -> Result<()> {
    let agent = Agent::start()?;
    let (address, _) = agent.address()?;
    let key = Keypair::generate_ed25519();
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    let data = pseudo_random(10_000, 23);
    fs::write(&blob, &data)?;
    let me = key.public().to_peer_id().to_string();
    let added =
        json_of(&agent.cli(&["blob", "add", blob.to_str().context("path")?, "--share", &me, "--json"])?)?;
    let hash = added["hash"].as_str().context("hash")?.to_owned();
    let missing = "23".repeat(32);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let (opens, frames) = connect(&key, address.parse()?).await?;
        let mut answers = Vec::new();
        for i in 0..IN_A_ROW {
            let wanted = if i % 3 == 2 { &missing } else { &hash };
            let answer =
                tokio::time::timeout(Duration::from_secs(20), ask(&opens, wanted, &data, i.is_multiple_of(2))).await??;
            answers.push(answer);
        }
        for _ in 0..BURSTS {
            let burst = (0..BURST).map(|i| ask(&opens, &hash, &data, i.is_multiple_of(2)));
            let all = libp2p::futures::future::join_all(burst);
            // A stream reset before the request went out fails its write: counted below.
            answers.extend(tokio::time::timeout(Duration::from_secs(30), all).await?.into_iter().flatten());
        }
        // The last FIN read is seen by now: the reader saw its end after it.
        let frames = frames.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = |set: &HashSet<u32>| set.iter().filter(|id| *id % 2 == 1).count();
        let (resets, fins) = (ours(&frames.rst), ours(&frames.fin));
        let count = |kind: Answer| answers.iter().filter(|a| **a == kind).count();
        let summary = format!(
            "{} of {} answers read ({} blobs, {} not found, {} busy, {} empty): {resets} ended in a reset, {fins} in a FIN",
            answers.len(),
            IN_A_ROW + BURSTS * BURST,
            count(Answer::Blob),
            count(Answer::NotFound),
            count(Answer::Busy),
            count(Answer::Nothing),
        );
        let asked = IN_A_ROW + BURSTS * BURST;
        ensure!(resets == 0 && fins == asked && answers.len() == asked && count(Answer::Nothing) == 0, "{summary}");
        ensure!(count(Answer::Blob) > IN_A_ROW / 2 && count(Answer::NotFound) > 0, "{summary}");
        Ok(())
    })
}
