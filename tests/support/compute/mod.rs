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
    /// Powered off (DigitalOcean: a resize needs it).
    pub off: bool,
}

/// A DigitalOcean droplet action at the stand-in.
#[derive(Clone, Debug)]
pub struct StandAction {
    pub id: u64,
    pub droplet: String,
    /// `power_off`, `power_on` or `resize`.
    pub kind: String,
    /// Polls answered so far (it completes after `ACTION_DONE_AFTER_GETS`).
    pub gets: usize,
}

impl StandAction {
    pub fn completed(&self) -> bool {
        self.gets >= ACTION_DONE_AFTER_GETS
    }
}

/// An action answers `in-progress` to this many polls minus one, then
/// `completed`; until then its droplet is locked.
pub const ACTION_DONE_AFTER_GETS: usize = 2;

/// The reason a stand-in gives when `refuse_create` is on.
pub const REFUSAL: &str = "Server add failed: this plan is sold out in the selected location.";
/// The message of a create that fails with 500 (`fail_create`).
pub const FAILURE: &str = "Unable to create the machine: internal error.";

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
    /// DigitalOcean droplet actions by id.
    pub actions: Mutex<BTreeMap<u64, StandAction>>,
    /// Every droplet action accepted, in order: (droplet, type).
    pub action_log: Mutex<Vec<(String, String)>>,
    /// Every droplet action refused with 422, in order: (droplet, type).
    pub actions_refused: Mutex<Vec<(String, String)>>,
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
    /// Creates never answer and create nothing (the order never reached
    /// the provider's books).
    pub hang_before_create: AtomicBool,
    /// Creates are refused as a client error (4xx) with the provider's
    /// reason, `REFUSAL`.
    pub refuse_create: AtomicBool,
    /// Create requests received (created or not).
    pub create_requests: AtomicUsize,
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

    /// What every create does first: count it, and hang or refuse when
    /// switched to. Some(response) ends the request.
    async fn create_gate(
        &self,
        refusal: StatusCode,
        err: fn(StatusCode, &str) -> Response,
    ) -> Option<Response> {
        self.create_requests.fetch_add(1, Ordering::SeqCst);
        if self.hang_before_create.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail_create.load(Ordering::SeqCst) {
            return Some(err(StatusCode::INTERNAL_SERVER_ERROR, FAILURE));
        }
        if self.refuse_create.load(Ordering::SeqCst) {
            return Some(err(refusal, REFUSAL));
        }
        None
    }

    /// Book a machine the provider accepted: counted (also per tag) and
    /// stored; then, when `hang_create` is on, the answer never comes.
    async fn book(&self, m: &Machine) {
        self.creates.fetch_add(1, Ordering::SeqCst);
        for t in &m.tags {
            *self
                .creates_by_tag
                .lock()
                .unwrap()
                .entry(t.clone())
                .or_default() += 1;
        }
        self.machines
            .lock()
            .unwrap()
            .insert(m.id.clone(), m.clone());
        if self.hang_create.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    /// The live machines, carrying `tag` when one is given, as `render`
    /// writes them.
    fn listed(&self, tag: Option<&String>, render: impl Fn(&Machine) -> Value) -> Vec<Value> {
        self.machines
            .lock()
            .unwrap()
            .values()
            .filter(|m| !m.deleted && tag.is_none_or(|t| m.tags.contains(t)))
            .map(render)
            .collect()
    }

    /// Live machine `id`, counted as polled once more (it turns active
    /// after `ACTIVE_AFTER_GETS`), as `render` writes it; None when it is
    /// gone.
    fn polled(&self, id: &str, render: impl Fn(&Machine) -> Value) -> Option<Value> {
        let mut machines = self.machines.lock().unwrap();
        let m = machines.get_mut(id).filter(|m| !m.deleted)?;
        m.gets += 1;
        Some(render(m))
    }

    /// Delete live machine `id`; false when there was none.
    fn remove(&self, id: &str) -> bool {
        let mut machines = self.machines.lock().unwrap();
        match machines.get_mut(id).filter(|m| !m.deleted) {
            Some(m) => {
                m.deleted = true;
                self.deletes.fetch_add(1, Ordering::SeqCst);
                true
            }
            None => false,
        }
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

/// The string items of a create body's `tags`.
fn tags_of(body: &Value) -> Vec<String> {
    body["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// 204 No Content.
fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
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
