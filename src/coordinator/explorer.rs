//! The grid explorer: a page at `/` that shows what the grid is doing now,
//! rendered in the browser from the public JSON APIs (`/grid/capacity`,
//! `/v1/models`, `/grid/models`, `/v1/providers`) and from
//! `/grid/explorer.json`, which this module serves: slots and load, every
//! node with its attestation verdict step by step, and traffic and latency
//! over a recent window.
//!
//! The page, its script and its style sheet are files beside this one,
//! compiled into the binary: nothing is fetched from elsewhere at run time,
//! and the page's Content-Security-Policy allows only this origin. The
//! script writes every value it got from the grid as text, never as markup,
//! since a node chooses its model names.
//!
//! Owns only what it reads: the registry under the grid's lock (never held
//! across an `.await`) and the metrics' totals. Recent rates come from a
//! short history of those totals, sampled when the JSON is asked for, so
//! nothing runs while nobody looks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::metrics::{Totals, LATENCY_BOUNDS};
use super::state::Grid;
use crate::attest::Check;
use crate::proto::api::AttestationLevel;
use crate::proto::routes;

const PAGE: &str = include_str!("explorer/index.html");
const SCRIPT: &str = include_str!("explorer/explorer.js");
const STYLE: &str = include_str!("explorer/explorer.css");

/// Only this origin, for scripts, styles and `fetch`; no frames, no forms.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The traffic figures cover about this much of the recent past.
const WINDOW: Duration = Duration::from_secs(60);
/// Samples closer together than this are not kept: a page refreshing every
/// few seconds, or many pages, add one per interval at most.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The history never holds more than this many samples.
const MAX_SAMPLES: usize = 256;
/// At most this many nodes are listed (the counts cover them all): the
/// answer stays small whatever the size of the grid.
const MAX_NODES_LISTED: usize = 500;

/// The explorer's routes, with their own state, to merge beside the client
/// API (whose error edge turns a wrong method into its JSON shape).
pub fn routes(grid: Grid) -> Router {
    let history = Arc::new(Mutex::new(History::new(
        Instant::now(),
        grid.metrics.totals(),
    )));
    let state = Explorer { grid, history };
    Router::new()
        .route(
            routes::EXPLORER,
            get(page).fallback(super::error::not_supported),
        )
        .route(routes::EXPLORER_SCRIPT, get(script))
        .route(routes::EXPLORER_STYLE, get(style))
        .route(routes::EXPLORER_JSON, get(explorer_json))
        .with_state(state)
}

#[derive(Clone)]
struct Explorer {
    grid: Grid,
    /// A std mutex: held only to push and read a sample, never across an
    /// `.await`.
    history: Arc<Mutex<History>>,
}

/// Whether a request's `Accept` asks for JSON and not HTML: an API client
/// that lands on `/` keeps getting §5.12's `not_supported`, as before the
/// page existed. A browser (or a client that names nothing) gets the page.
fn wants_json_only(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    let json = accept.contains("application/json") || accept.contains("+json");
    json && !accept.contains("text/html")
}

async fn page(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if wants_json_only(&headers) {
        return super::error::not_supported(method, uri)
            .await
            .into_response();
    }
    asset("text/html; charset=utf-8", PAGE, true)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT, false)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE, false)
}

/// An embedded file. `no-cache`: a browser checks again, so a new binary's
/// page never runs with the old script.
fn asset(content_type: &'static str, body: &'static str, page: bool) -> Response {
    let mut resp = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response();
    if page {
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}

// ------------------------------------------------------------- the answer

/// `GET /grid/explorer.json`.
#[derive(Debug, Serialize)]
pub struct ExplorerResponse {
    pub object: &'static str,
    pub generated_at: String,
    pub capacity: Capacity,
    pub traffic: Traffic,
    /// Every registered node counted here; at most [`MAX_NODES_LISTED`] of
    /// them in `nodes` (active first).
    pub nodes_total: usize,
    pub nodes: Vec<NodeView>,
}

/// Slots over the nodes that take work now (attested, on the grid, online).
#[derive(Debug, Serialize, PartialEq)]
pub struct Capacity {
    pub nodes_online: u64,
    pub slots_total: u64,
    pub slots_busy: u64,
    /// `slots_busy / slots_total`, 0 when there are no slots.
    pub load: f64,
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub node_id: String,
    /// `active`, `offline`, `off_grid` or `unattested` (as `/metrics`).
    pub state: &'static str,
    pub attestation_level: AttestationLevel,
    /// The TEE type clients see (the hardware's only when it was proven).
    pub tee_type: String,
    pub models: Vec<String>,
    pub slots: u32,
    pub busy: u32,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub attestation: Option<AttestationView>,
}

#[derive(Debug, Serialize)]
pub struct AttestationView {
    pub verified_at: String,
    pub policy_digest: Option<String>,
    /// The evidence's format (`sev-snp`, `tdx`, `simulated`), when evidence
    /// was given.
    pub evidence_format: Option<String>,
    /// The public evidence document (§7b), a path on this coordinator.
    pub evidence_url: String,
    /// Every step of the verifier, in order; empty for a self-reported node.
    pub checks: Vec<Check>,
}

/// Traffic over the last `window_seconds` (at most about a minute; since
/// the coordinator started, or since the explorer was last asked, when that
/// is shorter or longer).
#[derive(Debug, Serialize, PartialEq)]
pub struct Traffic {
    pub window_seconds: f64,
    pub requests: u64,
    pub jobs_completed: u64,
    pub jobs_aborted: u64,
    pub jobs_failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub jobs_per_minute: f64,
    pub completion_tokens_per_second: f64,
    pub latency: Latency,
}

/// Chat completions answered 200 in the window: time from the request to
/// the response's head (for a stream, its first byte). Percentiles are the
/// upper bound of the histogram bucket they fall in; `None` when no request
/// was answered, or when it is past the last bound.
#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    pub requests: u64,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

fn state_rank(state: &str) -> u8 {
    match state {
        "active" => 0,
        "offline" => 1,
        "off_grid" => 2,
        _ => 3,
    }
}

async fn explorer_json(State(ex): State<Explorer>) -> Json<ExplorerResponse> {
    let now = Instant::now();
    let totals = ex.grid.metrics.totals();
    let traffic = match ex.history.lock() {
        Ok(mut h) => h.record(now, totals),
        // A panic while sampling cannot leave the history half written (a
        // push and a trim); its samples stay usable.
        Err(poisoned) => poisoned.into_inner().record(now, totals),
    };
    let grid = &ex.grid;
    let mut capacity = Capacity {
        nodes_online: 0,
        slots_total: 0,
        slots_busy: 0,
        load: 0.0,
    };
    let mut nodes = Vec::new();
    {
        let inner = grid.lock();
        for n in inner.nodes() {
            let state = super::metrics::node_state(grid, n, now);
            let busy = inner.load(&n.id);
            if state == "active" {
                capacity.nodes_online += 1;
                capacity.slots_total += u64::from(n.max_concurrent_jobs);
                capacity.slots_busy += u64::from(busy);
            }
            nodes.push(NodeView {
                node_id: n.id.to_string(),
                state,
                attestation_level: n.level,
                tee_type: super::market::shown_tee_type(n),
                models: n.models.clone(),
                slots: n.max_concurrent_jobs,
                busy,
                jobs_completed: n.jobs_completed,
                jobs_failed: n.jobs_failed,
                attestation: n.attestation.as_ref().map(|a| AttestationView {
                    verified_at: a.verified_at.clone(),
                    policy_digest: a.policy_digest.clone(),
                    evidence_format: a
                        .evidence
                        .as_ref()
                        .and_then(|e| serde_json::to_value(e).ok())
                        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(String::from)),
                    evidence_url: routes::path(routes::NODE_EVIDENCE, &n.id.to_string()),
                    checks: a.checks.clone(),
                }),
            });
        }
    }
    if capacity.slots_total > 0 {
        capacity.load = capacity.slots_busy as f64 / capacity.slots_total as f64;
    }
    let nodes_total = nodes.len();
    nodes.sort_by(|a, b| {
        state_rank(a.state)
            .cmp(&state_rank(b.state))
            .then_with(|| a.node_id.cmp(&b.node_id))
    });
    nodes.truncate(MAX_NODES_LISTED);
    Json(ExplorerResponse {
        object: "grid.explorer",
        generated_at: grid.config.clock.rfc3339_now(),
        capacity,
        traffic,
        nodes_total,
        nodes,
    })
}

// ---------------------------------------------------------------- history

/// Totals sampled over time, oldest first; never empty.
#[derive(Debug)]
struct History {
    samples: VecDeque<(Instant, Totals)>,
}

impl History {
    fn new(at: Instant, totals: Totals) -> Self {
        History {
            samples: VecDeque::from([(at, totals)]),
        }
    }

    /// Keep `totals` as of `now` and answer the traffic since the newest
    /// sample at least [`WINDOW`] old (or the oldest, when none is).
    fn record(&mut self, now: Instant, totals: Totals) -> Traffic {
        // The newest sample old enough to be the window's start; those
        // before it are no longer needed.
        let start = self
            .samples
            .iter()
            .rposition(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
            .unwrap_or(0);
        self.samples.drain(..start);
        let (since, base) = self
            .samples
            .front()
            .cloned()
            .unwrap_or((now, Totals::default()));
        let traffic = traffic(&base, &totals, now.saturating_duration_since(since));
        let last = self.samples.back().map(|(at, _)| *at);
        if last.is_none_or(|at| now.saturating_duration_since(at) >= SAMPLE_EVERY) {
            self.samples.push_back((now, totals));
        }
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        traffic
    }
}

fn traffic(before: &Totals, now: &Totals, window: Duration) -> Traffic {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let secs = window.as_secs_f64();
    let jobs_completed = d(before.jobs_completed, now.jobs_completed);
    let completion_tokens = d(before.completion_tokens, now.completion_tokens);
    let rate = |n: u64, per: f64| {
        if secs > 0.0 {
            n as f64 * per / secs
        } else {
            0.0
        }
    };
    let buckets: Vec<u64> = now
        .chat_buckets
        .iter()
        .enumerate()
        .map(|(i, n)| d(before.chat_buckets.get(i).copied().unwrap_or(0), *n))
        .collect();
    let requests = d(before.chat_count, now.chat_count);
    let pct = |q: f64| percentile(&buckets, requests, q);
    Traffic {
        window_seconds: (secs * 10.0).round() / 10.0,
        requests: d(before.requests, now.requests),
        jobs_completed,
        jobs_aborted: d(before.jobs_aborted, now.jobs_aborted),
        jobs_failed: d(before.jobs_failed, now.jobs_failed),
        prompt_tokens: d(before.prompt_tokens, now.prompt_tokens),
        completion_tokens,
        jobs_per_minute: rate(jobs_completed, 60.0),
        completion_tokens_per_second: rate(completion_tokens, 1.0),
        latency: Latency {
            requests,
            p50_seconds: pct(0.50),
            p95_seconds: pct(0.95),
            p99_seconds: pct(0.99),
        },
    }
}

/// The bound of the first bucket (cumulative counts, [`LATENCY_BOUNDS`])
/// that holds the `q`-th of `count` observations.
fn percentile(buckets: &[u64], count: u64, q: f64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    // The rank of the observation, 1-based, rounded up: the median of one
    // observation is that observation.
    let rank = ((count as f64) * q).ceil().max(1.0) as u64;
    buckets
        .iter()
        .zip(LATENCY_BOUNDS)
        .find(|(n, _)| **n >= rank)
        .map(|(_, b)| *b)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::coordinator::state::Config;

    fn totals(jobs: u64, tokens: u64, chat: &[(usize, u64)]) -> Totals {
        let mut t = Totals {
            jobs_completed: jobs,
            completion_tokens: tokens,
            chat_buckets: vec![0; LATENCY_BOUNDS.len()],
            ..Totals::default()
        };
        // `chat`: (bucket index, observations there); cumulative as stored.
        for (i, n) in chat {
            for b in &mut t.chat_buckets[*i..] {
                *b += n;
            }
            t.chat_count += n;
        }
        t
    }

    #[test]
    fn traffic_is_the_difference_over_the_window() {
        let t0 = Instant::now();
        let mut h = History::new(t0, Totals::default());
        let s = |n| t0 + Duration::from_secs(n);
        // 30 s in: everything since start, over 30 s.
        let t = h.record(s(30), totals(3, 30, &[(2, 3)]));
        assert_eq!(t.window_seconds, 30.0);
        assert_eq!(t.jobs_completed, 3);
        assert_eq!(t.jobs_per_minute, 6.0);
        assert_eq!(t.completion_tokens_per_second, 1.0);
        assert_eq!(t.latency.requests, 3);
        assert_eq!(t.latency.p50_seconds, Some(LATENCY_BOUNDS[2]));
        // 70 s in: the window starts at the newest sample 60 s old or more
        // (the start, at 0 s: 70 s); 100 s in: the one at 30 s.
        let t = h.record(s(70), totals(5, 50, &[(2, 3), (5, 2)]));
        assert_eq!((t.window_seconds, t.jobs_completed), (70.0, 5));
        let t = h.record(s(100), totals(9, 90, &[(2, 3), (5, 4), (14, 2)]));
        assert_eq!((t.window_seconds, t.jobs_completed), (70.0, 6));
        assert_eq!(t.latency.requests, 6);
        assert_eq!(t.latency.p50_seconds, Some(LATENCY_BOUNDS[5]));
        assert_eq!(t.latency.p95_seconds, Some(LATENCY_BOUNDS[14]));
        // The samples before the window's start are gone.
        assert_eq!(h.samples.front().map(|(at, _)| *at), Some(s(30)));
    }

    #[test]
    fn samples_are_spaced_and_bounded() {
        let t0 = Instant::now();
        let mut h = History::new(t0, Totals::default());
        for ms in 1..2_000 {
            h.record(t0 + Duration::from_millis(ms * 10), Totals::default());
        }
        // One per second over 20 s, plus the first.
        assert_eq!(h.samples.len(), 20);
        for s in 0..10_000 {
            h.record(t0 + Duration::from_secs(20 + s), Totals::default());
        }
        assert!(h.samples.len() <= MAX_SAMPLES);
        assert!(h.samples.len() > 1);
    }

    #[test]
    fn percentiles_are_bucket_bounds() {
        assert_eq!(percentile(&[0; 15], 0, 0.5), None);
        let t = totals(0, 0, &[(0, 1)]);
        assert_eq!(percentile(&t.chat_buckets, 1, 0.99), Some(0.001));
        // Past the last bound: not claimed.
        let mut b = vec![0; LATENCY_BOUNDS.len()];
        b[0] = 1;
        assert_eq!(percentile(&b, 2, 0.95), None);
    }

    fn dev_grid() -> Grid {
        Grid::new(Config {
            dev: true,
            ..Config::default()
        })
    }

    async fn get(grid: &Grid, path: &str, accept: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        crate::coordinator::router(grid.clone())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn content_type(resp: &Response) -> &str {
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn the_page_is_for_browsers_and_api_clients_keep_not_supported() {
        let grid = dev_grid();
        for accept in [
            None,
            Some("*/*"),
            Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ] {
            let resp = get(&grid, "/", accept).await;
            assert_eq!(resp.status(), StatusCode::OK, "{accept:?}");
            assert_eq!(content_type(&resp), "text/html; charset=utf-8");
            assert!(resp
                .headers()
                .get(header::CONTENT_SECURITY_POLICY)
                .is_some());
        }
        let resp = get(&grid, "/", Some("application/json")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = crate::coordinator::error::body_json(resp).await;
        assert_eq!(body["error"]["code"], "not_supported");
        // Another method on `/` is still an unknown route.
        let resp = crate::coordinator::router(grid.clone())
            .oneshot(Request::post("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = crate::coordinator::error::body_json(resp).await;
        assert_eq!(body["error"]["code"], "not_supported");
        for (path, ct) in [
            (routes::EXPLORER_SCRIPT, "text/javascript; charset=utf-8"),
            (routes::EXPLORER_STYLE, "text/css; charset=utf-8"),
        ] {
            let resp = get(&grid, path, None).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(content_type(&resp), ct);
        }
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for text in [PAGE, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains("//cdn") && !text.contains("@import"));
        }
        assert!(PAGE.contains(routes::EXPLORER_SCRIPT));
        assert!(PAGE.contains(routes::EXPLORER_STYLE));
        assert!(SCRIPT.contains(routes::EXPLORER_JSON));
        // Values from the grid are written as text only.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
    }

    #[tokio::test]
    async fn the_json_lists_nodes_with_their_verdict() {
        let grid = dev_grid();
        let id = crate::proto::identity::NodeIdentity::generate();
        let (node_id, _) = grid.register(
            id.ed25519_public(),
            "0x1".into(),
            "none".into(),
            vec!["m".into()],
        );
        let resp = get(&grid, routes::EXPLORER_JSON, None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = crate::coordinator::error::body_json(resp).await;
        assert_eq!(body["object"], "grid.explorer");
        assert_eq!(body["nodes_total"], 1);
        // Registered, not attested: listed, and no slot counted.
        assert_eq!(body["nodes"][0]["node_id"], node_id.to_string());
        assert_eq!(body["nodes"][0]["state"], "unattested");
        assert_eq!(body["nodes"][0]["attestation"], Value::Null);
        assert_eq!(body["capacity"]["nodes_online"], 0);
        assert_eq!(body["capacity"]["slots_total"], 0);
        assert_eq!(body["traffic"]["jobs_completed"], 0);
        assert_eq!(body["traffic"]["latency"]["p50_seconds"], Value::Null);
    }
}
