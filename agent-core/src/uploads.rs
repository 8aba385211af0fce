//! Staged uploads: the files a client sent with a job spec or a request package, kept on this
//! machine for as long as what they came with needs them.
//!
//! A client on another machine (or in a browser) cannot name a path on the daemon's disk, so it
//! sends the spec and its files by content; the API writes them into a fresh staging folder
//! `DATA/uploads/ID/` ([`Uploads::create`]): the spec at `spec.toml`, the files under `files/`,
//! which is the spec's base. The folder is owned by a [`Staged`] guard that removes it when
//! dropped: a refused upload leaves nothing behind, a local job's guard lives in its task until the
//! job ends, and a remote job's is dropped once its files are in the blob store. A request package
//! reads its task specs whenever a task starts, possibly after a restart, so its folder is
//! [`Staged::keep`]t and removed by the package's driver when the request ends. At start-up
//! [`Uploads::sweep`] removes every folder no unfinished request still names.
//!
//! Nothing here is spawned; removal is a blocking call, small next to what was uploaded.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

/// The staging folder's name inside the data dir.
pub const UPLOADS_DIR: &str = "uploads";

/// The staged spec's (or package's) name inside a staging folder.
const SPEC_FILE: &str = "spec.toml";

/// The folder of the uploaded files inside a staging folder: the spec's base.
const FILES_DIR: &str = "files";

/// Where staging folders live. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Uploads {
    root: PathBuf,
}

/// One staging folder, removed with everything in it when dropped unless [`kept`](Staged::keep).
#[derive(Debug)]
#[must_use = "dropping a staging folder removes it"]
pub struct Staged {
    dir: PathBuf,
    armed: bool,
}

impl Uploads {
    /// Staging folders under `data_dir/uploads`.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self { root: data_dir.join(UPLOADS_DIR) }
    }

    /// A fresh, empty staging folder (private to the agent's user), with its `files/` folder.
    pub fn create(&self) -> std::io::Result<Staged> {
        create_private(&self.root)?;
        let dir = self.root.join(crate::proto::random_id(6));
        // `create_dir` (not `_all`) fails if the id is taken, so two uploads never share a folder.
        std::fs::create_dir(&dir)?;
        let staged = Staged { dir, armed: true };
        set_private(&staged.dir)?;
        std::fs::create_dir(staged.files())?;
        Ok(staged)
    }

    /// The staging folder `path` lies in, if it lies in one.
    pub fn folder_of(&self, path: &Path) -> Option<PathBuf> {
        let rest = path.strip_prefix(&self.root).ok()?;
        match rest.components().next()? {
            Component::Normal(id) => Some(self.root.join(id)),
            _ => None,
        }
    }

    /// Removes the staging folder `path` lies in, if it lies in one; a failure is logged.
    pub fn remove_folder_of(&self, path: &Path) {
        if let Some(folder) = self.folder_of(path) {
            remove(&folder);
        }
    }

    /// Removes every staging folder that none of `in_use` lies in (left by a run that stopped
    /// while a job waited, or by a crash mid-upload); answers how many were removed.
    pub fn sweep<'a>(&self, in_use: impl IntoIterator<Item = &'a Path>) -> usize {
        let keep: HashSet<PathBuf> = in_use.into_iter().filter_map(|path| self.folder_of(path)).collect();
        let Ok(entries) = std::fs::read_dir(&self.root) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if !keep.contains(&path) {
                remove(&path);
                removed += 1;
            }
        }
        removed
    }
}

impl Staged {
    /// The staging folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the spec or package text is written.
    pub fn spec(&self) -> PathBuf {
        self.dir.join(SPEC_FILE)
    }

    /// The folder of the uploaded files, against which the spec's paths resolve.
    pub fn files(&self) -> PathBuf {
        self.dir.join(FILES_DIR)
    }

    /// Leaves the folder in place: whoever keeps its paths now removes it
    /// ([`Uploads::remove_folder_of`]).
    pub fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.dir)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.armed {
            remove(&self.dir);
        }
    }
}

fn remove(dir: &Path) {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            tracing::warn!(folder = %dir.display(), %error, "cannot look at a staging folder");
            return;
        }
    };
    let result = if meta.is_dir() { std::fs::remove_dir_all(dir) } else { std::fs::remove_file(dir) };
    if let Err(error) = result {
        tracing::warn!(folder = %dir.display(), %error, "cannot remove a staging folder");
    }
}

fn create_private(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_private(dir)
}

fn set_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Uploads are other people's files, like job folders.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_folder_is_removed_and_a_kept_one_stays_until_removed() {
        let data = tempfile::tempdir().unwrap();
        let uploads = Uploads::in_data_dir(data.path());
        let staged = uploads.create().unwrap();
        std::fs::write(staged.files().join("a.txt"), b"a").unwrap();
        let dir = staged.dir().to_owned();
        drop(staged);
        assert!(!dir.exists());

        let staged = uploads.create().unwrap();
        let spec = staged.spec();
        std::fs::write(&spec, b"x").unwrap();
        let dir = staged.keep();
        assert!(spec.exists());
        assert_eq!(uploads.folder_of(&spec), Some(dir.clone()));
        uploads.remove_folder_of(&spec);
        assert!(!dir.exists());
        assert_eq!(uploads.folder_of(Path::new("/elsewhere/spec.toml")), None);
    }

    #[test]
    fn the_sweep_keeps_only_folders_in_use() {
        let data = tempfile::tempdir().unwrap();
        let uploads = Uploads::in_data_dir(data.path());
        let used = uploads.create().unwrap().keep();
        let stale = uploads.create().unwrap().keep();
        let in_use = used.join("spec.toml");
        assert_eq!(uploads.sweep([in_use.as_path(), Path::new("/not/an/upload")]), 1);
        assert!(used.exists());
        assert!(!stale.exists());
    }
}
