//! The client side of the daemon's event stream (`GET /api/v1/events`, a WebSocket).
//!
//! A command that waits for something (a job to end, new log bytes, a request's progress)
//! subscribes first and reads the state after, so nothing that happens in between is missed, and
//! then reads again only when an event says something changed. Whenever the stream cannot say
//! exactly what changed (this watcher fell behind, or a message is not understood) it yields
//! [`Update::Reread`]: the caller reads the state again, as it did after subscribing.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Client, ClientError};
use crate::discovery::API_TOKEN_FILE;
use crate::events::{Event, StreamMessage};

/// The largest message taken from the daemon. Events are small (a job's output comes in chunks
/// of at most 16 KiB); a request package's status with many tasks is the largest.
const MAX_MESSAGE: usize = 16 << 20;

/// What the stream says next.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// This changed.
    Event(Box<Event>),
    /// Something may have changed that the stream cannot name: events this watcher missed by
    /// falling behind, or a message this client does not understand (from a newer daemon). Read
    /// the state again.
    Reread,
}

/// A subscription to the daemon's events, open from the moment [`Client::events`] returned.
pub struct EventStream {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    url: String,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Client {
    /// Subscribes to the daemon's event stream. The daemon subscribes before it answers the
    /// upgrade, so every event published after this returns is delivered (or counted as missed).
    pub async fn events(&self) -> Result<EventStream, ClientError> {
        let url = format!("{}/api/v1/events", self.info.url.replacen("http://", "ws://", 1));
        let stream_err =
            |error: tungstenite::Error| ClientError::Stream { url: url.clone(), message: error.to_string() };
        let mut request = url.as_str().into_client_request().map_err(stream_err)?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.token.as_str()))
            .map_err(|error| ClientError::Stream { url: url.clone(), message: error.to_string() })?;
        request.headers_mut().insert("Authorization", bearer);
        let config =
            WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), false);
        let socket = match tokio::time::timeout(super::TIMEOUT, connect).await {
            Err(_) => {
                return Err(ClientError::Stream {
                    url: url.clone(),
                    message: "the upgrade timed out".into(),
                });
            }
            Ok(Ok((socket, _))) => socket,
            Ok(Err(tungstenite::Error::Io(error)))
                if error.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Err(ClientError::NoDaemon { data_dir: self.data_dir.clone() });
            }
            Ok(Err(tungstenite::Error::Http(response))) if response.status() == 401 => {
                return Err(ClientError::Unauthorized {
                    url: self.info.url.clone(),
                    token_path: self.data_dir.join(API_TOKEN_FILE),
                });
            }
            Ok(Err(error)) => return Err(stream_err(error)),
        };
        Ok(EventStream { socket, url })
    }
}

impl EventStream {
    /// The next update, or `None` once the daemon closed the stream (it is stopping).
    ///
    /// Cancel-safe: a message is taken off the socket whole, so dropping the future loses none.
    pub async fn next(&mut self) -> Result<Option<Update>, ClientError> {
        loop {
            let message = match self.socket.next().await {
                None => return Ok(None),
                Some(Ok(message)) => message,
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
                    return Ok(None);
                }
                Some(Err(error)) => {
                    return Err(ClientError::Stream { url: self.url.clone(), message: error.to_string() });
                }
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => return Ok(None),
                // Pings are answered by the library; nothing else is sent.
                _ => continue,
            };
            return Ok(Some(match serde_json::from_str::<StreamMessage>(&text) {
                Ok(StreamMessage::Event(event)) => Update::Event(Box::new(event)),
                // What a screen needs to start from; a waiting command read its own state.
                Ok(StreamMessage::Snapshot { .. }) => continue,
                Ok(StreamMessage::Lagged { .. }) => Update::Reread,
                Err(error) => {
                    tracing::debug!(%error, "an event this client does not understand");
                    Update::Reread
                }
            }));
        }
    }

    /// Waits until an event `wanted` accepts arrives, or one this watcher cannot rule out (it
    /// fell behind): both mean "read the state again". `false` once the daemon closed the stream.
    pub async fn changed(&mut self, wanted: impl Fn(&Event) -> bool) -> Result<bool, ClientError> {
        loop {
            match self.next().await? {
                None => return Ok(false),
                Some(Update::Reread) => return Ok(true),
                Some(Update::Event(event)) if wanted(&event) => return Ok(true),
                Some(Update::Event(_)) => {}
            }
        }
    }

    /// Closes the stream politely.
    pub async fn close(mut self) {
        let _ = self.socket.send(Message::Close(None)).await;
    }
}
