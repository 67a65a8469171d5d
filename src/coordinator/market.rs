//! What the grid offers and at what price (PROTOCOL.md §5.5, §5.8, §5.9,
//! §7b): `/v1/providers`, `/grid/models`, `/grid/pricing`, the node prices
//! and the public attestation evidence of a node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Map};

use super::error::ClientError;
use super::pricing::{PerM, Price};
use super::state::{Grid, Node};
use crate::proto::api::{
    AttestationLevel, EvidenceResponse, GridModel, GridModelPricing, GridModelsResponse,
    GridPricingEntry, GridPricingResponse, NodePriceEntry, NodePricesResponse, Provider,
    ProvidersResponse, SetPriceRequest, SetPriceResponse,
};
use crate::proto::identity::NodeId;
use crate::proto::routes;

/// The tee type clients see: the hardware's only when it was proven.
fn shown_tee_type(n: &Node) -> String {
    match n.level {
        AttestationLevel::Hardware => n.tee_type.clone(),
        _ if n.tee_type == "sev-snp" || n.tee_type == "tdx" => "self_reported".into(),
        _ => n.tee_type.clone(),
    }
}

/// 0–100 from the node's record: completed over finished, 80 for a new node.
fn reputation(n: &Node) -> i64 {
    let done = n.jobs_completed + n.jobs_failed;
    (n.jobs_completed * 100)
        .checked_div(done)
        .map_or(80, |r| r as i64)
}

#[derive(Debug, serde::Deserialize)]
pub struct ProvidersQuery {
    model: Option<String>,
    cluster: Option<String>,
}

/// `GET /v1/providers?model=M`: nodes serving M, cheapest first (§5.5).
pub async fn providers(
    State(grid): State<Grid>,
    Query(q): Query<ProvidersQuery>,
) -> Result<Json<ProvidersResponse>, ClientError> {
    let model = q
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ClientError::invalid("invalid_request", "model is required"))?;
    let inner = grid.lock();
    let now = Instant::now();
    let mut rows: Vec<(PerM, Provider)> = inner
        .nodes
        .values()
        .filter(|n| n.level != AttestationLevel::None && n.models.iter().any(|m| m == &model))
        .map(|n| {
            let p = grid.effective_price(n, &model);
            let slots = n.max_concurrent_jobs.max(1);
            let load = f64::from(Grid::load(&inner, &n.id, now)) / f64::from(slots);
            let blended = p.blended();
            (
                blended,
                Provider {
                    node_id: n.id.to_string(),
                    input_per_m: p.input.usd(),
                    output_per_m: p.output.usd(),
                    blended_per_1k: blended.usd() / 1000.0,
                    is_custom: n.custom_prices.contains_key(&model),
                    reputation: reputation(n),
                    load,
                    max_concurrent_jobs: n.max_concurrent_jobs,
                    tee_type: shown_tee_type(n),
                    online: !n.off_grid && grid.is_online(n, now),
                },
            )
        })
        .collect();
    rows.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(b.1.online.cmp(&a.1.online))
            .then(a.1.load.total_cmp(&b.1.load))
    });
    let providers: Vec<Provider> = rows.into_iter().map(|(_, p)| p).collect();
    Ok(Json(ProvidersResponse {
        model,
        cluster: q.cluster,
        count: providers.len(),
        providers,
    }))
}

/// Per model: the active nodes serving it and their tee types.
fn served_models(grid: &Grid) -> BTreeMap<String, (u64, Vec<String>, u64)> {
    let inner = grid.lock();
    let now = Instant::now();
    let mut out: BTreeMap<String, (u64, Vec<String>, u64)> = BTreeMap::new();
    for n in inner
        .nodes
        .values()
        .filter(|n| n.level != AttestationLevel::None && !n.off_grid && grid.is_online(n, now))
    {
        for m in &n.models {
            let e = out.entry(m.clone()).or_default();
            e.0 += 1;
            let t = shown_tee_type(n);
            if !e.1.contains(&t) {
                e.1.push(t);
            }
            e.2 += u64::from(n.custom_prices.contains_key(m));
        }
    }
    out
}

fn per_1k(p: PerM) -> f64 {
    p.usd() / 1000.0
}

/// `GET /grid/models`: always the object form PYSDK parses (§5.9).
pub async fn grid_models(State(grid): State<Grid>) -> Json<GridModelsResponse> {
    let models = served_models(&grid)
        .into_iter()
        .map(|(id, (count, tee_types, custom))| {
            let r = grid.reference_price(&id);
            let mut extra = Map::new();
            extra.insert("model".into(), json!(id));
            extra.insert("node_count".into(), json!(count));
            extra.insert("providers_count".into(), json!(count));
            extra.insert("custom_providers_count".into(), json!(custom));
            extra.insert("price_input_per_m".into(), json!(r.input.usd()));
            extra.insert("price_output_per_m".into(), json!(r.output.usd()));
            GridModel {
                id,
                owned_by: "sgl".into(),
                sgl_node_count: count,
                sgl_tee_types: tee_types,
                sgl_pricing: GridModelPricing {
                    price_per_1k_input_tokens_usd: per_1k(r.input),
                    price_per_1k_output_tokens_usd: per_1k(r.output),
                },
                extra,
            }
        })
        .collect();
    Json(GridModelsResponse { models })
}

/// `GET /grid/pricing`: the reference price of every served model.
pub async fn grid_pricing(State(grid): State<Grid>) -> Json<GridPricingResponse> {
    let pricing = served_models(&grid)
        .into_keys()
        .map(|model| {
            let r = grid.reference_price(&model);
            GridPricingEntry {
                model,
                price_per_1k_input_tokens_usd: per_1k(r.input),
                price_per_1k_output_tokens_usd: per_1k(r.output),
            }
        })
        .collect();
    Json(GridPricingResponse { pricing })
}

fn rfc3339_in(d: Duration) -> String {
    let at = std::time::SystemTime::now() + d;
    humantime_rfc3339(at)
}

/// RFC 3339 UTC with second precision (the attestation room's formatter).
pub fn humantime_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::attest::verdict::rfc3339(secs)
}

fn price_entry(grid: &Grid, n: &Node, model: &str, now: Instant) -> NodePriceEntry {
    let r = grid.reference_price(model);
    let custom = n.custom_prices.get(model).copied();
    let cooldown_until = n.price_changed.get(model).and_then(|at| {
        let until = *at + grid.config.price_cooldown;
        (until > now).then(|| rfc3339_in(until - now))
    });
    NodePriceEntry {
        model: model.to_string(),
        reference: r.to_wire(),
        floor: r.floor().to_wire(),
        ceiling: r.ceiling().to_wire(),
        custom: custom.map(Price::to_wire),
        effective: custom.unwrap_or(r).to_wire(),
        cooldown_until,
    }
}

fn node_or_404(id: &str) -> Result<NodeId, ClientError> {
    NodeId::parse(id).map_err(|_| ClientError::not_found("node_not_found", "no such node"))
}

/// `GET /grid/nodes/{id}/prices` (public).
pub async fn get_prices(
    State(grid): State<Grid>,
    Path(id): Path<String>,
) -> Result<Json<NodePricesResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    let inner = grid.lock();
    let n = inner
        .nodes
        .get(&node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    let now = Instant::now();
    Ok(Json(NodePricesResponse {
        node_id: node_id.to_string(),
        prices: n
            .models
            .iter()
            .map(|m| price_entry(&grid, n, m, now))
            .collect(),
    }))
}

fn unauthorized() -> ClientError {
    ClientError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "unauthorized",
        "X-Node-Auth does not hold this node's token",
    )
}

/// Who asked for a price change.
enum PriceAuth {
    /// `X-Node-Auth`: the node's token.
    Node(String),
    /// `X-Auth-*`: the wallet whose signature was verified (nonce consumed).
    Owner(crate::store::WalletId),
}

fn signature_refused(e: &crate::payments::PaymentError) -> ClientError {
    ClientError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        match e {
            crate::payments::PaymentError::AuthExpired => "signature_expired",
            crate::payments::PaymentError::AuthNonceUsed => "nonce_reused",
            _ => "invalid_signature",
        },
        e.to_string(),
    )
}

/// Same wallet: `0x…` addresses compare case-insensitively, others exactly.
fn same_wallet(a: &str, b: &str) -> bool {
    if a.starts_with("0x") || a.starts_with("0X") {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// `POST /grid/nodes/{id}/prices`: set or reset a custom price (§5.8).
/// Auth: the node's token in `X-Node-Auth`, or an owner wallet signature
/// (`X-Auth-*`, the X402-COMPUTE-AUTH v1 message) whose address is the
/// node's `wallet_address`.
pub async fn set_price(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<SetPriceResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    let auth = if let Some(token) = headers.get(crate::proto::headers::NODE_AUTH) {
        PriceAuth::Node(token.to_str().map_err(|_| unauthorized())?.to_string())
    } else if headers.contains_key(crate::proto::headers::AUTH_SIGNATURE)
        || headers.contains_key(crate::proto::headers::AUTH_ADDRESS)
    {
        let Some(payments) = grid.payments.as_ref() else {
            return Err(ClientError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "unauthorized",
                "wallet signatures need a coordinator with payments enabled; use X-Node-Auth",
            ));
        };
        let parts = crate::payments::RequestParts {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: &body,
        };
        let wallet = payments
            .signed_wallet(&parts)
            .await
            .map_err(|e| signature_refused(&e))?;
        PriceAuth::Owner(wallet)
    } else {
        return Err(unauthorized());
    };
    let req: SetPriceRequest = serde_json::from_slice(&body)
        .map_err(|e| ClientError::invalid("invalid_request", format!("invalid JSON body: {e}")))?;
    let mut inner = grid.lock();
    match &auth {
        PriceAuth::Node(token) => {
            if !grid.authenticate(&inner, &node_id, token) {
                return Err(unauthorized());
            }
        }
        PriceAuth::Owner(wallet) => {
            let n = inner
                .nodes
                .get(&node_id)
                .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
            if n.wallet_address.is_empty() || !same_wallet(&n.wallet_address, wallet.as_str()) {
                return Err(ClientError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "not_node_owner",
                    "the signing wallet is not this node's wallet_address",
                ));
            }
        }
    }
    let now = Instant::now();
    let reference = grid.reference_price(&req.model);
    let n = inner
        .nodes
        .get_mut(&node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    if !n.models.iter().any(|m| m == &req.model) {
        return Err(ClientError::invalid(
            "model_not_advertised",
            format!("this node does not advertise {}", req.model),
        ));
    }
    if let Some(at) = n.price_changed.get(&req.model) {
        let until = *at + grid.config.price_cooldown;
        if until > now {
            let wait = (until - now).as_secs().max(1);
            return Err(ClientError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "price_cooldown",
                format!("prices of this model can change again in {wait} s"),
            )
            .with_extra("retry_after_s", json!(wait)));
        }
    }
    if req.reset == Some(true) {
        n.custom_prices.remove(&req.model);
    } else {
        let (Some(i), Some(o)) = (req.input_per_m, req.output_per_m) else {
            return Err(ClientError::invalid(
                "invalid_request",
                "give input_per_m and output_per_m, or reset: true",
            ));
        };
        let (Some(i), Some(o)) = (PerM::from_usd(i), PerM::from_usd(o)) else {
            return Err(ClientError::invalid(
                "price_out_of_band",
                "prices must be non-negative numbers",
            ));
        };
        let price = Price {
            input: i,
            output: o,
        };
        if !price.within_band(reference) {
            let (lo, hi) = (reference.floor(), reference.ceiling());
            return Err(ClientError::invalid(
                "price_out_of_band",
                format!(
                    "prices must lie within [{}, {}] (input) and [{}, {}] (output) USD per 1M tokens",
                    lo.input.usd(),
                    hi.input.usd(),
                    lo.output.usd(),
                    hi.output.usd()
                ),
            ));
        }
        n.custom_prices.insert(req.model.clone(), price);
    }
    n.price_changed.insert(req.model.clone(), now);
    tracing::info!(
        %node_id,
        model = %req.model,
        reset = req.reset == Some(true),
        by_owner = matches!(auth, PriceAuth::Owner(_)),
        "node price changed"
    );
    let price = price_entry(&grid, n, &req.model, now);
    grid.persist(&mut inner, &node_id);
    Ok(Json(SetPriceResponse { ok: true, price }))
}

/// `GET /grid/nodes/{id}/attestation/evidence` (§7b): no auth.
pub async fn evidence(
    State(grid): State<Grid>,
    Path(id): Path<String>,
) -> Result<Json<EvidenceResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    let inner = grid.lock();
    let n = inner
        .nodes
        .get(&node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    let (Some(x), Some(att)) = (n.x25519, n.attestation.as_ref()) else {
        return Err(ClientError::not_found(
            "not_attested",
            "this node has not attested",
        ));
    };
    Ok(Json(EvidenceResponse {
        node_id: node_id.to_string(),
        key_version: n.key_version,
        ed25519_pubkey: n.ed25519.to_b58(),
        x25519_pubkey: x.to_b58(),
        keybind_signature: n.keybind.map(|k| k.to_b58()),
        challenge: Some(att.challenge.clone()),
        evidence: att.evidence.clone(),
        verified_at: Some(att.verified_at.clone()),
        attestation_level: n.level,
        policy_digest: att.policy_digest.clone(),
    }))
}

/// `GET /grid/jobs/{id}/attestation` (§5.11): the proof behind one job, for
/// the API key (or wallet) that paid for it; 404 for anyone else.
pub async fn job_attestation(
    State(grid): State<Grid>,
    Path(job_id): Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<crate::proto::api::AttestationProof>, ClientError> {
    let not_found = || ClientError::not_found("job_not_found", "no such job");
    let (Some(store), Some(payments)) = (grid.store(), grid.payments.as_ref()) else {
        return Err(not_found());
    };
    let parts = crate::payments::RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &[],
    };
    let payer = payments
        .authenticate(&parts)
        .await
        .ok()
        .flatten()
        .ok_or_else(not_found)?;
    let row = store
        .usage_for_job(&job_id)
        .await
        .map_err(ClientError::internal)?
        .ok_or_else(not_found)?;
    let paid = match (&payer, &row.api_key_id) {
        (crate::payments::Payer::ApiKey { key_id, .. }, Some(k)) => key_id == k,
        (_, None) => row.payer_wallet.as_deref() == Some(payer.wallet().as_str()),
        _ => false,
    };
    if !paid || row.status != "completed" {
        return Err(not_found());
    }
    let node_id = NodeId::parse(&row.node_id).map_err(|_| not_found())?;
    let inner = grid.lock();
    let n = inner.nodes.get(&node_id).ok_or_else(not_found)?;
    let att = n.attestation.as_ref();
    let report = json!({
        "attestation_level": n.level,
        "evidence_url": format!(
            "{}{}",
            grid.config.public_url.trim_end_matches('/'),
            routes::path(routes::NODE_EVIDENCE, &node_id.to_string())
        ),
        "report_hash": att.map(|a| a.report_hash.clone()),
        "policy_digest": att.and_then(|a| a.policy_digest.clone()),
    });
    Ok(Json(crate::proto::api::AttestationProof {
        node_id: row.node_id.clone(),
        tee_type: shown_tee_type(n),
        job_id: row.job_id.clone(),
        attestation_signature: row.result_signature.clone().unwrap_or_default(),
        attestation_report: report.to_string(),
        verified: n.level != AttestationLevel::None,
        verified_at: att.map(|a| a.verified_at.clone()),
    }))
}

/// `GET /grid/attestation/policy` (§7b): the policy evidence is verified
/// against, as canonical JSON, and its digest.
pub async fn policy(State(grid): State<Grid>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body: serde_json::Value =
        serde_json::from_str(&grid.config.policy.canonical_json()).unwrap_or_default();
    Json(json!({"policy": body, "policy_digest": grid.config.policy.digest()})).into_response()
}
