//! `sgl`: an open confidential inference grid.
//!
//! The library holds every room of the house; the `sgl` binary (`src/main.rs`,
//! `src/cli/`) is a thin command line over it. See DESIGN.md for the map.
//!
//! - [`proto`]: the SGL wire protocol and its E2E crypto, as a pure library.
//! - [`attest`]: TEE evidence sources and the verifier.
//! - [`catalogue`]: the model catalogue (ids, files, reference prices).
//! - [`engine`]: in-process inference (candle) with continuous batching.
//! - [`node`]: the node agent: identity files, job runner, local server.
//! - [`coordinator`]: registry, router, relay, billing (feature `coordinator`).
//! - [`payments`]: x402, MPP, credits and wallet auth.
//! - [`compute`]: the Machines API and pay-per-request code (feature `compute-plane`).
//! - [`store`]: database access, SQLite and PostgreSQL.
//! - [`money`], [`clock`], [`timefmt`]: integer USD micro-units, the
//!   injectable wall clock and time formats, shared by every room.
//! - [`openapi`]: the OpenAPI 3.1 documents of the coordinator and the
//!   node's local server, from the wire types.
//! - [`private_file`]: owner-only files and directories (keys, databases).
//! - [`cpu`]: where a request's CPU-bound step runs (here, or the blocking pool).
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod attest;
pub mod catalogue;
#[cfg(feature = "node")]
pub mod client;
pub mod clock;
#[cfg(feature = "compute-plane")]
pub mod compute;
#[cfg(feature = "coordinator")]
pub mod coordinator;
pub mod cpu;
#[cfg(feature = "node")]
pub mod engine;
#[cfg(any(feature = "node", feature = "coordinator"))]
pub mod http;
#[cfg(any(feature = "node", feature = "coordinator"))]
pub mod metrics;
pub mod money;
pub mod node;
pub mod openapi;
#[cfg(feature = "payments")]
pub mod payments;
pub mod private_file;
pub mod proto;
#[cfg(feature = "store")]
pub mod store;
pub mod timefmt;
