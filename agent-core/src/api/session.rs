//! Browser sessions: a one-time login code, minted by `hearth ui` with the bearer token, is
//! exchanged for an HttpOnly, `SameSite=Strict` session cookie that the API and the event stream
//! accept alongside the token. The token itself never reaches the browser.
//!
//! [`Sessions`] owns the outstanding codes and the open sessions, in memory only: a daemon
//! restart signs every browser out (run `hearth ui` again). Both are bounded, and both are kept
//! as SHA-256 digests of the secrets, so a lookup's timing says nothing about a secret and the
//! secrets themselves are never held after they are handed out. Time is passed in, so the rules
//! are tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::Query;
use crate::clock::{self, unix_now};
pub use hearth_api::status::LoginLink;

/// How long a login code may wait to be used.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);

/// How long a session lasts without a request; each request moves it on.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 60 * 60);

/// The most codes waiting at once; a new one pushes out the oldest.
const MAX_CODES: usize = 16;

/// The most sessions open at once; a new one ends the least recently used.
const MAX_SESSIONS: usize = 64;

/// Random bytes in a code or a session id, sent as lowercase hex.
const SECRET_BYTES: usize = 32;

/// Where a browser lands once signed in. The web UI will live at `/`; until it does, the
/// agent's status is what there is to see.
const AFTER_LOGIN: &str = "/api/v1/status";

/// The path of the login link.
pub(super) const LOGIN_PATH: &str = "/login";

/// The SHA-256 of a secret, the only form in which it is kept.
type Digest = [u8; 32];

#[derive(Debug, Default)]
struct Secrets {
    /// Outstanding codes and when each stops working.
    codes: HashMap<Digest, i64>,
    /// Open sessions and when each ends unless used.
    sessions: HashMap<Digest, i64>,
}

/// The codes and sessions of one daemon run. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Sessions {
    state: Mutex<Secrets>,
}

/// Why a login code was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Never issued, or already used.
    #[error("this login link is not valid or was already used; run `hearth ui` for a new one")]
    Unknown,
    /// Issued, but not used in time.
    #[error("this login link has expired (links work for a minute); run `hearth ui` for a new one")]
    Expired,
    /// The system has no randomness to make a session with.
    #[error("no randomness to make a session with")]
    NoRandomness,
}

impl Sessions {
    /// A fresh code, valid for [`CODE_LIFETIME`] from `now`, and when it expires.
    pub fn issue_code(&self, now: i64) -> Result<(String, i64), LoginError> {
        let code = secret()?;
        let expires_at = clock::after(now, CODE_LIFETIME);
        let mut state = self.lock();
        state.codes.retain(|_, expires| *expires > now);
        evict_oldest(&mut state.codes, MAX_CODES);
        state.codes.insert(digest(&code), expires_at);
        Ok((code, expires_at))
    }

    /// Takes `code` (it never works again, whatever the outcome) and opens a session for it.
    pub fn redeem(&self, code: &str, now: i64) -> Result<String, LoginError> {
        let mut state = self.lock();
        let expires_at = state.codes.remove(&digest(code)).ok_or(LoginError::Unknown)?;
        if expires_at <= now {
            return Err(LoginError::Expired);
        }
        let session = secret()?;
        state.sessions.retain(|_, ends| *ends > now);
        evict_oldest(&mut state.sessions, MAX_SESSIONS);
        state.sessions.insert(digest(&session), clock::after(now, SESSION_IDLE));
        Ok(session)
    }

    /// Whether `session` is open at `now`; if so, it lasts another [`SESSION_IDLE`].
    pub fn touch(&self, session: &str, now: i64) -> bool {
        let mut state = self.lock();
        let key = digest(session);
        match state.sessions.get_mut(&key) {
            Some(ends) if *ends > now => {
                *ends = clock::after(now, SESSION_IDLE);
                true
            }
            Some(_) => {
                state.sessions.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Ends `session`; false if it was not open.
    pub fn end(&self, session: &str) -> bool {
        self.lock().sessions.remove(&digest(session)).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Secrets> {
        // Nothing panics while holding the lock; if something did, the maps are still whole.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes the entries that end soonest until there is room for one more under `max`.
fn evict_oldest(map: &mut HashMap<Digest, i64>, max: usize) {
    while map.len() >= max {
        let Some(first) = map.iter().min_by_key(|(_, ends)| **ends).map(|(key, _)| *key) else { return };
        map.remove(&first);
    }
}

fn secret() -> Result<String, LoginError> {
    crate::proto::random_secret(SECRET_BYTES).ok_or(LoginError::NoRandomness)
}

fn digest(secret: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref());
    out
}

/// The name of this agent's session cookie. Browsers keep cookies per host, not per port, so the
/// port is part of the name: two agents on one machine each keep their own session.
pub(super) fn cookie_name(port: u16) -> String {
    format!("hearth_session_{port}")
}

/// The value of cookie `name` in the request's `Cookie` headers, if any.
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// What `GET /login` takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginQuery {
    /// The one-time code of a login link.
    code: String,
}

/// Makes a one-time login link for a browser on this machine (`hearth ui`).
#[utoipa::path(post, path = "/api/v1/login-links", responses(
    (status = 201, body = LoginLink),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn create_link(
    State(state): State<ApiState>,
) -> Result<(StatusCode, Json<LoginLink>), ApiError> {
    let (code, expires_at) = state.sessions.issue_code(unix_now()).map_err(ApiError::from)?;
    let url = format!("http://127.0.0.1:{}{LOGIN_PATH}?code={code}", state.port);
    Ok((StatusCode::CREATED, Json(LoginLink { url, expires_at })))
}

/// Exchanges a login link's code for a session cookie and sends the browser on. Needs no token:
/// the code is the credential, and it works once.
#[utoipa::path(get, path = "/login", params(LoginQuery), security(()), responses(
    (status = 303, description = "Signed in: the session cookie is set and the browser sent on"),
    (status = 401, description = "The code is not valid, was used, or expired", body = ErrorBody),
    (status = 403, body = ErrorBody)
))]
pub(super) async fn login(State(state): State<ApiState>, Query(query): Query<LoginQuery>) -> Response {
    let session = match state.sessions.redeem(&query.code, unix_now()) {
        Ok(session) => session,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let cookie = format!(
        "{}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        cookie_name(state.port),
        SESSION_IDLE.as_secs()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie), (header::LOCATION, HeaderValue::from_static(AFTER_LOGIN))],
        )
            .into_response(),
        Err(_) => ApiError::internal("internal", "the session cookie could not be made").into_response(),
    }
}

/// Signs this browser out: its session ends and its cookie is cleared.
#[utoipa::path(delete, path = "/api/v1/session", responses(
    (status = 200, description = "Signed out (the body is `null`)"),
    (status = 400, description = "The request did not come with a session cookie", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let name = cookie_name(state.port);
    let Some(session) = cookie(&headers, &name) else {
        return ApiError::bad_request("no_session", "this request came with no session cookie to end")
            .into_response();
    };
    state.sessions.end(session);
    let clear = format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    match HeaderValue::from_str(&clear) {
        Ok(clear) => ([(header::SET_COOKIE, clear)], Json(())).into_response(),
        Err(_) => ApiError::internal("internal", "the session cookie could not be cleared").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_code_works_once_and_only_within_its_minute() {
        let sessions = Sessions::default();
        let (code, expires_at) = sessions.issue_code(NOW).unwrap();
        assert_eq!(expires_at, NOW + 60);
        let session = sessions.redeem(&code, NOW + 59).unwrap();
        assert!(sessions.touch(&session, NOW + 59));
        assert_eq!(sessions.redeem(&code, NOW + 59), Err(LoginError::Unknown), "a second use");

        let (late, _) = sessions.issue_code(NOW).unwrap();
        assert_eq!(sessions.redeem(&late, NOW + 60), Err(LoginError::Expired));
        assert_eq!(sessions.redeem(&late, NOW + 1), Err(LoginError::Unknown), "an expired code is gone");
        assert_eq!(sessions.redeem("", NOW), Err(LoginError::Unknown));
        assert_eq!(sessions.redeem(&session, NOW), Err(LoginError::Unknown), "a session id is no code");
    }

    #[test]
    fn a_session_lasts_while_used_and_ends_when_ended() {
        let sessions = Sessions::default();
        let (code, _) = sessions.issue_code(NOW).unwrap();
        let session = sessions.redeem(&code, NOW).unwrap();
        let idle = SESSION_IDLE.as_secs() as i64;
        assert!(sessions.touch(&session, NOW + idle - 1));
        assert!(sessions.touch(&session, NOW + 2 * idle - 2), "each use moves the end on");
        assert!(!sessions.touch(&session, NOW + 4 * idle), "idle too long");
        assert!(!sessions.touch(&session, NOW), "and it stays ended");

        let (code, _) = sessions.issue_code(NOW).unwrap();
        let session = sessions.redeem(&code, NOW).unwrap();
        assert!(!sessions.touch(&code, NOW), "a code is no session");
        assert!(sessions.end(&session));
        assert!(!sessions.touch(&session, NOW));
        assert!(!sessions.end(&session));
    }

    #[test]
    fn codes_and_sessions_are_bounded() {
        let sessions = Sessions::default();
        let codes: Vec<String> =
            (0..MAX_CODES + 4).map(|i| sessions.issue_code(NOW + i as i64).unwrap().0).collect();
        assert_eq!(sessions.lock().codes.len(), MAX_CODES);
        assert_eq!(
            sessions.redeem(&codes[0], NOW + 30),
            Err(LoginError::Unknown),
            "the oldest was pushed out"
        );
        let newest = codes.last().unwrap();
        let first = sessions.redeem(newest, NOW + 30).unwrap();
        for i in 0..MAX_SESSIONS + 4 {
            let (code, _) = sessions.issue_code(NOW + 31 + i as i64).unwrap();
            sessions.redeem(&code, NOW + 31 + i as i64).unwrap();
        }
        assert_eq!(sessions.lock().sessions.len(), MAX_SESSIONS);
        assert!(!sessions.touch(&first, NOW + 200), "the least recently used was ended");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; hearth_session_7447=abc"));
        headers.append(header::COOKIE, HeaderValue::from_static("hearth_session_7448=def"));
        assert_eq!(cookie(&headers, &cookie_name(7447)), Some("abc"));
        assert_eq!(cookie(&headers, &cookie_name(7448)), Some("def"));
        assert_eq!(cookie(&headers, &cookie_name(7449)), None);
        assert_eq!(cookie(&headers, "hearth_session_744"), None);
    }
}
