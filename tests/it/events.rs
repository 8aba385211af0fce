//! The WebSocket event stream: authenticated, a snapshot first, refreshes pushed, told of a stop.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use hearth_tests::Agent;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

pub(crate) fn websocket_streams_snapshot_refreshes_and_stopping() -> Result<()> {
    let mut agent = Agent::start_with_config("[resources]\nrefresh_interval = \"1s\"\n")?;
    let port = agent.port()?;
    let token = agent.token()?;
    let peer_id = agent.api_info()?["peer_id"].clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut request = format!("ws://127.0.0.1:{port}/api/v1/events").into_client_request()?;
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let mut next = async || -> Result<Option<serde_json::Value>> {
            loop {
                let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
                    .await
                    .context("no event within 20 s")?;
                match message {
                    Some(Ok(Message::Text(text))) => return Ok(Some(serde_json::from_str(&text)?)),
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("socket error: {e}"),
                }
            }
        };
        let snapshot = next().await?.context("closed before the snapshot")?;
        ensure!(snapshot["type"] == "snapshot", "{snapshot}");
        ensure!(
            snapshot["status"]["peer_id"] == peer_id && snapshot["status"]["state"] == "sharing",
            "{snapshot}"
        );
        ensure!(snapshot["resources"]["cpu"]["threads"].as_u64().is_some_and(|t| t > 0));

        let refreshed = next().await?.context("closed before a refresh")?;
        ensure!(refreshed["type"] == "resources_refreshed", "{refreshed}");
        ensure!(refreshed["resources"]["memory"]["total_bytes"].as_u64().is_some_and(|b| b > 0));

        let status = agent.terminate()?;
        ensure!(status.success(), "{status}");
        let mut saw_stopping = false;
        while let Some(event) = next().await? {
            if event["type"] == "state_changed" {
                ensure!(event["state"] == "stopping", "{event}");
                saw_stopping = true;
            }
        }
        ensure!(saw_stopping, "the stream closed without saying the agent was stopping");
        Ok(())
    })
}
