//! The client-facing API (PROTOCOL.md §5): reserve a node, then a sealed chat
//! call whose prompt and reply the coordinator relays without reading. Stream
//! chunks are relayed as SSE in `seq` order, each with the node's signature.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::billing::{self, JobBilling};
use super::error::ClientError;
use super::pricing::PerM;
use super::state::{Grid, Inner, Job, JobEvent, Reservation};
use crate::proto::api::{
    AttestationLevel, CapacityResponse, ChunkRequest, CompleteRequest, ReserveRequest,
    ReserveResponse, SealedChatRequest, SealedChatResponse, SealedSseChunk, TeeTypeCapacity,
};
use crate::proto::e2e::ALG_V2;
use crate::proto::envelope::ENVELOPE_VERSION;
use crate::proto::identity::NodeId;
use crate::proto::openai::{ModelEntry, ModelList};

/// Request bodies larger than this are refused (a sealed prompt is capped at
/// 512 KiB of b58; the rest is small).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body)
        .map_err(|e| ClientError::invalid("invalid_request", format!("invalid JSON body: {e}")))
}

/// Pick a node for a model (§5.1): served, attested, on grid, online, with a
/// published keybind, a free slot and a blended price under the cap; the
/// cheapest, then the least loaded.
pub(crate) fn choose_node(
    grid: &Grid,
    inner: &Inner,
    req: &ReserveRequest,
    model: &str,
    exclude: Option<NodeId>,
) -> Result<NodeId, ClientError> {
    let now = Instant::now();
    let require_hardware = match req.require_attestation.as_deref() {
        None | Some("self_reported") => false,
        Some("hardware") => true,
        Some(other) => {
            return Err(ClientError::invalid(
                "invalid_request",
                format!("require_attestation {other:?}"),
            ))
        }
    };
    let pin = match &req.node {
        Some(p) => Some(
            NodeId::parse(p)
                .map_err(|_| ClientError::invalid("invalid_request", "node is not a node id"))?,
        ),
        None => None,
    };
    let serving: Vec<_> = inner
        .nodes
        .values()
        .filter(|n| n.models.iter().any(|m| m == model))
        .collect();
    if serving.is_empty() {
        return Err(ClientError::not_found(
            "model_not_found",
            format!("no node serves {model}"),
        ));
    }
    let usable: Vec<_> = serving
        .into_iter()
        .filter(|n| {
            n.level != AttestationLevel::None
                && !n.off_grid
                && grid.is_online(n, now)
                && n.x25519.is_some()
                && n.keybind.is_some()
                && pin.is_none_or(|p| p == n.id)
                && exclude != Some(n.id)
        })
        .collect();
    let attested: Vec<_> = usable
        .iter()
        .filter(|n| !require_hardware || n.level == AttestationLevel::Hardware)
        .collect();
    if attested.is_empty() && !usable.is_empty() {
        return Err(ClientError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "attestation_unmet",
            "no node serving this model meets the attestation requirement",
        ));
    }
    let cap = match req.max_price {
        None => None,
        Some(usd) => Some(PerM::from_usd(usd).ok_or_else(|| {
            ClientError::invalid("invalid_request", "max_price must be a non-negative number")
        })?),
    };
    let price = |id: &NodeId| {
        inner
            .nodes
            .get(id)
            .map(|n| grid.effective_price(n, model).blended())
            .unwrap_or(PerM(u64::MAX))
    };
    let affordable: Vec<_> = attested
        .iter()
        .filter(|n| cap.is_none_or(|cap| price(&n.id) <= cap))
        .collect();
    if affordable.is_empty() && !attested.is_empty() {
        return Err(ClientError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "price_cap_unmet",
            "nodes serve this model, but none at or under max_price",
        ));
    }
    affordable
        .iter()
        .filter(|n| Grid::load(inner, &n.id, now) < n.max_concurrent_jobs)
        .min_by(|a, b| {
            let la = Grid::load(inner, &a.id, now) as f64 / a.max_concurrent_jobs as f64;
            let lb = Grid::load(inner, &b.id, now) as f64 / b.max_concurrent_jobs as f64;
            price(&a.id).cmp(&price(&b.id)).then(la.total_cmp(&lb))
        })
        .map(|n| n.id)
        .ok_or_else(ClientError::no_capacity)
}

pub async fn reserve(
    State(grid): State<Grid>,
    body: Bytes,
) -> Result<Json<ReserveResponse>, ClientError> {
    let req: ReserveRequest = parse_body(&body)?;
    let model = req
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ClientError::invalid("invalid_request", "model is required"))?;
    if req.cluster.is_some() {
        return Err(ClientError::invalid(
            "cluster_not_supported",
            "clusters are not supported",
        ));
    }
    let mut inner = grid.lock();
    let node_id = choose_node(&grid, &inner, &req, &model, None)?;
    let token = format!("rsv_{}", super::state::random_token());
    inner.reservations.insert(
        token.clone(),
        Reservation {
            node_id,
            model,
            expires: Instant::now() + grid.config.reservation_ttl,
        },
    );
    let node = inner
        .nodes
        .get(&node_id)
        .ok_or_else(|| ClientError::internal("chosen node vanished"))?;
    let (Some(x), Some(kb)) = (node.x25519, node.keybind) else {
        return Err(ClientError::internal("chosen node has no published key"));
    };
    Ok(Json(ReserveResponse {
        reservation_token: token,
        node_id: node_id.to_string(),
        node_x25519_pubkey: x.to_b58(),
        node_ed25519_pubkey: node.ed25519.to_b58(),
        node_x25519_pubkey_sig: Some(kb.to_b58()),
        key_version: Some(node.key_version),
        tee_type: node.tee_type.clone(),
        attestation_verified: node.level != AttestationLevel::None,
        expires_in_ms: grid.config.reservation_ttl.as_millis() as u64,
        attestation_level: Some(node.level),
        evidence_url: Some(format!(
            "{}{}",
            grid.config.public_url.trim_end_matches('/'),
            crate::proto::routes::path(crate::proto::routes::NODE_EVIDENCE, &node_id.to_string())
        )),
    }))
}

/// Create a job for a reserved node and offer it; returns its events.
pub(crate) fn dispatch(
    grid: &Grid,
    job_id: &str,
    node_id: NodeId,
    model: &str,
    payload: Value,
    stream: bool,
    billing: JobBilling,
) -> mpsc::Receiver<JobEvent> {
    let (tx, rx) = mpsc::channel(64);
    let job = Job {
        id: job_id.to_string(),
        node_id,
        model: model.to_string(),
        payload,
        stream,
        acked: false,
        offered_at: Instant::now(),
        events: tx,
        next_seq: 0,
        last_chunk: None,
        closed: false,
        billing: Some(billing),
    };
    let mut inner = grid.lock();
    let pending = job.pending();
    inner.jobs.insert(job_id.to_string(), job);
    if let Some(push) = inner.nodes.get(&node_id).and_then(|n| n.push.clone()) {
        let _ = push.send(pending);
    }
    rx
}

/// The clear `max_tokens` of a sealed request, as the node will clamp it (§6.7).
fn sealed_max_tokens(requested: Option<u64>) -> u64 {
    crate::proto::job::job_max_tokens(requested)
}

/// `POST /v1/chat/completions`: sealed mode when the body has `enc`, plain
/// OpenAI mode otherwise (§5.2).
pub async fn chat(
    State(grid): State<Grid>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ClientError> {
    let value: Value = parse_body(&body)?;
    if value.get("enc").is_none() {
        let req = parse_body(&body)?;
        return super::plain::chat(grid, &method, &uri, &headers, &body, req).await;
    }
    let req: SealedChatRequest = parse_body(&body)?;
    if req.enc.algorithm.as_deref() != Some(ALG_V2) {
        return Err(ClientError::invalid(
            "unsupported_algorithm",
            "enc.algorithm must be the v2 tag",
        ));
    }
    let bad_reservation = || {
        ClientError::invalid(
            "invalid_reservation",
            "the reservation is unknown, expired or used",
        )
    };
    // Quote from the reservation without spending it: a 402 leaves it usable.
    let (node_id, model, streams, price) = {
        let inner = grid.lock();
        let r = inner
            .reservations
            .get(&req.reservation_token)
            .filter(|r| r.expires > Instant::now())
            .ok_or_else(bad_reservation)?;
        let node = inner.nodes.get(&r.node_id).ok_or_else(bad_reservation)?;
        (
            r.node_id,
            r.model.clone(),
            node.capabilities.streaming,
            grid.effective_price(node, &r.model),
        )
    };
    let max_tokens = sealed_max_tokens(req.max_tokens);
    let prompt_bound = crate::payments::grid::sealed_prompt_bound(
        crate::proto::b58::max_decoded_len(req.enc.ciphertext.len()) as u64,
    );
    let quote = price.cost(prompt_bound, max_tokens);
    let job_id = uuid::Uuid::new_v4().to_string();
    let parts = crate::payments::RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let bill = match billing::authorize(&grid, &parts, price, quote, &job_id).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let taken = grid
        .lock()
        .reservations
        .remove(&req.reservation_token)
        .filter(|r| r.expires > Instant::now() && r.node_id == node_id);
    if taken.is_none() {
        billing::release(&grid, bill).await;
        return Err(bad_reservation());
    }
    let stream = req.stream == Some(true) && streams;
    let mut payload = json!({ "enc": req.enc });
    if stream {
        payload["stream"] = json!(true);
    }
    let mut rx = dispatch(&grid, &job_id, node_id, &model, payload, stream, bill);
    tracing::info!(%job_id, %node_id, stream, quote, "sealed job dispatched");
    let wait = grid.config.stuck_job_timeout + Duration::from_secs(5);
    let first = tokio::time::timeout(wait, rx.recv())
        .await
        .map_err(|_| ClientError::node_timeout())?;
    let created = now_unix();
    match first {
        None => Err(ClientError::node_failed("the job ended without a result")),
        Some(JobEvent::Failed(why)) => {
            Err(ClientError::node_failed(format!("the node failed: {why}")))
        }
        Some(JobEvent::Complete(done, receipt)) => {
            let mut resp = sealed_json(&job_id, &model, created, done)?;
            resp.headers_mut().extend(receipt);
            Ok(resp)
        }
        Some(JobEvent::Chunk(first)) => Ok(sse_relay(job_id, first, rx).into_response()),
    }
}

fn sealed_json(
    job_id: &str,
    model: &str,
    created: u64,
    done: CompleteRequest,
) -> Result<Response, ClientError> {
    let sealed = done
        .sealed_result
        .ok_or_else(|| ClientError::node_failed("the node answered a sealed job in plain"))?;
    let usage = done.usage.unwrap_or_default();
    let body = SealedChatResponse {
        id: format!("chatcmpl-{job_id}"),
        object: "chat.completion".into(),
        created,
        model: model.to_string(),
        job_id: job_id.to_string(),
        sealed_result: sealed,
        usage,
        result_envelope_signature: done.result_envelope_signature.unwrap_or_default(),
        result_envelope_version: ENVELOPE_VERSION.into(),
        usage_signature: done.usage_signature,
    };
    Ok(Json(body).into_response())
}

fn sse_chunk(job_id: &str, c: ChunkRequest) -> Event {
    let chunk = SealedSseChunk {
        seq: c.seq.unwrap_or(0),
        is_final: c.is_final == Some(true),
        eph: c.ephemeral_public_key,
        ct: c.ciphertext.unwrap_or_default(),
        job: job_id.to_string(),
        sig: c.result_envelope_signature.unwrap_or_default(),
        sigv: ENVELOPE_VERSION.into(),
        usage: c.usage,
        usage_signature: c.usage_signature,
    };
    Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
}

fn sse_error(message: &str) -> Event {
    let body =
        json!({"error": {"message": message, "type": "server_error", "code": "stream_aborted"}});
    Event::default().event("error").data(body.to_string())
}

enum Relay {
    Open(String, mpsc::Receiver<JobEvent>),
    Done,
}

/// Relay node chunks as SSE, unread: each `data:` line is one JSON object;
/// after the final chunk `[DONE]`; a failure mid-stream is `event: error`.
fn sse_relay(
    job_id: String,
    first: ChunkRequest,
    rx: mpsc::Receiver<JobEvent>,
) -> impl IntoResponse {
    let first_final = first.is_final == Some(true);
    // `[DONE]` follows the final chunk only: a failed stream ends with
    // `event: error` and closes.
    fn done() -> Event {
        Event::default().data("[DONE]")
    }
    let mut head = vec![Ok::<_, Infallible>(sse_chunk(&job_id, first))];
    if first_final {
        head.push(Ok(done()));
    }
    let head = stream::iter(head);
    let state = if first_final {
        Relay::Done
    } else {
        Relay::Open(job_id, rx)
    };
    let rest = stream::unfold(state, |state| async move {
        match state {
            Relay::Done => None,
            Relay::Open(job_id, mut rx) => match rx.recv().await {
                Some(JobEvent::Chunk(c)) => {
                    let fin = c.is_final == Some(true);
                    let mut evs = vec![sse_chunk(&job_id, c)];
                    if fin {
                        evs.push(done());
                    }
                    Some((
                        evs,
                        if fin {
                            Relay::Done
                        } else {
                            Relay::Open(job_id, rx)
                        },
                    ))
                }
                Some(JobEvent::Failed(why)) => Some((
                    vec![sse_error(&format!("the node failed: {why}"))],
                    Relay::Done,
                )),
                Some(JobEvent::Complete(..)) | None => Some((
                    vec![sse_error("the stream ended without a final chunk")],
                    Relay::Done,
                )),
            },
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    let body: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(head.chain(rest));
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Sse::new(body).keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("ping"),
        ),
    )
}

#[derive(Debug, serde::Deserialize)]
pub struct ModelsQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `GET /v1/models`: models served by at least one active, attested node.
pub async fn models(State(grid): State<Grid>, Query(q): Query<ModelsQuery>) -> Json<ModelList> {
    let mut data: Vec<ModelEntry> = Vec::new();
    if q.kind.is_none() {
        let inner = grid.lock();
        let now = Instant::now();
        for n in inner
            .nodes
            .values()
            .filter(|n| n.level != AttestationLevel::None && !n.off_grid && grid.is_online(n, now))
        {
            for m in &n.models {
                let ctx = n.capabilities.context_size;
                match data.iter_mut().find(|e| &e.id == m) {
                    Some(e) => e.context_window = e.context_window.max(ctx),
                    None => data.push(ModelEntry {
                        id: m.clone(),
                        object: "model".into(),
                        created: now_unix(),
                        owned_by: "singularity-grid".into(),
                        context_window: ctx,
                    }),
                }
            }
        }
    }
    data.sort_by(|a, b| a.id.cmp(&b.id));
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// `GET /grid/capacity`: the union of the OPENAPI and SDK shapes (§5.7).
pub async fn capacity(State(grid): State<Grid>) -> Json<CapacityResponse> {
    let inner = grid.lock();
    let now = Instant::now();
    let mut out = CapacityResponse {
        updated_at: None,
        ..Default::default()
    };
    for n in inner.nodes.values() {
        let active = n.level != AttestationLevel::None && !n.off_grid && grid.is_online(n, now);
        let available = active && Grid::load(&inner, &n.id, now) < n.max_concurrent_jobs;
        out.total_nodes += 1;
        out.active_nodes += u64::from(active);
        out.available_nodes += u64::from(available);
        match n.tee_type.as_str() {
            "sev-snp" => out.amd_nodes += 1,
            "tdx" => out.intel_nodes += 1,
            _ => {}
        }
        match out
            .by_tee_type
            .iter_mut()
            .find(|t| t.tee_type == n.tee_type)
        {
            Some(t) => {
                t.total_nodes += 1;
                t.active_nodes += u64::from(active);
                t.available_nodes += u64::from(available);
            }
            None => out.by_tee_type.push(TeeTypeCapacity {
                tee_type: n.tee_type.clone(),
                total_nodes: 1,
                active_nodes: u64::from(active),
                available_nodes: u64::from(available),
            }),
        }
    }
    out.at_capacity = out.active_nodes > 0 && out.available_nodes == 0;
    Json(out)
}
