//! The API's error body: a stable machine-readable `code` and a human `message`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use hearth_api::error::ErrorBody;

use super::session::LoginError;
use crate::availability::{OwnerError, PolicyError};
use crate::jobs::SupervisorError;
use crate::ledger::LedgerError;
use crate::market::MarketError;
use crate::net::ConnectError;
use crate::packages::{PackageError, RequestError};
use crate::transfer::{StoreError, TransferError};

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: &str) -> Self {
        Self {
            status,
            body: ErrorBody { code: code.to_owned(), message: message.to_owned(), problems: Vec::new() },
        }
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (it is in api.token in the agent's data dir), or no open browser session (run `hearth ui`)",
        )
    }

    pub(crate) fn forbidden_host() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "the Host header must name this machine's loopback address and the API's port",
        )
    }

    pub(crate) fn forbidden_origin() -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden_origin", "requests from other origins are refused")
    }

    pub(crate) fn missing_origin() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "a browser session's changes must come from this agent's own pages (no Origin was sent)",
        )
    }

    pub(crate) fn conflict(code: &str, message: &str) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub(crate) fn bad_request(code: &str, message: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn with_status(status: StatusCode, code: &str, message: &str) -> Self {
        Self::new(status, code, message)
    }

    pub(crate) fn internal(code: &str, message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }

    /// The stable error code.
    #[cfg(test)]
    pub(crate) fn code(&self) -> &str {
        &self.body.code
    }

    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// A value the client sent is outside what the API accepts; nothing was changed.
    pub(crate) fn out_of_range(message: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "out_of_range", message)
    }

    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    #[cfg(test)]
    pub(crate) fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl From<SupervisorError> for ApiError {
    fn from(error: SupervisorError) -> Self {
        let message = error.to_string();
        let (status, code) = match &error {
            SupervisorError::Spec(_) | SupervisorError::Unsupported(_) => {
                (StatusCode::BAD_REQUEST, "invalid_spec")
            }
            SupervisorError::NotFound(_) => (StatusCode::NOT_FOUND, "job_not_found"),
            SupervisorError::Conflict { .. } => (StatusCode::CONFLICT, "job_state_conflict"),
            SupervisorError::Store(_) | SupervisorError::Control { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "job_control_failed")
            }
        };
        Self::new(status, code, &message)
    }
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        let (status, code) = match error {
            LoginError::Unknown => (StatusCode::UNAUTHORIZED, "invalid_login_code"),
            LoginError::Expired => (StatusCode::UNAUTHORIZED, "expired_login_code"),
            LoginError::NoRandomness => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, &error.to_string())
    }
}

impl From<PolicyError> for ApiError {
    fn from(error: PolicyError) -> Self {
        match &error {
            PolicyError::Invalid { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_policy", &error.to_string())
            }
            PolicyError::Io { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "policy_not_saved", &error.to_string())
            }
            PolicyError::Read(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "policy_unreadable", &error.to_string())
            }
        }
    }
}

impl From<ConnectError> for ApiError {
    fn from(error: ConnectError) -> Self {
        let (status, code) = match &error {
            ConnectError::BadTarget(_) | ConnectError::Itself(_) => (StatusCode::BAD_REQUEST, "invalid_peer"),
            ConnectError::Unreachable { .. } => (StatusCode::GATEWAY_TIMEOUT, "peer_unreachable"),
            ConnectError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        };
        Self::new(status, code, &error.to_string())
    }
}

impl From<TransferError> for ApiError {
    fn from(error: TransferError) -> Self {
        let (status, code) = match &error {
            TransferError::BadPeer(_) | TransferError::Itself => (StatusCode::BAD_REQUEST, "invalid_peer"),
            TransferError::NoSuchFetch(_) => (StatusCode::NOT_FOUND, "transfer_not_found"),
            TransferError::Ended(_) => (StatusCode::CONFLICT, "transfer_ended"),
            TransferError::Blobs(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                (StatusCode::BAD_REQUEST, "path_not_found")
            }
            TransferError::Blobs(StoreError::Missing(_)) => (StatusCode::NOT_FOUND, "blob_not_found"),
            TransferError::Blobs(StoreError::BadManifest(_) | StoreError::Occupied(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_blob")
            }
            TransferError::Blobs(_) | TransferError::Db(_) | TransferError::Registered => {
                (StatusCode::INTERNAL_SERVER_ERROR, "transfer_failed")
            }
        };
        Self::new(status, code, &error.to_string())
    }
}

impl From<MarketError> for ApiError {
    fn from(error: MarketError) -> Self {
        let message = error.to_string();
        let (status, code) = match error {
            MarketError::Transfer(error) => return Self::from(error),
            MarketError::Spec(_) => (StatusCode::BAD_REQUEST, "invalid_spec"),
            MarketError::NotFound(_) => (StatusCode::NOT_FOUND, "job_not_found"),
            MarketError::Conflict(_) => (StatusCode::CONFLICT, "job_state_conflict"),
            MarketError::Provider(_) => (StatusCode::BAD_GATEWAY, "provider_failed"),
            MarketError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "not_saved"),
            MarketError::Ledger(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ledger_failed"),
        };
        Self::new(status, code, &message)
    }
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let message = error.to_string();
        match error {
            RequestError::Package(PackageError::Invalid { problems, .. }) => {
                let mut error = Self::new(StatusCode::BAD_REQUEST, "invalid_package", &message);
                error.body.problems = problems.iter().map(ToString::to_string).collect();
                error
            }
            RequestError::Package(_) => Self::new(StatusCode::BAD_REQUEST, "invalid_package", &message),
            RequestError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "request_not_found", &message),
            RequestError::Store(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &message),
            RequestError::Internal(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", &message),
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "ledger_failed", &error.to_string())
    }
}

impl From<OwnerError> for ApiError {
    fn from(error: OwnerError) -> Self {
        match &error {
            OwnerError::PauseTooLong(_) | OwnerError::IdleTooLong(_) => {
                Self::out_of_range(&error.to_string())
            }
            OwnerError::Io(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &error.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
