//! A stranger's job against the machine that lends it: each attack goes to a real provider as a
//! market job from a real consumer, both agents on loopback. Afterwards the provider's memory is
//! back within bounds and an honest job still runs there.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::JobDir;
use hearth_tests::netns::Netns;
use hearth_tests::{Agent, LOOPBACK_NETWORK, eventually, json_of, rss_bytes};
use serde_json::Value;

use crate::network::{consumer_and_provider, wait_to_know, wait_to_know_offer};

/// Every process below `pid`, from each process's parent in `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The fields after the command's closing parenthesis: state, then the parent.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(child, _)| *child));
        next += 1;
    }
    found.split_off(1)
}

/// What a hostile job prints to reach its consumer's terminal: OSC 52 (write the clipboard),
/// OSC 0 (retitle the window) and CSI 2J (clear the screen). Written with `printf` escapes.
const TERMINAL_ATTACK: &str = r"printf 'before\033]52;c;ZXZpbA==\007\033]0;owned\007\033[2Jafter\n'";

/// How long one hostile or honest job may take from submission to its end, search included.
const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// How much the provider's resident memory may grow while it runs a hostile job: the bounded
/// buffers of one run and the event bus, with room to spare. The attacks below grow it by
/// gigabytes when they are not contained.
const RSS_ALLOWANCE: u64 = 192 << 20;

/// A consumer and one provider that joined it, the consumer knowing the provider's advert.
struct Lender {
    consumer: Agent,
    provider: Agent,
    work: JobDir,
    /// The provider's resident memory once the market is up and idle.
    idle_rss: u64,
    /// What the provider's data folder takes on disk then.
    idle_disk: u64,
}

/// How much the provider's data folder may have grown once an attack is over: the records, logs
/// and outputs of a few small jobs. The attacks below leave hundreds of megabytes when not
/// contained.
const DISK_ALLOWANCE: u64 = 32 << 20;

impl Lender {
    fn start() -> Result<Self> {
        let (consumer, provider) = consumer_and_provider()?;
        Self::with(consumer, provider)
    }

    /// Both agents in network namespace `netns`, on its loopback, the provider with `env`.
    fn start_in(netns: &Netns, env: &[(&str, &str)]) -> Result<Self> {
        let consumer = Agent::start_in(netns, LOOPBACK_NETWORK)?;
        let (bootstrap, consumer_id) = consumer.address().context("the consumer's address")?;
        let provider =
            Agent::start_in_with(netns, &format!("{LOOPBACK_NETWORK}bootstrap = [\"{bootstrap}\"]\n"), env)?;
        let (_, provider_id) = provider.address().context("the provider's address")?;
        wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))
            .with_context(|| format!("the consumer knows the provider\n{}", consumer.log()))?;
        wait_to_know(&provider, &[&consumer_id], Duration::from_secs(30))
            .context("the provider knows the consumer")?;
        wait_to_know_offer(&consumer, &provider_id).context("the consumer knows the provider's offer")?;
        Self::with(consumer, provider)
    }

    fn with(consumer: Agent, provider: Agent) -> Result<Self> {
        let pid = provider.pid().context("the provider is not running")?;
        let idle_rss = eventually(Duration::from_secs(10), "the provider's RSS", || Ok(rss_bytes(pid)))?;
        let idle_disk = disk_used(&provider.data_dir())?;
        Ok(Self { consumer, provider, work: JobDir::new()?, idle_rss, idle_disk })
    }

    /// Submits the spec `text` at the consumer; the remote job's id.
    fn submit(&self, name: &str, text: &str) -> Result<String> {
        let spec = self.work.file(name, text.as_bytes())?;
        let output = self.consumer.cli(&["submit", spec.to_str().context("path")?])?;
        ensure!(output.status.success(), "submit: {}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout)?;
        Ok(stdout.lines().next().context("no id")?.trim().to_owned())
    }

    /// The remote job as the consumer lists it.
    fn job(&self, id: &str) -> Result<Value> {
        let jobs = json_of(&self.consumer.cli(&["jobs", "--json"])?)?;
        jobs.as_array().and_then(|all| all.iter().find(|job| job["id"] == id).cloned()).context("no such job")
    }

    /// Waits for the remote job to end, calling `watch` before each look at it.
    fn until_ended(&self, id: &str, mut watch: impl FnMut() -> Result<()>) -> Result<Value> {
        eventually(JOB_DEADLINE, &format!("job {id} to end"), || {
            watch()?;
            let job = self.job(id)?;
            Ok(matches!(job["state"].as_str(), Some("finished" | "failed" | "cancelled")).then_some(job))
        })
        .with_context(|| format!("--- provider log ---\n{}", self.provider.log()))
    }

    /// The provider's resident memory now.
    fn provider_rss(&self) -> Result<u64> {
        rss_bytes(self.provider.pid().context("the provider is not running")?).context("the provider's RSS")
    }

    /// After an attack: the provider's memory and data folder are back within bounds of where
    /// they were idle, it has no process of any job left, nothing of a job's scratch (folders,
    /// images, mounts) remains, and an honest job still runs and its output comes home.
    fn recovered(&self) -> Result<()> {
        let pid = self.provider.pid().context("the provider is not running")?;
        let rss = self.provider_rss()?;
        ensure!(
            rss <= self.idle_rss + RSS_ALLOWANCE,
            "the provider holds {} MiB after the attack, {} MiB when idle",
            rss >> 20,
            self.idle_rss >> 20
        );
        let grown = disk_used(&self.provider.data_dir())?.saturating_sub(self.idle_disk);
        ensure!(grown <= DISK_ALLOWANCE, "the provider's data folder grew by {} MiB", grown >> 20);
        eventually(Duration::from_secs(10), "the jobs' processes to be gone", || {
            Ok(descendants(pid).is_empty().then_some(()))
        })
        .with_context(|| format!("the provider's processes: {:?}", descendants(pid)))?;
        let data_dir = self.provider.data_dir();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let left: Vec<&str> =
            mounts.lines().filter(|line| line.contains(data_dir.to_str().unwrap_or("-"))).collect();
        ensure!(left.is_empty(), "mounts left in the provider's data dir: {left:?}");
        for job in std::fs::read_dir(data_dir.join("jobs"))?.filter_map(Result::ok) {
            for scratch in ["in", "root", "scratch", "scratch.img"] {
                ensure!(!job.path().join(scratch).exists(), "{scratch} left in {}", job.path().display());
            }
        }
        self.honest_job_runs()
    }

    /// An honest job still runs on the provider and its output comes home.
    fn honest_job_runs(&self) -> Result<()> {
        let id = self.submit(
            "honest.toml",
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"echo honest\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"30s\"\n",
        )?;
        let job = self.until_ended(&id, || Ok(()))?;
        ensure!(job["state"] == "finished" && job["exit_code"] == 0, "the honest job: {job}");
        let logs = self.consumer.cli(&["job", "logs", &id])?;
        ensure!(String::from_utf8_lossy(&logs.stdout) == "honest\n", "the honest job's output: {logs:?}");
        Ok(())
    }
}

pub(crate) fn a_job_that_floods_its_output_leaves_the_provider_memory_bounded() -> Result<()> {
    let lender = Lender::start()?;
    let before = lender.idle_rss;
    let id = lender.submit(
        "flood.toml",
        "kind = \"native\"\ncommand = [\"/usr/bin/yes\", \"a line the provider must not keep\"]\n\
         max_price = 50\n[resources]\ncpu = 1.0\nmemory = \"64MiB\"\n[limits]\ntime = \"10s\"\n",
    )?;
    let mut peak = before;
    let job = lender.until_ended(&id, || {
        peak = peak.max(lender.provider_rss()?);
        Ok(())
    })?;
    ensure!(job["state"] == "failed" || job["state"] == "cancelled", "yes never ends by itself: {job}");
    ensure!(
        peak <= before + RSS_ALLOWANCE,
        "the provider grew from {} MiB to {} MiB while the job wrote",
        before >> 20,
        peak >> 20
    );
    let after = lender.provider_rss()?;
    eprintln!(
        "hostile_jobs: the provider's RSS was {} MiB idle, {} MiB at most while `yes` ran, {} MiB after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
    ensure!(after <= before + RSS_ALLOWANCE, "the provider still holds {} MiB after the job", after >> 20);
    // The logs are the job's writing: they count against its disk.
    let id = lender.submit(
        "small-disk.toml",
        "kind = \"native\"\ncommand = [\"/usr/bin/yes\"]\nmax_price = 50\n\
         [resources]\ncpu = 1.0\nmemory = \"64MiB\"\ndisk = \"4MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    let job = lender.until_ended(&id, || Ok(()))?;
    let reason = job["reason"].as_str().unwrap_or_default();
    ensure!(
        job["state"] == "failed" && reason.contains("disk limit") && reason.contains("logs"),
        "a job whose logs fill its disk: {job}"
    );
    lender.recovered()
}

/// Runs `hearth ARGS` at `agent` on a pseudo-terminal (through `script`), as a person at a
/// terminal would; what the terminal received.
fn on_a_terminal(agent: &Agent, args: &[&str]) -> Result<Vec<u8>> {
    let mut line =
        format!("{} --data-dir {}", hearth_tests::hearth_bin().display(), agent.data_dir().display());
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]).env_remove("HEARTH_DATA_DIR");
    let out = hearth_tests::run_to_end(script)?;
    ensure!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

pub(crate) fn a_job_cannot_send_escape_sequences_to_its_consumers_terminal() -> Result<()> {
    let lender = Lender::start()?;
    let spec = format!(
        "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{}\"]\nmax_price = 50\n\
         [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"30s\"\n",
        TERMINAL_ATTACK.replace('\\', "\\\\").replace('"', "\\\"")
    );
    let id = lender.submit("escapes.toml", &spec)?;
    let job = lender.until_ended(&id, || Ok(()))?;
    ensure!(job["state"] == "finished", "the printing job: {job}");
    let seen = on_a_terminal(&lender.consumer, &["job", "logs", &id])?;
    let text = String::from_utf8_lossy(&seen);
    ensure!(!seen.contains(&0x1b) && !seen.contains(&0x07), "escapes reached the terminal: {text:?}");
    ensure!(text.contains("before^[]52;c;ZXZpbA==^G^[]0;owned^G^[[2Jafter"), "shown as {text:?}");
    // Asked for raw, the bytes go as they are; to a pipe they always do.
    let raw = on_a_terminal(&lender.consumer, &["job", "logs", "--raw", &id])?;
    ensure!(raw.windows(5).any(|w| w == b"\x1b]52;"), "--raw: {:?}", String::from_utf8_lossy(&raw));
    let piped = lender.consumer.cli(&["job", "logs", &id])?;
    ensure!(piped.stdout.windows(5).any(|w| w == b"\x1b]52;"), "to a pipe: {piped:?}");
    lender.recovered()
}

/// Entries under `dir` that are neither plain files nor folders, or that keep a setuid, setgid
/// or sticky bit, as `find` lists them (it walks any depth).
fn unsafe_entries(dir: &std::path::Path) -> Result<String> {
    let found = std::process::Command::new("find")
        .arg(dir)
        .args(["(", "-perm", "/7000", "-o", "!", "-type", "f", "!", "-type", "d", ")", "-print"])
        .output()?;
    ensure!(found.status.success(), "find: {}", String::from_utf8_lossy(&found.stderr));
    Ok(String::from_utf8_lossy(&found.stdout).into_owned())
}

pub(crate) fn a_jobs_outputs_keep_no_setuid_file_link_or_device_at_any_depth() -> Result<()> {
    let lender = Lender::start()?;
    // A setuid and setgid file, a link out and a FIFO at the bottom of 3,000 folders (a 6 KB
    // path): built 100 folders at a time and moved under the next 100, so no path the shell
    // uses is long. Then a setuid file and a link at the top.
    let script = "cd /out && mkdir c && echo x > c/s && chmod 6755 c/s && ln -s /etc/shadow c/l && \
                  mkfifo c/f && p= && j=0 && while [ $j -lt 100 ]; do p=${p}a/; j=$((j+1)); done && \
                  i=0 && while [ $i -lt 30 ]; do mkdir -p n/$p && mv c n/${p}c && mv n c && \
                  i=$((i+1)); done && echo y > top && chmod 4755 top && ln -s / root";
    let id = lender.submit(
        "setuid.toml",
        &format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n"
        ),
    )?;
    let job = lender.until_ended(&id, || Ok(()))?;
    ensure!(job["state"] == "finished", "the job that made them: {job}\n{}", lender.provider.log());
    let jobs = lender.provider.data_dir().join("jobs");
    let left = unsafe_entries(&jobs)?;
    ensure!(left.is_empty(), "the provider kept:\n{}", &left[..left.len().min(2000)]);
    lender.recovered()
}

/// Bytes the files under `dir` take on disk, as `du` counts them.
fn disk_used(dir: &std::path::Path) -> Result<u64> {
    let du = std::process::Command::new("du").args(["-s", "-B1"]).arg(dir).output()?;
    ensure!(du.status.success(), "du: {}", String::from_utf8_lossy(&du.stderr));
    let text = String::from_utf8_lossy(&du.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).context("du's answer")
}

pub(crate) fn sparse_outputs_count_at_their_full_size_and_over_the_disk_keep_nothing() -> Result<()> {
    let lender = Lender::start()?;
    let before = disk_used(&lender.provider.data_dir())?;
    // 20 sparse files of 60 MiB: a few blocks on the provider's disk, 1.2 GB once imported.
    let id = lender.submit(
        "sparse.toml",
        "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"for i in $(seq 20); do truncate -s 60M /out/f$i; done\"]\n\
         max_price = 50\n[resources]\ncpu = 0.5\nmemory = \"64MiB\"\ndisk = \"64MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    let job = lender.until_ended(&id, || Ok(()))?;
    let reason = job["reason"].as_str().unwrap_or_default();
    ensure!(
        job["state"] == "failed" && reason.contains("outputs add up to more than its disk of 64.0 MiB"),
        "the sparse job: {job}"
    );
    let grown = disk_used(&lender.provider.data_dir())?.saturating_sub(before);
    ensure!(grown < 32 << 20, "the provider's data grew by {} MiB", grown >> 20);
    let kept: Vec<_> = std::fs::read_dir(lender.provider.data_dir().join("jobs"))?
        .filter_map(Result::ok)
        .map(|job| job.path().join("out"))
        .filter_map(|out| std::fs::read_dir(&out).ok().map(|files| (out, files.count())))
        // An ended job's results are imported from its `out/`, made empty when there is none.
        .filter(|(_, files)| *files > 0)
        .collect();
    ensure!(kept.is_empty(), "job folders kept outputs: {kept:?}");
    lender.recovered()
}

/// Whether this machine gives a job's disk a kernel limit: the agent runs as root (as the tests
/// do in CI), with loop devices and `mkfs.ext4`. The reason when not.
pub(crate) fn kernel_disk_limit() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("a job's disk is a kernel limit only for an agent running as root".into());
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        return Err("no loop devices here (/dev/loop-control)".into());
    }
    if !hearth_tests::netns::installed("mkfs.ext4") {
        return Err("mkfs.ext4 is not installed (`apt install e2fsprogs`)".into());
    }
    // As the agent does: a container may show the loop driver but refuse its devices.
    let trial = || -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (image, mount_point) = (dir.path().join("trial.img"), dir.path().join("mnt"));
        std::fs::File::create(&image)?.set_len(8 << 20)?;
        std::fs::create_dir(&mount_point)?;
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<()> {
            let output = std::process::Command::new(program).args(args).output()?;
            ensure!(output.status.success(), "{program}: {}", String::from_utf8_lossy(&output.stderr).trim());
            Ok(())
        };
        run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_os_str()])?;
        run("mount", &["-o".as_ref(), "loop".as_ref(), image.as_os_str(), mount_point.as_os_str()])?;
        run("umount", &[mount_point.as_os_str()])
    };
    trial().map_err(|error| format!("a disk image cannot be mounted here: {error:#}"))
}

/// The bytes each `dd` of `text` says it copied.
fn copied_bytes(text: &str) -> u64 {
    text.lines()
        .filter(|line| line.contains("bytes") && line.contains("copied"))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub(crate) fn a_job_cannot_write_past_its_disk_by_unlinking_or_in_a_burst() -> Result<()> {
    let lender = Lender::start()?;
    // Seven files opened, unlinked and filled with 10 MiB each while held open: the watcher sees
    // no name to count. Then a 15 MiB burst faster than any watcher looks. Against 16 MiB.
    let script = "for i in 3 4 5 6 7 8 9; do eval \\\"exec $i>/work/f$i\\\"; rm /work/f$i; \
                  dd if=/dev/zero bs=1M count=10 2>&1 >&$i | grep -E 'copied|space'; done; \
                  dd if=/dev/zero of=/tmp/burst bs=1M count=15 2>&1 | grep -E 'copied|space'; sleep 1";
    let id = lender.submit(
        "unlinked.toml",
        &format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\ndisk = \"16MiB\"\n[limits]\ntime = \"60s\"\n"
        ),
    )?;
    let before = disk_used(&lender.provider.data_dir())?;
    let mut grown = 0;
    let job = lender.until_ended(&id, || {
        grown = grown.max(disk_used(&lender.provider.data_dir())?.saturating_sub(before));
        Ok(())
    })?;
    let logs = lender.consumer.cli(&["job", "logs", &id])?;
    let said = String::from_utf8_lossy(&logs.stdout).into_owned();
    let written = copied_bytes(&said);
    eprintln!(
        "hostile_jobs: a 16 MiB job wrote {} MiB through unlinked files and a burst; the provider's \
         data grew by {} MiB at most",
        written >> 20,
        grown >> 20
    );
    // 86 MiB when nothing but the watcher stops it; the disk plus the file system's slack now.
    ensure!(written <= 24 << 20, "the job wrote {written} bytes against a 16 MiB disk: {job}\n{said}");
    ensure!(said.contains("No space left on device"), "the kernel never said no: {said}");
    ensure!(grown <= 32 << 20, "the provider's data grew by {} MiB", grown >> 20);
    lender.recovered()
}

pub(crate) fn a_jobs_root_is_nobody_on_the_host_and_sees_no_host_path() -> Result<()> {
    let lender = Lender::start()?;
    let script = "cat /proc/slabinfo >/dev/null 2>&1 && echo slabinfo-readable; \
                  cat /proc/self/uid_map; tr '\\\\0' ' ' </proc/1/cmdline; echo; \
                  grep -E ' /(in|out|work|tmp) ' /proc/self/mountinfo";
    let id = lender.submit(
        "nobody.toml",
        &format!(
            "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n"
        ),
    )?;
    let job = lender.until_ended(&id, || Ok(()))?;
    ensure!(job["state"] == "finished", "the job: {job}");
    let logs = lender.consumer.cli(&["job", "logs", &id])?;
    let said = String::from_utf8_lossy(&logs.stdout).into_owned();
    ensure!(
        !said.contains("slabinfo-readable"),
        "root in the job read a file only the host's root may:\n{said}"
    );
    let host_root: u64 = said
        .lines()
        .next()
        .and_then(|map| map.split_whitespace().nth(1)?.parse().ok())
        .context("no uid_map in the job's output")?;
    ensure!(host_root >= 65_536, "the job's root is uid {host_root} on the host:\n{said}");
    let data_dir = lender.provider.data_dir();
    ensure!(
        !said.contains(data_dir.to_str().context("path")?),
        "the job saw the provider's data folder:\n{said}"
    );
    for folder in [" /in ", " /work "] {
        ensure!(said.lines().filter(|line| line.contains(folder)).count() == 1, "no{folder}in:\n{said}");
    }
    lender.recovered()
}

/// A resolver that answers every query for a name with `198.51.100.99` (and no address of other
/// types), keeping every datagram it received, until the test drops it.
struct Resolver {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    fn start(socket: std::net::UdpSocket) -> Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (received, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let (kept, halt) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(120);
            let mut buffer = [0u8; 1500];
            while halt.load(Ordering::SeqCst) == 0 && Instant::now() < until {
                let Ok((length, from)) = socket.recv_from(&mut buffer) else { continue };
                let query = buffer[..length].to_vec();
                if let Some(answer) = answer(&query) {
                    let _ = socket.send_to(&answer, from);
                }
                kept.lock().unwrap_or_else(PoisonError::into_inner).push(query);
            }
        });
        Ok(Self { received, stop, thread: Some(thread) })
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The answer to a query: its header and question, and an A record when it asks for one.
fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let end = end + 5;
    let kind = u16::from_be_bytes([*query.get(end - 4)?, *query.get(end - 3)?]);
    let mut answer = query.get(..end)?.to_vec();
    answer[2] = 0x81;
    answer[3] = 0x80;
    answer[6..12].copy_from_slice(&[0, u8::from(kind == 1), 0, 0, 0, 0]);
    if kind == 1 {
        // The name by pointer to the question, type A, class IN, a minute, 4 bytes.
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 99]);
    }
    Some(answer)
}

pub(crate) fn only_dns_queries_reach_the_providers_resolver() -> Result<()> {
    let machine = Netns::create("hr")?;
    // The provider's resolver, on its LAN: a range no job may reach itself.
    machine.ip(&["addr", "add", "192.168.78.53/32", "dev", "lo"])?;
    let resolver = Resolver::start(machine.udp(SocketAddr::from(([192, 168, 78, 53], 53)))?)?;
    let tcp = machine.listen(SocketAddr::from(([192, 168, 78, 53], 53)))?;
    tcp.set_nonblocking(true)?;
    let resolv_conf = tempfile::NamedTempFile::new()?;
    std::fs::write(resolv_conf.path(), "nameserver 192.168.78.53\n")?;
    let lender =
        Lender::start_in(&machine, &[("HEARTH_RESOLV_CONF", resolv_conf.path().to_str().context("path")?)])?;
    // A name through the job's resolver; then TCP to it, any bytes over UDP to it, and TCP to
    // the provider's resolver directly.
    let script = "ns=$(awk '/nameserver/ {print $2}' /etc/resolv.conf); echo resolver $ns; \
        getent hosts probe.hearth.test || echo unresolved; \
        if timeout 5 bash -c \\\"exec 3<>/dev/tcp/$ns/53\\\" 2>/dev/null; then echo tcp-open; else echo tcp-closed; fi; \
        printf 'GET / HTTP/1.1\\\\r\\\\n\\\\r\\\\n' > /dev/udp/$ns/53 && echo sent; \
        if timeout 5 bash -c 'exec 3<>/dev/tcp/192.168.78.53/53' 2>/dev/null; then echo direct-open; else echo direct-closed; fi; \
        sleep 1";
    let id = lender.submit(
        "dns.toml",
        &format!(
            "kind = \"native\"\ncommand = [\"/bin/bash\", \"-c\", \"{script}\"]\nmax_price = 50\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\nnetwork = true\n"
        ),
    )?;
    let job = lender.until_ended(&id, || Ok(()))?;
    ensure!(job["state"] == "finished" && job["exit_code"] == 0, "the job: {job}");
    let logs = lender.consumer.cli(&["job", "logs", &id])?;
    let out = String::from_utf8_lossy(&logs.stdout).into_owned();
    ensure!(
        out.contains("198.51.100.99") && out.contains("probe.hearth.test"),
        "the name did not resolve:\n{out}"
    );
    ensure!(out.contains("tcp-closed"), "TCP reached the job's resolver:\n{out}");
    ensure!(out.contains("sent") && out.contains("direct-closed"), "{out}");
    ensure!(tcp.accept().is_err(), "TCP reached the provider's resolver");
    let received = resolver.received();
    ensure!(!received.is_empty(), "the provider's resolver saw no query");
    for datagram in &received {
        ensure!(
            datagram.len() >= 12 && datagram[2] & 0xf8 == 0 && !datagram.windows(4).any(|w| w == b"GET "),
            "the provider's resolver got more than a query: {datagram:?}"
        );
    }
    lender.recovered()
}
