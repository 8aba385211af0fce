//! The Hearth agent's control API as its clients see it.
//!
//! The agent (`agent-core`) serves this API on loopback; the CLI, the desktop shell, the web UI's
//! tests and scripts speak it. This crate holds everything such a client needs and nothing more:
//! the wire types of every route and of the event stream, the file formats a client reads before
//! it sends them (job specs, request packages, the sharing policy), the typed [`Client`],
//! discovery of a running agent through its data dir ([`discovery`]) and the event-stream client
//! ([`EventStream`]). It links no libp2p, wasmtime or SQLite, so a client stays small. The agent
//! uses these same types at the API's edge and converts the rest of its state into them.

pub mod availability;
pub mod blob;
pub mod client;
pub mod discovery;
pub mod error;
pub mod events;
pub mod ids;
pub mod jobs;
pub mod ledger;
pub mod local_file;
pub mod market;
pub mod package;
pub mod peers;
pub mod policy;
pub mod resources;
pub mod spec;
pub mod status;
pub mod toml_file;
pub mod transfer;
pub mod upload;

pub use client::{Client, ClientError, EventStream, Update};
pub use error::ErrorBody;
pub use events::{Event, StreamMessage};
