//! The seccomp filter every job runs under: allow by default, deny the known escape and attack
//! surface. Built with libseccomp, which also kills any call from a foreign ABI (x32 on x86_64, for
//! instance), the classic way around a deny list.

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use nix::sched::CloneFlags;

/// Denied outright with EPERM.
const DENIED: &[&str] = &[
    // Inspecting or driving other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // Kernel attack surface.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Keyrings.
    "keyctl",
    "add_key",
    "request_key",
    // Mounts, old and new API, and namespaces.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "setns",
    "unshare",
    // Files by handle bypass the mount tree.
    "open_by_handle_at",
    "name_to_handle_at",
    // The machine itself.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "vhangup",
];

/// Terminal ioctls that push input into, or control, a terminal.
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541c;

/// clone() flags that create namespaces, and CLONE_NEWTIME, which nix does not name.
fn namespace_flags() -> impl Iterator<Item = u64> {
    const CLONE_NEWTIME: u64 = 0x80;
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET;
    flags.iter().map(|flag| flag.bits() as u64).chain([CLONE_NEWTIME])
}

/// The vsock address family (linux/socket.h).
const AF_VSOCK: u64 = 40;

const EPERM: i32 = 1;
const ENOSYS: i32 = 38;

/// Builds the filter and loads it into this process; every child inherits it.
pub(super) fn load() -> anyhow::Result<()> {
    filter()?.load()?;
    Ok(())
}

fn filter() -> anyhow::Result<ScmpFilterContext> {
    let mut filter = ScmpFilterContext::new(ScmpAction::Allow)?;
    let deny = ScmpAction::Errno(EPERM);
    for name in DENIED {
        // A name this libseccomp or architecture does not know cannot be called either.
        if let Ok(syscall) = ScmpSyscall::from_name(name) {
            filter.add_rule(deny, syscall)?;
        }
    }
    // The request is an unsigned int to the kernel: comparing the low 32 bits only catches the
    // variants with high bits set too.
    let ioctl = ScmpSyscall::from_name("ioctl")?;
    for request in [TIOCSTI, TIOCLINUX] {
        let compare = ScmpArgCompare::new(1, ScmpCompareOp::MaskedEqual(0xffff_ffff), request);
        filter.add_rule_conditional(deny, ioctl, &[compare])?;
    }
    let clone = ScmpSyscall::from_name("clone")?;
    for flag in namespace_flags() {
        let compare = ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(flag), flag);
        filter.add_rule_conditional(deny, clone, &[compare])?;
    }
    // vsock talks to the hypervisor's host and is not confined by the network namespace.
    let socket = ScmpSyscall::from_name("socket")?;
    filter.add_rule_conditional(deny, socket, &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, AF_VSOCK)])?;
    // clone3 passes its flags in memory, where seccomp cannot look: ENOSYS makes libc fall back to
    // clone, whose flags the rules above do check.
    filter.add_rule(ScmpAction::Errno(ENOSYS), ScmpSyscall::from_name("clone3")?)?;
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_on_this_architecture() {
        let filter = filter().expect("filter");
        // Exporting runs libseccomp's whole compiler, so a bad rule fails here, not in a job.
        let file = tempfile::tempfile().expect("tempfile");
        filter.export_bpf(&file).expect("export");
        assert!(file.metadata().expect("metadata").len() > 0);
    }
}
