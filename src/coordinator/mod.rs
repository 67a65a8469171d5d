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
pub mod client_addr;
pub mod client_api;
pub mod error;
pub mod explorer;
pub mod job;
pub mod market;
pub mod metrics;
pub mod node_api;
mod plain;
pub mod pricing;
mod relay;
pub mod replica;
pub mod results;
pub mod router;
pub mod state;
pub mod ws;

use std::future::Future;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

pub use state::{Config, Grid};

use crate::proto::routes;

/// The whole HTTP surface: the client API and the node API, each with its
/// error shape (PROTOCOL.md §1.5), the grid explorer, the OpenAPI document,
/// and `not_supported` for any other route.
pub fn router(grid: Grid) -> Router {
    let payments = grid.payments.clone();
    let client: Router = client_routes()
        .layer(DefaultBodyLimit::max(client_api::MAX_BODY_BYTES))
        .with_state(grid.clone())
        // The explorer page at `/` and what it reads (an extension).
        .merge(explorer::routes(grid.clone()));
    let client = match payments {
        // API keys and credits, the same routes the compute plane serves.
        Some(p) => client.merge(crate::payments::http::router(p)),
        None => client,
    };
    let client = client.layer(middleware::from_fn(declared_size));
    let node: Router = node_routes()
        // Replica mode: a call for a node or job held by another replica
        // goes there (a no-op otherwise).
        .layer(middleware::from_fn_with_state(
            grid.clone(),
            replica::route_node_call,
        ))
        .layer(DefaultBodyLimit::max(client_api::MAX_BODY_BYTES))
        .layer(middleware::from_fn(declared_size))
        .with_state(grid);
    client
        .layer(middleware::map_response(error::client_edge))
        .merge(node.layer(middleware::map_response(error::node_edge)))
        .fallback(error::not_supported)
}

/// Sizes before work (§7f): a body that declares a length over the limit is
/// refused (413, shaped by the API's edge) before a byte of it is read.
async fn declared_size(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > client_api::MAX_BODY_BYTES as u64) {
        use axum::response::IntoResponse;
        return axum::http::StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    next.run(req).await
}

/// The client API (§5, §7b).
fn client_routes() -> Router<Grid> {
    Router::new()
        .route(routes::RESERVE, post(client_api::reserve))
        .route(routes::CHAT_COMPLETIONS, post(client_api::chat))
        .route(routes::MODELS, get(client_api::models))
        .route(routes::CAPACITY, get(client_api::capacity))
        .route(routes::PROVIDERS, get(market::providers::providers))
        .route(routes::GRID_MODELS, get(market::providers::grid_models))
        .route(routes::GRID_PRICING, get(market::providers::grid_pricing))
        .route(
            routes::NODE_PRICES,
            get(market::prices::get_prices).post(market::prices::set_price),
        )
        .route(routes::NODE_EARNINGS, get(market::earnings::earnings))
        .route(routes::NODE_EVIDENCE, get(market::evidence::evidence))
        .route(
            routes::JOB_ATTESTATION,
            get(market::evidence::job_attestation),
        )
        .route(routes::ATTESTATION_POLICY, get(market::policy::policy))
        .route(routes::HEALTH, get(|| async { "ok" }))
        .route(routes::METRICS, get(metrics::scrape))
        .merge(crate::openapi::router(crate::openapi::coordinator()))
}

/// The node API (§6).
fn node_routes() -> Router<Grid> {
    Router::new()
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
    serve_with(grid, Router::new(), listener, shutdown).await
}

/// Serve a grid with `extra` routes beside its own (the compute plane's
/// Machines API, on the same store and payments).
pub async fn serve_with(
    grid: Grid,
    extra: Router,
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
    // Credit hold leases: renewed three times per lease for the jobs that
    // run here; lapsed ones (a crashed replica's) released.
    let holds = grid.payments.as_ref().map(|p| {
        let every = (p.store().hold_lease() / 3).max(Duration::from_millis(200));
        let grid = grid.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                grid.renew_and_reap_holds().await;
            }
        })
    });
    let replica_tasks = grid
        .replica
        .as_ref()
        .map(|r| r.start(&grid, router(grid.clone())))
        .unwrap_or_default();
    let limits = grid.config.server_limits;
    // Counted over every route, the extra ones too; after routing, so that
    // the route template is known.
    let app = extra
        .merge(router(grid.clone()))
        .layer(middleware::from_fn_with_state(
            grid.metrics.clone(),
            metrics::track,
        ))
        .layer(middleware::from_fn_with_state(grid.clone(), replica::gate));
    let result = crate::http::serve(listener, app, limits, shutdown).await;
    for t in replica_tasks {
        t.abort();
    }
    if let Some(r) = &grid.replica {
        r.leave().await;
    }
    reaper.abort();
    if let Some(h) = holds {
        h.abort();
    }
    grid.flush_nodes(Duration::from_secs(5)).await;
    result
}

#[cfg(test)]
mod tests {
    //! The router driven without a socket (`tower::ServiceExt::oneshot`).

    use std::time::Instant;

    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::error::body_json;
    use super::job::{Job, JobEvent, Stage};
    use super::*;
    use crate::proto::api::ChunkRequest;
    use crate::proto::e2e::Algorithm;
    use crate::proto::envelope::{self, ResultKind, ENVELOPE_VERSION};
    use crate::proto::identity::{NodeId, NodeIdentity};

    fn dev_grid() -> Grid {
        Grid::new(Config {
            dev: true,
            ..Config::default()
        })
    }

    async fn send(grid: &Grid, req: Request<Body>) -> (StatusCode, Value) {
        let resp = router(grid.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        assert_eq!(
            ct.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "status {status}"
        );
        (status, body_json(resp).await)
    }

    fn post(path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
        let mut req = Request::post(path);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req.body(body.into()).unwrap()
    }

    /// `{"error": "<message>", "code": "<code>"}`: the node shape.
    fn node_code(body: &Value) -> &str {
        assert!(body["error"].is_string(), "{body}");
        body["code"].as_str().unwrap()
    }

    /// `{"error": {"message", "type", "code"}}`: the client shape.
    fn client_code(body: &Value) -> &str {
        assert!(body["error"]["message"].is_string(), "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
        body["error"]["code"].as_str().unwrap()
    }

    #[tokio::test]
    async fn a_malformed_node_body_is_a_node_error() {
        let grid = dev_grid();
        let json = Some("application/json");
        let (status, body) = send(&grid, post("/grid/nodes/register", json, "{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(node_code(&body), "invalid_request");
        let (status, body) = send(
            &grid,
            post("/grid/jobs/j/chunk", json, r#"{"seq": "zero"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(node_code(&body), "invalid_request");
        let (status, body) = send(&grid, post("/grid/nodes/heartbeat", None, "{}")).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(node_code(&body), "unsupported_media_type");
    }

    #[tokio::test]
    async fn an_oversize_body_is_json_413_on_both_apis() {
        let grid = dev_grid();
        let big = vec![b' '; client_api::MAX_BODY_BYTES + 1];
        let json = Some("application/json");
        let (status, body) = send(&grid, post("/grid/jobs/j/chunk", json, big.clone())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(node_code(&body), "request_too_large");
        let (status, body) = send(&grid, post("/v1/chat/completions", json, big.clone())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(client_code(&body), "request_too_large");
        let (status, body) = send(&grid, post("/v1/reserve", json, big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(client_code(&body), "request_too_large");
    }

    #[tokio::test]
    async fn a_declared_oversize_body_is_refused_unread() {
        let grid = dev_grid();
        for path in [
            "/v1/chat/completions",
            "/v1/reserve",
            "/grid/nodes/heartbeat",
        ] {
            // The body never comes: the declared length alone is refused.
            let (tx, rx) =
                tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
            let body = Body::from_stream(tokio_stream_of(rx));
            let req = Request::post(path)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, (5u64 << 20).to_string())
                .body(body)
                .unwrap();
            let (status, body) = send(&grid, req).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
            let code = body["error"]["code"]
                .as_str()
                .or(body["code"].as_str())
                .unwrap();
            assert_eq!(code, "request_too_large", "{path}");
            drop(tx);
        }
    }

    /// A body stream fed by a channel (one that never sends stays pending).
    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn an_unknown_route_is_not_supported() {
        let grid = dev_grid();
        for path in ["/v1/embeddings", "/grid/jobs", "/nothing/here"] {
            let (status, body) = send(&grid, post(path, Some("application/json"), "{}")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(client_code(&body), "not_supported");
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
        let get = Request::get("/v1/audio/transcriptions")
            .body(Body::empty())
            .unwrap();
        let (status, body) = send(&grid, get).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(client_code(&body), "not_supported");
    }

    #[tokio::test]
    async fn a_wrong_method_is_json_in_its_api_shape() {
        let grid = dev_grid();
        let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
        let (status, body) = send(&grid, get("/v1/chat/completions")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(client_code(&body), "method_not_allowed");
        let (status, body) = send(&grid, get("/grid/jobs/j/chunk")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(node_code(&body), "method_not_allowed");
        // Successes are left as they are.
        let resp = router(grid).oneshot(get("/health")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// A node with a job offered to it, outside any client call.
    fn node_with_job(grid: &Grid) -> (NodeIdentity, String, tokio::sync::mpsc::Receiver<JobEvent>) {
        let id = NodeIdentity::generate();
        let (node_id, token): (NodeId, String) = grid.register(
            id.ed25519_public(),
            "0x1".into(),
            "none".into(),
            vec!["m".into()],
        );
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let job = Job::offered(
            "job-1".into(),
            node_id,
            "m".into(),
            json!({}),
            true,
            Instant::now(),
            tx,
            None,
        );
        grid.lock().insert_job(job);
        (id, token, rx)
    }

    fn signed_chunk(id: &NodeIdentity, seq: u64, is_final: bool, ct: &str) -> ChunkRequest {
        let kind = ResultKind::Stream { seq, is_final };
        ChunkRequest {
            seq: Some(seq),
            is_final: Some(is_final),
            ciphertext: Some(ct.into()),
            algorithm: Some(Algorithm::V2Stream.as_str().into()),
            result_envelope_signature: Some(envelope::sign_result(id, "job-1", kind, ct).to_b58()),
            result_envelope_version: Some(ENVELOPE_VERSION.into()),
            ..Default::default()
        }
    }

    fn node_post(path: &str, token: &str, body: &impl serde::Serialize) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-node-auth", token)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    #[tokio::test]
    async fn chunks_out_of_order_are_refused_and_leave_the_job() {
        let grid = dev_grid();
        let (id, token, mut rx) = node_with_job(&grid);
        let chunk_path = "/grid/jobs/job-1/chunk";

        let (status, body) = send(
            &grid,
            node_post(chunk_path, &token, &signed_chunk(&id, 1, false, "b")),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(node_code(&body), "conflict");
        assert_eq!(body["error"], "chunk seq 1 out of order (expected 0)");
        assert_eq!(
            grid.lock().job("job-1").map(|j| j.stage().clone()),
            Some(Stage::Offered)
        );

        let first = signed_chunk(&id, 0, false, "a");
        let (status, body) = send(&grid, node_post(chunk_path, &token, &first)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"ok": true, "closed": false}));
        assert!(matches!(rx.recv().await, Some(JobEvent::Chunk(c)) if c == first));
        // An identical repeat is answered again and not relayed twice.
        let (status, _) = send(&grid, node_post(chunk_path, &token, &first)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(rx.try_recv().is_err());

        // A whole result for a job that streamed: refused, and the job fails.
        let (status, body) = send(
            &grid,
            node_post(
                "/grid/jobs/job-1/complete",
                &token,
                &json!({"encrypted_result": "{}"}),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(node_code(&body), "conflict");
        assert!(matches!(rx.recv().await, Some(JobEvent::Failed(_))));
        assert!(grid.lock().job("job-1").is_none());
    }
}
