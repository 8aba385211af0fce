//! The API's own extractors: [`Body`], [`Path`] and [`Query`] wrap axum's, so that a request the
//! API cannot read is answered like every other error, with an [`ErrorBody`](super::ErrorBody) and a 4xx, instead of
//! axum's plain-text rejection.
//!
//! Every handler that takes a JSON body, a path parameter or a query string uses these. A body
//! is refused whole when its `Content-Type` is not JSON (415), when it is not JSON (400), when it
//! does not have the request type's shape, names a field the type does not have, or carries a
//! value of the wrong type (422, the message names the field), or when it is larger than
//! [`MAX_BODY_BYTES`] (413). Nothing in a handler runs before its extractors succeed, so a refused
//! request changes nothing.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The largest request body the API reads. Every request type is a few fields; a policy file
/// is the longest, and far below this.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// A JSON request body of type `T`; refused with an [`ErrorBody`](super::ErrorBody) when it cannot be read.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(body_error(&rejection)),
        }
    }
}

/// Path parameters of type `T`; a parameter that does not parse (an unknown log stream, say) is a
/// 400 with an [`ErrorBody`](super::ErrorBody).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_error(&rejection)),
        }
    }
}

/// A query string of type `T`; one that does not parse (`?offset=-1`) is a 400 with an
/// [`ErrorBody`](super::ErrorBody).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_error(&rejection)),
        }
    }
}

/// What serde (through `serde_path_to_error`, so with the field's path) said, without axum's
/// generic preamble.
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    error.source().map_or_else(|| error.to_string(), ToString::to_string)
}

fn body_error(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON, with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(error) => {
            ApiError::bad_request("invalid_json", &format!("the body is not valid JSON: {}", cause(error)))
        }
        JsonRejection::JsonDataError(error) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            &format!("the body does not fit this request: {}", cause(error)),
        ),
        JsonRejection::BytesRejection(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the body is larger than the API reads ({MAX_BODY_BYTES} bytes)"),
            )
        }
        JsonRejection::BytesRejection(error) => {
            ApiError::bad_request("invalid_body", &format!("the body could not be read: {}", cause(error)))
        }
        // Not a client's mistake, and `#[non_exhaustive]`: said as what axum says.
        other => ApiError::new(other.status(), "invalid_body", &other.body_text()),
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(error) if error.status().is_client_error() => {
            ApiError::bad_request(
                "invalid_path",
                &format!("this path does not name anything: {}", cause(error)),
            )
        }
        // A route whose parameters do not fit its handler: this code's mistake, not the client's.
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", &other.body_text()),
    }
}

fn query_error(rejection: &QueryRejection) -> ApiError {
    match rejection {
        QueryRejection::FailedToDeserializeQueryString(error) => ApiError::bad_request(
            "invalid_query",
            &format!("the query string is not valid: {}", cause(error)),
        ),
        other => ApiError::new(other.status(), "invalid_query", &other.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body as HttpBody;
    use axum::http::header::CONTENT_TYPE;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Pause {
        for_seconds: Option<u64>,
    }

    fn request(content_type: Option<&str>, body: impl Into<HttpBody>) -> Request {
        let mut builder = Request::builder().method("POST").uri("/x");
        if let Some(content_type) = content_type {
            builder = builder.header(CONTENT_TYPE, content_type);
        }
        builder.body(body.into()).unwrap()
    }

    async fn extract(content_type: Option<&str>, body: &str) -> Result<Pause, ApiError> {
        Body::<Pause>::from_request(request(content_type, body.to_owned()), &()).await.map(|Body(v)| v)
    }

    #[tokio::test]
    async fn every_unreadable_body_is_an_error_body_with_a_4xx() {
        let json = Some("application/json");
        let cases: [(Option<&str>, &str, StatusCode, &str, &str); 8] = [
            (
                None,
                r#"{"for_seconds": 5}"#,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "JSON",
            ),
            (
                Some("text/plain"),
                r#"{}"#,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "JSON",
            ),
            (json, "{", StatusCode::BAD_REQUEST, "invalid_json", "EOF"),
            (json, "{for_seconds: 5}", StatusCode::BAD_REQUEST, "invalid_json", "key must be a string"),
            (
                json,
                r#"{"for": "banana"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "unknown field `for`",
            ),
            (
                json,
                r#"{"for_seconds": "banana"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "for_seconds: invalid type",
            ),
            (json, r#"{"for_seconds": -1}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", "for_seconds"),
            (json, "[]", StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", "expected struct"),
        ];
        for (content_type, body, status, code, says) in cases {
            let error = extract(content_type, body).await.unwrap_err();
            assert_eq!(error.status(), status, "{body}");
            assert_eq!(error.body().code, code, "{body}");
            assert!(error.body().message.contains(says), "{body}: {:?}", error.body().message);
            assert!(!error.body().message.contains('\n'), "one line: {:?}", error.body().message);
        }
        assert_eq!(extract(json, r#"{"for_seconds": 5}"#).await.unwrap(), Pause { for_seconds: Some(5) });
        assert_eq!(extract(json, "{}").await.unwrap(), Pause { for_seconds: None });
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let body = format!(r#"{{"for_seconds": 5, "pad": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        // axum's own limit is the same size; the router sets it explicitly to MAX_BODY_BYTES.
        let error = extract(Some("application/json"), &body).await.unwrap_err();
        assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error.body().code, "body_too_large");
    }

    #[tokio::test]
    async fn an_unparsable_path_or_query_is_400() {
        #[derive(Debug, Deserialize)]
        struct Offset {
            #[expect(dead_code, reason = "only whether it parses matters here")]
            offset: u64,
        }
        let mut parts = Request::builder().uri("/x?offset=-1").body(()).unwrap().into_parts().0;
        let error = Query::<Offset>::from_request_parts(&mut parts, &()).await.unwrap_err();
        assert_eq!((error.status(), error.body().code.as_str()), (StatusCode::BAD_REQUEST, "invalid_query"));
        assert!(error.body().message.contains("offset"), "{:?}", error.body().message);
    }
}
