//! Faults and abuse on real processes, bounded to a few minutes: a node
//! SIGKILLed mid-stream, a reservation flood, oversize prompts, idle sockets
//! under a small file limit, abandoned streams and WebSockets, forged
//! heartbeats. Each file below is one fault.
#[path = "../support/grid/mod.rs"]
mod grid_support;

mod chaos_abandon;
mod chaos_forged_heartbeat;
mod chaos_grid;
mod chaos_node_kill;
mod chaos_oversize;
mod chaos_reserve_flood;
mod chaos_sockets;
