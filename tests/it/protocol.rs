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
