//! Chaos: real coordinator and node processes killed, starved, flooded and
//! fed faults, with slots and money checked afterwards to the micro-dollar.
//! Bounded to a few minutes; each file below is one fault or area.
#[path = "../support/grid/mod.rs"]
mod grid_support;
#[path = "../support/pay/mod.rs"]
mod pay_common;

mod chaos_abandon;
mod chaos_forged_heartbeat;
mod chaos_grid;
mod chaos_node_kill;
mod chaos_oversize;
mod chaos_reserve_flood;
mod chaos_sockets;
mod coordinator_kill;
mod disk_full;
mod ledger;
mod refund_fault;
mod replicas;
mod replicas_db_loss;
mod replicas_reserve;
