//! The resolver of a job granted network: a forwarder that passes DNS queries to the host's
//! resolver, and nothing else.
//!
//! slirp4netns's own resolver address would carry any TCP, and any UDP, to port 53 of the host's
//! resolver, which often sits in a range the job may not reach (the home router, `127.0.0.53`).
//! So slirp4netns runs with `--disable-dns`, and the job's `/etc/resolv.conf` names its own
//! address instead, where this forwarder listens on UDP port 53. Each datagram must be one
//! standard query ([`check_query`]: one question, class IN, no zone transfer, at most an EDNS
//! record, 512 bytes at most); anything else is dropped. A query goes out under a fresh random id
//! from a socket in the host's network namespace, and only an answer to a query in flight comes
//! back. TCP to port 53 finds nothing listening.
//!
//! The forwarder is a process the shim forks once the job's network namespace exists and before
//! it makes the job's pid namespace, so it holds one socket in each network namespace, is in the
//! job's cgroup, and is out of the job's sight (no signal, no ptrace reaches it).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::prctl;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};

/// The port the forwarder listens on.
pub const PORT: u16 = 53;

/// The longest query forwarded: what plain DNS over UDP allows.
pub const MAX_QUERY: usize = 512;

/// The longest answer passed back (EDNS answers may exceed 512 bytes).
const MAX_ANSWER: usize = 4096;

/// Queries in flight at once; past it the oldest is forgotten.
const MAX_IN_FLIGHT: usize = 64;

/// How long an answer may take before its query is forgotten.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The host's resolver, from `/etc/resolv.conf`, or from the file `HEARTH_RESOLV_CONF` names (a
/// machine whose resolver is configured elsewhere; the tests' namespaces). `None` when it names
/// none this forwarder can use.
pub fn host_resolver() -> Option<SocketAddr> {
    let path = std::env::var_os("HEARTH_RESOLV_CONF").unwrap_or_else(|| "/etc/resolv.conf".into());
    let text = hearth_api::local_file::read_text(Path::new(&path), 64 << 10, "resolver file").ok()?;
    resolver_in(&text)
}

/// The first `nameserver` of a `resolv.conf` text, but for a link-local IPv6 address, which needs
/// an interface this forwarder does not track.
fn resolver_in(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .find(|address| !matches!(address, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .map(|address| SocketAddr::new(address, PORT))
}

/// Why a datagram is not a query the forwarder passes on.
pub fn check_query(query: &[u8]) -> Result<(), &'static str> {
    if query.len() < 12 {
        return Err("shorter than a DNS header");
    }
    if query.len() > MAX_QUERY {
        return Err("longer than 512 bytes");
    }
    let word = |at: usize| query.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let flags = word(2).unwrap_or(0);
    if flags & 0x8000 != 0 {
        return Err("an answer, not a query");
    }
    if (flags >> 11) & 0xF != 0 {
        return Err("not a standard query");
    }
    if word(4) != Some(1) {
        return Err("not exactly one question");
    }
    if word(6) != Some(0) || word(8) != Some(0) {
        return Err("answers or authorities in a query");
    }
    let additional = word(10).unwrap_or(0);
    if additional > 1 {
        return Err("more than one additional record");
    }
    let mut at = 12;
    let mut name = 0usize;
    loop {
        let length = usize::from(*query.get(at).ok_or("the name runs past the end")?);
        at += 1;
        if length == 0 {
            break;
        }
        if length > 63 {
            return Err("a label longer than 63 bytes, or a compressed name");
        }
        name += length + 1;
        if name > 255 {
            return Err("a name longer than 255 bytes");
        }
        at += length;
    }
    let (kind, class) = (word(at).ok_or("no question type")?, word(at + 2).ok_or("no question class")?);
    at += 4;
    // IXFR, AXFR, MAILB, MAILA and ANY: zone transfers and questions that ask for everything.
    if (251..=255).contains(&kind) {
        return Err("a zone transfer or a question for everything");
    }
    if class != 1 {
        return Err("not of class IN");
    }
    if additional == 1 {
        // EDNS: an OPT record (type 41) of the root name, and nothing else.
        if query.get(at) != Some(&0) || word(at + 1) != Some(41) {
            return Err("an additional record that is not EDNS");
        }
        let data = usize::from(word(at + 9).ok_or("the EDNS record runs past the end")?);
        at += 11 + data;
    }
    if at != query.len() {
        return Err("bytes after the question");
    }
    Ok(())
}

/// The socket queries leave from, in the host's network namespace. Made by the shim before it
/// unshares.
pub(super) fn upstream(resolver: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local: SocketAddr = match resolver {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).context("opening the resolver's socket")?;
    socket.connect(resolver).with_context(|| format!("reaching the host's resolver {resolver}"))?;
    Ok(socket)
}

/// The running forwarder. Dropping it stops and reaps it.
pub(super) struct Forwarder {
    pid: Pid,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = waitpid(self.pid, None) {}
    }
}

/// Binds `listen` in the job's network namespace (the shim's, by now) and forks the forwarder
/// with both sockets. Called by the shim before it unshares the pid namespace.
pub(super) fn start(upstream: UdpSocket, listen: SocketAddr) -> anyhow::Result<Forwarder> {
    let inside =
        UdpSocket::bind(listen).with_context(|| format!("listening for the job's queries on {listen}"))?;
    #[allow(unsafe_code)]
    // SAFETY: the shim is single-threaded (see `shim`), so its child may run any code.
    let forked = unsafe { nix::unistd::fork() }.context("starting the job's resolver")?;
    match forked {
        ForkResult::Child => {
            let _ = prctl::set_pdeathsig(Signal::SIGKILL);
            // It needs no capability of the job's namespaces to pass datagrams on.
            let _ = caps::clear(None, caps::CapSet::Effective);
            let _ = caps::clear(None, caps::CapSet::Permitted);
            let _ = prctl::set_no_new_privs();
            serve(&inside, &upstream);
            std::process::exit(0)
        }
        ForkResult::Parent { child } => Ok(Forwarder { pid: child }),
    }
}

/// A query sent upstream and waiting for its answer.
struct InFlight {
    /// The id it went out with.
    ours: u16,
    /// The id the job gave it.
    theirs: [u8; 2],
    client: SocketAddr,
    sent: Instant,
}

/// Passes queries and answers until killed.
fn serve(inside: &UdpSocket, upstream: &UdpSocket) {
    let random = ring::rand::SystemRandom::new();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut buffer = vec![0u8; MAX_ANSWER];
    loop {
        let mut fds = [
            PollFd::new(inside.as_fd(), PollFlags::POLLIN),
            PollFd::new(upstream.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
            continue;
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|events| events.contains(PollFlags::POLLIN));
        let (query_ready, answer_ready) = (ready(&fds[0]), ready(&fds[1]));
        in_flight.retain(|query| query.sent.elapsed() < ANSWER_TIMEOUT);
        if query_ready && let Ok((length, client)) = inside.recv_from(&mut buffer[..MAX_QUERY + 1]) {
            let query = &mut buffer[..length];
            let mut id = [0u8; 2];
            if check_query(query).is_ok() && ring::rand::SecureRandom::fill(&random, &mut id).is_ok() {
                let theirs = [query[0], query[1]];
                query[..2].copy_from_slice(&id);
                if upstream.send(query).is_ok() {
                    if in_flight.len() == MAX_IN_FLIGHT {
                        in_flight.pop_front();
                    }
                    let ours = u16::from_be_bytes(id);
                    in_flight.push_back(InFlight { ours, theirs, client, sent: Instant::now() });
                }
            }
        }
        if answer_ready && let Ok(length) = upstream.recv(&mut buffer) {
            let answer = &mut buffer[..length];
            let is_answer = length >= 12 && answer[2] & 0x80 != 0;
            let id = u16::from_be_bytes([answer[0], answer.get(1).copied().unwrap_or(0)]);
            let at = in_flight.iter().position(|query| query.ours == id);
            if is_answer && let Some(query) = at.and_then(|at| in_flight.remove(at)) {
                answer[..2].copy_from_slice(&query.theirs);
                let _ = inside.send_to(answer, query.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name`, type `kind`, with an EDNS record when `edns`.
    pub(crate) fn query(name: &str, kind: u16, edns: bool) -> Vec<u8> {
        let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        for label in name.split('.') {
            bytes.push(label.len() as u8);
            bytes.extend_from_slice(label.as_bytes());
        }
        bytes.push(0);
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            bytes.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        bytes
    }

    #[test]
    fn only_standard_queries_pass() {
        assert_eq!(check_query(&query("example.org", 1, false)), Ok(()));
        assert_eq!(check_query(&query("example.org", 28, true)), Ok(()));
        let mut answer = query("example.org", 1, false);
        answer[2] |= 0x80;
        let mut update = query("example.org", 1, false);
        update[2] = 5 << 3;
        let mut trailing = query("example.org", 1, false);
        trailing.push(0);
        let mut compressed = query("example.org", 1, false);
        compressed[12] = 0xc0;
        let mut chaos = query("version.bind", 16, false);
        let at = chaos.len() - 1;
        chaos[at] = 3;
        let cases: [(&str, Vec<u8>); 9] = [
            ("an answer", answer),
            ("an update", update),
            ("a zone transfer", query("example.org", 252, false)),
            ("any", query("example.org", 255, false)),
            ("class CH", chaos),
            ("trailing bytes", trailing),
            ("a compressed name", compressed),
            ("an HTTP request", b"GET / HTTP/1.1\r\nHost: router\r\n\r\n".to_vec()),
            ("too long", [query("example.org", 1, false), vec![0; 600]].concat()),
        ];
        for (what, bytes) in cases {
            assert!(check_query(&bytes).is_err(), "{what} passed");
        }
    }

    #[test]
    fn the_resolver_is_the_first_usable_nameserver() {
        let text = "# generated\nsearch lan\nnameserver fe80::1%eth0\nnameserver 10.0.0.1\nnameserver ::1\n";
        assert_eq!(resolver_in(text), Some("10.0.0.1:53".parse().expect("address")));
        assert_eq!(resolver_in("nameserver ::1\n"), Some("[::1]:53".parse().expect("address")));
        assert_eq!(resolver_in("search lan\n"), None);
    }
}
