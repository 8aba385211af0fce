//! Granted network: outbound to the internet only, never to the host or its LAN.
//!
//! A job with `limits.network = true` still lives in its own network namespace. Its one link is a
//! tap device whose other end is [slirp4netns], a user-mode TCP/IP stack that runs outside the
//! namespace and turns the job's connections into ordinary sockets of the agent's user: the job
//! needs no veth, no bridge, no NAT rule and no root on the host. Three things keep it off the
//! owner's network:
//!
//! - `--disable-host-loopback`: the link's gateway address, which slirp4netns would otherwise map
//!   to the host's 127.0.0.1, answers nothing.
//! - Routes of type `prohibit`, added inside the namespace before the job starts, for every
//!   private, link-local, carrier-grade-NAT (Tailscale), multicast and reserved range, and for every
//!   network the host has an address on. A connection there fails at once with `EACCES`, inside
//!   the sandbox, before slirp4netns sees a packet. The job cannot remove them: it holds no
//!   capability.
//! - The link itself uses a documentation range (RFC 5737), assigned to no real network, so the
//!   few addresses routed on-link reach nothing either.
//!
//! DNS goes to a forwarder listening on the job's own address, which passes standard queries, and
//! nothing else, to the host's resolver (see [`super::dns`]); slirp4netns's own resolver is off.
//!
//! The shim starts slirp4netns through a helper forked before it unshares (slirp4netns must run
//! in the host's namespaces but can only attach once the job's exist), so slirp4netns is in the
//! job's cgroup (its CPU and memory count against the job, pause freezes it, the kill takes it) and
//! dies with the shim (parent-death signal, and its exit descriptor closing).
//!
//! [slirp4netns]: https://github.com/rootless-containers/slirp4netns

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, pipe2};
use serde::{Deserialize, Serialize};

/// The job's network device.
const TAP: &str = "tap0";

/// The largest MTU slirp4netns takes; big frames make bulk transfers several times faster.
const MTU: u32 = 65520;

/// Ranges no job reaches even with network granted: "this network", private (RFC 1918), shared
/// carrier-grade NAT (RFC 6598, also Tailscale's), loopback, link-local (cloud metadata services),
/// IETF protocol assignments, benchmarking, multicast, and reserved plus broadcast.
const NEVER: &[Ipv4Net] = &[
    net(0, 0, 0, 0, 8),
    net(10, 0, 0, 0, 8),
    net(100, 64, 0, 0, 10),
    net(127, 0, 0, 0, 8),
    net(169, 254, 0, 0, 16),
    net(172, 16, 0, 0, 12),
    net(192, 0, 0, 0, 24),
    net(192, 168, 0, 0, 16),
    net(198, 18, 0, 0, 15),
    net(224, 0, 0, 0, 4),
    net(240, 0, 0, 0, 4),
];

/// Subnets for the job's link, in order of preference: the documentation ranges (RFC 5737),
/// which no real network uses. The first one no host interface is on is taken.
const LINK_CANDIDATES: &[Ipv4Net] =
    &[net(192, 0, 2, 0, 24), net(198, 51, 100, 0, 24), net(203, 0, 113, 0, 24)];

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

/// A host network wider than this is blocked as its one address only: blocking a /4 of the
/// internet because of a strange netmask would be worse than useless.
const WIDEST_HOST_NETWORK: u8 = 8;

/// How a job's network is set up; part of the sandbox plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// The slirp4netns program.
    pub slirp4netns: PathBuf,
    /// The job's link: the job is `.100` and the gateway `.2`.
    pub link: Ipv4Net,
    /// Destinations the job's namespace routes nowhere.
    pub blocked: Vec<Ipv4Net>,
    /// The host's resolver, where the job's DNS queries go; none when the host names none.
    pub upstream: Option<std::net::SocketAddr>,
}

impl NetworkPlan {
    /// The plan for a job on this host, as its interfaces are now.
    pub fn for_this_host() -> anyhow::Result<Self> {
        let slirp4netns = super::find_program("slirp4netns").context(
            "`limits.network = true` needs slirp4netns, which is not installed on this machine \
             (Debian and Ubuntu: `apt install slirp4netns`)",
        )?;
        Self::new(slirp4netns, &host_networks()?, super::dns::host_resolver())
    }

    fn new(
        slirp4netns: PathBuf,
        host: &[Ipv4Net],
        upstream: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<Self> {
        let link = LINK_CANDIDATES
            .iter()
            .copied()
            .find(|link| !host.iter().any(|net| net.contains(link) || link.contains(net)))
            .context("every subnet the job's link could use is already a network of this host")?;
        let never = NEVER.iter().copied();
        // Merged, so no two routes have the same destination (the kernel would refuse the second).
        let blocked = Ipv4Net::aggregate(&never.chain(host.iter().copied()).collect());
        Ok(Self { slirp4netns, link, blocked, upstream })
    }

    /// The resolver address the job's `/etc/resolv.conf` names: the job's own, where the
    /// forwarder listens.
    pub fn resolver(&self) -> Ipv4Addr {
        nth_host(self.link, 100)
    }
}

fn nth_host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Every IPv4 network this host has an address on, loopback aside.
fn host_networks() -> anyhow::Result<Vec<Ipv4Net>> {
    let mut networks = Vec::new();
    for interface in nix::ifaddrs::getifaddrs().context("listing the host's network interfaces")? {
        let address = interface.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip());
        let Some(address) = address.filter(|a| !a.is_loopback()) else { continue };
        let mask = interface.netmask.as_ref().and_then(|m| m.as_sockaddr_in()).map(|m| m.ip());
        let prefix = mask.and_then(|mask| ipnet::ipv4_mask_to_prefix(mask).ok()).unwrap_or(32);
        let prefix = if prefix < WIDEST_HOST_NETWORK { 32 } else { prefix };
        networks.push(Ipv4Net::new(address, prefix)?.trunc());
    }
    Ok(networks)
}

/// The forked helper that becomes slirp4netns, and the shim's ends of the pipes to it.
pub(super) struct Helper {
    pid: Pid,
    /// Written once the namespaces exist: the helper may exec slirp4netns.
    go: OwnedFd,
    /// slirp4netns writes `1` here once the tap device is up.
    ready: OwnedFd,
    /// slirp4netns exits when this closes, that is when the shim and init have both ended.
    exit: OwnedFd,
    blocked: Vec<Ipv4Net>,
    log: PathBuf,
}

/// Forks the helper. Called by the shim after it joined the cgroup and before it unshares; the
/// helper waits until [`Helper::connect`] says the namespaces exist, then becomes slirp4netns
/// attached to them. Its output goes to `log`, never to the job's stdout.
pub(super) fn fork_helper(plan: &NetworkPlan, log: &Path) -> anyhow::Result<Helper> {
    let (go_read, go) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let (ready, ready_write) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let (exit_read, exit) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let shim = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the shim is single-threaded (see `shim`), so its child may run any code.
    let forked = unsafe { nix::unistd::fork() }.context("starting the network helper")?;
    match forked {
        ForkResult::Child => {
            drop((go, ready, exit));
            let error = become_slirp4netns(plan, shim, &go_read, &ready_write, &exit_read, &log_file);
            // Only reached when slirp4netns could not be started; the shim sees the ready pipe
            // close and reports the log's last line.
            let _ = writeln!(&log_file, "{error:#}");
            std::process::exit(1)
        }
        ForkResult::Parent { child } => {
            Ok(Helper { pid: child, go, ready, exit, blocked: plan.blocked.clone(), log: log.to_owned() })
        }
    }
}

/// The helper's side: returns only on failure.
fn become_slirp4netns(
    plan: &NetworkPlan,
    shim: Pid,
    go: &OwnedFd,
    ready: &OwnedFd,
    exit: &OwnedFd,
    log: &File,
) -> anyhow::Error {
    let run = || -> anyhow::Result<std::io::Error> {
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        if nix::unistd::getppid() != shim {
            bail!("the sandbox exited before its network started");
        }
        let mut byte = [0u8; 1];
        if read_retrying(go, &mut byte)? != 1 {
            bail!("the sandbox gave up before its network started");
        }
        // slirp4netns's sandbox makes a mount namespace, pivots and unmounts the old root. As
        // root it stays in the host's user namespace, where shared mounts (such as the bind
        // mounts under /run/netns) stay shared, so those unmounts would reach the host. In a
        // mount namespace of its own where every mount is private, they cannot. (Without root it
        // enters the job's user namespace first, where shared mounts are demoted to slaves.)
        if nix::unistd::geteuid().is_root() {
            use nix::mount::{MsFlags, mount};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .context("isolating the network's mounts")?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                .context("making the network's mounts private")?;
        }
        // The two descriptors slirp4netns is told about must survive the exec.
        for fd in [ready, exit] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).context("passing a descriptor on")?;
        }
        let (stdout, stderr) = (log.try_clone()?, log.try_clone()?);
        Ok(Command::new(&plan.slirp4netns)
            .arg("--configure")
            .arg(format!("--mtu={MTU}"))
            .arg(format!("--cidr={}", plan.link))
            .arg("--disable-host-loopback")
            .arg("--disable-dns")
            .arg("--enable-sandbox")
            .arg("--enable-seccomp")
            .arg(format!("--ready-fd={}", ready.as_raw_fd()))
            .arg(format!("--exit-fd={}", exit.as_raw_fd()))
            .arg(shim.to_string())
            .arg(TAP)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .exec())
    };
    match run() {
        Ok(exec_error) => anyhow::anyhow!("running {}: {exec_error}", plan.slirp4netns.display()),
        Err(error) => error,
    }
}

impl Helper {
    /// Called by the shim inside the new namespaces, holding every capability there: blocks the
    /// forbidden destinations, lets slirp4netns attach, and waits until the link is up. The
    /// link stays up until it is dropped.
    pub(super) fn connect(self) -> anyhow::Result<Link> {
        prohibit(&self.blocked)?;
        nix::unistd::write(&self.go, &[1]).context("starting slirp4netns")?;
        drop(self.go);
        let mut byte = [0u8; 1];
        if read_retrying(&self.ready, &mut byte)? != 1 {
            let said = fs::read_to_string(&self.log).unwrap_or_default();
            let said = said.lines().rfind(|line| !line.trim().is_empty()).unwrap_or("no output");
            bail!("the job's network could not be started: slirp4netns: {said}");
        }
        Ok(Link { pid: self.pid, exit: Some(self.exit) })
    }
}

/// A running slirp4netns. Dropping it stops slirp4netns and reaps it, so nothing of the job's
/// network outlives the shim, even as a zombie.
pub(super) struct Link {
    pid: Pid,
    exit: Option<OwnedFd>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Init holds a copy of the exit descriptor too; it has exited by the time the shim drops
        // this, so closing ours is what stops slirp4netns.
        drop(self.exit.take());
        while let Err(nix::errno::Errno::EINTR) = waitpid(self.pid, None) {}
    }
}

fn read_retrying(fd: &OwnedFd, buf: &mut [u8]) -> anyhow::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.context("reading a pipe"),
        }
    }
}

/// Adds a `prohibit` route for each of `nets` to the main table of this network namespace.
fn prohibit(nets: &[Ipv4Net]) -> anyhow::Result<()> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting a netlink socket")?;
    let mut reply = Vec::with_capacity(8192);
    for (sequence, net) in (1..).zip(nets) {
        let mut route = RouteMessage::default();
        route.header = RouteHeader {
            address_family: AddressFamily::Inet,
            destination_prefix_length: net.prefix_len(),
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Static,
            scope: RouteScope::Universe,
            kind: RouteType::Prohibit,
            ..RouteHeader::default()
        };
        route.attributes = vec![RouteAttribute::Destination(RouteAddress::Inet(net.network()))];
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
        header.sequence_number = sequence;
        let mut message =
            NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::NewRoute(route)));
        message.finalize();
        let mut request = vec![0; message.buffer_len()];
        message.serialize(&mut request);
        socket.send(&request, 0).with_context(|| format!("blocking {net}"))?;

        reply.clear();
        socket.recv(&mut reply, 0).with_context(|| format!("blocking {net}"))?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
            .with_context(|| format!("reading the kernel's answer to blocking {net}"))?;
        match answer.payload {
            NetlinkPayload::Error(error) if error.code.is_some() => {
                bail!("blocking {net}: {}", error.to_io())
            }
            NetlinkPayload::Error(_) => {} // the acknowledgement
            other => bail!("blocking {net}: unexpected answer {other:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    #[test]
    fn the_link_avoids_the_hosts_own_networks() {
        let plan = NetworkPlan::new("slirp4netns".into(), &[cidr("192.168.1.0/24")], None).unwrap();
        assert_eq!(plan.link, cidr("192.0.2.0/24"));
        assert_eq!(plan.resolver(), Ipv4Addr::new(192, 0, 2, 100), "the job's own address");

        let plan = NetworkPlan::new("slirp4netns".into(), &[cidr("192.0.2.0/25")], None).unwrap();
        assert_eq!(plan.link, cidr("198.51.100.0/24"));

        let taken = [cidr("192.0.0.0/16"), cidr("198.51.0.0/16"), cidr("203.0.113.64/26")];
        assert!(NetworkPlan::new("slirp4netns".into(), &taken, None).is_err());
    }

    #[test]
    fn private_ranges_and_host_networks_are_blocked_once_each() {
        let host = [cidr("203.0.113.8/29"), cidr("10.1.2.0/24"), cidr("192.168.1.0/24")];
        let plan = NetworkPlan::new("slirp4netns".into(), &host, None).unwrap();
        for blocked in ["10.0.0.0/8", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "203.0.113.8/29"] {
            assert!(plan.blocked.contains(&cidr(blocked)), "{blocked} not in {:?}", plan.blocked);
        }
        // Contained in 10.0.0.0/8 and 192.168.0.0/16: a second route would be refused.
        assert!(!plan.blocked.contains(&cidr("10.1.2.0/24")));
        assert!(!plan.blocked.contains(&cidr("192.168.1.0/24")));
        assert!(!plan.blocked.iter().any(|blocked| blocked.contains(&plan.link.network())));
        // The public internet stays reachable.
        for public in [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(151, 101, 2, 137)] {
            assert!(!plan.blocked.iter().any(|blocked| blocked.contains(&public)), "{public}");
        }
    }
}
