//! The ledger against tampering: each test builds a real ledger in a real store, copies the file,
//! damages the copy the way an editor of history would (triggers dropped first), and checks that
//! verification names the first bad row.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::record::{Receipt, Usage};
use super::verify::{Anchor, ExportFormat, Witnessed, verify_export};
use super::*;
use crate::net::advert::Prices;
use crate::net::negotiate::sign_detached;

fn identity() -> Identity {
    let dir = tempfile::tempdir().unwrap();
    Identity::load_or_create(dir.path()).unwrap().0
}

/// The identity of a fixed key, the same on every run.
pub(crate) fn identity_from(seed: u8) -> Identity {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    std::fs::write(&key, [seed; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Identity::load_or_create(dir.path()).unwrap().0
}

/// A receipt `provider` signed and `consumer` countersigned.
pub(super) fn receipt(provider: &Identity, consumer: &Identity, n: u64) -> Receipt {
    let prices = Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 };
    let charges = record::charges(&prices, 1000, 1 << 30, 0, 60_000 + n);
    let body = ReceiptBody {
        version: VERSION,
        agreement_id: format!("agreement-{n}").into(),
        agreement_hash: "ab".repeat(32),
        provider: provider.peer_id().to_string().into(),
        consumer: consumer.peer_id().to_string().into(),
        outcome: "finished".into(),
        exit_code: Some(0),
        result: Some("cd".repeat(32)),
        usage: Usage { running_ms: 60_000 + n, cpu_core_ms: 59_000, ..Usage::default() },
        prices,
        price_per_hour: 1100,
        charges,
        amount: charges.total(),
        started_at: 1_796_472_000,
        ended_at: 1_796_472_060,
    };
    let signed = Signed::sign(provider, record::RECEIPT_TAG, &body).unwrap();
    Receipt::countersign(consumer, signed).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    owner: Identity,
    peer: Identity,
    ledger: Ledger,
}

/// A ledger of ten rows: receipts (odd rows) and releases (even rows), the owner the provider.
async fn ten_rows(mode: Mode) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.db");
    let (owner, peer) = (identity(), identity());
    let store = Store::open(&path, &owner.peer_id()).await.unwrap();
    let ledger = Ledger::new(store, owner.clone(), mode);
    for n in 0..5 {
        ledger.append_receipt(&receipt(&owner, &peer, n)).await.unwrap();
        ledger
            .record(
                Kind::Release,
                &serde_json::json!({ "agreement_id": format!("agreement-{n}"), "outcome": "finished" }),
            )
            .await
            .unwrap();
    }
    ledger.flush().await.unwrap();
    Fixture { _dir: dir, path, owner, peer, ledger }
}

/// A copy of the store file whose triggers are gone, for a test to damage.
fn tamperable_copy(fixture: &Fixture) -> (PathBuf, Connection) {
    let copy = fixture.path.with_file_name("copy.db");
    let source = Connection::open(&fixture.path).unwrap();
    source.execute("VACUUM INTO ?1", [copy.to_str().unwrap()]).unwrap();
    let conn = Connection::open(&copy).unwrap();
    conn.execute_batch("DROP TRIGGER ledger_no_update; DROP TRIGGER ledger_no_delete;").unwrap();
    (copy, conn)
}

fn verify(path: &Path) -> Report {
    verify_file(path, Vec::new()).unwrap()
}

#[tokio::test]
async fn an_untouched_ledger_verifies_and_is_append_only() {
    let fixture = ten_rows(Mode::Realtime).await;
    let report = verify(&fixture.path);
    assert_eq!(report.broken, None, "{report:?}");
    assert_eq!((report.rows, report.receipts), (10, 5));
    assert_eq!(report.owner, fixture.owner.peer_id().to_string());

    let conn = Connection::open(&fixture.path).unwrap();
    let update = conn.execute("UPDATE ledger SET body = '{}' WHERE seq = 3", []);
    assert!(update.unwrap_err().to_string().contains("append-only"));
    assert!(conn.execute("DELETE FROM ledger WHERE seq = 10", []).is_err());
}

#[tokio::test]
async fn batch_mode_gives_the_same_chain_of_records() {
    let realtime = ten_rows(Mode::Realtime).await;
    let batch = ten_rows(Mode::Batch).await;
    let (a, b) = (verify(&realtime.path), verify(&batch.path));
    assert_eq!((a.rows, a.broken), (b.rows, b.broken));
    // Records wait in batch mode until a receipt or a flush takes them.
    batch.ledger.record(Kind::Release, &serde_json::json!({ "agreement_id": "late" })).await.unwrap();
    assert_eq!(verify(&batch.path).rows, 10);
    batch.ledger.append_receipt(&receipt(&batch.owner, &batch.peer, 9)).await.unwrap();
    let after = verify(&batch.path);
    assert_eq!((after.rows, after.broken), (12, None));
}

#[tokio::test]
async fn a_receipt_offered_twice_counts_once() {
    let fixture = ten_rows(Mode::Realtime).await;
    let again = receipt(&fixture.owner, &fixture.peer, 2);
    let head = fixture.ledger.append_receipt(&again).await.unwrap();
    assert_eq!(head.seq, 10, "the second copy of receipt 2 was appended");
    assert_eq!(fixture.ledger.with_verified_receipts(|receipts, _| receipts.len()).await.unwrap(), 5);
    assert_eq!(verify(&fixture.path).broken, None);
}

#[tokio::test]
async fn a_flipped_bit_is_found_at_its_row() {
    let fixture = ten_rows(Mode::Realtime).await;
    let (copy, conn) = tamperable_copy(&fixture);
    let body: Vec<u8> =
        conn.query_row("SELECT CAST(body AS BLOB) FROM ledger WHERE seq = 5", [], |r| r.get(0)).unwrap();
    // A bit of a digit inside the receipt's numbers: still JSON, another amount.
    let at = body.iter().position(|b| b.is_ascii_digit()).unwrap();
    let mut flipped = body.clone();
    flipped[at] ^= 0x01;
    conn.execute("UPDATE ledger SET body = ?1 WHERE seq = 5", params![String::from_utf8(flipped).unwrap()])
        .unwrap();
    let report = verify(&copy);
    assert_eq!(report.broken.as_ref().map(|b| b.seq), Some(5), "{report:?}");
}

#[tokio::test]
async fn a_deleted_middle_row_is_named() {
    let fixture = ten_rows(Mode::Realtime).await;
    let (copy, conn) = tamperable_copy(&fixture);
    conn.execute("DELETE FROM ledger WHERE seq = 6", []).unwrap();
    let broken = verify(&copy).broken.unwrap();
    assert_eq!(broken.seq, 6);
    assert!(broken.problem.contains("removed"), "{}", broken.problem);
}

#[tokio::test]
async fn two_swapped_rows_are_found_at_the_first() {
    let fixture = ten_rows(Mode::Realtime).await;
    let (copy, conn) = tamperable_copy(&fixture);
    // Rows 3 and 5 are both receipts: swapping them keeps every row well formed.
    conn.execute_batch(
        "UPDATE ledger SET seq = -1 WHERE seq = 3;
         UPDATE ledger SET seq = 3 WHERE seq = 5;
         UPDATE ledger SET seq = 5 WHERE seq = -1;",
    )
    .unwrap();
    assert_eq!(verify(&copy).broken.map(|b| b.seq), Some(3));
}

#[tokio::test]
async fn a_forged_countersignature_is_found() {
    let fixture = ten_rows(Mode::Realtime).await;
    let mut forged = receipt(&fixture.owner, &fixture.peer, 7);
    // The provider signs the consumer's part itself.
    forged.consumer_signature = sign_detached(&fixture.owner, record::RECEIPT_TAG, &forged.receipt).unwrap();
    fixture.ledger.append_receipt(&forged).await.unwrap();
    let broken = verify(&fixture.path).broken.unwrap();
    assert_eq!(broken.seq, 11);
    assert!(broken.problem.contains("does not verify"), "{}", broken.problem);
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_a_counterpartys_checkpoint() {
    let fixture = ten_rows(Mode::Realtime).await;
    let checkpoint = fixture.ledger.checkpoint().await.unwrap().unwrap();
    let witness = fixture.peer.peer_id().to_string();
    // The counterparty keeps it (as the market does after a receipt).
    let theirs = Ledger::new(
        Store::open(&fixture.path.with_file_name("theirs.db"), &fixture.peer.peer_id()).await.unwrap(),
        fixture.peer.clone(),
        Mode::Realtime,
    );
    theirs.witness(&fixture.owner.peer_id(), &checkpoint).await.unwrap();
    let held = theirs.held_of(&fixture.owner.peer_id()).await.unwrap();
    assert_eq!(held.as_ref(), Some(&checkpoint));
    // A checkpoint sent by someone else is refused.
    assert!(theirs.witness(&fixture.peer.peer_id(), &checkpoint).await.is_err());

    let (copy, conn) = tamperable_copy(&fixture);
    conn.execute("DELETE FROM ledger WHERE seq > 7", []).unwrap();
    // Alone, a shorter chain is a valid chain.
    assert_eq!(verify(&copy).broken, None);
    let report = verify_file(&copy, vec![(witness.clone(), Ok(held.clone()))]).unwrap();
    let broken = report.broken.clone().unwrap();
    assert_eq!(broken.seq, 8, "{report:?}");
    assert!(broken.problem.contains(&witness));
    assert_eq!(report.witnesses[0].verdict, Witnessed::Truncated);

    // The untouched ledger matches the same checkpoint.
    let report = verify_file(&fixture.path, vec![(witness, Ok(held))]).unwrap();
    assert_eq!(report.broken, None);
    assert_eq!(report.witnesses[0].verdict, Witnessed::Matches);
}

#[tokio::test]
async fn a_rewritten_history_chained_again_is_caught_by_a_checkpoint() {
    let fixture = ten_rows(Mode::Realtime).await;
    let checkpoint = fixture.ledger.checkpoint().await.unwrap().unwrap();
    // The owner rewrites from row 4 on and chains every later row again: alone, it verifies.
    let (copy, conn) = tamperable_copy(&fixture);
    conn.execute("DELETE FROM ledger WHERE seq >= 4", []).unwrap();
    drop(conn);
    let store = Store::open(&copy, &fixture.owner.peer_id()).await.unwrap();
    let rewritten = Ledger::new(store.clone(), fixture.owner.clone(), Mode::Realtime);
    for n in 4..11 {
        rewritten
            .record(Kind::Release, &serde_json::json!({ "agreement_id": format!("other-{n}") }))
            .await
            .unwrap();
    }
    store.shutdown().await.unwrap();
    assert_eq!(verify(&copy).broken, None);
    let witness = fixture.peer.peer_id().to_string();
    let report = verify_file(&copy, vec![(witness, Ok(Some(checkpoint)))]).unwrap();
    assert_eq!(report.broken.map(|b| b.seq), Some(10));
    assert_eq!(report.witnesses[0].verdict, Witnessed::Forked);
}

#[tokio::test]
async fn a_checkpoint_not_signed_by_the_owner_proves_nothing() {
    let fixture = ten_rows(Mode::Realtime).await;
    let forged = Signed::sign(
        &fixture.peer,
        record::CHECKPOINT_TAG,
        &Checkpoint {
            version: VERSION,
            peer: fixture.owner.peer_id().to_string().into(),
            seq: 99,
            head: "00".repeat(32),
            at: 0,
        },
    )
    .unwrap();
    let report =
        verify_file(&fixture.path, vec![("w".into(), Ok(Some(forged))), ("x".into(), Err("gone".into()))])
            .unwrap();
    assert_eq!(report.broken, None);
    assert_eq!(report.witnesses[0].verdict, Witnessed::Invalid);
    assert_eq!(report.witnesses[1].verdict, Witnessed::Unreachable);
}

#[tokio::test]
async fn an_export_verifies_from_the_file_alone_and_its_tampering_is_found() {
    let fixture = ten_rows(Mode::Realtime).await;
    let mut jsonl = Vec::new();
    let exported =
        export_file(&fixture.path, ExportFormat::Jsonl, &mut jsonl, &ExportExtras::default()).unwrap();
    assert_eq!(exported, Exported { rows: 10, signed: false });
    let report = verify_export(BufReader::new(jsonl.as_slice()), Vec::new()).unwrap();
    assert_eq!((report.rows, report.receipts, report.broken.clone()), (10, 5, None));
    assert_eq!(report.anchor, Anchor::Unsigned);
    assert!(report.ok() && !report.ok_strict(), "an unsigned export verifies, but not under --strict");
    assert_eq!(report.head, verify(&fixture.path).head);

    let text = String::from_utf8(jsonl).unwrap();
    let tampered: Vec<String> = text
        .lines()
        .enumerate()
        .map(
            |(i, line)| if i == 4 { line.replacen("\"finished\"", "\"failed\"", 1) } else { line.to_owned() },
        )
        .collect();
    let report = verify_export(BufReader::new(tampered.join("\n").as_bytes()), Vec::new()).unwrap();
    assert_eq!(report.broken.map(|b| b.seq), Some(4));

    let mut csv = Vec::new();
    let signer = ExportExtras { signer: Some(&fixture.owner), ..ExportExtras::default() };
    export_file(&fixture.path, ExportFormat::Csv, &mut csv, &signer).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.starts_with("seq,at,kind,prev,hash,body\n1,"));
    assert_eq!(csv.lines().count(), 11);
}

#[test]
fn a_receipt_opens_only_with_both_signatures() {
    let (provider, consumer) = (identity(), identity());
    let receipt = receipt(&provider, &consumer, 1);
    let body = receipt.verify().unwrap();
    assert_eq!(body.amount, body.charges.total());
    let mut changed = receipt.clone();
    changed.receipt["amount"] = serde_json::Value::from(1);
    assert!(changed.verify().is_err());
    let swapped = Receipt {
        provider_signature: receipt.consumer_signature.clone(),
        consumer_signature: receipt.provider_signature.clone(),
        ..receipt
    };
    assert!(swapped.verify().is_err());
}

/// A signed export of `fixture`, with `extras` beside the signer, as lines.
fn signed_export<'a>(fixture: &'a Fixture, mut extras: ExportExtras<'a>) -> Vec<String> {
    extras.signer = Some(&fixture.owner);
    let mut jsonl = Vec::new();
    let exported = export_file(&fixture.path, ExportFormat::Jsonl, &mut jsonl, &extras).unwrap();
    assert!(exported.signed);
    String::from_utf8(jsonl).unwrap().lines().map(str::to_owned).collect()
}

fn verify_lines(lines: &[String]) -> Report {
    let mut text = lines.join("\n");
    text.push('\n');
    verify_export(BufReader::new(text.as_bytes()), Vec::new()).unwrap()
}

/// What an editor holding only the export does after changing rows: numbers the rows again and
/// computes every `prev` and `hash` anew, so that the chain alone holds.
fn rechain(lines: &[String]) -> Vec<String> {
    let mut prev = record::GENESIS;
    let mut seq = 0;
    lines
        .iter()
        .map(|line| {
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            if value.get("seq").is_none() {
                return line.clone();
            }
            seq += 1;
            let entry = record::entry_bytes(
                seq,
                value["at"].as_i64().unwrap(),
                value["kind"].as_str().unwrap(),
                &value["body"],
            )
            .unwrap();
            let hash = record::row_hash(&prev, &entry);
            value["seq"] = seq.into();
            value["prev"] = hex::encode(prev).into();
            value["hash"] = hex::encode(hash).into();
            prev = hash;
            value.to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_signed_export_pins_its_tail_and_its_unsigned_rows() {
    let fixture = ten_rows(Mode::Realtime).await;
    let lines = signed_export(&fixture, ExportExtras::default());
    assert_eq!(lines.len(), 12, "the header, ten rows, the signed head");
    assert!(lines[0].contains(r#""version":2"#), "{}", lines[0]);
    assert!(lines[11].starts_with(r#"{"signed_head":{"body":{"at":"#), "{}", lines[11]);
    let report = verify_lines(&lines);
    assert_eq!((report.rows, report.broken.clone(), report.anchor), (10, None, Anchor::Signed), "{report:?}");
    assert!(report.ok_strict());

    // The last two rows cut off and the chain computed again: alone it holds, not against the head.
    let mut cut = lines.clone();
    cut.drain(9..11);
    let cut = rechain(&cut);
    let report = verify_lines(&cut);
    assert_eq!(report.broken.as_ref().map(|b| b.seq), Some(9), "{report:?}");
    assert!(report.broken.unwrap().problem.contains("signed head is of row 10"));
    assert_eq!(report.anchor, Anchor::Invalid);
    let headless = &cut[..cut.len() - 1];
    let report = verify_lines(headless);
    assert_eq!(
        (report.broken.clone(), report.anchor),
        (None, Anchor::Unsigned),
        "without its head, it says so"
    );
    assert!(!report.ok_strict());

    // An unsigned row (a release, row 2) edited and the chain computed again.
    let mut edited = lines.clone();
    edited[2] = edited[2].replace(r#""outcome":"finished""#, r#""outcome":"failed""#);
    assert_ne!(edited[2], lines[2]);
    let report = verify_lines(&rechain(&edited));
    assert_eq!(report.broken.as_ref().map(|b| b.seq), Some(10), "{report:?}");
    assert!(report.broken.unwrap().problem.contains("rewritten"));

    // A row added after the head was signed.
    let mut added = lines.clone();
    let head = added.pop().unwrap();
    added.push(lines[10].clone());
    added.push(head);
    let report = verify_lines(&rechain(&added));
    assert_eq!(report.broken.map(|b| b.seq), Some(11));

    // A head signed by another key proves nothing.
    let forged = Signed::sign(
        &fixture.peer,
        record::CHECKPOINT_TAG,
        &Checkpoint {
            version: VERSION,
            peer: fixture.owner.peer_id().to_string().into(),
            seq: 10,
            head: verify(&fixture.path).head.unwrap(),
            at: 0,
        },
    )
    .unwrap();
    let mut forged_lines = lines.clone();
    forged_lines[11] = serde_json::json!({ "signed_head": forged }).to_string();
    let report = verify_lines(&forged_lines);
    assert_eq!((report.broken.map(|b| b.seq), report.anchor), (Some(11), Anchor::Invalid));
}

#[tokio::test]
async fn an_empty_ledger_exports_a_signed_head_of_row_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.db");
    let owner = identity();
    let store = Store::open(&path, &owner.peer_id()).await.unwrap();
    store.shutdown().await.unwrap();
    let mut jsonl = Vec::new();
    let extras = ExportExtras { signer: Some(&owner), ..ExportExtras::default() };
    export_file(&path, ExportFormat::Jsonl, &mut jsonl, &extras).unwrap();
    let report = verify_export(BufReader::new(jsonl.as_slice()), Vec::new()).unwrap();
    assert_eq!((report.rows, report.broken, report.anchor), (0, None, Anchor::Signed));
    // Another's ledger is not signed with this key.
    let other = identity();
    let extras = ExportExtras { signer: Some(&other), ..ExportExtras::default() };
    assert!(export_file(&path, ExportFormat::Jsonl, &mut Vec::new(), &extras).is_err());
}

#[tokio::test]
async fn a_receipt_appended_twice_is_a_bad_row_and_counts_once() {
    let fixture = ten_rows(Mode::Realtime).await;
    // In an export: row 1's receipt again as row 11, chained.
    let lines = signed_export(&fixture, ExportExtras::default());
    let mut doubled = lines[..11].to_vec();
    doubled.push(lines[1].clone());
    let report = verify_lines(&rechain(&doubled));
    let broken = report.broken.unwrap();
    assert_eq!(broken.seq, 11);
    assert!(broken.problem.contains("second receipt of agreement agreement-0"), "{}", broken.problem);

    // In a store file, written past the store's own check, chained: verify names it, and
    // earnings count the receipts before it once each.
    let (copy, conn) = tamperable_copy(&fixture);
    let (hash, body): (String, String) = conn
        .query_row("SELECT hash, body FROM ledger WHERE seq = 10", [], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    let first: String =
        conn.query_row("SELECT body FROM ledger WHERE seq = 1", [], |row| row.get(0)).unwrap();
    drop(body);
    let prev: [u8; 32] = hex::decode(&hash).unwrap().try_into().unwrap();
    let new_hash = record::row_hash(&prev, &record::entry_bytes_of_canonical(11, 1, Kind::Receipt, &first));
    conn.execute(
        "INSERT INTO ledger (seq, at, kind, body, prev, hash) VALUES (11, 1, 'receipt', ?1, ?2, ?3)",
        params![first, hash, hex::encode(new_hash)],
    )
    .unwrap();
    drop(conn);
    assert_eq!(verify(&copy).broken.map(|b| b.seq), Some(11));
    let store = Store::open(&copy, &fixture.owner.peer_id()).await.unwrap();
    let ledger = Ledger::new(store.clone(), fixture.owner.clone(), Mode::Realtime);
    let earnings = ledger.earnings(None).await.unwrap();
    assert_eq!(earnings.total.earned.receipts, 5, "the doubled receipt is not earned twice");
    assert_eq!(earnings.broken.map(|b| b.seq), Some(11));
    let honest = fixture.ledger.earnings(None).await.unwrap();
    assert_eq!((honest.total.earned.amount, honest.broken), (earnings.total.earned.amount, None));
    // Earnings verify only what was appended since they last looked.
    fixture.ledger.append_receipt(&receipt(&fixture.owner, &fixture.peer, 7)).await.unwrap();
    assert_eq!(fixture.ledger.earnings(None).await.unwrap().total.earned.receipts, 6);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_key_named_twice_or_a_field_no_hash_covers_is_a_bad_row() {
    let fixture = ten_rows(Mode::Realtime).await;
    let lines = signed_export(&fixture, ExportExtras::default());
    // Row 2 is a release: serde_json alone would read the last "outcome", and its hash holds.
    let mut twice = lines.clone();
    twice[2] = twice[2].replace(r#""outcome":"finished""#, r#""outcome":"failed","outcome":"finished""#);
    assert_ne!(twice[2], lines[2]);
    let report = verify_lines(&twice);
    let broken = report.broken.unwrap();
    assert_eq!(broken.seq, 2);
    assert!(broken.problem.contains("appears twice"), "{}", broken.problem);

    // A fraction has no canonical form here: a bad row, named as such, not a malformed file.
    let mut fraction = lines.clone();
    fraction[4] = fraction[4].replacen(r#""outcome":"finished""#, r#""outcome":"finished","share":0.5"#, 1);
    assert_ne!(fraction[4], lines[4]);
    let broken = verify_lines(&fraction).broken.unwrap();
    assert_eq!(broken.seq, 4);
    assert!(
        broken.problem.contains("0.5 is not an integer") && !broken.problem.contains("advert"),
        "{}",
        broken.problem
    );

    let mut extra = lines.clone();
    extra[3] = extra[3].replacen('{', r#"{"note":"paid in full","#, 1);
    let report = verify_lines(&extra);
    let broken = report.broken.unwrap();
    assert_eq!(broken.seq, 3);
    assert!(broken.problem.contains("note"), "{}", broken.problem);

    // Not an export at all: an error, not a verdict about a row.
    for (i, bad) in [
        (0, r#"{"format":"hearth-ledger","version":2,"owner":"x","extra":1}"#),
        (5, "not json"),
        (5, r#"{"other":1}"#),
        (11, r#"{"seq":1}"#),
    ] {
        let mut broken = lines.clone();
        if i == 11 {
            broken.push(bad.into());
        } else {
            broken[i] = bad.into();
        }
        let mut text = broken.join("\n");
        text.push('\n');
        assert!(verify_export(BufReader::new(text.as_bytes()), Vec::new()).is_err(), "{bad} at line {i}");
    }
}

#[tokio::test]
async fn an_export_with_witnesses_carries_the_checkpoints_both_ways() {
    let fixture = ten_rows(Mode::Realtime).await;
    let witnessed = fixture.ledger.checkpoint().await.unwrap().unwrap();
    let held = Signed::sign(
        &fixture.peer,
        record::CHECKPOINT_TAG,
        &Checkpoint {
            version: VERSION,
            peer: fixture.peer.peer_id().to_string().into(),
            seq: 4,
            head: "ef".repeat(32),
            at: 7,
        },
    )
    .unwrap();
    let witness = fixture.peer.peer_id().to_string();
    let extras =
        ExportExtras { signer: None, witnesses: vec![(witness.clone(), witnessed)], held: vec![held] };
    let lines = signed_export(&fixture, extras);
    assert_eq!(lines.len(), 14);
    assert!(lines[1].starts_with(r#"{"checkpoint":"#) && lines[2].starts_with(r#"{"held":"#), "{}", lines[1]);
    let report = verify_lines(&lines);
    assert_eq!((report.broken.clone(), report.anchor), (None, Anchor::Signed), "{report:?}");
    assert_eq!(report.witnesses[0].verdict, Witnessed::Matches);
    assert_eq!(report.witnesses[0].peer, witness);
    assert!(report.held[0].verifies);
    assert_eq!((report.held[0].peer.as_str(), report.held[0].seq), (witness.as_str(), 4));

    // A held checkpoint whose signature was changed is reported as such; it is not this ledger's.
    let mut forged = lines.clone();
    forged[2] = forged[2].replace(r#""seq":4"#, r#""seq":5"#);
    let report = verify_lines(&forged);
    assert_eq!(report.broken, None);
    assert!(!report.held[0].verifies);
    // The witness line pins row 10: a rewritten history fails against it even without the head.
    let mut rewritten = lines.clone();
    rewritten.pop();
    rewritten[4] = rewritten[4].replace(r#""outcome":"finished""#, r#""outcome":"failed""#);
    let report = verify_lines(&rechain(&rewritten));
    assert_eq!(report.broken.map(|b| b.seq), Some(10));
    assert_eq!(report.witnesses[0].verdict, Witnessed::Forked);
    // Checkpoints go before the rows.
    let mut misplaced = lines.clone();
    let line = misplaced.remove(1);
    misplaced.insert(5, line);
    let mut text = misplaced.join("\n");
    text.push('\n');
    assert!(verify_export(BufReader::new(text.as_bytes()), Vec::new()).is_err());
}
