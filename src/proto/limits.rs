//! The numbers of the protocol: caps on a chat request and its messages,
//! the defaults a request gets when it names no value, and the node's size
//! and cadence rules (PROTOCOL.md §1.2, §6.5, §6.7, §6.9). Every room reads
//! them from here, so a client-facing server, the coordinator and the node
//! cannot drift apart.

/// At most this many messages in one request (§6.7).
pub const MAX_MESSAGES: usize = 256;
/// At most this many bytes of roles plus contents, summed over the messages (§6.7).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The sampling temperature a request gets when it names none (§6.7).
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// The lowest temperature; a job's is clamped up to it (§6.7).
pub const MIN_TEMPERATURE: f64 = 0.0;
/// The highest temperature; a job's is clamped down to it (§6.7).
pub const MAX_TEMPERATURE: f64 = 2.0;

/// The completion budget a request gets when it names none (§6.7); an
/// engine lowers it further to the room its context leaves.
pub const DEFAULT_MAX_TOKENS: u64 = 2048;
/// The largest completion budget a request may name (§6.7).
pub const MAX_MAX_TOKENS: u64 = 8192;

/// At most this many stop sequences (OpenAI's cap).
pub const MAX_STOP: usize = 4;
/// A stop sequence is at most this many bytes.
pub const MAX_STOP_LEN: usize = 256;

/// The node posts a stream delta about every this many decoded tokens (§6.9).
pub const TOKENS_PER_CHUNK: usize = 6;
/// The node remembers this many job ids to ignore repeated offers (§6.5).
pub const SEEN_JOBS: usize = 1024;
/// The node refuses coordinator answers larger than this (§1.2).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// At most this many completions of one prompt (OpenAI's `n`); they decode
/// side by side, so an engine needs this many batch slots for one request.
pub const MAX_N: u32 = 8;
/// At most this many alternatives per token (OpenAI's cap on `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u8 = 20;
