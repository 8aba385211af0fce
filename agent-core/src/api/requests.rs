//! Routes of remote jobs: jobs this agent asks other agents to run (`hearth submit`). They live
//! under `/api/v1/requests`, beside `/api/v1/jobs` (the jobs this agent runs itself).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::error::{ApiError, ErrorBody};
use serde::Deserialize;

use super::extract::{Body, Path, Query};
use super::{ApiState, LogChunk, ResultsRequest, SubmitJob};
use crate::jobs::Stream;
use crate::market::RemoteJob;
use crate::store::OwnerNotice;
use crate::transfer::Imported;

/// Finds a provider for a job spec and runs it there; answers at once with the remote job, whose
/// id is the request's.
#[utoipa::path(post, path = "/api/v1/requests", request_body = SubmitJob, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 201, body = RemoteJob),
    (status = 400, body = ErrorBody, description = "the spec is invalid; nothing was sent"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn submit(
    State(state): State<ApiState>,
    Body(body): Body<SubmitJob>,
) -> Result<(StatusCode, Json<RemoteJob>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.market.submit(&body.spec).await?)))
}

/// Every remote job, oldest first.
#[utoipa::path(get, path = "/api/v1/requests", responses(
    (status = 200, body = Vec<RemoteJob>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn list(State(state): State<ApiState>) -> Json<Vec<RemoteJob>> {
    Json(state.market.remote_jobs())
}

/// One remote job.
#[utoipa::path(get, path = "/api/v1/requests/{id}", params(("id" = String, Path, description = "The request's id")), responses(
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
#[utoipa::path(post, path = "/api/v1/requests/{id}/cancel", params(("id" = String, Path, description = "The request's id")), responses(
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
#[utoipa::path(get, path = "/api/v1/requests/{id}/logs/{stream}", params(
    ("id" = String, Path, description = "The request's id"),
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

/// Writes an ended remote job's outputs, fetched from its provider, into `out`.
#[utoipa::path(post, path = "/api/v1/requests/{id}/results", params(("id" = String, Path, description = "The request's id")),
    request_body = ResultsRequest, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 200, body = Imported),
    (status = 400, description = "`out` is missing or not an empty folder", body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "the job has not ended or its outputs are not here", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn results(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body<ResultsRequest>,
) -> Result<Json<Imported>, ApiError> {
    let Some(out) = body.out else {
        return Err(ApiError::bad_request(
            "missing_out",
            "name the folder to write the outputs into (`out`)",
        ));
    };
    Ok(Json(state.market.results(&id, out).await?))
}

/// The signed notices the provider of a remote job sent about it, oldest first: each state the
/// provider put the job in (`kind`) and why (`reason`, empty when it gave none), as it said them.
#[utoipa::path(get, path = "/api/v1/requests/{id}/notices", params(("id" = String, Path, description = "The request's id")), responses(
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
