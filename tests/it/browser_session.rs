//! Browser sessions, as a browser meets them: `hearth ui` prints a one-time login link; opening it
//! sets an HttpOnly, SameSite=Strict cookie that the API and the event stream accept; the link
//! works once; foreign origins, a missing Origin on a change and a missing cookie are refused; a
//! refused change changes nothing; signing out ends the session.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use hearth_tests::{Agent, RawResponse, raw_http, raw_http_with_body};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

/// Sends one request with `headers` (each ending in CRLF) and `body` to the agent, and reads the
/// whole answer.
fn send(port: u16, method: &str, path: &str, headers: &str, body: &str) -> Result<RawResponse> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Type: application/json"
    );
    raw_http_with_body(port, &head, body.as_bytes())
}

fn header<'r>(response: &'r RawResponse, name: &str) -> Option<&'r str> {
    response.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A fresh login link from `hearth ui`, as the path and query to request.
fn login_path(agent: &Agent, port: u16) -> Result<String> {
    let out = agent.cli(&["ui", "--no-open"])?;
    ensure!(out.status.success(), "hearth ui failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout)?;
    let prefix = format!("http://127.0.0.1:{port}");
    let url = stdout.lines().find(|l| l.starts_with(&prefix)).context("no link printed")?;
    let path = url.strip_prefix(&prefix).context("prefix")?.to_owned();
    ensure!(path.starts_with("/login?code="), "{url}");
    Ok(path)
}

fn sharing(agent: &Agent) -> Result<bool> {
    let out = agent.cli(&["status", "--json"])?;
    Ok(hearth_tests::json_of(&out)?["state"] == "sharing")
}

pub(crate) fn a_login_link_signs_a_browser_in_once_and_the_cookie_opens_the_api_and_events() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let token = agent.token()?;
    let host = format!("\r\nHost: 127.0.0.1:{port}");
    let own_origin = format!("Origin: http://127.0.0.1:{port}\r\n");

    // A foreign page cannot spend a code, nor a rebinding name.
    let path = login_path(&agent, port)?;
    let foreign = raw_http(port, &format!("GET {path} HTTP/1.1{host}\r\nOrigin: http://evil.example"))?;
    ensure!(
        foreign.status == 403 && foreign.error_code().as_deref() == Some("forbidden_origin"),
        "{foreign:?}"
    );
    let rebound = raw_http(port, &format!("GET {path} HTTP/1.1\r\nHost: evil.example:{port}"))?;
    ensure!(rebound.status == 403, "{rebound:?}");

    // The link works once.
    let signed_in = raw_http(port, &format!("GET {path} HTTP/1.1{host}"))?;
    ensure!(signed_in.status == 303, "{signed_in:?}");
    let set_cookie = header(&signed_in, "set-cookie").context("no cookie set")?.to_owned();
    let name = format!("hearth_session_{port}=");
    ensure!(set_cookie.starts_with(&name), "{set_cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        ensure!(set_cookie.contains(attribute), "the cookie lacks {attribute}: {set_cookie}");
    }
    ensure!(!format!("{signed_in:?}").contains(&token), "the token reached the browser: {signed_in:?}");
    let session = set_cookie.split(';').next().context("cookie")?.to_owned();
    let again = raw_http(port, &format!("GET {path} HTTP/1.1{host}"))?;
    ensure!(again.status == 401 && again.error_code().as_deref() == Some("invalid_login_code"), "{again:?}");
    let made_up = raw_http(port, &format!("GET /login?code={} HTTP/1.1{host}", "ab".repeat(32)))?;
    ensure!(made_up.status == 401, "{made_up:?}");

    // The cookie reads the API; no cookie, a wrong one or another agent's name for it does not.
    let cookie = format!("Cookie: {session}\r\n");
    let status = send(port, "GET", "/api/v1/status", &cookie, "")?;
    ensure!(status.status == 200 && status.body.contains("peer_id"), "{status:?}");
    let value = session.split_once('=').context("value")?.1;
    for (what, headers) in [
        ("no cookie", String::new()),
        ("a wrong cookie", format!("Cookie: {name}{}\r\n", "00".repeat(32))),
        ("another port's cookie", format!("Cookie: hearth_session_{}={value}\r\n", port.wrapping_add(1))),
    ] {
        let refused = send(port, "GET", "/api/v1/status", &headers, "")?;
        ensure!(refused.status == 401, "{what}: {refused:?}");
    }

    // A change needs this agent's Origin beside the cookie; a refused one changes nothing.
    for (what, origin) in
        [("no Origin", String::new()), ("a foreign Origin", "Origin: http://evil.example\r\n".into())]
    {
        let refused = send(port, "POST", "/api/v1/pause", &format!("{cookie}{origin}"), "{}")?;
        ensure!(
            refused.status == 403 && refused.error_code().as_deref() == Some("forbidden_origin"),
            "{what}: {refused:?}"
        );
        ensure!(sharing(&agent)?, "a refused pause ({what}) paused the agent");
    }
    let paused = send(port, "POST", "/api/v1/pause", &format!("{cookie}{own_origin}"), "{}")?;
    ensure!(paused.status == 200, "{paused:?}");
    ensure!(!sharing(&agent)?, "the browser's pause did not pause the agent");
    let resumed = send(port, "POST", "/api/v1/resume", &format!("{cookie}{own_origin}"), "")?;
    ensure!(resumed.status == 200, "{resumed:?}");

    // The event stream takes the cookie from this agent's pages, and only from them.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let connect = |origin: Option<String>| {
            let session = session.clone();
            async move {
                let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
                request.headers_mut().insert("Cookie", session.parse()?);
                if let Some(origin) = origin {
                    request.headers_mut().insert("Origin", origin.parse()?);
                }
                anyhow::Ok(tokio_tungstenite::connect_async(request).await)
            }
        };
        ensure!(connect(None).await?.is_err(), "a cookie upgrade without an Origin was taken");
        ensure!(
            connect(Some("http://evil.example".into())).await?.is_err(),
            "a cookie upgrade from a foreign origin was taken"
        );
        let (mut socket, _) = connect(Some(format!("http://127.0.0.1:{port}"))).await??;
        let first =
            tokio::time::timeout(Duration::from_secs(20), socket.next()).await.context("no snapshot")?;
        let Some(Ok(Message::Text(text))) = first else { anyhow::bail!("no snapshot: {first:?}") };
        let snapshot: serde_json::Value = serde_json::from_str(&text)?;
        ensure!(snapshot["type"] == "snapshot", "{snapshot}");
        anyhow::Ok(())
    })?;

    // Signing out ends the session and clears the cookie.
    let out = send(port, "DELETE", "/api/v1/session", &format!("{cookie}{own_origin}"), "")?;
    ensure!(out.status == 200, "{out:?}");
    ensure!(header(&out, "set-cookie").is_some_and(|c| c.contains("Max-Age=0")), "{out:?}");
    let after = send(port, "GET", "/api/v1/status", &cookie, "")?;
    ensure!(after.status == 401, "the session outlived its sign-out: {after:?}");
    ensure!(agent.terminate()?.success(), "the agent did not stop cleanly");
    Ok(())
}
