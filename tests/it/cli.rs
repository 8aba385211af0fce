//! The CLI as a user meets it: help, one clear line when something is wrong (each cause said
//! once), and silence when its reader goes away.

use std::fs;
use std::io::Read;
use std::process::Stdio;

use anyhow::{Context, Result, ensure};
use hearth_tests::jobs::JobDir;
use hearth_tests::{Agent, PROCESS_DEADLINE, command, hearth, json_of, wait_deadline};

fn one_line_error(out: &std::process::Output) -> Result<String> {
    ensure!(!out.status.success(), "the command succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(stderr.trim_end().lines().count() == 1, "not one line: {stderr:?}");
    ensure!(stderr.starts_with("hearth: "), "{stderr:?}");
    Ok(stderr)
}

pub(crate) fn help_lists_every_command() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = hearth(dir.path(), &["--help"])?;
    ensure!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "daemon",
        "status",
        "resources",
        "run",
        "jobs",
        "job",
        "peers",
        "connect",
        "offers",
        "pause",
        "resume",
        "policy",
        "blob",
        "transfers",
        "submit",
        "request",
        "reservations",
        "ledger",
        "earnings",
        "results",
    ] {
        ensure!(help.lines().any(|l| l.trim_start().starts_with(command)), "{command} missing: {help}");
    }
    Ok(())
}

pub(crate) fn status_from_the_cli_uses_the_token() -> Result<()> {
    let mut agent = Agent::start()?;
    let status = json_of(&hearth(&agent.data_dir(), &["status", "--json"])?)?;
    ensure!(status["peer_id"] == agent.api_info()?["peer_id"]);
    ensure!(status["state"] == "sharing", "{status}");
    let human = hearth(&agent.data_dir(), &["status"])?;
    let text = String::from_utf8_lossy(&human.stdout);
    ensure!(text.contains("sharing") && text.contains(status["peer_id"].as_str().context("id")?), "{text}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn no_daemon_is_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stderr = one_line_error(&hearth(dir.path(), &["status"])?)?;
    ensure!(stderr.contains("no Hearth daemon is running"), "{stderr}");
    ensure!(stderr.contains("hearth daemon --data-dir"), "says how to start one: {stderr}");
    Ok(())
}

pub(crate) fn wrong_token_is_one_clear_line() -> Result<()> {
    let mut agent = Agent::start()?;
    fs::write(agent.data_dir().join("api.token"), "ab".repeat(32))?;
    let stderr = one_line_error(&hearth(&agent.data_dir(), &["status", "--json"])?)?;
    ensure!(stderr.contains("refused the token"), "{stderr}");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_missing_file_is_named_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().context("path")?;
    // "No such file or directory (os error 2)", as the OS says it.
    let os_says = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    let once = |stderr: &str| -> Result<()> {
        ensure!(stderr.contains(missing), "the file is not named: {stderr}");
        ensure!(stderr.matches(&os_says).count() == 1, "{os_says:?} is not said once: {stderr}");
        Ok(())
    };
    once(&one_line_error(&hearth(dir.path(), &["run", "--local", missing])?)?)?;
    let mut agent = Agent::start()?;
    once(&one_line_error(&agent.cli(&["submit", missing])?)?)?;
    once(&one_line_error(&agent.cli(&["run", missing])?)?)?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

/// Runs `hearth ARGS` against `agent` with stdout a pipe closed before it writes: like
/// `hearth ARGS | head -0`. Answers its exit status and stderr.
fn with_stdout_closed(agent: &Agent, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
    let mut child = command(&agent.data_dir())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let mut stderr = child.stderr.take().context("stderr")?;
    let status = wait_deadline(&mut child, PROCESS_DEADLINE)?;
    let mut text = String::new();
    stderr.read_to_string(&mut text)?;
    Ok((status, text))
}

pub(crate) fn a_closed_stdout_ends_quietly() -> Result<()> {
    let mut agent = Agent::start()?;
    for args in [
        &["jobs"][..],
        &["jobs", "--json"],
        &["offers"],
        &["status"],
        &["peers", "--json"],
        &["transfers"],
        &["policy", "show"],
        &["ledger", "export"],
    ] {
        let (status, stderr) = with_stdout_closed(&agent, args)?;
        ensure!(stderr.is_empty(), "hearth {args:?} said something: {stderr:?}");
        ensure!(status.success(), "hearth {args:?} with its reader gone: {status}");
    }
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn a_module_that_is_not_wasm_is_one_line_here_and_in_the_daemon() -> Result<()> {
    let job = JobDir::new()?;
    job.file("random.wasm", &hearth_tests::pseudo_random(4096, 7))?;
    let spec = "kind = \"wasi\"\nmodule = \"random.wasm\"\n";
    let says = |text: &str| -> Result<()> {
        ensure!(text.contains("random.wasm is not a valid WebAssembly module: it starts with \""), "{text}");
        ensure!(text.contains("not \"\\x00asm\""), "{text}");
        Ok(())
    };
    // Here, without a daemon: one line besides the job's own.
    let run = job.run(spec)?;
    run.expect_code(125)?;
    let stderr = run.stderr();
    ensure!(stderr.trim_end().lines().count() == 1, "not one line: {stderr:?}");
    says(&stderr)?;

    // Through a daemon: the job fails with the same one line as its reason.
    let mut agent = Agent::start()?;
    let spec_path = job.path().join("job.toml");
    let out = agent.cli(&["run", spec_path.to_str().context("path")?])?;
    ensure!(out.status.code() == Some(125), "{out:?}");
    let jobs = json_of(&agent.cli(&["jobs", "--json"])?)?;
    let reason = jobs[0]["reason"].as_str().with_context(|| format!("no reason: {jobs}"))?;
    ensure!(!reason.contains('\n'), "{reason:?}");
    says(reason)?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

/// Every file the owner names is read only when it is a regular file within its limit: a device,
/// a named pipe or an oversized spec is one line, at once, and never a process that fills the
/// memory or waits for ever. The commands run under a 1 GiB address-space limit, so a reader that
/// is not bounded fails here instead of taking the machine's memory.
pub(crate) fn files_the_owner_names_are_regular_and_bounded() -> Result<()> {
    let dir = JobDir::new()?;
    let fifo = dir.path().join("fifo.toml");
    ensure!(std::process::Command::new("mkfifo").arg(&fifo).status()?.success(), "mkfifo");
    let module = dir.file("module.toml", b"kind = \"wasi\"\nmodule = \"/dev/zero\"\n")?;
    let image =
        dir.file("image.toml", b"kind = \"native\"\nimage = \"/dev/zero\"\ncommand = [\"/bin/true\"]\n")?;
    let huge =
        format!("kind = \"native\"\ncommand = [\"/bin/true\"]\n[env]\nA = \"{}\"\n", "x".repeat(2 << 20));
    let huge = dir.file("huge.toml", huge.as_bytes())?;
    let far = format!("/{}", "far/".repeat(2500));
    let far = dir.file(
        "far.toml",
        format!("kind = \"native\"\ncommand = [\"/bin/true\"]\ninputs = [\"{far}\"]\n").as_bytes(),
    )?;
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("path");
    let cases = [
        (
            vec!["run".to_owned(), "/dev/zero".to_owned(), "--local".to_owned()],
            "is a device, not a regular file",
        ),
        (vec!["run".to_owned(), path(&fifo)?, "--local".to_owned()], "is a named pipe, not a regular file"),
        (vec!["run".to_owned(), path(&module)?, "--local".to_owned()], "module /dev/zero is a device"),
        (vec!["run".to_owned(), path(&image)?, "--local".to_owned()], "image /dev/zero is a device"),
        (vec!["run".to_owned(), path(&huge)?, "--local".to_owned()], "larger than 1.0 MiB"),
        // A 10 KB path is shown cut short, not echoed whole.
        (vec!["run".to_owned(), path(&far)?, "--local".to_owned()], "which cannot be opened"),
        (vec!["submit".to_owned(), path(&fifo)?], "is a named pipe, not a regular file"),
        (
            vec!["policy".to_owned(), "set".to_owned(), "/dev/zero".to_owned()],
            "is a device, not a regular file",
        ),
    ];
    // `submit` and `policy set` go to a daemon once the file is read.
    let agent = Agent::start()?;
    for (args, says) in cases {
        let mut limited = std::process::Command::new("prlimit");
        limited
            .arg("--as=1073741824")
            .arg(hearth_tests::hearth_bin())
            .arg("--data-dir")
            .arg(agent.data_dir());
        limited.args(&args).env_remove("HEARTH_DATA_DIR").env_remove("HEARTH_CONFIG");
        let out = hearth_tests::run_to_end(limited)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "hearth {args:?} succeeded: {stderr}");
        ensure!(stderr.contains(says), "hearth {args:?} said {stderr:?}, not {says:?}");
        ensure!(stderr.len() < 400, "hearth {args:?} said {} bytes", stderr.len());
    }
    Ok(())
}

/// `hearth run --local` on a terminal shows a job's escape sequences instead of sending them; with
/// `--raw`, or to a pipe, the bytes go as they are.
pub(crate) fn a_local_run_shows_escape_sequences_on_a_terminal() -> Result<()> {
    let dir = JobDir::new()?;
    let spec = dir.file(
        "escapes.toml",
        b"kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"printf 'a\\\\033]52;c;ZXZpbA==\\\\007b\\\\n'\"]\n",
    )?;
    let spec = spec.to_str().context("path")?;
    let on_a_terminal = |raw: bool| -> Result<Vec<u8>> {
        let line = format!(
            "{} --data-dir {} run {spec} --local{}",
            hearth_tests::hearth_bin().display(),
            dir.data_dir().display(),
            if raw { " --raw" } else { "" }
        );
        let mut script = std::process::Command::new("script");
        script.args(["-qec", &line, "/dev/null"]).env_remove("HEARTH_DATA_DIR");
        let out = hearth_tests::run_to_end(script)?;
        ensure!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stdout));
        Ok(out.stdout)
    };
    let shown = on_a_terminal(false)?;
    let text = String::from_utf8_lossy(&shown);
    ensure!(!shown.contains(&0x1b) && text.contains("a^[]52;c;ZXZpbA==^Gb"), "on a terminal: {text:?}");
    let raw = on_a_terminal(true)?;
    ensure!(raw.windows(4).any(|w| w == b"\x1b]52"), "--raw: {:?}", String::from_utf8_lossy(&raw));
    let piped = hearth(&dir.data_dir(), &["run", spec, "--local"])?;
    ensure!(piped.stdout == b"a\x1b]52;c;ZXZpbA==\x07b\n", "to a pipe: {:?}", piped.stdout);
    Ok(())
}

/// A local job asking for more than the machine has is refused before it starts, naming the
/// machine's size.
pub(crate) fn a_local_job_larger_than_the_machine_is_refused_with_its_size() -> Result<()> {
    let dir = JobDir::new()?;
    let native = "kind = \"native\"\ncommand = [\"/bin/true\"]\n[resources]\n";
    for (asks, says) in [
        ("cpu = 512\n", "the job asks for 512 cores and this machine has"),
        ("memory = \"15EiB\"\n", "of memory and this machine has"),
        ("memory = \"16EiB\"\n", "memory"),
        ("disk = \"15EiB\"\n", "of disk and this machine's data disk holds"),
    ] {
        let spec = dir.file("big.toml", format!("{native}{asks}").as_bytes())?;
        let out = hearth(&dir.data_dir(), &["run", spec.to_str().context("path")?, "--local"])?;
        let stderr = one_line_error(&out)?;
        ensure!(stderr.contains(says), "{asks:?}: {stderr:?}");
    }
    Ok(())
}
