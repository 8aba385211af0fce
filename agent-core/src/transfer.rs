//! Content-addressed transfer: blobs move between agents on the `/hearth/blob/1.0.0` stream
//! protocol, verified chunk group by chunk group against their BLAKE3 hash, and resumable.
//!
//! [`store`] keeps blobs under the data dir; [`wire`] is the protocol's messages. [`Transfers`]
//! is the cloneable handle of both sides:
//!
//! - Serving: every incoming stream is answered on its own task, at most [`MAX_SERVES`] at once
//!   (more are told `busy`). A blob is served only to a peer it was granted to ([`Transfers::grant`];
//!   a folder's grant covers its files); anything else is `not found`, the same answer as for a
//!   blob that is not here.
//! - Fetching: [`Transfers::fetch`] records the fetch in SQLite and runs it; after a restart the
//!   daemon resumes every fetch that had not ended. A fetch asks only for the chunks the store
//!   does not hold yet, checks every group on arrival and writes only verified data. A group that
//!   fails verification is asked for again (up to [`BAD_DATA_RETRIES`] times) and costs its sender
//!   a strike (one per blob); a peer with [`STRIKES_TO_REFUSE`] strikes is not fetched from for
//!   [`REFUSE_FOR`]. A lost connection is retried [`CONNECT_ATTEMPTS`] times with backoff, then
//!   the fetch fails and says what it kept. At most [`MAX_FETCHES`] blobs download at once.
//!   Progress (bytes, rate, ETA) goes to the event bus a few times a second.

pub mod store;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read as _};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bao_tree::io::sync::{DecodeResponseIter, OutboardMut, encode_ranges};
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, ChunkRanges};
use libp2p::PeerId;
use libp2p::futures::{AsyncWriteExt as _, StreamExt, TryStreamExt, stream};
use positioned_io::WriteAt;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::net::Network;
use crate::store::Store;
pub use hearth_api::transfer::{Fetch, FetchRequest, FetchState};
pub use store::{BlobHash, BlobRef, BlobStore, Format, Imported, Manifest, StoreError};
use wire::{Answer, BLOB_PROTOCOL, Request, Status};

/// Blobs downloading at once, across every fetch.
pub const MAX_FETCHES: usize = 4;
/// Incoming requests served at once.
pub const MAX_SERVES: usize = 8;
/// A stream that carries nothing for this long is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long opening a stream (and dialling) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries to reach a sender before a fetch fails; waits of 1, 2 and 4 s between them.
pub const CONNECT_ATTEMPTS: u32 = 4;
/// Times a group that failed verification is asked for again before the fetch fails.
pub const BAD_DATA_RETRIES: u32 = 2;
/// Strikes (data that failed verification) after which a peer is not fetched from.
pub const STRIKES_TO_REFUSE: u32 = 3;
/// How long such a peer is refused.
pub const REFUSE_FOR: Duration = Duration::from_secs(3600);
/// How often a running fetch reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Why a transfer request was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer id is not one.
    #[error("{0:?} is not a peer id")]
    BadPeer(String),
    /// A fetch from this agent itself.
    #[error("that is this agent's own peer id")]
    Itself,
    /// No such fetch.
    #[error("no transfer {0}")]
    NoSuchFetch(String),
    /// The fetch has already ended.
    #[error("transfer {0} has already ended")]
    Ended(String),
    /// The store failed.
    #[error(transparent)]
    Blobs(#[from] StoreError),
    /// The SQLite store failed.
    #[error(transparent)]
    Db(#[from] crate::store::StoreError),
    /// The blob protocol could not be registered.
    #[error("the blob protocol is already registered")]
    Registered,
}

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

/// The handle of the transfer service. Cheap to clone.
#[derive(Clone)]
pub struct Transfers {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: BlobStore,
    db: Store,
    network: Network,
    events: Bus,
    fetch_slots: Semaphore,
    serve_slots: Arc<Semaphore>,
    fetches: Mutex<BTreeMap<String, Running>>,
    strikes: Mutex<HashMap<PeerId, Strikes>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

struct Running {
    record: Fetch,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Strikes {
    count: u32,
    refused_until: Option<Instant>,
}

/// The service's tasks, for the daemon to stop.
#[must_use = "dropping the task handle leaves transfers running until the daemon's token fires"]
pub struct TransfersTask {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

impl Transfers {
    /// Opens the blob store, starts serving the blob protocol, and resumes the fetches that had
    /// not ended when the agent last stopped.
    pub async fn spawn(
        blobs: BlobStore,
        db: Store,
        network: Network,
        events: Bus,
        cancel: &CancellationToken,
    ) -> Result<(Self, TransfersTask), TransferError> {
        let mut incoming = network.streams().accept(BLOB_PROTOCOL).map_err(|_| TransferError::Registered)?;
        let inner = Arc::new(Inner {
            blobs,
            db,
            network,
            events,
            fetch_slots: Semaphore::new(MAX_FETCHES),
            serve_slots: Arc::new(Semaphore::new(MAX_SERVES)),
            fetches: Mutex::new(BTreeMap::new()),
            strikes: Mutex::new(HashMap::new()),
            stop: cancel.child_token(),
            tasks: TaskTracker::new(),
        });
        let server = Arc::clone(&inner);
        inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = server.stop.cancelled() => break,
                    next = incoming.next() => match next {
                        Some((peer, stream)) => {
                            let inner = Arc::clone(&server);
                            server.tasks.spawn(async move { serve(inner, peer, stream).await });
                        }
                        None => break,
                    },
                }
            }
        });
        let transfers = Self { inner: Arc::clone(&inner) };
        for text in inner.db.fetches().await? {
            let Ok(mut record) = serde_json::from_str::<Fetch>(&text) else {
                tracing::warn!("a fetch record in the store cannot be read; leaving it");
                continue;
            };
            if record.state.is_terminal() {
                lock(&inner.fetches)
                    .insert(record.id.clone(), Running { record, cancel: CancellationToken::new() });
            } else {
                tracing::info!(id = %record.id, blob = %record.blob, "resuming a fetch");
                record.state = FetchState::Queued;
                transfers.start(record);
            }
        }
        Ok((transfers, TransfersTask { inner }))
    }

    /// Imports a file or folder into the store, keeps it (tag `added-HASH`), and lets each of
    /// `peers` fetch it.
    pub async fn add(&self, path: PathBuf, peers: &[String]) -> Result<Imported, TransferError> {
        let peers = peers.iter().map(|p| parse_peer(p)).collect::<Result<Vec<_>, _>>()?;
        let blobs = self.inner.blobs.clone();
        let imported = blocking(move || {
            let imported = blobs.import(&path)?;
            blobs.tag(&format!("added-{}", imported.blob.hash), imported.blob)?;
            Ok::<_, StoreError>(imported)
        })
        .await?;
        for peer in peers {
            self.grant(peer, imported.blob).await?;
        }
        Ok(imported)
    }

    /// Keeps a finished job's outputs (the folder `outputs`) in the store under the tag
    /// `results-JOB`. The same outputs imported twice are stored once.
    pub async fn results(&self, job: &str, outputs: PathBuf) -> Result<Imported, TransferError> {
        let blobs = self.inner.blobs.clone();
        let tag = format!("results-{job}");
        Ok(blocking(move || {
            if !outputs.is_dir() {
                std::fs::create_dir_all(&outputs).map_err(|source| StoreError::Io {
                    what: "cannot create",
                    path: outputs.clone(),
                    source,
                })?;
            }
            let imported = blobs.import_folder(&outputs)?;
            blobs.tag(&tag, imported.blob)?;
            Ok::<_, StoreError>(imported)
        })
        .await?)
    }

    /// What the complete blob `blob` holds: its size and, for a folder, its files.
    pub async fn summary(&self, blob: BlobRef) -> Result<Imported, TransferError> {
        let blobs = self.inner.blobs.clone();
        Ok(blocking(move || match blob.format {
            Format::Raw => {
                let size = blobs.size(blob.hash).ok_or(StoreError::Missing(blob.hash))?;
                Ok::<_, StoreError>(Imported { blob, size, files: 1, skipped: Vec::new() })
            }
            Format::Folder => {
                let manifest = blobs.manifest(blob.hash)?;
                let (size, files) = (manifest.total_size(), manifest.files.len() as u64);
                Ok(Imported { blob, size, files, skipped: Vec::new() })
            }
        })
        .await?)
    }

    /// Writes the complete blob `blob` to `into`: a raw blob's bytes, or a folder as a tar
    /// archive of its files (regular files only, by their manifest paths, mode 0644 or 0755).
    /// Blocking: call it from a blocking task.
    pub fn write_blob(&self, blob: BlobRef, into: impl io::Write) -> Result<(), StoreError> {
        let blobs = &self.inner.blobs;
        let sending =
            |source| StoreError::Io { what: "cannot send", path: PathBuf::from(blob.hash.to_hex()), source };
        match blob.format {
            Format::Raw => {
                let (mut file, _) = blobs.open_complete(blob.hash)?;
                let mut into = into;
                io::copy(&mut file, &mut into).map_err(sending)?;
                into.flush().map_err(sending)
            }
            Format::Folder => {
                let manifest = blobs.manifest(blob.hash)?;
                let mut tar = tar::Builder::new(into);
                for file in &manifest.files {
                    let (data, _) = blobs.open_complete(file.hash)?;
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(file.size);
                    header.set_mode(if file.executable { 0o755 } else { 0o644 });
                    header.set_mtime(0);
                    tar.append_data(&mut header, &file.path, data.take(file.size)).map_err(sending)?;
                }
                tar.into_inner().map_err(sending)?.flush().map_err(sending)
            }
        }
    }

    /// Lets `peer` fetch `blob` (a folder: its manifest and every file in it).
    pub async fn grant(&self, peer: PeerId, blob: BlobRef) -> Result<(), TransferError> {
        let mut hashes = vec![blob.hash.to_hex()];
        if blob.format == Format::Folder {
            let blobs = self.inner.blobs.clone();
            let manifest = blocking(move || blobs.manifest(blob.hash)).await?;
            hashes.extend(manifest.files.iter().map(|f| f.hash.to_hex()));
        }
        self.inner.db.grant_blobs(&peer.to_string(), hashes, unix_now()).await?;
        Ok(())
    }

    /// Starts fetching; the fetch runs on and is resumed after a restart until it ends.
    pub async fn fetch(&self, request: FetchRequest) -> Result<Fetch, TransferError> {
        let peer = parse_peer(&request.peer)?;
        if peer == self.inner.network.peer_id() {
            return Err(TransferError::Itself);
        }
        let now = unix_now();
        let record = Fetch {
            id: crate::proto::random_id(6),
            peer: peer.to_string(),
            blob: request.blob,
            max_bytes: request.max_bytes,
            out: request.out,
            state: FetchState::Queued,
            bytes_total: None,
            bytes_done: 0,
            resumed_from: 0,
            bytes_received: 0,
            rate_bytes_per_s: 0,
            eta_s: None,
            bad_chunks: 0,
            error: None,
            created_at: now,
            updated_at: now,
        };
        let (blobs, blob, tag) = (self.inner.blobs.clone(), record.blob, fetch_tag(&record.id));
        blocking(move || blobs.tag(&tag, blob)).await?;
        save(&self.inner, &record).await;
        self.start(record.clone());
        Ok(record)
    }

    fn start(&self, record: Fetch) {
        let cancel = self.inner.stop.child_token();
        let id = record.id.clone();
        lock(&self.inner.fetches).insert(id.clone(), Running { record, cancel: cancel.clone() });
        let inner = Arc::clone(&self.inner);
        self.inner.tasks.spawn(async move { run_fetch(inner, id, cancel).await });
    }

    /// Every fetch this agent knows, oldest first.
    pub fn fetches(&self) -> Vec<Fetch> {
        let mut all: Vec<Fetch> = lock(&self.inner.fetches).values().map(|r| r.record.clone()).collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// One fetch.
    pub fn get(&self, id: &str) -> Result<Fetch, TransferError> {
        lock(&self.inner.fetches)
            .get(id)
            .map(|r| r.record.clone())
            .ok_or_else(|| TransferError::NoSuchFetch(id.into()))
    }

    /// Cancels a fetch that has not ended; what it downloaded is dropped.
    pub fn cancel(&self, id: &str) -> Result<(), TransferError> {
        let fetches = lock(&self.inner.fetches);
        let running = fetches.get(id).ok_or_else(|| TransferError::NoSuchFetch(id.into()))?;
        if running.record.state.is_terminal() {
            return Err(TransferError::Ended(id.into()));
        }
        running.cancel.cancel();
        Ok(())
    }
}

impl TransfersTask {
    /// Stops serving and fetching (fetches stay recorded as running and resume at the next
    /// start) and waits for the tasks.
    pub async fn shutdown(self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await.is_err() {
            tracing::warn!("transfers still running after 5 s; leaving them");
        }
    }
}

fn parse_peer(text: &str) -> Result<PeerId, TransferError> {
    text.parse().map_err(|_| TransferError::BadPeer(text.to_owned()))
}

fn fetch_tag(id: &str) -> String {
    format!("fetch-{id}")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(E::from(StoreError::Io {
            what: "blocking task failed for",
            path: PathBuf::new(),
            source: io::Error::other(e),
        }))
    })
}

async fn save(inner: &Inner, record: &Fetch) {
    let text = serde_json::to_string(record).unwrap_or_default();
    if let Err(error) = inner.db.put_fetch(&record.id, text, record.created_at).await {
        tracing::error!(%error, id = %record.id, "cannot record a fetch");
    }
}

/// Changes a fetch's record in memory and on the bus; `persist` also writes it to SQLite.
async fn update(inner: &Inner, id: &str, persist: bool, change: impl FnOnce(&mut Fetch)) {
    let record = {
        let mut fetches = lock(&inner.fetches);
        let Some(running) = fetches.get_mut(id) else { return };
        change(&mut running.record);
        running.record.updated_at = unix_now();
        running.record.clone()
    };
    inner.events.publish(Event::TransferChanged { transfer: Box::new(record.clone()) });
    if persist {
        save(inner, &record).await;
    }
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

async fn run_fetch(inner: Arc<Inner>, id: String, cancel: CancellationToken) {
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

/// Answers one incoming stream.
async fn serve(inner: Arc<Inner>, peer: PeerId, stream: libp2p::Stream) {
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
struct Idle<S> {
    inner: S,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }

    fn into_inner(self) -> S {
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
