//! The payments HTTP surface, an axum [`Router`] the compute plane and the
//! coordinator both mount:
//!
//! | Method and path | Auth | Purpose |
//! |---|---|---|
//! | `POST /compute/api-keys` | X-Auth signature | mint a key, shown once |
//! | `GET /compute/api-keys` | X-Auth or key | list the wallet's keys |
//! | `DELETE /compute/api-keys/{id}` | X-Auth signature | revoke |
//! | `GET /compute/credits/balance` | X-Auth or key | the wallet's credits |
//! | `POST /compute/credits/topup` | x402 or MPP payment (auth optional) | add credits, minimum $1 |
//!
//! Failures use the client-API error shape `{"error": {message, type,
//! code}}`, except payment refusals: 402 with the x402 v1 body and fresh
//! challenge headers, and for MPP credentials an RFC 9457 problem
//! (`application/problem+json`).

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::PaymentError;
use super::service::{Payer, Payments, RequestParts};
use super::x402::Offer;
use crate::money::Micros;
use crate::store::WalletId;
use crate::timefmt::format_rfc3339_ms;

/// The largest request body these routes read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The routes above, over `payments`.
pub fn router(payments: Payments) -> Router {
    Router::new()
        .route("/compute/api-keys", post(create_key).get(list_keys))
        .route("/compute/api-keys/{id}", delete(revoke_key))
        .route("/compute/credits/balance", get(balance))
        .route("/compute/credits/topup", post(topup))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(payments)
}

/// An error answered in the client-API shape.
pub fn error_response(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response()
}

/// The 402 challenge for `offer`: the x402 v1 body, `PAYMENT-REQUIRED` and,
/// with MPP, `WWW-Authenticate`.
pub fn challenge(payments: &Payments, offer: &Offer, reason: &str) -> Response {
    let mut resp = (
        StatusCode::PAYMENT_REQUIRED,
        Json(payments.challenge_body(offer, reason)),
    )
        .into_response();
    resp.headers_mut()
        .extend(payments.challenge_headers(offer, reason));
    resp
}

/// The answer to a refused request. Payment refusals with an offer become a
/// fresh 402 challenge naming the reason; MPP refusals an RFC 9457 problem
/// with a fresh challenge; auth failures 401; internal failures a generic
/// 500/502 (details go to the log only).
pub fn refusal(payments: &Payments, err: &PaymentError, offer: Option<&Offer>) -> Response {
    match err {
        PaymentError::InsufficientCredits { balance, needed } => {
            // The shortfall is `needed - balance`: both are given, in USD
            // (as `/compute/credits/balance` gives amounts) and in µUSD.
            let mut body = json!({"error": {
                "message": "insufficient credits", "type": "payment_required",
                "code": "insufficient_credits",
                "balance": balance.to_usd_string(), "needed": needed.to_usd_string(),
                "balance_micros": balance.0, "needed_micros": needed.0}});
            if let Some(offer) = offer {
                let v1 = payments.challenge_body(offer, "insufficient_credits");
                body["x402Version"] = json!(1);
                body["accepts"] = v1["accepts"].clone();
            }
            let mut resp = (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response();
            if let Some(offer) = offer {
                resp.headers_mut()
                    .extend(payments.challenge_headers(offer, "insufficient_credits"));
            }
            resp
        }
        PaymentError::PayerMismatch => error_response(
            StatusCode::FORBIDDEN,
            "authentication_error",
            err.code(),
            "the payment must come from the authenticated wallet",
        ),
        e if e.is_mpp() || (e.is_payment_refusal() && offer.is_some()) => {
            let Some(offer) = offer else {
                return error_response(
                    StatusCode::PAYMENT_REQUIRED,
                    "payment_required",
                    e.code(),
                    &e.to_string(),
                );
            };
            if e.is_mpp() {
                let problem = json!({
                    "type": format!("https://paymentauth.org/problems/{}", e.code()),
                    "title": e.to_string(),
                    "status": 402,
                    "detail": e.to_string(),
                });
                let mut resp = (StatusCode::PAYMENT_REQUIRED, Json(problem)).into_response();
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/problem+json"),
                );
                resp.headers_mut()
                    .extend(payments.challenge_headers(offer, e.code()));
                resp
            } else {
                challenge(payments, offer, e.code())
            }
        }
        e if e.is_payment_refusal() => error_response(
            StatusCode::PAYMENT_REQUIRED,
            "payment_required",
            e.code(),
            &e.to_string(),
        ),
        PaymentError::AuthMissing
        | PaymentError::AuthInvalid(_)
        | PaymentError::AuthExpired
        | PaymentError::AuthNonceUsed
        | PaymentError::ApiKeyInvalid
        | PaymentError::ApiKeyConflict => error_response(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            err.code(),
            &err.to_string(),
        ),
        PaymentError::BadRequest(_) => error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            err.code(),
            &err.to_string(),
        ),
        PaymentError::NotFound => {
            error_response(StatusCode::NOT_FOUND, "not_found", err.code(), "not found")
        }
        PaymentError::FacilitatorUnavailable(detail) => {
            tracing::warn!(%detail, "facilitator failure");
            error_response(
                StatusCode::BAD_GATEWAY,
                "payment_error",
                err.code(),
                "the payment facilitator is unavailable; nothing was charged",
            )
        }
        other => {
            tracing::error!(error = %other, "payments internal error");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "internal error",
            )
        }
    }
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

/// The account behind a management call; `signature_only` refuses API keys
/// (creating and revoking keys needs the wallet itself).
async fn account(
    p: &Payments,
    req: &RequestParts<'_>,
    signature_only: bool,
) -> Result<WalletId, Response> {
    match p.authenticate(req).await {
        Ok(Some(Payer::Wallet { wallet, .. })) => Ok(wallet),
        Ok(Some(Payer::ApiKey { wallet, .. })) if !signature_only => Ok(wallet),
        Ok(Some(_)) => Err(error_response(
            StatusCode::FORBIDDEN,
            "authentication_error",
            "signature_required",
            "this call needs a wallet signature (X-Auth headers)",
        )),
        Ok(None) => Err(refusal(p, &PaymentError::AuthMissing, None)),
        Err(e) => Err(refusal(p, &e, None)),
    }
}

async fn create_key(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wallet = match account(&p, &parts(&method, &uri, &headers, &body), true).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let label = if body.is_empty() {
        String::new()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => match v.get("label") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) if s.chars().count() <= 100 => s.clone(),
                Some(_) => {
                    return refusal(
                        &p,
                        &PaymentError::BadRequest(
                            "label must be a string of at most 100 characters",
                        ),
                        None,
                    )
                }
            },
            Err(_) => return refusal(&p, &PaymentError::BadRequest("body must be JSON"), None),
        }
    };
    match p.create_api_key(&wallet, &label).await {
        Ok((key, rec)) => (
            StatusCode::CREATED,
            Json(json!({
                "api_key": key.secret.as_str(),
                "id": rec.id,
                "label": rec.label,
                "wallet": rec.wallet.as_str(),
                "created_at": format_rfc3339_ms(rec.created_at_ms),
            })),
        )
            .into_response(),
        Err(e) => refusal(&p, &e, None),
    }
}

async fn list_keys(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let wallet = match account(&p, &parts(&method, &uri, &headers, b""), false).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match p.list_api_keys(&wallet).await {
        Ok(keys) => {
            let list: Vec<Value> = keys
                .iter()
                .map(|k| {
                    json!({
                        "id": k.id,
                        "label": k.label,
                        "key_last4": k.key_last4,
                        "created_at": format_rfc3339_ms(k.created_at_ms),
                        "revoked_at": k.revoked_at_ms.map(format_rfc3339_ms),
                    })
                })
                .collect();
            Json(json!({"api_keys": list})).into_response()
        }
        Err(e) => refusal(&p, &e, None),
    }
}

async fn revoke_key(
    State(p): State<Payments>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wallet = match account(&p, &parts(&method, &uri, &headers, &body), true).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match p.revoke_api_key(&wallet, &id).await {
        Ok(true) => Json(json!({"success": true, "id": id})).into_response(),
        Ok(false) => refusal(&p, &PaymentError::NotFound, None),
        Err(e) => refusal(&p, &e, None),
    }
}

async fn balance(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let wallet = match account(&p, &parts(&method, &uri, &headers, b""), false).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match p.balance(&wallet).await {
        Ok(b) => Json(json!({
            "wallet": wallet.as_str(),
            "balance": b.balance.to_usd_string(),
            "held": b.held.to_usd_string(),
            "total_deposited": b.total_deposited.to_usd_string(),
            "total_spent": b.total_spent.to_usd_string(),
            "balance_micros": b.balance.0,
        }))
        .into_response(),
        Err(e) => refusal(&p, &e, None),
    }
}

/// The top-up amount: a JSON number or string of USD, exact to the
/// micro-dollar. A JSON number is read through its shortest decimal form,
/// so `12.5` is exactly 12_500_000 µUSD and no float arithmetic happens.
fn topup_amount(body: &Value) -> Option<Micros> {
    match body.get("amount")? {
        Value::Number(n) => Micros::parse_usd(&n.to_string()),
        Value::String(s) => Micros::parse_usd(s.trim()),
        _ => None,
    }
}

async fn topup(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(json_body) = serde_json::from_slice::<Value>(&body) else {
        return refusal(
            &p,
            &PaymentError::BadRequest("body must be JSON with amount"),
            None,
        );
    };
    let Some(amount) = topup_amount(&json_body) else {
        return refusal(
            &p,
            &PaymentError::BadRequest("amount must be a USD amount with at most 6 decimals"),
            None,
        );
    };
    let cfg = p.config();
    if amount < cfg.min_topup || amount > cfg.max_topup {
        return refusal(
            &p,
            &PaymentError::BadRequest("amount out of range (minimum $1)"),
            None,
        );
    }
    if let Some(n) = json_body.get("network").and_then(Value::as_str) {
        if !cfg
            .networks
            .iter()
            .any(|net| net.v1_name == n || net.caip2() == n)
        {
            return refusal(&p, &PaymentError::BadRequest("unsupported network"), None);
        }
    }
    let offer = p.offer(&headers, &uri, amount, "SGL credits top-up");
    let req = parts(&method, &uri, &headers, &body);
    // An account, when named, is who gets the credits; then the payment
    // must come from that wallet.
    let account = match p.authenticate(&req).await {
        Ok(Some(payer)) => Some(payer.wallet().clone()),
        Ok(None) => None,
        Err(e) => return refusal(&p, &e, None),
    };
    let pending = match p.accept_payment(&headers, &offer).await {
        Ok(Some(pending)) => pending,
        Ok(None) => return challenge(&p, &offer, "payment required"),
        Err(e) => return refusal(&p, &e, Some(&offer)),
    };
    let wallet = match account {
        Some(w) if w.as_str().starts_with("0x") && w != pending.wallet => {
            p.release(pending).await;
            return error_response(
                StatusCode::FORBIDDEN,
                "authentication_error",
                "payer_mismatch",
                "the payment wallet must be the authenticated wallet",
            );
        }
        Some(w) => w,
        None => pending.wallet.clone(),
    };
    let credited = pending.amount;
    match p.settle(pending, Some((&wallet, credited))).await {
        Ok(s) => {
            let balance = s.balance.map(|b| b.balance).unwrap_or_default();
            let mut resp = Json(json!({
                "success": true,
                "wallet": wallet.as_str(),
                "deposited": credited.to_usd_string(),
                "deposited_micros": credited.0,
                "new_balance": balance.to_usd_string(),
                "tx_hash": s.transaction,
            }))
            .into_response();
            resp.headers_mut().extend(s.headers);
            resp
        }
        Err(e) => refusal(&p, &e, Some(&offer)),
    }
}
