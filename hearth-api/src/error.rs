//! The body of every error the API answers.

use serde::{Deserialize, Serialize};

/// An error as the API returns it, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable identifier for scripts, such as `unauthorized`.
    pub code: String,
    /// One line for people.
    pub message: String,
    /// Every problem found, when the input had several (an invalid request package).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}
