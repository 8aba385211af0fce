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
use crate::net::negotiate::Signed;
use hearth_api::ledger::{SignedDocument, WitnessAnswer, Witnesses};
use libp2p_identity::PeerId;

/// Verifies this agent's ledger: every row's hash and link, every signature in it, and the
/// checkpoints of it that the agents it dealt with hold (each is asked).
#[utoipa::path(get, path = "/api/v1/ledger/verify", responses(
    (status = 200, body = Report, description = "the verdict; `broken` names the first bad row"),
    (status = 500, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn verify(State(state): State<ApiState>) -> Result<Json<Report>, ApiError> {
    let witnesses = state.market.witnesses(None).await;
    Ok(Json(state.ledger.verify(witnesses).await?))
}

/// Whose checkpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct WitnessesQuery {
    /// One peer's alone: the checkpoint it holds of this ledger and the ones held of its ledger.
    peer: Option<String>,
}

/// The checkpoints that pin ledgers, both ways: what each agent this one made agreements with
/// holds of this agent's ledger (each is asked now), and what this agent holds of theirs.
#[utoipa::path(get, path = "/api/v1/ledger/witnesses", params(WitnessesQuery), responses(
    (status = 200, body = Witnesses),
    (status = 400, body = ErrorBody, description = "`peer` is not a peer id"),
    (status = 500, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn witnesses(
    State(state): State<ApiState>,
    Query(query): Query<WitnessesQuery>,
) -> Result<Json<Witnesses>, ApiError> {
    let peer = match &query.peer {
        Some(text) => Some(text.parse::<PeerId>().map_err(|_| {
            ApiError::bad_request("bad_peer", &format!("{text:?} is not a peer id (12D3KooW…)"))
        })?),
        None => None,
    };
    let answers = state.market.witnesses(query.peer.as_deref()).await;
    let of_this_ledger =
        answers.into_iter().map(|(witness, answer)| witness_answer(witness, answer)).collect();
    let held = state.ledger.held(peer.as_ref()).await?;
    Ok(Json(Witnesses { owner: state.run.peer_id.clone().into(), of_this_ledger, held }))
}

/// One counterparty's answer as the API shows it.
fn witness_answer(witness: String, answer: Result<Option<Signed>, String>) -> WitnessAnswer {
    let (checkpoint, error) = match answer {
        Ok(checkpoint) => (checkpoint.map(|c| SignedDocument { body: c.body, signature: c.signature }), None),
        Err(error) => (None, Some(error)),
    };
    WitnessAnswer { witness: witness.into(), checkpoint, error }
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
