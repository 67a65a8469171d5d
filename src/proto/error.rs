//! The one error type of the protocol room. Each variant names what the peer
//! sent wrong; none carries secret material.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("{what}: not valid base58")]
    Base58 { what: &'static str },
    #[error("{what}: not valid canonical padded base64")]
    Base64 { what: &'static str },
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: at least {min} bytes needed, got {got}")]
    TooShort {
        what: &'static str,
        min: usize,
        got: usize,
    },
    #[error("{what}: {got} exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        max: usize,
        got: usize,
    },
    #[error("unsupported algorithm tag {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("missing algorithm tag")]
    MissingAlgorithm,
    #[error("unsupported encoding {0:?}")]
    UnsupportedEncoding(String),
    #[error("low-order X25519 point (non-contributory key agreement)")]
    LowOrderPoint,
    /// The AEAD tag did not verify. Deliberately opaque.
    #[error("decryption failed")]
    Decrypt,
    #[error("node_id is not a canonical dashed UUID")]
    InvalidNodeId,
    #[error("signature does not verify")]
    BadSignature,
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("unsupported envelope version {0:?}")]
    UnsupportedVersion(String),
    #[error("stream chunk out of order: expected seq {expected}, got {got}")]
    StreamOutOfOrder { expected: u64, got: u64 },
    #[error("stream chunk after the final chunk")]
    StreamAfterFinal,
    #[error("stream ended without a final chunk")]
    StreamTruncated,
    #[error("stream sequence number overflow")]
    StreamExhausted,
    #[error("stream chunk is not valid UTF-8")]
    StreamNotUtf8,
    #[error("usage total_tokens does not equal prompt + completion")]
    UsageInconsistent,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("decrypted payload is not a JSON object")]
    NotJsonObject,
    #[error("invalid keypair file: {0}")]
    Keypair(&'static str),
    #[error("request nonce must be 1 to {max} base58 characters")]
    BadRequestNonce { max: usize },
    /// A state the code rules out; kept as an error rather than a panic.
    #[error("internal error: {0}")]
    Unreachable(&'static str),
}
