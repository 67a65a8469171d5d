//! The Machines HTTP surface, mounted beside the payments routes
//! (`/compute/api-keys`, `/compute/credits/*`) on the same store, keys and
//! credits:
//!
//! | Method and path | Auth | Purpose |
//! |---|---|---|
//! | `GET /compute/plans[?type=vps\|vhp\|vdc\|vcg]` | none | plans at our prices |
//! | `GET /compute/regions` | none | regions |
//! | `GET /compute/os` | none | OS images |
//! | `POST /compute/provision` | x402/MPP payment, or credits with auth | rent a machine |
//! | `GET /compute/instances` | X-Auth or key | the wallet's machines |
//! | `GET /compute/instances/{id}` | X-Auth or key | one machine |
//! | `DELETE /compute/instances/{id}` | X-Auth or key | destroy |
//! | `POST /compute/instances/{id}/password` | X-Auth or key | the root password, once |
//! | `POST /compute/instances/{id}/extend` | X-Auth or key with x402, MPP or credits; or x402 alone from the owner's wallet | more prepaid hours |
//! | `POST /compute/instances/{id}/resize` | X-Auth or key | another plan, same prepaid value |
//!
//! Errors are `{"error": {message, type, code}}` with the HTTP status of
//! PROTOCOL.md §1.5; another wallet's machine is 404, as a missing one.
//! Work that reaches a provider runs in its own task, so a client that
//! hangs up cannot stop an order half way.
// The parsing helpers return the finished error response, as handlers do;
// it is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

use super::catalogue::{Plan, Snapshot};
use super::provider::{Provider, ProviderKind};
use super::service::{FinishError, Machines, SYSTEM};
use crate::money::Micros;
use crate::payments::http::{challenge, error_response, refusal};
use crate::payments::{PaymentError, PaymentMethod, RequestParts};
use crate::store::{ComputeOrder, NewComputeOrder, StoreError, WalletId};
use crate::timefmt::format_rfc3339_ms;

/// The largest request body read (a label or SSH key never needs more).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// The longest label.
pub const MAX_LABEL_CHARS: usize = 64;
/// The longest SSH public key line.
pub const MAX_SSH_KEY_BYTES: usize = 8 * 1024;

/// The routes above.
pub fn router(machines: Machines) -> Router {
    Router::new()
        .route("/compute/plans", get(plans))
        .route("/compute/regions", get(regions))
        .route("/compute/os", get(os))
        .route("/compute/provision", post(provision))
        .route("/compute/instances", get(list))
        .route("/compute/instances/{id}", get(show).delete(destroy))
        .route("/compute/instances/{id}/password", post(password))
        .route("/compute/instances/{id}/extend", post(extend))
        .route("/compute/instances/{id}/resize", post(resize))
        .with_state(machines)
}

fn bad(code: &str, message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "instance_not_found",
        "no such instance",
    )
}

fn conflict(code: &str, message: &str) -> Response {
    error_response(StatusCode::CONFLICT, "conflict", code, message)
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "machines internal error");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        "internal error",
    )
}

fn provider_failed(e: impl std::fmt::Display, refunded: Micros) -> Response {
    tracing::warn!(error = %e, "provider failure");
    let mut resp = error_response(
        StatusCode::BAD_GATEWAY,
        "provider_error",
        "provider_error",
        &format!("the provider failed: {e}"),
    );
    if refunded > Micros::ZERO {
        // The body is ours; add what was returned.
        let body = json!({"error": {"message": format!("the provider failed: {e}; the payment was returned to your credits"),
            "type": "provider_error", "code": "provider_error"},
            "refunded": refunded.to_usd_string(), "refunded_micros": refunded.0});
        resp = (StatusCode::BAD_GATEWAY, Json(body)).into_response();
    }
    resp
}

/// A USD amount as a JSON number (display only; `_micros` fields carry
/// the exact integer).
fn usd(m: Micros) -> Value {
    m.to_usd_string()
        .parse::<serde_json::Number>()
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// The body, at most [`MAX_BODY_BYTES`].
async fn read_body(body: Body) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                "the request body is too large",
            )
        })
}

/// The body as a JSON object (an empty body is an empty object).
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(bad("invalid_json", "the body must be a JSON object")),
    }
}

fn field_str(
    o: &serde_json::Map<String, Value>,
    key: &str,
    max: usize,
) -> Result<Option<String>, Response> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= max => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(bad(
            &format!("invalid_{key}"),
            &format!("{key} is too long"),
        )),
        Some(_) => Err(bad(
            &format!("invalid_{key}"),
            &format!("{key} must be a string"),
        )),
    }
}

fn field_bool(o: &serde_json::Map<String, Value>, key: &str) -> Result<bool, Response> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(
            &format!("invalid_{key}"),
            &format!("{key} must be true or false"),
        )),
    }
}

fn field_u64(o: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, Response> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            bad(
                &format!("invalid_{key}"),
                &format!("{key} must be a non-negative integer"),
            )
        }),
        Some(_) => Err(bad(
            &format!("invalid_{key}"),
            &format!("{key} must be an integer"),
        )),
    }
}

/// An OpenSSH public key line: a known type, its base64 blob (which
/// names the same type), an optional comment, one line.
pub fn valid_ssh_key(s: &str) -> bool {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if s.len() > MAX_SSH_KEY_BYTES || s.contains(['\n', '\r', '\0']) {
        return false;
    }
    let mut parts = s.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    if !TYPES.contains(&kind) {
        return false;
    }
    let Ok(raw) = STANDARD.decode(blob) else {
        return false;
    };
    if raw.len() < 4 {
        return false;
    }
    let n = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    raw.get(4..4 + n) == Some(kind.as_bytes())
}

fn parts<'a>(
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a [u8],
) -> RequestParts<'a> {
    RequestParts {
        method,
        uri,
        headers,
        body,
    }
}

/// The catalogue, or 503 when no provider was ever reached.
async fn snapshot(m: &Machines) -> Result<Snapshot, Response> {
    let s = m.catalogue().snapshot().await;
    if s.plans.is_empty() {
        return Err(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_error",
            "catalogue_unavailable",
            "no compute provider could be reached yet",
        ));
    }
    Ok(s)
}

fn plan_json(p: &Plan) -> Value {
    json!({
        "id": p.id,
        "provider": p.provider.as_str(),
        "vcpu_count": p.spec.vcpu_count,
        "ram": p.spec.ram,
        "disk": p.spec.disk,
        "bandwidth": p.spec.bandwidth,
        "monthly_cost": usd(p.monthly),
        "hourly_cost": usd(p.hourly),
        "our_hourly": usd(p.hourly),
        "our_daily": usd(p.daily()),
        "hourly_cost_micros": p.hourly.0,
        "daily_cost_micros": p.daily().0,
        "monthly_cost_micros": p.monthly.0,
        "type": p.type_label(),
        "plan_type": p.category(),
        "gpu_vram_gb": p.spec.gpu_vram_gb,
        "gpu_type": p.spec.gpu_type,
        "locations": p.spec.locations,
    })
}

async fn plans(
    State(m): State<Machines>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let kind = q.get("type").cloned();
    if let Some(k) = &kind {
        if !["vps", "vhp", "vdc", "vcg"].contains(&k.as_str()) {
            return bad("invalid_type", "type must be one of vps, vhp, vdc, vcg");
        }
    }
    let s = match snapshot(&m).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list: Vec<Value> = s
        .plans
        .iter()
        .filter(|p| kind.as_deref().is_none_or(|k| p.category() == k))
        .map(plan_json)
        .collect();
    Json(json!({"count": list.len(), "plans": list})).into_response()
}

async fn regions(State(m): State<Machines>) -> Response {
    let s = match snapshot(&m).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list: Vec<Value> = s
        .regions
        .iter()
        .map(|r| {
            json!({"id": r.region.id, "city": r.region.city, "country": r.region.country,
                "continent": r.region.continent, "provider": r.provider.as_str()})
        })
        .collect();
    Json(json!({"regions": list})).into_response()
}

async fn os(State(m): State<Machines>) -> Response {
    let s = match snapshot(&m).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list: Vec<Value> =
        s.os.iter()
            .map(|o| {
                json!({"id": o.os.id, "name": o.os.name, "arch": o.os.arch,
                "family": o.os.family, "provider": o.provider.as_str()})
            })
            .collect();
    Json(json!({"os_options": list})).into_response()
}

/// An instance as clients see it: never its password.
pub fn instance_json(o: &ComputeOrder) -> Value {
    let mut v = json!({
        "id": o.id,
        "provider": o.provider,
        "provider_instance_id": o.provider_instance_id,
        "plan": o.plan,
        "region": o.region,
        "os_id": o.os_id,
        "label": o.label,
        "status": o.state,
        "ip_address": o.ip_address,
        "hourly_cost": usd(o.hourly),
        "hourly_cost_micros": o.hourly.0,
        "paid": o.paid.to_usd_string(),
        "paid_micros": o.paid.0,
        "prepaid_hours": o.prepaid_hours,
        "disk": o.disk_gb,
        "expires_at": format_rfc3339_ms(o.expires_at_ms),
        "expires_at_ms": o.expires_at_ms,
        "created_at": format_rfc3339_ms(o.created_at_ms),
        "payment": o.funding,
        "tx_hash": o.tx_hash,
        "ssh_key": o.ssh_key,
        "password_available": o.password_waiting,
    });
    if o.provider == "vultr" {
        v["vultr_instance_id"] = json!(o.provider_instance_id);
    }
    v
}

/// The 402 answered when credits are short: the position and the
/// shortfall.
pub(crate) fn short_credits(balance: Micros, needed: Micros) -> Response {
    let shortfall = needed.checked_sub(balance).unwrap_or_default();
    (
        StatusCode::PAYMENT_REQUIRED,
        Json(json!({
            "error": {"message": format!("insufficient credits: {} USD short", shortfall.to_usd_string()),
                "type": "payment_required", "code": "insufficient_credits"},
            "balance": balance.to_usd_string(),
            "balance_micros": balance.0,
            "needed": needed.to_usd_string(),
            "needed_micros": needed.0,
            "shortfall": shortfall.to_usd_string(),
            "shortfall_micros": shortfall.0,
        })),
    )
        .into_response()
}

fn network_ok(m: &Machines, n: Option<&str>) -> bool {
    n.is_none_or(|n| {
        m.payments()
            .config()
            .networks
            .iter()
            .any(|net| net.v1_name == n || net.caip2() == n)
    })
}

/// `hourly × hours`, or None on overflow.
fn price_of(hourly: Micros, hours: u64) -> Option<Micros> {
    hourly.0.checked_mul(hours).map(Micros)
}

/// The account behind a request, if it names one.
async fn account_of(m: &Machines, req: &RequestParts<'_>) -> Result<Option<WalletId>, Response> {
    match m.payments().authenticate(req).await {
        Ok(Some(p)) => Ok(Some(p.wallet().clone())),
        Ok(None) => Ok(None),
        Err(e) => Err(refusal(m.payments(), &e, None)),
    }
}

/// The account a management call needs.
async fn owner_of(m: &Machines, req: &RequestParts<'_>) -> Result<WalletId, Response> {
    match account_of(m, req).await? {
        Some(w) => Ok(w),
        None => Err(refusal(m.payments(), &PaymentError::AuthMissing, None)),
    }
}

/// Instance `id`, whoever owns it; 404 when there is none.
async fn instance(m: &Machines, id: &str) -> Result<ComputeOrder, Response> {
    if id.len() > 64 {
        return Err(not_found());
    }
    match m.store().compute_order(id).await {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err(not_found()),
        Err(e) => Err(internal(e)),
    }
}

/// The caller's instance `id`; 404 for a missing one and for another
/// wallet's alike.
async fn owned(m: &Machines, id: &str, owner: &WalletId) -> Result<ComputeOrder, Response> {
    match instance(m, id).await? {
        o if &o.owner == owner => Ok(o),
        _ => Err(not_found()),
    }
}

/// A management route's answer: `Err` carries a finished error response,
/// so that steps can be chained with `?`.
type Answer = Result<Response, Response>;

/// What every management route starts from: the request body (read within
/// its limit), the authenticated caller, and the caller's instance.
struct Managed {
    owner: WalletId,
    order: ComputeOrder,
    body: axum::body::Bytes,
}

/// Read the body, authenticate the caller (X-Auth over the body, or an
/// API key) and look up their instance `id` (404 when it is missing or
/// someone else's).
async fn managed(
    m: &Machines,
    id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Managed, Response> {
    let body = read_body(body).await?;
    let owner = owner_of(m, &parts(method, uri, headers, &body)).await?;
    let order = owned(m, id, &owner).await?;
    Ok(Managed { owner, order, body })
}

/// The configured client of a stored order's provider.
fn provider_for(m: &Machines, provider: &str) -> Result<Arc<dyn Provider>, Response> {
    ProviderKind::parse(provider)
        .and_then(|k| m.provider(k))
        .cloned()
        .ok_or_else(|| internal("provider not configured"))
}

/// Run provider-facing work in its own task, so that a dropped request
/// cannot stop it between the provider and the store.
async fn detached<F>(f: F) -> Response
where
    F: std::future::Future<Output = Response> + Send + 'static,
{
    tokio::spawn(f).await.unwrap_or_else(internal)
}

/// A validated provision request.
struct Order {
    plan: Plan,
    region: String,
    os_id: u64,
    label: String,
    hours: u64,
    ssh_key: Option<String>,
    use_credits: bool,
    price: Micros,
}

fn parse_provision(m: &Machines, s: &Snapshot, body: &[u8]) -> Result<Order, Response> {
    let o = json_object(body)?;
    let plan_id =
        field_str(&o, "plan", 128)?.ok_or_else(|| bad("invalid_plan", "plan is required"))?;
    let region =
        field_str(&o, "region", 64)?.ok_or_else(|| bad("invalid_region", "region is required"))?;
    let os_id = field_u64(&o, "os_id")?.ok_or_else(|| bad("invalid_os_id", "os_id is required"))?;
    let label = field_str(&o, "label", MAX_LABEL_CHARS * 4)?.unwrap_or_default();
    if label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
        return Err(bad(
            "invalid_label",
            "label must be at most 64 printable characters",
        ));
    }
    let cfg = m.config();
    let hours = field_u64(&o, "prepaid_hours")?.unwrap_or(cfg.min_hours);
    if hours < cfg.min_hours || hours > cfg.max_hours {
        return Err(bad(
            "invalid_prepaid_hours",
            &format!(
                "prepaid_hours must be between {} and {}",
                cfg.min_hours, cfg.max_hours
            ),
        ));
    }
    let ssh_key = field_str(&o, "ssh_public_key", MAX_SSH_KEY_BYTES)?
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty());
    if let Some(k) = &ssh_key {
        if !valid_ssh_key(k) {
            return Err(bad(
                "invalid_ssh_public_key",
                "ssh_public_key is not an OpenSSH public key",
            ));
        }
    }
    let provider = field_str(&o, "provider", 32)?;
    let network = field_str(&o, "network", 64)?;
    if !network_ok(m, network.as_deref()) {
        return Err(bad("invalid_network", "unsupported network"));
    }
    let use_credits = field_bool(&o, "use_credits")?;
    let plan = s
        .plan(&plan_id)
        .cloned()
        .ok_or_else(|| bad("unknown_plan", "no such plan"))?;
    if let Some(p) = provider {
        match ProviderKind::parse(&p) {
            Some(k) if k == plan.provider => {}
            Some(_) => {
                return Err(bad(
                    "provider_mismatch",
                    "the plan belongs to another provider",
                ))
            }
            None => return Err(bad("unknown_provider", "no such provider")),
        }
    }
    if !s.has_region(plan.provider, &region)
        || (!plan.spec.locations.is_empty() && !plan.spec.locations.contains(&region))
    {
        return Err(bad(
            "unknown_region",
            "the plan is not offered in that region",
        ));
    }
    if !s.has_os(plan.provider, os_id) {
        return Err(bad("unknown_os", "no such OS image for this provider"));
    }
    if plan.provider == ProviderKind::DigitalOcean && ssh_key.is_none() {
        return Err(bad(
            "ssh_key_required",
            "DigitalOcean machines need ssh_public_key (there is no root password fallback)",
        ));
    }
    let price = price_of(plan.hourly, hours)
        .filter(|p| i64::try_from(p.0).is_ok())
        .ok_or_else(|| bad("invalid_prepaid_hours", "price out of range"))?;
    Ok(Order {
        plan,
        region,
        os_id,
        label,
        hours,
        ssh_key,
        use_credits,
        price,
    })
}

async fn provision(
    State(m): State<Machines>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let snap = match snapshot(&m).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let order = match parse_provision(&m, &snap, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let p = m.payments().clone();
    let req = parts(&method, &uri, &headers, &body);
    let account = match account_of(&m, &req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let now = m.clock().now_ms();
    let expires = now.saturating_add(i64::try_from(order.hours).unwrap_or(0) * 3_600_000);
    let provider_name = order.plan.provider.as_str();
    let (owner, pending, mpp_without_auth) = if order.use_credits {
        let Some(wallet) = account.clone() else {
            return refusal(&p, &PaymentError::AuthMissing, None);
        };
        (wallet, None, false)
    } else {
        let offer = p.offer(
            &headers,
            &uri,
            order.price,
            &format!("{} machine for {} h", order.plan.id, order.hours),
        );
        let pending = match p.accept_payment(&headers, &offer).await {
            Ok(Some(pending)) => pending,
            Ok(None) => return challenge(&p, &offer, "payment required"),
            Err(e) => return refusal(&p, &e, Some(&offer)),
        };
        let owner = match &account {
            Some(w) if w.as_str().starts_with("0x") && *w != pending.wallet => {
                p.release(pending).await;
                return refusal(&p, &PaymentError::PayerMismatch, None);
            }
            Some(w) => w.clone(),
            None => pending.wallet.clone(),
        };
        let mpp = pending.method == PaymentMethod::Mpp && account.is_none();
        (owner, Some(pending), mpp)
    };
    let funding = pending
        .as_ref()
        .map(|p| p.method.scheme())
        .unwrap_or("credits");
    let new = NewComputeOrder {
        id: &id,
        owner: &owner,
        provider: provider_name,
        plan: &order.plan.id,
        region: &order.region,
        os_id: order.os_id,
        label: &order.label,
        hourly: order.plan.hourly,
        price: order.price,
        prepaid_hours: order.hours,
        disk_gb: order.plan.spec.disk,
        expires_at_ms: expires,
        funding,
        ssh_key: order.ssh_key.is_some(),
    };
    let hold_from = order.use_credits.then_some(&owner);
    if let Err(e) = m
        .store()
        .compute_create_order(&new, hold_from, owner.as_str())
        .await
    {
        if let Some(pending) = pending {
            p.release(pending).await;
        }
        return match e {
            StoreError::InsufficientCredits { balance, needed } => short_credits(balance, needed),
            e => internal(e),
        };
    }
    let Some(provider) = m.provider(order.plan.provider).cloned() else {
        return internal("a catalogue plan without its provider");
    };
    let spec = super::provider::CreateSpec {
        plan: order.plan.spec.id.clone(),
        region: order.region.clone(),
        os_id: order.os_id,
        label: order.label.clone(),
        ssh_public_key: order.ssh_key.clone(),
        tag: Machines::tag(&id),
    };
    detached(async move {
        let store = m.store().clone();
        let actor = owner.as_str().to_owned();
        let inst = match provider.create(&spec).await {
            Ok(i) => i,
            Err(e) => {
                if let Some(pending) = pending {
                    p.release(pending).await;
                }
                let refunded = store
                    .compute_fail(&id, false, SYSTEM, &format!("the provider refused: {e}"))
                    .await;
                return match refunded {
                    Ok(r) => provider_failed(e, r.unwrap_or_default()),
                    Err(se) => internal(se),
                };
            }
        };
        let sealed = inst
            .default_password
            .as_ref()
            .filter(|_| spec.ssh_public_key.is_none())
            .map(|pw| m.config().sealer.seal(&id, pw));
        if let Err(e) = store
            .compute_mark_provisioning(&id, &inst.id, sealed.as_deref(), SYSTEM)
            .await
        {
            return internal(e);
        }
        let mut tx_hash = None;
        let mut settle_headers = HeaderMap::new();
        let settled = pending.is_some();
        if let Some(pending) = pending {
            let amount = pending.amount;
            match p.settle(pending, None).await {
                Ok(s) => {
                    if let Err(e) = store
                        .compute_record_payment(&id, &s.transaction, amount, &actor)
                        .await
                    {
                        tracing::error!(error = %e, order = %id, "settled payment not recorded on the order");
                    }
                    tx_hash = Some(s.transaction.clone());
                    settle_headers = s.headers;
                }
                Err(e) => {
                    // Not paid: the machine must not live.
                    let _ = provider.delete(&inst.id).await;
                    let _ = store
                        .compute_fail(&id, false, SYSTEM, &format!("payment failed: {e}"))
                        .await;
                    return refusal(&p, &e, None);
                }
            }
        }
        let o = match m
            .finish_provisioning(&id, provider.as_ref(), &inst.id, settled)
            .await
        {
            Ok(o) => o,
            Err(FinishError::Provider { error, refunded }) => {
                return provider_failed(error, refunded)
            }
            Err(FinishError::Store(e)) => return internal(e),
        };
        let mut out = json!({
            "success": true,
            "order": instance_json(&o),
            "tx_hash": tx_hash,
            "charged": o.paid.to_usd_string(),
            "charged_micros": o.paid.0,
        });
        if mpp_without_auth {
            match p.create_api_key(&o.owner, &format!("machine {}", o.id)).await {
                Ok((key, rec)) => {
                    out["management_api_key"] = json!(key.secret.as_str());
                    out["management_api_key_id"] = json!(rec.id);
                    out["management_api_key_last4"] = json!(rec.key_last4);
                    out["management_note"] = json!(
                        "Store this API key securely. It is shown once and manages this instance."
                    );
                }
                Err(e) => tracing::error!(error = %e, "could not mint the management key"),
            }
        }
        let mut resp = Json(out).into_response();
        resp.headers_mut().extend(settle_headers);
        resp
    })
    .await
}

async fn list(State(m): State<Machines>, method: Method, uri: Uri, headers: HeaderMap) -> Answer {
    let owner = owner_of(&m, &parts(&method, &uri, &headers, b"")).await?;
    let v = m
        .store()
        .compute_orders_of(&owner)
        .await
        .map_err(internal)?;
    let list: Vec<Value> = v.iter().map(instance_json).collect();
    Ok(Json(json!({"count": list.len(), "instances": list})).into_response())
}

async fn show(
    State(m): State<Machines>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let c = managed(&m, &id, &method, &uri, &headers, body).await?;
    Ok(Json(json!({"instance": instance_json(&c.order)})).into_response())
}

async fn destroy(
    State(m): State<Machines>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let Managed {
        owner, order: o, ..
    } = managed(&m, &id, &method, &uri, &headers, body).await?;
    if o.state != "active" && o.state != "provisioning" {
        return Err(conflict(
            "not_running",
            &format!("the instance is {}", o.state),
        ));
    }
    let provider = provider_for(&m, &o.provider)?;
    Ok(detached(async move {
        if let Some(mid) = &o.provider_instance_id {
            if let Err(e) = provider.delete(mid).await {
                return provider_failed(e, Micros::ZERO);
            }
        }
        match m
            .store()
            .compute_end(&o.id, "destroyed", owner.as_str(), "destroyed by its owner")
            .await
        {
            Ok(_) => {
                Json(json!({"success": true, "id": o.id, "status": "destroyed"})).into_response()
            }
            Err(e) => internal(e),
        }
    })
    .await)
}

async fn password(
    State(m): State<Machines>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let Managed {
        owner, order: o, ..
    } = managed(&m, &id, &method, &uri, &headers, body).await?;
    if o.ssh_key || o.provider != "vultr" {
        return Err(conflict(
            "no_password",
            "this instance uses SSH key access; there is no password fallback",
        ));
    }
    let sealed = m
        .store()
        .compute_take_password(&o.id, owner.as_str())
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            conflict(
                "password_already_retrieved",
                "the one-time password was already retrieved or is not available",
            )
        })?;
    let pw = m.config().sealer.open(&o.id, &sealed).map_err(internal)?;
    Ok(Json(json!({
        "success": true,
        "access": {
            "method": "one_time_password",
            "username": "root",
            "ip_address": o.ip_address,
            "password": pw.as_str(),
        }
    }))
    .into_response())
}

/// `POST /compute/instances/{id}/extend`. With X-Auth or an API key the
/// caller's instance is extended, by credits, x402 or MPP. Without, only
/// an x402 payment can extend (as seed 000 allows), and only when its
/// payer wallet owns the instance: any other payer gets the 404 of a
/// missing instance and its payment is released unsettled. MPP and credits
/// need an account (an MPP payment need not name a wallet).
async fn extend(
    State(m): State<Machines>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let body = read_body(body).await?;
    let fields = json_object(&body)?;
    let cfg = m.config();
    let hours = field_u64(&fields, "extend_hours")?
        .filter(|h| (1..=cfg.max_hours).contains(h))
        .ok_or_else(|| {
            bad(
                "invalid_extend_hours",
                &format!("extend_hours must be between 1 and {}", cfg.max_hours),
            )
        })?;
    let use_credits = field_bool(&fields, "use_credits")?;
    if !network_ok(&m, field_str(&fields, "network", 64)?.as_deref()) {
        return Err(bad("invalid_network", "unsupported network"));
    }
    let p = m.payments().clone();
    let account = account_of(&m, &parts(&method, &uri, &headers, &body)).await?;
    let o = match &account {
        Some(owner) => owned(&m, &id, owner).await?,
        None if use_credits => return Err(refusal(&p, &PaymentError::AuthMissing, None)),
        // Whose it is can be known only from the payment.
        None => instance(&m, &id).await?,
    };
    let not_running = || {
        Err(conflict(
            "not_running",
            &format!("the instance is {}", o.state),
        ))
    };
    if account.is_some() && o.state != "active" {
        return not_running();
    }
    let price = price_of(o.hourly, hours)
        .filter(|p| i64::try_from(p.0).is_ok())
        .ok_or_else(|| bad("invalid_extend_hours", "price out of range"))?;
    if let (true, Some(owner)) = (use_credits, &account) {
        return match m
            .store()
            .compute_extend_with_credits(&o.id, owner, hours, price, owner.as_str())
            .await
        {
            Ok(Some(o)) => Ok(Json(json!({"success": true, "instance": instance_json(&o),
                "charged": price.to_usd_string(), "charged_micros": price.0}))
            .into_response()),
            Ok(None) => Err(conflict("not_running", "the instance is not active")),
            Err(StoreError::InsufficientCredits { balance, needed }) => {
                Err(short_credits(balance, needed))
            }
            Err(e) => Err(internal(e)),
        };
    }
    let offer = p.offer(
        &headers,
        &uri,
        price,
        &format!("{hours} more hours of machine {}", o.id),
    );
    let pending = match p.accept_payment(&headers, &offer).await {
        Ok(Some(pending)) => pending,
        Ok(None) => return Err(challenge(&p, &offer, "payment required")),
        Err(e) => return Err(refusal(&p, &e, Some(&offer))),
    };
    // Who may pay is checked before anything settles: a refused payment
    // is released, never charged.
    let refused = match &account {
        Some(owner) if owner.as_str().starts_with("0x") && pending.wallet != *owner => {
            Some(refusal(&p, &PaymentError::PayerMismatch, None))
        }
        Some(_) => None,
        None if pending.method == PaymentMethod::Mpp => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "auth_required",
            "an MPP extension needs X-Auth or an API key (the management_api_key of an MPP provision)",
        )),
        None if pending.wallet != o.owner => Some(not_found()),
        None if o.state != "active" => not_running().err(),
        None => None,
    };
    if let Some(r) = refused {
        p.release(pending).await;
        return Err(r);
    }
    let actor = account.unwrap_or_else(|| pending.wallet.clone());
    Ok(detached(async move {
        let s = match p.settle(pending, None).await {
            Ok(s) => s,
            Err(e) => return refusal(&p, &e, Some(&offer)),
        };
        match m
            .store()
            .compute_extend_paid(&o.id, hours, price, &s.transaction, actor.as_str())
            .await
        {
            Ok(Some(o)) => {
                let mut resp = Json(json!({"success": true, "instance": instance_json(&o),
                    "charged": price.to_usd_string(), "charged_micros": price.0,
                    "tx_hash": s.transaction}))
                .into_response();
                resp.headers_mut().extend(s.headers);
                resp
            }
            Ok(None) => internal("the order vanished after payment"),
            Err(e) => internal(e),
        }
    })
    .await)
}

/// The prepaid value left at `now_ms`: `hourly × remaining time`, rounded
/// down to the micro-dollar.
pub fn remaining_value(hourly: Micros, expires_at_ms: i64, now_ms: i64) -> Micros {
    let left = u128::try_from(expires_at_ms.saturating_sub(now_ms).max(0)).unwrap_or(0);
    Micros(u64::try_from(u128::from(hourly.0) * left / 3_600_000).unwrap_or(u64::MAX))
}

/// When `value` runs out at `hourly`, from `now_ms` (rounded down to the
/// millisecond).
pub fn expiry_for(value: Micros, hourly: Micros, now_ms: i64) -> i64 {
    if hourly.0 == 0 {
        return now_ms;
    }
    let ms = u128::from(value.0) * 3_600_000 / u128::from(hourly.0);
    now_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

async fn resize(
    State(m): State<Machines>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let Managed {
        owner,
        order: o,
        body,
    } = managed(&m, &id, &method, &uri, &headers, body).await?;
    let fields = json_object(&body)?;
    let plan_id =
        field_str(&fields, "plan", 128)?.ok_or_else(|| bad("invalid_plan", "plan is required"))?;
    let confirm = field_bool(&fields, "confirm_disk_resize")?;
    if o.state != "active" {
        return Err(conflict(
            "not_running",
            &format!("the instance is {}", o.state),
        ));
    }
    let snap = snapshot(&m).await?;
    let target = snap
        .plan(&plan_id)
        .cloned()
        .ok_or_else(|| bad("unknown_plan", "no such plan"))?;
    let refused = |code: &str, message: &str| Err(bad(code, message));
    if target.provider.as_str() != o.provider {
        return refused(
            "provider_mismatch",
            "a resize stays on the instance's provider",
        );
    }
    if target.id == o.plan {
        return refused("same_plan", "the instance already has this plan");
    }
    if !target.spec.locations.is_empty() && !target.spec.locations.contains(&o.region) {
        return refused(
            "region_unavailable",
            "the plan is not offered in the instance's region",
        );
    }
    let current = snap.plan(&o.plan);
    let grow_disk = target.spec.disk > o.disk_gb;
    match target.provider {
        ProviderKind::Vultr => {
            let smaller = target.spec.disk < o.disk_gb
                || target.hourly < o.hourly
                || current.is_some_and(|c| {
                    target.spec.vcpu_count < c.spec.vcpu_count || target.spec.ram < c.spec.ram
                });
            if smaller {
                return refused("downgrade_not_supported", "Vultr resizes are upgrade-only");
            }
        }
        ProviderKind::DigitalOcean => {
            if target.spec.disk < o.disk_gb {
                return refused(
                    "disk_shrink_not_supported",
                    "a DigitalOcean disk cannot shrink; choose a plan with at least the current disk",
                );
            }
            if grow_disk && !confirm {
                return refused(
                    "confirm_disk_resize_required",
                    "this resize grows the disk, which cannot be undone: send confirm_disk_resize: true",
                );
            }
        }
    }
    let provider = provider_for(&m, &o.provider)?;
    let mid = o
        .provider_instance_id
        .clone()
        .ok_or_else(|| conflict("not_running", "the instance has no machine yet"))?;
    Ok(detached(async move {
        let grow = grow_disk && target.provider == ProviderKind::DigitalOcean;
        if let Err(e) = provider.resize(&mid, &target.spec.id, grow).await {
            return provider_failed(e, Micros::ZERO);
        }
        let now = m.clock().now_ms();
        let value = remaining_value(o.hourly, o.expires_at_ms, now);
        let expires = expiry_for(value, target.hourly, now);
        let disk = if target.provider == ProviderKind::Vultr || grow {
            target.spec.disk
        } else {
            o.disk_gb
        };
        let detail = format!(
            "{} -> {}; remaining value {} µUSD kept; expiry {} -> {}",
            o.plan, target.id, value.0, o.expires_at_ms, expires
        );
        match m
            .store()
            .compute_resize(
                &o.id,
                &target.id,
                target.hourly,
                disk,
                expires,
                owner.as_str(),
                &detail,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return conflict("not_running", "the instance stopped during the resize"),
            Err(e) => return internal(e),
        }
        match m.store().compute_order(&o.id).await {
            Ok(Some(n)) => Json(json!({
                "success": true,
                "instance": instance_json(&n),
                "resize": {
                    "from_plan": o.plan,
                    "to_plan": target.id,
                    "resized_at": format_rfc3339_ms(now),
                    "resized_at_ms": now,
                    "remaining_value": value.to_usd_string(),
                    "remaining_value_micros": value.0,
                    "previous_expires_at_ms": o.expires_at_ms,
                    "expires_at_ms": expires,
                    "disk_resized": grow,
                }
            }))
            .into_response(),
            Ok(None) => internal("order vanished"),
            Err(e) => internal(e),
        }
    })
    .await)
}
