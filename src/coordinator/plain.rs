//! Plain OpenAI mode (PROTOCOL.md §5.4): a standard chat request, routed as a
//! reservation would be, which the coordinator seals to the node on the
//! caller's behalf, then opens and answers as `chat.completion` or
//! `chat.completion.chunk` SSE. Not end to end: the coordinator sees the text.
//! A node that fails before any output is replaced once by another.

use std::sync::Arc;
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
use crate::money::TokenPrice;
use crate::payments::RequestParts;
use crate::proto::api::{ReserveRequest, SealedInputPayload, SealedReplyPlaintext};
use crate::proto::e2e::{self, ResponseKey};
use crate::proto::features;
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
    node_id: NodeId,
    model: String,
    rx: mpsc::Receiver<JobEvent>,
    key: Arc<ResponseKey>,
    nonce: Option<String>,
    first: JobEvent,
}

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

/// A node's slot, held from the choice of the node until its job is
/// dispatched, so that concurrent requests spread over the nodes while
/// their payments settle.
struct SlotHold {
    grid: Grid,
    node_id: NodeId,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.grid.lock().release_slot(&self.node_id);
    }
}

/// The node chosen for a request.
struct Target {
    node_id: NodeId,
    x25519: X25519Public,
    streams: bool,
    price: TokenPrice,
    hold: SlotHold,
}

/// Choose a node for the request (not `exclude`) and hold its slot until
/// the job is dispatched.
fn pick(
    grid: &Grid,
    req: &ChatCompletionRequest,
    exclude: Option<NodeId>,
) -> Result<Target, ClientError> {
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
    let mut inner = grid.lock();
    let node_id = choose_node(
        grid,
        &inner,
        &route,
        &req.model,
        exclude,
        &features::required(req),
    )?;
    let node = inner
        .node(&node_id)
        .ok_or_else(|| ClientError::internal("chosen node vanished"))?;
    let x25519 = node
        .x25519
        .ok_or_else(|| ClientError::internal("chosen node has no key"))?;
    let streams = node.capabilities.streaming;
    let price = grid.effective_price(node, &req.model);
    inner.hold_slot(node_id);
    Ok(Target {
        node_id,
        x25519,
        streams,
        price,
        hold: SlotHold {
            grid: grid.clone(),
            node_id,
        },
    })
}

/// Seal the request to the target node, dispatch it as `job_id` with
/// `bill`, and wait for the first event. A job that fails before any
/// output hands `bill` back ([`JobEvent::Unstarted`]).
async fn send(
    grid: &Grid,
    req: &ChatCompletionRequest,
    job_id: &str,
    target: Target,
    bill: billing::JobBilling,
    max_tokens: u64,
) -> Result<Dispatched, ClientError> {
    let nonce = (req.is_stream() && target.streams).then(e2e::random_request_nonce);
    let x25519 = target.x25519;
    let sealed = async {
        let inner = JobPayload::from_openai(req, max_tokens, nonce.as_deref());
        let inner = serde_json::to_vec(&inner).map_err(ClientError::internal)?;
        // Sealing encodes base58, whose cost grows with the square of the
        // length: a long prompt is sealed off the async threads.
        let channel = grid.seal_channel(&x25519).map_err(ClientError::internal)?;
        let (enc, key) = crate::cpu::run(inner.len(), move || channel.seal(&inner))
            .await
            .map_err(ClientError::internal)?
            .map_err(ClientError::internal)?;
        let payload = SealedInputPayload {
            enc,
            stream: nonce.is_some().then_some(true),
            // The quote binds the node (§7f): the budget of all `n`
            // completions together.
            max_tokens_cap: Some(job_budget(req, max_tokens)),
        };
        let payload = serde_json::to_value(payload).map_err(ClientError::internal)?;
        Ok::<_, ClientError>((payload, key))
    }
    .await;
    let (payload, key) = match sealed {
        Ok(s) => s,
        Err(e) => {
            billing::close_unstarted(grid, job_id, target.node_id, &req.model, bill).await;
            return Err(e);
        }
    };
    // The job takes the slot the hold kept.
    drop(target.hold);
    let mut rx = dispatch(
        grid,
        job_id,
        target.node_id,
        &req.model,
        payload,
        nonce.is_some(),
        bill,
        false,
        true,
    );
    tracing::info!(%job_id, node_id = %target.node_id, stream = nonce.is_some(), "plain job dispatched");
    let wait = grid.config.stuck_job_timeout + Duration::from_secs(5);
    let first = tokio::time::timeout(wait, rx.recv())
        .await
        .map_err(|_| ClientError::node_timeout())?;
    let first = first.unwrap_or(JobEvent::Failed("the job ended without a result".into()));
    Ok(Dispatched {
        node_id: target.node_id,
        model: req.model.clone(),
        rx,
        key,
        nonce,
        first,
    })
}

/// Choose a node, take the payment (settled before dispatch, §7f), dispatch.
/// A node that fails before any output is excluded and the same job, paid
/// by the same payment, tried once more elsewhere.
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
    // Sizes before work (§7f): a prompt whose sealed form the node would
    // refuse is refused here, before any base58 and before billing. The
    // bound counts a stream nonce whether or not the node streams.
    let probe = JobPayload::from_openai(&req, max_tokens, Some(&e2e::random_request_nonce()));
    let probe_len = serde_json::to_vec(&probe)
        .map_err(ClientError::internal)?
        .len();
    if max_sealed_chars(probe_len) > e2e::MAX_CIPHERTEXT_CHARS {
        return Err(too_large());
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    let target = pick(&grid, &req, None)?;
    // `n` completions may each use the whole budget: the quote covers them
    // all, and the prompt once (they share it).
    let quote = target
        .price
        .cost(prompt_bound(&req), job_budget(&req, max_tokens));
    let bill = match billing::authorize(&grid, &http, target.price, quote, &job_id).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let receipt = bill.receipt.clone();
    let mut d = send(&grid, &req, &job_id, target, bill, max_tokens).await?;
    if let JobEvent::Unstarted(why, mut bill) = d.first {
        tracing::warn!(%job_id, why = %why, "node failed before any output; retrying on another node");
        let again = match pick(&grid, &req, Some(d.node_id)) {
            Ok(t) => t,
            Err(_) => {
                billing::close_unstarted(&grid, &job_id, d.node_id, &req.model, bill).await;
                return Err(ClientError::node_failed(format!("the node failed: {why}")));
            }
        };
        // The retry is billed at its node's price, within the same quote.
        bill.price = again.price;
        d = send(&grid, &req, &job_id, again, bill, max_tokens).await?;
        if let JobEvent::Unstarted(why, bill) = d.first {
            billing::close_unstarted(&grid, &job_id, d.node_id, &req.model, bill).await;
            return Err(ClientError::node_failed(format!("the node failed: {why}")));
        }
    }
    let created = grid.config.clock.now_secs();
    let id = format!("chatcmpl-{job_id}");
    match d.first {
        // The coordinator sealed this input itself: a node that cannot open
        // it has failed.
        JobEvent::Failed(why) | JobEvent::BadInput(why) | JobEvent::Unstarted(why, _) => {
            Err(ClientError::node_failed(format!("the node failed: {why}")))
        }
        JobEvent::Complete(done, billed) => {
            let refunded = billed.refunded.map(|m| m.0);
            let sealed = done
                .sealed_result
                .ok_or_else(|| ClientError::node_failed("the node answered in plain"))?;
            // Opening decodes base58: a long reply off the async threads.
            let key = d.key;
            let size = sealed.ciphertext.len();
            let plain = crate::cpu::run(size, move || key.open_output(&sealed))
                .await
                .map_err(ClientError::internal)?
                .map_err(|e| ClientError::node_failed(format!("reply does not open: {e}")))?;
            let reply: SealedReplyPlaintext = serde_json::from_slice(&plain)
                .map_err(|e| ClientError::node_failed(format!("reply is not a result: {e}")))?;
            let finish = finish_reason(reply.finish_reason.as_deref(), reply.usage, max_tokens);
            let choices = reply_choices(&req, reply.choices, reply.content, finish);
            if req.is_stream() {
                let mut all: Vec<ChatCompletionChunk> = Vec::new();
                for c in &choices {
                    let role = ChatCompletionChunk::role(&id, created, &d.model);
                    all.push(role.for_choice(c.index));
                    let text = ChatCompletionChunk::content(
                        &id,
                        created,
                        &d.model,
                        c.message.text_or_empty(),
                    );
                    all.push(text.for_choice(c.index).with_logprobs(c.logprobs.clone()));
                    if let Some(calls) = &c.message.tool_calls {
                        let deltas = calls.iter().zip(0u32..).map(|(t, i)| t.delta(i));
                        let chunk = ChatCompletionChunk::tool_calls(
                            &id,
                            created,
                            &d.model,
                            deltas.collect(),
                        );
                        all.push(chunk.for_choice(c.index));
                    }
                    let end = c.finish_reason.unwrap_or(finish);
                    all.push(
                        ChatCompletionChunk::finish(&id, created, &d.model, end)
                            .for_choice(c.index),
                    );
                }
                all.extend(
                    req.include_usage()
                        .then(|| ChatCompletionChunk::usage(&id, created, &d.model, reply.usage)),
                );
                // The refund rides on the last chunk before `[DONE]`.
                if let Some(last) = all.last_mut() {
                    last.refunded_micros = refunded;
                }
                let all = all.iter().map(data).collect::<Vec<_>>();
                let mut resp = sse(Box::pin(stream::iter(all).chain(done_marker())));
                resp.headers_mut().extend(receipt);
                resp.headers_mut().extend(billed.headers);
                return Ok(resp);
            }
            let body = ChatCompletionResponse {
                id,
                object: "chat.completion".into(),
                created,
                model: d.model,
                choices,
                usage: Some(reply.usage),
                usage_signature: done.usage_signature,
                refunded_micros: refunded,
            };
            let mut resp = Json(body).into_response();
            resp.headers_mut().extend(receipt);
            resp.headers_mut().extend(billed.headers);
            Ok(resp)
        }
        first @ (JobEvent::Chunk(_) | JobEvent::Final(..)) => {
            let nonce = d.nonce.clone().unwrap_or_default();
            let opener = d.key.stream_opener(&nonce).map_err(ClientError::internal)?;
            Ok(relay::plain(PlainStream {
                id,
                model: d.model,
                created,
                max_tokens,
                include_usage: req.include_usage(),
                choices: req.choice_params(),
                structured: req.wants_structured_reply(),
                opener,
                rx: d.rx,
                pending: Some(first),
                done: false,
                receipt,
            }))
        }
    }
}

/// The completion budget of a job: `max_tokens` for each of its `n`
/// completions. It is what the quote covers and the cap the node is held to.
fn job_budget(req: &ChatCompletionRequest, max_tokens: u64) -> u64 {
    max_tokens.saturating_mul(u64::from(req.choice_params().n))
}

/// The choices of a node's reply: every one it sent for a request that
/// asked for `n` or `logprobs`, else the one its `content` is.
fn reply_choices(
    req: &ChatCompletionRequest,
    sent: Option<Vec<Choice>>,
    content: String,
    finish: FinishReason,
) -> Vec<Choice> {
    match sent {
        Some(c) if req.wants_structured_reply() && !c.is_empty() => c,
        _ => vec![Choice {
            index: 0,
            message: AssistantMessage::text(content),
            logprobs: None,
            finish_reason: Some(finish),
        }],
    }
}

pub(super) fn finish_reason(reported: Option<&str>, usage: Usage, max_tokens: u64) -> FinishReason {
    match reported {
        Some("length") => FinishReason::Length,
        Some("stop") => FinishReason::Stop,
        Some("tool_calls") => FinishReason::ToolCalls,
        _ if usage.completion_tokens >= max_tokens => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}
