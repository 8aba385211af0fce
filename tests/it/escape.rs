//! The escape suite: each case is a real job doing what a hostile job would, and each must fail the
//! way it should while the host stays unaffected and nothing of the job survives.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::{JobDir, JobRun, probe_bin, processes_with};
use hearth_tests::{Agent, command, wait_deadline};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Runs `job-probe ARGS…` as a native job and returns the run.
fn probe(args: &[&str]) -> Result<JobRun> {
    let job = JobDir::new()?;
    job.copy_in(&probe_bin()?, "job-probe")?;
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    job.run(&format!(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/in/job-probe\", {}]\ninputs = [\"job-probe\"]\n\
         [resources]\nmemory = \"128MiB\"\n[limits]\ntime = \"30s\"\n",
        args.join(", ")
    ))
}

/// Asserts the probe reported a refusal.
fn refused(args: &[&str]) -> Result<String> {
    let run = probe(args)?;
    run.expect_code(0)?;
    let out = run.stdout();
    ensure!(out.starts_with("refused: "), "{args:?}: {out}");
    Ok(out)
}

/// A shell job, and the folder holding its outputs.
fn shell(script: &str, limits: &str) -> Result<(JobDir, JobRun)> {
    let job = JobDir::new()?;
    let run = job.run(&format!(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n{limits}"
    ))?;
    Ok((job, run))
}

pub(crate) fn owner_files_are_not_there() -> Result<()> {
    // A secret in a folder the agent's user can read, as the owner's home would be.
    let owner = tempfile::tempdir()?;
    let secret = owner.path().join("secret.txt");
    fs::write(&secret, "the owner's secret")?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for path in
        [secret.to_str().context("path")?, "/etc/shadow", &format!("{home}/.bashrc"), "/root", "/home"]
    {
        let out = refused(&["read", path])?;
        ensure!(out.contains("No such file"), "{path}: {out}");
    }
    // The agent's own data dir, with its identity key.
    let agent = JobDir::new()?;
    let key = agent.data_dir().join("identity.key");
    fs::create_dir_all(agent.data_dir())?;
    fs::write(&key, "key")?;
    let out = refused(&["read", key.to_str().context("path")?])?;
    ensure!(out.contains("No such file"), "{out}");
    Ok(())
}

pub(crate) fn writes_outside_out_fail() -> Result<()> {
    let marker = format!("hearth-escape-{}", std::process::id());
    let (_job, run) = shell(
        &format!(
            "for p in /{marker} /etc/{marker} /usr/{marker} /in/{marker} /proc/{marker}; do \
               if echo x > $p 2>/dev/null; then echo WROTE $p; exit 1; fi; done; \
             echo ok > /out/ok && echo ok > /work/ok && echo ok > /tmp/ok"
        ),
        "",
    )?;
    run.expect_code(0)?;
    ensure!(run.out("ok")? == b"ok\n");
    ensure!(!std::path::Path::new(&format!("/usr/{marker}")).exists(), "the host's /usr was written");
    Ok(())
}

pub(crate) fn disk_limit_stops_one_big_file_and_many_small_ones() -> Result<()> {
    let limits = "[resources]\ndisk = \"16MiB\"\n[limits]\ntime = \"30s\"\n";
    // One file past the limit: the kernel stops it at the limit (RLIMIT_FSIZE).
    let (_job, run) =
        shell("head -c 40000000 /dev/zero > /out/big; ls -l /out/big | awk '{print $5}'", limits)?;
    let size = fs::metadata(run.job_dir()?.join("out/big"))?.len();
    ensure!(size <= 16 << 20, "one file grew to {size} bytes under a 16 MiB limit");
    // Many files each under it: the agent's disk check ends the job.
    let (_job, run) = shell(
        "i=0; while [ $i -lt 40 ]; do head -c 1000000 /dev/zero > /work/f$i; i=$((i+1)); done; sleep 20",
        limits,
    )?;
    run.expect_code(125)?;
    ensure!(run.stderr().contains("disk limit of 16.0 MiB exceeded"), "{}", run.stderr());
    Ok(())
}

pub(crate) fn no_network_reaches_the_agent_or_anywhere() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let listener = TcpListener::bind("0.0.0.0:0")?;
    listener.set_nonblocking(true)?;
    let other = listener.local_addr()?.port();
    for address in
        [format!("127.0.0.1:{port}"), format!("127.0.0.1:{other}"), "10.0.0.1:80".into(), "[::1]:22".into()]
    {
        let out = refused(&["connect", &address])?;
        ensure!(out.contains("unreachable") || out.contains("refused"), "{address}: {out}");
    }
    ensure!(listener.accept().is_err(), "a job's connection reached a host listener");
    ensure!(agent.terminate()?.success(), "the agent did not stop cleanly");
    Ok(())
}

pub(crate) fn fork_bomb_stops_at_the_pid_limit() -> Result<()> {
    let marker = format!("bomb{}", std::process::id());
    let started = Instant::now();
    let (_job, run) = shell(
        &format!("{marker}() {{ {marker} | {marker} & }}; {marker}; sleep 60"),
        "[limits]\ntime = \"4s\"\n",
    )?;
    run.expect_code(124)?;
    ensure!(started.elapsed() < Duration::from_secs(30));
    ensure!(processes_with(&marker) == 0, "bomb processes survived the job");
    // The host can still start processes.
    ensure!(Command::new("true").status()?.success());
    Ok(())
}

pub(crate) fn memory_balloon_is_killed_inside_its_cgroup() -> Result<()> {
    let mut agent = Agent::start()?;
    let job = JobDir::new()?;
    job.copy_in(&probe_bin()?, "job-probe")?;
    let run = job.run(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/in/job-probe\", \"balloon\"]\ninputs = [\"job-probe\"]\n\
         [resources]\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    run.expect_code(125)?;
    ensure!(run.stderr().contains("memory limit of 64.0 MiB exceeded"), "{}", run.stderr());
    // A daemon running beside it is untouched.
    let status = hearth_tests::hearth(&agent.data_dir(), &["status", "--json"])?;
    ensure!(status.status.success(), "the agent stopped answering");
    ensure!(agent.terminate()?.success());
    Ok(())
}

/// Starts a job that double-forks sleepers tagged with `marker`, and waits until they run.
fn start_double_forker(job: &JobDir, marker: &str) -> Result<std::process::Child> {
    let spec = job.file(
        "job.toml",
        format!(
            "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", \
             \"(setsid sleep {marker} &); (sleep {marker} &); sleep {marker}\"]\n[limits]\ntime = \"60s\"\n"
        )
        .as_bytes(),
    )?;
    let child = command(&job.data_dir())
        .args(["run", spec.to_str().context("path")?, "--local"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let until = Instant::now() + Duration::from_secs(20);
    while processes_with(marker) < 3 {
        ensure!(Instant::now() < until, "the sleepers never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn wait_for_none(marker: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(5);
    while processes_with(marker) > 0 {
        ensure!(Instant::now() < until, "{} processes of the job survived", processes_with(marker));
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn double_forked_children_do_not_outlive_cancel() -> Result<()> {
    let job = JobDir::new()?;
    let marker = format!("777.{}1", std::process::id());
    let mut child = start_double_forker(&job, &marker)?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
    let status = wait_deadline(&mut child, Duration::from_secs(20))?;
    ensure!(status.code() == Some(130), "cancel exit: {status:?}");
    wait_for_none(&marker)
}

pub(crate) fn the_agents_death_takes_every_job_process() -> Result<()> {
    let job = JobDir::new()?;
    let marker = format!("777.{}2", std::process::id());
    let mut child = start_double_forker(&job, &marker)?;
    child.kill()?; // SIGKILL: no cleanup code runs in the agent.
    let _ = child.wait();
    wait_for_none(&marker)
}

pub(crate) fn terminal_injection_is_refused() -> Result<()> {
    // The job has no terminal at all (its fds are pipes and /dev/null, and there is no /dev/tty);
    // beyond that, the filter refuses the call itself, plain and high-bit variants, before the
    // kernel looks at the descriptor: EPERM, not ENOTTY.
    let out = refused(&["tiocsti"])?;
    ensure!(out.contains("/dev/tty: No such file"), "{out}");
    ensure!(out.matches("Operation not permitted").count() == 6, "{out}");
    Ok(())
}

pub(crate) fn ptrace_of_a_host_process_is_refused() -> Result<()> {
    let me = std::process::id().to_string();
    refused(&["ptrace", &me])?;
    refused(&["ptrace", "1"])?;
    Ok(())
}

pub(crate) fn mknod_mount_and_setuid_give_nothing() -> Result<()> {
    refused(&["mknod"])?;
    refused(&["mount"])?;
    let out = refused(&["caps"])?;
    ensure!(out.contains("CapEff 0000000000000000"), "{out}");
    // A setuid-root program from the host's /usr runs without its privilege.
    let setuid = ["/usr/bin/mount", "/bin/mount", "/usr/bin/su"]
        .into_iter()
        .find(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o4000 != 0));
    match setuid {
        Some(program) if program.ends_with("mount") => {
            let (_job, run) =
                shell(&format!("mkdir -p /work/m && {program} -t tmpfs none /work/m && echo MOUNTED"), "")?;
            ensure!(!run.stdout().contains("MOUNTED") && !run.status().success(), "{}", run.stdout());
        }
        Some(program) => {
            let (_job, run) = shell(&format!("{program} -c 'echo BECAME ROOT' nobody </dev/null"), "")?;
            ensure!(!run.stdout().contains("BECAME"), "{}", run.stdout());
        }
        None => eprintln!("note: no setuid-root program on this host to try; caps and no_new_privs checked"),
    }
    Ok(())
}

pub(crate) fn only_stdio_fds_and_no_kernel_files() -> Result<()> {
    refused(&["fds"])?;
    for path in ["/proc/kcore", "/sys/firmware", "/proc/sysrq-trigger", "/dev/mem"] {
        refused(&["read", path])?;
    }
    Ok(())
}

pub(crate) fn an_image_cannot_bring_host_folders_in() -> Result<()> {
    // An image whose /etc is a symlink to the host's root: mounting it would follow the link.
    let job = JobDir::new()?;
    let root = job.path().join("rootfs");
    crate::jobs::minimal_rootfs(&root)?;
    std::os::unix::fs::symlink("/", root.join("etc"))?;
    crate::jobs::tar_dir(&root, &job.path().join("evil.tar"))?;
    let run = job.run(
        "kind = \"native\"\nimage = \"evil.tar\"\n\
         command = [\"/bin/sh\", \"-c\", \"[ -e /etc/usr ] && echo LEAK; cat /etc/passwd\"]\n",
    )?;
    run.expect_code(0)?;
    ensure!(!run.stdout().contains("LEAK"), "the host's root showed up under /etc");
    ensure!(run.stdout().contains("root:x:0:0:job:/work"), "not the sandbox's own /etc: {}", run.stdout());
    Ok(())
}

pub(crate) fn outputs_lose_setuid_bits() -> Result<()> {
    let (_job, run) =
        shell("cp /bin/true /out/t && chmod 6755 /out/t && mkdir /out/d && chmod 1777 /out/d", "")?;
    run.expect_code(0)?;
    let dir = run.job_dir()?;
    let file = fs::metadata(dir.join("out/t"))?.permissions().mode();
    let folder = fs::metadata(dir.join("out/d"))?.permissions().mode();
    ensure!(file & 0o7000 == 0 && folder & 0o7000 == 0, "modes {file:o} and {folder:o}");
    ensure!(file & 0o777 == 0o755, "the rest of the mode changed: {file:o}");
    Ok(())
}
