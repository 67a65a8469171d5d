//! Plain OpenAI mode (PROTOCOL.md §5.4): a standard chat request, routed as a
//! reservation would be, which the coordinator seals to the node on the
//! caller's behalf, then opens and answers as `chat.completion` or
//! `chat.completion.chunk` SSE. Not end to end: the coordinator sees the text.
//! A node that fails before any output is replaced once by another.

use std::time::Duration;

use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::billing;
use super::error::ClientError;
use super::job::JobEvent;
use super::relay::{self, data, done_marker, sse, PlainStream};
use super::router::{choose_node, dispatch};
use super::state::Grid;
use crate::payments::RequestParts;
use crate::proto::api::{ReserveRequest, SealedInputPayload, SealedReplyPlaintext};
use crate::proto::e2e::{self, ResponseKey};
use crate::proto::identity::{NodeId, X25519Public};
use crate::proto::job::JobPayload;
use crate::proto::openai::{
    AssistantMessage, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Choice,
    FinishReason, Usage,
};

/// The one check of a client's request (shared with the node's local
/// server), plus what routing needs: a model. Returns the completion budget.
fn validate(req: &ChatCompletionRequest) -> Result<u64, ClientError> {
    if req.model.is_empty() {
        return Err(ClientError::invalid("invalid_request", "model is required"));
    }
    req.validate()?;
    Ok(req.effective_max_tokens())
}

/// The most base58 characters the sealed form of `plaintext_len` bytes takes.
fn max_sealed_chars(plaintext_len: usize) -> usize {
    crate::proto::b58::max_encoded_len(plaintext_len.saturating_add(e2e::MIN_BLOB_LEN))
}

/// 413: the prompt is larger than a node accepts.
pub(super) fn too_large() -> ClientError {
    ClientError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
        format!(
            "the prompt is too large: its sealed form would exceed {} base58 characters",
            e2e::MAX_CIPHERTEXT_CHARS
        ),
    )
}

struct Dispatched {
    job_id: String,
    model: String,
    rx: mpsc::Receiver<JobEvent>,
    key: ResponseKey,
    nonce: Option<String>,
    first: JobEvent,
}

/// Route, seal and dispatch; wait for the first event. A node that fails
/// before any output is excluded and the request tried once more elsewhere.
/// A bound on the prompt's tokens: a token covers at least one byte, plus
/// the chat template's few tokens per message and what it adds once
/// ([`super::pricing::TEMPLATE_TOKENS`]).
fn prompt_bound(req: &ChatCompletionRequest) -> u64 {
    req.messages
        .iter()
        .map(|m| (m.role.len() + m.content.text().len()) as u64 + 16)
        .sum::<u64>()
        .saturating_add(super::pricing::TEMPLATE_TOKENS)
}

enum Attempt {
    Sent(Box<Dispatched>, NodeId),
    /// Billing refused (402, 401): answer this.
    Refused(Response),
}

async fn run_once(
    grid: &Grid,
    http: &RequestParts<'_>,
    req: &ChatCompletionRequest,
    max_tokens: u64,
    exclude: Option<NodeId>,
) -> Result<Attempt, ClientError> {
    let route = ReserveRequest {
        model: Some(req.model.clone()),
        node: req
            .extra
            .get("node")
            .and_then(Value::as_str)
            .map(String::from),
        max_price: req.extra.get("max_price").and_then(Value::as_f64),
        require_attestation: req
            .extra
            .get("require_attestation")
            .and_then(Value::as_str)
            .map(String::from),
        ..Default::default()
    };
    let (node_id, x25519, streams, price) = {
        let inner = grid.lock();
        let node_id = choose_node(grid, &inner, &route, &req.model, exclude)?;
        let node = inner
            .node(&node_id)
            .ok_or_else(|| ClientError::internal("chosen node vanished"))?;
        let x: X25519Public = node
            .x25519
            .ok_or_else(|| ClientError::internal("chosen node has no key"))?;
        (
            node_id,
            x,
            node.capabilities.streaming,
            grid.effective_price(node, &req.model),
        )
    };
    let nonce = (req.is_stream() && streams).then(e2e::random_request_nonce);
    let inner = JobPayload::from_openai(req, max_tokens, nonce.as_deref());
    let inner = serde_json::to_vec(&inner).map_err(ClientError::internal)?;
    // Sizes before work (§7f): a prompt whose sealed form the node would
    // refuse is refused here, before any base58 and before billing.
    if max_sealed_chars(inner.len()) > e2e::MAX_CIPHERTEXT_CHARS {
        return Err(too_large());
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    let quote = price.cost(prompt_bound(req), max_tokens);
    let bill = match billing::authorize(grid, http, price, quote, &job_id).await {
        Ok(b) => b,
        Err(resp) => return Ok(Attempt::Refused(resp)),
    };
    // Sealing encodes base58, whose cost grows with the square of the
    // length: off the async threads, so other clients are not held up.
    let sealed = tokio::task::spawn_blocking(move || e2e::seal_input(&x25519, &inner)).await;
    let (enc, key) = match sealed {
        Ok(Ok(sealed)) => sealed,
        Ok(Err(e)) => {
            bill.release().await;
            return Err(ClientError::internal(e));
        }
        Err(e) => {
            bill.release().await;
            return Err(ClientError::internal(e));
        }
    };
    let payload = SealedInputPayload {
        enc,
        stream: nonce.is_some().then_some(true),
        max_tokens_cap: Some(max_tokens),
    };
    let payload = serde_json::to_value(payload).map_err(ClientError::internal)?;
    let mut rx = dispatch(
        grid,
        &job_id,
        node_id,
        &req.model,
        payload,
        nonce.is_some(),
        bill,
        false,
    );
    tracing::info!(%job_id, %node_id, stream = nonce.is_some(), "plain job dispatched");
    let wait = grid.config.stuck_job_timeout + Duration::from_secs(5);
    let first = tokio::time::timeout(wait, rx.recv())
        .await
        .map_err(|_| ClientError::node_timeout())?;
    let first = first.unwrap_or(JobEvent::Failed("the job ended without a result".into()));
    Ok(Attempt::Sent(
        Box::new(Dispatched {
            job_id,
            model: req.model.clone(),
            rx,
            key,
            nonce,
            first,
        }),
        node_id,
    ))
}

pub async fn chat(
    grid: Grid,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    req: ChatCompletionRequest,
) -> Result<Response, ClientError> {
    let max_tokens = validate(&req)?;
    let http = RequestParts {
        method,
        uri,
        headers,
        body,
    };
    let (mut d, node_id) = match run_once(&grid, &http, &req, max_tokens, None).await? {
        Attempt::Sent(d, n) => (*d, n),
        Attempt::Refused(resp) => return Ok(resp),
    };
    if let JobEvent::Failed(why) = &d.first {
        tracing::warn!(job_id = %d.job_id, why = %why, "node failed before any output; retrying on another node");
        match run_once(&grid, &http, &req, max_tokens, Some(node_id)).await {
            Ok(Attempt::Sent(again, _)) => d = *again,
            Ok(Attempt::Refused(resp)) => return Ok(resp),
            Err(_) => return Err(ClientError::node_failed(format!("the node failed: {why}"))),
        }
    }
    let created = grid.config.clock.now_secs();
    let id = format!("chatcmpl-{}", d.job_id);
    match d.first {
        // The coordinator sealed this input itself: a node that cannot open
        // it has failed.
        JobEvent::Failed(why) | JobEvent::BadInput(why) => {
            Err(ClientError::node_failed(format!("the node failed: {why}")))
        }
        JobEvent::Complete(done, receipt) => {
            let sealed = done
                .sealed_result
                .ok_or_else(|| ClientError::node_failed("the node answered in plain"))?;
            // Opening decodes base58: off the async threads.
            let key = d.key;
            let plain = tokio::task::spawn_blocking(move || key.open_output(&sealed))
                .await
                .map_err(ClientError::internal)?
                .map_err(|e| ClientError::node_failed(format!("reply does not open: {e}")))?;
            let reply: SealedReplyPlaintext = serde_json::from_slice(&plain)
                .map_err(|e| ClientError::node_failed(format!("reply is not a result: {e}")))?;
            let finish = finish_reason(reply.finish_reason.as_deref(), reply.usage, max_tokens);
            if req.is_stream() {
                let events = vec![
                    ChatCompletionChunk::role(&id, created, &d.model),
                    ChatCompletionChunk::content(&id, created, &d.model, &reply.content),
                    ChatCompletionChunk::finish(&id, created, &d.model, finish),
                ];
                let usage = req
                    .include_usage()
                    .then(|| ChatCompletionChunk::usage(&id, created, &d.model, reply.usage));
                let all = events
                    .into_iter()
                    .chain(usage)
                    .map(|c| data(&c))
                    .collect::<Vec<_>>();
                let mut resp = sse(Box::pin(stream::iter(all).chain(done_marker())));
                resp.headers_mut().extend(receipt);
                return Ok(resp);
            }
            let body = ChatCompletionResponse {
                id,
                object: "chat.completion".into(),
                created,
                model: d.model,
                choices: vec![Choice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: reply.content,
                    },
                    finish_reason: Some(finish),
                }],
                usage: Some(reply.usage),
                usage_signature: done.usage_signature,
            };
            let mut resp = Json(body).into_response();
            resp.headers_mut().extend(receipt);
            Ok(resp)
        }
        JobEvent::Chunk(first) => {
            let nonce = d.nonce.clone().unwrap_or_default();
            let opener = d.key.stream_opener(&nonce).map_err(ClientError::internal)?;
            Ok(relay::plain(PlainStream {
                id,
                model: d.model,
                created,
                max_tokens,
                include_usage: req.include_usage(),
                opener,
                rx: d.rx,
                pending: Some(first),
                done: false,
            }))
        }
    }
}

pub(super) fn finish_reason(reported: Option<&str>, usage: Usage, max_tokens: u64) -> FinishReason {
    match reported {
        Some("length") => FinishReason::Length,
        Some("stop") => FinishReason::Stop,
        _ if usage.completion_tokens >= max_tokens => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}
