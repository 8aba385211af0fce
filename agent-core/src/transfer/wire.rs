//! The blob protocol's messages, as docs/protocol.md describes them byte for byte.
//!
//! One stream carries one request and its answer. The fetcher writes a request: a 4-byte
//! big-endian length and that many bytes of canonical JSON `{"hash":HEX,"ranges":[[START,END],…]}`
//! (ranges of 1 KiB BLAKE3 chunks, END exclusive, `null` for "to the end"). The sender answers one
//! status byte; `OK` is followed by the blob's size (8 bytes, little endian) and bao-tree's
//! encoding of the requested ranges (16 KiB chunk groups, hash pairs in pre-order before the
//! data they cover), and any other status by a 2-byte big-endian length and a UTF-8 reason.

use bao_tree::{ChunkNum, ChunkRanges};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::store::BlobHash;

/// The stream protocol.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/blob/1.0.0");

/// The largest request accepted.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// The most ranges one request may name.
const MAX_RANGES: usize = 4096;

/// The longest reason accepted in an answer.
const MAX_REASON_BYTES: u16 = 1024;

/// The sender's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The blob follows.
    Ok = 0,
    /// This agent has no such blob for the asker (not here, or not granted: the same answer, so a
    /// peer cannot probe what is stored).
    NotFound = 1,
    /// Too many transfers at once; ask again later.
    Busy = 2,
    /// The request could not be read.
    BadRequest = 3,
}

impl Status {
    fn from_byte(byte: u8) -> Option<Self> {
        [Self::Ok, Self::NotFound, Self::Busy, Self::BadRequest].into_iter().find(|s| *s as u8 == byte)
    }
}

/// A request: which blob, and which of its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The blob.
    pub hash: BlobHash,
    /// The chunks wanted.
    pub ranges: ChunkRanges,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestJson {
    hash: BlobHash,
    ranges: Vec<(u64, Option<u64>)>,
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended early.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl Request {
    /// The canonical JSON (fields in alphabetical order, no whitespace).
    pub fn encode(&self) -> Vec<u8> {
        let boundaries = self.ranges.boundaries();
        let ranges = boundaries.chunks(2).map(|pair| (pair[0].0, pair.get(1).map(|end| end.0))).collect();
        serde_json::to_vec(&RequestJson { hash: self.hash, ranges }).unwrap_or_default()
    }

    /// Parses a request, refusing unsorted, overlapping or empty ranges.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let bad = |why: String| WireError::Malformed(why);
        let json: RequestJson = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if json.ranges.len() > MAX_RANGES {
            return Err(bad(format!("more than {MAX_RANGES} ranges")));
        }
        let mut ranges = ChunkRanges::empty();
        let mut previous_end = None::<u64>;
        for (i, (start, end)) in json.ranges.iter().enumerate() {
            if previous_end.is_some_and(|p| *start <= p) && i > 0 {
                return Err(bad(format!("range {i} is not after the one before it")));
            }
            match end {
                Some(end) if end <= start => return Err(bad(format!("range {i} is empty"))),
                Some(end) => ranges |= ChunkRanges::from(ChunkNum(*start)..ChunkNum(*end)),
                None if i + 1 != json.ranges.len() => {
                    return Err(bad(format!("range {i} is open but not last")));
                }
                None => ranges |= ChunkRanges::from(ChunkNum(*start)..),
            }
            previous_end = *end;
        }
        if ranges.is_empty() {
            return Err(bad("no ranges".into()));
        }
        Ok(Self { hash: json.hash, ranges })
    }

    /// Writes the request.
    pub async fn write(&self, stream: &mut (impl AsyncWrite + Unpin)) -> Result<(), WireError> {
        let body = self.encode();
        stream.write_all(&(body.len() as u32).to_be_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        Ok(())
    }

    /// Reads a request.
    pub async fn read(stream: &mut (impl AsyncRead + Unpin)) -> Result<Self, WireError> {
        let len = stream.read_u32().await?;
        if len > MAX_REQUEST_BYTES {
            return Err(WireError::Malformed(format!(
                "request of {len} bytes, more than {MAX_REQUEST_BYTES}"
            )));
        }
        let mut body = vec![0; len as usize];
        stream.read_exact(&mut body).await?;
        Self::decode(&body)
    }
}

/// The sender's answer before the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The blob has this many bytes; its encoding follows.
    Ok {
        /// The blob's size.
        size: u64,
    },
    /// Refused, with a reason for people.
    Refused {
        /// Why.
        status: Status,
        /// The sender's words.
        reason: String,
    },
}

impl Answer {
    /// Writes the answer.
    pub async fn write(&self, stream: &mut (impl AsyncWrite + Unpin)) -> Result<(), WireError> {
        match self {
            Self::Ok { size } => {
                stream.write_u8(Status::Ok as u8).await?;
                stream.write_all(&size.to_le_bytes()).await?;
            }
            Self::Refused { status, reason } => {
                let mut reason = reason.as_bytes();
                reason = &reason[..reason.len().min(MAX_REASON_BYTES as usize)];
                stream.write_u8(*status as u8).await?;
                stream.write_u16(reason.len() as u16).await?;
                stream.write_all(reason).await?;
            }
        }
        stream.flush().await?;
        Ok(())
    }

    /// Reads the answer.
    pub async fn read(stream: &mut (impl AsyncRead + Unpin)) -> Result<Self, WireError> {
        let byte = stream.read_u8().await?;
        let status = Status::from_byte(byte).ok_or_else(|| WireError::Malformed(format!("status {byte}")))?;
        if status == Status::Ok {
            let mut size = [0; 8];
            stream.read_exact(&mut size).await?;
            return Ok(Self::Ok { size: u64::from_le_bytes(size) });
        }
        let len = stream.read_u16().await?;
        if len > MAX_REASON_BYTES {
            return Err(WireError::Malformed(format!("a reason of {len} bytes")));
        }
        let mut reason = vec![0; len as usize];
        stream.read_exact(&mut reason).await?;
        Ok(Self::Refused { status, reason: String::from_utf8_lossy(&reason).into_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_round_trips_in_canonical_form() {
        let request = Request {
            hash: BlobHash([7; 32]),
            ranges: ChunkRanges::from(ChunkNum(0)..ChunkNum(16)) | ChunkRanges::from(ChunkNum(48)..),
        };
        let text = String::from_utf8(request.encode()).unwrap();
        assert_eq!(text, format!(r#"{{"hash":"{}","ranges":[[0,16],[48,null]]}}"#, "07".repeat(32)));
        let mut bytes = Vec::new();
        request.write(&mut bytes).await.unwrap();
        assert_eq!(&bytes[..4], &(text.len() as u32).to_be_bytes());
        assert_eq!(Request::read(&mut bytes.as_slice()).await.unwrap(), request);
    }

    #[test]
    fn bad_requests_are_refused() {
        let hash = "07".repeat(32);
        for body in [
            format!(r#"{{"hash":"{hash}","ranges":[]}}"#),
            format!(r#"{{"hash":"{hash}","ranges":[[5,5]]}}"#),
            format!(r#"{{"hash":"{hash}","ranges":[[0,null],[5,9]]}}"#),
            format!(r#"{{"hash":"{hash}","ranges":[[8,9],[0,4]]}}"#),
            format!(r#"{{"hash":"{hash}","ranges":[[0,1]],"more":1}}"#),
            r#"{"hash":"xyz","ranges":[[0,1]]}"#.to_owned(),
        ] {
            assert!(Request::decode(body.as_bytes()).is_err(), "{body} accepted");
        }
    }

    #[tokio::test]
    async fn answers_round_trip() {
        for answer in
            [Answer::Ok { size: 1 << 40 }, Answer::Refused { status: Status::Busy, reason: "later".into() }]
        {
            let mut bytes = Vec::new();
            answer.write(&mut bytes).await.unwrap();
            assert_eq!(Answer::read(&mut bytes.as_slice()).await.unwrap(), answer);
        }
    }
}
