//! Loopback stand-ins for the Vultr and DigitalOcean APIs (the subset the
//! Machines API uses), written from the providers' public API references:
//! their paths, JSON shapes, paging, error bodies, 429 with `Retry-After`,
//! and asynchronous creation (pending/new until polled a few times, then
//! active with an address). Switches make them fail, rate-limit or hang,
//! and counters show what they were asked.
#![allow(dead_code)]

pub mod digitalocean;
pub mod vultr;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

pub const VULTR_TOKEN: &str = "vultr-test-token";
pub const DO_TOKEN: &str = "do-test-token";

/// One machine at a stand-in.
#[derive(Clone, Debug)]
pub struct Machine {
    pub id: String,
    pub plan: String,
    pub region: String,
    pub os_id: u64,
    pub label: String,
    pub tags: Vec<String>,
    pub ssh_keys: Vec<Value>,
    /// GETs answered so far (it turns active after `ACTIVE_AFTER_GETS`).
    pub gets: usize,
    pub ip: String,
    pub password: String,
    pub disk: u64,
    pub deleted: bool,
}

/// A machine answers `pending` to this many GETs, then `active`.
pub const ACTIVE_AFTER_GETS: usize = 1;

#[derive(Default)]
pub struct StandState {
    pub machines: Mutex<BTreeMap<String, Machine>>,
    /// Creates per tag (the order's idempotency key).
    pub creates_by_tag: Mutex<HashMap<String, usize>>,
    pub creates: AtomicUsize,
    pub deletes: AtomicUsize,
    pub resizes: Mutex<Vec<(String, String, bool)>>,
    pub ssh_keys: Mutex<Vec<String>>,
    /// Every catalogue request (plans/sizes, regions, os/images).
    pub catalogue_calls: AtomicUsize,
    /// The next N requests answer 429 (`Retry-After: 0`).
    pub rate_limit_next: AtomicUsize,
    pub rate_limited: AtomicUsize,
    /// Everything answers 500.
    pub down: AtomicBool,
    /// Creates answer 500 (nothing is created).
    pub fail_create: AtomicBool,
    /// Machine GETs answer 500.
    pub fail_get: AtomicBool,
    /// Creates record the machine, then never answer.
    pub hang_create: AtomicBool,
    next_id: AtomicUsize,
}

impl StandState {
    pub fn machine_count(&self) -> usize {
        self.machines
            .lock()
            .unwrap()
            .values()
            .filter(|m| !m.deleted)
            .count()
    }

    pub fn creates_for(&self, tag: &str) -> usize {
        self.creates_by_tag
            .lock()
            .unwrap()
            .get(tag)
            .copied()
            .unwrap_or(0)
    }

    pub fn max_creates_per_tag(&self) -> usize {
        self.creates_by_tag
            .lock()
            .unwrap()
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn live(&self, id: &str) -> bool {
        self.machines
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|m| !m.deleted)
    }

    fn next(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::SeqCst) + 1
    }
}

pub struct StandIn {
    pub url: String,
    pub state: Arc<StandState>,
}

/// Checks every stand-in request makes first: the bearer token, the
/// outage switch and the rate limiter. Some(response) ends the request.
fn gate(
    s: &StandState,
    headers: &HeaderMap,
    token: &str,
    err: fn(StatusCode, &str) -> Response,
) -> Option<Response> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {token}") {
        return Some(err(StatusCode::UNAUTHORIZED, "Invalid API token."));
    }
    if s.rate_limit_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        s.rate_limited.fetch_add(1, Ordering::SeqCst);
        let mut r = err(StatusCode::TOO_MANY_REQUESTS, "Rate limit reached.");
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("0"));
        return Some(r);
    }
    if s.down.load(Ordering::SeqCst) {
        return Some(err(StatusCode::INTERNAL_SERVER_ERROR, "Internal error."));
    }
    None
}

fn json(status: StatusCode, v: Value) -> Response {
    (status, Json(v)).into_response()
}

/// A page of `items` (at most `cap` a page, whatever `per_page` asks:
/// the stand-ins page small so paging is exercised).
fn page_of<T: Clone>(items: &[T], start: usize, cap: usize) -> (Vec<T>, Option<usize>) {
    let end = (start + cap).min(items.len());
    let slice = items.get(start..end).unwrap_or(&[]).to_vec();
    (slice, (end < items.len()).then_some(end))
}

/// Start both stand-ins.
pub async fn start_both() -> (StandIn, StandIn) {
    (vultr::start().await, digitalocean::start().await)
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A valid ed25519 OpenSSH public key line.
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGnW0fK6rdEoYzJZ6qFdU8e6uJ3cJHFH3s3ZZqj1fR3R test@host";

#[cfg(feature = "compute-plane")]
pub mod server;
