//! The daemon: wires the parts together, owns start-up and graceful shutdown.
//!
//! Start-up is a sequence of named steps, each failing with an error that says which step and why:
//! install signal handlers, prepare the data dir, lock it, leave a default config file, load the
//! identity, bind the control API's port, open the store and record the run, start the resource
//! monitor and the job supervisor, open the API and announce it in `api.json`. Then the daemon
//! waits for SIGTERM or SIGINT (or for the API to fail) and stops the parts in reverse order: it
//! tells watchers it is stopping, closes the API (WebSockets first, then in-flight requests),
//! removes `api.json`, cancels running jobs, stops the monitor, records the end of the run,
//! checkpoints and closes the store, and releases the lock.

mod adverts;
mod availability;
mod lock;
mod monitor;

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use lock::LockError;

use crate::api::{self, ApiInfo, ApiState, RunInfo, UploadLimits};
use crate::availability::{OwnerControls, PolicyError};
use crate::clock::unix_now;
use crate::config::{HearthConfig, Paths};
use crate::events::{AgentState, Bus, Event};
use crate::identity::{Created, Identity, IdentityError};
use crate::jobs::{Runner, Supervisor};
use crate::ledger::Ledger;
use crate::market::{self, Market, MarketError};
use crate::net::{NetError, Network};
use crate::packages::{Packages, RequestError};
use crate::store::{RunId, Store, StoreError};
use crate::transfer::{BlobStore, TransferError, Transfers};
use crate::uploads::Uploads;
use adverts::AdvertTask;
use availability::{AvailabilityTask, Wiring};
use lock::DataDirLock;
use monitor::Monitor;

/// How long in-flight API requests get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data dir could not be created or secured.
    #[error("cannot prepare data dir {}: {source}", .path.display())]
    DataDir {
        /// The data dir.
        path: std::path::PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Another daemon runs on this data dir, or the lock failed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store could not be opened or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The API's token or discovery file failed.
    #[error(transparent)]
    Discovery(#[from] api::discovery::DiscoveryError),
    /// The API's port could not be bound.
    #[error(
        "cannot open the control API on {addr} (set by `api.port`, --api-port or HEARTH_API_PORT): {source}"
    )]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// The API stopped serving while the daemon ran.
    #[error("the control API failed: {0}")]
    Serve(io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    /// The sharing policy cannot be used.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The peer-to-peer network could not start.
    #[error(transparent)]
    Network(#[from] NetError),
    /// The blob store or the transfer service could not start.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The market could not start.
    #[error(transparent)]
    Market(#[from] MarketError),
    /// The request packages of earlier runs could not be read.
    #[error(transparent)]
    Requests(#[from] RequestError),
}

/// Removes the staging folders of uploads nothing needs any more: those of jobs that were waiting
/// when the last run stopped (they were marked failed) and of uploads cut off by a crash. Only an
/// unfinished request package still reads its uploaded task specs.
async fn sweep_uploads(uploads: &Uploads, packages: &Packages) {
    let in_use: Vec<PathBuf> = packages
        .list()
        .into_iter()
        .filter(|request| !request.state.is_terminal())
        .map(|request| request.path)
        .collect();
    let uploads = uploads.clone();
    let removed =
        tokio::task::spawn_blocking(move || uploads.sweep(in_use.iter().map(PathBuf::as_path))).await;
    if let Ok(removed @ 1..) = removed {
        tracing::info!(removed, "removed staging folders of uploads nothing needs any more");
    }
}

/// Runs the agent until SIGTERM or SIGINT. Returns `Ok` after a clean shutdown.
pub async fn run(paths: &Paths, config: &HearthConfig) -> Result<(), DaemonError> {
    // Install handlers first, so a signal during start-up still stops us cleanly.
    let mut signals = Signals::install()?;
    prepare_data_dir(&paths.data_dir)?;
    let _lock = DataDirLock::acquire(&paths.lock(), &paths.data_dir)?;
    write_default_config(paths);
    let identity = load_identity(paths)?;
    // Bind before opening the store, so a port in use fails before anything is recorded.
    let listener = bind_api(config.api.port).await?;
    let started_at = unix_now();
    let store = Store::open(&paths.store(), &identity.peer_id()).await?;
    let run = begin_run(&store, started_at).await?;

    let outcome = serve(paths, config, &identity, &store, listener, started_at, &mut signals).await;

    // Whether the agent ran or a later start-up step failed, the run ended in an orderly way.
    store.end_run(run, unix_now()).await?;
    store.shutdown().await?;
    if outcome.is_ok() {
        tracing::info!("stopped cleanly");
    }
    outcome
}

/// Starts the monitor and the API, announces them, waits for a signal, and stops them in reverse.
async fn serve(
    paths: &Paths,
    config: &HearthConfig,
    identity: &Identity,
    store: &Store,
    listener: TcpListener,
    started_at: i64,
    signals: &mut Signals,
) -> Result<(), DaemonError> {
    let cancel = CancellationToken::new();
    // Any early return below stops whatever was already started.
    let _stop_on_return = cancel.clone().drop_guard();
    let events = Bus::default();
    let (state_tx, state_rx) = watch::channel(AgentState::Starting);
    let monitor =
        Monitor::spawn(paths.data_dir.clone(), config.resources.refresh_interval, events.clone(), &cancel)
            .await;

    let owner = Arc::new(OwnerControls::load(&paths.policy_file(), &paths.data_dir)?);
    let runner = Runner::for_data_dir(&paths.data_dir);
    if let Some(why) = runner.disk_not_enforced() {
        tracing::warn!(
            "a job's disk limit is checked every 200 ms, not enforced by the kernel: {why}; a job \
             can pass it for a moment, or hold deleted files past it"
        );
    }
    // Before anything runs or the agent says it is ready: a run that died leaves nothing behind.
    let sweeper = Runner::for_data_dir(&paths.data_dir);
    if let Ok(cleaned @ 1..) = tokio::task::spawn_blocking(move || sweeper.sweep_previous_run()).await {
        tracing::info!(cleaned, "removed the scratch folders of jobs a previous run left");
    }
    // No job starts before the first evaluation says the machine shares.
    let (sharing, sharing_rx) = watch::channel(false);
    let jobs = Supervisor::start(runner, store.clone(), events.clone(), sharing_rx).await?;
    let wiring = Wiring {
        owner: Arc::clone(&owner),
        resources: monitor.resources(),
        sharing,
        jobs: jobs.clone(),
        events: events.clone(),
        fake_gpus: config.testing.fake_gpus(),
    };
    if config.testing.fake_gpus > 0 {
        tracing::warn!(
            fake_gpus = config.testing.fake_gpus,
            "TEST SETTING [testing] fake_gpus: this agent declares GPUs it does not have; never use it to share for real"
        );
    }
    let availability = AvailabilityTask::spawn(wiring, &cancel).await;
    let (network, network_task, inbound) =
        Network::spawn(identity, &config.network, events.clone(), &cancel).await?;
    let blobs = BlobStore::open(&paths.blobs()).map_err(TransferError::from)?;
    let (transfers, transfers_task) =
        Transfers::spawn(blobs, store.clone(), network.clone(), events.clone(), &cancel).await?;
    let ledger = Ledger::new(store.clone(), identity.clone(), config.ledger.mode);
    let (market, market_task) = Market::spawn(
        market::Parts {
            identity: identity.clone(),
            network: network.clone(),
            transfers: transfers.clone(),
            jobs: jobs.clone(),
            store: store.clone(),
            ledger: ledger.clone(),
            events: events.clone(),
            availability: availability.availability(),
            resources: monitor.resources(),
            dir: paths.market(),
        },
        inbound,
        &cancel,
    )
    .await?;
    let uploads = Uploads::in_data_dir(&paths.data_dir);
    let (packages, packages_task) = Packages::spawn(
        store.clone(),
        market.clone(),
        events.clone(),
        identity.peer_id(),
        uploads.clone(),
        &cancel,
    )
    .await?;
    sweep_uploads(&uploads, &packages).await;
    let adverts = AdvertTask::spawn(
        adverts::Sources {
            identity: identity.clone(),
            network: network.clone(),
            availability: availability.availability(),
            resources: monitor.resources(),
            owner: Arc::clone(&owner),
            jobs: jobs.clone(),
        },
        &cancel,
    );
    let token = api::discovery::load_or_create_token(&paths.api_token())?;
    let port = listener.local_addr().map_err(DaemonError::Serve)?.port();
    let url = format!("http://127.0.0.1:{port}");
    let peer_id = identity.peer_id().to_string();
    let state = ApiState {
        run: Arc::new(RunInfo { peer_id: peer_id.clone(), data_dir: paths.data_dir.clone(), started_at }),
        state: state_rx,
        resources: monitor.resources(),
        events: events.clone(),
        token,
        sessions: Arc::default(),
        port,
        shutdown: cancel.clone(),
        jobs: jobs.clone(),
        availability: availability.availability(),
        owner,
        network,
        transfers,
        market,
        ledger: ledger.clone(),
        packages,
        uploads,
        upload_limits: UploadLimits::from(&config.api),
    };
    let (router, _doc) = api::router(state);
    let mut server = tokio::spawn(api::serve(listener, router, cancel.clone()));
    let info = ApiInfo { url: url.clone(), pid: std::process::id(), peer_id: peer_id.clone().into() };
    info.write(&paths.api_info())?;

    set_state(&state_tx, &events, AgentState::Ready);
    tracing::info!(%peer_id, api = %url, data_dir = %paths.data_dir.display(), "Hearth agent ready");

    let outcome = tokio::select! {
        signal = signals.recv() => { tracing::info!("{signal} received, shutting down"); Ok(()) }
        served = &mut server => Err(DaemonError::Serve(match served {
            Ok(Ok(())) => io::Error::other("the server stopped"),
            Ok(Err(e)) => e,
            Err(e) => io::Error::other(e),
        })),
    };

    set_state(&state_tx, &events, AgentState::Stopping);
    cancel.cancel();
    if !server.is_finished() && tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await.is_err() {
        tracing::warn!("API requests still running after {DRAIN_TIMEOUT:?}; closing them");
        server.abort();
    }
    ApiInfo::remove_if_ours(&paths.api_info());
    adverts.shutdown().await;
    packages_task.shutdown().await;
    market_task.shutdown().await;
    // Batch mode: records of jobs still running are kept, not lost with the process.
    if let Err(error) = ledger.flush().await {
        tracing::error!(%error, "cannot write the ledger's waiting records");
    }
    transfers_task.shutdown().await;
    network_task.shutdown().await;
    // Stopped before the jobs, so it does not freeze or thaw them while they are cancelled.
    availability.shutdown().await;
    // Jobs cannot outlive the agent anyway (see jobs::sandbox); cancelling them records why.
    jobs.shutdown().await;
    monitor.shutdown().await;
    outcome
}

/// SIGTERM and SIGINT, the two ways to ask the daemon to stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(DaemonError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?,
        })
    }

    /// Waits for either signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn bind_api(port: u16) -> Result<TcpListener, DaemonError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { addr, source })
}

fn set_state(tx: &watch::Sender<AgentState>, events: &Bus, state: AgentState) {
    tx.send_replace(state);
    events.publish(Event::StateChanged { state });
}

/// Creates the data dir private to the owner (0700): it holds the identity key and the API token.
/// An existing directory keeps its mode, because it may be shared with other things (even `~`);
/// the secret files in it are 0600 either way.
fn prepare_data_dir(dir: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::DataDir { path: dir.to_owned(), source };
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)
}

/// Leaves a commented config file for the owner to edit, unless one exists. Failing to write it
/// is not fatal: defaults apply either way.
fn write_default_config(paths: &Paths) {
    match HearthConfig::write_default_if_missing(&paths.config_file) {
        Ok(true) => tracing::info!(path = %paths.config_file.display(), "wrote the default configuration"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(path = %paths.config_file.display(), error = %e, "cannot write the default configuration")
        }
    }
}

fn load_identity(paths: &Paths) -> Result<Identity, DaemonError> {
    let (identity, created) = Identity::load_or_create(&paths.data_dir)?;
    if created == Created::Yes {
        tracing::info!(peer_id = %identity.peer_id(), "created a new agent identity");
    }
    Ok(identity)
}

async fn begin_run(store: &Store, started_at: i64) -> Result<RunId, DaemonError> {
    let (run, previous) = store.begin_run(env!("CARGO_PKG_VERSION"), started_at).await?;
    if let Some(previous) = previous.filter(|p| p.stopped_at.is_none()) {
        tracing::warn!(
            started_at = previous.started_at,
            "the previous run of this agent did not shut down cleanly"
        );
    }
    Ok(run)
}
