//! A client's mistakes against a real daemon, sent byte for byte: every one is a 4xx with the
//! documented `{code, message}` body, never a 500 or axum's plain text, and none changes anything
//! (the machine still shares after refused pauses; no job exists after refused submits).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, RawResponse, raw_http, raw_http_with_body};
use serde_json::Value;

/// The daemon's body limit (`hearth::api::MAX_BODY_BYTES`).
const MAX_BODY_BYTES: usize = 2 << 20;

/// Every route that takes a JSON body, with a body of the right shape for it.
const BODY_ROUTES: [(&str, &str, &str); 5] = [
    ("POST", "/api/v1/pause", r#"{"for_seconds": 60}"#),
    ("POST", "/api/v1/activity", r#"{"idle_seconds": 5}"#),
    ("POST", "/api/v1/peers", r#"{"target": "nobody"}"#),
    (
        "POST",
        "/api/v1/transfers",
        r#"{"peer": "nobody", "hash": "0000000000000000000000000000000000000000000000000000000000000000", "format": "raw"}"#,
    ),
    ("PUT", "/api/v1/policy", r#"{"toml": ""}"#),
];

/// The routes that take files by content, as `multipart/form-data`, with the JSON body that named
/// a path on the daemon's disk before.
const UPLOAD_ROUTES: [(&str, &str); 5] = [
    ("/api/v1/blobs", r#"{"path": "/etc/hostname"}"#),
    ("/api/v1/jobs", r#"{"spec": "/nonexistent.toml"}"#),
    ("/api/v1/remote-jobs", r#"{"spec": "/nonexistent.toml"}"#),
    ("/api/v1/requests", r#"{"spec": "/nonexistent.toml"}"#),
    ("/api/v1/packages", r#"{"path": "/nonexistent.toml"}"#),
];

struct Api {
    port: u16,
    headers: String,
}

impl Api {
    fn of(agent: &Agent) -> Result<Self> {
        let port = agent.port()?;
        let headers = format!("\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {}", agent.token()?);
        Ok(Self { port, headers })
    }

    fn send(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Result<RawResponse> {
        let content_type = content_type.map(|t| format!("\r\nContent-Type: {t}")).unwrap_or_default();
        raw_http_with_body(
            self.port,
            &format!("{method} {path} HTTP/1.1{}{content_type}", self.headers),
            body,
        )
    }

    fn json(&self, method: &str, path: &str, body: &str) -> Result<RawResponse> {
        self.send(method, path, Some("application/json"), body.as_bytes())
    }

    fn get(&self, path: &str) -> Result<Value> {
        let response = raw_http(self.port, &format!("GET {path} HTTP/1.1{}", self.headers))?;
        ensure!(response.status == 200, "GET {path}: {response:?}");
        serde_json::from_str(&response.body).with_context(|| format!("GET {path}: {}", response.body))
    }

    /// Nothing a refused request could have changed has changed.
    fn unchanged(&self, what: &str) -> Result<()> {
        let availability = self.get("/api/v1/availability")?;
        ensure!(availability["state"] == "sharing", "{what} changed the availability: {availability}");
        ensure!(self.get("/api/v1/jobs")?.as_array().is_some_and(Vec::is_empty), "{what} created a job");
        ensure!(
            self.get("/api/v1/remote-jobs")?.as_array().is_some_and(Vec::is_empty),
            "{what} sent a request"
        );
        ensure!(
            self.get("/api/v1/packages")?.as_array().is_some_and(Vec::is_empty),
            "{what} queued a package"
        );
        Ok(())
    }
}

/// `response` is `status` with an error body of `code` whose message contains `says`, one line.
fn refused(response: &RawResponse, status: u16, code: &str, says: &str, what: &str) -> Result<()> {
    ensure!(response.status == status, "{what}: expected {status}, got {response:?}");
    let body: Value =
        serde_json::from_str(&response.body).with_context(|| format!("{what}: {response:?}"))?;
    ensure!(body["code"] == code, "{what}: expected code {code}: {body}");
    let message = body["message"].as_str().with_context(|| format!("{what}: no message: {body}"))?;
    ensure!(message.contains(says), "{what}: the message does not say {says:?}: {message}");
    ensure!(!message.contains('\n'), "{what}: not one line: {message:?}");
    Ok(())
}

pub(crate) fn malformed_bodies_are_refused_with_an_error_body_and_change_nothing() -> Result<()> {
    let mut agent = Agent::start()?;
    let api = Api::of(&agent)?;
    api.unchanged("nothing")?;
    for (method, path, good) in BODY_ROUTES {
        let what = |case: &str| format!("{method} {path} {case}");
        let response = api.send(method, path, None, good.as_bytes())?;
        refused(&response, 415, "unsupported_media_type", "Content-Type", &what("without a content type"))?;
        let response = api.send(method, path, Some("text/plain"), good.as_bytes())?;
        refused(&response, 415, "unsupported_media_type", "application/json", &what("as text/plain"))?;
        refused(&api.json(method, path, "{")?, 400, "invalid_json", "not valid JSON", &what("cut short"))?;
        refused(&api.json(method, path, "not json")?, 400, "invalid_json", "line 1", &what("not JSON"))?;
        let unknown = format!("{}, \"banana\": 1}}", good.trim_end_matches('}'));
        refused(
            &api.json(method, path, &unknown)?,
            422,
            "invalid_body",
            "unknown field `banana`",
            &what("extra"),
        )?;
        refused(
            &api.json(method, path, r#""banana""#)?,
            422,
            "invalid_body",
            "invalid type",
            &what("a string"),
        )?;
        api.unchanged(&what("malformed"))?;
    }
    // Wrong types name the field.
    for (path, body, field) in [
        ("/api/v1/pause", r#"{"for_seconds": "banana"}"#, "for_seconds"),
        ("/api/v1/pause", r#"{"for_seconds": -1}"#, "for_seconds"),
        ("/api/v1/activity", r#"{"idle_seconds": 1.5}"#, "idle_seconds"),
    ] {
        refused(&api.json("POST", path, body)?, 422, "invalid_body", field, &format!("{path} {body}"))?;
    }
    // A route that takes files by content refuses a body naming a path of this machine.
    for (path, body) in UPLOAD_ROUTES {
        refused(&api.json("POST", path, body)?, 400, "invalid_upload", "multipart/form-data", path)?;
        refused(&api.send("POST", path, None, body.as_bytes())?, 400, "invalid_upload", "multipart", path)?;
    }
    api.unchanged("a path where files by content belong")?;
    // The issue's own case: a misspelt field used to pause until resumed.
    refused(
        &api.json("POST", "/api/v1/pause", r#"{"for": "banana"}"#)?,
        422,
        "invalid_body",
        "`for`",
        "for",
    )?;
    api.unchanged("a pause with a misspelt field")?;

    let big = format!(r#"{{"toml": "{}"}}"#, "#".repeat(MAX_BODY_BYTES));
    refused(&api.json("PUT", "/api/v1/policy", &big)?, 413, "body_too_large", "larger", "a huge policy")?;
    let policy = api.get("/api/v1/policy")?;
    ensure!(policy["policy"].is_object(), "the policy is still served: {policy}");
    api.unchanged("a huge body")?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn paths_and_queries_that_do_not_parse_are_400_with_an_error_body() -> Result<()> {
    let mut agent = Agent::start()?;
    let api = Api::of(&agent)?;
    for (method, path, code, says) in [
        ("GET", "/api/v1/jobs/X/logs/banana", "invalid_path", "banana"),
        ("GET", "/api/v1/remote-jobs/X/logs/banana", "invalid_path", "banana"),
        ("GET", "/api/v1/requests/X/logs/banana", "invalid_path", "banana"),
        ("POST", "/api/v1/jobs/X/banana", "invalid_path", "banana"),
        ("GET", "/api/v1/jobs/X/logs/stdout?offset=-1", "invalid_query", "offset"),
        ("GET", "/api/v1/jobs/X/logs/stdout?offset=banana", "invalid_query", "offset"),
        ("GET", "/api/v1/jobs/X/logs/stdout?offset=99999999999999999999999", "invalid_query", "offset"),
        ("GET", "/api/v1/remote-jobs/X/logs/stdout?offset=-1", "invalid_query", "offset"),
        ("GET", "/api/v1/earnings?by=year", "invalid_query", "year"),
        ("GET", "/api/v1/earnings?banana=1", "invalid_query", "banana"),
        ("GET", &format!("/api/v1/blobs/{}?folder=banana", "0".repeat(64)), "invalid_query", "folder"),
        ("GET", "/api/v1/events", "not_websocket", "WebSocket"),
    ] {
        let response = api.send(method, path, None, b"")?;
        refused(&response, 400, code, says, &format!("{method} {path}"))?;
    }
    // A route that does not take the method says so in the same shape.
    let response = api.send("DELETE", "/api/v1/status", None, b"")?;
    refused(&response, 405, "method_not_allowed", "method", "DELETE /api/v1/status")?;
    api.unchanged("unparsable paths")?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn values_out_of_range_are_refused_before_anything_changes() -> Result<()> {
    let mut agent = Agent::start()?;
    let api = Api::of(&agent)?;
    let ten_years_and_a_second = 10 * 365 * 24 * 60 * 60 + 1;
    for seconds in [ten_years_and_a_second, 9_999_999_999_999 * 86_400, u64::MAX] {
        let body = format!(r#"{{"for_seconds": {seconds}}}"#);
        refused(&api.json("POST", "/api/v1/pause", &body)?, 400, "out_of_range", "longer", &body)?;
        api.unchanged(&format!("a pause of {seconds} s"))?;
        ensure!(!agent.data_dir().join("owner-pause.json").exists(), "a pause of {seconds} s was saved");
    }
    for seconds in [ten_years_and_a_second, u64::MAX] {
        let body = format!(r#"{{"idle_seconds": {seconds}}}"#);
        refused(&api.json("POST", "/api/v1/activity", &body)?, 400, "out_of_range", "idle", &body)?;
    }
    // The CLI refuses it in one line, and pauses nothing.
    let out = agent.cli(&["pause", "--for", "9999999999999d"])?;
    ensure!(!out.status.success(), "a pause of 27 billion years succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.trim_end().lines().count() == 1 && stderr.starts_with("hearth: "), "{stderr:?}");
    ensure!(stderr.contains("longest pause"), "{stderr}");
    api.unchanged("hearth pause --for 9999999999999d")?;
    // The longest pause is still a pause.
    let longest =
        api.json("POST", "/api/v1/pause", &format!(r#"{{"for_seconds": {}}}"#, ten_years_and_a_second - 1))?;
    ensure!(longest.status == 200, "ten years: {longest:?}");
    // The pause is answered at once; the availability follows when the watcher has applied it.
    hearth_tests::eventually(Duration::from_secs(10), "the ten-year pause to take hold", || {
        Ok((api.get("/api/v1/availability")?["state"] == "paused").then_some(()))
    })?;
    ensure!(agent.terminate()?.success());
    Ok(())
}
