//! The control API's gate, probed with hand-written requests so every header is under control.

use anyhow::{Result, ensure};
use hearth_tests::{Agent, RawResponse, raw_http};

fn get(port: u16, path: &str, headers: &str) -> Result<RawResponse> {
    raw_http(port, &format!("GET {path} HTTP/1.1{headers}"))
}

fn expect(response: &RawResponse, status: u16, code: &str, what: &str) -> Result<()> {
    ensure!(response.status == status, "{what}: expected {status}, got {response:?}");
    ensure!(response.error_code().as_deref() == Some(code), "{what}: expected code {code}: {response:?}");
    Ok(())
}

pub(crate) fn missing_or_wrong_token_is_401() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let host = format!("\r\nHost: 127.0.0.1:{port}");
    let token = agent.token()?;
    let wrong = if token.starts_with('a') { "b" } else { "a" }.to_owned() + &token[1..];
    for (what, auth) in [
        ("no token", String::new()),
        ("empty bearer", "\r\nAuthorization: Bearer ".to_owned()),
        ("wrong token", format!("\r\nAuthorization: Bearer {wrong}")),
        ("token prefix", format!("\r\nAuthorization: Bearer {}", &token[..32])),
        ("basic auth", format!("\r\nAuthorization: Basic {token}")),
    ] {
        for path in ["/api/v1/status", "/api/v1/resources", "/api/v1/openapi.json", "/api/v1/nope"] {
            expect(
                &get(port, path, &format!("{host}{auth}"))?,
                401,
                "unauthorized",
                &format!("{what} {path}"),
            )?;
        }
    }
    let ok = get(port, "/api/v1/status", &format!("{host}\r\nAuthorization: Bearer {token}"))?;
    ensure!(ok.status == 200, "the right token is accepted: {ok:?}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn foreign_or_missing_host_is_403() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let auth = format!("\r\nAuthorization: Bearer {}", agent.token()?);
    let hosts = [
        String::new(),
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("localhost.evil.com:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_owned(),
    ];
    for host in &hosts {
        let response = get(port, "/api/v1/status", &format!("\r\nHost: {host}{auth}"))?;
        expect(&response, 403, "forbidden_host", &format!("Host {host:?}"))?;
    }
    let response = get(port, "/api/v1/status", &auth)?;
    expect(&response, 403, "forbidden_host", "no Host header")?;
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
        let response = get(port, "/api/v1/status", &format!("\r\nHost: {host}{auth}"))?;
        ensure!(response.status == 200, "Host {host}: {response:?}");
    }
    // A request line in absolute form names its own host, which must be this API's too.
    let own_host = format!("\r\nHost: 127.0.0.1:{port}{auth}");
    for target in ["http://evil.example/api/v1/status", &format!("http://evil.example:{port}/api/v1/status")]
    {
        let response = hearth_tests::raw_http(port, &format!("GET {target} HTTP/1.1{own_host}"))?;
        expect(&response, 403, "forbidden_host", &format!("GET {target}"))?;
    }
    let target = format!("http://127.0.0.1:{port}/api/v1/status");
    let response = hearth_tests::raw_http(port, &format!("GET {target} HTTP/1.1{own_host}"))?;
    ensure!(response.status == 200, "GET {target}: {response:?}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn foreign_origin_on_post_is_403() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let base = format!("\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {}", agent.token()?);
    for origin in [
        "http://evil.example",
        "null",
        &format!("http://localhost.evil.com:{port}"),
        &format!("https://127.0.0.1:{port}"),
    ] {
        let response = raw_http(port, &format!("POST /api/v1/status HTTP/1.1{base}\r\nOrigin: {origin}"))?;
        expect(&response, 403, "forbidden_origin", &format!("POST with Origin {origin}"))?;
    }
    // The API's own origin passes the gate, and the route then answers for itself (no POST here).
    let own =
        raw_http(port, &format!("POST /api/v1/status HTTP/1.1{base}\r\nOrigin: http://127.0.0.1:{port}"))?;
    ensure!(own.status == 405, "own origin reaches the route: {own:?}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

fn upgrade(port: u16, extra: &str) -> Result<RawResponse> {
    raw_http(
        port,
        &format!(
            "GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: Upgrade{extra}"
        ),
    )
}

pub(crate) fn foreign_origin_on_websocket_upgrade_is_403() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let auth = format!("\r\nAuthorization: Bearer {}", agent.token()?);
    let foreign = upgrade(port, &format!("{auth}\r\nOrigin: http://evil.example"))?;
    expect(&foreign, 403, "forbidden_origin", "WebSocket upgrade from a foreign origin")?;
    expect(&upgrade(port, "")?, 401, "unauthorized", "WebSocket upgrade without a token")?;
    let own = upgrade(port, &format!("{auth}\r\nOrigin: http://127.0.0.1:{port}"))?;
    ensure!(own.status == 101, "own origin with the token upgrades: {own:?}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn openapi_document_lists_every_route() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let response = get(
        port,
        "/api/v1/openapi.json",
        &format!("\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {}", agent.token()?),
    )?;
    ensure!(response.status == 200, "{response:?}");
    let doc: serde_json::Value = serde_json::from_str(&response.body)?;
    ensure!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    for path in ["/api/v1/status", "/api/v1/resources", "/api/v1/events", "/api/v1/openapi.json"] {
        ensure!(doc["paths"][path]["get"].is_object(), "{path} missing from the OpenAPI document");
    }
    for path in ["/api/v1/peers", "/api/v1/pause", "/api/v1/jobs", "/api/v1/blobs", "/api/v1/transfers"] {
        ensure!(doc["paths"][path]["post"].is_object(), "POST {path} missing from the OpenAPI document");
    }
    ensure!(
        doc["paths"]["/api/v1/transfers/{id}"]["delete"].is_object(),
        "DELETE /api/v1/transfers/{{id}} missing"
    );
    ensure!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer", "bearer scheme");
    ensure!(doc["components"]["schemas"]["Resources"].is_object(), "Resources schema");
    ensure!(agent.terminate()?.success());
    Ok(())
}
