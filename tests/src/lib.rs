//! Helpers for tests that run real Hearth agents as processes on loopback.
//!
//! [`Agent`] starts `hearth daemon` in a private temporary data dir with any free API port, waits
//! until it has announced its API, and stops it with a real signal. [`hearth`] runs one CLI command
//! against a data dir, and [`raw_http`] sends a request byte for byte, so tests control every
//! header (an empty Host, a foreign Origin, a WebSocket upgrade). Every wait is bounded.

pub mod jobs;
pub mod layers;
pub mod ledger;
pub mod netns;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// How long a daemon may take to start or stop before the test fails.
pub const PROCESS_DEADLINE: Duration = Duration::from_secs(30);

/// The `hearth` binary, built once per test run from the current sources.
pub fn hearth_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // A test binary is target/<profile>/deps/it-<hash>, a benchmark target/<profile>/bench-…;
        // hearth sits in target/<profile>.
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let profile_dir =
            if dir.ends_with("deps") { dir.parent().map(Path::to_path_buf).unwrap_or_default() } else { dir };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "agent-core", "--bin", "hearth"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status();
        assert!(
            status.as_ref().is_ok_and(ExitStatus::success),
            "building the hearth binary failed: {status:?}"
        );
        profile_dir.join("hearth")
    })
}

/// A `hearth` command with a clean environment: no inherited HEARTH_* or RUST_LOG settings.
pub fn command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(hearth_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("HEARTH_") || k == "RUST_LOG") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--data-dir").arg(data_dir);
    cmd
}

/// Runs `hearth --data-dir DIR ARGS…` to completion, reading its output as it comes (so a
/// command that writes a lot never blocks on a full pipe).
pub fn hearth(data_dir: &Path, args: &[&str]) -> Result<Output> {
    let mut command = command(data_dir);
    command.args(args);
    run_to_end(command)
}

/// Runs `command` to completion within [`PROCESS_DEADLINE`], reading its output as it comes.
pub fn run_to_end(mut command: Command) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = wait_deadline(&mut child, PROCESS_DEADLINE)?;
    let stdout = stdout.join().map_err(|_| anyhow::anyhow!("reading stdout panicked"))?;
    let stderr = stderr.join().map_err(|_| anyhow::anyhow!("reading stderr panicked"))?;
    Ok(Output { status, stdout, stderr })
}

/// Parses a command's stdout as JSON, failing with its stderr when it did not succeed.
pub fn json_of(output: &Output) -> Result<Value> {
    ensure!(output.status.success(), "hearth failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).context("stdout is not JSON")
}

/// Waits until `condition` gives a value, asking again every 20 ms, for at most `timeout`;
/// then fails naming what was awaited. An error from `condition` fails at once. For what no
/// event announces (a file the job writes, a process's state); where an event does, wait on it.
pub fn eventually<T>(
    timeout: Duration,
    awaited: &str,
    mut condition: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        ensure!(Instant::now() < until, "waited {timeout:?} for {awaited}, in vain");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit, killing it and failing after `deadline`.
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> Result<ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} still running after {deadline:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A policy that shares at all times, whatever the machine and its owner do.
pub const ALWAYS_SHARE: &str = "[owner]\nidle = \"0s\"\nbusy_cpu = 0\nonly_on_ac = false\n\
                                [temperature]\ncpu_pause = 1000\ncpu_resume = 999\n\
                                [hysteresis]\nmin_paused = \"0s\"\n";

/// The network section every test agent gets unless its config has its own.
pub const LOOPBACK_NETWORK: &str = "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n";

/// A running `hearth daemon` in its own temporary data dir.
pub struct Agent {
    root: tempfile::TempDir,
    child: Option<Child>,
    generation: u32,
    env: Vec<(String, String)>,
    /// The network namespace the daemon and its commands run in, if not the test's own.
    netns: Option<String>,
}

impl Agent {
    /// Starts a daemon in a fresh data dir.
    pub fn start() -> Result<Self> {
        Self::start_with_config("")
    }

    /// Starts a daemon in a fresh data dir whose config.toml holds `config`.
    pub fn start_with_config(config: &str) -> Result<Self> {
        Self::start_with(config, &[])
    }

    /// Starts a daemon in a fresh data dir with `config` in config.toml and `env` set.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Result<Self> {
        let root = tempfile::tempdir()?;
        fs::create_dir(root.path().join("data"))?;
        // Share whatever the test machine is doing: a busy CI machine or a console login must not
        // pause the jobs a test runs. Tests of the policy itself replace this file.
        fs::write(root.path().join("data").join("policy.toml"), ALWAYS_SHARE)?;
        // Peers on loopback only, and no mDNS: a test's traffic never leaves the machine.
        let config = if config.contains("[network]") {
            config.to_owned()
        } else {
            format!("{config}\n{LOOPBACK_NETWORK}")
        };
        fs::write(root.path().join("data").join("config.toml"), config)?;
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut agent = Self { root, child: None, generation: 0, env, netns: None };
        agent.restart()?;
        Ok(agent)
    }

    /// Starts a daemon in network namespace `netns` (its API is then on that namespace's
    /// loopback: talk to it with [`Agent::cli`]). `config` must have its own `[network]`.
    pub fn start_in(netns: &netns::Netns, config: &str) -> Result<Self> {
        Self::start_in_with(netns, config, &[])
    }

    /// [`Agent::start_in`] with `env` set.
    pub fn start_in_with(netns: &netns::Netns, config: &str, env: &[(&str, &str)]) -> Result<Self> {
        let root = tempfile::tempdir()?;
        fs::create_dir(root.path().join("data"))?;
        fs::write(root.path().join("data").join("policy.toml"), ALWAYS_SHARE)?;
        fs::write(root.path().join("data").join("config.toml"), config)?;
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut agent = Self { root, child: None, generation: 0, env, netns: Some(netns.name().to_owned()) };
        agent.restart()?;
        Ok(agent)
    }

    /// Runs `hearth --data-dir DIR ARGS…` against this agent, in its network namespace.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cli = command(&self.data_dir());
        cli.args(args);
        run_to_end(self.in_netns(cli))
    }

    fn in_netns(&self, command: Command) -> Command {
        match &self.netns {
            Some(name) => netns::wrap(name, &command),
            None => command,
        }
    }

    /// The agent's first listen address, ending in /p2p/PEER_ID, and its peer id, once it has one.
    pub fn address(&self) -> Result<(String, String)> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let status = json_of(&self.cli(&["status", "--json"])?)?;
            let peer = status["peer_id"].as_str().context("peer_id")?.to_owned();
            if let Some(address) =
                status["listen_addrs"].as_array().and_then(|a| a.first()).and_then(Value::as_str)
            {
                ensure!(address.ends_with(&format!("/p2p/{peer}")), "{address}");
                return Ok((address.to_owned(), peer));
            }
            ensure!(Instant::now() < until, "no listen address: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// What the current daemon has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join(format!("daemon-{}.log", self.generation))
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the daemon again (after a stop) in the same data dir and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the daemon is still running");
        self.generation += 1;
        let log = fs::File::create(self.log_path())?;
        let mut daemon = command(&self.data_dir());
        daemon.args(["daemon", "--api-port", "0"]).envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = self
            .in_netns(daemon)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting hearth daemon")?;
        let pid = child.id();
        self.child = Some(child);
        let until = Instant::now() + PROCESS_DEADLINE;
        loop {
            if let Ok(info) = self.api_info()
                && info["pid"].as_u64() == Some(u64::from(pid))
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("the daemon exited during start-up ({status}): {}", self.log());
            }
            ensure!(Instant::now() < until, "the daemon did not announce its API: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The content of api.json.
    pub fn api_info(&self) -> Result<Value> {
        let text = fs::read_to_string(self.data_dir().join("api.json"))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The API's port.
    pub fn port(&self) -> Result<u16> {
        let url = self.api_info()?["url"].as_str().context("no url")?.to_owned();
        let port = url.rsplit(':').next().context("no port")?;
        Ok(port.parse()?)
    }

    /// The bearer token.
    pub fn token(&self) -> Result<String> {
        Ok(fs::read_to_string(self.data_dir().join("api.token"))?.trim().to_owned())
    }

    /// Sends `signal` and waits for the daemon to exit; returns its status.
    pub fn stop_with(&mut self, signal: Signal) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the daemon is not running")?;
        let pid = i32::try_from(child.id())?;
        kill(Pid::from_raw(pid), signal)?;
        wait_deadline(&mut child, PROCESS_DEADLINE)
    }

    /// SIGTERM, then wait.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.stop_with(Signal::SIGTERM)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The answer to a raw HTTP request.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The body, if the server closed the connection after it.
    pub body: String,
}

impl RawResponse {
    /// The `code` field of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body).ok()?["code"].as_str().map(str::to_owned)
    }
}

/// Sends `head` (request line and headers, without the blank line) to 127.0.0.1:`port` with
/// `Connection: close`, and reads the answer. A `101` answer is returned without waiting for a body.
pub fn raw_http(port: u16, head: &str) -> Result<RawResponse> {
    raw_http_with_body(port, head, b"")
}

/// [`raw_http`] with a body after the head, its `Content-Length` set to its length.
pub fn raw_http_with_body(port: u16, head: &str, body: &[u8]) -> Result<RawResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len())?;
    // A server that refuses a body may answer and close before reading all of it: the answer
    // is what matters, so a failed write of the rest is not the test's failure.
    let _ = stream.write_all(body);
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if !received.is_empty() && e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received);
        if n == 0 || (text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n")) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(RawResponse { status, headers, body: body.to_owned() })
}

/// True when this machine has an NVIDIA GPU with a working driver (`nvidia-smi -L` lists one).
pub fn nvidia_gpu_present() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU "))
}

/// A process's resident memory, from `/proc/PID/status` (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `POST path` with a JSON `body` (none when empty) to an agent's API on `port`; answers the
/// response body, or fails unless the answer is a success, with its status line.
pub fn api_post(port: u16, token: &str, path: &str, body: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    let content_type = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n{content_type}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    ensure!(answer.starts_with("HTTP/1.1 20"), "{path}: {}", answer.lines().next().unwrap_or(""));
    Ok(answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

/// The `p`th percentile of `samples`, in milliseconds (nearest rank); NaN when there are none.
pub fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (ms.len() as f64 - 1.0)).round() as usize;
    ms.get(rank).copied().unwrap_or(f64::NAN)
}

/// Deterministic pseudo-random bytes (xorshift64): incompressible test data that never holds a
/// whole zero 16 KiB group, so written and unwritten parts of a file can be told apart.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The test vectors a document gives under `heading`: the first fenced code block after the
/// Markdown heading whose text is `heading` (any level, `#` marks and surrounding spaces left
/// out), before the next heading. Each non-empty line of the block is `name: value`, split at the
/// first `": "`; the value is kept byte for byte (no trimming beyond the line's end). Fails when
/// the heading, the block or its closing fence is missing, a line has no `": "`, or a name comes
/// twice, so a test that reads its vectors from a document cannot pass on a document that lost
/// them.
pub fn doc_vectors(markdown: &str, heading: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let is_heading = |line: &str| line.starts_with('#');
    let mut lines = markdown.lines();
    lines
        .by_ref()
        .find(|line| is_heading(line) && line.trim_start_matches('#').trim() == heading)
        .with_context(|| format!("no heading {heading:?}"))?;
    let fence = lines
        .by_ref()
        .map(str::trim_end)
        .find(|line| line.starts_with("```") || is_heading(line))
        .filter(|line| line.starts_with("```"))
        .with_context(|| format!("no code block under {heading:?}"))?;
    let fence = &fence[..fence.chars().take_while(|c| *c == '`').count()];
    let mut vectors = std::collections::BTreeMap::new();
    for line in lines {
        if line.trim_end() == fence {
            ensure!(!vectors.is_empty(), "the block under {heading:?} is empty");
            return Ok(vectors);
        }
        if line.trim().is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(": ")
            .with_context(|| format!("under {heading:?}: {line:?} is not `name: value`"))?;
        ensure!(
            vectors.insert(name.trim().to_owned(), value.to_owned()).is_none(),
            "under {heading:?}: {name:?} comes twice"
        );
    }
    bail!("the block under {heading:?} is not closed")
}
