//! The node agent: identity files and config, the job runner (unseal → engine
//! → seal → sign → post), the local OpenAI server and the systemd service.
//!
//! Takes its listener and shutdown from outside; never falls back to plaintext.

#[cfg(feature = "node")]
pub mod agent;
#[cfg(feature = "node")]
pub mod engine_executor;
pub mod executor;
pub mod identity_files;
pub mod jobs;
#[cfg(feature = "node")]
pub mod local_server;
#[cfg(feature = "node")]
pub mod model_cache;
pub mod service;
