//! Network namespaces for tests: small real networks on this machine, made with `ip netns`, that
//! disappear when the test ends. Tests that need one must be skipped (loudly) where
//! [`support`] says they cannot be made.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Whether network namespaces can be made here; `Err` says why not, for a loud skip.
pub fn support() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("network namespaces need root (CI runs as root)".into());
    }
    for (program, arg) in [("ip", "-V"), ("nsenter", "--version")] {
        if !Command::new(program).arg(arg).output().is_ok_and(|out| out.status.success()) {
            return Err(format!("`{program}` is not installed"));
        }
    }
    let probe = format!("hearth-probe-{}", std::process::id());
    let made = ip(&["netns", "add", &probe]).is_ok();
    let _ = ip(&["netns", "delete", &probe]);
    if made { Ok(()) } else { Err("`ip netns add` fails here".into()) }
}

/// Runs `ip ARGS…`, failing with what it printed.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A named network namespace with its loopback up; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `NAME-PID`, unique to this test process.
    pub fn create(name: &str) -> Result<Self> {
        let name = format!("{name}{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `command` run inside this namespace: its network only, with the host's filesystem, cgroups
    /// and everything else (unlike `ip netns exec`, which remounts `/sys` and hides the cgroups).
    pub fn wrap(&self, command: &Command) -> Command {
        wrap(&self.name, command)
    }

    /// A UDP socket bound inside this namespace, as [`Netns::listen`] binds a listener.
    pub fn udp(&self, address: SocketAddr) -> Result<std::net::UdpSocket> {
        let path = self.path();
        std::thread::spawn(move || -> Result<std::net::UdpSocket> {
            let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the namespace")?;
            std::net::UdpSocket::bind(address).with_context(|| format!("binding {address} in {path}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the binding thread panicked"))?
    }

    /// A TCP listener bound inside this namespace. Only the thread that binds it enters the
    /// namespace; the socket stays there wherever it is used from.
    pub fn listen(&self, address: SocketAddr) -> Result<TcpListener> {
        let path = self.path();
        std::thread::spawn(move || -> Result<TcpListener> {
            let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the namespace")?;
            TcpListener::bind(address).with_context(|| format!("binding {address} in {path}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the binding thread panicked"))?
    }
}

impl Netns {
    /// Runs `program ARGS…` inside this namespace, failing with what it printed.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut command = Command::new(program);
        command.args(args);
        let out = self.wrap(&command).output().with_context(|| format!("running {program}"))?;
        ensure!(
            out.status.success(),
            "{program} {} in {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Lets this namespace forward packets between its links, like a router.
    pub fn forward(&self) -> Result<()> {
        self.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
    }

    /// Makes this namespace a home router: what leaves by `uplink` takes the uplink's address
    /// (nftables masquerade, as a home router's NAT does), and only answers come back in:
    /// anything else arriving on the uplink is dropped unanswered, as a home router does.
    pub fn masquerade(&self, uplink: &str) -> Result<()> {
        self.forward()?;
        let rules = format!(
            "table ip hearth_nat {{\n\
             \tchain masq {{ type nat hook postrouting priority srcnat; oifname \"{uplink}\" masquerade; }}\n\
             \tchain only_answers {{ type filter hook forward priority filter; policy drop;\n\
             \t\tct state established,related accept\n\
             \t\toifname \"{uplink}\" accept\n\
             \t}}\n\
             \tchain unsolicited {{ type filter hook input priority filter;\n\
             \t\tiifname \"{uplink}\" ct state new drop\n\
             \t}}\n\
             }}\n"
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, rules).context("writing the nftables rules")?;
        let loaded = self.run("nft", &["-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    /// Whether the namespace's file is still mounted (something that unmounts it, such as a
    /// careless pivot with shared mount propagation, leaves a plain file that no tool can enter).
    pub fn is_mounted(&self) -> bool {
        let wanted = format!(" {} ", self.path());
        std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|info| info.lines().any(|l| l.contains(&wanted)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes its end of every veth pair, and so the other end.
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// Connects `a` and `b` with a veth pair, `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    ip(&["link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// Whether a program is installed, for skips.
pub fn installed(program: impl AsRef<OsStr>) -> bool {
    let program = program.as_ref();
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(Into::into))
        .any(|dir| dir.join(program).is_file())
}

/// `command` run in the network namespace `name` through `nsenter --net`, which joins it and then
/// execs the program (so the child's pid is the program's).
pub fn wrap(name: &str, command: &Command) -> Command {
    let mut wrapped = Command::new("nsenter");
    wrapped.arg(format!("--net=/run/netns/{name}")).arg("--").arg(command.get_program());
    wrapped.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}
