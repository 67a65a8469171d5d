//! A loopback stand-in for an x402 facilitator, speaking its HTTP API
//! (`POST /verify`, `POST /settle`, `GET /supported`). The blockchain cannot
//! be reached from tests, so settlement is simulated: a settled
//! authorization gets a deterministic transaction hash, and settling the
//! same (asset, from, nonce) twice fails as the token contract would.
//! Switches make it refuse or fail, to test that failures consume nothing.
//! Like a hosted facilitator it can demand credentials on every request: a
//! bearer token, or a Coinbase CDP API key's per-request JWT, checked as CDP
//! checks it (signature, `iss`, `sub`, `kid`, `nonce`, `uri`, time window).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The credentials a stand-in demands.
#[derive(Clone, Debug)]
pub enum ExpectedAuth {
    Bearer(String),
    CdpEd25519 {
        key_id: String,
        key: ed25519_dalek::VerifyingKey,
    },
    CdpEs256 {
        key_id: String,
        key: p256::ecdsa::VerifyingKey,
    },
}

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
    /// Credentials every request must carry; None: none asked.
    pub auth: Mutex<Option<ExpectedAuth>>,
    /// Requests whose credentials were checked and accepted, and refused.
    pub auth_accepted: AtomicUsize,
    pub auth_refused: AtomicUsize,
    /// What `GET /supported` lists.
    pub kinds: Mutex<Vec<Value>>,
}

impl Default for FacilitatorState {
    fn default() -> Self {
        FacilitatorState {
            refuse_verify: AtomicBool::default(),
            refuse_settle: AtomicBool::default(),
            crash_settle: AtomicBool::default(),
            verify_calls: AtomicUsize::default(),
            settle_calls: AtomicUsize::default(),
            settled: Mutex::default(),
            settle_attempts: Mutex::default(),
            auth: Mutex::default(),
            auth_accepted: AtomicUsize::default(),
            auth_refused: AtomicUsize::default(),
            kinds: Mutex::new(vec![
                json!({"x402Version": 1, "scheme": "exact", "network": "base"}),
                json!({"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}),
            ]),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Check a CDP request JWT for `method host/path`; the reason it fails.
fn check_cdp_jwt(
    jwt: &str,
    key_id: &str,
    want_alg: &str,
    verify: impl Fn(&[u8], &[u8]) -> bool,
    uri: &str,
) -> Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, sig] = parts[..] else {
        return Err("not a compact JWS".into());
    };
    let decode = |s: &str| -> Result<Value, String> {
        let b = URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string())?;
        serde_json::from_slice(&b).map_err(|e| e.to_string())
    };
    let header = decode(h)?;
    let claims = decode(c)?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|e| e.to_string())?;
    if header["alg"] != want_alg || header["kid"] != key_id || header["typ"] != "JWT" {
        return Err(format!("header {header}"));
    }
    let nonce = header["nonce"].as_str().unwrap_or("");
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("nonce {nonce:?}"));
    }
    if !verify(format!("{h}.{c}").as_bytes(), &sig) {
        return Err("bad signature".into());
    }
    let now = unix_now();
    let nbf = claims["nbf"].as_u64().unwrap_or(u64::MAX);
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if claims["iss"] != "cdp"
        || claims["sub"] != key_id
        || claims["uri"] != uri
        || nbf > now + 5
        || exp < now
        || exp.saturating_sub(nbf) > 120
    {
        return Err(format!("claims {claims} for {uri}"));
    }
    Ok(())
}

/// Refuse a request without the demanded credentials (401, as a hosted
/// facilitator does).
async fn require_auth(
    State(s): State<Arc<FacilitatorState>>,
    req: Request,
    next: Next,
) -> Response {
    let expected = s.auth.lock().unwrap().clone();
    if let Some(expected) = expected {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_owned();
        let host = req
            .headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let uri = format!("{} {host}{}", req.method(), req.uri().path());
        let verdict = match &expected {
            ExpectedAuth::Bearer(t) => {
                if &given == t {
                    Ok(())
                } else {
                    Err("wrong bearer token".to_string())
                }
            }
            ExpectedAuth::CdpEd25519 { key_id, key } => check_cdp_jwt(
                &given,
                key_id,
                "EdDSA",
                |msg, sig| {
                    <[u8; 64]>::try_from(sig).is_ok_and(|s| {
                        key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&s))
                            .is_ok()
                    })
                },
                &uri,
            ),
            ExpectedAuth::CdpEs256 { key_id, key } => check_cdp_jwt(
                &given,
                key_id,
                "ES256",
                |msg, sig| {
                    use p256::ecdsa::signature::Verifier as _;
                    p256::ecdsa::Signature::from_slice(sig)
                        .is_ok_and(|s| key.verify(msg, &s).is_ok())
                },
                &uri,
            ),
        };
        if let Err(why) = verdict {
            s.auth_refused.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"errorType": "unauthorized", "errorMessage": why})),
            )
                .into_response();
        }
        s.auth_accepted.fetch_add(1, Ordering::SeqCst);
    }
    next.run(req).await
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

async fn supported(State(s): State<Arc<FacilitatorState>>) -> Json<Value> {
    let kinds = s.kinds.lock().unwrap().clone();
    Json(json!({"kinds": kinds, "extensions": [], "signers": {}}))
}

/// Start the stand-in on 127.0.0.1:0.
pub async fn start() -> Facilitator {
    start_with(None).await
}

/// Start a stand-in that demands `auth` on every request.
pub async fn start_with(auth: Option<ExpectedAuth>) -> Facilitator {
    let state = Arc::new(FacilitatorState::default());
    *state.auth.lock().unwrap() = auth;
    let app = Router::new()
        .route("/verify", post(verify))
        .route("/settle", post(settle))
        .route("/supported", get(supported))
        .layer(middleware::from_fn_with_state(state.clone(), require_auth))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Facilitator {
        url: format!("http://{addr}"),
        state,
    }
}
