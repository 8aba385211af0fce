//! Blob references: the BLAKE3 hash that addresses a file or a folder manifest in an agent's blob
//! store, and what it names. Uploads, results and transfers all name blobs this way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A BLAKE3 hash: the address of a blob. Written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// The hex form.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self.to_hex())
    }
}

impl FromStr for BlobHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a blob hash (64 lower-case hex digits)");
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| bad())?;
        Ok(Self(bytes))
    }
}

impl Serialize for BlobHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a hash names: one file's bytes, or a folder manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The bytes of one file.
    Raw,
    /// A folder manifest (`transfer::Manifest`), whose files are blobs of their own.
    Folder,
}

impl Format {
    /// `raw` or `folder`, as tags and manifests write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Folder => "folder",
        }
    }
}

/// A hash and what it names: what a transfer asks for and a tag keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BlobRef {
    /// The BLAKE3 hash, 64 hex digits.
    #[schema(value_type = String)]
    pub hash: BlobHash,
    /// `raw` or `folder`.
    pub format: Format,
}

impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format {
            Format::Raw => write!(f, "{}", self.hash),
            Format::Folder => write!(f, "folder {}", self.hash),
        }
    }
}
