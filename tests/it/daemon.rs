//! The daemon's life: identity, the data-dir lock, signals, crashes, and bad settings.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, PROCESS_DEADLINE, command, hearth, json_of, wait_deadline};
use nix::sys::signal::Signal;

fn peer_id(agent: &Agent) -> Result<String> {
    let status = json_of(&hearth(&agent.data_dir(), &["status", "--json"])?)?;
    Ok(status["peer_id"].as_str().context("no peer_id")?.to_owned())
}

fn integrity_check(agent: &Agent) -> Result<String> {
    let conn = rusqlite::Connection::open(agent.data_dir().join("hearth.db"))?;
    Ok(conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?)
}

pub(crate) fn identity_persists_across_restarts() -> Result<()> {
    let mut agent = Agent::start()?;
    let first = peer_id(&agent)?;
    ensure!(first.starts_with("12D3KooW"), "an Ed25519 peer id, got {first}");
    ensure!(agent.terminate()?.success());
    let mode = fs::metadata(agent.data_dir().join("identity.key"))?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "identity.key has mode {mode:o}");
    agent.restart()?;
    ensure!(peer_id(&agent)? == first, "the peer id changed across a restart");
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn second_daemon_on_the_same_dir_refuses() -> Result<()> {
    let mut agent = Agent::start()?;
    let mut second = command(&agent.data_dir())
        .args(["daemon", "--api-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = wait_deadline(&mut second, PROCESS_DEADLINE)?;
    let stderr = std::io::read_to_string(second.stderr.take().context("stderr")?)?;
    ensure!(!status.success(), "the second daemon started");
    ensure!(stderr.contains("already running"), "stderr: {stderr}");
    ensure!(stderr.contains(&agent.pid().context("pid")?.to_string()), "names the pid: {stderr}");
    // The first one is unharmed.
    peer_id(&agent)?;
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn sigterm_stops_cleanly_and_the_store_is_intact() -> Result<()> {
    let mut agent = Agent::start()?;
    let status = agent.terminate()?;
    ensure!(status.success(), "SIGTERM gave {status}: {}", agent.log());
    ensure!(!agent.data_dir().join("api.json").exists(), "api.json is removed on a clean stop");
    ensure!(integrity_check(&agent)? == "ok");
    let conn = rusqlite::Connection::open(agent.data_dir().join("hearth.db"))?;
    let stopped: Option<i64> =
        conn.query_row("SELECT stopped_at FROM daemon_runs ORDER BY id DESC LIMIT 1", [], |r| r.get(0))?;
    ensure!(stopped.is_some(), "the run is recorded as stopped");
    Ok(())
}

pub(crate) fn sigint_stops_cleanly() -> Result<()> {
    let mut agent = Agent::start()?;
    let status = agent.stop_with(Signal::SIGINT)?;
    ensure!(status.success(), "SIGINT gave {status}: {}", agent.log());
    ensure!(integrity_check(&agent)? == "ok");
    Ok(())
}

pub(crate) fn restart_after_kill_9_recovers() -> Result<()> {
    let mut agent = Agent::start()?;
    let before = peer_id(&agent)?;
    agent.stop_with(Signal::SIGKILL)?;
    // The stale api.json points at nobody: the CLI says there is no daemon.
    let out = hearth(&agent.data_dir(), &["status"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("no Hearth daemon is running"), "{stderr}");
    agent.restart()?;
    ensure!(peer_id(&agent)? == before);
    ensure!(agent.log().contains("did not shut down cleanly"), "log: {}", agent.log());
    ensure!(agent.terminate()?.success());
    ensure!(integrity_check(&agent)? == "ok");
    Ok(())
}

pub(crate) fn bad_config_names_the_field_and_writes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("[api]\nport = \"soon\"\n", "api.port"),
        ("[resources]\nrefresh_interval = \"5ms\"\n", "resources.refresh_interval"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
        ("[api]\nprot = 1\n", "prot"),
    ];
    for (text, field) in cases {
        fs::write(dir.path().join("config.toml"), text)?;
        let out = hearth(dir.path(), &["daemon", "--api-port", "0"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{text:?} was accepted");
        ensure!(stderr.contains(field), "{text:?}: {stderr}");
        ensure!(stderr.trim().lines().count() == 1, "one line: {stderr}");
        ensure!(!dir.path().join("identity.key").exists(), "nothing is created on a bad config");
    }
    Ok(())
}

pub(crate) fn busy_port_names_the_setting() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let dir = tempfile::tempdir()?;
    let out = hearth(dir.path(), &["daemon", "--api-port", &port])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(stderr.contains("api.port") && stderr.contains(&port), "{stderr}");
    ensure!(!dir.path().join("hearth.db").exists(), "nothing is recorded when the port is busy");
    Ok(())
}

pub(crate) fn corrupt_identity_is_reported_and_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("identity.key");
    fs::write(&key, b"half a key")?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    let out = hearth(dir.path(), &["daemon", "--api-port", "0"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(stderr.contains("identity.key") && stderr.contains("corrupt"), "{stderr}");
    ensure!(fs::read(&key)? == b"half a key", "the key file was changed");
    Ok(())
}

pub(crate) fn environment_and_flags_override_the_file() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = taken.local_addr()?.port().to_string();
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("config.toml"), "[api]\nport = 0\n")?;
    // The environment wins over the file: the daemon tries the busy port and says so.
    let out = command(dir.path()).arg("daemon").env("HEARTH_API_PORT", &busy).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains(&busy), "env ignored: {stderr}");
    // A flag wins over the environment (Agent passes --api-port 0).
    let mut agent = Agent::start_with(&format!("[api]\nport = {busy}\n"), &[("HEARTH_API_PORT", &busy)])?;
    ensure!(agent.port()?.to_string() != busy);
    ensure!(agent.terminate()?.success());
    Ok(())
}

pub(crate) fn log_level_flag_and_rust_log_are_respected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str], rust_log: Option<&str>| -> Result<String> {
        let mut cmd = command(dir.path());
        cmd.args(args);
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let out = cmd.output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stderr)?)
    };
    let quiet = run(&["resources", "--json"], None)?;
    ensure!(quiet.is_empty(), "warnings only by default: {quiet}");
    let debug = run(&["--log-level", "debug", "resources", "--json"], None)?;
    ensure!(debug.contains("DEBUG"), "--log-level debug shows debug lines: {debug}");
    ensure!(!debug.contains('\u{1b}'), "no colour codes when stderr is not a terminal");
    let from_env = run(&["resources", "--json"], Some("debug"))?;
    ensure!(from_env.contains("DEBUG"), "RUST_LOG=debug shows debug lines: {from_env}");
    let flag_wins = run(&["--log-level", "error", "resources", "--json"], Some("debug"))?;
    ensure!(flag_wins.is_empty(), "--log-level wins over RUST_LOG: {flag_wins}");
    Ok(())
}
