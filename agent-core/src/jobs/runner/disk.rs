//! The job's scratch, `scratch/` in its folder: `out`, `work` and `tmp`, all it may write, and
//! `in`, its inputs.
//!
//! Where the kernel can enforce it, `scratch/` is a file system of its own: an ext4 image the size
//! of the job's disk, loop-mounted `nosuid,nodev`. A write past it fails with `ENOSPC`, however the
//! job writes: a file it unlinked but keeps open counts, and no burst between two measurements
//! gets through. The image file is sparse, so it takes on the host only what the job wrote, and
//! never more than its size. Mounting a block file system takes root, so an agent running as its
//! user (the desktop's), or on a machine where a trial image does not mount, keeps a plain
//! folder, and the runner's watcher is the only limit there.
//!
//! Once the job is dead its outputs are copied to the job folder's `out/`, and the image is
//! unmounted and deleted.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use nix::mount::{MntFlags, umount2};

use crate::jobs::sandbox::{SCRATCH, find_program};

/// The image file behind [`SCRATCH`], next to it.
const IMAGE: &str = "scratch.img";

/// The folders of the scratch the job writes, bound at `/out`, `/work` and `/tmp` inside (its
/// `in`, bound read-only at `/in`, is the inputs').
pub(crate) const WRITABLE: [&str; 3] = ["out", "work", "tmp"];

/// How the scratch is limited on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Limit {
    /// A loop-mounted image made with this `mkfs.ext4`: the kernel enforces the disk.
    Kernel { mkfs: PathBuf },
    /// A plain folder, measured by the runner's watcher; the reason the kernel cannot.
    Watched { why: String },
}

impl Limit {
    /// What this machine allows: an image needs root, the loop driver and `mkfs.ext4`, and then
    /// a small one is made and mounted in `dir`, which must exist, to be sure (a container may
    /// show the loop driver but refuse its devices).
    pub(crate) fn for_this_host(dir: &Path) -> Self {
        if !nix::unistd::geteuid().is_root() {
            return Self::Watched {
                why: "the agent does not run as root, which mounting an image needs".into(),
            };
        }
        if !Path::new("/dev/loop-control").exists() {
            return Self::Watched { why: "this machine has no loop devices (/dev/loop-control)".into() };
        }
        let Some(mkfs) = find_program("mkfs.ext4") else {
            return Self::Watched {
                why: "mkfs.ext4 is not installed (Debian: `apt install e2fsprogs`)".into(),
            };
        };
        let probe = || -> anyhow::Result<()> {
            let trial = tempfile::Builder::new().prefix(".disk-probe-").tempdir_in(dir)?;
            let scratch = trial.path().join(SCRATCH);
            fs::create_dir(&scratch)?;
            let mounted = mount_image(trial.path(), &scratch, 1 << 20, &mkfs);
            remove(trial.path())?;
            mounted
        };
        match probe() {
            Ok(()) => Self::Kernel { mkfs },
            Err(error) => Self::Watched { why: format!("a disk image cannot be mounted here: {error:#}") },
        }
    }
}

/// The image's size for a disk of `disk` bytes: ext4 keeps some of it for its own tables (about
/// 2 % with its default inode ratio, and a floor for a small one), which the job must not lose.
pub(crate) fn image_bytes(disk: u64) -> u64 {
    disk.saturating_add(disk / 16).saturating_add(4 << 20)
}

/// Makes `job_dir/scratch` with `out`, `work` and `tmp` in it, owned by `owner` (the uid and gid
/// the job's root is on the host) when it is not the agent's user, and `in` for `inputs` bytes
/// of inputs (which an image holds beside the job's `disk`).
pub(crate) fn create(
    job_dir: &Path,
    disk: u64,
    inputs: u64,
    limit: &Limit,
    owner: Option<u32>,
) -> anyhow::Result<PathBuf> {
    let scratch = job_dir.join(SCRATCH);
    fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    if let Limit::Kernel { mkfs } = limit {
        mount_image(job_dir, &scratch, disk.saturating_add(inputs), mkfs)?;
    }
    fs::create_dir(scratch.join("in")).context("creating the inputs' folder")?;
    for name in WRITABLE {
        let dir = scratch.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(id) = owner {
            chown(&dir, Some(id), Some(id))
                .with_context(|| format!("handing {} to the job", dir.display()))?;
        }
    }
    Ok(scratch)
}

fn mount_image(job_dir: &Path, scratch: &Path, disk: u64, mkfs: &Path) -> anyhow::Result<()> {
    let image = job_dir.join(IMAGE);
    File::create(&image)
        .and_then(|file| file.set_len(image_bytes(disk)))
        .with_context(|| format!("creating the disk image {}", image.display()))?;
    // No journal (the image dies with the job, crash consistency buys nothing) and no blocks
    // reserved for root, so the job gets the whole size.
    run(Command::new(mkfs)
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard"])
        .arg(&image))
    .context("making the job's disk image")?;
    // `mount` finds a free loop device and sets it to detach at the unmount.
    run(Command::new(find_mount()?)
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(&image)
        .arg(scratch))
    .context("mounting the job's disk image")
}

fn find_mount() -> anyhow::Result<PathBuf> {
    find_program("mount").context("`mount` is not installed (Debian: `apt install mount`)")
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Unmounts and deletes the image behind `job_dir/scratch`, if there is one, and removes the
/// folder. Only called once the job is dead (or its agent was).
pub(crate) fn remove(job_dir: &Path) -> io::Result<()> {
    let scratch = job_dir.join(SCRATCH);
    if is_mount_point(&scratch, job_dir) {
        // Lazily, should anything still hold it open: it goes with its last user.
        umount2(&scratch, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    match fs::remove_dir_all(&scratch) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    match fs::remove_file(job_dir.join(IMAGE)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Whether `dir` is another file system than `parent`, its parent.
fn is_mount_point(dir: &Path, parent: &Path) -> bool {
    match (fs::symlink_metadata(dir), fs::metadata(parent)) {
        (Ok(dir), Ok(parent)) => dir.is_dir() && dir.dev() != parent.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::statvfs::statvfs;

    /// An image of any disk size leaves the job at least that size free.
    #[test]
    fn the_image_leaves_the_whole_disk_free_and_no_more_than_it_took() {
        let probed = tempfile::tempdir().expect("tempdir");
        let Limit::Kernel { mkfs } = Limit::for_this_host(probed.path()) else {
            eprintln!(
                "SKIPPED the_image_leaves_the_whole_disk_free: no kernel limit here (not root, or no loop)"
            );
            return;
        };
        for disk in [1 << 20, 4 << 20, 64 << 20, 1 << 30, 16 << 30] {
            let dir = tempfile::tempdir().expect("tempdir");
            let scratch = dir.path().join(SCRATCH);
            fs::create_dir(&scratch).expect("mkdir");
            mount_image(dir.path(), &scratch, disk, &mkfs).expect("mount");
            let free = statvfs(&scratch).expect("statvfs");
            let available = free.blocks_available() * free.fragment_size();
            let on_host = fs::metadata(dir.path().join(IMAGE)).expect("image").blocks() * 512;
            remove(dir.path()).expect("remove");
            assert!(available >= disk, "a {disk}-byte disk has {available} bytes free");
            assert!(available <= image_bytes(disk), "{available} free for {disk}");
            // Sparse: the empty file system takes a sliver of its size on the host.
            assert!(on_host < (disk / 8).max(4 << 20), "an empty {disk}-byte image takes {on_host}");
            assert!(!scratch.exists() && !dir.path().join(IMAGE).exists(), "left behind");
        }
    }
}
