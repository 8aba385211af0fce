//! Routes of request packages (`/api/v1/packages…`): several resources asked for in one request,
//! acquired in dependency order, their tasks run, their progress kept by request id; and the
//! reservations this agent holds for other agents' packages (`/api/v1/reservations`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Body, Path};
use crate::market::HeldReservation;
use crate::requests::RequestStatus;

/// A package to submit.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitPackage {
    /// The package file, as an absolute path on this machine.
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
}

/// Validates a request package, queues it and its tasks, and answers at once with the request
/// (its id); acquisition and the tasks go on in the background.
#[utoipa::path(post, path = "/api/v1/packages", request_body = SubmitPackage, responses(
    (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    (status = 422, description = "The body is not of this shape; the field is named", body = ErrorBody),
    (status = 201, body = RequestStatus),
    (status = 400, body = ErrorBody, description = "the package is invalid; `problems` lists every problem and nothing was queued"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn submit(
    State(state): State<ApiState>,
    Body(body): Body<SubmitPackage>,
) -> Result<(StatusCode, Json<RequestStatus>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.requests.submit(&body.path).await?)))
}

/// Every request package, oldest first.
#[utoipa::path(get, path = "/api/v1/packages", responses(
    (status = 200, body = Vec<RequestStatus>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn list(State(state): State<ApiState>) -> Json<Vec<RequestStatus>> {
    Json(state.requests.list())
}

/// One request package and its progress: its resources, its tasks, how many succeeded and
/// failed, and why.
#[utoipa::path(get, path = "/api/v1/packages/{id}", params(("id" = String, Path, description = "The request's id")), responses(
    (status = 200, body = RequestStatus),
    (status = 404, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<RequestStatus>, ApiError> {
    Ok(Json(state.requests.get(&id)?))
}

/// The resources this agent holds now for other agents' request packages.
#[utoipa::path(get, path = "/api/v1/reservations", responses(
    (status = 200, body = Vec<HeldReservation>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn reservations(State(state): State<ApiState>) -> Json<Vec<HeldReservation>> {
    Json(state.market.reservations())
}
