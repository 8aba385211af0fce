//! Creating a file that holds a secret (the identity seed, the API token) whole or not at all.
//!
//! The bytes go to a private temporary file beside the target (mode 0600), which is synced and
//! then hard-linked into place. Linking never replaces an existing file, so a file another process
//! wrote first survives and the caller gets `AlreadyExists`; a crash at any point leaves either no
//! file or the complete one, never an empty or partial secret.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Creates `path` with `bytes` and mode 0600, failing with `AlreadyExists` if it exists.
pub(crate) fn create(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)?;
        // Make the new directory entry durable too.
        File::open(dir)?.sync_all()
    })();
    // The temporary name is ours alone; removing it is harmless either way.
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_a_private_file_once_and_never_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        create(&path, b"first").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = create(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }
}
