//! The SGL wire protocol as a pure library (PROTOCOL.md): identity and keys,
//! the E2E v2 crypto, result and usage signatures, and the serde types of every
//! JSON body.
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
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub mod openai;

pub use error::ProtoError;
