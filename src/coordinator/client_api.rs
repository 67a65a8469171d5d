//! The client-facing API (PROTOCOL.md §5): reserve a node, then a sealed chat
//! call whose prompt and reply the coordinator relays without reading. Stream
//! chunks are relayed as SSE in `seq` order, each with the node's signature.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::billing;
use super::error::ClientError;
use super::job::JobEvent;
use super::router::{choose_node, dispatch};
use super::state::{Grid, Reservation, ReservationRefused};
use crate::http::MaybePeer;
use crate::proto::api::{
    AttestationLevel, CapacityResponse, CompleteRequest, ReserveRequest, ReserveResponse,
    SealedChatRequest, SealedChatResponse, TeeTypeCapacity,
};
use crate::proto::e2e::ALG_V2;
use crate::proto::envelope::ENVELOPE_VERSION;
use crate::proto::openai::{ModelEntry, ModelList};

/// Request bodies larger than this are refused (a sealed prompt is capped at
/// 512 KiB of b58; the rest is small).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body)
        .map_err(|e| ClientError::invalid("invalid_request", format!("invalid JSON body: {e}")))
}

/// Who holds a reservation, for the per-client cap (§7f): the wallet of a
/// valid API key, else the client's address ([`super::client_addr`]: the
/// peer, or behind a trusted proxy the address it forwarded for). An
/// invalid key counts as its address, so made-up keys buy no extra room.
async fn reservation_client(
    grid: &Grid,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    peer: Option<std::net::SocketAddr>,
) -> String {
    if let (Some(p), Ok(Some(_))) = (&grid.payments, crate::payments::service::api_key(headers)) {
        let parts = crate::payments::RequestParts {
            method,
            uri,
            headers,
            body: &[],
        };
        if let Ok(Some(payer)) = p.authenticate(&parts).await {
            return format!("wallet:{}", payer.wallet());
        }
    }
    match super::client_addr::client_ip(peer, headers, &grid.config.trusted_proxies) {
        Some(ip) => format!("ip:{ip}"),
        None => "ip:unknown".into(),
    }
}

/// 429 `too_many_reservations`, with `Retry-After` (§7f).
fn too_many_reservations(wait: Duration) -> ClientError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ClientError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "too_many_reservations",
        "too many unclaimed reservations; claim or let one expire",
    )
    .with_extra("retry_after_s", json!(secs.max(1)))
}

/// The features a reservation asks for (sgl extension), as the router names
/// them. One this coordinator does not know is refused: no node could be
/// shown to implement it, and a sealed request cannot be checked later.
fn reserve_features(asked: &[String]) -> Result<Vec<&'static str>, ClientError> {
    asked
        .iter()
        .map(|f| {
            crate::proto::features::ALL
                .iter()
                .copied()
                .find(|k| k == f)
                .ok_or_else(|| {
                    ClientError::invalid(
                        "invalid_request",
                        format!(
                            "features: {f:?} is not a request feature this coordinator knows ({})",
                            crate::proto::features::ALL.join(", ")
                        ),
                    )
                    .with_param("features")
                })
        })
        .collect()
}

pub async fn reserve(
    State(grid): State<Grid>,
    MaybePeer(peer): MaybePeer,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
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
    // Only vision-capable nodes qualify for images (§5.1), and no sgl
    // engine reads images: refused here rather than failed by the node
    // after it was paid for. Plain requests with image parts are refused
    // alike, by the one request check (`InvalidRequest::NonTextContent`).
    if req.image_count.is_some_and(|n| n > 0) {
        return Err(ClientError::invalid(
            "images_not_supported",
            "no vision model is served on this grid: image_count must be 0",
        )
        .with_param("image_count"));
    }
    let needs = reserve_features(&req.features)?;
    let client = reservation_client(&grid, &method, &uri, &headers, peer).await;
    // The lock is scoped to this block: nothing below it awaits under it.
    let (resp, shared) = {
        let mut inner = grid.lock();
        let node_id = choose_node(&grid, &inner, &req, &model, None, &needs)?;
        let token = format!("rsv_{}", super::state::random_token());
        let now = Instant::now();
        let reservation = Reservation {
            node_id,
            model,
            expires: now + grid.config.reservation_ttl,
            client,
        };
        // Replicas keep reservations in the database, for a chat call on any.
        let shared = match grid.replica {
            Some(_) => Some(reservation),
            None => {
                inner
                    .insert_reservation(
                        token.clone(),
                        reservation,
                        grid.config.max_reservations_per_client,
                        now,
                    )
                    .map_err(|refused| match refused {
                        ReservationRefused::TooMany(wait) => too_many_reservations(wait),
                        _ => ClientError::no_capacity(),
                    })?;
                None
            }
        };
        let node = inner
            .node(&node_id)
            .ok_or_else(|| ClientError::internal("chosen node vanished"))?;
        let (Some(x), Some(kb)) = (node.x25519, node.keybind) else {
            return Err(ClientError::internal("chosen node has no published key"));
        };
        let resp = ReserveResponse {
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
                crate::proto::routes::path(
                    crate::proto::routes::NODE_EVIDENCE,
                    &node_id.to_string()
                )
            )),
            features: node.capabilities.features.clone(),
        };
        (resp, shared)
    };
    if let (Some(replica), Some(r)) = (&grid.replica, shared) {
        let ttl = grid.config.reservation_ttl;
        let per_client = grid.config.max_reservations_per_client;
        if !replica
            .put_reservation(&resp.reservation_token, &r, ttl, per_client)
            .await
            .map_err(ClientError::internal)?
        {
            return Err(too_many_reservations(ttl));
        }
    }
    Ok(Json(resp))
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
    // Sizes before work (§7f): a ciphertext the node would refuse is refused
    // here, before it is quoted, billed or relayed.
    if req.enc.ciphertext.len() > crate::proto::e2e::MAX_CIPHERTEXT_CHARS {
        return Err(ClientError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!(
                "enc.ciphertext is over {} base58 characters",
                crate::proto::e2e::MAX_CIPHERTEXT_CHARS
            ),
        ));
    }
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
    if let Some(replica) = &grid.replica {
        replica
            .fetch_reservation(&grid, &req.reservation_token)
            .await
            .map_err(ClientError::internal)?;
    }
    // Quote from the reservation without spending it: a 402 leaves it usable.
    let (node_id, model, streams, price) = {
        let inner = grid.lock();
        let r = inner
            .reservation(&req.reservation_token, Instant::now())
            .ok_or_else(bad_reservation)?;
        let node = inner.node(&r.node_id).ok_or_else(bad_reservation)?;
        (
            r.node_id,
            r.model.clone(),
            node.capabilities.streaming,
            grid.effective_price(node, &r.model),
        )
    };
    let max_tokens = sealed_max_tokens(req.max_tokens);
    let prompt_bound = super::pricing::sealed_prompt_bound(crate::proto::b58::max_decoded_len(
        req.enc.ciphertext.len(),
    ) as u64);
    let quote = price.cost(prompt_bound, max_tokens);
    let job_id = uuid::Uuid::new_v4().to_string();
    let parts = crate::payments::RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    // The payment is verified and, for x402 or MPP, settled before the
    // slot is taken: no node sees the job before it is paid. Should the slot
    // be gone by then, the bill's release refunds a settled payment whole
    // to the payer's credits.
    let bill = match billing::authorize(&grid, &parts, price, quote, &job_id).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let receipt = bill.receipt.clone();
    // The node's slot is taken now, not at reserve time (§7f).
    let taken = grid
        .lock()
        .take_reservation(&req.reservation_token, Instant::now());
    match taken {
        Ok(r) if r.node_id == node_id => {}
        Err(ReservationRefused::NoCapacity) => {
            bill.release().await;
            return Err(ClientError::no_capacity());
        }
        _ => {
            bill.release().await;
            return Err(bad_reservation());
        }
    }
    let stream = req.stream == Some(true) && streams;
    // The quote binds the node (§7f): it generates at most the clear
    // max_tokens this request was quoted for, whatever the sealed one asks.
    let mut payload = json!({ "enc": req.enc, "max_tokens_cap": max_tokens });
    if stream {
        payload["stream"] = json!(true);
    }
    let mut rx = dispatch(
        &grid, &job_id, node_id, &model, payload, stream, bill, true, false,
    );
    tracing::info!(%job_id, %node_id, stream, quote = quote.0, "sealed job dispatched");
    let wait = grid.config.stuck_job_timeout + Duration::from_secs(5);
    let first = tokio::time::timeout(wait, rx.recv())
        .await
        .map_err(|_| ClientError::node_timeout())?;
    let created = grid.config.clock.now_secs();
    match first {
        None => Err(ClientError::node_failed("the job ended without a result")),
        Some(JobEvent::Failed(why)) => {
            Err(ClientError::node_failed(format!("the node failed: {why}")))
        }
        Some(JobEvent::BadInput(why)) => Err(ClientError::invalid(
            crate::proto::api::FAIL_BAD_SEALED_INPUT,
            format!("the node cannot open the sealed input: {why}"),
        )),
        Some(JobEvent::Unstarted(why, bill)) => {
            // Not dispatched for retry, so not expected; close the bill.
            billing::close_unstarted(&grid, &job_id, node_id, &model, bill).await;
            Err(ClientError::node_failed(format!("the node failed: {why}")))
        }
        Some(JobEvent::Complete(done, billed)) => {
            let mut resp = sealed_json(&job_id, &model, created, done, billed.refunded)?;
            resp.headers_mut().extend(receipt);
            resp.headers_mut().extend(billed.headers);
            Ok(resp)
        }
        Some(first @ (JobEvent::Chunk(_) | JobEvent::Final(..))) => {
            Ok(super::relay::sealed(job_id, first, rx, receipt))
        }
    }
}

fn sealed_json(
    job_id: &str,
    model: &str,
    created: u64,
    done: CompleteRequest,
    refunded: Option<crate::money::Micros>,
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
        refunded_micros: refunded.map(|m| m.0),
    };
    Ok(Json(body).into_response())
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
            .nodes()
            .filter(|n| n.level != AttestationLevel::None && !n.off_grid && grid.is_online(n, now))
        {
            for m in &n.models {
                let ctx = n.capabilities.context_size;
                match data.iter_mut().find(|e| &e.id == m) {
                    Some(e) => e.context_window = e.context_window.max(ctx),
                    None => data.push(ModelEntry {
                        id: m.clone(),
                        object: "model".into(),
                        created: grid.config.clock.now_secs(),
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
    for n in inner.nodes() {
        let active = n.level != AttestationLevel::None && !n.off_grid && grid.is_online(n, now);
        let available = active && inner.load(&n.id) < n.max_concurrent_jobs;
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
