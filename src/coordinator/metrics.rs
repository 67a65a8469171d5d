//! The coordinator's `GET /metrics`, in the Prometheus text format written
//! by [`crate::metrics`] (as the node's `/metrics`): HTTP requests and their
//! latency by method, route and status; jobs by outcome; billed tokens and
//! µUSD by payment method; payment verifications and settlements by result;
//! node WebSockets; and, computed at scrape time from the registry, nodes by
//! state, TEE type and attestation level.
//!
//! Label values are bounded: a route is the matched route template (an
//! unknown path is `unmatched`), a method one of the standard ones or
//! `other`, so a client cannot grow the series by choosing paths.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::state::{Grid, Node};
use crate::metrics::{header as family, label_value, labels, Histogram, CONTENT_TYPE};
use crate::proto::api::AttestationLevel;

/// Request latency buckets, in seconds: from a cached listing to a long
/// generation answered whole.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A counter family with labels: label values → count.
#[derive(Debug, Default)]
struct Counter(Mutex<BTreeMap<Vec<String>, u64>>);

impl Counter {
    fn add(&self, values: &[&str], n: u64) {
        if let Ok(mut m) = self.0.lock() {
            let key = values.iter().map(|v| v.to_string()).collect();
            *m.entry(key).or_default() += n;
        }
    }

    /// The sum over the series whose label at `pos` is `value`.
    fn sum_where(&self, pos: usize, value: &str) -> u64 {
        let Ok(m) = self.0.lock() else { return 0 };
        m.iter()
            .filter(|(values, _)| values.get(pos).is_some_and(|v| v == value))
            .map(|(_, n)| *n)
            .sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str, keys: &[&str]) {
        family(out, name, help, "counter");
        let Ok(m) = self.0.lock() else { return };
        for (values, n) in m.iter() {
            let pairs: Vec<(&str, &str)> = keys
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {n}", labels(&pairs));
        }
    }
}

/// What the coordinator counts while it serves.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) → latency histogram (its count is the
    /// request count).
    http: Mutex<BTreeMap<(&'static str, String, u16), Histogram>>,
    jobs: Counter,
    tokens: Counter,
    micros: Counter,
    verifications: Counter,
    settlements: Counter,
    ws_open: AtomicU64,
    ws_total: AtomicU64,
}

fn http_labels(method: &str, route: &str, status: u16) -> String {
    labels(&[
        ("method", method),
        ("route", route),
        ("status", status.to_string().as_str()),
    ])
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Counts since start, which the grid explorer ([`super::explorer`])
/// turns into rates over a recent window by subtracting an older copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// HTTP requests answered, every route.
    pub requests: u64,
    /// Chat completions answered 200: the cumulative count at each bound of
    /// [`LATENCY_BOUNDS`] (time to the response's head), and the total.
    pub chat_buckets: Vec<u64>,
    pub chat_count: u64,
    /// Jobs whose bill closed, by outcome.
    pub jobs_completed: u64,
    pub jobs_aborted: u64,
    pub jobs_failed: u64,
    /// Tokens billed, every payment method.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Metrics {
    /// The counts as they stand now.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            chat_buckets: vec![0; LATENCY_BOUNDS.len()],
            ..Totals::default()
        };
        if let Ok(m) = self.http.lock() {
            for ((method, route, status), h) in m.iter() {
                t.requests += h.count();
                if *method == "POST"
                    && route == crate::proto::routes::CHAT_COMPLETIONS
                    && *status == 200
                {
                    t.chat_count += h.count();
                    for (sum, n) in t.chat_buckets.iter_mut().zip(h.buckets()) {
                        *sum += n;
                    }
                }
            }
        }
        t.jobs_completed = self.jobs.sum_where(0, "completed");
        t.jobs_aborted = self.jobs.sum_where(0, "aborted");
        t.jobs_failed = self.jobs.sum_where(0, "failed");
        t.prompt_tokens = self.tokens.sum_where(0, "prompt");
        t.completion_tokens = self.tokens.sum_where(0, "completion");
        t
    }

    fn request(&self, method: &'static str, route: String, status: u16, took: Duration) {
        if let Ok(mut m) = self.http.lock() {
            m.entry((method, route, status))
                .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
                .observe(took.as_secs_f64());
        }
    }

    /// A job's bill closed ([`super::billing::close`]): its outcome
    /// (`completed`, `aborted`, `failed`), the payment method, the tokens
    /// and µUSD billed, and whether the bill settled. A credit hold's
    /// settlement is counted here; a payment's was counted before dispatch.
    pub fn job_closed(
        &self,
        outcome: &str,
        method: &str,
        tokens: (u64, u64),
        cost_micros: u64,
        settled: bool,
    ) {
        self.jobs.add(&[outcome], 1);
        if outcome != "failed" {
            self.tokens.add(&["prompt", method], tokens.0);
            self.tokens.add(&["completion", method], tokens.1);
            self.micros.add(&[method], cost_micros);
        }
        if method == "credits" && (outcome != "failed" || !settled) {
            let result = if settled { "settled" } else { "failed" };
            self.settlements.add(&[method, result], 1);
        }
    }

    /// A request's payment credentials checked: `accepted`, `refused` or
    /// `payment_required` (none given).
    pub fn payment_verified(&self, result: &str) {
        self.verifications.add(&[result], 1);
    }

    /// A payment (x402, MPP) settled before dispatch, or not.
    pub fn payment_settled(&self, method: &str, ok: bool) {
        let result = if ok { "settled" } else { "failed" };
        self.settlements.add(&[method, result], 1);
    }

    /// A node WebSocket opened; the guard counts it closed when dropped.
    pub fn socket_opened(self: &Arc<Self>) -> SocketGuard {
        self.ws_open.fetch_add(1, Ordering::Relaxed);
        self.ws_total.fetch_add(1, Ordering::Relaxed);
        SocketGuard(self.clone())
    }

    fn render(&self, out: &mut String) {
        let http = self.http.lock();
        family(
            out,
            "sgl_coordinator_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            "counter",
        );
        if let Ok(m) = &http {
            for ((method, route, status), h) in m.iter() {
                let l = http_labels(method, route, *status);
                let _ = writeln!(
                    out,
                    "sgl_coordinator_http_requests_total{{{l}}} {}",
                    h.count()
                );
            }
        }
        let name = "sgl_coordinator_http_request_duration_seconds";
        family(
            out,
            name,
            "Time from a request to its response's head, by method, route template and status.",
            "histogram",
        );
        if let Ok(m) = &http {
            for ((method, route, status), h) in m.iter() {
                let l = http_labels(method, route, *status);
                h.render_series(out, name, &l);
            }
        }
        drop(http);
        self.jobs.render(
            out,
            "sgl_coordinator_jobs_total",
            "Jobs whose bill closed, by outcome.",
            &["outcome"],
        );
        self.tokens.render(
            out,
            "sgl_coordinator_billed_tokens_total",
            "Tokens billed, by kind (prompt, completion) and payment method.",
            &["kind", "method"],
        );
        self.micros.render(
            out,
            "sgl_coordinator_billed_micro_usd_total",
            "Micro-USD billed to clients, by payment method.",
            &["method"],
        );
        self.verifications.render(
            out,
            "sgl_coordinator_payment_verifications_total",
            "Payment credentials checked on paid requests, by result.",
            &["result"],
        );
        self.settlements.render(
            out,
            "sgl_coordinator_payment_settlements_total",
            "Payment and credit-hold settlements, by payment method and result.",
            &["method", "result"],
        );
        crate::metrics::single(
            out,
            "sgl_coordinator_websocket_connections",
            "Node WebSockets open now.",
            "gauge",
            &self.ws_open,
        );
        crate::metrics::single(
            out,
            "sgl_coordinator_websocket_connections_total",
            "Node WebSockets opened since start.",
            "counter",
            &self.ws_total,
        );
    }
}

/// An open node WebSocket, counted until it is dropped.
pub struct SocketGuard(Arc<Metrics>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.ws_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Middleware over every route: count the request and time it to its
/// response's head (a stream's body is not waited for).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics.request(method, route, resp.status().as_u16(), start.elapsed());
    resp
}

/// A node's state as the metrics and the explorer name it.
pub(super) fn node_state(grid: &Grid, n: &Node, now: Instant) -> &'static str {
    if n.level == AttestationLevel::None {
        "unattested"
    } else if n.off_grid {
        "off_grid"
    } else if !grid.is_online(n, now) {
        "offline"
    } else {
        "active"
    }
}

/// The registry's nodes by state (`active`, `offline`, `off_grid`,
/// `unattested`), TEE type and attestation level, as a gauge.
fn render_nodes(grid: &Grid, out: &mut String) {
    let mut counts: BTreeMap<(&'static str, String, String), u64> = BTreeMap::new();
    {
        let inner = grid.lock();
        let now = Instant::now();
        for n in inner.nodes() {
            let state = node_state(grid, n, now);
            let level = serde_json::to_value(n.level)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            *counts
                .entry((state, n.tee_type.clone(), level))
                .or_default() += 1;
        }
    }
    let name = "sgl_coordinator_nodes";
    family(
        out,
        name,
        "Registered nodes, by state, TEE type and attestation level.",
        "gauge",
    );
    for ((state, tee, level), n) in counts {
        let _ = writeln!(
            out,
            "{name}{{state=\"{state}\",tee_type=\"{}\",attestation_level=\"{}\"}} {n}",
            label_value(&tee),
            label_value(&level)
        );
    }
}

/// `GET /metrics`.
pub async fn scrape(State(grid): State<Grid>) -> Response {
    let mut out = String::new();
    grid.metrics.render(&mut out);
    render_nodes(&grid, &mut out);
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_labelled_and_bounded() {
        let m = Arc::new(Metrics::default());
        m.request(
            "POST",
            "/v1/chat/completions".into(),
            200,
            Duration::from_millis(30),
        );
        m.request(
            "POST",
            "/v1/chat/completions".into(),
            200,
            Duration::from_millis(3),
        );
        m.job_closed("completed", "credits", (10, 5), 42, true);
        m.job_closed("failed", "x402-v2", (0, 0), 0, true);
        m.payment_settled("x402-v2", false);
        let guard = m.socket_opened();
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "sgl_coordinator_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"} 2\n"
        ));
        assert!(out.contains("sgl_coordinator_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\",le=\"0.005\"} 1\n"));
        assert!(out.contains("sgl_coordinator_jobs_total{outcome=\"completed\"} 1\n"));
        assert!(out.contains("sgl_coordinator_jobs_total{outcome=\"failed\"} 1\n"));
        assert!(out.contains(
            "sgl_coordinator_billed_tokens_total{kind=\"completion\",method=\"credits\"} 5\n"
        ));
        assert!(out.contains("sgl_coordinator_billed_micro_usd_total{method=\"credits\"} 42\n"));
        assert!(out.contains(
            "sgl_coordinator_payment_settlements_total{method=\"x402-v2\",result=\"failed\"} 1\n"
        ));
        assert!(out.contains("sgl_coordinator_websocket_connections 1\n"));
        drop(guard);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("sgl_coordinator_websocket_connections 0\n"));
        assert!(out.contains("sgl_coordinator_websocket_connections_total 1\n"));
    }
}
