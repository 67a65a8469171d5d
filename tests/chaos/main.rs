//! Chaos: real coordinator and node processes killed, starved and fed
//! faults, with the money checked to the micro-dollar afterwards.
//!
//! One test binary for the chaos suite; each file below is one area.
#[path = "../support/grid/mod.rs"]
mod grid_support;
#[path = "../support/pay/mod.rs"]
mod pay_common;

mod coordinator_kill;
mod disk_full;
mod ledger;
