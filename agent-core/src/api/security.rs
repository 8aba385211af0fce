//! The gate in front of every route: Host, Origin, then the bearer token or a browser session.
//!
//! The Host check defeats DNS rebinding (a page on `evil.example` whose name later resolves to
//! 127.0.0.1), the Origin check stops other sites' pages, including their WebSocket upgrades, from
//! driving the API through the owner's browser, and the token proves the caller can read the
//! owner's files. A browser proves it with a session cookie instead (see [`super::session`]);
//! such a request must also name this agent as its Origin unless it is a plain read (GET or HEAD
//! without an upgrade), which the cookie's `SameSite=Strict` already keeps to this agent's own
//! pages. The login link's route needs neither: its one-time code is the credential. Host and
//! Origin failures are 403; a missing or wrong credential is 401.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::ApiState;
use super::error::ApiError;
use super::session::{LOGIN_PATH, cookie, cookie_name};
use crate::clock::unix_now;

/// Host names that denote this machine's loopback interface.
const LOOPBACK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "[::1]"];

/// Rejects the request unless Host, Origin and token all check out.
pub(super) async fn gate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    // A request line in absolute form (`GET http://elsewhere/…`) names its own authority, which
    // then counts instead of Host: it must be this API's as much as Host must.
    if let Some(authority) = request.uri().authority()
        && !is_loopback_authority(authority.as_str(), state.port)
    {
        return axum::response::IntoResponse::into_response(ApiError::forbidden_host());
    }
    match check(&state, request.method(), request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

fn check(state: &ApiState, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let port = state.port;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !is_loopback_authority(host, port) {
        return Err(ApiError::forbidden_host());
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|authority| is_loopback_authority(authority, port));
        if !own {
            return Err(ApiError::forbidden_origin());
        }
    }
    if path == LOGIN_PATH {
        return Ok(());
    }
    if let Some(authorization) = headers.get(header::AUTHORIZATION) {
        let presented = authorization.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
        return match !presented.is_empty() && state.token.matches(presented) {
            true => Ok(()),
            false => Err(ApiError::unauthorized()),
        };
    }
    let Some(session) = cookie(headers, &cookie_name(port)) else {
        return Err(ApiError::unauthorized());
    };
    if !state.sessions.touch(session, unix_now()) {
        return Err(ApiError::unauthorized());
    }
    // A present Origin was checked above; a session may only go without one for plain reads.
    let plain_read =
        (method == Method::GET || method == Method::HEAD) && !headers.contains_key(header::UPGRADE);
    if !plain_read && !headers.contains_key(header::ORIGIN) {
        return Err(ApiError::missing_origin());
    }
    Ok(())
}

/// True for `127.0.0.1:PORT`, `localhost:PORT` or `[::1]:PORT` with exactly our port.
fn is_loopback_authority(authority: &str, port: u16) -> bool {
    let Some((host, given_port)) = authority.rsplit_once(':') else {
        return false;
    };
    given_port.parse::<u16>().is_ok_and(|p| p == port)
        && LOOPBACK_HOSTS.iter().any(|h| h.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_with_our_port_pass() {
        let table = [
            ("127.0.0.1:7447", true),
            ("localhost:7447", true),
            ("LOCALHOST:7447", true),
            ("[::1]:7447", true),
            ("127.0.0.1:7448", false),
            ("127.0.0.1", false),
            ("", false),
            ("evil.example:7447", false),
            ("localhost.evil.com:7447", false),
            ("127.0.0.1.nip.io:7447", false),
            ("[::1]", false),
            ("::1:7447", false),
            ("127.0.0.1:7447:7447", false),
            ("user@127.0.0.1:7447", false),
        ];
        for (authority, expected) in table {
            assert_eq!(is_loopback_authority(authority, 7447), expected, "{authority:?}");
        }
    }
}
