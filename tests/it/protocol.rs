//! docs/protocol.md is enough to verify an advert, and docs/ledger.md a ledger: verifiers written
//! from them alone, in Python with only its standard library (tests/protocol/verify_advert.py and
//! verify_ledger.py), accept what Hearth writes and reject altered copies.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth::net::advert::sign;
use serde_json::Value;

use crate::network::{advert_body, hostile_identity};

fn python_verify(data: &[u8], author: &str, now: i64) -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_advert.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([author, &now.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3")?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    ensure!(out.stderr.is_empty(), "the verifier failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn a_verifier_written_from_the_protocol_doc_checks_adverts() -> Result<()> {
    let (alice, _dir) = hostile_identity()?;
    let (mallory, _other) = hostile_identity()?;
    let author = alice.peer_id().to_string();
    let now = hearth::clock::unix_now();
    let mut body = advert_body(&alice, 42, now, 1000);
    // Characters whose encoding JCS pins down: non-ASCII, a quote, a control character.
    body.state = "paused".into();
    body.paused_because = vec!["Café \"Blender\" läuft\n\u{1}".into()];
    let advert = sign(&alice, body)?;
    ensure!(python_verify(&advert.wire, &author, now)? == "ok 42 paused 1000");

    let tampered = String::from_utf8(advert.wire.clone())?.replace("\"seq\":42", "\"seq\":43");
    ensure!(python_verify(tampered.as_bytes(), &author, now)? == "bad signature");
    ensure!(python_verify(&advert.wire, &mallory.peer_id().to_string(), now)? == "wrong peer");
    let forged = sign(&mallory, advert_body(&alice, 43, now, 1000))?;
    ensure!(python_verify(&forged.wire, &author, now)? == "bad signature");
    ensure!(python_verify(&advert.wire, &author, now + 601)? == "expired");
    ensure!(python_verify(&advert.wire, &author, now - 3600)? == "from the future");
    Ok(())
}

/// Runs tests/protocol/verify_ledger.py on `export`: its exit code and its one line.
fn python_verify_ledger(export: &Path) -> Result<(Option<i32>, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_ledger.py");
    let mut command = Command::new("python3");
    command.arg(script).arg(export);
    let out = hearth_tests::run_to_end(command).context("running python3")?;
    ensure!(out.stderr.is_empty(), "the verifier failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// Writes `lines` as a JSON Lines file.
fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn a_verifier_written_from_the_ledger_doc_checks_an_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("hearth.db");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys)?;

    // A real ledger: the writer appends countersigned receipts until it has acknowledged a few.
    let mut writer = Command::new(crate::ledger_crash::writer_bin())
        .arg(&db)
        .arg(&keys)
        .arg("realtime")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ledger-writer")?;
    let stdout = writer.stdout.take().context("no stdout")?;
    let (acks, acked) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if acks.send(line).is_err() {
                break;
            }
        }
    });
    let mut last = 0u64;
    while last < 5 {
        let Ok(line) = acked.recv_timeout(Duration::from_secs(20)) else { break };
        last = line.parse().with_context(|| format!("ledger-writer printed {line:?}"))?;
    }
    writer.kill()?;
    writer.wait()?;
    drop(acked);
    let _ = reader.join();
    ensure!(last >= 5, "ledger-writer acknowledged only {last} receipts within 20 s");

    // Exported by the hearth binary, without a daemon.
    let export = dir.path().join("ledger.jsonl");
    let mut command = hearth_tests::command(dir.path());
    command.args(["ledger", "export", "--format", "jsonl", "--db"]).arg(&db).arg("--out").arg(&export);
    let out = hearth_tests::run_to_end(command)?;
    ensure!(out.status.success(), "hearth ledger export: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = std::fs::read_to_string(&export)?.lines().map(str::to_owned).collect();
    let rows: Vec<Value> =
        lines[1..].iter().map(|line| serde_json::from_str(line)).collect::<Result<_, _>>()?;
    ensure!(rows.len() as u64 >= last, "{} rows exported, {last} acknowledged", rows.len());
    let receipts = rows.iter().filter(|row| row["kind"] == "receipt").count();
    let head = rows.last().and_then(|row| row["hash"].as_str()).context("no head")?;
    let verdict = python_verify_ledger(&export)?;
    ensure!(verdict == (Some(0), format!("ok {} {receipts} {head}", rows.len())), "{verdict:?}");

    // One digit of row 3's body changed: row 3 is the first bad row, for both verifiers.
    let mut tampered = lines.clone();
    let mut row: Value = serde_json::from_str(&tampered[3])?;
    let amount = row.pointer_mut("/body/receipt/amount").context("row 3 is not a receipt with an amount")?;
    *amount = (amount.as_u64().context("amount")? + 1).into();
    tampered[3] = serde_json::to_string(&row)?;
    let file = dir.path().join("tampered.jsonl");
    write_lines(&file, &tampered)?;
    let (code, line) = python_verify_ledger(&file)?;
    ensure!(code == Some(1) && line.starts_with("broken at row 3: "), "{code:?} {line}");
    let rust =
        hearth_tests::hearth(dir.path(), &["ledger", "verify", "--export", file.to_str().context("path")?])?;
    ensure!(rust.status.code() == Some(1), "hearth ledger verify: {rust:?}");
    ensure!(
        String::from_utf8_lossy(&rust.stdout).contains("broken at row 3: "),
        "hearth ledger verify: {rust:?}"
    );

    // Row 2 removed: row 2 is the first bad row.
    let mut cut = lines;
    cut.remove(2);
    write_lines(&file, &cut)?;
    let (code, line) = python_verify_ledger(&file)?;
    ensure!(code == Some(1) && line.starts_with("broken at row 2: "), "{code:?} {line}");
    Ok(())
}
