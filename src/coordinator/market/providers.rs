//! The listings of what the grid serves (PROTOCOL.md §5.5, §5.9):
//! `/v1/providers`, `/grid/models` and `/grid/pricing`.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Map};

use super::shown_tee_type;
use crate::coordinator::error::ClientError;
use crate::coordinator::state::{Grid, Node};
use crate::money::MicrosPerM;
use crate::proto::api::{
    AttestationLevel, GridModel, GridModelPricing, GridModelsResponse, GridPricingEntry,
    GridPricingResponse, Provider, ProvidersResponse,
};

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
    let mut rows: Vec<(MicrosPerM, Provider)> = inner
        .nodes()
        .filter(|n| n.level != AttestationLevel::None && n.models.iter().any(|m| m == &model))
        .map(|n| {
            let p = grid.effective_price(n, &model);
            let slots = n.max_concurrent_jobs.max(1);
            let load = f64::from(inner.load(&n.id)) / f64::from(slots);
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
                    features: n.capabilities.features.clone(),
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
        .nodes()
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

fn per_1k(p: MicrosPerM) -> f64 {
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
