//! Routes of the blob store (`/api/v1/blobs…`): a file or folder put in by content, and a blob
//! read back out, so that neither names a path on the daemon's disk.
//!
//! A download streams from a blocking task through a bounded channel: the store's files are read
//! as the client takes the bytes, never held whole in memory.

use std::io;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Path, Query};
use super::upload::{self, Entry};
use crate::transfer::{BlobHash, BlobRef, Format, Imported};

/// The `multipart/form-data` body of `POST /api/v1/blobs`.
#[derive(Debug, utoipa::ToSchema)]
pub struct BlobUpload {
    /// `raw` for one file (exactly one `file` part), `folder` for a folder (a `file` part per
    /// file, named by its path in the folder).
    pub format: String,
    /// A peer allowed to fetch it, one part each.
    pub share_with: Vec<String>,
    /// The file or the folder's files, each named by its path (as in `SpecUpload`).
    #[schema(value_type = Vec<String>, format = Binary)]
    pub file: Vec<Vec<u8>>,
}

/// How `GET /api/v1/blobs/{hash}` reads the blob.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BlobQuery {
    /// The hash is a folder's manifest: answer a tar archive of its files.
    #[serde(default)]
    pub folder: bool,
}

/// How many chunks a download may have in flight between the reading task and the client.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The size of one chunk of a download.
const CHUNK: usize = 64 << 10;

/// Puts a file or folder, sent by content, into the blob store (kept until removed) and lets the
/// named peers fetch it; answers with its hash. The staged copy is removed once imported.
#[utoipa::path(post, path = "/api/v1/blobs",
    request_body(content = BlobUpload, content_type = "multipart/form-data"), responses(
    (status = 200, body = Imported),
    (status = 400, description = "No file, an unsafe name, a bad `format`, or a peer id that is not one", body = ErrorBody),
    (status = 413, body = ErrorBody, description = "the upload is over a limit, which the message names"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn add(
    State(state): State<ApiState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Imported>, ApiError> {
    let upload = upload::receive(&state.uploads, state.upload_limits, Entry::Blob, multipart).await?;
    let (mut format, mut peers) = (None, Vec::new());
    for (name, text) in upload.texts {
        match name.as_str() {
            "format" if format.is_none() => format = Some(text),
            "format" => return Err(ApiError::bad_request("invalid_upload", "has two `format` parts")),
            _ => peers.push(text),
        }
    }
    let files = upload.staged.files();
    let path = match format.as_deref() {
        Some("folder") => files,
        Some("raw") => {
            let mut entries = std::fs::read_dir(&files)
                .map_err(|error| ApiError::internal("upload_failed", &error.to_string()))?
                .flatten()
                .map(|entry| entry.path());
            match (entries.next(), entries.next()) {
                (Some(file), None) if file.is_file() => file,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_upload",
                        "a `raw` blob is exactly one file at the top of the upload",
                    ));
                }
            }
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_upload",
                &format!("`format` is {other:?}; expected \"raw\" or \"folder\""),
            ));
        }
    };
    let imported = state.transfers.add(path, &peers).await;
    let _ = tokio::task::spawn_blocking(move || drop(upload.staged)).await;
    Ok(Json(imported?))
}

/// A complete blob's content: a raw blob's bytes, or with `folder=true` a tar archive of the
/// folder's files (regular files only, by their paths in the folder). The `x-hearth-size` and
/// `x-hearth-files` headers say how many bytes of content and files it holds.
#[utoipa::path(get, path = "/api/v1/blobs/{hash}", params(
    ("hash" = String, Path, description = "The blob's hash (for a folder, its manifest's)"),
    BlobQuery
), responses(
    (status = 200, description = "The bytes (`application/octet-stream`) or the folder as a tar archive (`application/x-tar`)"),
    (status = 400, description = "Not a blob hash", body = ErrorBody),
    (status = 404, description = "No such complete blob here", body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)
))]
pub(super) async fn download(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
    Query(query): Query<BlobQuery>,
) -> Result<Response, ApiError> {
    let hash: BlobHash =
        hash.parse().map_err(|error: String| ApiError::bad_request("invalid_blob", &error))?;
    let blob = BlobRef { hash, format: if query.folder { Format::Folder } else { Format::Raw } };
    // Before the first byte: a missing blob is a 404, not a broken stream.
    let summary = state.transfers.summary(blob).await?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let transfers = state.transfers.clone();
    tokio::task::spawn_blocking(move || {
        let writer = io::BufWriter::with_capacity(CHUNK, ChannelWriter(tx.clone()));
        if let Err(error) = transfers.write_blob(blob, writer) {
            // The client sees the body end early with an error; it may have gone away already.
            let _ = tx.blocking_send(Err(io::Error::other(error.to_string())));
        }
    });
    let stream =
        libp2p::futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let kind = if query.folder { "application/x-tar" } else { "application/octet-stream" };
    Response::builder()
        .header(header::CONTENT_TYPE, kind)
        .header("x-hearth-size", summary.size)
        .header("x-hearth-files", summary.files)
        .body(Body::from_stream(stream))
        .map_err(|error| ApiError::internal("transfer_failed", &error.to_string()))
}

/// Sends what is written as chunks on a channel, waiting while the client is behind.
struct ChannelWriter(mpsc::Sender<io::Result<Bytes>>);

impl io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
