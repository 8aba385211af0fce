//! How clients find a running daemon: `<data-dir>/api.json` says where the API listens, and
//! `<data-dir>/api.token` (mode 0600) holds the bearer token.
//!
//! The token persists across restarts, so a browser tab or script that holds it keeps working,
//! and only the owner's account can read it. `api.json` is written atomically when the API is up
//! and removed on clean shutdown; a stale one left by a crash is harmless, because clients treat a
//! refused connection as "no daemon".

use crate::ids::PeerId;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// The file in a data dir that says where a running agent's API listens.
pub const API_INFO_FILE: &str = "api.json";

/// The file in a data dir that holds the API's bearer token (mode 0600).
pub const API_TOKEN_FILE: &str = "api.token";

/// Random bytes in a token; it is stored and sent as lowercase hex.
pub const TOKEN_BYTES: usize = 32;

/// Why a discovery file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file exists but its content is not what Hearth writes.
    #[error("{path} is malformed ({reason}); delete it and restart the daemon to make a new one")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The content of `api.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiInfo {
    /// Base URL of the API, such as `http://127.0.0.1:7447`.
    pub url: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's peer id.
    pub peer_id: PeerId,
}

/// The API's bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// The token as sent in `Authorization: Bearer …`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, so response timing tells an attacker nothing about the token.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(candidate).into()
    }

    /// Reads the token file.
    pub fn read(path: &Path) -> Result<Self, DiscoveryError> {
        let text = fs::read_to_string(path)
            .map_err(|source| DiscoveryError::Io { path: path.to_owned(), source })?;
        let token = text.trim();
        if token.len() != TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DiscoveryError::Malformed {
                path: path.to_owned(),
                reason: format!("expected {} hex digits", TOKEN_BYTES * 2),
            });
        }
        // Kept exactly as written: clients send the file's content, and it is compared byte for byte.
        Ok(Self(token.to_owned()))
    }
}

impl ApiInfo {
    /// Writes `api.json` atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), DiscoveryError> {
        let io_err = |source| DiscoveryError::Io { path: path.to_owned(), source };
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let json = serde_json::to_vec_pretty(self).map_err(|e| io_err(io::Error::other(e)))?;
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err)
    }

    /// Reads `api.json`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, DiscoveryError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DiscoveryError::Malformed { path: path.to_owned(), reason: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DiscoveryError::Io { path: path.to_owned(), source }),
        }
    }

    /// Removes `api.json` if it still describes this process, so a newer daemon's file survives.
    pub fn remove_if_ours(path: &Path) {
        if let Ok(Some(info)) = Self::read(path)
            && info.pid == std::process::id()
        {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_info_round_trips_and_is_removed_only_by_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.json");
        assert_eq!(ApiInfo::read(&path).unwrap(), None);
        let mut info = ApiInfo { url: "http://127.0.0.1:1".into(), pid: 1, peer_id: "p".into() };
        info.write(&path).unwrap();
        assert_eq!(ApiInfo::read(&path).unwrap(), Some(info.clone()));
        ApiInfo::remove_if_ours(&path);
        assert!(path.exists(), "pid 1 is not us");
        info.pid = std::process::id();
        info.write(&path).unwrap();
        ApiInfo::remove_if_ours(&path);
        assert!(!path.exists());
    }
}
