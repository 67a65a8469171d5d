//! The trust layer: the E2E crypto's properties, attestation vectors, services and CLI.
//!
//! One test binary per area, so that a test run links few binaries; each
//! file below is one former test target.

mod attest_cli;
mod attest_services;
mod attest_vectors;
mod proto_props;
