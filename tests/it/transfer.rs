//! Blobs between two agent processes on loopback: byte-identical arrival, resume after a kill,
//! corruption caught, a vanished sender, cancel, and only granted peers served.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::{Agent, json_of, pseudo_random};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::network::{address, joining};

/// A chunk group: what one verification covers.
const GROUP: u64 = 16 * 1024;

/// Two agents, the second bootstrapped from the first; returns them and the first's peer id.
fn pair() -> Result<(Agent, Agent, String, String)> {
    let a = Agent::start()?;
    let (a_addr, a_id) = address(&a)?;
    let b = joining(&a_addr)?;
    let (_, b_id) = address(&b)?;
    Ok((a, b, a_id, b_id))
}

/// `hearth blob add PATH --share PEER --json` on `agent`; returns the hash.
fn add(agent: &Agent, path: &Path, share: &str) -> Result<String> {
    let added =
        json_of(&agent.cli(&["blob", "add", path.to_str().context("path")?, "--share", share, "--json"])?)?;
    Ok(added["hash"].as_str().context("hash")?.to_owned())
}

fn transfer(agent: &Agent, id: &str) -> Result<Value> {
    let all = json_of(&agent.cli(&["transfers", "--json"])?)?;
    all.as_array().and_then(|a| a.iter().find(|t| t["id"] == id)).cloned().context("no such transfer")
}

/// Starts a fetch that returns at once; returns its id.
fn get_detached(agent: &Agent, hash: &str, from: &str, out: &Path) -> Result<String> {
    let output = agent.cli(&[
        "blob",
        "get",
        hash,
        "--from",
        from,
        "--out",
        out.to_str().context("out")?,
        "--detach",
    ])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?.lines().next().context("no id")?.to_owned())
}

fn wait_for(agent: &Agent, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let until = Instant::now() + within;
    loop {
        let t = transfer(agent, id)?;
        if done(&t) {
            return Ok(t);
        }
        ensure!(Instant::now() < until, "after {within:?}: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ended(t: &Value) -> bool {
    matches!(t["state"].as_str(), Some("finished" | "failed" | "cancelled"))
}

pub(crate) fn a_blob_and_a_folder_of_many_files_arrive_byte_identical_once() -> Result<()> {
    let (a, b, a_id, b_id) = pair()?;
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    fs::write(&blob, pseudo_random(64 << 20, 1))?;
    let hash = add(&a, &blob, &b_id)?;

    let out = work.path().join("got.bin");
    let got =
        b.cli(&["blob", "get", &hash, "--from", &a_id, "--out", out.to_str().context("out")?, "--json"])?;
    ensure!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    let record = json_of(&got)?;
    ensure!(fs::read(&out)? == fs::read(&blob)?, "the 64 MiB blob differs");
    ensure!(record["bytes_received"] == 64 << 20 && record["state"] == "finished", "{record}");

    // The same hash again (a second job with the same module): nothing crosses the network.
    let again = json_of(&b.cli(&["blob", "get", &hash, "--from", &a_id, "--json"])?)?;
    ensure!(again["state"] == "finished" && again["bytes_received"] == 0, "{again}");

    // A folder of many small files, nested, with duplicates, an empty file and an executable.
    let folder = work.path().join("folder");
    for i in 0..400u64 {
        let dir = folder.join(format!("d{}", i % 7)).join(format!("e{}", i % 3));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("f{i}.dat")), pseudo_random((i * 397 % 9000) as usize, i + 10))?;
    }
    fs::write(folder.join("same-1.txt"), "same")?;
    fs::write(folder.join("same-2.txt"), "same")?;
    fs::write(folder.join("empty"), "")?;
    fs::write(folder.join("run.sh"), "#!/bin/sh\necho hi\n")?;
    fs::set_permissions(folder.join("run.sh"), fs::Permissions::from_mode(0o755))?;
    let folder_hash = add(&a, &folder, &b_id)?;
    let folder_out = work.path().join("folder-got");
    let got = b.cli(&[
        "blob",
        "get",
        &folder_hash,
        "--folder",
        "--from",
        &a_id,
        "--out",
        folder_out.to_str().context("out")?,
    ])?;
    ensure!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    let diff = std::process::Command::new("diff").arg("-r").arg(&folder).arg(&folder_out).output()?;
    ensure!(diff.status.success(), "folders differ: {}", String::from_utf8_lossy(&diff.stdout));
    let mode = fs::metadata(folder_out.join("run.sh"))?.permissions().mode();
    ensure!(mode & 0o111 != 0, "run.sh lost its executable bit: {mode:o}");

    // A third agent the blob was not shared with is refused, as if it were not there.
    let (a_addr, _) = address(&a)?;
    let c = joining(&a_addr)?;
    let refused = c.cli(&["blob", "get", &hash, "--from", &a_id])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success() && stderr.contains("does not offer blob"), "{stderr}");
    Ok(())
}

pub(crate) fn a_receiver_killed_half_way_resumes_and_refetches_at_most_two_chunks() -> Result<()> {
    let (a, mut b, a_id, b_id) = pair()?;
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    let size: u64 = 256 << 20;
    fs::write(&blob, pseudo_random(size as usize, 2))?;
    let hash = add(&a, &blob, &b_id)?;
    let out = work.path().join("got.bin");
    let id = get_detached(&b, &hash, &a_id, &out)?;
    wait_for(&b, &id, Duration::from_secs(120), |t| t["bytes_done"].as_u64() > Some(size / 10))?;
    b.stop_with(Signal::SIGKILL)?;

    // What the receiver had written when it died: every group that is not all zeros.
    let partial = fs::read(b.data_dir().join("blobs/partial").join(&hash))?;
    let written = partial.chunks(GROUP as usize).filter(|g| g.iter().any(|&x| x != 0)).count() as u64 * GROUP;
    ensure!(written > 0 && written < size, "killed too late or too early: {written} of {size} bytes written");

    b.restart()?;
    let t = wait_for(&b, &id, Duration::from_secs(180), ended)?;
    ensure!(t["state"] == "finished", "{t}");
    let resumed = t["resumed_from"].as_u64().context("resumed_from")?;
    let received = t["bytes_received"].as_u64().context("bytes_received")?;
    ensure!(resumed + 2 * GROUP >= written, "resumed from {resumed} though {written} bytes were on disk");
    ensure!(resumed + received == size, "resumed {resumed} + received {received} != {size}");
    ensure!(fs::read(&out)? == fs::read(&blob)?, "the resumed blob differs");
    ensure!(b.log().contains("resuming a fetch"), "{}", b.log());
    Ok(())
}

pub(crate) fn a_chunk_corrupted_on_the_senders_disk_never_lands() -> Result<()> {
    let (a, b, a_id, b_id) = pair()?;
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    let original = pseudo_random(8 << 20, 3);
    fs::write(&blob, &original)?;
    let hash = add(&a, &blob, &b_id)?;
    // Flip bytes in the sender's own stored copy, in the middle of a group.
    let stored = a.data_dir().join("blobs/complete").join(&hash);
    let mut bytes = fs::read(&stored)?;
    let at = 5_000_000usize;
    bytes[at] ^= 0xff;
    fs::write(&stored, &bytes)?;

    let out = work.path().join("got.bin");
    let got = b.cli(&["blob", "get", &hash, "--from", &a_id, "--out", out.to_str().context("out")?])?;
    let stderr = String::from_utf8_lossy(&got.stderr);
    let bad_group = at as u64 / GROUP * GROUP;
    ensure!(!got.status.success(), "the fetch succeeded: {stderr}");
    ensure!(
        stderr.contains("does not match its hash") && stderr.contains(&format!("byte {bad_group}")),
        "{stderr}"
    );
    ensure!(!out.exists(), "a corrupt blob was written out");
    ensure!(!b.data_dir().join("blobs/complete").join(&hash).exists(), "a corrupt blob entered the store");
    // What the receiver kept is verified data only: the groups before the bad one, as sent.
    let partial = fs::read(b.data_dir().join("blobs/partial").join(&hash))?;
    ensure!(
        partial.len() as u64 <= bad_group,
        "kept {} bytes, past the bad group at {bad_group}",
        partial.len()
    );
    ensure!(partial[..] == original[..partial.len()], "kept bytes differ from the original");
    let record = json_of(&b.cli(&["transfers", "--json"])?)?;
    let t = &record[0];
    ensure!(t["state"] == "failed" && t["bad_chunks"] == 3, "{t}");
    ensure!(b.log().contains("a peer sent data that does not match its hash"), "{}", b.log());
    Ok(())
}

pub(crate) fn a_vanished_sender_gives_a_clear_error_and_cancel_is_clean() -> Result<()> {
    let (mut a, b, a_id, b_id) = pair()?;
    let work = tempfile::tempdir()?;
    let blob = work.path().join("blob.bin");
    let size: u64 = 256 << 20;
    fs::write(&blob, pseudo_random(size as usize, 4))?;
    let hash = add(&a, &blob, &b_id)?;

    // Cancel: the fetch ends `cancelled` and leaves nothing behind.
    let id = get_detached(&b, &hash, &a_id, &work.path().join("cancelled.bin"))?;
    wait_for(&b, &id, Duration::from_secs(120), |t| t["bytes_done"].as_u64() > Some(0))?;
    let cancel = b.cli(&["blob", "cancel", &id])?;
    ensure!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    let t = wait_for(&b, &id, Duration::from_secs(30), ended)?;
    ensure!(t["state"] == "cancelled", "{t}");
    let partial_dir = b.data_dir().join("blobs/partial");
    ensure!(fs::read_dir(&partial_dir)?.count() == 0, "a cancelled fetch left files");
    ensure!(!work.path().join("cancelled.bin").exists());

    // The sender dies mid-way: the fetch fails with a reason, it does not hang.
    let id = get_detached(&b, &hash, &a_id, &work.path().join("got.bin"))?;
    wait_for(&b, &id, Duration::from_secs(120), |t| t["bytes_done"].as_u64() > Some(0))?;
    a.stop_with(Signal::SIGKILL)?;
    let t = wait_for(&b, &id, Duration::from_secs(120), ended)?;
    let error = t["error"].as_str().unwrap_or_default();
    ensure!(t["state"] == "failed", "{t}");
    ensure!(error.contains(&format!("cannot get blob {hash} from peer {a_id}")), "{error}");
    ensure!(error.contains("verified bytes are kept"), "{error}");
    Ok(())
}
