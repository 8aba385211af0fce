//! The local control API: HTTP + WebSocket on 127.0.0.1, used by the CLI, the web UI and the
//! desktop shell alike.
//!
//! Every route sits behind [`security`]'s gate (Host, Origin, and the bearer token or a browser's
//! session cookie). Routes are declared
//! with `utoipa` so that the OpenAPI document served at `/api/v1/openapi.json` is generated from
//! the same code that handles requests and cannot drift from it. The API owns no state: it reads
//! the daemon's watch channels and streams its event [`Bus`]. [`serve`] runs until the shutdown
//! token is cancelled, then closes open WebSockets and drains in-flight requests.

mod blobs;
pub mod discovery;
mod error;
mod extract;
mod ledger;
mod packages;
mod remote_jobs;
mod security;
pub mod session;
mod upload;
pub use blobs::{BlobQuery, BlobUpload};
pub use upload::{EXECUTABLE, MAX_SPEC_BYTES, PackageUpload, SpecUpload, UploadLimits};

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, middleware};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use discovery::{ApiInfo, ApiToken};
pub use error::ErrorBody;
pub use extract::MAX_BODY_BYTES;
use extract::{Body, Path, Query};
pub use hearth_api::client;
pub use hearth_api::events::StreamMessage;
pub use hearth_api::jobs::LogChunk;
pub use hearth_api::status::{AgentStatus, ConnectRequest, PauseRequest, PolicyDocument, PolicyText, Status};
pub use session::{LoginLink, Sessions};

use crate::availability::{Availability, OwnerControls, OwnerPause};
use crate::events::{AgentState, Bus, Event};
use crate::jobs::supervisor::read_log;
use crate::jobs::{JobAction, JobRecord, Stream, Supervisor};
use crate::ledger::Ledger;
use crate::market::Market;
use crate::net::{Network, PeerInfo};
use crate::packages::Packages;
use crate::resources::Resources;
use crate::transfer::{Fetch, FetchRequest, Imported, Transfers};
use crate::uploads::Uploads;
use hearth_api::jobs::OwnerNotice;
use hearth_api::market::Offer;

/// What stays fixed for one daemon run; the rest of [`Status`] is read when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// The agent's peer id.
    pub peer_id: String,
    /// Where this agent keeps its files.
    pub data_dir: PathBuf,
    /// When the daemon started, in Unix seconds.
    pub started_at: i64,
}

/// The parts of the daemon the API reads. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// Fixed facts about this run.
    pub run: Arc<RunInfo>,
    /// The agent's state.
    pub state: watch::Receiver<AgentState>,
    /// The latest resource figures.
    pub resources: watch::Receiver<Resources>,
    /// The event stream.
    pub events: Bus,
    /// The bearer token every request must carry, unless it comes with a browser session.
    pub token: ApiToken,
    /// Login codes and browser sessions.
    pub sessions: Arc<Sessions>,
    /// The port the API listens on, which Host and Origin must name.
    pub port: u16,
    /// Cancelled when the daemon shuts down; open WebSockets close on it.
    pub shutdown: CancellationToken,
    /// The jobs this agent runs.
    pub jobs: Supervisor,
    /// Whether the machine shares now.
    pub availability: watch::Receiver<Availability>,
    /// The owner's policy, pause and activity reports.
    pub owner: Arc<OwnerControls>,
    /// The peer-to-peer network.
    pub network: Network,
    /// The blob store and the transfers.
    pub transfers: Transfers,
    /// Jobs asked of other agents, and the ones this agent runs for them.
    pub market: Market,
    /// Records, receipts and checkpoints.
    pub ledger: Ledger,
    /// Request packages this agent asked for.
    pub packages: Packages,
    /// Where uploaded specs and their files are staged.
    pub uploads: Uploads,
    /// What one upload may hold.
    pub upload_limits: UploadLimits,
}

impl ApiState {
    async fn status(&self) -> Status {
        let availability = self.availability.borrow().clone();
        let state = match (*self.state.borrow(), &availability) {
            (AgentState::Starting, _) => AgentStatus::Starting,
            (AgentState::Stopping, _) => AgentStatus::Stopping,
            (AgentState::Ready, Availability::Sharing { .. }) => AgentStatus::Sharing,
            (AgentState::Ready, Availability::Paused { .. }) => AgentStatus::Paused,
        };
        let reasons = match &availability {
            Availability::Paused { reasons } => reasons.clone(),
            Availability::Sharing { .. } => Vec::new(),
        };
        Status {
            peer_id: self.run.peer_id.clone().into(),
            state,
            reasons,
            availability,
            listen_addrs: self.network.listen_addrs().await,
            reachability: self.network.reachability().await,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            data_dir: self.run.data_dir.clone(),
            started_at: self.run.started_at,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Hearth control API", description = "Local control API of a Hearth agent."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(StreamMessage, Event, ErrorBody))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the router, with every route behind the security gate, and its OpenAPI document.
pub fn router(state: ApiState) -> (Router, utoipa::openapi::OpenApi) {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_status))
        .routes(routes!(get_resources))
        .routes(routes!(get_peers, connect_peer))
        .routes(routes!(get_offers))
        .routes(uploading(routes!(blobs::add)))
        .routes(routes!(blobs::download))
        .routes(routes!(list_transfers, start_transfer))
        .routes(routes!(get_transfer, cancel_transfer))
        .routes(uploading(routes!(list_jobs, submit_job)))
        .routes(routes!(get_job))
        .routes(routes!(job_results))
        .routes(routes!(act_on_job))
        .routes(routes!(job_log))
        .routes(routes!(job_notices))
        .routes(uploading(routes!(remote_jobs::list, remote_jobs::submit)))
        .routes(routes!(remote_jobs::get))
        .routes(routes!(remote_jobs::cancel))
        .routes(routes!(remote_jobs::logs))
        .routes(routes!(remote_jobs::results))
        .routes(routes!(remote_jobs::notices))
        .routes(uploading(routes!(packages::list, packages::submit)))
        .routes(routes!(packages::get))
        .routes(routes!(packages::reservations))
        .routes(routes!(ledger::verify))
        .routes(routes!(ledger::witnesses))
        .routes(routes!(ledger::earnings))
        .routes(routes!(get_availability))
        .routes(routes!(pause_sharing))
        .routes(routes!(resume_sharing))
        .routes(routes!(get_policy, set_policy))
        .routes(routes!(report_activity))
        .routes(routes!(events))
        .routes(routes!(session::create_link))
        .routes(routes!(session::login))
        .routes(routes!(session::logout))
        .routes(routes!(openapi_json))
        .split_for_parts();
    let doc_for_route = Arc::new(doc.clone());
    let router = api
        .merge(remote_jobs::aliases())
        .fallback(|| async { error::ApiError::not_found() })
        .method_not_allowed_fallback(|| async { error::ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::Extension(doc_for_route))
        .layer(middleware::from_fn_with_state(state.clone(), security::gate))
        .with_state(state);
    (router, doc)
}

/// Routes that take uploads stream their bodies and bound them by [`UploadLimits`] as they come,
/// so axum's default limit for buffered bodies (2 MiB) does not apply to them.
fn uploading(
    (schemas, paths, router): utoipa_axum::router::UtoipaMethodRouter<ApiState>,
) -> utoipa_axum::router::UtoipaMethodRouter<ApiState> {
    (schemas, paths, router.layer(uploading_body()))
}

/// Lifts axum's limit for buffered bodies from a route that streams its upload.
fn uploading_body() -> DefaultBodyLimit {
    DefaultBodyLimit::disable()
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then waits for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// The agent's identity, state and this run's facts.
#[utoipa::path(get, path = "/api/v1/status", responses(
    (status = 200, body = Status),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_status(State(state): State<ApiState>) -> Json<Status> {
    Json(state.status().await)
}

/// The connected peers, with their addresses and the last ping's round trip.
#[utoipa::path(get, path = "/api/v1/peers", responses(
    (status = 200, body = Vec<PeerInfo>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_peers(State(state): State<ApiState>) -> Json<Vec<PeerInfo>> {
    Json(state.network.peers().await)
}

/// Connects to a peer (reusing a connection there is), directly or through its relay; answers
/// when connected, or within about ten seconds with why not.
#[utoipa::path(post, path = "/api/v1/peers", request_body = ConnectRequest, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 200, body = PeerInfo),
    (status = 400, description = "Not a peer id or a /p2p/ multiaddr, or this agent's own id", body = ErrorBody),
    (status = 504, description = "The peer could not be reached", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn connect_peer(
    State(state): State<ApiState>,
    Body(body): Body<ConnectRequest>,
) -> Result<Json<PeerInfo>, error::ApiError> {
    Ok(Json(state.network.connect(&body.target).await.map_err(error::ApiError::from)?))
}

/// The valid, unexpired capacity adverts this agent knows, its own included, each with the signed
/// message it came in (`signed`), which a client can verify itself.
#[utoipa::path(get, path = "/api/v1/offers", responses(
    (status = 200, body = Vec<Offer>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_offers(State(state): State<ApiState>) -> Json<Vec<Offer>> {
    let offers = state.network.adverts().await.into_iter().map(|advert| Offer {
        // Valid UTF-8: it parsed as JSON, or this agent wrote it.
        signed: String::from_utf8_lossy(&advert.wire).into_owned(),
        body: advert.body,
    });
    Json(offers.collect())
}

/// Keeps an ended job's outputs in the blob store (a folder blob, tag `results-ID`); answers the
/// folder's hash, files and size. Read them with `GET /api/v1/blobs/{hash}?folder=true`.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/results", params(("id" = String, Path, description = "The job's id")),
    responses(
    (status = 200, body = Imported),
    (status = 404, body = ErrorBody),
    (status = 409, description = "The job has not ended", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn job_results(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Imported>, error::ApiError> {
    let job = state.jobs.get(&id).await?;
    if !job.state.is_terminal() {
        return Err(error::ApiError::conflict(
            "job_state_conflict",
            &format!("job {id} is {}; its results are complete once it has ended", job.state.name()),
        ));
    }
    Ok(Json(state.transfers.results(&id, job.job_dir.join("out")).await?))
}

/// Every fetch this agent knows, oldest first.
#[utoipa::path(get, path = "/api/v1/transfers", responses(
    (status = 200, body = Vec<Fetch>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn list_transfers(State(state): State<ApiState>) -> Json<Vec<Fetch>> {
    Json(state.transfers.fetches())
}

/// Starts fetching a blob or folder from a peer; answers at once with the fetch, which runs on
/// (and resumes after a restart) until it ends. Progress is pushed as `transfer_changed` events.
#[utoipa::path(post, path = "/api/v1/transfers", request_body = FetchRequest, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 202, body = Fetch),
    (status = 400, description = "A peer id that is not one, or this agent's own", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn start_transfer(
    State(state): State<ApiState>,
    Body(body): Body<FetchRequest>,
) -> Result<(axum::http::StatusCode, Json<Fetch>), error::ApiError> {
    Ok((axum::http::StatusCode::ACCEPTED, Json(state.transfers.fetch(body).await?)))
}

/// One fetch.
#[utoipa::path(get, path = "/api/v1/transfers/{id}", params(("id" = String, Path, description = "The fetch's id")), responses(
    (status = 200, body = Fetch),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_transfer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Fetch>, error::ApiError> {
    Ok(Json(state.transfers.get(&id)?))
}

/// Cancels a fetch that has not ended; what it downloaded is dropped.
#[utoipa::path(delete, path = "/api/v1/transfers/{id}", params(("id" = String, Path, description = "The fetch's id")), responses(
    (status = 200, description = "Cancelled (the body is `null`); a `transfer_changed` event follows"),
    (status = 404, body = ErrorBody),
    (status = 409, description = "It has already ended", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn cancel_transfer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<()>, error::ApiError> {
    state.transfers.cancel(&id)?;
    Ok(Json(()))
}

/// The machine's CPU, memory, disk and GPUs, as last refreshed.
#[utoipa::path(get, path = "/api/v1/resources", responses(
    (status = 200, body = Resources),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_resources(State(state): State<ApiState>) -> Json<Resources> {
    Json(state.resources.borrow().clone())
}

/// Where to start reading a log.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Byte offset into the log; 0 when absent.
    #[serde(default)]
    pub offset: u64,
}

/// Every job on this agent, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs", responses(
    (status = 200, body = Vec<JobRecord>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn list_jobs(State(state): State<ApiState>) -> Result<Json<Vec<JobRecord>>, error::ApiError> {
    Ok(Json(state.jobs.list().await?))
}

/// Runs a job spec on this machine under the sandbox. The spec comes with its files, by content
/// (see `SpecUpload`); they are staged under the data dir until the job ends. No path on this
/// machine is read on a client's word.
#[utoipa::path(post, path = "/api/v1/jobs",
    request_body(content = SpecUpload, content_type = "multipart/form-data"), responses(
    (status = 201, body = JobRecord),
    (status = 400, body = ErrorBody, description = "the spec is invalid, an upload name is unsafe or a spec names a file that was not uploaded; nothing runs and nothing is kept"),
    (status = 413, body = ErrorBody, description = "the upload is over a limit, which the message names"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn submit_job(
    State(state): State<ApiState>,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(axum::http::StatusCode, Json<JobRecord>), error::ApiError> {
    let upload = upload::receive(&state.uploads, state.upload_limits, upload::Entry::Spec, multipart).await?;
    let job = state.jobs.submit_staged(upload.staged).await?;
    Ok((axum::http::StatusCode::CREATED, Json(job)))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path, description = "The job's id")), responses(
    (status = 200, body = JobRecord),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, error::ApiError> {
    Ok(Json(state.jobs.get(&id).await?))
}

/// Pauses, resumes or cancels a job; answers once done.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/{action}", params(
    ("id" = String, Path, description = "The job's id"),
    ("action" = JobAction, Path, description = "pause, resume or cancel")
), responses(
    (status = 200, body = JobRecord),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "not possible in the job's state"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn act_on_job(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, JobAction)>,
) -> Result<Json<JobRecord>, error::ApiError> {
    Ok(Json(state.jobs.act(&id, action).await?))
}

/// A job's stdout or stderr from a byte offset on (up to the kept limit).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs/{stream}", params(
    ("id" = String, Path, description = "The job's id"),
    ("stream" = Stream, Path, description = "stdout or stderr"),
    LogQuery
), responses(
    (status = 200, body = LogChunk),
    (status = 400, description = "Not a stream, or an offset that is not a number or is past the log's end", body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn job_log(
    State(state): State<ApiState>,
    Path((id, stream)): Path<(String, Stream)>,
    Query(query): Query<LogQuery>,
) -> Result<Json<LogChunk>, error::ApiError> {
    let job = state.jobs.get(&id).await?;
    // Read the state first: a log read after the job ended is then complete.
    let finished = job.state.is_terminal();
    // A log only grows, and every offset the API hands out is within it: one past its end was
    // made up, and answering it would have the client wait there forever.
    let length = std::fs::metadata(job.job_dir.join(stream.file_name())).map_or(0, |m| m.len());
    if query.offset > length {
        return Err(error::ApiError::out_of_range(&format!(
            "offset {} is past the end of the job's {} ({length} bytes)",
            query.offset,
            stream.file_name()
        )));
    }
    let bytes = read_log(&job.job_dir, stream, query.offset).unwrap_or_default();
    let next_offset = query.offset.saturating_add(bytes.len() as u64);
    Ok(Json(LogChunk { text: String::from_utf8_lossy(&bytes).into_owned(), next_offset, finished }))
}

/// What the owner did to a job (pause, resume, stop) and why, oldest first: the notices kept for
/// the job's consumer.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/notices", params(("id" = String, Path, description = "The job's id")), responses(
    (status = 200, body = Vec<OwnerNotice>),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn job_notices(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<OwnerNotice>>, error::ApiError> {
    state.jobs.get(&id).await?;
    Ok(Json(state.jobs.notices(&id).await?))
}

/// Whether the machine shares now: its offered capacity, or why it is paused.
#[utoipa::path(get, path = "/api/v1/availability", responses(
    (status = 200, body = Availability),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_availability(State(state): State<ApiState>) -> Json<Availability> {
    Json(state.availability.borrow().clone())
}

/// Pauses sharing at once: every running job is frozen. The tray's "pause" button.
#[utoipa::path(post, path = "/api/v1/pause", request_body = PauseRequest, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 200, body = OwnerPause),
    (status = 400, description = "`for_seconds` is over ten years; nothing was paused", body = ErrorBody),
    (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn pause_sharing(
    State(state): State<ApiState>,
    Body(body): Body<PauseRequest>,
) -> Result<Json<OwnerPause>, error::ApiError> {
    let pause = state.owner.pause(body.for_seconds.map(std::time::Duration::from_secs))?;
    Ok(Json(pause))
}

/// Ends the owner's pause; sharing resumes unless something else in the policy holds.
#[utoipa::path(post, path = "/api/v1/resume", responses(
    (status = 200, description = "The owner's pause is over (the body is `null`)"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn resume_sharing(State(state): State<ApiState>) -> Result<Json<()>, error::ApiError> {
    state.owner.resume()?;
    Ok(Json(()))
}

/// The sharing policy in force.
#[utoipa::path(get, path = "/api/v1/policy", responses(
    (status = 200, body = PolicyDocument),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn get_policy(State(state): State<ApiState>) -> Json<PolicyDocument> {
    Json(PolicyDocument { policy: state.owner.policy() })
}

/// Replaces the policy file and applies it at once; an invalid policy changes nothing.
#[utoipa::path(put, path = "/api/v1/policy", request_body = PolicyText, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 200, body = PolicyDocument),
    (status = 400, body = ErrorBody, description = "the policy is invalid; the field is named"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn set_policy(
    State(state): State<ApiState>,
    Body(body): Body<PolicyText>,
) -> Result<Json<PolicyDocument>, error::ApiError> {
    let policy = state.owner.set_policy(&body.toml)?;
    Ok(Json(PolicyDocument { policy }))
}

/// What `POST /api/v1/activity` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivityReport {
    /// Seconds since the owner last used keyboard, mouse or touch, as the desktop session knows it
    /// (at most ten years).
    pub idle_seconds: u64,
}

/// The desktop app reports the owner's idle time (how Wayland desktops, which hide input devices
/// from other programs, tell the agent).
#[utoipa::path(post, path = "/api/v1/activity", request_body = ActivityReport, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 200, description = "Recorded (the body is `null`)"),
    (status = 400, description = "`idle_seconds` is over ten years; nothing was recorded", body = ErrorBody),
    (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn report_activity(
    State(state): State<ApiState>,
    Body(body): Body<ActivityReport>,
) -> Result<Json<()>, error::ApiError> {
    state.owner.report_idle(std::time::Duration::from_secs(body.idle_seconds))?;
    Ok(Json(()))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1 document")))]
async fn openapi_json(
    axum::Extension(doc): axum::Extension<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json((*doc).clone())
}

/// WebSocket stream of [`StreamMessage`]s: a `snapshot` first, then every event as it happens.
/// At shutdown the events already published (such as `stopping`) are sent before the close frame.
#[utoipa::path(get, path = "/api/v1/events", responses(
    (status = 101, description = "Switching to the WebSocket protocol; then a stream of messages", body = StreamMessage),
    (status = 400, body = ErrorBody, description = "not a WebSocket upgrade (`not_websocket`)"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
async fn events(
    State(state): State<ApiState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, error::ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        error::ApiError::bad_request(
            "not_websocket",
            &format!("the event stream is a WebSocket: {rejection}"),
        )
    })?;
    // Subscribe before the upgrade completes, so nothing published in between is lost.
    let rx = state.events.subscribe();
    Ok(upgrade.on_upgrade(move |socket| stream_events(socket, state, rx)).into_response())
}

async fn stream_events(mut socket: WebSocket, state: ApiState, mut rx: broadcast::Receiver<Event>) {
    let snapshot = StreamMessage::Snapshot {
        status: state.status().await,
        resources: Box::new(state.resources.borrow().clone()),
    };
    if send_json(&mut socket, &snapshot).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            // Events first: at shutdown the daemon publishes `stopping` just before it cancels,
            // and a watcher must see it.
            biased;
            event = rx.recv() => {
                let message = match event {
                    Ok(event) => StreamMessage::Event(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => StreamMessage::Lagged { missed },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if send_json(&mut socket, &message).await.is_err() {
                    return;
                }
            }
            () = state.shutdown.cancelled() => {
                // Flush what was published before the cancellation, then close.
                while let Ok(event) = rx.try_recv() {
                    if send_json(&mut socket, &StreamMessage::Event(event)).await.is_err() {
                        return;
                    }
                }
                break;
            }
            incoming = socket.recv() => match incoming {
                // Clients have nothing to say yet; pings are answered by the library.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn send_json(socket: &mut WebSocket, value: &impl Serialize) -> Result<(), axum::Error> {
    let text = serde_json::to_string(value).map_err(axum::Error::new)?;
    socket.send(Message::Text(text.into())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages_are_flat_objects_tagged_by_type() {
        let cases = [
            (StreamMessage::Lagged { missed: 3 }, serde_json::json!({"type": "lagged", "missed": 3})),
            (
                StreamMessage::Event(Event::StateChanged { state: AgentState::Stopping }),
                serde_json::json!({"type": "state_changed", "state": "stopping"}),
            ),
        ];
        for (message, json) in cases {
            assert_eq!(serde_json::to_value(&message).unwrap(), json);
            assert_eq!(serde_json::from_value::<StreamMessage>(json).unwrap(), message);
        }
    }
}
