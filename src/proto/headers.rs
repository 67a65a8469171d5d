//! The header names of the protocol (PROTOCOL.md §1.3, §1.4), written
//! lowercase as the `http` crate stores them; header names are
//! case-insensitive on the wire. Clients send and servers read these.

/// The node's bearer token on every node call after registration (§1.4).
pub const NODE_AUTH: &str = "x-node-auth";
/// The node's id beside the token on the heartbeat (§1.4).
pub const NODE_ID: &str = "x-node-id";
/// A client's API key, the alternative to `Authorization: Bearer` (§1.3).
pub const API_KEY: &str = "x-api-key";
/// Wallet signature headers (§1.3).
pub const AUTH_ADDRESS: &str = "x-auth-address";
pub const AUTH_CHAIN: &str = "x-auth-chain";
pub const AUTH_SIGNATURE: &str = "x-auth-signature";
pub const AUTH_TIMESTAMP: &str = "x-auth-timestamp";
pub const AUTH_NONCE: &str = "x-auth-nonce";
pub const AUTH_SIG_ENCODING: &str = "x-auth-sig-encoding";
