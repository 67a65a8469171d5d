//! `sgl proxy`: a local OpenAI-compatible server that makes every plain chat
//! request from an unmodified client (the OpenAI SDKs, litellm, curl) end to
//! end sealed. For each request it reserves a node (§5.1), verifies the
//! node's evidence with this machine's policy and pinned roots (§7b, as
//! `sgl chat --verify-evidence` does), seals the request to the node's key
//! (§3.4), sends it through the coordinator, verifies every result signature
//! and opens the reply (§3.5, §3.6), and answers in OpenAI's shapes:
//! `chat.completion`, or `chat.completion.chunk` SSE for a stream.
//!
//! The coordinator sees only ciphertext. Nothing ever falls back to plain
//! mode: evidence that fails the policy, a signature that does not verify
//! or a reply that does not open is a 502 (or an SSE `error` event once a
//! stream has begun), never text the node did not provably write.
//!
//! It holds the caller's grid credentials (an API key or a wallet), so it
//! is meant for loopback only; the command refuses other addresses. The
//! `Authorization` a local client sends is ignored.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{ChatOutcome, ClientError, EvidencePolicy, GridClient, SealedReply, MAX_REPLY_BYTES};
use crate::proto::api::ReserveRequest;
use crate::proto::job::JobPayload;
use crate::proto::openai::{
    AssistantMessage, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Choice,
    ErrorResponse, FinishReason, InvalidRequest, Usage,
};
use crate::proto::{b58, e2e, routes};

/// Default cap on a request body: the protocol's cap on a chat's messages
/// (4 MiB), which a sealed request cannot exceed anyway.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Room in the sealed payload for what the proxy adds to the client's
/// request (the stream nonce and its key), in bytes.
const PAYLOAD_SLACK: usize = 64;

/// Response headers naming what answered: the node, its job, and the
/// evidence format this machine verified.
const NODE_HEADER: HeaderName = HeaderName::from_static("x-sgl-node-id");
const JOB_HEADER: HeaderName = HeaderName::from_static("x-sgl-job-id");
const EVIDENCE_HEADER: HeaderName = HeaderName::from_static("x-sgl-evidence");
const POLICY_HEADER: HeaderName = HeaderName::from_static("x-sgl-evidence-policy");

/// What a reservation asks for when the request does not say: a request may
/// still name `node`, `max_price` and `require_attestation` itself (the
/// coordinator's plain-mode extensions, §5.4, §7c).
#[derive(Debug, Clone, Default)]
pub struct RouteDefaults {
    pub node: Option<String>,
    /// Highest blended price, USD per 1M tokens (§5.5).
    pub max_price: Option<f64>,
    /// `"hardware"` to reserve only nodes with verified hardware evidence.
    pub require_attestation: Option<String>,
}

/// The proxy's state: one grid client (its credentials and connection
/// pool), the evidence policy every node must pass, routing defaults.
pub struct Proxy {
    client: GridClient,
    evidence: EvidencePolicy,
    defaults: RouteDefaults,
}

impl Proxy {
    pub fn new(client: GridClient, evidence: EvidencePolicy, defaults: RouteDefaults) -> Self {
        Proxy {
            client,
            evidence,
            defaults,
        }
    }
}

/// Why the proxy refused or failed a request; each answers as an OpenAI
/// error body with its status ([`ProxyError::status`]).
#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("cannot read the body: {0}")]
    Body(String),
    #[error("the request body is larger than this proxy accepts (--max-body-bytes)")]
    BodyTooLarge,
    #[error("invalid JSON body: {0}")]
    Json(String),
    #[error("model is required")]
    NoModel,
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(
        "the prompt is too large: its sealed form would exceed {} base58 characters",
        e2e::MAX_CIPHERTEXT_CHARS
    )]
    TooLarge,
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(String),
    /// The coordinator refused; its body is passed on when it is an OpenAI
    /// error, which all of its refusals are.
    #[error("the coordinator answered {status}: {body}")]
    Coordinator { status: u16, body: String },
    #[error("the node's evidence does not pass this machine's policy; nothing was sent: {0}")]
    Evidence(String),
    #[error("the node's reply failed verification and was discarded: {0}")]
    Verification(String),
    #[error("the node's answer was aborted: {0}")]
    Aborted(String),
    #[error("the wallet refused to pay: {0}")]
    Payment(String),
}

/// Where a [`ClientError`] happened decides what it means to the caller.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Reserving a node, sending the sealed request, reading the reply.
    Grid,
    /// Fetching and verifying the node's evidence: any failure there means
    /// the node is not trusted, whatever its cause.
    Evidence,
}

impl ProxyError {
    fn from_client(e: ClientError, stage: Stage) -> Self {
        if let Stage::Evidence = stage {
            return ProxyError::Evidence(e.to_string());
        }
        match e {
            ClientError::Http(e) => ProxyError::Unreachable(e.to_string()),
            ClientError::Status { status, body } => ProxyError::Coordinator { status, body },
            ClientError::Proto(e) => ProxyError::Verification(e.to_string()),
            ClientError::Protocol(m) => ProxyError::Verification(m),
            ClientError::Aborted(data) => ProxyError::Aborted(aborted_message(&data)),
            ClientError::Payment(m) => ProxyError::Payment(m),
            ClientError::Unsupported(m) => ProxyError::Verification(m),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Body(_) | ProxyError::Json(_) | ProxyError::NoModel => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Invalid(_) => {
                StatusCode::from_u16(InvalidRequest::STATUS).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::BodyTooLarge | ProxyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Coordinator { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ProxyError::Unreachable(_)
            | ProxyError::Evidence(_)
            | ProxyError::Verification(_)
            | ProxyError::Aborted(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Payment(_) => StatusCode::PAYMENT_REQUIRED,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> ErrorResponse {
        let (kind, code) = match self {
            ProxyError::Body(_) => ("invalid_request_error", "invalid_body"),
            ProxyError::BodyTooLarge | ProxyError::TooLarge => {
                ("invalid_request_error", "request_too_large")
            }
            ProxyError::Json(_) => ("invalid_request_error", "invalid_json"),
            ProxyError::NoModel => ("invalid_request_error", "invalid_request"),
            ProxyError::Invalid(e) => return e.to_response(),
            ProxyError::Coordinator { status, body } => {
                if let Some(e) = coordinator_error(body) {
                    return e;
                }
                if *status >= 500 {
                    ("server_error", "coordinator_error")
                } else {
                    ("invalid_request_error", "coordinator_error")
                }
            }
            ProxyError::Unreachable(_) => ("server_error", "coordinator_unreachable"),
            ProxyError::Evidence(_) => ("server_error", "evidence_rejected"),
            ProxyError::Verification(_) => ("server_error", "verification_failed"),
            ProxyError::Aborted(_) => ("server_error", "stream_aborted"),
            ProxyError::Payment(_) => ("invalid_request_error", "payment_refused"),
        };
        ErrorResponse::new(self.to_string(), kind, code)
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

/// The coordinator's own OpenAI error body, when `body` is one.
fn coordinator_error(body: &str) -> Option<ErrorResponse> {
    serde_json::from_str::<ErrorResponse>(body).ok()
}

/// The message of an aborted stream's `error` event, else its data as sent.
fn aborted_message(data: &str) -> String {
    serde_json::from_str::<ErrorResponse>(data)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| data.chars().take(500).collect())
}

/// The routes. Every error leaves as OpenAI JSON: an unknown route is 404
/// `not_supported`, and what axum answers on its own (a wrong method) is
/// rewritten by [`json_edge`].
pub fn router(proxy: Arc<Proxy>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(routes::CHAT_COMPLETIONS, post(chat_completions))
        .route(routes::MODELS, get(models))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .fallback(not_supported)
        .layer(axum::middleware::map_response(
            crate::http::openai_json_edge,
        ))
        .with_state(proxy)
}

/// Serve on `listener` until `shutdown` resolves, then finish the requests
/// in flight.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    max_body_bytes: usize,
    limits: crate::http::ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::new(proxy), max_body_bytes);
    crate::http::serve(listener, app, limits, shutdown).await
}

fn error(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorResponse::new(message, kind, code))).into_response()
}

async fn not_supported(method: Method, uri: Uri) -> Response {
    let path: String = uri.path().chars().take(128).collect();
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_supported",
        format!("{method} {path} is not served by sgl proxy; it serves POST /v1/chat/completions and GET /v1/models"),
    )
}

/// `GET /v1/models`: the coordinator's list as it answers it (public, and
/// nothing in it is secret).
async fn models(State(proxy): State<Arc<Proxy>>, RawQuery(query): RawQuery) -> Response {
    match proxy.client.get_passthrough(routes::MODELS, query).await {
        Ok((status, content_type, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut resp = (status, body).into_response();
            if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp
        }
        Err(e) => ProxyError::from_client(e, Stage::Grid).into_response(),
    }
}

impl GridClient {
    /// A GET of the coordinator's `path`, answered as it came: status,
    /// content type and body (at most [`MAX_REPLY_BYTES`]).
    async fn get_passthrough(
        &self,
        path: &str,
        query: Option<String>,
    ) -> Result<(u16, Option<String>, Bytes), ClientError> {
        let mut url = format!("{}{path}", self.base);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(&q);
        }
        let mut req = self.http.get(url);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
        {
            return Err(ClientError::Protocol("reply too large".into()));
        }
        let body = resp.bytes().await?;
        if body.len() > MAX_REPLY_BYTES {
            return Err(ClientError::Protocol("reply too large".into()));
        }
        Ok((status, content_type, body))
    }
}

/// What the evidence check found, for the response headers.
struct Checked {
    node_id: String,
    format: &'static str,
    policy_digest: String,
}

impl Checked {
    fn headers(&self, job_id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |name: HeaderName, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        put(NODE_HEADER, &self.node_id);
        put(EVIDENCE_HEADER, self.format);
        put(POLICY_HEADER, &self.policy_digest);
        if !job_id.is_empty() {
            put(JOB_HEADER, job_id);
        }
        h
    }
}

async fn chat_completions(
    State(proxy): State<Arc<Proxy>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(&proxy, body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(status = e.status().as_u16(), error = %e, "request refused");
            e.into_response()
        }
    }
}

async fn chat(proxy: &Proxy, body: Result<Bytes, BytesRejection>) -> Result<Response, ProxyError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ProxyError::BodyTooLarge
        } else {
            ProxyError::Body(e.body_text())
        }
    })?;
    let req: ChatCompletionRequest =
        serde_json::from_slice(&body).map_err(|e| ProxyError::Json(e.to_string()))?;
    // The one check every client-facing server runs, so a body the grid
    // would refuse is refused here alike, before a node is reserved.
    req.validate()?;
    if req.model.is_empty() {
        return Err(ProxyError::NoModel);
    }
    // The proxy relays one stream of text: several choices or logprobs are
    // served in JSON only.
    let choices = req.choice_params();
    if req.is_stream() && req.wants_structured_reply() {
        let param = if choices.n > 1 {
            "n"
        } else if choices.logprobs.is_some() {
            "logprobs"
        } else {
            "tools"
        };
        return Err(InvalidRequest::Unsupported {
            param,
            accepted: "1 completion without logprobs or tools when streaming through sgl proxy",
        }
        .into());
    }
    let max_tokens = req.effective_max_tokens();
    let mut payload = JobPayload::from_openai(&req, max_tokens, None);
    payload.stream = req.is_stream().then_some(true);
    let plain_len = serde_json::to_vec(&payload)
        .map_err(|e| ProxyError::Json(e.to_string()))?
        .len();
    if b58::max_encoded_len(plain_len + PAYLOAD_SLACK + e2e::MIN_BLOB_LEN)
        > e2e::MAX_CIPHERTEXT_CHARS
    {
        return Err(ProxyError::TooLarge);
    }

    let res = proxy
        .client
        .reserve_with(&reservation(&req, &proxy.defaults))
        .await
        .map_err(|e| ProxyError::from_client(e, Stage::Grid))?;
    // Fail closed before anything is sealed: a node whose evidence does not
    // pass this machine's policy never receives the prompt.
    let verdict = proxy
        .client
        .verify_node_evidence(&res, &proxy.evidence)
        .await
        .map_err(|e| ProxyError::from_client(e, Stage::Evidence))?;
    let checked = Checked {
        node_id: res.node_id.clone(),
        format: verdict.format.as_str(),
        policy_digest: verdict.policy_digest.clone(),
    };
    tracing::info!(node_id = %res.node_id, evidence = checked.format, "node reserved, evidence verified");
    let reply = proxy
        .client
        .send_sealed(&res, &req.model, payload)
        .await
        .map_err(|e| ProxyError::from_client(e, Stage::Grid))?;
    if req.is_stream() {
        stream_response(reply, checked, &req, max_tokens).await
    } else {
        let out = reply
            .open(|_, _| {})
            .await
            .map_err(|e| ProxyError::from_client(e, Stage::Grid))?;
        Ok(json_response(out, checked, &req.model, max_tokens))
    }
}

/// The reservation for `req`: its own routing fields, else the defaults.
fn reservation(req: &ChatCompletionRequest, defaults: &RouteDefaults) -> ReserveRequest {
    let text = |k: &str| req.extra.get(k).and_then(Value::as_str).map(String::from);
    ReserveRequest {
        model: Some(req.model.clone()),
        node: text("node").or_else(|| defaults.node.clone()),
        max_price: req
            .extra
            .get("max_price")
            .and_then(Value::as_f64)
            .or(defaults.max_price),
        require_attestation: text("require_attestation")
            .or_else(|| defaults.require_attestation.clone()),
        // Only a node that implements every parameter is given the prompt.
        features: crate::proto::features::required(req)
            .into_iter()
            .map(String::from)
            .collect(),
        ..Default::default()
    }
}

/// OpenAI's `finish_reason`: the node's word when it gave one, else
/// `length` when the budget was used up (as the coordinator's plain mode).
fn finish_reason(reported: Option<&str>, usage: Option<Usage>, max_tokens: u64) -> FinishReason {
    match reported {
        Some("length") => FinishReason::Length,
        Some("stop") => FinishReason::Stop,
        Some("tool_calls") => FinishReason::ToolCalls,
        _ if usage.is_some_and(|u| u.completion_tokens >= max_tokens) => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

fn now_secs() -> u64 {
    crate::clock::Clock::system().now_secs()
}

fn json_response(out: ChatOutcome, checked: Checked, model: &str, max_tokens: u64) -> Response {
    tracing::info!(job_id = %out.job_id, usage_signed = out.usage_signed, "answered");
    let body = ChatCompletionResponse {
        id: format!("chatcmpl-{}", out.job_id),
        object: "chat.completion".into(),
        created: now_secs(),
        model: model.to_string(),
        // Every choice the node sent when the request asked for `n` or
        // `logprobs`; else the one answer.
        choices: if !out.choices.is_empty() {
            out.choices
        } else {
            vec![Choice {
                index: 0,
                message: AssistantMessage::text(out.content),
                logprobs: None,
                finish_reason: Some(finish_reason(
                    out.finish_reason.as_deref(),
                    out.usage,
                    max_tokens,
                )),
            }]
        },
        usage: out.usage,
        usage_signature: None,
        refunded_micros: None,
    };
    (checked.headers(&out.job_id), Json(body)).into_response()
}

/// What the task reading a sealed stream hands the response.
enum Piece {
    /// Verified, opened text of the job.
    Delta { job_id: String, text: String },
    /// The end: the whole outcome, or why the stream failed.
    End(Result<ChatOutcome, ClientError>),
}

/// Aborts the reading task when the response is dropped (the client went
/// away), which drops the coordinator connection too.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The OpenAI stream of a sealed reply. The first piece is awaited before
/// the response starts, so a reply that fails at once (a bad signature, an
/// abort before any output) is still a JSON error with its status; a later
/// failure is an SSE `error` event, and the client must discard what it got.
async fn stream_response(
    reply: SealedReply,
    checked: Checked,
    req: &ChatCompletionRequest,
    max_tokens: u64,
) -> Result<Response, ProxyError> {
    // Unbounded is bounded here: the reader refuses a reply over
    // MAX_REPLY_BYTES, and each piece is text it has read.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let sender = &tx;
        let end = reply
            .open(|job_id, text| {
                if !text.is_empty() {
                    let _ = sender.send(Piece::Delta {
                        job_id: job_id.to_string(),
                        text: text.to_string(),
                    });
                }
            })
            .await;
        let _ = tx.send(Piece::End(end));
    });
    let guard = AbortOnDrop(task);
    let first = match rx.recv().await {
        Some(Piece::End(Err(e))) => return Err(ProxyError::from_client(e, Stage::Grid)),
        Some(p) => p,
        None => return Err(ProxyError::Verification("the reply reader stopped".into())),
    };
    let job_id = match &first {
        Piece::Delta { job_id, .. } => job_id.clone(),
        Piece::End(Ok(out)) => out.job_id.clone(),
        Piece::End(Err(_)) => String::new(),
    };
    let headers = checked.headers(&job_id);
    let state = StreamState {
        rx,
        pending: Some(first),
        _guard: guard,
        id: format!("chatcmpl-{job_id}"),
        created: now_secs(),
        model: req.model.clone(),
        include_usage: req.include_usage(),
        max_tokens,
        started: false,
        done: false,
    };
    let events = stream::unfold(state, |mut st| async move {
        let events = st.next_events().await?;
        Some((stream::iter(events), st))
    })
    .flatten()
    .map(Ok::<_, Infallible>);
    Ok((headers, Sse::new(events)).into_response())
}

struct StreamState {
    rx: mpsc::UnboundedReceiver<Piece>,
    pending: Option<Piece>,
    _guard: AbortOnDrop,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    max_tokens: u64,
    started: bool,
    done: bool,
}

fn data(chunk: &ChatCompletionChunk) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

impl StreamState {
    /// The events for the next piece; `None` once the stream has ended.
    async fn next_events(&mut self) -> Option<Vec<Event>> {
        if self.done {
            return None;
        }
        let (id, created, model) = (&self.id, self.created, self.model.as_str());
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            events.push(data(&ChatCompletionChunk::role(id, created, model)));
        }
        let piece = match self.pending.take() {
            Some(p) => Some(p),
            None => self.rx.recv().await,
        };
        match piece {
            Some(Piece::Delta { text, .. }) => {
                events.push(data(&ChatCompletionChunk::content(
                    id, created, model, &text,
                )));
            }
            Some(Piece::End(Ok(out))) => {
                tracing::info!(job_id = %out.job_id, usage_signed = out.usage_signed, "streamed");
                let reason =
                    finish_reason(out.finish_reason.as_deref(), out.usage, self.max_tokens);
                events.push(data(&ChatCompletionChunk::finish(
                    id, created, model, reason,
                )));
                if let (true, Some(u)) = (self.include_usage, out.usage) {
                    events.push(data(&ChatCompletionChunk::usage(id, created, model, u)));
                }
                events.push(Event::default().data("[DONE]"));
                self.done = true;
            }
            Some(Piece::End(Err(e))) => {
                let e = ProxyError::from_client(e, Stage::Grid);
                tracing::info!(error = %e, "stream failed");
                events.push(error_event(&e));
                self.done = true;
            }
            None => {
                events.push(error_event(&ProxyError::Verification(
                    "the reply reader stopped".into(),
                )));
                self.done = true;
            }
        }
        Some(events)
    }
}

/// A failure after the stream began: `event: error` with the OpenAI error
/// body, which the OpenAI SDKs raise as an API error.
fn error_event(e: &ProxyError) -> Event {
    Event::default()
        .event("error")
        .data(serde_json::to_string(&e.body()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_refusals_pass_through_with_their_status() {
        let body = r#"{"error":{"message":"no node serves it","type":"invalid_request_error","code":"model_not_found"}}"#;
        let e = ProxyError::Coordinator {
            status: 404,
            body: body.into(),
        };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body().error.code.as_deref(), Some("model_not_found"));
        // A body that is not an OpenAI error is wrapped, never lost.
        let e = ProxyError::Coordinator {
            status: 503,
            body: "gateway down".into(),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body().error.kind, "server_error");
        assert!(e.body().error.message.contains("gateway down"));
    }

    #[test]
    fn a_reservation_names_the_features_the_request_needs() {
        let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "n": 2, "logprobs": true, "response_format": {"type": "json_object"}
        }))
        .unwrap();
        let r = reservation(&req, &RouteDefaults::default());
        assert_eq!(r.features, ["response_format", "n", "logprobs"]);
        let plain: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1
        }))
        .unwrap();
        let r = reservation(&plain, &RouteDefaults::default());
        assert!(r.features.is_empty());
        // Written only when there are some: an older coordinator sees the
        // body it knows.
        assert!(serde_json::to_value(&r).unwrap().get("features").is_none());
    }

    #[test]
    fn any_evidence_failure_is_a_502_that_says_so() {
        for cause in [
            ClientError::Protocol("the node's evidence does not verify: sim key".into()),
            ClientError::Status {
                status: 404,
                body: "{}".into(),
            },
        ] {
            let e = ProxyError::from_client(cause, Stage::Evidence);
            assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(e.body().error.code.as_deref(), Some("evidence_rejected"));
        }
    }

    #[test]
    fn a_reply_that_does_not_verify_is_a_502() {
        let e = ProxyError::from_client(
            ClientError::Proto(crate::proto::ProtoError::Missing("sig")),
            Stage::Grid,
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e.body().error.code.as_deref(), Some("verification_failed"));
        let e = ProxyError::from_client(
            ClientError::Aborted(
                r#"{"error":{"message":"node vanished","type":"server_error","code":"stream_aborted"}}"#
                    .into(),
            ),
            Stage::Grid,
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.to_string().contains("node vanished"), "{e}");
    }

    #[test]
    fn routing_fields_of_the_request_win_over_the_defaults() {
        let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_price": 2.5
        }))
        .unwrap();
        let defaults = RouteDefaults {
            node: Some("n1".into()),
            max_price: Some(1.0),
            require_attestation: Some("hardware".into()),
        };
        let r = reservation(&req, &defaults);
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.node.as_deref(), Some("n1"));
        assert_eq!(r.max_price, Some(2.5));
        assert_eq!(r.require_attestation.as_deref(), Some("hardware"));
    }

    #[test]
    fn finish_reason_follows_the_node_then_the_budget() {
        let u = Some(Usage::new(3, 8));
        assert_eq!(finish_reason(Some("stop"), u, 8), FinishReason::Stop);
        assert_eq!(finish_reason(None, u, 8), FinishReason::Length);
        assert_eq!(finish_reason(None, u, 9), FinishReason::Stop);
        assert_eq!(finish_reason(None, None, 9), FinishReason::Stop);
    }
}
