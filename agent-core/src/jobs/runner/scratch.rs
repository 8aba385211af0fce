//! The job's scratch folders as the agent sees them from the host: measured while the job runs,
//! cleaned after it ends. The job controls their content, so every walk goes through directory
//! descriptors and never follows a symlink, even one swapped in mid-walk.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fstatat};

/// Every file, folder and link is charged at least this much, so a million empty files count as
/// the inodes they take.
const MIN_CHARGE: u64 = 4096;

/// Why a measurement could not be completed.
#[derive(Debug)]
pub(super) enum Unmeasurable {
    /// The job made a folder unreadable to the agent.
    Hidden(PathBuf),
}

/// Bytes used under `dirs`, stopping early once past `limit`.
pub(super) fn usage(dirs: &[PathBuf], limit: u64) -> Result<u64, Unmeasurable> {
    let mut total = 0u64;
    for dir in dirs {
        walk(dir, &mut |stat| {
            let blocks = u64::try_from(stat.st_blocks).unwrap_or(0) * 512;
            total = total.saturating_add(blocks.max(MIN_CHARGE));
            total <= limit
        })?;
        if total > limit {
            break;
        }
    }
    Ok(total)
}

/// Visits everything under `root` (not `root` itself) until `visit` returns false.
fn walk(root: &Path, visit: &mut dyn FnMut(&nix::sys::stat::FileStat) -> bool) -> Result<(), Unmeasurable> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(top) = Dir::open(root, flags, Mode::empty()) else { return Ok(()) };
    // Pending folders, each with the open parent it is named in: only the parents on the current
    // path and their pending siblings' parents stay open.
    let mut pending: Vec<(Rc<Dir>, CString, PathBuf)> = Vec::new();
    let mut current = Some((top, root.to_owned()));
    while let Some((mut dir, path)) = current.take() {
        let names: Vec<CString> = dir
            .iter()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_owned())
            .filter(|name| !matches!(name.to_bytes(), b"." | b".."))
            .collect();
        let dir = Rc::new(dir);
        for name in names {
            let Ok(stat) = fstatat(&*dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else { continue };
            if !visit(&stat) {
                return Ok(());
            }
            if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
                let child_path = path.join(name_to_path(&name));
                pending.push((Rc::clone(&dir), name, child_path));
            }
        }
        while let Some((parent, name, child_path)) = pending.pop() {
            match Dir::openat(&*parent, name.as_c_str(), flags, Mode::empty()) {
                Ok(child) => {
                    current = Some((child, child_path));
                    break;
                }
                Err(Errno::EACCES) => return Err(Unmeasurable::Hidden(child_path)),
                // Removed, or swapped for a symlink (O_NOFOLLOW), since it was listed.
                Err(_) => continue,
            }
        }
    }
    Ok(())
}

fn name_to_path(name: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

/// Makes every folder under `root` the agent's to read, write and enter again, so it can be
/// removed or handed out. Only called once the job is dead, so nothing changes under it.
pub(super) fn reclaim(root: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Ok(());
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o700 | (meta.permissions().mode() & 0o755)))?;
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            reclaim(&entry.path())?;
        }
    }
    Ok(())
}

/// Clears setuid, setgid and sticky bits under `root`, so no output the job made can gain
/// privileges on the host. Only called once the job is dead.
pub(super) fn strip_special_bits(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            continue;
        }
        let mode = entry.metadata()?.permissions().mode();
        if mode & 0o7000 != 0 {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode & 0o777))?;
        }
        if kind.is_dir() {
            strip_special_bits(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_blocks_and_inodes_without_following_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("a")).expect("mkdir");
        fs::write(dir.path().join("a/data"), vec![7u8; 100_000]).expect("write");
        std::os::unix::fs::symlink("/usr", dir.path().join("a/usr")).expect("symlink");
        let used = usage(&[dir.path().to_owned()], u64::MAX).expect("usage");
        // The folder, the file's blocks and the link: far from all of /usr.
        assert!((100_000..200_000).contains(&used), "{used}");
    }

    #[test]
    fn an_unreadable_folder_is_reported_and_reclaimed() {
        if nix::unistd::geteuid().is_root() {
            eprintln!("note: as root every folder is readable; only reclaim is checked");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let hidden = dir.path().join("hidden");
        fs::create_dir(&hidden).expect("mkdir");
        fs::write(hidden.join("x"), b"x").expect("write");
        fs::set_permissions(&hidden, fs::Permissions::from_mode(0o000)).expect("chmod");
        if !nix::unistd::geteuid().is_root() {
            assert!(matches!(usage(&[dir.path().to_owned()], u64::MAX), Err(Unmeasurable::Hidden(_))));
        }
        reclaim(dir.path()).expect("reclaim");
        fs::remove_dir_all(dir.path().join("hidden")).expect("removable again");
    }
}
