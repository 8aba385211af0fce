//! One daemon per data dir, enforced by an advisory lock on `<data-dir>/daemon.lock`.
//!
//! The kernel drops the lock when the process dies, however it dies, so a crash never leaves a
//! data dir locked. The file holds the owner's pid, only to name it in the refusal message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error("another Hearth daemon{} is already running for {}", pid_note(*.pid), .data_dir.display())]
    Held {
        /// The data dir.
        data_dir: PathBuf,
        /// The other daemon's pid, if it wrote one.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or written.
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

fn pid_note(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// Held for as long as the daemon runs; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock at `path`, which lives in `data_dir`, or says who holds it.
    pub(crate) fn acquire(path: &Path, data_dir: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io { path: path.to_owned(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held { data_dir: data_dir.to_owned(), pid });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .map_err(io_err)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.lock");
        let first = DataDirLock::acquire(&path, dir.path()).unwrap();
        let err = DataDirLock::acquire(&path, dir.path()).unwrap_err();
        let pid = std::process::id();
        assert!(matches!(err, LockError::Held { pid: Some(p), .. } if p == pid), "{err}");
        assert!(err.to_string().contains(&format!("pid {pid}")));
        drop(first);
        DataDirLock::acquire(&path, dir.path()).unwrap();
    }
}
