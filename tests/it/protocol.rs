//! docs/protocol.md is enough to verify an advert: a verifier written from it alone, in Python
//! with only its standard library (tests/protocol/verify_advert.py), accepts Hearth's adverts and
//! rejects altered ones.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use hearth::net::advert::sign;

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
    let now = hearth::net::unix_now();
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
