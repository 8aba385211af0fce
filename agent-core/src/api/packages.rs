//! Routes of request packages (`/api/v1/packages…`): several resources asked for in one request,
//! acquired in dependency order, their tasks run, their progress kept by request id; and the
//! reservations this agent holds for other agents' packages (`/api/v1/reservations`).

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::Path;
use super::upload::{self, Entry, PackageUpload};
use crate::market::HeldReservation;
use crate::packages::RequestStatus;

/// Validates a request package, queues it and its tasks, and answers at once with the request
/// (its id); acquisition and the tasks go on in the background. The package comes with its task
/// specs and their files, by content (see `PackageUpload`); they are staged under the data dir
/// until the request ends, since each task's spec is read when the task starts.
#[utoipa::path(post, path = "/api/v1/packages",
    request_body(content = PackageUpload, content_type = "multipart/form-data"), responses(
    (status = 201, body = RequestStatus),
    (status = 400, body = ErrorBody, description = "the package is invalid (`problems` lists every problem), an upload name is unsafe or a file it names was not uploaded; nothing was queued and nothing is kept"),
    (status = 413, body = ErrorBody, description = "the upload is over a limit, which the message names"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn submit(
    State(state): State<ApiState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<RequestStatus>), ApiError> {
    let staged =
        upload::receive(&state.uploads, state.upload_limits, Entry::Package, multipart).await?.staged;
    Ok((StatusCode::CREATED, Json(state.packages.submit_staged(staged).await?)))
}

/// Every request package, oldest first.
#[utoipa::path(get, path = "/api/v1/packages", responses(
    (status = 200, body = Vec<RequestStatus>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn list(State(state): State<ApiState>) -> Json<Vec<RequestStatus>> {
    Json(state.packages.list())
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
    Ok(Json(state.packages.get(&id)?))
}

/// The resources this agent holds now for other agents' request packages.
#[utoipa::path(get, path = "/api/v1/reservations", responses(
    (status = 200, body = Vec<HeldReservation>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn reservations(State(state): State<ApiState>) -> Json<Vec<HeldReservation>> {
    Json(state.market.reservations())
}
