//! Payments and the store: vectors, HTTP flows, the Python clients, SQLite and PostgreSQL.
//!
//! One test binary per area, so that a test run links few binaries; each
//! file below is one former test target.
#[path = "../support/grid/mod.rs"]
mod grid_support;
#[path = "../support/pay/mod.rs"]
mod pay_common;

mod payments_http;
mod payments_py_clients;
mod payments_vectors;
mod reservations;
mod store;
