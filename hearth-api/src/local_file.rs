//! Reading a file someone named on this machine (a job spec, a package, a policy, the module or
//! image a spec names): only a regular file is read, never more than a limit the error names, and
//! opening a FIFO never blocks. `/dev/zero`, a named pipe or a 100 MB spec gets one line saying
//! why, not an agent that runs out of memory or hangs.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use bytesize::ByteSize;

/// The longest a path is shown in an error: longer ones keep their start and end.
const SHOWN_PATH_CHARS: usize = 160;

/// Why a named file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be opened or read.
    #[error("cannot read {what} {path}: {error}")]
    Unreadable {
        /// What the file was meant to be (`job spec`, `module`…).
        what: &'static str,
        /// The path as shown ([`shown`]).
        path: String,
        /// The system's reason.
        error: String,
        /// Its kind, for a caller to tell a missing file from the rest.
        kind: io::ErrorKind,
    },
    /// It is a folder, a device, a FIFO, a socket.
    #[error("{what} {path} is {kind}, not a regular file")]
    NotRegular {
        /// What the file was meant to be.
        what: &'static str,
        /// The path as shown.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// It is larger than Hearth reads for it.
    #[error("{what} {path} is larger than {limit}, the most Hearth reads for one")]
    TooLarge {
        /// What the file was meant to be.
        what: &'static str,
        /// The path as shown.
        path: String,
        /// The limit.
        limit: ByteSize,
    },
}

impl FileError {
    /// What is wrong with the file, without its path: for a message that names it already.
    pub fn reason(&self) -> String {
        match self {
            Self::Unreadable { error, .. } => format!("cannot be read: {error}"),
            Self::NotRegular { kind, .. } => format!("is {kind}, not a regular file"),
            Self::TooLarge { limit, .. } => format!("is larger than {limit}, the most Hearth reads for one"),
        }
    }

    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Unreadable { kind: io::ErrorKind::NotFound, .. })
    }
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes (symlinks are
/// followed: the owner named it). A FIFO is refused without waiting for a writer.
pub fn open_regular(path: &Path, limit: u64, what: &'static str) -> Result<File, FileError> {
    let unreadable = |error: io::Error| FileError::Unreadable {
        what,
        path: shown(path),
        error: error.to_string(),
        kind: error.kind(),
    };
    // Non-blocking, so that opening a FIFO does not wait for a writer; it changes nothing for
    // the regular file that is all this goes on to read.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a folder"
        } else if kind.is_fifo() {
            "a named pipe"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "something else"
        };
        return Err(FileError::NotRegular { what, path: shown(path), kind });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { what, path: shown(path), limit: ByteSize(limit) });
    }
    Ok(file)
}

/// The bytes of the regular file at `path`, at most `limit` of them (a file that grows past it
/// while it is read is refused too).
pub fn read_bytes(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path, limit, what)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|error| FileError::Unreadable {
        what,
        path: shown(path),
        error: error.to_string(),
        kind: error.kind(),
    })?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { what, path: shown(path), limit: ByteSize(limit) });
    }
    Ok(bytes)
}

/// The text of the regular file at `path`, at most `limit` bytes of UTF-8.
pub fn read_text(path: &Path, limit: u64, what: &'static str) -> Result<String, FileError> {
    String::from_utf8(read_bytes(path, limit, what)?).map_err(|_| FileError::Unreadable {
        what,
        path: shown(path),
        error: "it is not UTF-8 text".into(),
        kind: io::ErrorKind::InvalidData,
    })
}

/// `path` for an error message: whole when short, else its start and end around an ellipsis, so
/// an error never carries a path of kilobytes.
pub fn shown(path: &Path) -> String {
    let text = path.display().to_string();
    let chars = text.chars().count();
    if chars <= SHOWN_PATH_CHARS {
        return text;
    }
    let keep = (SHOWN_PATH_CHARS - 1) / 2;
    let start: String = text.chars().take(keep).collect();
    let end: String = text.chars().skip(chars - keep).collect();
    format!("{start}…{end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spec.toml");
        std::fs::write(&file, "kind = \"wasi\"\n").unwrap();
        assert_eq!(read_text(&file, 64, "job spec").unwrap(), "kind = \"wasi\"\n");

        let big = read_text(&file, 4, "job spec").unwrap_err();
        assert!(matches!(big, FileError::TooLarge { .. }), "{big}");
        assert!(big.to_string().contains("larger than 4 B"), "{big}");

        let zero = read_bytes(Path::new("/dev/zero"), 1 << 20, "module").unwrap_err();
        assert_eq!(zero.to_string(), "module /dev/zero is a device, not a regular file");
        let folder = read_bytes(dir.path(), 1 << 20, "job spec").unwrap_err();
        assert!(folder.to_string().ends_with("is a folder, not a regular file"), "{folder}");

        // A FIFO with no writer: refused at once, not waited on.
        let fifo = dir.path().join("fifo.toml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let piped = read_text(&fifo, 1 << 20, "job spec").unwrap_err();
        assert!(piped.to_string().ends_with("is a named pipe, not a regular file"), "{piped}");

        let missing = read_text(&dir.path().join("gone"), 64, "job spec").unwrap_err();
        assert!(missing.to_string().contains("No such file"), "{missing}");
    }

    #[test]
    fn a_long_path_is_shown_short() {
        let long = Path::new("/").join("a/".repeat(5000));
        let text = read_text(&long, 64, "job spec").unwrap_err().to_string();
        assert!(text.len() < 400, "{} bytes: {text}", text.len());
        assert!(text.contains('…'));
        assert_eq!(shown(Path::new("/short")), "/short");
    }
}
