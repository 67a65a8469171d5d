//! The Machines API: the Vultr and DigitalOcean clients against their
//! loopback stand-ins, the HTTP lifecycle in process on SQLite and
//! PostgreSQL, and the coordinator and `sgl compute` as real processes.
#![cfg(feature = "compute-plane")]

#[path = "../support/compute/mod.rs"]
mod compute_support;
#[path = "../support/grid/mod.rs"]
mod grid_support;
#[path = "../support/pay/mod.rs"]
mod pay_common;

#[cfg(feature = "coordinator")]
mod exec_process;
mod machines_api;
#[cfg(feature = "coordinator")]
mod machines_openapi;
#[cfg(feature = "coordinator")]
mod machines_process;
mod machines_providers;
mod sandbox_basic;
mod sandbox_contain;
mod sandbox_support;
