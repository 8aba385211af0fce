//! Who the job's users are on the host.
//!
//! Root inside a job holds every capability in the job's user namespace, but none outside it: on
//! the host it is whatever uid the namespace maps it to. An agent running as its user maps the
//! job's root to that user and nothing else. An agent running as root must not map root to root,
//! or a file the host keeps for root alone (`/proc/slabinfo`, say) would be the job's too, and an
//! escape would hold root on the host. It maps the job's ids 0–65535 to a range no account uses,
//! the last 65,536 ids of systemd's range for containers (`0x00080000`–`0x6FFFFFFF`, see
//! systemd's `UIDS-GIDS.md`), so root in the job is a nobody on the host.
//!
//! Only a process with `CAP_SETUID` in the parent user namespace may write a mapping to ids other
//! than its own, and the shim loses that when it unshares. So, as with the network, a helper is
//! forked before: it stays root in the host's namespace, waits until the shim has unshared,
//! writes the shim's `uid_map` and `gid_map`, and exits.

use std::fs;
use std::os::fd::OwnedFd;

use anyhow::{Context, bail};
use nix::fcntl::OFlag;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, getegid, geteuid, pipe2};
use serde::{Deserialize, Serialize};

/// How many ids a job has when the agent is root: enough for any image's users (`nobody` is
/// 65534).
pub const JOB_IDS: u32 = 65_536;

/// The host uid and gid of the job's root when the agent is root.
pub const FIRST_JOB_ID: u32 = 0x6FFF_0000;

/// How the job's user namespace maps its ids to the host's; part of the sandbox plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum IdMap {
    /// Root inside is the agent's own user outside, and no other id exists inside.
    Own,
    /// Ids `0..JOB_IDS` inside are `first..first + JOB_IDS` outside, none of them privileged.
    Range {
        /// The host id of the job's root.
        first: u32,
    },
}

impl IdMap {
    /// The mapping for jobs of an agent running as the current user.
    pub fn for_this_agent() -> Self {
        match geteuid().is_root() {
            true => Self::Range { first: FIRST_JOB_ID },
            false => Self::Own,
        }
    }

    /// The host uid (and gid) of the job's root, when it is not the agent's own.
    pub fn host_root(self) -> Option<u32> {
        match self {
            Self::Own => None,
            Self::Range { first } => Some(first),
        }
    }
}

/// What the shim does about its ids around its `unshare`.
pub(super) enum Mapper {
    /// The shim writes its own one-id mapping after unsharing.
    Own { uid: Uid, gid: Gid },
    /// A forked helper writes the range; `go` tells it the namespace exists, and it says on
    /// `said` why it could not.
    Helper { pid: Pid, go: OwnedFd, said: OwnedFd },
}

/// Prepares the mapping. Called by the shim before it unshares its user namespace.
pub(super) fn prepare(map: IdMap) -> anyhow::Result<Mapper> {
    let first = match map {
        IdMap::Own => return Ok(Mapper::Own { uid: geteuid(), gid: getegid() }),
        IdMap::Range { first } => first,
    };
    let (go_read, go) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let (said, say) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let shim = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the shim is single-threaded (see `shim`), so its child may run any code.
    let forked = unsafe { nix::unistd::fork() }.context("starting the id mapper")?;
    match forked {
        ForkResult::Child => {
            drop((go, said));
            let code = match write_range(shim, &go_read, first) {
                Ok(()) => 0,
                Err(error) => {
                    let _ = nix::unistd::write(&say, format!("{error:#}").as_bytes());
                    1
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => Ok(Mapper::Helper { pid: child, go, said }),
    }
}

/// The helper's side: waits for the shim's word, then maps its namespace's ids to the range.
fn write_range(shim: Pid, go: &OwnedFd, first: u32) -> anyhow::Result<()> {
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() != shim {
        bail!("the sandbox exited before its ids were mapped");
    }
    let mut byte = [0u8; 1];
    let read = loop {
        match nix::unistd::read(go, &mut byte) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.context("reading a pipe")?,
        }
    };
    if read != 1 {
        bail!("the sandbox gave up before its ids were mapped");
    }
    let line = format!("0 {first} {JOB_IDS}");
    // The gid map first: with it written by a privileged process, the job's init may drop the
    // host's supplementary groups (setgroups stays allowed).
    fs::write(format!("/proc/{shim}/gid_map"), &line).context("writing the job's gid_map")?;
    fs::write(format!("/proc/{shim}/uid_map"), &line).context("writing the job's uid_map")?;
    Ok(())
}

impl Mapper {
    /// Called by the shim right after it unshared its user namespace: maps its ids.
    pub(super) fn map(self) -> anyhow::Result<()> {
        match self {
            Self::Own { uid, gid } => {
                // Root inside is this user outside, and nothing else: no other uid exists.
                fs::write("/proc/self/setgroups", "deny").context("writing /proc/self/setgroups")?;
                fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
                    .context("writing /proc/self/uid_map")?;
                fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
                    .context("writing /proc/self/gid_map")?;
                Ok(())
            }
            Self::Helper { pid, go, said } => {
                nix::unistd::write(&go, &[1]).context("starting the id mapper")?;
                drop(go);
                loop {
                    match waitpid(pid, None) {
                        Ok(WaitStatus::Exited(_, 0)) => break,
                        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                            let mut reason = [0u8; 1024];
                            let length = nix::unistd::read(&said, &mut reason).unwrap_or(0);
                            bail!("{}", String::from_utf8_lossy(&reason[..length]))
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                        Err(error) => bail!("waiting for the id mapper: {error}"),
                    }
                }
                Ok(())
            }
        }
    }
}

/// Called by init, before anything else, when the ids are a range: becomes root of the job's
/// namespace, which on the host is the range's first id, with no supplementary group left from
/// the agent's (root's) own.
pub(super) fn become_job_root(map: IdMap) -> anyhow::Result<()> {
    if map == IdMap::Own {
        return Ok(());
    }
    nix::unistd::setgroups(&[]).context("dropping the agent's groups")?;
    let root_gid = Gid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).context("becoming the job's root group")?;
    let root = Uid::from_raw(0);
    nix::unistd::setresuid(root, root, root).context("becoming the job's root")?;
    Ok(())
}
