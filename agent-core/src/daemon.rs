//! The daemon: wires the parts together, owns start-up and graceful shutdown.
//!
//! Start-up is a sequence of named steps, each failing with an error that says which step and why:
//! prepare the data dir, lock it, load the identity, open the store, start the resource monitor,
//! open the control API and announce it. Then the daemon waits for SIGTERM or SIGINT (or for the
//! API to fail) and stops the parts in reverse order: it tells watchers it is stopping, closes the
//! API (WebSockets first, then in-flight requests), stops the monitor, records a clean stop in the
//! store and checkpoints it, and releases the lock.

mod lock;
mod monitor;

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use lock::LockError;

use crate::api::{self, ApiInfo, ApiState, ApiToken, Status};
use crate::config::{HearthConfig, Paths};
use crate::events::{AgentState, Bus, Event};
use crate::identity::{Created, Identity, IdentityError};
use crate::store::{Store, StoreError};
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
}

/// Runs the agent until SIGTERM or SIGINT. Returns `Ok` after a clean shutdown.
pub async fn run(paths: &Paths, config: &HearthConfig) -> Result<(), DaemonError> {
    // Install handlers first, so a signal during start-up still stops us cleanly.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    prepare_data_dir(&paths.data_dir)?;
    let _lock = DataDirLock::acquire(&paths.lock(), &paths.data_dir)?;
    write_default_config(paths);
    let identity = load_identity(paths)?;
    let peer_id = identity.peer_id().to_string();
    // Bind before opening the store, so a port in use fails before anything is recorded.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.api.port));
    let listener = TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { addr, source })?;
    let port = listener.local_addr().map_err(|source| DaemonError::Bind { addr, source })?.port();
    let (store, run) = open_store(paths, &peer_id).await?;

    let cancel = CancellationToken::new();
    let events = Bus::default();
    let (state_tx, state_rx) = watch::channel(AgentState::Starting);
    let monitor =
        Monitor::spawn(paths.data_dir.clone(), config.resources.refresh_interval, events.clone(), &cancel)
            .await;

    let token = ApiToken::load_or_create(&paths.api_token())?;
    let url = format!("http://127.0.0.1:{port}");
    let state = ApiState {
        status: Arc::new(Status {
            peer_id: peer_id.clone(),
            state: AgentState::Starting,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            data_dir: paths.data_dir.clone(),
            started_at: unix_now(),
        }),
        state: state_rx,
        resources: monitor.resources(),
        events: events.clone(),
        token,
        port,
        shutdown: cancel.clone(),
    };
    let (router, _doc) = api::router(state);
    let mut server = tokio::spawn(api::serve(listener, router, cancel.clone()));
    let info = ApiInfo { url: url.clone(), pid: std::process::id(), peer_id: peer_id.clone() };
    info.write(&paths.api_info())?;

    set_state(&state_tx, &events, AgentState::Ready);
    tracing::info!(%peer_id, api = %url, data_dir = %paths.data_dir.display(), "Hearth agent ready");

    let outcome = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM received, shutting down"); Ok(()) }
        _ = sigint.recv() => { tracing::info!("SIGINT received, shutting down"); Ok(()) }
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
    monitor.shutdown().await;
    store.end_run(run, unix_now()).await?;
    store.shutdown().await?;
    tracing::info!("stopped cleanly");
    outcome
}

fn set_state(tx: &watch::Sender<AgentState>, events: &Bus, state: AgentState) {
    tx.send_replace(state);
    events.publish(Event::StateChanged { state });
}

/// Creates the data dir, private to the owner: it holds the identity key and the API token.
fn prepare_data_dir(dir: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::DataDir { path: dir.to_owned(), source };
    fs::create_dir_all(dir).map_err(err)?;
    let mode = fs::metadata(dir).map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o077)).map_err(err)?;
    }
    Ok(())
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

async fn open_store(paths: &Paths, peer_id: &str) -> Result<(Store, crate::store::RunId), DaemonError> {
    let store = Store::open(&paths.store(), peer_id).await?;
    let (run, previous) = store.begin_run(env!("CARGO_PKG_VERSION"), unix_now()).await?;
    if let Some(previous) = previous
        && previous.stopped_at.is_none()
    {
        tracing::warn!(
            started_at = previous.started_at,
            "the previous run of this agent did not shut down cleanly"
        );
    }
    Ok((store, run))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
