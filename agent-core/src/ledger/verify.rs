//! Verifying a ledger, whatever it is read from (the store file, a copy, an export): every row's
//! hash, every link, every signature of the documents in it, one receipt per agreement, the
//! checkpoints other agents hold of it and an export's signed head. It names the first bad row.
//! Also the two export formats, and the receipts that verified, from which earnings are counted.
//!
//! Rows are checked in chunks: each chunk's rows are checked on their own on every core (hash and
//! signatures need nothing from the row before), then the links and sequence numbers in order,
//! so the first bad row is the first in the chain, whichever thread found it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::{self, BufRead, Write};

use libp2p_identity::{PeerId, PublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use hearth_api::ledger::{Anchor, Broken, HeldCheck, Report, WitnessCheck, Witnessed};

use super::record::{
    CHECKPOINT_TAG, Checkpoint, GENESIS, Kind, RECEIPT_TAG, Receipt, ReceiptBody, Row, VERSION,
    entry_bytes_of_canonical, row_hash,
};
use crate::identity::{self, DomainTag};
use crate::net::advert::{canonical_json, public_key};
use crate::net::negotiate::{
    AGREEMENT_TAG, NOTICE_TAG, RELEASE_TAG, REQUEST_TAG, RESERVATION_TAG, RESERVE_TAG, Signed,
};
use crate::proto::strict_json;

/// Rows checked together; big enough to keep every core busy, small enough to hold.
const CHUNK: usize = 8192;

/// The `format` of a JSON Lines export's first line.
pub const EXPORT_FORMAT: &str = "hearth-ledger";

/// The export format this code writes: version 2 adds the witness and held lines after the header
/// and the signed head at the end. Version 1 (rows alone) is still read, as unsigned.
pub const EXPORT_VERSION: u64 = 2;

/// A row of the chain as the verifier takes it: read whole, or refused as read (a key named
/// twice, a field no hash covers), which makes it the bad row wherever it stands.
struct Pending {
    row: Row,
    refused: Option<String>,
}

/// Checks rows in chain order. Feed it every row with [`Verifier::push`], then [`Verifier::finish`].
pub struct Verifier {
    owner: String,
    owner_id: Option<PeerId>,
    chunk: Vec<Pending>,
    next_seq: u64,
    prev: String,
    rows: u64,
    receipts: u64,
    broken: Option<Broken>,
    /// Checkpoints to hold the chain against, by row, each with its witness.
    checkpoints: Vec<(String, Checkpoint)>,
    witnesses: Vec<WitnessCheck>,
    /// The row of each agreement's receipt: a second receipt of one agreement is a bad row.
    receipt_rows: HashMap<String, u64>,
    /// The receipts of the rows that verified, in chain order, when asked to keep them.
    counted: Option<Vec<ReceiptBody>>,
    /// An export's signed head: `None` until one is given, then the checkpoint or why it is not one.
    head: Option<Result<Checkpoint, String>>,
    /// Whether the rows came from an export (which needs a signed head) or the store file.
    export: bool,
    held: Vec<HeldCheck>,
}

impl Verifier {
    /// A verifier of `owner`'s ledger.
    pub fn new(owner: &str) -> Self {
        Self {
            owner: owner.to_owned(),
            owner_id: owner.parse().ok(),
            chunk: Vec::with_capacity(CHUNK),
            next_seq: 1,
            prev: hex::encode(GENESIS),
            rows: 0,
            receipts: 0,
            broken: None,
            checkpoints: Vec::new(),
            witnesses: Vec::new(),
            receipt_rows: HashMap::new(),
            counted: None,
            head: None,
            export: false,
            held: Vec::new(),
        }
    }

    /// Keeps the receipt of every row that verifies, for [`Verifier::counted`]: earnings are
    /// counted from these, never from rows read without verifying.
    pub fn counting_receipts(mut self) -> Self {
        self.counted = Some(Vec::new());
        self
    }

    /// Marks the rows as an export's, whose end only its owner's signed head vouches for.
    fn reading_export(&mut self) {
        self.export = true;
    }

    /// An export's signed head: the owner's checkpoint of its last row.
    pub fn signed_head(&mut self, signed: &Signed) {
        self.head = Some(self.open_checkpoint(signed));
    }

    /// A checkpoint the owner holds of another agent's ledger: reported, checked against its signer.
    pub fn held(&mut self, signed: &Signed) {
        let checkpoint: Option<Checkpoint> = serde_json::from_value(signed.body.clone()).ok();
        let verifies = checkpoint.as_ref().is_some_and(|checkpoint| {
            checkpoint.peer.as_str().parse::<PeerId>().is_ok_and(|signer| {
                signed.open::<Checkpoint>(CHECKPOINT_TAG, &signer).is_ok_and(|opened| opened == *checkpoint)
            })
        });
        self.held.push(HeldCheck {
            peer: checkpoint.as_ref().map_or_else(|| "?".to_owned(), |c| c.peer.to_string()).into(),
            seq: checkpoint.as_ref().map_or(0, |c| c.seq),
            head: checkpoint.map_or_else(String::new, |c| c.head),
            verifies,
        });
    }

    /// The row the next one pushed must be.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checks every row pushed so far; [`Verifier::broken`] and [`Verifier::counted`] then cover
    /// them all. More rows may follow.
    pub fn settle(&mut self) {
        self.check_chunk();
    }

    /// The first bad row among those settled.
    pub fn broken(&self) -> Option<&Broken> {
        self.broken.as_ref()
    }

    /// The receipts of the settled rows before the first bad one, one per agreement, in chain
    /// order (with [`Verifier::counting_receipts`]).
    pub fn counted(&self) -> &[ReceiptBody] {
        self.counted.as_deref().unwrap_or_default()
    }

    /// Holds the chain against a checkpoint `witness` holds (its signed document), or records
    /// that the witness had none or could not be asked.
    pub fn witness(&mut self, witness: &str, answer: Result<Option<Signed>, String>) {
        let check = |verdict, seq, detail: String| WitnessCheck {
            peer: witness.to_owned().into(),
            seq,
            verdict,
            detail,
        };
        match answer {
            Err(error) => self.witnesses.push(check(Witnessed::Unreachable, None, error)),
            Ok(None) => {
                self.witnesses.push(check(Witnessed::None, None, "holds no checkpoint of this ledger".into()))
            }
            Ok(Some(signed)) => match self.open_checkpoint(&signed) {
                Ok(checkpoint) => self.checkpoints.push((witness.to_owned(), checkpoint)),
                Err(why) => self.witnesses.push(check(Witnessed::Invalid, None, why)),
            },
        }
    }

    fn open_checkpoint(&self, signed: &Signed) -> Result<Checkpoint, String> {
        let owner = self.owner_id.ok_or("the ledger's owner is not a peer id")?;
        let checkpoint: Checkpoint = signed
            .open(CHECKPOINT_TAG, &owner)
            .map_err(|e| format!("a checkpoint that does not verify: {e}"))?;
        if checkpoint.peer != self.owner {
            return Err(format!("a checkpoint of {}, not of this ledger", checkpoint.peer));
        }
        Ok(checkpoint)
    }

    /// Takes the next row.
    pub fn push(&mut self, row: Row) {
        self.push_pending(Pending { row, refused: None });
    }

    fn push_pending(&mut self, pending: Pending) {
        self.chunk.push(pending);
        if self.chunk.len() == CHUNK {
            self.check_chunk();
        }
    }

    /// Whether a bad row has been found already (later rows change nothing).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// The report, once every row was pushed.
    pub fn finish(mut self) -> Report {
        self.check_chunk();
        let last = self.next_seq - 1;
        let mut checkpoints = std::mem::take(&mut self.checkpoints);
        checkpoints.sort_by_key(|(_, checkpoint)| checkpoint.seq);
        // Matches and forks were settled as the rows went by; what is left lies past the end.
        for (witness, checkpoint) in checkpoints.into_iter().filter(|(_, checkpoint)| checkpoint.seq > last) {
            self.break_at(
                last + 1,
                format!(
                    "missing: {witness} holds a checkpoint this agent signed of row {}, but the ledger ends at row {last}",
                    checkpoint.seq
                ),
            );
            self.witnesses.push(WitnessCheck {
                peer: witness.into(),
                seq: Some(checkpoint.seq),
                verdict: Witnessed::Truncated,
                detail: format!(
                    "its checkpoint of row {} is past the ledger's end (row {last})",
                    checkpoint.seq
                ),
            });
        }
        let anchor = self.anchor(last);
        Report {
            owner: self.owner.into(),
            rows: self.rows,
            receipts: self.receipts,
            head: (self.rows > 0).then_some(self.prev),
            broken: self.broken,
            witnesses: self.witnesses,
            anchor,
            held: self.held,
        }
    }

    /// Holds an export's rows against its signed head, which must be of its last row (`last`).
    fn anchor(&mut self, last: u64) -> Anchor {
        if !self.export {
            return Anchor::Store;
        }
        let checkpoint = match self.head.take() {
            None => return Anchor::Unsigned,
            Some(Err(why)) => {
                self.break_at(last + 1, format!("the export's signed head proves nothing: {why}"));
                return Anchor::Invalid;
            }
            Some(Ok(checkpoint)) => checkpoint,
        };
        let last_hash = if last == 0 { hex::encode(GENESIS) } else { self.prev.clone() };
        if checkpoint.seq > last {
            self.break_at(
                last + 1,
                format!(
                    "missing: the export's signed head is of row {}, but its rows end at row {last}",
                    checkpoint.seq
                ),
            );
        } else if checkpoint.seq < last {
            self.break_at(
                checkpoint.seq + 1,
                format!(
                    "row {} is past the export's signed head, which is of row {}",
                    checkpoint.seq + 1,
                    checkpoint.seq
                ),
            );
        } else if checkpoint.head != last_hash {
            self.break_at(
                last,
                format!(
                    "rewritten: the export's signed head says row {last} has hash {}, the rows chain to {last_hash}",
                    checkpoint.head
                ),
            );
        } else {
            return Anchor::Signed;
        }
        Anchor::Invalid
    }

    fn break_at(&mut self, seq: u64, problem: String) {
        if self.broken.as_ref().is_none_or(|broken| seq < broken.seq) {
            self.broken = Some(Broken { seq, problem });
        }
    }

    fn check_chunk(&mut self) {
        let chunk = std::mem::take(&mut self.chunk);
        if chunk.is_empty() {
            return;
        }
        let own = self.owner.as_str();
        // Each row alone, on every core.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunk.len());
        let per_thread = chunk.len().div_ceil(threads);
        let checked: Vec<Result<Option<String>, String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = chunk
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        let mut keys = Keys::default();
                        part.iter()
                            .map(|pending| match &pending.refused {
                                Some(why) => Err(why.clone()),
                                None => check_row(&pending.row, own, &mut keys),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap_or_else(|_| vec![Err("the check panicked".into())]))
                .collect()
        });
        // Then the links and the receipts' agreements, in order.
        let mut forks = Vec::new();
        for (Pending { row, refused }, checked) in chunk.into_iter().zip(checked) {
            let expected = self.next_seq;
            let (agreement, problem) = match checked {
                Ok(agreement) => (agreement, None),
                Err(problem) => (None, Some(problem)),
            };
            if let Some(why) = refused {
                // A line read apart: it may not even carry its seq.
                self.break_at(expected, why);
            } else if row.seq != expected {
                let problem = if row.seq > expected {
                    format!("missing: the next row is {}, so row {expected} was removed", row.seq)
                } else {
                    format!("row {} appears again or out of order after row {}", row.seq, expected - 1)
                };
                self.break_at(expected, problem);
            } else if row.prev != self.prev {
                self.break_at(row.seq, "its link (prev) is not the hash of the row before".into());
            } else if let Some(problem) = problem {
                self.break_at(row.seq, problem);
            } else if let Some(agreement) = agreement {
                match self.receipt_rows.entry(agreement) {
                    Entry::Occupied(first) => {
                        let problem = format!(
                            "a second receipt of agreement {} (its receipt is row {}): one agreement has one receipt",
                            first.key(),
                            first.get()
                        );
                        self.break_at(row.seq, problem);
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(row.seq);
                        if self.broken.is_none()
                            && let Some(counted) = &mut self.counted
                            && let Some(receipt) = receipt_body(&row.body)
                        {
                            counted.push(receipt);
                        }
                    }
                }
            }
            for (witness, checkpoint) in &self.checkpoints {
                if checkpoint.seq == row.seq {
                    let (verdict, detail) = if checkpoint.head == row.hash {
                        (Witnessed::Matches, format!("its checkpoint at row {} matches", row.seq))
                    } else {
                        (Witnessed::Forked, format!("its checkpoint at row {} has another hash", row.seq))
                    };
                    self.witnesses.push(WitnessCheck {
                        peer: witness.clone().into(),
                        seq: Some(row.seq),
                        verdict: verdict.clone(),
                        detail,
                    });
                    if verdict == Witnessed::Forked {
                        let problem = format!(
                            "rewritten: {witness} holds a checkpoint this agent signed of row {} with hash {}, the ledger has {}",
                            row.seq, checkpoint.head, row.hash
                        );
                        forks.push((row.seq, problem));
                    }
                }
            }
            if row.kind == Kind::Receipt.name() && self.broken.is_none() {
                self.receipts += 1;
            }
            self.rows += 1;
            self.next_seq = self.next_seq.max(row.seq.saturating_add(1));
            self.prev = row.hash;
        }
        for (seq, problem) in forks {
            self.break_at(seq, problem);
        }
    }
}

/// Public keys already taken out of peer ids.
#[derive(Default)]
struct Keys(HashMap<String, Option<PublicKey>>);

impl Keys {
    /// Checks `signature` by `signer` over `message`, the canonical bytes of the signed document.
    fn verify(
        &mut self,
        tag: DomainTag,
        message: &[u8],
        signature: Option<&Value>,
        signer: Option<&Value>,
    ) -> Result<(), String> {
        let signer = signer.and_then(Value::as_str).ok_or("a signed document names no signer")?;
        let key = self
            .0
            .entry(signer.to_owned())
            .or_insert_with(|| signer.parse::<PeerId>().ok().as_ref().and_then(public_key))
            .as_ref()
            .ok_or_else(|| format!("{signer} is not an Ed25519 peer id"))?;
        let signature = signature
            .and_then(Value::as_str)
            .and_then(|text| hex::decode(text).ok())
            .ok_or("a signature is missing or not hex")?;
        if identity::verify(key, tag, message, &signature) {
            Ok(())
        } else {
            Err(format!("a signature by {signer} does not verify"))
        }
    }
}

/// The receipt a verified receipt row holds.
fn receipt_body(body: &str) -> Option<ReceiptBody> {
    let receipt: Receipt = serde_json::from_str(body).ok()?;
    serde_json::from_value(receipt.receipt).ok()
}

/// Everything about one row that needs no other row: its hash, its form, the signatures in it,
/// and that the ledger's owner is a party to it. For a receipt, the agreement it is of.
fn check_row(row: &Row, owner: &str, keys: &mut Keys) -> Result<Option<String>, String> {
    let kind = Kind::parse(&row.kind).ok_or_else(|| format!("unknown kind {:?}", row.kind))?;
    let body: Value = serde_json::from_str(&row.body).map_err(|e| format!("its body is not JSON: {e}"))?;
    let canonical = canonical_json(&body).map_err(|e| format!("its body cannot be canonical: {e}"))?;
    if canonical != row.body.as_bytes() {
        return Err("its body is not in canonical form".into());
    }
    let prev = decode(&row.prev).ok_or("its link (prev) is not 64 hex digits")?;
    let hash = row_hash(&prev, &entry_bytes_of_canonical(row.seq, row.at, kind, &row.body));
    if hex::encode(hash) != row.hash {
        return Err("its hash does not match its contents".into());
    }
    let party = |document: &Value, fields: &[&str]| {
        if fields.iter().any(|field| document.get(field).and_then(Value::as_str) == Some(owner)) {
            Ok(())
        } else {
            Err(format!("a {} this agent is not a party to", kind.name()))
        }
    };
    let field = |name: &str| body.get(name);
    match kind {
        Kind::Request | Kind::Offer | Kind::Notice => {
            let document = field("body").ok_or("no signed body")?;
            let (tag, signer) = match kind {
                Kind::Request => (REQUEST_TAG, "consumer"),
                Kind::Offer => (AGREEMENT_TAG, "provider"),
                _ => (NOTICE_TAG, "provider"),
            };
            let message = canonical_json(document).map_err(|e| e.to_string())?;
            keys.verify(tag, &message, field("signature"), document.get(signer))?;
            party(document, &["consumer", "provider"]).map(|()| None)
        }
        Kind::Agreement | Kind::Receipt => {
            let (tag, name) =
                if kind == Kind::Agreement { (AGREEMENT_TAG, "terms") } else { (RECEIPT_TAG, "receipt") };
            let document = field(name).ok_or_else(|| format!("no {name}"))?;
            if document.get("version").and_then(Value::as_u64) != Some(VERSION) {
                return Err(format!("{name} of an unknown version"));
            }
            // Both signatures are over the same bytes: canonicalised once.
            let message = canonical_json(document).map_err(|e| e.to_string())?;
            keys.verify(tag, &message, field("provider_signature"), document.get("provider"))?;
            keys.verify(tag, &message, field("consumer_signature"), document.get("consumer"))?;
            party(document, &["consumer", "provider"])?;
            if kind == Kind::Agreement {
                return Ok(None);
            }
            match document.get("agreement_id").and_then(Value::as_str) {
                Some(agreement) => Ok(Some(agreement.to_owned())),
                None => Err("a receipt naming no agreement".into()),
            }
        }
        Kind::Reservation => {
            let event = body.get("event").and_then(Value::as_str).unwrap_or_default();
            let (tag, signer) = match event {
                "reserve" => (RESERVE_TAG, "consumer"),
                "granted" => (RESERVATION_TAG, "provider"),
                "released" => (RELEASE_TAG, "consumer"),
                "lapsed" => {
                    return match body.get("reservation_id").and_then(Value::as_str) {
                        Some(_) => Ok(None),
                        None => Err("a lapsed reservation naming no reservation".into()),
                    };
                }
                other => return Err(format!("a reservation event {other:?} of no known kind")),
            };
            let signed = field("document").ok_or("a reservation record with no document")?;
            let document = signed.get("body").ok_or("no signed body")?;
            let message = canonical_json(document).map_err(|e| e.to_string())?;
            keys.verify(tag, &message, signed.get("signature"), document.get(signer))?;
            party(document, &["consumer", "provider"]).map(|()| None)
        }
        Kind::Transfer | Kind::Release => {
            if body.get("agreement_id").and_then(Value::as_str).is_none() {
                return Err(format!("a {} naming no agreement", kind.name()));
            }
            Ok(None)
        }
    }
}

fn decode(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// JSON Lines: a header line, then one row per line with its body as a JSON object.
    Jsonl,
    /// Comma-separated values with a header line; the body is its canonical JSON text.
    Csv,
}

/// The first line of a JSON Lines export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// [`EXPORT_VERSION`], or 1 for an export made before signed heads.
    pub version: u64,
    /// Whose ledger.
    pub owner: String,
}

/// Writes the header of an export.
pub fn write_header(out: &mut impl Write, format: ExportFormat, owner: &str) -> io::Result<()> {
    match format {
        ExportFormat::Jsonl => {
            let header =
                ExportHeader { format: EXPORT_FORMAT.into(), version: EXPORT_VERSION, owner: owner.into() };
            serde_json::to_writer(&mut *out, &header)?;
            out.write_all(b"\n")
        }
        ExportFormat::Csv => out.write_all(b"seq,at,kind,prev,hash,body\n"),
    }
}

/// Writes a line of a JSON Lines export that is not a row: canonical JSON, so that every writer
/// writes the same bytes.
fn write_line(out: &mut impl Write, line: &Value) -> io::Result<()> {
    let bytes = canonical_json(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?;
    out.write_all(&bytes)?;
    out.write_all(b"\n")
}

/// Writes a checkpoint of the ledger that `witness` holds: `{"checkpoint": SIGNED, "witness": PEER}`.
/// These follow the header, before the rows.
pub fn write_witness(out: &mut impl Write, witness: &str, checkpoint: &Signed) -> io::Result<()> {
    write_line(out, &serde_json::json!({ "witness": witness, "checkpoint": checkpoint }))
}

/// Writes a checkpoint the owner holds of another agent's ledger: `{"held": SIGNED}`. These follow
/// the witnesses, before the rows.
pub fn write_held(out: &mut impl Write, checkpoint: &Signed) -> io::Result<()> {
    write_line(out, &serde_json::json!({ "held": checkpoint }))
}

/// Writes the owner's signed checkpoint of the last row: `{"signed_head": SIGNED}`, the last line.
pub fn write_signed_head(out: &mut impl Write, head: &Signed) -> io::Result<()> {
    write_line(out, &serde_json::json!({ "signed_head": head }))
}

/// Writes one row of an export.
pub fn write_row(out: &mut impl Write, format: ExportFormat, row: &Row) -> io::Result<()> {
    match format {
        ExportFormat::Jsonl => {
            // The body goes in as the stored text (canonical JSON), so nothing is re-encoded.
            let kind = serde_json::to_string(&row.kind)?;
            writeln!(
                out,
                r#"{{"seq":{},"at":{},"kind":{kind},"body":{},"prev":"{}","hash":"{}"}}"#,
                row.seq,
                row.at,
                if serde_json::from_str::<Value>(&row.body).is_ok() {
                    row.body.clone()
                } else {
                    serde_json::to_string(&row.body)?
                },
                row.prev,
                row.hash
            )
        }
        ExportFormat::Csv => {
            let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
            writeln!(
                out,
                "{},{},{},{},{},{}",
                row.seq,
                row.at,
                quote(&row.kind),
                row.prev,
                row.hash,
                quote(&row.body)
            )
        }
    }
}

/// Why an export could not be read: it is not an export at all (as opposed to an export with a
/// bad row, which is a [`Report`] naming the row).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file could not be read.
    #[error("cannot read the export: {0}")]
    Io(#[from] io::Error),
    /// A line is not what the format says.
    #[error("line {line} of the export: {problem}")]
    Malformed {
        /// 1-based.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// A row line, exactly its six fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowLine {
    seq: u64,
    at: i64,
    kind: String,
    body: Value,
    prev: String,
    hash: String,
}

/// A signed document in an export line, exactly its two fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedLine {
    body: Value,
    signature: String,
}

impl From<SignedLine> for Signed {
    fn from(line: SignedLine) -> Self {
        Signed { body: line.body, signature: line.signature }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WitnessLine {
    witness: String,
    checkpoint: SignedLine,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeldLine {
    held: SignedLine,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadLine {
    signed_head: SignedLine,
}

/// Where in an export a line stands: each part follows the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Checkpoints,
    Rows,
    End,
}

/// Verifies a JSON Lines export from its text alone, holding it against the checkpoints it
/// carries, `witnesses` given apart, and its signed head. A file that is not an export is an
/// [`ExportError`]; an export with a bad row is a report that names it.
pub fn verify_export(
    input: impl BufRead,
    witnesses: Vec<(String, Result<Option<Signed>, String>)>,
) -> Result<Report, ExportError> {
    let mut lines = input.lines();
    let malformed = |line: usize, problem: String| ExportError::Malformed { line, problem };
    let header = lines.next().ok_or_else(|| malformed(1, "the file is empty".into()))??;
    let header: ExportHeader = strict_json(&header)
        .and_then(serde_json::from_value)
        .map_err(|e| malformed(1, format!("not a ledger export header: {e}")))?;
    if header.format != EXPORT_FORMAT || !(1..=EXPORT_VERSION).contains(&header.version) {
        return Err(malformed(
            1,
            format!("format {} version {} is not one this agent reads", header.format, header.version),
        ));
    }
    let mut verifier = Verifier::new(&header.owner);
    verifier.reading_export();
    for (peer, answer) in witnesses {
        verifier.witness(&peer, answer);
    }
    let mut part = Part::Checkpoints;
    for (index, line) in lines.enumerate() {
        let number = index + 2;
        let line = line?;
        let value = match strict_json(&line) {
            Ok(value) => value,
            // JSON whose only fault is a key named twice: in a row, that row is bad.
            Err(error) if serde_json::from_str::<Value>(&line).is_ok_and(|v| v.get("seq").is_some()) => {
                part = Part::Rows;
                verifier.push_pending(refused_row(format!("{error}: the row has no single meaning")));
                continue;
            }
            Err(error) => return Err(malformed(number, format!("not a JSON object: {error}"))),
        };
        let Value::Object(fields) = &value else {
            return Err(malformed(number, "not a JSON object".into()));
        };
        let next = if fields.contains_key("seq") {
            Part::Rows
        } else if fields.contains_key("witness") || fields.contains_key("held") {
            Part::Checkpoints
        } else if fields.contains_key("signed_head") {
            Part::End
        } else {
            return Err(malformed(number, "neither a row, a checkpoint nor the signed head".into()));
        };
        if next < part || part == Part::End {
            return Err(malformed(
                number,
                "out of place: an export is its header, its checkpoints, its rows, then its signed head"
                    .into(),
            ));
        }
        if header.version == 1 && next != Part::Rows {
            return Err(malformed(number, "a version 1 export holds only rows".into()));
        }
        part = next;
        match next {
            Part::Rows => match serde_json::from_value::<RowLine>(value) {
                Ok(row) => {
                    let body = match canonical_json(&row.body) {
                        Ok(body) => body,
                        Err(why) => {
                            verifier
                                .push_pending(refused_row(format!("its body has no canonical form: {why}")));
                            continue;
                        }
                    };
                    verifier.push(Row {
                        seq: row.seq,
                        at: row.at,
                        kind: row.kind,
                        body: String::from_utf8_lossy(&body).into_owned(),
                        prev: row.prev,
                        hash: row.hash,
                    });
                }
                Err(error) => verifier.push_pending(refused_row(format!("not a row of six fields: {error}"))),
            },
            Part::Checkpoints => {
                if fields.contains_key("held") {
                    let held: HeldLine =
                        serde_json::from_value(value).map_err(|e| malformed(number, e.to_string()))?;
                    verifier.held(&held.held.into());
                } else {
                    let line: WitnessLine =
                        serde_json::from_value(value).map_err(|e| malformed(number, e.to_string()))?;
                    verifier.witness(&line.witness, Ok(Some(line.checkpoint.into())));
                }
            }
            Part::End => {
                let head: HeadLine =
                    serde_json::from_value(value).map_err(|e| malformed(number, e.to_string()))?;
                verifier.signed_head(&head.signed_head.into());
            }
        }
    }
    Ok(verifier.finish())
}

/// A row line that could not be read as one.
fn refused_row(why: String) -> Pending {
    let row = Row {
        seq: 0,
        at: 0,
        kind: String::new(),
        body: String::new(),
        prev: String::new(),
        hash: String::new(),
    };
    Pending { row, refused: Some(why) }
}
