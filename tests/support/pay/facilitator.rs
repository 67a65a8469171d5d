//! A loopback stand-in for an x402 facilitator, speaking its HTTP API
//! (`POST /verify`, `POST /settle`, `GET /supported`). The blockchain cannot
//! be reached from tests, so settlement is simulated: a settled
//! authorization gets a deterministic transaction hash, and settling the
//! same (asset, from, nonce) twice fails as the token contract would.
//! Switches make it refuse or fail, to test that failures consume nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Default)]
pub struct FacilitatorState {
    /// /verify answers isValid: false.
    pub refuse_verify: AtomicBool,
    /// /settle answers success: false.
    pub refuse_settle: AtomicBool,
    /// /settle answers HTTP 500.
    pub crash_settle: AtomicBool,
    pub verify_calls: AtomicUsize,
    pub settle_calls: AtomicUsize,
    /// Settle calls per authorization (asset:from:nonce), refused or not.
    pub settle_attempts: Mutex<HashMap<String, usize>>,
    settled: Mutex<HashSet<String>>,
}

pub struct Facilitator {
    pub url: String,
    pub state: Arc<FacilitatorState>,
}

fn authorization(body: &Value) -> Option<&Value> {
    body.get("paymentPayload")?
        .get("payload")?
        .get("authorization")
}

fn well_formed(body: &Value) -> bool {
    let version = body.get("x402Version").and_then(Value::as_u64);
    let inner = body
        .get("paymentPayload")
        .and_then(|p| p.get("x402Version"))
        .and_then(Value::as_u64);
    version.is_some()
        && version == inner
        && body.get("paymentRequirements").is_some()
        && authorization(body).is_some()
}

async fn verify(
    State(s): State<Arc<FacilitatorState>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    s.verify_calls.fetch_add(1, Ordering::SeqCst);
    if !well_formed(&body) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"isValid": false, "invalidReason": "invalid_payload"})),
        );
    }
    let payer = authorization(&body).and_then(|a| a.get("from")).cloned();
    if s.refuse_verify.load(Ordering::SeqCst) {
        return (
            StatusCode::OK,
            Json(json!({"isValid": false, "invalidReason": "insufficient_funds", "payer": payer})),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"isValid": true, "payer": payer})),
    )
}

async fn settle(
    State(s): State<Arc<FacilitatorState>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    s.settle_calls.fetch_add(1, Ordering::SeqCst);
    if s.crash_settle.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "boom"})),
        );
    }
    if !well_formed(&body) {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"success": false, "errorReason": "invalid_payload", "transaction": "", "network": ""}),
            ),
        );
    }
    let auth = authorization(&body).cloned().unwrap_or_default();
    let network = body["paymentRequirements"]["network"].clone();
    let payer = auth["from"].clone();
    let asset = body["paymentRequirements"]["asset"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    let key = format!(
        "{asset}:{}:{}",
        auth["from"].as_str().unwrap_or("").to_lowercase(),
        auth["nonce"].as_str().unwrap_or("").to_lowercase()
    );
    *s.settle_attempts
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default() += 1;
    if s.refuse_settle.load(Ordering::SeqCst) {
        return (
            StatusCode::OK,
            Json(
                json!({"success": false, "errorReason": "unexpected_settle_error", "transaction": "", "network": network, "payer": payer}),
            ),
        );
    }
    if !s.settled.lock().unwrap().insert(key.clone()) {
        // The token contract refuses a used authorization.
        return (
            StatusCode::OK,
            Json(
                json!({"success": false, "errorReason": "invalid_exact_evm_nonce_already_used", "transaction": "", "network": network, "payer": payer}),
            ),
        );
    }
    let tx = format!("0x{}", hex::encode(Sha256::digest(key.as_bytes())));
    (
        StatusCode::OK,
        Json(json!({"success": true, "transaction": tx, "network": network, "payer": payer})),
    )
}

async fn supported() -> Json<Value> {
    Json(json!({"kinds": [
        {"x402Version": 1, "scheme": "exact", "network": "base"},
        {"x402Version": 2, "scheme": "exact", "network": "eip155:8453"},
    ], "extensions": [], "signers": {}}))
}

/// Start the stand-in on 127.0.0.1:0.
pub async fn start() -> Facilitator {
    let state = Arc::new(FacilitatorState::default());
    let app = Router::new()
        .route("/verify", post(verify))
        .route("/settle", post(settle))
        .route("/supported", get(supported))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Facilitator {
        url: format!("http://{addr}"),
        state,
    }
}
