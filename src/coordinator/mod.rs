//! The coordinator: HTTP API (axum routers), node registry, router, stream
//! relay and billing.
//!
//! Owns: the client and node APIs of PROTOCOL.md §5–§6. Never reads a sealed
//! prompt or a sealed reply: `enc` goes to the node unchanged and sealed
//! results and chunks come back verified against the node's key, unopened.
//!
//! This build keeps its state in memory and runs in development mode only;
//! billing and persistence are still to come.

pub mod attestation;
pub mod billing;
pub mod client_api;
pub mod error;
pub mod market;
pub mod node_api;
mod plain;
pub mod pricing;
pub mod state;
pub mod ws;

use std::future::Future;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use state::{Config, Grid};

use crate::proto::routes;

/// The whole HTTP surface.
pub fn router(grid: Grid) -> Router {
    let router = Router::new()
        .route(routes::RESERVE, post(client_api::reserve))
        .route(routes::CHAT_COMPLETIONS, post(client_api::chat))
        .route(routes::MODELS, get(client_api::models))
        .route(routes::CAPACITY, get(client_api::capacity))
        .route(routes::PROVIDERS, get(market::providers))
        .route(routes::GRID_MODELS, get(market::grid_models))
        .route(routes::GRID_PRICING, get(market::grid_pricing))
        .route(
            routes::NODE_PRICES,
            get(market::get_prices).post(market::set_price),
        )
        .route(routes::NODE_EVIDENCE, get(market::evidence))
        .route(routes::JOB_ATTESTATION, get(market::job_attestation))
        .route(routes::ATTESTATION_POLICY, get(market::policy))
        .route(routes::REGISTER, post(node_api::register))
        .route(routes::HEARTBEAT, post(node_api::heartbeat))
        .route(routes::NODE, get(node_api::node_info))
        .route(routes::CHALLENGE, post(node_api::challenge))
        .route(
            routes::VERIFY_ATTESTATION,
            post(node_api::verify_attestation),
        )
        .route(routes::NODE_STATUS, post(node_api::set_status))
        .route(routes::NODE_WS, get(ws::upgrade))
        .route(routes::JOB_COMPLETE, post(node_api::complete))
        .route(routes::JOB_CHUNK, post(node_api::chunk))
        .route(routes::JOB_FAIL, post(node_api::fail))
        .route(routes::ALLOWED_BINARIES, get(node_api::allowed_binaries))
        .route(routes::HEALTH, get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(client_api::MAX_BODY_BYTES));
    let payments = grid.payments.clone();
    let router: Router = router.with_state(grid);
    match payments {
        // API keys and credits, the same routes the compute plane serves.
        Some(p) => router.merge(crate::payments::http::router(p)),
        None => router,
    }
}

/// Serve until `shutdown` resolves. The caller owns the listener, so tests
/// bind 127.0.0.1:0 and pass it in.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve(Grid::new(config), listener, shutdown).await
}

/// Serve a grid (with its store and payments, see [`Grid::with_store`]).
pub async fn serve(
    grid: Grid,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = {
        let grid = grid.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                grid.reap();
            }
        })
    };
    let result = axum::serve(crate::http::no_delay(listener), router(grid))
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    result
}
