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
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

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
    let mut stopped = false;
    let walked = walk_at(root, &mut |_, _, stat| {
        stopped = !visit(stat);
        Ok(if stopped { Step::Stop } else { Step::Enter })
    });
    match walked {
        Err(WalkError::Hidden(path)) => Err(Unmeasurable::Hidden(path)),
        // A measurement skips what it cannot see; only a hidden folder is reported.
        Err(WalkError::Io(_)) | Ok(()) => Ok(()),
    }
}

/// What a visitor wants done after seeing an entry.
enum Step {
    /// Go on, and into the entry if it is a folder.
    Enter,
    /// Go on, but not into this entry (it was removed, say).
    Skip,
    /// End the walk.
    Stop,
}

enum WalkError {
    /// A folder the walk may not enter.
    Hidden(PathBuf),
    /// A visitor's own error, with the entry's path.
    Io(io::Error),
}

/// Visits everything under `root` (not `root` itself) with the open folder it is named in, its
/// name there and its `lstat`, at any depth: folders are opened relative to their parent, so no
/// path is ever longer than one name, and only the parents of pending folders stay open.
fn walk_at(
    root: &Path,
    visit: &mut dyn FnMut(&Dir, &CStr, &nix::sys::stat::FileStat) -> io::Result<Step>,
) -> Result<(), WalkError> {
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
            match visit(&dir, &name, &stat) {
                Ok(Step::Enter) => {}
                Ok(Step::Skip) => continue,
                Ok(Step::Stop) => return Ok(()),
                Err(error) => {
                    let at = path.join(name_to_path(&name));
                    return Err(WalkError::Io(io::Error::new(
                        error.kind(),
                        format!("{}: {error}", hearth_api::local_file::shown(&at)),
                    )));
                }
            }
            if kind_of(&stat) == SFlag::S_IFDIR {
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
                Err(Errno::EACCES) => return Err(WalkError::Hidden(child_path)),
                // Removed, or swapped for a symlink (O_NOFOLLOW), since it was listed.
                Err(_) => continue,
            }
        }
    }
    Ok(())
}

fn kind_of(stat: &nix::sys::stat::FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

fn name_to_path(name: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

/// Makes every folder under `root` the agent's to read, write and enter again, so it can be
/// removed or handed out, at any depth. Only called once the job is dead, so nothing changes
/// under it.
pub(super) fn reclaim(root: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(root) {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    fs::set_permissions(root, fs::Permissions::from_mode(0o700 | (meta.permissions().mode() & 0o755)))?;
    let walked = walk_at(root, &mut |dir, name, stat| {
        if kind_of(stat) == SFlag::S_IFDIR {
            // Before the walk opens it.
            let mode = Mode::from_bits_truncate(0o700 | (stat.st_mode & 0o755));
            fchmodat(dir, name, mode, FchmodatFlags::FollowSymlink)?;
        }
        Ok(Step::Enter)
    });
    match walked {
        Ok(()) => Ok(()),
        Err(WalkError::Io(error)) => Err(error),
        Err(WalkError::Hidden(path)) => {
            Err(io::Error::other(format!("{} stayed unreadable", hearth_api::local_file::shown(&path))))
        }
    }
}

/// The bytes of the regular files under `root` at their logical size (a sparse file counts
/// whole, as it would once copied into the blob store), stopping early once past `limit`.
pub(super) fn logical_size(root: &Path, limit: u64) -> io::Result<u64> {
    let mut total = 0u64;
    let walked = walk_at(root, &mut |_, _, stat| {
        if kind_of(stat) == SFlag::S_IFREG {
            total = total.saturating_add(u64::try_from(stat.st_size).unwrap_or(0));
        }
        Ok(if total > limit { Step::Stop } else { Step::Enter })
    });
    match walked {
        Ok(()) => Ok(total),
        Err(WalkError::Io(error)) => Err(error),
        Err(WalkError::Hidden(path)) => {
            Err(io::Error::other(format!("{} could not be entered", hearth_api::local_file::shown(&path))))
        }
    }
}

/// What [`sanitize_outputs`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Sanitized {
    /// Links, devices, FIFOs and sockets removed.
    pub(super) removed: u64,
    /// Files and folders whose setuid, setgid or sticky bit was cleared.
    pub(super) cleared: u64,
}

/// Leaves only regular files and folders under `root`, none with a setuid, setgid or sticky
/// bit, at any depth: symlinks, device nodes, FIFOs and sockets are removed and the bits cleared,
/// so nothing a job left can gain privileges on the host or point outside its outputs. Only
/// called once the job is dead (and after [`reclaim`]); an error means the outputs are not safe.
pub(super) fn sanitize_outputs(root: &Path) -> io::Result<Sanitized> {
    let mut done = Sanitized::default();
    let walked = walk_at(root, &mut |dir, name, stat| {
        let kind = kind_of(stat);
        if kind != SFlag::S_IFREG && kind != SFlag::S_IFDIR {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
            done.removed += 1;
            return Ok(Step::Skip);
        }
        if stat.st_mode & 0o7000 != 0 {
            let mode = Mode::from_bits_truncate(stat.st_mode & 0o777);
            fchmodat(dir, name, mode, FchmodatFlags::FollowSymlink)?;
            done.cleared += 1;
        }
        Ok(Step::Enter)
    });
    match walked {
        Ok(()) => Ok(done),
        Err(WalkError::Io(error)) => Err(error),
        Err(WalkError::Hidden(path)) => {
            Err(io::Error::other(format!("{} could not be entered", hearth_api::local_file::shown(&path))))
        }
    }
}

/// Moves the outputs in `from` to `to`, an empty folder: renamed when both are on one file system,
/// copied (through directory descriptors, at any depth) from a scratch image. Only called after
/// [`sanitize_outputs`], so there are only regular files and folders to move.
pub(super) fn move_outputs(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(error) if error.raw_os_error() == Some(Errno::EXDEV as i32) => copy_outputs(from, to),
        other => other,
    }
}

fn copy_outputs(from: &Path, to: &Path) -> io::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let source = Dir::open(from, flags, Mode::empty())?;
    let target = Dir::open(to, flags, Mode::empty())?;
    // As in `walk_at`: pending folders with their open parents, on both sides.
    let mut pending: Vec<(Rc<Dir>, Rc<Dir>, CString)> = Vec::new();
    let mut current = Some((source, target));
    while let Some((mut source, target)) = current.take() {
        let names: Vec<CString> = source
            .iter()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_owned())
            .filter(|name| !matches!(name.to_bytes(), b"." | b".."))
            .collect();
        let (source, target) = (Rc::new(source), Rc::new(target));
        for name in names {
            let stat = fstatat(&*source, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            let mode = Mode::from_bits_truncate(stat.st_mode & 0o777);
            match kind_of(&stat) {
                SFlag::S_IFDIR => {
                    nix::sys::stat::mkdirat(&*target, name.as_c_str(), mode | Mode::S_IRWXU)?;
                    pending.push((Rc::clone(&source), Rc::clone(&target), name));
                }
                SFlag::S_IFREG => {
                    let read = nix::fcntl::openat(
                        &*source,
                        name.as_c_str(),
                        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )?;
                    let write = nix::fcntl::openat(
                        &*target,
                        name.as_c_str(),
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        mode,
                    )?;
                    io::copy(&mut fs::File::from(read), &mut fs::File::from(write))?;
                }
                // Nothing else is left once the outputs were made safe.
                _ => {
                    return Err(io::Error::other(format!(
                        "{} is not a plain file",
                        name_to_path(&name).display()
                    )));
                }
            }
        }
        if let Some((source_parent, target_parent, name)) = pending.pop() {
            let source = Dir::openat(&*source_parent, name.as_c_str(), flags, Mode::empty())?;
            let target = Dir::openat(&*target_parent, name.as_c_str(), flags, Mode::empty())?;
            current = Some((source, target));
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

    #[test]
    fn outputs_keep_only_plain_files_and_folders_at_any_depth() {
        use nix::sys::stat::{fchmod, mkdirat, mknodat};
        use nix::unistd::symlinkat;

        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        fs::create_dir(&out).expect("mkdir");
        // 3,000 folders deep: a path of 6 KB, past what any path-based call takes.
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut here = Dir::open(&out, flags, Mode::empty()).expect("open");
        for _ in 0..3000 {
            mkdirat(&here, "a", Mode::from_bits_truncate(0o755)).expect("mkdirat");
            here = Dir::openat(&here, "a", flags, Mode::empty()).expect("openat");
        }
        let setuid = nix::fcntl::openat(
            &here,
            "setuid",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o755),
        )
        .expect("create");
        fchmod(&setuid, Mode::from_bits_truncate(0o6755)).expect("setuid bit");
        drop(setuid);
        symlinkat("/etc/shadow", &here, "link").expect("symlink");
        mknodat(&here, "fifo", SFlag::S_IFIFO, Mode::from_bits_truncate(0o644), 0).expect("fifo");
        mkdirat(&here, "sticky", Mode::from_bits_truncate(0o1777)).expect("sticky folder");
        fchmodat(&here, "sticky", Mode::from_bits_truncate(0o1777), FchmodatFlags::FollowSymlink)
            .expect("chmod");

        reclaim(&out).expect("reclaim");
        let done = sanitize_outputs(&out).expect("sanitize");
        // The sticky folder lost its bit already when it was reclaimed (u+rwx, no special bits).
        assert_eq!(done, Sanitized { removed: 2, cleared: 1 });
        let names: Vec<String> = here
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        let mut names = names;
        names.sort_unstable();
        assert_eq!(names, ["setuid", "sticky"]);
        for name in ["setuid", "sticky"] {
            let stat = fstatat(&here, name, AtFlags::AT_SYMLINK_NOFOLLOW).expect("stat");
            assert_eq!(stat.st_mode & 0o7000, 0, "{name} kept a special bit");
        }
        // Nothing left that the walk would act on again.
        assert_eq!(sanitize_outputs(&out).expect("again"), Sanitized::default());
    }

    #[test]
    fn outputs_copied_out_of_an_image_keep_their_tree_at_any_depth() {
        use nix::sys::stat::mkdirat;
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        fs::create_dir(&from).expect("mkdir");
        fs::create_dir(&to).expect("mkdir");
        fs::write(from.join("top.txt"), b"top").expect("write");
        fs::create_dir(from.join("side")).expect("mkdir");
        fs::write(from.join("side/run.sh"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(from.join("side/run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut here = Dir::open(&from, flags, Mode::empty()).expect("open");
        for _ in 0..3000 {
            mkdirat(&here, "a", Mode::from_bits_truncate(0o755)).expect("mkdirat");
            here = Dir::openat(&here, "a", flags, Mode::empty()).expect("openat");
        }
        let bottom = nix::fcntl::openat(
            &here,
            "bottom",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .expect("create");
        nix::unistd::write(&bottom, b"deep").expect("write");

        copy_outputs(&from, &to).expect("copy");
        assert_eq!(fs::read(to.join("top.txt")).expect("top"), b"top");
        let mode = fs::metadata(to.join("side/run.sh")).expect("run.sh").permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "the mode is kept");
        let mut there = Dir::open(&to, flags, Mode::empty()).expect("open");
        for _ in 0..3000 {
            there = Dir::openat(&there, "a", flags, Mode::empty()).expect("the copy is as deep");
        }
        let file = nix::fcntl::openat(&there, "bottom", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .expect("bottom");
        let mut read = String::new();
        io::Read::read_to_string(&mut fs::File::from(file), &mut read).expect("read");
        assert_eq!(read, "deep");
    }

    #[test]
    fn sparse_files_count_at_their_full_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("a")).expect("mkdir");
        let sparse = fs::File::create(dir.path().join("a/sparse")).expect("create");
        sparse.set_len(60 << 20).expect("set_len");
        fs::write(dir.path().join("small"), b"12345").expect("write");
        assert_eq!(logical_size(dir.path(), u64::MAX).expect("size"), (60 << 20) + 5);
        assert!(logical_size(dir.path(), 1 << 20).expect("size") > 1 << 20, "stops past the limit");
        assert!(usage(&[dir.path().to_owned()], u64::MAX).expect("usage") < 1 << 20, "few blocks");
    }
}
