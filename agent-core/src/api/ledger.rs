//! Routes of the ledger: verification (with the checkpoints other agents hold of it) and
//! earnings. Exports read the store file directly (`hearth ledger export`), so they work without
//! a daemon and never pass through memory whole.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::Query;
use crate::ledger::earnings::{Earnings, Period};
use crate::ledger::verify::Report;

/// Verifies this agent's ledger: every row's hash and link, every signature in it, and the
/// checkpoints of it that the agents it dealt with hold (each is asked).
#[utoipa::path(get, path = "/api/v1/ledger/verify", responses(
    (status = 200, body = Report, description = "the verdict; `broken` names the first bad row"),
    (status = 500, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn verify(State(state): State<ApiState>) -> Result<Json<Report>, ApiError> {
    let witnesses = state.market.witnesses().await;
    Ok(Json(state.ledger.verify(witnesses).await?))
}

/// How earnings are grouped.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct EarningsQuery {
    /// `day`, `week` or `month`; all together when absent.
    by: Option<Period>,
}

/// Credits earned as a provider and spent as a consumer, from the countersigned receipts.
#[utoipa::path(get, path = "/api/v1/earnings", params(EarningsQuery), responses(
    (status = 200, body = Earnings),
    (status = 500, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn earnings(
    State(state): State<ApiState>,
    Query(query): Query<EarningsQuery>,
) -> Result<Json<Earnings>, ApiError> {
    Ok(Json(state.ledger.earnings(query.by).await?))
}
