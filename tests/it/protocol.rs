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
    python_verify_ledger_with(export, &[])
}

fn python_verify_ledger_with(export: &Path, args: &[&str]) -> Result<(Option<i32>, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_ledger.py");
    let mut command = Command::new("python3");
    command.arg(script).arg(export).args(args);
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

    // Exported by the hearth binary, without a daemon, from the owner's data folder: it ends
    // with the owner's signed head.
    let export = dir.path().join("ledger.jsonl");
    let mut command = hearth_tests::command(&keys);
    command.args(["ledger", "export", "--format", "jsonl", "--db"]).arg(&db).arg("--out").arg(&export);
    let out = hearth_tests::run_to_end(command)?;
    ensure!(out.status.success(), "hearth ledger export: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = std::fs::read_to_string(&export)?.lines().map(str::to_owned).collect();
    ensure!(lines.last().is_some_and(|line| line.starts_with(r#"{"signed_head":"#)), "{lines:?}");
    let rows: Vec<Value> =
        lines[1..lines.len() - 1].iter().map(|line| serde_json::from_str(line)).collect::<Result<_, _>>()?;
    ensure!(rows.len() as u64 >= last, "{} rows exported, {last} acknowledged", rows.len());
    let receipts = rows.iter().filter(|row| row["kind"] == "receipt").count();
    let head = rows.last().and_then(|row| row["hash"].as_str()).context("no head")?;
    let verdict = python_verify_ledger_with(&export, &["--strict"])?;
    ensure!(verdict == (Some(0), format!("ok {} {receipts} {head} signed", rows.len())), "{verdict:?}");

    // Checkpoints carried in the export, both ways: a witness's of this ledger pins its row; one
    // held of another agent's ledger is checked against its own signer.
    let owner = hearth::identity::Identity::load(&keys)?.context("the writer's key")?;
    let other = hearth::identity::Identity::load(&keys.join("consumer"))?.context("the consumer's key")?;
    let pinned = &rows[1];
    let checkpoint = |identity: &hearth::identity::Identity, seq: &Value, head: &Value| {
        hearth::ledger::Signed::sign(
            identity,
            hearth::ledger::record::CHECKPOINT_TAG,
            &serde_json::json!({ "version": 1, "peer": identity.peer_id().to_string(), "seq": seq, "head": head, "at": 1 }),
        )
    };
    let witness_line = |signed: &hearth::ledger::Signed| -> Result<String> {
        let mut line = Vec::new();
        hearth::ledger::verify::write_witness(&mut line, &other.peer_id().to_string(), signed)?;
        Ok(String::from_utf8(line)?.trim_end().to_owned())
    };
    let mut held = Vec::new();
    hearth::ledger::verify::write_held(&mut held, &checkpoint(&other, &7.into(), &"ef".repeat(32).into())?)?;
    let mut carried =
        vec![lines[0].clone(), witness_line(&checkpoint(&owner, &pinned["seq"], &pinned["hash"])?)?];
    carried.push(String::from_utf8(held)?.trim_end().to_owned());
    carried.extend(lines[1..].iter().cloned());
    let file = dir.path().join("carried.jsonl");
    write_lines(&file, &carried)?;
    let verdict = python_verify_ledger_with(&file, &["--strict"])?;
    ensure!(verdict == (Some(0), format!("ok {} {receipts} {head} signed", rows.len())), "{verdict:?}");
    carried[1] = witness_line(&checkpoint(&owner, &pinned["seq"], &"00".repeat(32).into())?)?;
    write_lines(&file, &carried)?;
    let (code, line) = python_verify_ledger(&file)?;
    ensure!(
        code == Some(1) && line.starts_with(&format!("broken at row {}: rewritten", pinned["seq"])),
        "{code:?} {line}"
    );
    let rust =
        hearth_tests::hearth(dir.path(), &["ledger", "verify", "--export", file.to_str().context("path")?])?;
    ensure!(rust.status.code() == Some(1), "hearth ledger verify: {rust:?}");
    ensure!(String::from_utf8_lossy(&rust.stdout).contains("REWRITTEN"), "{rust:?}");

    // From elsewhere, the export cannot be signed, and says so; under --strict both verifiers
    // fail it, with the same code.
    let unsigned = dir.path().join("unsigned.jsonl");
    let mut command = hearth_tests::command(dir.path());
    command.args(["ledger", "export", "--db"]).arg(&db).arg("--out").arg(&unsigned);
    let out = hearth_tests::run_to_end(command)?;
    ensure!(out.status.success(), "hearth ledger export: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(String::from_utf8_lossy(&out.stderr).contains("will not be signed"), "{out:?}");
    let (code, line) = python_verify_ledger_with(&unsigned, &["--strict"])?;
    ensure!(code == Some(1) && line.starts_with("unsigned: "), "{code:?} {line}");
    let rust = hearth_tests::hearth(
        dir.path(),
        &["ledger", "verify", "--strict", "--export", unsigned.to_str().context("path")?],
    )?;
    ensure!(rust.status.code() == Some(1), "hearth ledger verify --strict: {rust:?}");
    ensure!(String::from_utf8_lossy(&rust.stdout).contains("UNSIGNED"), "{rust:?}");

    // The last row cut off and the chain as it was (nothing to compute again for the last row):
    // the signed head is of a row the export no longer has.
    let mut cut = lines.clone();
    cut.remove(cut.len() - 2);
    write_lines(&unsigned, &cut)?;
    let (code, line) = python_verify_ledger(&unsigned)?;
    ensure!(code == Some(1) && line.contains("signed head is of row"), "{code:?} {line}");

    // A receipt appended twice, chained as the store would chain it: both refuse it.
    let mut doubled: Vec<String> = lines[..lines.len() - 1].to_vec();
    let first_receipt = rows.iter().position(|row| row["kind"] == "receipt").context("no receipt")?;
    let mut again = rows[first_receipt].clone();
    let last_row = rows.last().context("no rows")?;
    let seq = last_row["seq"].as_u64().context("seq")? + 1;
    let prev: [u8; 32] = hex::decode(last_row["hash"].as_str().context("hash")?)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("hash"))?;
    let entry =
        hearth::proto::entry_bytes(seq, again["at"].as_i64().context("at")?, "receipt", &again["body"])?;
    again["seq"] = seq.into();
    again["prev"] = hex::encode(prev).into();
    again["hash"] = hex::encode(hearth::proto::row_hash(&prev, &entry)).into();
    doubled.push(serde_json::to_string(&again)?);
    write_lines(&unsigned, &doubled)?;
    let (code, line) = python_verify_ledger(&unsigned)?;
    ensure!(
        code == Some(1) && line.starts_with(&format!("broken at row {seq}: a second receipt")),
        "{code:?} {line}"
    );
    let rust = hearth_tests::hearth(
        dir.path(),
        &["ledger", "verify", "--export", unsigned.to_str().context("path")?],
    )?;
    ensure!(rust.status.code() == Some(1), "hearth ledger verify: {rust:?}");
    ensure!(
        String::from_utf8_lossy(&rust.stdout).contains(&format!("broken at row {seq}: a second receipt")),
        "{rust:?}"
    );

    // A key named twice in a row: a bad row for both. Not an export at all: exit 2 for both.
    let mut twice = lines.clone();
    twice[2] = twice[2].replacen(r#""kind":"receipt""#, r#""kind":"release","kind":"receipt""#, 1);
    ensure!(twice[2] != lines[2], "row 2 is not a receipt: {}", lines[2]);
    write_lines(&unsigned, &twice)?;
    let (code, line) = python_verify_ledger(&unsigned)?;
    ensure!(code == Some(1) && line.starts_with("broken at row 2: "), "{code:?} {line}");
    let rust = hearth_tests::hearth(
        dir.path(),
        &["ledger", "verify", "--export", unsigned.to_str().context("path")?],
    )?;
    ensure!(rust.status.code() == Some(1), "hearth ledger verify: {rust:?}");
    ensure!(String::from_utf8_lossy(&rust.stdout).contains("broken at row 2: "), "{rust:?}");
    std::fs::write(&unsigned, "seq,at,kind\n")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_ledger.py");
    let mut command = Command::new("python3");
    command.arg(script).arg(&unsigned);
    let out = hearth_tests::run_to_end(command)?;
    ensure!(out.status.code() == Some(2) && out.stderr.starts_with(b"error: "), "python: {out:?}");
    let rust = hearth_tests::hearth(
        dir.path(),
        &["ledger", "verify", "--export", unsigned.to_str().context("path")?],
    )?;
    ensure!(rust.status.code() == Some(2), "hearth ledger verify of a CSV file: {rust:?}");

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
    let mut cut = lines[..lines.len() - 1].to_vec();
    cut.remove(2);
    write_lines(&file, &cut)?;
    let (code, line) = python_verify_ledger(&file)?;
    ensure!(code == Some(1) && line.starts_with("broken at row 2: "), "{code:?} {line}");
    Ok(())
}

/// Runs tests/protocol/verify_advert.py in its `--offers` mode on a listing: its exit code and
/// its lines.
fn python_verify_offers(offers: &Value, now: i64) -> Result<(Option<i32>, Vec<String>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/verify_advert.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--offers", &now.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3")?;
    child.stdin.take().context("stdin")?.write_all(&serde_json::to_vec(offers)?)?;
    let out = child.wait_with_output()?;
    ensure!(out.stderr.is_empty(), "the verifier failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    Ok((out.status.code(), lines))
}

/// Issue 23, item 4: `hearth offers --json` (and `GET /api/v1/offers`) carry each advert's signed
/// form, and a client checks what it was shown with the steps docs/protocol.md gives, trusting
/// neither agent.
pub(crate) fn the_offers_an_agent_lists_verify_with_the_documented_steps() -> Result<()> {
    use crate::network::{address, joining, json, wait_to_know};
    let mut a = hearth_tests::Agent::start()?;
    let (a_addr, a_id) = address(&a)?;
    let mut b = joining(&a_addr)?;
    let (_, b_id) = address(&b)?;
    wait_to_know(&b, &[&a_id], Duration::from_secs(30))?;

    // What B lists, through the CLI: A's advert as B received it from the network, and B's own.
    let offers = json(&b, &["offers", "--json"])?;
    let now = hearth::clock::unix_now();
    let (code, lines) = python_verify_offers(&offers, now)?;
    ensure!(code == Some(0), "B's listing does not verify: {lines:?}\n{offers:#}");
    ensure!(lines.iter().any(|line| line.starts_with(&format!("ok {a_id} "))), "{lines:?}");
    ensure!(lines.iter().any(|line| line.starts_with(&format!("ok {b_id} "))), "{lines:?}");

    // A's signed form alone, as a gossipsub message, with A as the author.
    let a_offer = offers
        .as_array()
        .and_then(|list| list.iter().find(|offer| offer["peer_id"] == a_id.as_str()))
        .context("A's offer")?;
    let signed = a_offer["signed"].as_str().context("A's offer has no signed form")?;
    let verdict = python_verify(signed.as_bytes(), &a_id, now)?;
    let expected = format!(
        "ok {} {} {}",
        a_offer["seq"],
        a_offer["state"].as_str().unwrap_or(""),
        a_offer["free"]["cpu_millis"]
    );
    ensure!(verdict == expected, "{verdict} (expected {expected})");
    ensure!(python_verify(signed.as_bytes(), &b_id, now)? == "wrong peer");

    // An offer whose shown fields were changed on the way fails the same steps.
    let mut altered = offers.clone();
    for offer in altered.as_array_mut().into_iter().flatten() {
        if offer["peer_id"] == a_id.as_str() {
            offer["free"]["cpu_millis"] = (a_offer["free"]["cpu_millis"].as_u64().unwrap_or(0) + 1000).into();
        }
    }
    let (code, lines) = python_verify_offers(&altered, now)?;
    ensure!(code == Some(1), "{lines:?}");
    ensure!(lines.contains(&format!("{a_id}: the fields shown differ from the signed advert")), "{lines:?}");

    // The typed client carries it too, equal to what the CLI printed.
    let client_offers =
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
            hearth_api::Client::discover(&b.data_dir())?.offers().await.map_err(anyhow::Error::from)
        })?;
    let from_client = client_offers.iter().find(|offer| offer.peer_id == a_id).context("A")?;
    ensure!(from_client.signed.starts_with("{\"advert\":"), "{}", from_client.signed);
    ensure!(from_client.peer_id == a_id, "the offer reads as its body");

    for agent in [&mut a, &mut b] {
        ensure!(agent.terminate()?.success(), "an agent did not stop cleanly");
    }
    Ok(())
}

/// The heading of each block of advert test vectors in docs/protocol.md.
const ADVERT_VECTORS: [&str; 2] =
    ["Vector 1: sharing, with a GPU", "Vector 2: paused, with characters JCS escapes"];

/// docs/protocol.md's advert test vectors are what Hearth computes: the key from the seed, the
/// canonical bytes, the signed message, the signature and the whole message, byte for byte; and
/// the doc's example is vector 1. Editing any value in the doc fails this.
pub(crate) fn the_advert_test_vectors_in_the_protocol_doc_are_what_hearth_signs() -> Result<()> {
    use hearth::net::advert::{ADVERT_TAG, canonical_json};
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(&doc_path).context("reading docs/protocol.md")?;
    let names = ["seed", "public_key", "peer_id", "body", "canonical", "message", "signature", "wire"];
    let mut wires = Vec::new();
    for heading in ADVERT_VECTORS {
        let v = hearth_tests::doc_vectors(&doc, heading)?;
        ensure!(
            v.keys().map(String::as_str).eq(names.iter().copied().collect::<std::collections::BTreeSet<_>>()),
            "{heading}: names {:?}",
            v.keys()
        );
        let seed = hex_decode(&v["seed"]).context("seed")?;
        ensure!(seed.len() == 32, "{heading}: the seed is {} bytes", seed.len());
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("identity.key");
        std::fs::write(&key, &seed)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let (identity, _) = hearth::identity::Identity::load_or_create(dir.path())?;
        let public = identity.public().try_into_ed25519().context("not an Ed25519 key")?.to_bytes();
        ensure!(hex_encode(&public) == v["public_key"], "{heading}: public_key");
        ensure!(
            identity.peer_id().to_string() == v["peer_id"],
            "{heading}: peer_id is {}",
            identity.peer_id()
        );

        let body: hearth::net::AdvertBody = serde_json::from_str(&v["body"]).context("body")?;
        let canonical = canonical_json(&serde_json::from_str(&v["body"])?)?;
        ensure!(
            canonical == v["canonical"].as_bytes(),
            "{heading}: canonical is {}",
            String::from_utf8_lossy(&canonical)
        );
        let mut message = ADVERT_TAG_BYTES.to_vec();
        message.extend_from_slice(&canonical);
        ensure!(message == v["message"].as_bytes(), "{heading}: message");
        let signature = identity.sign(ADVERT_TAG, &canonical);
        ensure!(
            hex_encode(&signature) == v["signature"],
            "{heading}: signature is {}",
            hex_encode(&signature)
        );
        let advert = sign(&identity, body)?;
        ensure!(
            advert.wire == v["wire"].as_bytes(),
            "{heading}: wire is {}",
            String::from_utf8_lossy(&advert.wire)
        );
        // The documented message passes Hearth's own checks and the Python verifier's.
        let issued_at: i64 =
            serde_json::from_str::<Value>(&v["body"])?["issued_at"].as_i64().context("issued_at")?;
        hearth::net::advert::verify(v["wire"].as_bytes(), &identity.peer_id(), issued_at + 1, None)?;
        ensure!(
            python_verify(v["wire"].as_bytes(), &v["peer_id"], issued_at + 1)?.starts_with("ok "),
            "{heading}: python"
        );
        wires.push(v["wire"].clone());
    }
    // The example in the Encoding section is vector 1 with line breaks added.
    let example = doc
        .split_once("Example, the first of the test vectors below")
        .and_then(|(_, rest)| rest.split_once("```json\n"))
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block.replace('\n', ""))
        .context("the example in docs/protocol.md")?;
    ensure!(example == wires[0], "the example is not vector 1:\n{example}\n{}", wires[0]);
    Ok(())
}

/// The domain tag's bytes, as docs/protocol.md writes them.
const ADVERT_TAG_BYTES: &[u8] = b"hearth/advert/v1";

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    text.len().is_multiple_of(2).then_some(())?;
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
