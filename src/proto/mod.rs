//! The SGL wire protocol as a pure library (PROTOCOL.md): identity and keys,
//! the E2E v2 crypto, result and usage signatures, the serde types of every
//! JSON body, the limits and defaults of a chat request and the one check of
//! it, and every route path and header name.
//!
//! This room is the single source of truth for bytes on the wire: no I/O, no
//! tokio, no clock, no randomness except an RNG passed in (each random entry
//! point has a `_with_rng` twin). Every decoder is total: it checks size caps
//! first, returns a typed [`ProtoError`], and never panics on peer input.

pub mod api;
pub mod b58;
pub mod e2e;
pub mod envelope;
mod error;
pub mod features;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod headers;
pub mod identity;
pub mod job;
pub mod limits;
pub mod openai;
pub mod routes;

pub use error::ProtoError;
