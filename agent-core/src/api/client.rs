//! The typed client of the control API, shared by the CLI and the desktop shell.
//!
//! It finds the daemon through the data dir's discovery files and turns every way of not reaching
//! it into one clear error: no daemon, a refused token, or the API's own error body. Commands
//! that wait for something subscribe to the daemon's event stream ([`Client::events`]).

mod events;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use events::{EventStream, Update};

use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use super::discovery::{ApiInfo, ApiToken, DiscoveryError};
use super::{
    AddBlob, ConnectRequest, ErrorBody, LogChunk, LoginLink, PauseRequest, PolicyDocument, PolicyText,
    ResultsRequest, Status, SubmitJob, SubmitPackage,
};
use crate::availability::{Availability, OwnerPause};
use crate::config::Paths;
use crate::jobs::{JobAction, JobRecord, Stream};
use crate::ledger::earnings::{Earnings, Period};
use crate::ledger::verify::Report;
use crate::market::{HeldReservation, RemoteJob};
use crate::net::{AdvertBody, PeerInfo};
use crate::requests::RequestStatus;
use crate::resources::Resources;
use crate::store::OwnerNotice;
use crate::transfer::{Fetch, FetchRequest, Imported};

/// How long a call may take before the daemon is considered unresponsive.
const TIMEOUT: Duration = Duration::from_secs(15);

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
    paths: Paths,
}

impl Client {
    /// Finds the daemon of the agent at `paths`.
    pub fn discover(paths: &Paths) -> Result<Self, ClientError> {
        let no_daemon = || ClientError::NoDaemon { data_dir: paths.data_dir.clone() };
        let info = ApiInfo::read(&paths.api_info())?.ok_or_else(no_daemon)?;
        let token = match ApiToken::read(&paths.api_token()) {
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
        Ok(Self { http, info, token, paths: paths.clone() })
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

    /// `POST /api/v1/jobs`: runs the spec at `spec` (made absolute here) under the daemon.
    pub async fn submit(&self, spec: &Path) -> Result<JobRecord, ClientError> {
        let spec = std::path::absolute(spec).unwrap_or_else(|_| spec.to_owned());
        self.send(self.http.post(self.url("/api/v1/jobs")).json(&SubmitJob { spec })).await
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

    /// `POST /api/v1/requests`: finds a provider for the spec at `spec` (made absolute here).
    pub async fn submit_remote(&self, spec: &Path) -> Result<RemoteJob, ClientError> {
        let spec = std::path::absolute(spec).unwrap_or_else(|_| spec.to_owned());
        self.send(self.http.post(self.url("/api/v1/requests")).json(&SubmitJob { spec })).await
    }

    /// `POST /api/v1/packages`: queues the request package at `path` (made absolute here).
    pub async fn submit_package(&self, path: &Path) -> Result<RequestStatus, ClientError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        self.send(self.http.post(self.url("/api/v1/packages")).json(&SubmitPackage { path })).await
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

    /// `GET /api/v1/requests`.
    pub async fn remote_jobs(&self) -> Result<Vec<RemoteJob>, ClientError> {
        self.get("/api/v1/requests").await
    }

    /// `GET /api/v1/requests/{id}`.
    pub async fn remote_job(&self, id: &str) -> Result<RemoteJob, ClientError> {
        self.get(&format!("/api/v1/requests/{id}")).await
    }

    /// `POST /api/v1/requests/{id}/cancel`.
    pub async fn cancel_remote(&self, id: &str) -> Result<RemoteJob, ClientError> {
        self.send(self.http.post(self.url(&format!("/api/v1/requests/{id}/cancel")))).await
    }

    /// `GET /api/v1/requests/{id}/logs/{stream}?offset=N[&wait=true]`: with `wait`, the daemon
    /// holds the answer (up to [`LOG_WAIT`](crate::net::negotiate::LOG_WAIT)) until the provider has
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
        self.get(&format!("/api/v1/requests/{id}/logs/{stream}?offset={offset}{wait}")).await
    }

    /// `POST /api/v1/requests/{id}/results`: write a remote job's fetched outputs to `out`.
    pub async fn remote_results(&self, id: &str, out: &Path) -> Result<Imported, ClientError> {
        let body = ResultsRequest { out: Some(out.to_owned()) };
        self.send(self.http.post(self.url(&format!("/api/v1/requests/{id}/results"))).json(&body)).await
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

    /// `GET /api/v1/offers`.
    pub async fn offers(&self) -> Result<Vec<AdvertBody>, ClientError> {
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

    /// `GET /api/v1/requests/{id}/notices`.
    pub async fn remote_notices(&self, id: &str) -> Result<Vec<OwnerNotice>, ClientError> {
        self.get(&format!("/api/v1/requests/{id}/notices")).await
    }

    /// `POST /api/v1/blobs`: put a file or folder in the store, shared with `peers`.
    pub async fn add_blob(&self, path: &Path, peers: &[String]) -> Result<Imported, ClientError> {
        let body = AddBlob { path: path.to_owned(), share_with: peers.to_vec() };
        self.send(self.http.post(self.url("/api/v1/blobs")).json(&body)).await
    }

    /// `POST /api/v1/jobs/{id}/results`: keep an ended job's outputs and write them to `out`.
    pub async fn results(&self, id: &str, out: &Path) -> Result<Imported, ClientError> {
        let body = ResultsRequest { out: Some(out.to_owned()) };
        self.send(self.http.post(self.url(&format!("/api/v1/jobs/{id}/results"))).json(&body)).await
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
        let http_err = |source| ClientError::Http { url: self.info.url.clone(), source };
        let response = request.bearer_auth(self.token.as_str()).send().await.map_err(|e| {
            if e.is_connect() {
                // A stale api.json from a daemon that was killed: nobody listens there.
                ClientError::NoDaemon { data_dir: self.paths.data_dir.clone() }
            } else {
                http_err(e)
            }
        })?;
        match response.status() {
            status if status.is_success() => response.json().await.map_err(http_err),
            StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized {
                url: self.info.url.clone(),
                token_path: self.paths.api_token(),
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
