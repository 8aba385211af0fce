//! Verifying a ledger, whatever it is read from (the store file, a copy, an export): every row's
//! hash, every link, every signature of the documents in it, and the checkpoints other agents hold
//! of it. It names the first bad row. Also the two export formats.
//!
//! Rows are checked in chunks: each chunk's rows are checked on their own on every core (hash and
//! signatures need nothing from the row before), then the links and sequence numbers in order,
//! so the first bad row is the first in the chain, whichever thread found it.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};

use libp2p_identity::{PeerId, PublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use hearth_api::ledger::{Broken, Report, WitnessCheck, Witnessed};

use super::record::{
    CHECKPOINT_TAG, Checkpoint, GENESIS, Kind, RECEIPT_TAG, Row, VERSION, entry_bytes_of_canonical, row_hash,
};
use crate::identity::{self, DomainTag};
use crate::net::advert::{canonical_json, public_key};
use crate::net::negotiate::{
    AGREEMENT_TAG, NOTICE_TAG, RELEASE_TAG, REQUEST_TAG, RESERVATION_TAG, RESERVE_TAG, Signed,
};

/// Rows checked together; big enough to keep every core busy, small enough to hold.
const CHUNK: usize = 8192;

/// The first line of a JSON Lines export.
pub const EXPORT_FORMAT: &str = "hearth-ledger";

/// Checks rows in chain order. Feed it every row with [`Verifier::push`], then [`Verifier::finish`].
pub struct Verifier {
    owner: String,
    owner_id: Option<PeerId>,
    chunk: Vec<Row>,
    next_seq: u64,
    prev: String,
    rows: u64,
    receipts: u64,
    broken: Option<Broken>,
    /// Checkpoints to hold the chain against, by row, each with its witness.
    checkpoints: Vec<(String, Checkpoint)>,
    witnesses: Vec<WitnessCheck>,
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
        }
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
        self.chunk.push(row);
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
        Report {
            owner: self.owner.into(),
            rows: self.rows,
            receipts: self.receipts,
            head: (self.rows > 0).then_some(self.prev),
            broken: self.broken,
            witnesses: self.witnesses,
        }
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
        let problems: Vec<Option<String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = chunk
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        let mut keys = Keys::default();
                        part.iter().map(|row| check_row(row, own, &mut keys).err()).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap_or_else(|_| vec![Some("the check panicked".into())]))
                .collect()
        });
        // Then the links, in order.
        let mut forks = Vec::new();
        for (row, problem) in chunk.into_iter().zip(problems) {
            let expected = self.next_seq;
            if row.seq != expected {
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

/// Everything about one row that needs no other row: its hash, its form, the signatures in it,
/// and that the ledger's owner is a party to it.
fn check_row(row: &Row, owner: &str, keys: &mut Keys) -> Result<(), String> {
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
            party(document, &["consumer", "provider"])
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
            party(document, &["consumer", "provider"])
        }
        Kind::Reservation => {
            let event = body.get("event").and_then(Value::as_str).unwrap_or_default();
            let (tag, signer) = match event {
                "reserve" => (RESERVE_TAG, "consumer"),
                "granted" => (RESERVATION_TAG, "provider"),
                "released" => (RELEASE_TAG, "consumer"),
                "lapsed" => {
                    return match body.get("reservation_id").and_then(Value::as_str) {
                        Some(_) => Ok(()),
                        None => Err("a lapsed reservation naming no reservation".into()),
                    };
                }
                other => return Err(format!("a reservation event {other:?} of no known kind")),
            };
            let signed = field("document").ok_or("a reservation record with no document")?;
            let document = signed.get("body").ok_or("no signed body")?;
            let message = canonical_json(document).map_err(|e| e.to_string())?;
            keys.verify(tag, &message, signed.get("signature"), document.get(signer))?;
            party(document, &["consumer", "provider"])
        }
        Kind::Transfer | Kind::Release => {
            if body.get("agreement_id").and_then(Value::as_str).is_none() {
                return Err(format!("a {} naming no agreement", kind.name()));
            }
            Ok(())
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
pub struct ExportHeader {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u64,
    /// Whose ledger.
    pub owner: String,
}

/// Writes the header of an export.
pub fn write_header(out: &mut impl Write, format: ExportFormat, owner: &str) -> io::Result<()> {
    match format {
        ExportFormat::Jsonl => {
            let header = ExportHeader { format: EXPORT_FORMAT.into(), version: VERSION, owner: owner.into() };
            serde_json::to_writer(&mut *out, &header)?;
            out.write_all(b"\n")
        }
        ExportFormat::Csv => out.write_all(b"seq,at,kind,prev,hash,body\n"),
    }
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

/// Why an export could not be read.
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

/// Verifies a JSON Lines export from its text alone.
pub fn verify_export(
    input: impl BufRead,
    witnesses: Vec<(String, Result<Option<Signed>, String>)>,
) -> Result<Report, ExportError> {
    let mut lines = input.lines();
    let malformed = |line: usize, problem: String| ExportError::Malformed { line, problem };
    let header = lines.next().ok_or_else(|| malformed(1, "the file is empty".into()))??;
    let header: ExportHeader = serde_json::from_str(&header)
        .map_err(|e| malformed(1, format!("not a ledger export header: {e}")))?;
    if header.format != EXPORT_FORMAT || header.version != VERSION {
        return Err(malformed(
            1,
            format!("format {} version {} is not one this agent reads", header.format, header.version),
        ));
    }
    let mut verifier = Verifier::new(&header.owner);
    for (peer, answer) in witnesses {
        verifier.witness(&peer, answer);
    }
    #[derive(Deserialize)]
    struct Line {
        seq: u64,
        at: i64,
        kind: String,
        body: Value,
        prev: String,
        hash: String,
    }
    for (index, line) in lines.enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| malformed(index + 2, e.to_string()))?;
        let body = canonical_json(&parsed.body).map_err(|e| malformed(index + 2, e.to_string()))?;
        verifier.push(Row {
            seq: parsed.seq,
            at: parsed.at,
            kind: parsed.kind,
            body: String::from_utf8_lossy(&body).into_owned(),
            prev: parsed.prev,
            hash: parsed.hash,
        });
    }
    Ok(verifier.finish())
}
