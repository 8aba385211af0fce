//! The job's private root: a small tmpfs holding read-only system folders, a synthesized `/etc`, a
//! minimal `/dev`, the job's own `/proc`, and its `/in`, `/out`, `/work` and `/tmp`. Nothing else of
//! the host is mounted, so the owner's home, `/root`, `/etc/shadow`, the agent's data dir, host
//! sockets and `/sys` do not exist inside. After the pivot the root itself is read-only; only
//! `/out`, `/work`, `/tmp` and `/dev/shm` take writes.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::statvfs::{FsFlags, statvfs};

use super::network::NetworkPlan;
use super::nvidia::{self, DriverFiles};
use super::{Plan, RootFs};

/// Top-level folders of the host that make up the `base` image, when they exist.
const BASE_ENTRIES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host files of `/etc` the base image needs to run programs: the dynamic linker's cache and the
/// alternatives symlink farm (`awk`, `editor`, …). System configuration, none of it the owner's.
const BASE_ETC: &[&str] = &["ld.so.cache", "alternatives"];

/// Entries of an image never taken from it: the sandbox supplies these itself.
const RESERVED: &[&str] = &["in", "out", "work", "tmp", "proc", "dev", "sys", "etc", ".hearth"];

/// Devices every job gets.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// `/proc` entries that reveal or touch the host kernel, hidden under an empty file.
const PROC_MASKED: &[&str] = &["kcore", "keys", "timer_list", "sysrq-trigger", "kmsg", "kallsyms"];

/// `/proc` folders made read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "bus", "fs", "irq"];

const PASSWD: &str =
    "root:x:0:0:job:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost\n";

/// Gives init a mount namespace of its own, where nothing mounted propagates back to the host.
/// Runs in init, which must already be in the job's user and pid namespaces.
pub(super) fn unshare_mounts() -> anyhow::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("creating the mount namespace")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making mounts private")
}

/// Builds the private root for the job folder, init's working folder, and pivots into it, once
/// init has its own mount namespace ([`unshare_mounts`]). The job folder is named only relative to
/// the working folder: with mapped ids, init may not be able to enter its parents.
pub(super) fn enter(plan: &Plan, image: &RootFs) -> anyhow::Result<()> {
    let (job_dir, network) = (Path::new("."), plan.network.as_ref());

    let root = job_dir.join("root");
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=16m,mode=0755"),
    )
    .with_context(|| format!("mounting the root tmpfs on {}", root.display()))?;

    match image {
        RootFs::Base => {
            for name in BASE_ENTRIES {
                take_entry(Path::new("/"), name, &root)?;
            }
            make_etc(&root, Some(Path::new("/etc")), network)?;
        }
        RootFs::Image(dir) => {
            for entry in fs::read_dir(dir).with_context(|| format!("reading image {}", dir.display()))? {
                let name = entry?.file_name();
                let name = name.to_str().context("an image entry's name is not UTF-8")?;
                if !RESERVED.contains(&name) {
                    take_entry(dir, name, &root)?;
                }
            }
            make_etc(&root, None, network)?;
            // The image's own /etc replaces the synthesized one, but only a real folder: a
            // symlink would be followed by the bind mount, out of the image.
            let image_etc = dir.join("etc");
            if fs::symlink_metadata(&image_etc).is_ok_and(|meta| meta.is_dir()) {
                bind(&image_etc, &root.join("etc"), Access::ReadOnly)?;
                // Its resolv.conf (as in Docker, the image's is the host's business) names ours,
                // when it has one to mount over.
                let resolv = image_etc.join("resolv.conf");
                if network.is_some() && fs::symlink_metadata(&resolv).is_ok_and(|meta| meta.is_file()) {
                    bind(&job_dir.join(super::RESOLV_CONF), &root.join("etc/resolv.conf"), Access::ReadOnly)?;
                }
            }
        }
    }
    make_dev(&root, &plan.devices)?;
    add_driver(&root, &plan.driver)?;
    let scratch = job_dir.join(super::SCRATCH);
    for (source, name, access) in [
        (scratch.join("in"), "in", Access::ReadOnly),
        (scratch.join("out"), "out", Access::ReadWrite),
        (scratch.join("work"), "work", Access::ReadWrite),
        (scratch.join("tmp"), "tmp", Access::ReadWrite),
    ] {
        let target = root.join(name);
        fs::create_dir(&target).with_context(|| format!("creating /{name}"))?;
        bind(&source, &target, access)?;
    }
    make_proc(&root)?;

    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only ours.
    nix::unistd::chdir(&root).context("entering the new root")?;
    nix::unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the host's root")?;
    nix::unistd::chdir("/").context("entering /")?;
    remount("/", MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
        .context("making the root read-only")?;
    nix::unistd::chdir("/work").context("entering /work")?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    ReadWrite,
    /// A device node: read-write, and device access kept.
    Device,
}

/// Brings `source_dir/name` into the new root: a symlink is copied as a symlink (merged-/usr
/// systems have `/bin -> usr/bin`), a folder or file is bind-mounted read-only.
fn take_entry(source_dir: &Path, name: &str, root: &Path) -> anyhow::Result<()> {
    let source = source_dir.join(name);
    let Ok(meta) = fs::symlink_metadata(&source) else { return Ok(()) };
    let target = root.join(name);
    if meta.file_type().is_symlink() {
        let link = fs::read_link(&source)?;
        symlink(&link, &target).with_context(|| format!("linking {}", target.display()))?;
    } else if meta.is_dir() {
        fs::create_dir(&target)?;
        bind(&source, &target, Access::ReadOnly)?;
    } else if meta.is_file() {
        fs::write(&target, b"")?;
        bind(&source, &target, Access::ReadOnly)?;
    }
    Ok(())
}

/// A synthesized `/etc`: one user and group (root, who is nobody on the host), localhost,
/// and, for the base image, the few host files programs need to start. With network granted, the
/// job's resolver and, for the base image, the host's CA certificates (public ones only:
/// `/etc/ssl/private` stays out).
fn make_etc(root: &Path, host_etc: Option<&Path>, network: Option<&NetworkPlan>) -> anyhow::Result<()> {
    let etc = root.join("etc");
    fs::create_dir(&etc)?;
    fs::write(etc.join("passwd"), PASSWD)?;
    fs::write(etc.join("group"), GROUP)?;
    fs::write(etc.join("hosts"), HOSTS)?;
    fs::write(etc.join("hostname"), format!("{}\n", super::HOSTNAME))?;
    if let Some(network) = network {
        fs::write(etc.join("resolv.conf"), resolv_conf(network))?;
    }
    if let Some(host_etc) = host_etc {
        for name in BASE_ETC {
            take_entry(host_etc, name, &etc)?;
        }
        if network.is_some() {
            fs::create_dir(etc.join("ssl"))?;
            take_entry(&host_etc.join("ssl"), "certs", &etc.join("ssl"))?;
        }
    }
    Ok(())
}

/// The job's `/etc/resolv.conf`: its DNS forwarder, or nothing on a host that names no resolver.
pub(super) fn resolv_conf(network: &NetworkPlan) -> String {
    match network.upstream {
        Some(_) => format!("nameserver {}\n", network.resolver()),
        None => String::new(),
    }
}

/// The host's NVIDIA driver files, read-only under [`nvidia::DIR`], for a job granted GPUs.
fn add_driver(root: &Path, driver: &DriverFiles) -> anyhow::Result<()> {
    if driver.libraries.is_empty() && driver.programs.is_empty() {
        return Ok(());
    }
    let inside = root.join(nvidia::DIR.trim_start_matches('/'));
    for (folder, files) in [("lib", &driver.libraries), ("bin", &driver.programs)] {
        let dir = inside.join(folder);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, source) in files {
            let target = dir.join(name);
            fs::write(&target, b"")?;
            bind(source, &target, Access::ReadOnly)?;
        }
    }
    Ok(())
}

fn make_dev(root: &Path, devices: &[PathBuf]) -> anyhow::Result<()> {
    let dev = root.join("dev");
    fs::create_dir(&dev)?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::write(&target, b"")?;
        bind(&Path::new("/dev").join(name), &target, Access::Device)?;
    }
    for device in devices {
        let name =
            device.strip_prefix("/dev").with_context(|| format!("{} is not under /dev", device.display()))?;
        let target = dev.join(name);
        fs::write(&target, b"")?;
        bind(device, &target, Access::Device)?;
    }
    symlink("/proc/self/fd", dev.join("fd"))?;
    for (fd, name) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        symlink(format!("/proc/self/fd/{fd}"), dev.join(name))?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=64m,mode=1777"),
    )
    .context("mounting /dev/shm")?;
    Ok(())
}

fn make_proc(root: &Path) -> anyhow::Result<()> {
    let proc = root.join("proc");
    fs::create_dir(&proc)?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting /proc")?;
    let null = root.join("dev/null");
    for name in PROC_MASKED {
        let target = proc.join(name);
        if target.exists() {
            bind(&null, &target, Access::Device)?;
        }
    }
    for name in PROC_READ_ONLY {
        let target = proc.join(name);
        if target.exists() {
            bind(&target, &target, Access::ReadOnly)?;
        }
    }
    Ok(())
}

/// Bind-mounts `source` on `target` and then sets its flags. A bind mount keeps the source mount's
/// flags until remounted, and inside a user namespace the remount must repeat the flags the host
/// locked (nodev, noexec, atime) or the kernel refuses it. The bind is not recursive: a host mount
/// below `source` is not brought along, so none can stay writable under a read-only folder.
fn bind(source: &Path, target: &Path, access: Access) -> anyhow::Result<()> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
    let mut flags = MsFlags::MS_NOSUID;
    match access {
        Access::ReadOnly => flags |= MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        Access::ReadWrite => flags |= MsFlags::MS_NODEV,
        Access::Device => flags |= MsFlags::MS_NOEXEC,
    }
    remount(target, flags).with_context(|| format!("setting the flags of {}", target.display()))
}

/// Remounts a bind mount with `flags` plus whatever the kernel insists stays.
fn remount(target: impl AsRef<Path>, flags: MsFlags) -> anyhow::Result<()> {
    let target = target.as_ref();
    let current = statvfs(target)?.flags();
    let mut flags = flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    for (kept, flag) in [
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(kept) {
            flags |= flag;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)?;
    Ok(())
}
