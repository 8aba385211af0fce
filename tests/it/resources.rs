//! `hearth resources` against the kernel's own figures, and the live NVML path where a GPU exists.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, hearth, json_of, raw_http};

fn nproc() -> Result<u64> {
    let out = Command::new("nproc").output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn mem_total_bytes() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no MemTotal")?
        .parse()?;
    Ok(kib * 1024)
}

fn check_against_kernel(resources: &serde_json::Value) -> Result<()> {
    let threads = resources["cpu"]["threads"].as_u64().context("cpu.threads")?;
    ensure!(threads == nproc()?, "cpu.threads {threads} != nproc");
    let cores = resources["cpu"]["cores"].as_u64().context("cpu.cores")?;
    ensure!(cores >= 1 && cores <= threads, "cpu.cores {cores}");
    ensure!(!resources["cpu"]["model"].as_str().context("cpu.model")?.is_empty());
    let total = resources["memory"]["total_bytes"].as_u64().context("memory.total_bytes")? as f64;
    let kernel = mem_total_bytes()? as f64;
    ensure!((total - kernel).abs() <= kernel * 0.01, "memory {total} vs MemTotal {kernel}");
    let available = resources["memory"]["available_bytes"].as_u64().context("available_bytes")? as f64;
    ensure!(available > 0.0 && available <= total);
    let disk_total = resources["disk"]["total_bytes"].as_u64().context("disk.total_bytes")?;
    let disk_free = resources["disk"]["free_bytes"].as_u64().context("disk.free_bytes")?;
    ensure!(disk_total >= disk_free && disk_free > 0, "disk {disk_free}/{disk_total}");
    ensure!(resources["gpus"].is_array(), "gpus is a list");
    Ok(())
}

pub(crate) fn json_agrees_with_the_kernel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // No daemon runs for this dir.
    let out = hearth(dir.path(), &["resources", "--json"])?;
    check_against_kernel(&json_of(&out)?)?;
    ensure!(out.stderr.is_empty(), "no noise on stderr: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

pub(crate) fn daemon_serves_the_same_machine() -> Result<()> {
    let mut agent = Agent::start()?;
    let port = agent.port()?;
    let token = agent.token()?;
    let response = raw_http(
        port,
        &format!("GET /api/v1/resources HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}"),
    )?;
    ensure!(response.status == 200, "{response:?}");
    check_against_kernel(&serde_json::from_str(&response.body)?)?;
    ensure!(agent.terminate()?.success());
    // A CPU-only machine says nothing about NVIDIA above debug level.
    let log = agent.log().to_lowercase();
    ensure!(!log.contains("nvml") && !log.contains("nvidia"), "GPU noise in the log: {log}");
    Ok(())
}

pub(crate) fn live_nvml_agrees_with_nvidia_smi() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let resources = json_of(&hearth(dir.path(), &["resources", "--json"])?)?;
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"])
        .output()?;
    let smi = String::from_utf8(smi.stdout)?;
    let gpus = resources["gpus"].as_array().context("gpus")?;
    ensure!(gpus.len() == smi.lines().count(), "{} GPUs vs nvidia-smi:\n{smi}", gpus.len());
    for (gpu, line) in gpus.iter().zip(smi.lines()) {
        let fields: Vec<&str> = line.split(", ").collect();
        ensure!(gpu["uuid"] == fields[1] && gpu["name"] == fields[2], "{gpu} vs {line}");
        let mib: u64 = fields[3].trim().parse()?;
        ensure!(gpu["memory_total_bytes"].as_u64() == Some(mib * 1024 * 1024), "{gpu} vs {line}");
        ensure!(gpu["compute_capability"]["major"].as_u64().is_some(), "{gpu}");
    }
    Ok(())
}
