//! The agent's side of discovery: the API token it creates once and keeps. Clients read it, and
//! `api.json`, with `hearth_api::discovery`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};

pub use hearth_api::discovery::{ApiInfo, ApiToken, DiscoveryError, TOKEN_BYTES};

use crate::secret_file;

/// Reads the token file, creating it with a fresh random token (mode 0600) when absent. The
/// file appears whole or not at all: it is written to a private temporary file, synced, and
/// hard-linked into place, which never replaces a token another process wrote first.
pub fn load_or_create_token(path: &Path) -> Result<ApiToken, DiscoveryError> {
    let io_err = |source| DiscoveryError::Io { path: path.to_owned(), source };
    if path.exists() {
        let mode = fs::metadata(path).map_err(io_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            // The file holds a secret: tighten it rather than serve with an exposed token.
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
            tracing::warn!(path = %path.display(), "api.token was accessible to others; set it to 0600");
        }
        return ApiToken::read(path);
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new().fill(&mut bytes).map_err(|_| io_err(io::Error::other("no randomness")))?;
    let fresh = hex::encode(bytes);
    let written = secret_file::create(path, fresh.as_bytes());
    match written {
        Ok(()) => ApiToken::read(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ApiToken::read(path),
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_private_stable_and_compared_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.token");
        let token = load_or_create_token(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), token);
        assert!(token.matches(token.as_str().as_bytes()));
        assert!(!token.matches(b""));
        assert!(!token.matches(&token.as_str().as_bytes()[1..]));
        let mut wrong = token.as_str().as_bytes().to_vec();
        wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
        assert!(!token.matches(&wrong));
    }

    #[test]
    fn a_malformed_token_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.token");
        fs::write(&path, "not a token").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create_token(&path).unwrap_err().to_string();
        assert!(err.contains("api.token"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a token");
    }
}
