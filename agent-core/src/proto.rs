//! Formats that several parts of the agent share and that travel between agents or sit in its
//! files: canonical JSON, the bytes every signature and the ledger's hash chain are taken over,
//! the ledger's row format and hash (`docs/ledger.md`), and the blob reference (defined with the API's
//! types in `hearth_api::blob`) a negotiation names, a tag keeps and a transfer fetches. A leaf:
//! it imports nothing of the crate, so the network's documents and the blob store can both use
//! it without one importing the other.

use std::collections::BTreeMap;

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use hearth_api::blob::{BlobHash, BlobRef, Format};
use hearth_api::ids::Minted;

/// The hash as bao-tree's type.
pub fn to_blake3(hash: BlobHash) -> bao_tree::blake3::Hash {
    bao_tree::blake3::Hash::from_bytes(hash.0)
}

/// A hash bao-tree computed, as a blob's address.
pub fn blob_hash(hash: bao_tree::blake3::Hash) -> BlobHash {
    BlobHash(*hash.as_bytes())
}

/// Why a value has no canonical form here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotCanonical(pub String);

/// RFC 8785 canonical JSON for the values Hearth signs and chains: no whitespace, object keys sorted by code
/// point (all keys here are ASCII, where that equals JCS's UTF-16 order), strings escaped as JCS
/// does (serde_json's escaping is the same), and only integers: a float is refused, since JCS's
/// number form for them is not worth the risk.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, NotCanonical> {
    fn write(value: &Value, out: &mut Vec<u8>) -> Result<(), NotCanonical> {
        match value {
            Value::Object(map) => {
                let sorted: BTreeMap<&String, &Value> = map.iter().collect();
                out.push(b'{');
                for (i, (key, value)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(key).map_err(|e| NotCanonical(e.to_string()))?);
                    out.push(b':');
                    write(value, out)?;
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out)?;
                }
                out.push(b']');
            }
            Value::Number(number) if number.is_f64() => {
                return Err(NotCanonical(format!("{number} is not an integer")));
            }
            other => out.extend(serde_json::to_vec(other).map_err(|e| NotCanonical(e.to_string()))?),
        }
        Ok(())
    }
    let mut out = Vec::new();
    write(value, &mut out)?;
    Ok(out)
}

/// Parses JSON as a verifier must read what it did not write: like `serde_json::from_str`, except
/// that an object naming a key twice is refused. serde_json keeps the last of them, another reader
/// may keep the first, and a signature or hash over the canonical form covers only one: two
/// readers of one "intact" file would see different values.
pub fn strict_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Strict>(text).map(|strict| strict.0)
}

/// A JSON value whose objects repeat no key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(item)) = items.next_element()? {
            out.push(item);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = entries.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            let Strict(value) = entries.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// The `prev` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A signed job request, sent (consumer) or queued (provider).
    Request,
    /// Signed terms offered (provider) or received (consumer).
    Offer,
    /// Terms both sides signed.
    Agreement,
    /// Files of an agreement that arrived whole: the job's inputs (provider) or outputs (consumer).
    Transfer,
    /// A provider's signed notice of the job's state: running, paused, stopped by the owner, ended.
    Notice,
    /// The agreement ended and its resources were given back.
    Release,
    /// A receipt the provider signed and the consumer countersigned.
    Receipt,
    /// Resources held for a request package: the consumer's signed ask, the provider's signed
    /// grant, the consumer's signed release, or the provider's note that it lapsed.
    Reservation,
}

impl Kind {
    /// Every kind, in the order above.
    pub const ALL: [Self; 8] = [
        Self::Request,
        Self::Offer,
        Self::Agreement,
        Self::Transfer,
        Self::Notice,
        Self::Release,
        Self::Receipt,
        Self::Reservation,
    ];

    /// The kind's word, as stored.
    pub fn name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Offer => "offer",
            Self::Agreement => "agreement",
            Self::Transfer => "transfer",
            Self::Notice => "notice",
            Self::Release => "release",
            Self::Receipt => "receipt",
            Self::Reservation => "reservation",
        }
    }

    /// The kind a stored word names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// One row of the chain, as stored and exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    /// Unix seconds when it was appended.
    pub at: i64,
    /// What it records ([`Kind::name`]).
    pub kind: String,
    /// The record itself, canonical JSON text.
    pub body: String,
    /// `hash` of the row before (hex).
    pub prev: String,
    /// SHA-256 of `prev` and the entry (hex).
    pub hash: String,
}

/// The canonical bytes of a row's entry: `{"at":…,"body":…,"kind":…,"seq":…}`.
pub fn entry_bytes(seq: u64, at: i64, kind: &str, body: &Value) -> Result<Vec<u8>, NotCanonical> {
    canonical_json(&serde_json::json!({ "seq": seq, "at": at, "kind": kind, "body": body }))
}

/// [`entry_bytes`] for a body already in canonical form (`body` is its canonical JSON text), as
/// the appending side has it: no parse, the same bytes.
pub fn entry_bytes_of_canonical(seq: u64, at: i64, kind: Kind, body: &str) -> Vec<u8> {
    format!(r#"{{"at":{at},"body":{body},"kind":"{}","seq":{seq}}}"#, kind.name()).into_bytes()
}

/// The hash of a row whose predecessor's hash is `prev`.
pub fn row_hash(prev: &[u8; 32], entry: &[u8]) -> [u8; 32] {
    let mut message = Vec::with_capacity(32 + entry.len());
    message.extend_from_slice(prev);
    message.extend_from_slice(entry);
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, &message).as_ref());
    out
}

/// A new id of the type `I`: [`Minted::BYTES`] random bytes as lowercase hex. Every job,
/// request and agreement id the agent makes comes from here.
pub fn new_id<I: Minted>() -> I {
    I::from(random_id(I::BYTES))
}

/// A fresh id of `bytes` random bytes, as lowercase hex, under [`new_id`] (jobs, requests,
/// agreements) and for what has no id type: a transfer (6 bytes, short enough to type), a
/// reservation (16), a staging folder (6). An id only has to be unique, so a system without randomness (never seen on Linux) falls back to the
/// clock; a secret must use [`random_secret`] instead.
pub fn random_id(bytes: usize) -> String {
    random_secret(bytes).unwrap_or_else(|| {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let clock = nanos.to_le_bytes();
        hex::encode((0..bytes).map(|i| clock[i % clock.len()]).collect::<Vec<u8>>())
    })
}

/// `bytes` random bytes from the system, as lowercase hex, for a secret; `None` where the system
/// has no randomness, since a guessable secret is worse than none.
pub fn random_secret(bytes: usize) -> Option<String> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut buffer = vec![0u8; bytes];
    SystemRandom::new().fill(&mut buffer).ok()?;
    Some(hex::encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json_refuses_a_key_named_twice_at_any_depth() {
        let once = r#"{"a":[{"x":1,"y":"finished"}],"b":null,"c":-3,"d":1.5}"#;
        assert_eq!(strict_json(once).unwrap(), serde_json::from_str::<Value>(once).unwrap());
        for twice in [
            r#"{"outcome":"failed","outcome":"finished"}"#,
            r#"{"a":{"b":{"c":1,"c":1}}}"#,
            r#"[{"k":1},{"k":2,"k":3}]"#,
        ] {
            assert!(serde_json::from_str::<Value>(twice).is_ok(), "serde_json alone takes {twice}");
            let error = strict_json(twice).unwrap_err().to_string();
            assert!(error.contains("appears twice"), "{error}");
        }
        assert!(strict_json("{\"a\":1} x").is_err(), "trailing bytes");
    }

    #[test]
    fn ids_and_secrets_are_fresh_hex_of_the_asked_length() {
        for bytes in [6, 8, 16, 32] {
            let (a, b) = (random_id(bytes), random_id(bytes));
            assert_eq!(a.len(), bytes * 2);
            assert!(a.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{a}");
            assert_ne!(a, b);
        }
        let secret = random_secret(32).unwrap();
        assert_eq!(secret.len(), 64);
        assert_ne!(Some(secret), random_secret(32));
    }
}
