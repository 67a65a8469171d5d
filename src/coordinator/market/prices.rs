//! Node prices (PROTOCOL.md §5.8): `GET` and `POST /grid/nodes/{id}/prices`,
//! the reference band, the cooldown between changes, and who may set them.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::json;

use super::node_or_404;
use crate::coordinator::error::ClientError;
use crate::coordinator::pricing;
use crate::coordinator::state::{Grid, Node};
use crate::money::{MicrosPerM, TokenPrice};
use crate::proto::api::{NodePriceEntry, NodePricesResponse, SetPriceRequest, SetPriceResponse};

fn price_entry(grid: &Grid, n: &Node, model: &str, now: Instant) -> NodePriceEntry {
    let r = grid.reference_price(model);
    let custom = n.custom_prices.get(model).copied();
    let cooldown_until = n.price_changed.get(model).and_then(|at| {
        let until = *at + grid.config.price_cooldown;
        (until > now).then(|| grid.config.clock.rfc3339_in(until - now))
    });
    NodePriceEntry {
        model: model.to_string(),
        reference: pricing::to_wire(r),
        floor: pricing::to_wire(pricing::floor(r)),
        ceiling: pricing::to_wire(pricing::ceiling(r)),
        custom: custom.map(pricing::to_wire),
        effective: pricing::to_wire(custom.unwrap_or(r)),
        cooldown_until,
    }
}

/// `GET /grid/nodes/{id}/prices` (public).
pub async fn get_prices(
    State(grid): State<Grid>,
    Path(id): Path<String>,
) -> Result<Json<NodePricesResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    let inner = grid.lock();
    let n = inner
        .node(&node_id)
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

/// 429 `price_cooldown`: the next change is allowed in `wait_s` seconds.
fn cooldown_refusal(wait_s: u64) -> ClientError {
    let wait = wait_s.max(1);
    ClientError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "price_cooldown",
        format!("prices of this model can change again in {wait} s"),
    )
    .with_extra("retry_after_s", json!(wait))
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
    let auth = super::owner::authorize(&grid, &node_id, &method, &uri, &headers, &body).await?;
    let req: SetPriceRequest = serde_json::from_slice(&body)
        .map_err(|e| ClientError::invalid("invalid_request", format!("invalid JSON body: {e}")))?;
    let now = Instant::now();
    let reference = grid.reference_price(&req.model);
    // Checked under the lock; the lock is let go before the store is asked.
    let price = {
        let inner = grid.lock();
        let n = inner
            .node(&node_id)
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
                return Err(cooldown_refusal((until - now).as_secs()));
            }
        }
        if req.reset == Some(true) {
            None
        } else {
            let (Some(i), Some(o)) = (req.input_per_m, req.output_per_m) else {
                return Err(ClientError::invalid(
                    "invalid_request",
                    "give input_per_m and output_per_m, or reset: true",
                ));
            };
            let (Some(i), Some(o)) = (MicrosPerM::from_usd(i), MicrosPerM::from_usd(o)) else {
                return Err(ClientError::invalid(
                    "price_out_of_band",
                    "prices must be non-negative numbers",
                ));
            };
            let price = TokenPrice::new(i, o);
            if !pricing::within_band(price, reference) {
                let (lo, hi) = (pricing::floor(reference), pricing::ceiling(reference));
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
            Some(price)
        }
    };
    // The store has the last word on the cooldown: it outlives restarts and
    // is shared by replicas (PROTOCOL.md §7f).
    if let Some(store) = grid.store() {
        let cooldown_ms = i64::try_from(grid.config.price_cooldown.as_millis()).unwrap_or(i64::MAX);
        let now_ms = grid.config.clock.now_ms();
        let last = store
            .claim_price_change(&node_id.to_string(), &req.model, now_ms, cooldown_ms)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "could not record the price change");
                ClientError::internal("could not record the price change")
            })?;
        if let Some(at) = last {
            let left_ms = at.saturating_add(cooldown_ms).saturating_sub(now_ms).max(0);
            return Err(cooldown_refusal(
                u64::try_from(left_ms).unwrap_or(0).div_ceil(1000),
            ));
        }
    }
    let mut inner = grid.lock();
    let n = inner
        .node_mut(&node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    match price {
        Some(price) => n.custom_prices.insert(req.model.clone(), price),
        None => n.custom_prices.remove(&req.model),
    };
    n.price_changed.insert(req.model.clone(), now);
    tracing::info!(
        %node_id,
        model = %req.model,
        reset = req.reset == Some(true),
        by_owner = matches!(auth, super::owner::NodeAuth::Owner(_)),
        "node price changed"
    );
    let price = price_entry(&grid, n, &req.model, now);
    grid.persist(&mut inner, &node_id);
    Ok(Json(SetPriceResponse { ok: true, price }))
}
