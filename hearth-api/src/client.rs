//! The typed client of the control API, shared by the CLI and the desktop shell.
//!
//! It finds the daemon through the data dir's discovery files and turns every way of not reaching
//! it into one clear error: no daemon, a refused token, or the API's own error body. Specs and
//! packages are read here and sent by content ([`bundle`]). Commands that wait for something
//! subscribe to the daemon's event stream ([`Client::events`]).

mod bundle;
mod download;
mod events;

use bundle::Bundle;
pub use bundle::BundleError;
pub use download::WriteError;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use events::{EventStream, Update};

use futures_util::TryStreamExt as _;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use crate::availability::{Availability, OwnerPause};
use crate::blob::Format;
use crate::discovery::{API_INFO_FILE, API_TOKEN_FILE, ApiInfo, ApiToken, DiscoveryError};
use crate::error::ErrorBody;
use crate::jobs::{JobAction, JobRecord, LogChunk, OwnerNotice, Stream};
use crate::ledger::{Earnings, Period, Report, Witnesses};
use crate::market::{HeldReservation, Offer, RemoteJob};
use crate::package::RequestStatus;
use crate::peers::PeerInfo;
use crate::resources::Resources;
use crate::status::{ConnectRequest, LoginLink, PauseRequest, PolicyDocument, PolicyText, Status};
use crate::transfer::{Fetch, FetchRequest, Imported};

/// How long a call may take before the daemon is considered unresponsive.
const TIMEOUT: Duration = Duration::from_secs(15);

/// How long sending a spec with its files, or receiving a job's outputs, may take: either may be
/// large.
const CONTENT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// How long a verification of the whole ledger may take (a million receipts take about a minute
/// on two cores; witnesses get 10 s).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Why a call to the daemon failed. Every message is one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers for this data dir.
    #[error("no Hearth daemon is running for {}; start one with `hearth daemon --data-dir {}`", .data_dir.display(), .data_dir.display())]
    NoDaemon {
        /// The data dir that was looked at.
        data_dir: PathBuf,
    },
    /// The daemon refused the token from `api.token`.
    #[error("the daemon at {url} refused the token in {}; the file no longer matches the running daemon (restart the daemon to re-read it)", .token_path.display())]
    Unauthorized {
        /// The daemon's URL.
        url: String,
        /// The token file that was used.
        token_path: PathBuf,
    },
    /// A discovery file could not be used.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The API answered with an error.
    #[error("the daemon answered {status}: {message} ({code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The stable error code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// What the daemon sent could not be written here.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A spec or package could not be read or sent from this machine.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The connection failed after it was made, or the answer was not understood.
    #[error("talking to the daemon at {url}: {source}")]
    Http {
        /// The daemon's URL.
        url: String,
        /// What went wrong.
        source: reqwest::Error,
    },
    /// The event stream could not be opened, or broke.
    #[error("the event stream of the daemon at {url}: {message}")]
    Stream {
        /// The stream's URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl ClientError {
    /// Whether the daemon answered that what was asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { status: 404, .. })
    }
}

/// A connection to one agent's control API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    info: ApiInfo,
    token: ApiToken,
    data_dir: PathBuf,
}

impl Client {
    /// Finds the daemon of the agent whose data dir is `data_dir`, through its `api.json` and
    /// `api.token`.
    pub fn discover(data_dir: &Path) -> Result<Self, ClientError> {
        let no_daemon = || ClientError::NoDaemon { data_dir: data_dir.to_owned() };
        let info = ApiInfo::read(&data_dir.join(API_INFO_FILE))?.ok_or_else(no_daemon)?;
        let token = match ApiToken::read(&data_dir.join(API_TOKEN_FILE)) {
            Err(DiscoveryError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(no_daemon());
            }
            other => other?,
        };
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|source| ClientError::Http { url: info.url.clone(), source })?;
        Ok(Self { http, info, token, data_dir: data_dir.to_owned() })
    }

    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/api/v1/status").await
    }

    /// `GET /api/v1/resources`.
    pub async fn resources(&self) -> Result<Resources, ClientError> {
        self.get("/api/v1/resources").await
    }

    /// `GET /api/v1/jobs`.
    pub async fn jobs(&self) -> Result<Vec<JobRecord>, ClientError> {
        self.get("/api/v1/jobs").await
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<JobRecord, ClientError> {
        self.get(&format!("/api/v1/jobs/{id}")).await
    }

    /// `POST /api/v1/jobs`: runs the spec at `spec` under the daemon. The spec is checked and
    /// read here, and sent with its files by content.
    pub async fn submit(&self, spec: &Path) -> Result<JobRecord, ClientError> {
        let form = self.bundle(spec, "spec", Bundle::job).await?;
        self.send(self.http.post(self.url("/api/v1/jobs")).multipart(form).timeout(CONTENT_TIMEOUT)).await
    }

    /// `POST /api/v1/jobs/{id}/{action}`.
    pub async fn act(&self, id: &str, action: JobAction) -> Result<JobRecord, ClientError> {
        let action = match action {
            JobAction::Pause => "pause",
            JobAction::Resume => "resume",
            JobAction::Cancel => "cancel",
        };
        self.send(self.http.post(self.url(&format!("/api/v1/jobs/{id}/{action}")))).await
    }

    /// `GET /api/v1/jobs/{id}/logs/{stream}?offset=N`.
    pub async fn log(&self, id: &str, stream: Stream, offset: u64) -> Result<LogChunk, ClientError> {
        let stream = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        self.get(&format!("/api/v1/jobs/{id}/logs/{stream}?offset={offset}")).await
    }

    /// `POST /api/v1/remote-jobs`: finds a provider for the spec at `spec`, sent with its files by
    /// content.
    pub async fn submit_remote(&self, spec: &Path) -> Result<RemoteJob, ClientError> {
        let form = self.bundle(spec, "spec", Bundle::job).await?;
        self.send(self.http.post(self.url("/api/v1/remote-jobs")).multipart(form).timeout(CONTENT_TIMEOUT))
            .await
    }

    /// `POST /api/v1/packages`: queues the request package at `path`, sent with its task specs
    /// and their files by content.
    pub async fn submit_package(&self, path: &Path) -> Result<RequestStatus, ClientError> {
        let form = self.bundle(path, "package", Bundle::package).await?;
        self.send(self.http.post(self.url("/api/v1/packages")).multipart(form).timeout(CONTENT_TIMEOUT)).await
    }

    /// Reads and checks the spec or package at `path` on this machine (off the async threads)
    /// and builds its upload, the text sent as part `entry`.
    async fn bundle(
        &self,
        path: &Path,
        entry: &'static str,
        read: fn(&Path) -> Result<(String, Bundle), BundleError>,
    ) -> Result<reqwest::multipart::Form, ClientError> {
        let path = path.to_owned();
        let (text, bundle) = tokio::task::spawn_blocking(move || read(&path))
            .await
            .map_err(|error| BundleError::Unsendable { path: PathBuf::new(), why: error.to_string() })??;
        Ok(bundle.form(entry, text).await?)
    }

    /// `GET /api/v1/packages`.
    pub async fn packages(&self) -> Result<Vec<RequestStatus>, ClientError> {
        self.get("/api/v1/packages").await
    }

    /// `GET /api/v1/packages/{id}`.
    pub async fn package(&self, id: &str) -> Result<RequestStatus, ClientError> {
        self.get(&format!("/api/v1/packages/{id}")).await
    }

    /// `GET /api/v1/reservations`.
    pub async fn reservations(&self) -> Result<Vec<HeldReservation>, ClientError> {
        self.get("/api/v1/reservations").await
    }

    /// `GET /api/v1/remote-jobs`.
    pub async fn remote_jobs(&self) -> Result<Vec<RemoteJob>, ClientError> {
        self.get("/api/v1/remote-jobs").await
    }

    /// `GET /api/v1/remote-jobs/{id}`.
    pub async fn remote_job(&self, id: &str) -> Result<RemoteJob, ClientError> {
        self.get(&format!("/api/v1/remote-jobs/{id}")).await
    }

    /// `POST /api/v1/remote-jobs/{id}/cancel`.
    pub async fn cancel_remote(&self, id: &str) -> Result<RemoteJob, ClientError> {
        self.send(self.http.post(self.url(&format!("/api/v1/remote-jobs/{id}/cancel")))).await
    }

    /// `GET /api/v1/remote-jobs/{id}/logs/{stream}?offset=N[&wait=true]`: with `wait`, the daemon
    /// holds the answer (up to the agent's `net::negotiate::LOG_WAIT`) until the provider has
    /// bytes past `offset` or the job ended.
    pub async fn remote_log(
        &self,
        id: &str,
        stream: Stream,
        offset: u64,
        wait: bool,
    ) -> Result<LogChunk, ClientError> {
        let stream = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let wait = if wait { "&wait=true" } else { "" };
        self.get(&format!("/api/v1/remote-jobs/{id}/logs/{stream}?offset={offset}{wait}")).await
    }

    /// `POST /api/v1/remote-jobs/{id}/results`, then the folder: writes a remote job's fetched
    /// outputs to `out` on this machine.
    pub async fn remote_results(&self, id: &str, out: &Path) -> Result<Imported, ClientError> {
        download::check_free(out)?;
        let blob: Imported =
            self.send(self.http.post(self.url(&format!("/api/v1/remote-jobs/{id}/results")))).await?;
        self.download(&blob, out).await?;
        Ok(blob)
    }

    /// `GET /api/v1/peers`.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        self.get("/api/v1/peers").await
    }

    /// `POST /api/v1/peers`: connect to a peer id or a `/p2p/` multiaddr.
    pub async fn connect(&self, target: &str) -> Result<PeerInfo, ClientError> {
        let body = ConnectRequest { target: target.to_owned() };
        self.send(self.http.post(self.url("/api/v1/peers")).json(&body)).await
    }

    /// `GET /api/v1/offers`: each advert known, with the signed message it was read from.
    pub async fn offers(&self) -> Result<Vec<Offer>, ClientError> {
        self.get("/api/v1/offers").await
    }

    /// `GET /api/v1/availability`.
    pub async fn availability(&self) -> Result<Availability, ClientError> {
        self.get("/api/v1/availability").await
    }

    /// `POST /api/v1/pause`.
    pub async fn pause(&self, length: Option<Duration>) -> Result<OwnerPause, ClientError> {
        let body = PauseRequest { for_seconds: length.map(|length| length.as_secs().max(1)) };
        self.send(self.http.post(self.url("/api/v1/pause")).json(&body)).await
    }

    /// `POST /api/v1/login-links`: a one-time link that signs a browser in.
    pub async fn login_link(&self) -> Result<LoginLink, ClientError> {
        self.send(self.http.post(self.url("/api/v1/login-links"))).await
    }

    /// `POST /api/v1/resume`.
    pub async fn resume(&self) -> Result<(), ClientError> {
        self.send(self.http.post(self.url("/api/v1/resume"))).await
    }

    /// `GET /api/v1/policy`.
    pub async fn policy(&self) -> Result<PolicyDocument, ClientError> {
        self.get("/api/v1/policy").await
    }

    /// `PUT /api/v1/policy`.
    pub async fn set_policy(&self, toml: &str) -> Result<PolicyDocument, ClientError> {
        self.send(self.http.put(self.url("/api/v1/policy")).json(&PolicyText { toml: toml.to_owned() })).await
    }

    /// `GET /api/v1/jobs/{id}/notices`.
    pub async fn notices(&self, id: &str) -> Result<Vec<OwnerNotice>, ClientError> {
        self.get(&format!("/api/v1/jobs/{id}/notices")).await
    }

    /// `GET /api/v1/remote-jobs/{id}/notices`.
    pub async fn remote_notices(&self, id: &str) -> Result<Vec<OwnerNotice>, ClientError> {
        self.get(&format!("/api/v1/remote-jobs/{id}/notices")).await
    }

    /// `POST /api/v1/blobs`: put a file or folder of this machine in the store, sent by content,
    /// shared with `peers`. Entries of a folder that are not regular files or folders are left
    /// out and listed in `skipped`, as the store's own import does.
    pub async fn add_blob(&self, path: &Path, peers: &[String]) -> Result<Imported, ClientError> {
        let path = path.to_owned();
        let (bundle, format, skipped) = tokio::task::spawn_blocking(move || Bundle::blob(&path))
            .await
            .map_err(|error| BundleError::Unsendable { path: PathBuf::new(), why: error.to_string() })??;
        let mut form = bundle.form("format", format.to_owned()).await?;
        for peer in peers {
            form = form.text("share_with", peer.clone());
        }
        let mut imported: Imported = self
            .send(self.http.post(self.url("/api/v1/blobs")).multipart(form).timeout(CONTENT_TIMEOUT))
            .await?;
        imported.skipped.extend(skipped);
        Ok(imported)
    }

    /// `POST /api/v1/jobs/{id}/results` (keeps an ended job's outputs as a folder blob), then the
    /// folder: writes them to `out` on this machine.
    pub async fn results(&self, id: &str, out: &Path) -> Result<Imported, ClientError> {
        download::check_free(out)?;
        let blob: Imported =
            self.send(self.http.post(self.url(&format!("/api/v1/jobs/{id}/results")))).await?;
        self.download(&blob, out).await?;
        Ok(blob)
    }

    /// `GET /api/v1/blobs/{hash}`: writes a complete blob of the daemon's store to `dest` here
    /// (a file, or a folder that must not exist or be empty).
    pub async fn download(&self, blob: &Imported, dest: &Path) -> Result<(), ClientError> {
        let folder = if blob.blob.format == Format::Folder { "?folder=true" } else { "" };
        let url = self.url(&format!("/api/v1/blobs/{}{folder}", blob.blob.hash));
        let response = self.respond(self.http.get(url).timeout(CONTENT_TIMEOUT)).await?;
        let body = tokio_util::io::StreamReader::new(response.bytes_stream().map_err(std::io::Error::other));
        let (blob, dest) = (blob.clone(), dest.to_owned());
        tokio::task::spawn_blocking(move || {
            download::write(tokio_util::io::SyncIoBridge::new(body), &blob, &dest)
        })
        .await
        .map_err(|error| download::WriteError { path: PathBuf::new(), message: error.to_string() })??;
        Ok(())
    }

    /// `POST /api/v1/transfers`: start fetching.
    pub async fn fetch(&self, request: &FetchRequest) -> Result<Fetch, ClientError> {
        self.send(self.http.post(self.url("/api/v1/transfers")).json(request)).await
    }

    /// `GET /api/v1/transfers`.
    pub async fn transfers(&self) -> Result<Vec<Fetch>, ClientError> {
        self.get("/api/v1/transfers").await
    }

    /// `GET /api/v1/transfers/{id}`.
    pub async fn transfer(&self, id: &str) -> Result<Fetch, ClientError> {
        self.get(&format!("/api/v1/transfers/{id}")).await
    }

    /// `DELETE /api/v1/transfers/{id}`.
    pub async fn cancel_transfer(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/api/v1/transfers/{id}")))).await
    }

    /// `GET /api/v1/ledger/verify`: the whole ledger and its witnesses, so it may take minutes.
    pub async fn verify_ledger(&self) -> Result<Report, ClientError> {
        self.send(self.http.get(self.url("/api/v1/ledger/verify")).timeout(VERIFY_TIMEOUT)).await
    }

    /// `GET /api/v1/ledger/witnesses`: asks every counterparty (or `peer` alone), so it may take
    /// as long as a verification.
    pub async fn witnesses(&self, peer: Option<&str>) -> Result<Witnesses, ClientError> {
        // A peer id is base58; anything else is sent escaped, for the daemon to refuse.
        let query = peer.map_or_else(String::new, |peer| {
            let escaped: String =
                peer.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() {
                            char::from(b).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect();
            format!("?peer={escaped}")
        });
        let url = self.url(&format!("/api/v1/ledger/witnesses{query}"));
        self.send(self.http.get(url).timeout(VERIFY_TIMEOUT)).await
    }

    /// `GET /api/v1/earnings`.
    pub async fn earnings(&self, by: Option<Period>) -> Result<Earnings, ClientError> {
        let query = match by {
            Some(Period::Day) => "?by=day",
            Some(Period::Week) => "?by=week",
            Some(Period::Month) => "?by=month",
            None => "",
        };
        self.get(&format!("/api/v1/earnings{query}")).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.info.url)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn send<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.respond(request).await?;
        response.json().await.map_err(|source| ClientError::Http { url: self.info.url.clone(), source })
    }

    /// Sends `request` with the token; the response when it succeeded, else the error it says.
    async fn respond(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let http_err = |source| ClientError::Http { url: self.info.url.clone(), source };
        let response = request.bearer_auth(self.token.as_str()).send().await.map_err(|e| {
            if e.is_connect() {
                // A stale api.json from a daemon that was killed: nobody listens there.
                ClientError::NoDaemon { data_dir: self.data_dir.clone() }
            } else {
                http_err(e)
            }
        })?;
        match response.status() {
            status if status.is_success() => Ok(response),
            StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized {
                url: self.info.url.clone(),
                token_path: self.data_dir.join(API_TOKEN_FILE),
            }),
            status => {
                let body: Option<ErrorBody> = response.json().await.ok();
                let (code, message) = body
                    .map(|b| (b.code, b.message))
                    .unwrap_or_else(|| ("unknown".into(), "no error body".into()));
                Err(ClientError::Api { status: status.as_u16(), code, message })
            }
        }
    }
}
