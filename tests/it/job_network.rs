//! Granted network, on a real network built from namespaces: the agent's machine (`host`) has a
//! LAN address and a link to a router (`wan`) that also plays a server on the internet. A job
//! granted network must reach the internet server and nothing of the host or its networks.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use hearth_tests::jobs::{JobDir, processes_with};
use hearth_tests::netns::{Netns, veth};

/// A server that greets every connection and counts them, until the test drops it.
struct Server {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(listener: TcpListener, greeting: &'static str) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, halt) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            // Bounded: the test's jobs finish well within this.
            let until = Instant::now() + Duration::from_secs(120);
            while halt.load(Ordering::SeqCst) == 0 && Instant::now() < until {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.write_all(greeting.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self { accepted, stop, thread: Some(thread) })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) fn granted_network_reaches_the_internet_and_nothing_of_the_host() -> Result<()> {
    let host = Netns::create("hh")?;
    let wan = Netns::create("hw")?;
    let pid = std::process::id();
    let (host_if, wan_if) = (format!("vh{pid}"), format!("vw{pid}"));
    veth(&host, &host_if, &wan, &wan_if)?;
    host.ip(&["addr", "add", "203.0.113.2/30", "dev", &host_if])?;
    host.ip(&["route", "add", "default", "via", "203.0.113.1"])?;
    // The host's LAN address.
    host.ip(&["addr", "add", "192.168.77.1/24", "dev", "lo"])?;
    wan.ip(&["addr", "add", "203.0.113.1/30", "dev", &wan_if])?;
    // A server out on the internet.
    wan.ip(&["addr", "add", "198.51.100.7/32", "dev", "lo"])?;

    let host_listener = host.listen(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let host_port = host_listener.local_addr()?.port();
    let host_server = Server::start(host_listener, "hello from the host\n")?;
    let wan_listener = wan.listen(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let wan_port = wan_listener.local_addr()?.port();
    let wan_server = Server::start(wan_listener, "hello from the internet\n")?;

    // The job's link is the first documentation range the host is not on: 192.0.2.0/24 here, so
    // its gateway, which slirp4netns would map to the host's loopback, is 192.0.2.2.
    let targets = [
        ("internet", format!("198.51.100.7 {wan_port}")),
        ("router", format!("203.0.113.1 {wan_port}")),
        ("host-address", format!("203.0.113.2 {host_port}")),
        ("host-lan", format!("192.168.77.1 {host_port}")),
        ("host-loopback", format!("192.0.2.2 {host_port}")),
        ("own-loopback", format!("127.0.0.1 {host_port}")),
        ("metadata", "169.254.169.254 80".to_owned()),
    ];
    let mut script = String::from("cat /etc/resolv.conf\n");
    for (name, target) in &targets {
        let (address, port) = target.split_once(' ').unwrap_or_default();
        script.push_str(&format!(
            "if line=$(timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{port} && head -n1 <&3' 2>&1); \
             then echo \"{name}: $line\"; else echo \"{name}: closed ($line)\"; fi\n"
        ));
    }
    let job = JobDir::new()?;
    job.file("probe.sh", script.as_bytes())?;
    let run = job.run_with(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/bash\", \"/in/probe.sh\"]\n\
         inputs = [\"probe.sh\"]\n[limits]\ntime = \"60s\"\nnetwork = true\n",
        |command| host.wrap(&command),
    )?;
    run.expect_code(0)?;
    let out = run.stdout();
    ensure!(out.contains("nameserver 192.0.2.100"), "the job's resolver is not its own address:\n{out}");
    ensure!(out.contains("internet: hello from the internet"), "the job did not reach the internet:\n{out}");
    for (name, _) in &targets[1..] {
        ensure!(out.contains(&format!("{name}: closed")), "the job reached {name}:\n{out}");
    }
    ensure!(host_server.accepted() == 0, "a job's connection reached the host:\n{out}");
    ensure!(wan_server.accepted() == 1, "the router took {} connections:\n{out}", wan_server.accepted());
    ensure!(processes_with("slirp4netns") == 0, "slirp4netns outlived the job");
    // What the job's network carried is metered for its receipt: at least the greeting it read.
    let usage = network_usage(&run.job_dir()?)?;
    ensure!(
        usage >= "hello from the internet\n".len() as u64,
        "network_bytes {usage} after a connection: {}",
        std::fs::read_to_string(run.job_dir()?.join("usage.json"))?
    );
    // The job's network stack must leave the host's mounts alone (as root, slirp4netns's own
    // sandbox would otherwise unmount shared mounts such as /run/netns/* on the host).
    ensure!(host.is_mounted() && wan.is_mounted(), "a job's network unmounted the host's namespaces");
    Ok(())
}

pub(crate) fn network_is_off_unless_granted() -> Result<()> {
    let host = Netns::create("hn")?;
    let wan = Netns::create("hm")?;
    let pid = std::process::id();
    let (host_if, wan_if) = (format!("vn{pid}"), format!("vm{pid}"));
    veth(&host, &host_if, &wan, &wan_if)?;
    host.ip(&["addr", "add", "203.0.113.6/30", "dev", &host_if])?;
    host.ip(&["route", "add", "default", "via", "203.0.113.5"])?;
    wan.ip(&["addr", "add", "203.0.113.5/30", "dev", &wan_if])?;
    wan.ip(&["addr", "add", "198.51.100.8/32", "dev", "lo"])?;
    let wan_listener = wan.listen(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let wan_port = wan_listener.local_addr()?.port();
    let wan_server = Server::start(wan_listener, "hello from the internet\n")?;

    let job = JobDir::new()?;
    let run = job.run_with(
        &format!(
            "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/bash\", \"-c\", \
             \"exec 3<>/dev/tcp/198.51.100.8/{wan_port} && echo connected\"]\n[limits]\ntime = \"30s\"\n"
        ),
        |command| host.wrap(&command),
    )?;
    ensure!(run.code()? != 0 && !run.stdout().contains("connected"), "{}", run.stdout());
    ensure!(run.stderr().contains("unreachable"), "{}", run.stderr());
    ensure!(wan_server.accepted() == 0, "a job without network reached the internet");
    ensure!(network_usage(&run.job_dir()?)? == 0, "a job without network was metered some");
    Ok(())
}

/// `network_bytes` of the job's `usage.json`, what its receipt charges for.
fn network_usage(job_dir: &std::path::Path) -> Result<u64> {
    let usage: serde_json::Value = serde_json::from_slice(&std::fs::read(job_dir.join("usage.json"))?)?;
    usage["network_bytes"].as_u64().ok_or_else(|| anyhow::anyhow!("no network_bytes in {usage}"))
}
