//! An sgl payments server on loopback: the payments router plus two paid
//! resources, `POST /paid/echo` (a fixed price, through the gate API of
//! `sgl::payments::service`) and `POST /paid/metered` (quoted, then charged
//! at the actual cost, through `sgl::payments::billing` as the coordinator
//! bills a grid job).

use std::time::Duration;

use alloy_primitives::{address, Address};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use sgl::clock::ManualClock;
use sgl::money::Micros;
use sgl::payments::{
    http, ChargeRefused, MppConfig, Payer, Payments, PaymentsConfig, RequestParts,
};

use zeroize::Zeroizing;

use super::facilitator::{self, Facilitator};
use super::stores::TestStore;

/// The payee of the test server.
pub const PAY_TO: Address = address!("209693Bc6afc0C5328bA36FaF03C514EF312287C");
/// The price of `/paid/echo`: one cent.
pub const ECHO_PRICE: Micros = Micros(10_000);
pub const MPP_SECRET: &str = "test-secret";

pub struct TestServer {
    pub base: String,
    pub payments: Payments,
    pub facilitator: Facilitator,
    /// The server's clock, started at the present; tests may move it.
    pub clock: ManualClock,
    pub _store: TestStore,
}

async fn paid_echo(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let offer = p.offer(&headers, &uri, ECHO_PRICE, "echo");
    let req = RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let echoed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match p.authorize(&req, Some(&offer)).await {
        Ok(None) => http::challenge(&p, &offer, "payment required"),
        Err(e) => http::refusal(&p, &e, Some(&offer)),
        Ok(Some(Payer::Payment(pending))) => {
            let wallet = pending.wallet.to_string();
            let method = format!("{:?}", pending.method);
            // The work runs before settlement; settle before releasing it.
            let out = json!({"echo": echoed, "paid_by": wallet, "method": method});
            match p.settle(pending, None).await {
                Ok(s) => {
                    let mut resp = Json(out).into_response();
                    resp.headers_mut().extend(s.headers);
                    resp
                }
                Err(e) => http::refusal(&p, &e, Some(&offer)),
            }
        }
        Ok(Some(account)) => {
            let wallet = account.wallet().clone();
            let hold = match p.hold_credits(&wallet, ECHO_PRICE, "echo").await {
                Ok(h) => h,
                Err(e) => return http::refusal(&p, &e, Some(&offer)),
            };
            match p.settle_credits(&hold, ECHO_PRICE).await {
                Ok(b) => Json(json!({"echo": echoed, "paid_by": wallet.as_str(),
                    "method": "credits", "balance_micros": b.balance.0}))
                .into_response(),
                Err(e) => http::refusal(&p, &e, Some(&offer)),
            }
        }
    }
}

/// The quote of `/paid/metered`: five cents.
pub const METERED_QUOTE: Micros = Micros(50_000);

/// A metered resource, as the grid's chat is: quoted up front, charged at
/// the actual cost (`{"actual": µUSD}` in the body stands in for the
/// engine's usage), nothing charged when the work fails (`{"fail": true}`).
async fn paid_metered(
    State(p): State<Payments>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let offer = p.offer(&headers, &uri, METERED_QUOTE, "metered");
    let req = RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let job: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let charge = match p.open_charge(&req, &offer, "job-1").await {
        Ok(c) => c,
        Err(ChargeRefused::PaymentRequired) => {
            return http::challenge(&p, &offer, "payment required")
        }
        Err(ChargeRefused::Refused(e)) => return http::refusal(&p, &e, Some(&offer)),
    };
    if job["fail"] == true {
        charge.release().await;
        return http::error_response(
            axum::http::StatusCode::BAD_GATEWAY,
            "server_error",
            "job_failed",
            "the job failed; nothing was charged",
        );
    }
    let actual = Micros(job["actual"].as_u64().unwrap_or(0));
    let (method, wallet) = (charge.method(), charge.payer().cloned());
    match charge.settle(actual).await {
        Ok(r) => {
            let mut resp = Json(json!({"charged": r.charged.0, "method": method,
                "wallet": wallet.as_ref().map(|w| w.as_str())}))
            .into_response();
            resp.headers_mut().extend(r.headers);
            resp
        }
        Err(e) => http::refusal(&p, &e, Some(&offer)),
    }
}

/// Start a server over `store`, with MPP enabled and a loopback facilitator.
pub async fn start_with(store: TestStore) -> TestServer {
    let fac = facilitator::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = PaymentsConfig::new(PAY_TO, fac.url.clone());
    cfg.public_base_url = Some(format!("http://{addr}"));
    cfg.mpp = Some(MppConfig {
        realm: addr.to_string(),
        secret: Zeroizing::new(MPP_SECRET.as_bytes().to_vec()),
        validity: Duration::from_secs(300),
        recipient: None,
    });
    let clock = ManualClock::starting_now();
    let payments = Payments::with_clock(cfg, store.store.clone(), clock.clock()).unwrap();
    let app = Router::new()
        .route("/paid/echo", post(paid_echo))
        .route("/paid/metered", post(paid_metered))
        .with_state(payments.clone())
        .merge(http::router(payments.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await });
    TestServer {
        base: format!("http://{addr}"),
        payments,
        facilitator: fac,
        clock,
        _store: store,
    }
}

/// A server over a fresh SQLite store.
pub async fn start() -> TestServer {
    start_with(super::stores::sqlite_store().await).await
}
