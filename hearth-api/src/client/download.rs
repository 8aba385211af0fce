//! Writing a blob the daemon sends (`GET /api/v1/blobs/{hash}`) on the client's side: the outputs
//! of `hearth results --out DIR`, written by the CLI itself rather than by the daemon.
//!
//! It keeps the guarantees the daemon's own writer gave: the destination must not exist or be an
//! empty folder; a folder's tar archive may hold only regular files and folders, at plain relative
//! paths (no `..`, no absolute path, no links), each file created anew, and no more files or bytes
//! than the daemon announced. Runs in a blocking task, reading the body through a bridge.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

use crate::blob::Format;
use crate::transfer::Imported;

/// Why a download could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {message}", .path.display())]
pub struct WriteError {
    /// The destination.
    pub path: std::path::PathBuf,
    /// What went wrong.
    pub message: String,
}

/// Checks that `dest` does not exist or is an empty folder, before anything is asked for.
pub(super) fn check_free(dest: &Path) -> Result<(), WriteError> {
    match fs::symlink_metadata(dest) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(meta) if meta.is_dir() && fs::read_dir(dest).is_ok_and(|mut d| d.next().is_none()) => Ok(()),
        _ => Err(WriteError {
            path: dest.to_owned(),
            message: "it is not an empty folder; name a new or empty one".into(),
        }),
    }
}

/// Writes `blob`'s content from `body` to `dest` (a file for a raw blob, a folder for a folder).
pub(super) fn write(body: impl Read, blob: &Imported, dest: &Path) -> Result<(), WriteError> {
    check_free(dest)?;
    let fail = |path: &Path, message: String| WriteError { path: path.to_owned(), message };
    match blob.blob.format {
        Format::Raw => write_file(body, dest, 0o644, blob.size),
        Format::Folder => {
            fs::create_dir_all(dest).map_err(|e| fail(dest, e.to_string()))?;
            let mut archive = tar::Archive::new(body);
            let (mut files, mut bytes) = (0u64, 0u64);
            for entry in archive.entries().map_err(|e| fail(dest, e.to_string()))? {
                let entry = entry.map_err(|e| fail(dest, format!("the archive is broken: {e}")))?;
                let path = entry.path().map_err(|e| fail(dest, e.to_string()))?.into_owned();
                if path.as_os_str().is_empty()
                    || !path.components().all(|c| matches!(c, Component::Normal(_)))
                {
                    return Err(fail(
                        dest,
                        format!("the daemon sent {path:?}, which is not a plain relative path"),
                    ));
                }
                let target = dest.join(&path);
                match entry.header().entry_type() {
                    tar::EntryType::Directory => {
                        fs::create_dir_all(&target).map_err(|e| fail(&target, e.to_string()))?;
                        continue;
                    }
                    tar::EntryType::Regular => {}
                    other => {
                        return Err(fail(
                            &target,
                            format!("the daemon sent a {other:?} entry; only files are written"),
                        ));
                    }
                }
                files += 1;
                bytes = bytes.saturating_add(entry.size());
                if files > blob.files || bytes > blob.size {
                    return Err(fail(dest, "the daemon sent more than it announced".into()));
                }
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| fail(parent, e.to_string()))?;
                }
                let mode =
                    if entry.header().mode().is_ok_and(|mode| mode & 0o111 != 0) { 0o755 } else { 0o644 };
                let size = entry.size();
                write_file(entry, &target, mode, size)?;
            }
            Ok(())
        }
    }
}

/// Creates `path` anew (`create_new`: never over a file, nor through a link left there) with
/// `size` bytes from `body`.
fn write_file(body: impl Read, path: &Path, mode: u32, size: u64) -> Result<(), WriteError> {
    let fail = |message: String| WriteError { path: path.to_owned(), message };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    let copied =
        io::copy(&mut body.take(size.saturating_add(1)), &mut file).map_err(|e| fail(e.to_string()))?;
    if copied != size {
        return Err(fail(format!("the daemon sent {copied} bytes where it announced {size}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{BlobHash, BlobRef};

    fn folder(files: u64, size: u64) -> Imported {
        Imported {
            blob: BlobRef { hash: BlobHash([0; 32]), format: Format::Folder },
            size,
            files,
            skipped: Vec::new(),
        }
    }

    fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // Written raw, so that hostile paths reach the reader as sent.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            tar.append(&header, *data).unwrap();
        }
        tar.into_inner().unwrap()
    }

    #[test]
    fn a_folder_is_written_and_nothing_escapes_it() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let good = archive(&[
            ("a.txt", tar::EntryType::Regular, b"a"),
            ("sub/b.txt", tar::EntryType::Regular, b"bb"),
        ]);
        write(good.as_slice(), &folder(2, 3), &dest).unwrap();
        assert_eq!(fs::read(dest.join("sub/b.txt")).unwrap(), b"bb");
        assert!(check_free(&dest).is_err(), "a written folder is not free");

        for (name, entries, files, size) in [
            ("climbs out", vec![("../x", tar::EntryType::Regular, &b"x"[..])], 1, 1),
            ("absolute", vec![("/tmp/x", tar::EntryType::Regular, &b"x"[..])], 1, 1),
            ("a link", vec![("l", tar::EntryType::Symlink, &b""[..])], 1, 1),
            ("more than announced", vec![("a", tar::EntryType::Regular, &b"xx"[..])], 1, 1),
        ] {
            let dest = dir.path().join(name);
            assert!(write(archive(&entries).as_slice(), &folder(files, size), &dest).is_err(), "{name}");
        }
        assert!(!dir.path().join("x").exists());
    }
}
