//! Receipts and ledgers end to end, two agent processes on loopback: a finished job leaves the same
//! countersigned receipt in both ledgers, both verify (each witnessed by the other), earnings on
//! each side add up to it, every kind of interaction is recorded, the exports pass the verifier
//! written from docs/ledger.md, and a provider that cuts its ledger short is caught by the
//! checkpoint its consumer holds.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hearth_tests::jobs::{JobDir, wasm_module};
use hearth_tests::{Agent, json_of, pseudo_random};
use serde_json::Value;

use crate::network::{address, joining, wait_to_know};

/// The rows of `agent`'s ledger, as `hearth ledger export` writes them (header first).
fn export(agent: &Agent, out: &Path) -> Result<Vec<Value>> {
    let output = agent.cli(&["ledger", "export", "--out", out.to_str().context("path")?])?;
    ensure!(output.status.success(), "export failed: {}", String::from_utf8_lossy(&output.stderr));
    fs::read_to_string(out)?.lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
}

fn verify(agent: &Agent) -> Result<(bool, Value)> {
    let output = agent.cli(&["ledger", "verify", "--json"])?;
    let report = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("ledger verify: {}", String::from_utf8_lossy(&output.stderr)))?;
    Ok((output.status.success(), report))
}

fn receipts(rows: &[Value]) -> Vec<&Value> {
    rows.iter().filter(|row| row["kind"] == "receipt").collect()
}

pub(crate) fn a_finished_job_leaves_the_same_countersigned_receipt_in_both_ledgers() -> Result<()> {
    let consumer = Agent::start()?;
    let (bootstrap, consumer_id) = address(&consumer)?;
    let mut provider = joining(&bootstrap)?;
    let (_, provider_id) = address(&provider)?;
    wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))?;

    let dir = JobDir::new()?;
    fs::copy(wasm_module("copy")?, dir.path().join("copy.wasm"))?;
    fs::write(dir.path().join("data.bin"), pseudo_random(1 << 20, 3))?;
    let spec = dir.file(
        "job.toml",
        b"kind = \"wasi\"\nmodule = \"copy.wasm\"\nargs = [\"data.bin\", \"reversed.bin\"]\n\
          inputs = [\"data.bin\"]\n[resources]\ncpu = 1\nmemory = \"64MiB\"\n[limits]\ntime = \"120s\"\n",
    )?;
    let output = consumer.cli(&["submit", spec.to_str().context("path")?, "--wait"])?;
    ensure!(
        output.status.success(),
        "submit --wait failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        consumer.log()
    );
    let id = String::from_utf8(output.stdout)?.lines().next().context("no id")?.to_owned();
    let jobs = json_of(&consumer.cli(&["jobs", "--json"])?)?;
    let job =
        jobs.as_array().and_then(|all| all.iter().find(|j| j["id"] == id.as_str())).context("no job")?;
    ensure!(job["state"] == "finished", "{job}");
    let charged = job["charged"].as_u64().with_context(|| format!("no receipt was countersigned: {job}"))?;

    // The same receipt, both signatures, in both ledgers.
    let (consumer_rows, provider_rows) = (
        export(&consumer, &dir.path().join("consumer.jsonl"))?,
        export(&provider, &dir.path().join("provider.jsonl"))?,
    );
    ensure!(
        consumer_rows[0]["owner"] == consumer_id.as_str()
            && provider_rows[0]["owner"] == provider_id.as_str()
    );
    let (mine, theirs) = (receipts(&consumer_rows), receipts(&provider_rows));
    ensure!(mine.len() == 1 && theirs.len() == 1, "receipts: consumer {mine:?}, provider {theirs:?}");
    ensure!(mine[0]["body"] == theirs[0]["body"], "the two ledgers hold different receipts");
    let receipt = &mine[0]["body"]["receipt"];
    ensure!(receipt["provider"] == provider_id.as_str() && receipt["consumer"] == consumer_id.as_str());
    ensure!(receipt["outcome"] == "finished" && receipt["exit_code"] == 0, "{receipt}");
    ensure!(receipt["result"] == job["outputs"]["hash"], "the receipt names other outputs: {receipt} {job}");
    ensure!(receipt["agreement_id"] == job["agreement_id"], "{receipt}");
    let charges = &receipt["charges"];
    let sum = ["cpu", "memory", "gpu"].iter().map(|k| charges[k].as_u64().unwrap_or(0)).sum::<u64>();
    ensure!(receipt["amount"] == sum && sum == charged && charged > 0, "{receipt}");
    ensure!(receipt["usage"]["running_ms"].as_u64().is_some_and(|ms| ms > 0), "{receipt}");

    // Every kind of interaction is on record, on both sides.
    for (who, rows) in [("consumer", &consumer_rows), ("provider", &provider_rows)] {
        for kind in ["request", "offer", "agreement", "transfer", "notice", "release", "receipt"] {
            ensure!(rows.iter().any(|row| row["kind"] == kind), "the {who}'s ledger has no {kind}: {rows:?}");
        }
    }

    // Both verify, and each is witnessed by the other.
    for (agent, other) in [(&consumer, &provider_id), (&provider, &consumer_id)] {
        let (ok, report) = verify(agent)?;
        ensure!(ok && report["broken"].is_null(), "{report}");
        let witnesses = report["witnesses"].as_array().context("witnesses")?;
        ensure!(
            witnesses.iter().any(|w| w["peer"] == other.as_str() && w["verdict"] == "matches"),
            "not witnessed by {other}: {report}"
        );
    }

    // The checkpoints both ways: listed, and carried by an export that verifies under --strict.
    let listed = json_of(&consumer.cli(&["ledger", "witnesses", "--json"])?)?;
    let of_this = listed["of_this_ledger"].as_array().context("of_this_ledger")?;
    ensure!(
        of_this.iter().any(|w| w["witness"] == provider_id.as_str()
            && w["checkpoint"]["body"]["peer"] == consumer_id.as_str()),
        "the provider holds no checkpoint of the consumer's ledger: {listed}"
    );
    let held = listed["held"].as_array().context("held")?;
    ensure!(held.iter().any(|h| h["peer"] == provider_id.as_str()), "{listed}");
    let stranger = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE";
    let none = json_of(&consumer.cli(&["ledger", "witnesses", stranger, "--json"])?)?;
    ensure!(
        none["of_this_ledger"] == serde_json::json!([]) && none["held"] == serde_json::json!([]),
        "{none}"
    );
    let bad = consumer.cli(&["ledger", "witnesses", "not-a-peer"])?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a peer id"),
        "{bad:?}"
    );
    let anchored = dir.path().join("anchored.jsonl");
    let out = consumer.cli(&[
        "ledger",
        "export",
        "--with-witnesses",
        "--out",
        anchored.to_str().context("path")?,
    ])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let strict = consumer.cli(&[
        "ledger",
        "verify",
        "--strict",
        "--json",
        "--export",
        anchored.to_str().context("path")?,
    ])?;
    let report: Value = serde_json::from_slice(&strict.stdout)?;
    ensure!(strict.status.success() && report["anchor"] == "signed", "{report}");
    ensure!(
        report["witnesses"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w["peer"] == provider_id.as_str() && w["verdict"] == "matches")),
        "{report}"
    );
    ensure!(
        report["held"].as_array().is_some_and(|h| !h.is_empty() && h.iter().all(|h| h["verifies"] == true)),
        "{report}"
    );

    // Earnings: what one earned the other spent.
    let earned = json_of(&provider.cli(&["earnings", "--json", "--by", "day"])?)?;
    let spent = json_of(&consumer.cli(&["earnings", "--json"])?)?;
    ensure!(earned["total"]["earned"]["amount"] == charged, "{earned}");
    ensure!(earned["total"]["earned"]["by_peer"][&consumer_id] == charged, "{earned}");
    ensure!(
        spent["total"]["spent"]["amount"] == charged && spent["total"]["earned"]["amount"] == 0,
        "{spent}"
    );
    ensure!(spent["total"]["spent"]["by_kind"] == *charges, "{spent}");

    // The exports pass the verifier written from docs/ledger.md alone, where Python is.
    if crate::python_present() {
        for file in ["consumer.jsonl", "provider.jsonl"] {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_ledger.py");
            let output =
                std::process::Command::new("python3").arg(script).arg(dir.path().join(file)).output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            ensure!(
                output.status.success()
                    && stdout.starts_with("ok ")
                    && stdout.trim_end().ends_with(" signed"),
                "{file}: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    } else {
        eprintln!(
            "SKIPPED part of {}: python3 is not installed, the Python verifier did not run",
            module_path!()
        );
    }

    // From the command line: an export verifies from the file alone; a copy of the store with one
    // receipt's amount changed is named at that row, and the command fails.
    let export_file = dir.path().join("consumer.jsonl");
    let alone = consumer.cli(&["ledger", "verify", "--export", export_file.to_str().context("path")?])?;
    ensure!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stdout));
    let copy = dir.path().join("copy.db");
    let store = rusqlite::Connection::open(consumer.data_dir().join("hearth.db"))?;
    store.execute("VACUUM INTO ?1", [copy.to_str().context("path")?])?;
    drop(store);
    let edited = rusqlite::Connection::open(&copy)?;
    edited.execute_batch("DROP TRIGGER ledger_no_update;")?;
    let seq: i64 = edited.query_row("SELECT seq FROM ledger WHERE kind = 'receipt'", [], |row| row.get(0))?;
    let changed = edited.execute(
        "UPDATE ledger SET body = replace(body, '\"amount\":' || ?1, '\"amount\":' || (?1 + 1)) WHERE seq = ?2",
        rusqlite::params![i64::try_from(charged)?, seq],
    )?;
    ensure!(changed == 1, "the receipt row was not edited");
    drop(edited);
    let tampered = consumer.cli(&["ledger", "verify", "--db", copy.to_str().context("path")?])?;
    let said = String::from_utf8_lossy(&tampered.stdout);
    ensure!(!tampered.status.success(), "a tampered copy verified: {said}");
    ensure!(said.contains(&format!("broken at row {seq}:")), "the wrong row was named: {said}");

    // The provider cuts its ledger short from the receipt on (a history it would rather not
    // have): alone the shorter chain holds, but the consumer's checkpoint shows the cut.
    provider.terminate()?;
    let store = rusqlite::Connection::open(provider.data_dir().join("hearth.db"))?;
    store.execute_batch(
        "DROP TRIGGER ledger_no_delete;
         DELETE FROM ledger WHERE seq >= (SELECT min(seq) FROM ledger WHERE kind = 'receipt');",
    )?;
    let last: i64 = store.query_row("SELECT max(seq) FROM ledger", [], |row| row.get(0))?;
    drop(store);
    let alone = provider.cli(&["ledger", "verify", "--json"])?;
    ensure!(
        alone.status.success(),
        "the cut chain alone should hold: {}",
        String::from_utf8_lossy(&alone.stdout)
    );
    provider.restart()?;
    wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))?;
    let until = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (ok, report) = verify(&provider)?;
        let truncated = report["witnesses"].as_array().is_some_and(|w| {
            w.iter().any(|w| w["peer"] == consumer_id.as_str() && w["verdict"] == "truncated")
        });
        if truncated {
            ensure!(!ok, "verify exited 0 on a truncated ledger: {report}");
            break report;
        }
        if Instant::now() > until {
            bail!("the consumer's checkpoint never showed the cut: {report}\n{}", provider.log());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure!(report["broken"]["seq"] == last + 1, "the first bad row should be {}: {report}", last + 1);
    Ok(())
}

/// docs/ledger.md's test vectors are what the code computes: a key, a record, its canonical bytes,
/// a row's entry and hash, a checkpoint and its full signature, and an export's signed head line.
pub(crate) fn the_ledger_docs_test_vectors_are_what_the_code_computes() -> Result<()> {
    use hearth::ledger::record::{CHECKPOINT_TAG, Kind};
    use hearth::net::negotiate::Signed;
    use hearth::proto::{canonical_json, entry_bytes, row_hash};
    use std::os::unix::fs::PermissionsExt;

    let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ledger.md"))?;
    let vectors = hearth_tests::doc_vectors(&doc, "Test vectors")?;
    let get =
        |name: &str| vectors.get(name).map(String::as_str).with_context(|| format!("no {name:?} vector"));
    let mut computed = Vec::new();
    let mut check = |name: &str, value: String| -> Result<()> {
        if get(name)? != value {
            computed.push(format!("{name}: {value}"));
        }
        Ok(())
    };

    let dir = tempfile::tempdir()?;
    let key = dir.path().join("identity.key");
    fs::write(&key, hex::decode(get("seed")?)?)?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    let identity = hearth::identity::Identity::load(dir.path())?.context("no identity")?;
    check("peer", identity.peer_id().to_string())?;

    let body: Value = serde_json::from_str(get("body")?)?;
    check("body canonical", String::from_utf8(canonical_json(&body)?)?)?;
    let prev: [u8; 32] =
        hex::decode(get("prev")?)?.try_into().map_err(|_| anyhow::anyhow!("prev is not 32 bytes"))?;
    let entry = entry_bytes(3, 1_700_000_000, Kind::Release.name(), &body)?;
    check("entry", String::from_utf8(entry.clone())?)?;
    let hash = hex::encode(row_hash(&prev, &entry));
    check("hash", hash.clone())?;

    let checkpoint = serde_json::json!({
        "version": 1, "peer": identity.peer_id().to_string(), "seq": 3, "head": hash, "at": 1_700_000_060
    });
    check("checkpoint canonical", String::from_utf8(canonical_json(&checkpoint)?)?)?;
    let signed = Signed::sign(&identity, CHECKPOINT_TAG, &checkpoint)?;
    check("checkpoint signature", signed.signature.clone())?;
    let mut line = Vec::new();
    hearth::ledger::verify::write_signed_head(&mut line, &signed)?;
    check("signed head line", String::from_utf8(line)?.trim_end().to_owned())?;
    ensure!(
        computed.is_empty(),
        "docs/ledger.md's test vectors differ from the code's:\n{}",
        computed.join("\n")
    );
    Ok(())
}
