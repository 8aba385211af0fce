//! The fetching side: one task per fetch, each blob asked for only in the chunks the store lacks,
//! every chunk group verified on arrival, strikes for a peer that sends bad data, and progress on
//! the event bus.

use std::collections::HashMap;
use std::io::BufReader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bao_tree::io::sync::{DecodeResponseIter, OutboardMut};
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, ChunkRanges};
use libp2p::PeerId;
use libp2p::futures::{TryStreamExt, stream};
use positioned_io::WriteAt;
use tokio::io::AsyncWriteExt as _;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use super::serve::Idle;
use super::store::{BlobHash, BlobRef, BlobStore, Format, StoreError};
use super::wire::{Answer, BLOB_PROTOCOL, Request, Status};
use super::{
    BAD_DATA_RETRIES, CONNECT_ATTEMPTS, Inner, MAX_FETCHES, OPEN_TIMEOUT, PROGRESS_INTERVAL, REFUSE_FOR,
    STRIKES_TO_REFUSE, Strikes, blocking, fetch_tag, lock, parse_peer, store, update, wire,
};
use hearth_api::transfer::{Fetch, FetchState};

/// Why one attempt at a blob ended.
enum Attempt {
    /// Worth trying again after a wait (no connection, stream lost, sender busy).
    Retry(String),
    /// Data that failed verification, at this byte offset.
    BadData(u64),
    /// No point in trying again.
    Fatal(String),
    /// The fetch was cancelled or the agent is stopping.
    Stopped,
}

/// Verified bytes per blob of one fetch, and bytes received.
#[derive(Default)]
struct Progress {
    done: Mutex<HashMap<BlobHash, u64>>,
    received: AtomicU64,
    bad_chunks: AtomicU64,
    total: Mutex<Option<u64>>,
    resumed_from: AtomicU64,
}

impl Progress {
    fn set(&self, hash: BlobHash, bytes: u64) {
        lock(&self.done).insert(hash, bytes);
    }

    fn add(&self, hash: BlobHash, bytes: u64) {
        *lock(&self.done).entry(hash).or_default() += bytes;
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    fn done(&self) -> u64 {
        lock(&self.done).values().sum()
    }
}

pub(super) async fn run_fetch(inner: Arc<Inner>, id: String, cancel: CancellationToken) {
    let Some(record) = lock(&inner.fetches).get(&id).map(|r| r.record.clone()) else { return };
    update(&inner, &id, true, |r| {
        r.state = FetchState::Running;
        r.error = None;
        r.bytes_received = 0;
        r.bad_chunks = 0;
    })
    .await;
    let progress = Arc::new(Progress::default());
    let work = fetch_content(&inner, &record, &progress, &cancel);
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut rate = Rate::default();
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            _ = ticker.tick() => {
                let (done, total) = (progress.done(), *lock(&progress.total));
                let per_s = rate.sample(progress.received.load(Ordering::Relaxed));
                update(&inner, &id, false, |r| report(r, &progress, done, total, per_s)).await;
            }
        }
    };
    let (done, total) = (progress.done(), *lock(&progress.total));
    let outcome = match outcome {
        Ok(()) => match &record.out {
            Some(out) => {
                let (blobs, blob, out) = (inner.blobs.clone(), record.blob, out.clone());
                blocking(move || blobs.export(blob, &out)).await.map_err(|e| Attempt::Fatal(e.to_string()))
            }
            None => Ok(()),
        },
        Err(e) => Err(e),
    };
    let state = match outcome {
        Ok(()) => (FetchState::Finished, None),
        Err(Attempt::Stopped) if !cancel.is_cancelled() || inner.stop.is_cancelled() => {
            // The agent is stopping: the fetch stays `running` in the store and resumes at the next start.
            return;
        }
        Err(Attempt::Stopped) => {
            let (blobs, blob, tag) = (inner.blobs.clone(), record.blob, fetch_tag(&id));
            let _ = blocking(move || {
                blobs.untag(&tag)?;
                drop_partials(&blobs, blob);
                Ok::<_, StoreError>(())
            })
            .await;
            (FetchState::Cancelled, None)
        }
        Err(Attempt::Fatal(why) | Attempt::Retry(why)) => (FetchState::Failed, Some(why)),
        Err(Attempt::BadData(at)) => {
            (FetchState::Failed, Some(format!("data failed verification at byte {at}")))
        }
    };
    tracing::info!(%id, blob = %record.blob, state = ?state.0, error = state.1.as_deref().unwrap_or(""), "fetch ended");
    update(&inner, &id, true, |r| {
        report(r, &progress, done, total, 0);
        r.state = state.0;
        r.error = state.1;
        r.eta_s = None;
    })
    .await;
}

fn report(record: &mut Fetch, progress: &Progress, done: u64, total: Option<u64>, per_s: u64) {
    record.bytes_done = done;
    record.bytes_total = total;
    record.bytes_received = progress.received.load(Ordering::Relaxed);
    record.resumed_from = progress.resumed_from.load(Ordering::Relaxed);
    record.bad_chunks = progress.bad_chunks.load(Ordering::Relaxed);
    record.rate_bytes_per_s = per_s;
    record.eta_s = match (total, per_s) {
        (Some(total), per_s) if per_s > 0 => Some(total.saturating_sub(done) / per_s),
        _ => None,
    };
}

/// A rate over the last few seconds.
#[derive(Default)]
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn sample(&mut self, bytes: u64) -> u64 {
        let now = Instant::now();
        self.samples.push_back((now, bytes));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > Duration::from_secs(3) {
            self.samples.pop_front();
        }
        let (start, first) = self.samples[0];
        let secs = now.duration_since(start).as_secs_f64();
        if secs < 0.1 { 0 } else { ((bytes - first) as f64 / secs) as u64 }
    }
}

/// Removes the downloads a cancelled fetch left (a folder's files too, where its manifest is here).
fn drop_partials(blobs: &BlobStore, blob: BlobRef) {
    if blob.format == Format::Folder
        && let Ok(manifest) = blobs.manifest(blob.hash)
    {
        for file in &manifest.files {
            blobs.remove_partial(file.hash);
        }
    }
    blobs.remove_partial(blob.hash);
}

/// The size a blob must have.
#[derive(Clone, Copy)]
enum SizeRule {
    AtMost(Option<u64>),
    Exactly(u64),
}

async fn fetch_content(
    inner: &Arc<Inner>,
    record: &Fetch,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), Attempt> {
    let peer = parse_peer(&record.peer).map_err(|e| Attempt::Fatal(e.to_string()))?;
    let hash = record.blob.hash;
    match record.blob.format {
        Format::Raw => {
            fetch_blob(inner, peer, hash, SizeRule::AtMost(record.max_bytes), progress, cancel).await?;
        }
        Format::Folder => {
            let cap =
                record.max_bytes.map_or(store::MAX_MANIFEST_BYTES, |m| m.min(store::MAX_MANIFEST_BYTES));
            let manifest_progress = Arc::new(Progress::default());
            fetch_blob(inner, peer, hash, SizeRule::AtMost(Some(cap)), &manifest_progress, cancel).await?;
            let blobs = inner.blobs.clone();
            let manifest = blocking(move || blobs.manifest(hash))
                .await
                .map_err(|e| Attempt::Fatal(format!("folder {hash}: {e}")))?;
            let total = manifest.total_size();
            if let Some(max) = record.max_bytes.filter(|max| total > *max) {
                return Err(Attempt::Fatal(format!(
                    "the folder holds {total} bytes, more than the {max} allowed"
                )));
            }
            *lock(&progress.total) = Some(total);
            let mut files: Vec<_> = manifest.files.iter().map(|f| (f.hash, f.size)).collect();
            files.sort();
            files.dedup();
            stream::iter(files.into_iter().map(Ok))
                .try_for_each_concurrent(MAX_FETCHES, |(hash, size)| {
                    fetch_blob(inner, peer, hash, SizeRule::Exactly(size), progress, cancel)
                })
                .await?;
        }
    }
    Ok(())
}

/// Downloads one blob into the store, resuming from what the store holds.
async fn fetch_blob(
    inner: &Arc<Inner>,
    peer: PeerId,
    hash: BlobHash,
    rule: SizeRule,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), Attempt> {
    if let Some(size) = inner.blobs.size(hash) {
        // Already here (cached by hash): nothing crosses the network.
        progress.set(hash, size);
        progress.resumed_from.fetch_add(size, Ordering::Relaxed);
        if let SizeRule::AtMost(_) = rule {
            lock(&progress.total).get_or_insert(size);
        }
        return Ok(());
    }
    let _slot = tokio::select! {
        () = cancel.cancelled() => return Err(Attempt::Stopped),
        slot = inner.fetch_slots.acquire() => slot.map_err(|_| Attempt::Stopped)?,
    };
    let (mut failures, mut bad) = (0, 0);
    let mut first = true;
    loop {
        if let Some(until) = refused_until(inner, peer) {
            let minutes = until.saturating_duration_since(Instant::now()).as_secs().div_ceil(60);
            return Err(Attempt::Fatal(format!(
                "peer {peer} sent data that failed verification {STRIKES_TO_REFUSE} times; not fetching from it for another {minutes} min"
            )));
        }
        let attempt = tokio::select! {
            () = cancel.cancelled() => Err(Attempt::Stopped),
            result = attempt(inner, peer, hash, rule, progress, cancel, first) => result,
        };
        first = false;
        match attempt {
            Ok(()) => return Ok(()),
            Err(Attempt::BadData(at)) => {
                bad += 1;
                progress.bad_chunks.fetch_add(1, Ordering::Relaxed);
                // One strike per blob: asking again for the same bad group is not the peer's second offence.
                let strikes =
                    if bad == 1 { strike(inner, peer, hash, at) } else { current_strikes(inner, peer) };
                if bad > BAD_DATA_RETRIES {
                    return Err(Attempt::Fatal(format!(
                        "peer {peer} sent data for blob {hash} that does not match its hash (the chunk at byte {at}), {bad} times; \
                         no unverified byte was kept (strike {strikes} of {STRIKES_TO_REFUSE} against that peer)"
                    )));
                }
            }
            Err(Attempt::Retry(why)) => {
                failures += 1;
                if failures >= CONNECT_ATTEMPTS {
                    let had = lock(&progress.done).get(&hash).copied().unwrap_or(0);
                    return Err(Attempt::Fatal(format!(
                        "cannot get blob {hash} from peer {peer} after {failures} tries: {why}; \
                         {had} verified bytes are kept, and fetching it again resumes from them"
                    )));
                }
                let wait = Duration::from_secs(1 << (failures - 1));
                tracing::info!(%peer, %hash, %why, ?wait, "fetch interrupted; trying again");
                tokio::select! {
                    () = cancel.cancelled() => return Err(Attempt::Stopped),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(other) => return Err(other),
        }
    }
}

fn refused_until(inner: &Inner, peer: PeerId) -> Option<Instant> {
    let strikes = lock(&inner.strikes);
    strikes.get(&peer).and_then(|s| s.refused_until).filter(|until| *until > Instant::now())
}

/// Counts a strike against `peer` and returns its strikes; at [`STRIKES_TO_REFUSE`] it is
/// refused for [`REFUSE_FOR`].
fn strike(inner: &Inner, peer: PeerId, hash: BlobHash, at: u64) -> u32 {
    let mut strikes = lock(&inner.strikes);
    let entry = strikes.entry(peer).or_default();
    if entry.refused_until.is_some_and(|until| until <= Instant::now()) {
        *entry = Strikes::default();
    }
    entry.count += 1;
    tracing::warn!(%peer, %hash, at, strikes = entry.count, "a peer sent data that does not match its hash");
    if entry.count >= STRIKES_TO_REFUSE && entry.refused_until.is_none() {
        entry.refused_until = Some(Instant::now() + REFUSE_FOR);
    }
    entry.count
}

fn current_strikes(inner: &Inner, peer: PeerId) -> u32 {
    lock(&inner.strikes).get(&peer).map_or(0, |s| s.count)
}

async fn attempt(
    inner: &Arc<Inner>,
    peer: PeerId,
    hash: BlobHash,
    rule: SizeRule,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
    first: bool,
) -> Result<(), Attempt> {
    let blobs = inner.blobs.clone();
    let partial = blocking(move || blobs.partial(hash)).await.map_err(|e| Attempt::Fatal(e.to_string()))?;
    let (ranges, known_size) = match &partial {
        Some(p) => (ChunkRanges::all() - p.valid.clone(), Some(p.size)),
        None => (ChunkRanges::all(), None),
    };
    let had = partial.as_ref().map_or(0, |p| p.valid_bytes());
    progress.set(hash, had);
    if first {
        progress.resumed_from.fetch_add(had, Ordering::Relaxed);
    }
    if let Some(p) = partial.as_ref().filter(|p| p.valid_bytes() == p.size) {
        // Every group arrived before a crash stopped the download from finishing.
        let (blobs, size) = (inner.blobs.clone(), p.size);
        return blocking(move || blobs.finish_partial(hash, size))
            .await
            .map_err(|e| Attempt::Fatal(e.to_string()));
    }

    let mut control = inner.network.streams();
    let stream = match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, BLOB_PROTOCOL)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(Attempt::Retry(format!("cannot open a stream: {e}"))),
        Err(_) => return Err(Attempt::Retry(format!("no stream within {OPEN_TIMEOUT:?}"))),
    };
    let mut stream = Idle::new(stream.compat());
    let lost = |e: wire::WireError| Attempt::Retry(format!("the stream failed: {e}"));
    Request { hash, ranges: ranges.clone() }.write(&mut stream).await.map_err(lost)?;
    // Nothing more is sent: the sender may read to the end of its side.
    stream.shutdown().await.map_err(|e| lost(e.into()))?;
    let size = match Answer::read(&mut stream).await.map_err(lost)? {
        Answer::Ok { size } => size,
        Answer::Refused { status: Status::Busy, reason } => {
            return Err(Attempt::Retry(format!("the peer is busy: {reason}")));
        }
        Answer::Refused { reason, .. } => {
            return Err(Attempt::Fatal(format!("peer {peer} does not offer blob {hash}: {reason}")));
        }
    };
    match rule {
        SizeRule::AtMost(Some(max)) if size > max => {
            return Err(Attempt::Fatal(format!("blob {hash} is {size} bytes, more than the {max} allowed")));
        }
        SizeRule::Exactly(expected) if size != expected => {
            return Err(Attempt::Fatal(format!(
                "peer {peer} says blob {hash} is {size} bytes; its folder says {expected}"
            )));
        }
        SizeRule::AtMost(_) => {
            lock(&progress.total).get_or_insert(size);
        }
        SizeRule::Exactly(_) => {}
    }
    if known_size.is_some_and(|kept| kept != size) {
        // What was kept cannot belong to a blob of another size; start again.
        inner.blobs.remove_partial(hash);
        return Err(Attempt::Retry(format!("peer {peer} now says blob {hash} is {size} bytes")));
    }
    check_space(&inner.blobs, size.saturating_sub(had)).map_err(Attempt::Fatal)?;
    let blobs = inner.blobs.clone();
    let (mut data, mut outboard) =
        blocking(move || blobs.begin_partial(hash, size)).await.map_err(|e| Attempt::Fatal(e.to_string()))?;

    let reader = SyncIoBridge::new(stream);
    let progress_in = Arc::clone(progress);
    let cancel_in = cancel.clone();
    let decoded = tokio::task::spawn_blocking(move || {
        let tree = BaoTree::new(size, store::BLOCK_SIZE);
        let reader = BufReader::with_capacity(256 * 1024, reader);
        for item in DecodeResponseIter::new(crate::proto::to_blake3(hash), tree, reader, &ranges) {
            if cancel_in.is_cancelled() {
                return Err(Attempt::Stopped);
            }
            match item {
                Ok(BaoContentItem::Parent(parent)) => {
                    outboard
                        .save(parent.node, &parent.pair)
                        .map_err(|e| Attempt::Fatal(format!("cannot write: {e}")))?;
                }
                Ok(BaoContentItem::Leaf(leaf)) => {
                    data.write_all_at(leaf.offset, &leaf.data)
                        .map_err(|e| Attempt::Fatal(format!("cannot write: {e}")))?;
                    progress_in.add(hash, leaf.data.len() as u64);
                }
                Err(DecodeError::LeafHashMismatch(chunk)) => return Err(Attempt::BadData(chunk.to_bytes())),
                Err(DecodeError::ParentHashMismatch(node)) => {
                    return Err(Attempt::BadData(node.mid().to_bytes()));
                }
                Err(DecodeError::LeafNotFound(_) | DecodeError::ParentNotFound(_)) => {
                    return Err(Attempt::Retry("the stream ended before the data did".into()));
                }
                Err(DecodeError::Io(e)) => return Err(Attempt::Retry(format!("the stream failed: {e}"))),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Attempt::Fatal(format!("the download task failed: {e}")))?;
    decoded?;
    let blobs = inner.blobs.clone();
    blocking(move || blobs.finish_partial(hash, size)).await.map_err(|e| Attempt::Fatal(e.to_string()))?;
    progress.set(hash, size);
    Ok(())
}

/// Refuses a download the disk cannot hold, before it starts.
fn check_space(blobs: &BlobStore, needed: u64) -> Result<(), String> {
    match nix::sys::statvfs::statvfs(blobs.root()) {
        Ok(stat) => {
            let free = stat.blocks_available().saturating_mul(stat.fragment_size());
            if needed > free {
                return Err(format!(
                    "{needed} more bytes are needed, but only {free} are free on the data dir's disk"
                ));
            }
            Ok(())
        }
        Err(_) => Ok(()),
    }
}
