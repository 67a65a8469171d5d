//! `POST /api/x402/compute`: run a Python or Node.js program in a fresh
//! sandbox, paid per request with x402 v2, or from credits.
//!
//! The order of a request, each step refusing before the next costs
//! anything:
//!
//! 1. **Validate** the body (at most [`MAX_BODY_BYTES`]): `stack`, `size`,
//!    `timeout_seconds` (clamped to the size's maximum), `code` (at most
//!    [`MAX_CODE_BYTES`]), `files` (name → base64, at most
//!    [`MAX_FILES_BYTES`] decoded). 400 or 413.
//! 2. **Quote** ([`super::pricing`]) from the size and the timeout.
//! 3. **Pay.** No credentials: 402 with the x402 v2 `PaymentRequired` in
//!    the `PAYMENT-REQUIRED` header and as the body, with
//!    `extensions.bazaar` ([`super::bazaar`]). A `PAYMENT-SIGNATURE` is
//!    verified (offline, then by the facilitator) and its authorization
//!    reserved, so a replay is refused; x402 v1 (`X-PAYMENT`) and MPP are
//!    not taken here. An account (API key or X-Auth signature) without a
//!    payment pays from its credits: the quote is held (402 with the
//!    shortfall when the balance is short).
//! 4. **Run** in a slot of the pool; every slot busy past the queue wait:
//!    503 with `Retry-After`.
//! 5. **Charge** only a run that finished within its time, whatever its
//!    exit code: the payment is settled (`PAYMENT-RESPONSE` on the 200) or
//!    the hold charged the quote. A timeout (408), a sandbox failure (500)
//!    or a busy pool (503) releases the payment or the hold: nothing is
//!    taken, and the same authorization may be presented again. A 408
//!    carries none of the program's output, which would otherwise be had
//!    for free by running out the clock.
//!
//! From the payment on, the work runs in its own task: a client that hangs
//! up does not leave a payment half way between reserved and settled.

// The parsing helpers return the finished error response, as handlers do;
// it is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::pricing::ExecPricing;
use super::{
    bazaar, valid_file_name, ExecOutcome, ExecRequest, SandboxConfig, SandboxError, SandboxPool,
    Size, Stack,
};
use crate::money::Micros;
use crate::payments::billing::{Charge, ChargeRefused};
use crate::payments::http::{error_response, refusal};
use crate::payments::x402::{self, Offer, Presented};
use crate::payments::{PaymentError, Payments, RequestParts};

/// The route.
pub const PATH: &str = "/api/x402/compute";
/// The largest program, in bytes.
pub const MAX_CODE_BYTES: usize = 1_000_000;
/// The largest total of input files, decoded.
pub const MAX_FILES_BYTES: usize = 10_000_000;
/// The most input files.
pub const MAX_FILES: usize = 1_000;
/// The largest request body: the files in base64 (4/3), the program with
/// JSON escapes, and room for the rest.
pub const MAX_BODY_BYTES: usize = MAX_FILES_BYTES / 3 * 4 + 6 * MAX_CODE_BYTES + 1_000_000;

/// The code-execution service: the sandbox pool, the payments it is paid
/// through and its prices. Cheap to clone.
#[derive(Clone)]
pub struct CodeExec {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SandboxPool,
    payments: Payments,
    pricing: ExecPricing,
}

impl CodeExec {
    pub fn new(pool: SandboxPool, payments: Payments, pricing: ExecPricing) -> Self {
        CodeExec {
            inner: Arc::new(Inner {
                pool,
                payments,
                pricing,
            }),
        }
    }

    pub fn pool(&self) -> &SandboxPool {
        &self.inner.pool
    }

    pub fn pricing(&self) -> &ExecPricing {
        &self.inner.pricing
    }

    /// What a run of `size` allowed `timeout` costs, the timeout clamped as
    /// a request's would be.
    pub fn quote(&self, size: Size, timeout: Duration) -> Option<Micros> {
        let limits = self.inner.pool.config().limits_for(size);
        let timeout = timeout.min(limits.max_timeout);
        self.inner.pricing.quote(size, limits, timeout)
    }

    /// Seconds a client told 503 should wait: the queue wait, at least 1.
    fn retry_after(&self) -> u64 {
        self.inner.pool.config().queue_wait.as_secs().max(1)
    }
}

/// The route above.
pub fn router(exec: CodeExec) -> Router {
    Router::new()
        .route(PATH, post(execute))
        // The handler reads the body itself, bounded; this keeps any
        // extractor added later to the same bound.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(exec)
}

fn bad(code: &str, message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn too_large(code: &str, message: &str) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        code,
        message,
    )
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "code execution failed");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "execution_error",
        "the sandbox failed; nothing was charged",
    )
}

fn busy(retry_after: u64) -> Response {
    let mut r = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded_error",
        "sandboxes_busy",
        "every sandbox is busy; nothing was charged, retry later",
    );
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from(retry_after),
    );
    r
}

fn enum_field<T: Copy>(
    o: &Map<String, Value>,
    key: &str,
    options: &[(&str, T)],
    default: T,
) -> Result<T, Response> {
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let refuse = || {
        bad(
            &format!("invalid_{key}"),
            &format!("{key} must be one of {}", names.join(", ")),
        )
    };
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => options
            .iter()
            .find(|(n, _)| n == s)
            .map(|(_, v)| *v)
            .ok_or_else(refuse),
        Some(_) => Err(refuse()),
    }
}

/// A base64 file body (standard alphabet, padding optional).
fn decode_file(s: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s.trim_end_matches('=')))
        .ok()
}

/// Validate a request body against the pool's limits.
fn parse(cfg: &SandboxConfig, body: &[u8]) -> Result<ExecRequest, Response> {
    let o = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        _ => return Err(bad("invalid_json", "the body must be a JSON object")),
    };
    let stack = enum_field(
        &o,
        "stack",
        &[("python", Stack::Python), ("node", Stack::Node)],
        Stack::Python,
    )?;
    let size = enum_field(
        &o,
        "size",
        &[
            ("small", Size::Small),
            ("med", Size::Med),
            ("large", Size::Large),
        ],
        Size::Small,
    )?;
    let code = match o.get("code") {
        None | Some(Value::Null) => return Err(bad("missing_code", "code is required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(bad("missing_code", "code is empty"))
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("invalid_code", "code must be a string")),
    };
    if code.len() > MAX_CODE_BYTES {
        return Err(too_large(
            "code_too_large",
            &format!("code is larger than {MAX_CODE_BYTES} bytes"),
        ));
    }
    let limits = cfg.limits_for(size);
    let timeout = match o.get("timeout_seconds") {
        None | Some(Value::Null) => limits.default_timeout,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) if s >= 1 => Duration::from_secs(s).min(limits.max_timeout),
            _ => {
                return Err(bad(
                    "invalid_timeout_seconds",
                    "timeout_seconds must be a positive integer",
                ))
            }
        },
        Some(_) => {
            return Err(bad(
                "invalid_timeout_seconds",
                "timeout_seconds must be a positive integer",
            ))
        }
    };
    let files = match o.get("files") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => parse_files(m, stack)?,
        Some(_) => {
            return Err(bad(
                "invalid_files",
                "files must be an object of name -> base64",
            ))
        }
    };
    Ok(ExecRequest {
        stack,
        size,
        timeout,
        code,
        files,
    })
}

fn parse_files(m: &Map<String, Value>, stack: Stack) -> Result<Vec<(String, Vec<u8>)>, Response> {
    if m.len() > MAX_FILES {
        return Err(bad("too_many_files", &format!("at most {MAX_FILES} files")));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(m.len());
    for (name, v) in m {
        if !valid_file_name(name) {
            return Err(bad(
                "invalid_file_name",
                "file names are relative paths of at most 4 parts, without '..', '.', '\\' or control characters, 255 bytes at most",
            ));
        }
        if name == stack.script_name() {
            return Err(bad(
                "invalid_file_name",
                &format!("{name} is the program's own name"),
            ));
        }
        let Value::String(b64) = v else {
            return Err(bad(
                "invalid_file",
                &format!("{name}: must be a base64 string"),
            ));
        };
        // Refuse what cannot fit before decoding it.
        if total + b64.len() / 4 * 3 > MAX_FILES_BYTES + 3 {
            return Err(too_large(
                "files_too_large",
                &format!("files are larger than {MAX_FILES_BYTES} bytes"),
            ));
        }
        let Some(bytes) = decode_file(b64) else {
            return Err(bad("invalid_file", &format!("{name}: not valid base64")));
        };
        total += bytes.len();
        if total > MAX_FILES_BYTES {
            return Err(too_large(
                "files_too_large",
                &format!("files are larger than {MAX_FILES_BYTES} bytes"),
            ));
        }
        out.push((name.clone(), bytes));
    }
    Ok(out)
}

/// The v2 `PaymentRequired` of this route: the payments' own, plus
/// `extensions.bazaar`.
pub fn payment_required(payments: &Payments, offer: &Offer, error: &str) -> Value {
    let mut v = serde_json::to_value(x402::payment_required_v2(payments.config(), offer, error))
        .unwrap_or_default();
    v["extensions"] = json!({"bazaar": bazaar::extension()});
    v
}

/// The 402: the v2 object as the body and, base64, in `PAYMENT-REQUIRED`.
fn challenge(payments: &Payments, offer: &Offer, error: &str) -> Response {
    let v = payment_required(payments, offer, error);
    let mut resp = (StatusCode::PAYMENT_REQUIRED, Json(&v)).into_response();
    if let Ok(h) = HeaderValue::from_str(&x402::encode_header_json(&v)) {
        resp.headers_mut()
            .insert(HeaderName::from_static(x402::PAYMENT_REQUIRED), h);
    }
    resp
}

/// A refused charge: payment refusals get a fresh challenge naming the
/// reason; short credits the position and the shortfall; the rest the
/// payments' usual answer (401, 403, 502, …).
fn refused(payments: &Payments, offer: &Offer, e: &PaymentError) -> Response {
    match e {
        PaymentError::InsufficientCredits { balance, needed } => {
            let mut resp = crate::compute::http::short_credits(*balance, *needed);
            // An x402 client may pay instead.
            let v = payment_required(payments, offer, e.code());
            if let Ok(h) = HeaderValue::from_str(&x402::encode_header_json(&v)) {
                resp.headers_mut()
                    .insert(HeaderName::from_static(x402::PAYMENT_REQUIRED), h);
            }
            resp
        }
        e if e.is_payment_refusal() => challenge(payments, offer, e.code()),
        e => refusal(payments, e, None),
    }
}

/// x402 v2 only: a v1 `X-PAYMENT`, a v1 payload in `PAYMENT-SIGNATURE`
/// or an MPP credential is refused with the v2 challenge.
fn not_v2(headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key(x402::X_PAYMENT) {
        return Some("invalid_x402_version");
    }
    let mpp = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("payment "))
        });
    if mpp {
        return Some("unsupported_scheme");
    }
    let sig = headers
        .get(x402::PAYMENT_SIGNATURE)
        .and_then(|v| v.to_str().ok())?;
    match x402::parse_payment_header(sig) {
        Ok(Presented::V1(_)) => Some("invalid_x402_version"),
        // Malformed payloads are refused by the payments' own checks.
        _ => None,
    }
}

/// The body, at most [`MAX_BODY_BYTES`]: 413 past it, 400 when it stops
/// arriving (the server's body-read timeout) or breaks off.
async fn read_body(body: Body) -> Result<Vec<u8>, Response> {
    use axum::body::HttpBody as _;
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|_| {
            bad(
                "body_unreadable",
                "the request body could not be read in time",
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_BODY_BYTES {
                return Err(too_large("body_too_large", "the request body is too large"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

async fn execute(
    State(x): State<CodeExec>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large("body_too_large", "the request body is too large");
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req = match parse(x.inner.pool.config(), &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(price) = x.quote(req.size, req.timeout) else {
        return internal("price overflow");
    };
    let p = &x.inner.payments;
    let offer = p.offer(
        &headers,
        &uri,
        price,
        &format!(
            "Execute {} code ({})",
            req.stack.as_str(),
            req.size.as_str()
        ),
    );
    if let Some(why) = not_v2(&headers) {
        return challenge(p, &offer, why);
    }
    let reference = format!("exec-{}", uuid::Uuid::new_v4());
    let parts = RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let charge = match p.open_charge(&parts, &offer, &reference).await {
        Ok(c) => c,
        Err(ChargeRefused::PaymentRequired) => {
            return challenge(p, &offer, "PAYMENT-SIGNATURE header is required")
        }
        Err(ChargeRefused::Refused(e)) => return refused(p, &offer, &e),
    };
    let task = tokio::spawn(run_charged(x.clone(), charge, req, offer));
    match task.await {
        Ok(r) => r,
        Err(e) => internal(format!("the execution task ended: {e}")),
    }
}

/// Keep a credit hold's lease alive while its run lasts (runs may outlive
/// a lease; a lapsed hold would be released under the run).
fn renew_lease(payments: &Payments, charge: &Charge) -> Option<tokio::task::JoinHandle<()>> {
    let hold = charge.hold()?.clone();
    let store = payments.store().clone();
    let every = (store.hold_lease() / 3).max(Duration::from_millis(200));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = store.renew_holds(std::slice::from_ref(&hold)).await {
                tracing::warn!(error = %e, hold = %hold.0, "could not renew an execution's credit hold");
            }
        }
    }))
}

async fn run_charged(x: CodeExec, charge: Charge, req: ExecRequest, offer: Offer) -> Response {
    let permit = match x.inner.pool.acquire().await {
        Ok(p) => p,
        Err(SandboxError::Busy) => {
            charge.release().await;
            return busy(x.retry_after());
        }
        Err(e) => {
            charge.release().await;
            return internal(e);
        }
    };
    let renewing = renew_lease(&x.inner.payments, &charge);
    let (stack, size) = (req.stack, req.size);
    let outcome = permit.run(req).await;
    if let Some(r) = renewing {
        r.abort();
    }
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            charge.release().await;
            return match e {
                SandboxError::Busy => busy(x.retry_after()),
                SandboxError::Invalid(m) => bad("invalid_request", &m),
                e => internal(e),
            };
        }
    };
    if o.timed_out {
        charge.release().await;
        let mut r = error_response(
            StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            "execution_timeout",
            "the program ran out of time and was stopped; nothing was charged",
        );
        if let Ok(v) = HeaderValue::from_str(&o.sandbox_id) {
            r.headers_mut()
                .insert(HeaderName::from_static("x-sandbox-id"), v);
        }
        return r;
    }
    let method = charge.method();
    match charge.settle(offer.price).await {
        Ok(receipt) => {
            tracing::info!(
                sandbox = %o.sandbox_id,
                method,
                charged = receipt.charged.0,
                exit_code = o.exit_code,
                ms = o.execution_time_ms,
                "code executed"
            );
            let mut resp = Json(answer(&o, stack, size)).into_response();
            resp.headers_mut().extend(receipt.headers);
            resp
        }
        // The result is withheld: nothing was taken.
        Err(e) => refused(&x.inner.payments, &offer, &e),
    }
}

/// The 200 body.
fn answer(o: &ExecOutcome, stack: Stack, size: Size) -> Value {
    let files: Map<String, Value> = o
        .files
        .iter()
        .map(|(n, b)| (n.clone(), Value::String(STANDARD.encode(b))))
        .collect();
    json!({
        "stdout": o.stdout,
        "stderr": o.stderr,
        "exit_code": o.exit_code,
        "execution_time_ms": o.execution_time_ms,
        "files": files,
        "stack": stack.as_str(),
        "size": size.as_str(),
        "sandbox_id": o.sandbox_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<ExecRequest, Response>) -> StatusCode {
        match r {
            Ok(_) => StatusCode::OK,
            Err(r) => r.status(),
        }
    }

    #[test]
    fn validation() {
        // Never run here: only its limits are read.
        let p = SandboxConfig::new("/nonexistent");
        let ok = parse(&p, br#"{"code": "print(1)"}"#).unwrap();
        assert_eq!((ok.stack, ok.size), (Stack::Python, Size::Small));
        assert_eq!(ok.timeout, Duration::from_secs(30));
        let clamped = parse(
            &p,
            br#"{"code": "x", "size": "med", "timeout_seconds": 99999}"#,
        )
        .unwrap();
        assert_eq!(clamped.timeout, Duration::from_secs(600));
        let files = parse(
            &p,
            br#"{"code": "x", "stack": "node", "files": {"a/b.txt": "aGk=", "c": "aGk"}}"#,
        )
        .unwrap();
        assert_eq!(files.files.len(), 2);
        assert!(files.files.iter().all(|(_, b)| b == b"hi"));
        for (body, want) in [
            (&br#"{"stack": "python"}"#[..], StatusCode::BAD_REQUEST),
            (br#"{"code": ""}"#, StatusCode::BAD_REQUEST),
            (br#"{"code": 5}"#, StatusCode::BAD_REQUEST),
            (
                br#"{"code": "x", "stack": "ruby"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (br#"{"code": "x", "size": "huge"}"#, StatusCode::BAD_REQUEST),
            (
                br#"{"code": "x", "timeout_seconds": 0}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"code": "x", "timeout_seconds": 1.5}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"code": "x", "files": {"../x": "aGk="}}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"code": "x", "files": {"main.py": "aGk="}}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"code": "x", "files": {"a": "***"}}"#,
                StatusCode::BAD_REQUEST,
            ),
            (br#"{"code": "x", "files": []}"#, StatusCode::BAD_REQUEST),
            (br#"[1]"#, StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(
                status(parse(&p, body)),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let big = json!({"code": "#".repeat(MAX_CODE_BYTES + 1)}).to_string();
        assert_eq!(
            status(parse(&p, big.as_bytes())),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let just = json!({"code": "#".repeat(MAX_CODE_BYTES)}).to_string();
        assert_eq!(status(parse(&p, just.as_bytes())), StatusCode::OK);
        let half = STANDARD.encode(vec![0u8; MAX_FILES_BYTES / 2 + 1]);
        let two = json!({"code": "x", "files": {"a": half, "b": half}}).to_string();
        assert_eq!(
            status(parse(&p, two.as_bytes())),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(two.len() < MAX_BODY_BYTES);
    }
}
