//! The CLI as a user meets it: help, and one clear line when something is wrong.

use std::fs;

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, hearth, json_of};

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
