//! Routes of remote jobs: jobs this agent asks other agents to run (`hearth submit`). They live
//! under `/api/v1/remote-jobs`, beside `/api/v1/jobs` (the jobs this agent runs itself).
//! `/api/v1/requests…`, their name before, stays as an alias of each (see [`aliases`]).

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::routing::{get as on_get, post as on_post};
use axum::{Json, Router};
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{Path, Query};
use super::upload::{self, Entry, SpecUpload};
use super::{ApiState, LogChunk, uploading_body};
use crate::jobs::Stream;
use crate::market::RemoteJob;
use crate::transfer::Imported;
use hearth_api::jobs::OwnerNotice;

/// Finds a provider for a job spec and runs it there; answers at once with the remote job, whose
/// id is the request's. The spec comes with its files, by content (see `SpecUpload`); they go
/// into the blob store before this answers, and the staged copy is removed.
#[utoipa::path(post, path = "/api/v1/remote-jobs",
    request_body(content = SpecUpload, content_type = "multipart/form-data"), responses(
    (status = 201, body = RemoteJob),
    (status = 400, body = ErrorBody, description = "the spec is invalid, an upload name is unsafe or a spec names a file that was not uploaded; nothing was sent and nothing is kept"),
    (status = 413, body = ErrorBody, description = "the upload is over a limit, which the message names"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn submit(
    State(state): State<ApiState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<RemoteJob>), ApiError> {
    let staged = upload::receive(&state.uploads, state.upload_limits, Entry::Spec, multipart).await?.staged;
    let job = state.market.submit_staged(&staged).await;
    // The files are in the blob store (or the job was refused): the staged copy can go.
    let _ = tokio::task::spawn_blocking(move || drop(staged)).await;
    Ok((StatusCode::CREATED, Json(job?)))
}

/// Every remote job, oldest first.
#[utoipa::path(get, path = "/api/v1/remote-jobs", responses(
    (status = 200, body = Vec<RemoteJob>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn list(State(state): State<ApiState>) -> Json<Vec<RemoteJob>> {
    Json(state.market.remote_jobs())
}

/// One remote job.
#[utoipa::path(get, path = "/api/v1/remote-jobs/{id}", params(("id" = String, Path, description = "The remote job's id")), responses(
    (status = 200, body = RemoteJob),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<RemoteJob>, ApiError> {
    Ok(Json(state.market.remote_job(&id)?))
}

/// Stops a remote job: withdraws its requests, or has its provider cancel it.
#[utoipa::path(post, path = "/api/v1/remote-jobs/{id}/cancel", params(("id" = String, Path, description = "The remote job's id")), responses(
    (status = 200, body = RemoteJob),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "it has ended"),
    (status = 502, body = ErrorBody, description = "the provider refused"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<RemoteJob>, ApiError> {
    Ok(Json(state.market.cancel(&id).await?))
}

/// Where to start reading a remote job's log, and whether to wait for more.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoteLogQuery {
    /// Byte offset into the log; 0 when absent.
    #[serde(default)]
    pub(super) offset: u64,
    /// When nothing is past `offset` yet and the job has not ended, hold the answer until there
    /// is (the provider is told to wait), at most 10 s; then it may be empty. False when absent.
    #[serde(default)]
    pub(super) wait: bool,
}

/// A remote job's stdout or stderr from a byte offset on, read from its provider; with `wait`,
/// the answer waits for more (a long poll: follow a job by asking again from `next_offset`).
#[utoipa::path(get, path = "/api/v1/remote-jobs/{id}/logs/{stream}", params(
    ("id" = String, Path, description = "The remote job's id"),
    ("stream" = Stream, Path, description = "stdout or stderr"),
    RemoteLogQuery
), responses(
    (status = 200, body = LogChunk),
    (status = 404, body = ErrorBody),
    (status = 502, body = ErrorBody, description = "the provider could not be asked"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn logs(
    State(state): State<ApiState>,
    Path((id, stream)): Path<(String, Stream)>,
    Query(query): Query<RemoteLogQuery>,
) -> Result<Json<LogChunk>, ApiError> {
    let (text, next_offset, finished) = state.market.logs(&id, stream, query.offset, query.wait).await?;
    Ok(Json(LogChunk { text, next_offset, finished }))
}

/// Answers an ended remote job's outputs, fetched from its provider, as a folder blob (its hash,
/// files and size); read them with `GET /api/v1/blobs/{hash}?folder=true`.
#[utoipa::path(post, path = "/api/v1/remote-jobs/{id}/results", params(("id" = String, Path, description = "The remote job's id")),
    responses(
    (status = 200, body = Imported),
    (status = 404, body = ErrorBody),
    (status = 409, description = "the job has not ended or its outputs are not here", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn results(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Imported>, ApiError> {
    Ok(Json(state.market.results(&id).await?))
}

/// The signed notices the provider of a remote job sent about it, oldest first: each state the
/// provider put the job in (`kind`) and why (`reason`, empty when it gave none), as it said them.
#[utoipa::path(get, path = "/api/v1/remote-jobs/{id}/notices", params(("id" = String, Path, description = "The remote job's id")), responses(
    (status = 200, body = Vec<OwnerNotice>),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn notices(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<OwnerNotice>>, ApiError> {
    Ok(Json(state.market.notices(&id).await?))
}

/// The routes under their old prefix, `/api/v1/requests`, answering exactly as the new ones do.
/// They are kept for scripts written against it and left out of the OpenAPI document.
pub(super) fn aliases() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/requests", on_get(list).post(submit).layer(uploading_body()))
        .route("/api/v1/requests/{id}", on_get(get))
        .route("/api/v1/requests/{id}/cancel", on_post(cancel))
        .route("/api/v1/requests/{id}/logs/{stream}", on_get(logs))
        .route("/api/v1/requests/{id}/results", on_post(results))
        .route("/api/v1/requests/{id}/notices", on_get(notices))
}
