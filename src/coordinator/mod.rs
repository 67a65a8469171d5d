//! The coordinator: HTTP API (axum routers), node registry, router, stream
//! relay and billing.
//!
//! Owns: the client and node APIs of PROTOCOL.md §5–§6. Never reads a sealed
//! prompt or a sealed reply.
