//! Content-addressed transfer: blobs move between agents on the `/hearth/blob/1.0.0` stream
//! protocol, verified chunk group by chunk group against their BLAKE3 hash, and resumable.
//!
//! [`store`] keeps blobs under the data dir; [`wire`] is the protocol's messages. [`Transfers`]
//! is the cloneable handle of both sides:
//!
//! - Serving: every incoming stream is answered on its own task, at most [`MAX_SERVES`] at once
//!   (more are told `busy`). A blob is served only to a peer it was granted to ([`Transfers::grant`];
//!   a folder's grant covers its files); anything else is `not found`, the same answer as for a
//!   blob that is not here. Every whole answer ends with a clean close (see [`serve`]); streams
//!   come from [`Network::accept`], which queues them while the server is busy.
//! - Fetching: [`Transfers::fetch`] records the fetch in SQLite and runs it; after a restart the
//!   daemon resumes every fetch that had not ended. A fetch asks only for the chunks the store
//!   does not hold yet, checks every group on arrival and writes only verified data. A group that
//!   fails verification is asked for again (up to [`BAD_DATA_RETRIES`] times) and costs its sender
//!   a strike (one per blob); a peer with [`STRIKES_TO_REFUSE`] strikes is not fetched from for
//!   [`REFUSE_FOR`]. A lost connection is retried [`CONNECT_ATTEMPTS`] times with backoff, then
//!   the fetch fails and says what it kept. At most [`MAX_FETCHES`] blobs download at once.
//!   Progress (bytes, rate, ETA) goes to the event bus a few times a second.

mod fetch;
mod serve;
pub mod store;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::fetch::run_fetch;
use crate::clock::unix_now;
use crate::events::{Bus, Event};
use crate::net::Network;
use crate::store::Store;
pub use hearth_api::transfer::{Fetch, FetchRequest, FetchState};
pub use store::{BlobHash, BlobRef, BlobStore, Format, Imported, Manifest, StoreError};
use wire::BLOB_PROTOCOL;

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
        let mut incoming = network.accept(BLOB_PROTOCOL).map_err(|_| TransferError::Registered)?;
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
                    next = incoming.recv() => match next {
                        Some((peer, stream)) => {
                            let inner = Arc::clone(&server);
                            server.tasks.spawn(async move { serve::serve(inner, peer, stream).await });
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
            peer: peer.to_string().into(),
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
