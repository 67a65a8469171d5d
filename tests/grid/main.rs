//! The grid on loopback: coordinator, node agents, billing, prices, x402, the CLI, node kills.
//!
//! One test binary per area, so that a test run links few binaries; each
//! file below is one former test target.
#[path = "../support/engine/mod.rs"]
mod engine_support;
#[path = "../support/grid/mod.rs"]
mod grid_support;
#[path = "../support/pay/mod.rs"]
mod pay_common;

mod coordinator_flow;
mod grid_api;
mod grid_billing;
mod grid_cached_tokens;
mod grid_choices;
mod grid_cli;
mod grid_e2e;
mod grid_edges;
mod grid_explorer;
mod grid_faults;
mod grid_features;
mod grid_json_mode;
mod grid_node_kill;
mod grid_openapi;
mod grid_payouts;
mod grid_prepaid;
mod grid_prices;
mod grid_proxy;
mod grid_restart_state;
mod grid_served_payments;
mod grid_tools;
mod grid_units;
mod grid_x402;
mod node_agent;
mod node_init;
