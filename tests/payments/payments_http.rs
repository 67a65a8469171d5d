//! The payments gate and routes over real HTTP on loopback: a server with
//! the payments router and one paid resource, a loopback facilitator
//! speaking the x402 facilitator API, and payments signed with known keys.
#![cfg(feature = "payments")]

use crate::pay_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use pay_common::server::{self, TestServer, ECHO_PRICE, PAY_TO};
use pay_common::signing::{self, key, mpp_credential, xauth_headers, PayParams, ANVIL0, ANVIL1};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sgl::payments::facilitator::FacilitatorClient;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn decode(h: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(h).unwrap()).unwrap()
}

async fn echo(s: &TestServer, headers: &[(&str, String)]) -> reqwest::Response {
    let mut r = http()
        .post(format!("{}/paid/echo", s.base))
        .json(&json!({"hi": 1}));
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.send().await.unwrap()
}

fn echo_url(s: &TestServer) -> String {
    format!("{}/paid/echo", s.base)
}

fn now_ms() -> i64 {
    signing::unix_now() as i64 * 1000
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[tokio::test]
async fn unpaid_request_gets_a_three_way_challenge() {
    let s = server::start().await;
    let r = echo(&s, &[]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let v2 = decode(r.headers()["payment-required"].to_str().unwrap());
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["x402Version"], 1);
    let a = &body["accepts"][0];
    assert_eq!(a["scheme"], "exact");
    assert_eq!(a["network"], "base");
    assert_eq!(a["maxAmountRequired"], ECHO_PRICE.0.to_string());
    assert_eq!(a["resource"], echo_url(&s));
    assert_eq!(a["payTo"], PAY_TO.to_checksum(None));
    assert_eq!(a["extra"], json!({"name": "USD Coin", "version": "2"}));
    assert_eq!(v2["x402Version"], 2);
    assert_eq!(v2["resource"]["url"], echo_url(&s));
    assert_eq!(v2["accepts"][0]["network"], "eip155:8453");
    assert_eq!(v2["accepts"][0]["amount"], "10000");
    let c = signing::parse_challenge(&www);
    assert_eq!(c["method"], "evm");
    assert_eq!(c["intent"], "charge");
    assert!(c.contains_key("expires") && c.contains_key("opaque"));
}

#[tokio::test]
async fn x402_v2_pays_once_and_replay_is_refused() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let pay = PayParams::new(PAY_TO, ECHO_PRICE.0).x402_v2(&k, &echo_url(&s));
    let r = echo(&s, &[("PAYMENT-SIGNATURE", pay.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let receipt = decode(r.headers()["payment-response"].to_str().unwrap());
    assert_eq!(receipt["success"], true);
    assert_eq!(receipt["network"], "eip155:8453");
    assert!(receipt["transaction"].as_str().unwrap().starts_with("0x"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["paid_by"],
        "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
    );
    // The same payment again.
    let r = echo(&s, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let v2 = decode(r.headers()["payment-required"].to_str().unwrap());
    assert_eq!(v2["error"], "invalid_exact_evm_nonce_already_used");
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn x402_v1_pays() {
    let s = server::start().await;
    let k = key(ANVIL1);
    // v1 allows paying more than the price.
    let pay = PayParams::new(PAY_TO, ECHO_PRICE.0 + 5).x402_v1(&k);
    let r = echo(&s, &[("X-PAYMENT", pay.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let receipt = decode(r.headers()["x-payment-response"].to_str().unwrap());
    assert_eq!(receipt["network"], "base");
    let r = echo(&s, &[("X-PAYMENT", pay)]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_exact_evm_nonce_already_used");
    let short = PayParams::new(PAY_TO, ECHO_PRICE.0 - 1).x402_v1(&k);
    let body: Value = echo(&s, &[("X-PAYMENT", short)])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["error"],
        "invalid_exact_evm_payload_authorization_value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_copies_of_one_payment_pay_once() {
    fifty_copies(server::start().await).await;
}

/// The same race with the server's store on PostgreSQL (skipped with a
/// message when unreachable, unless SGL_REQUIRE_POSTGRES=1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_copies_of_one_payment_pay_once_on_postgres() {
    let Some(pg) = pay_common::stores::postgres_store("http50").await else {
        return;
    };
    let schema = pg.pg_schema.clone();
    fifty_copies(server::start_with(pg).await).await;
    if let Some(schema) = schema {
        let _ =
            sgl::store::Store::drop_postgres_schema(&pay_common::stores::postgres_url(), &schema)
                .await;
    }
}

async fn fifty_copies(s: TestServer) {
    let s = Arc::new(s);
    let k = key(ANVIL0);
    let pay = PayParams::new(PAY_TO, ECHO_PRICE.0).x402_v2(&k, &echo_url(&s));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        let pay = pay.clone();
        tasks.push(tokio::spawn(async move {
            echo(&s, &[("PAYMENT-SIGNATURE", pay)]).await.status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let st = t.await.unwrap();
        if st == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(st, StatusCode::PAYMENT_REQUIRED);
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 1);
}

async fn refused_reason(s: &TestServer, pay: String) -> String {
    let r = echo(s, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    decode(r.headers()["payment-required"].to_str().unwrap())["error"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn bad_payments_are_refused_with_their_reasons() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let url = echo_url(&s);
    let mut p = PayParams::new(PAY_TO, ECHO_PRICE.0);
    p.valid_before = signing::unix_now() + 3;
    assert_eq!(
        refused_reason(&s, p.x402_v2(&k, &url)).await,
        "invalid_exact_evm_payload_authorization_valid_before"
    );
    let mut p = PayParams::new(PAY_TO, ECHO_PRICE.0);
    p.valid_after = signing::unix_now() + 60;
    assert_eq!(
        refused_reason(&s, p.x402_v2(&k, &url)).await,
        "invalid_exact_evm_payload_authorization_valid_after"
    );
    let other: alloy_primitives::Address = "0x00000000000000000000000000000000000000aa"
        .parse()
        .unwrap();
    let p = PayParams::new(other, ECHO_PRICE.0);
    assert_eq!(
        refused_reason(&s, p.x402_v2(&k, &url)).await,
        "invalid_payment_requirements"
    );
    let p = PayParams::new(other, ECHO_PRICE.0);
    let body: Value = echo(&s, &[("X-PAYMENT", p.x402_v1(&k))])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["error"],
        "invalid_exact_evm_payload_recipient_mismatch"
    );
    let mut p = PayParams::new(PAY_TO, ECHO_PRICE.0);
    p.high_s = true;
    assert_eq!(
        refused_reason(&s, p.x402_v2(&k, &url)).await,
        "invalid_exact_evm_payload_signature"
    );
    let p = PayParams::new(PAY_TO, ECHO_PRICE.0);
    assert_eq!(
        refused_reason(
            &s,
            p.x402_v2(&k, &format!("{}/compute/credits/topup", s.base))
        )
        .await,
        "invalid_payment_requirements"
    );
    let p = PayParams::new(PAY_TO, ECHO_PRICE.0 + 1);
    assert_eq!(
        refused_reason(&s, p.x402_v2(&k, &url)).await,
        "invalid_exact_evm_payload_authorization_value_mismatch"
    );
    // Nothing reached the facilitator's settle.
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn facilitator_failures_refuse_and_consume_nothing() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let pay = PayParams::new(PAY_TO, ECHO_PRICE.0).x402_v2(&k, &echo_url(&s));
    let st = &s.facilitator.state;
    st.refuse_verify.store(true, Ordering::SeqCst);
    assert_eq!(refused_reason(&s, pay.clone()).await, "insufficient_funds");
    st.refuse_verify.store(false, Ordering::SeqCst);
    st.refuse_settle.store(true, Ordering::SeqCst);
    assert_eq!(
        refused_reason(&s, pay.clone()).await,
        "unexpected_settle_error"
    );
    st.refuse_settle.store(false, Ordering::SeqCst);
    st.crash_settle.store(true, Ordering::SeqCst);
    let r = echo(&s, &[("PAYMENT-SIGNATURE", pay.clone())]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    st.crash_settle.store(false, Ordering::SeqCst);
    // The same authorization still pays once the facilitator works.
    let r = echo(&s, &[("PAYMENT-SIGNATURE", pay.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        refused_reason(&s, pay).await,
        "invalid_exact_evm_nonce_already_used"
    );
}

/// Expiry is tested by moving the server's clock, not by sleeping: an MPP
/// challenge past its validity is refused and consumes nothing, and a
/// signed request is judged against the server's time.
#[tokio::test]
async fn expiry_follows_the_server_clock() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let www = echo(&s, &[]).await.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let cred = mpp_credential(&k, &www, None);
    s.clock.advance(std::time::Duration::from_secs(301));
    let r = echo(&s, &[("Authorization", cred.clone())]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        p["type"],
        "https://paymentauth.org/problems/payment-expired"
    );
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 0);
    // A request signed now is 301 s older than the server's time.
    let signed = xauth_headers(&k, "GET", "/compute/api-keys", b"", now_ms(), &nonce());
    let mut req = http().get(format!("{}/compute/api-keys", s.base));
    for (h, v) in &signed {
        req = req.header(*h, v);
    }
    let e: Value = req.send().await.unwrap().json().await.unwrap();
    assert_eq!(e["error"]["code"], "signature_expired");
    // Back inside the window the same credential pays once.
    s.clock.rewind(std::time::Duration::from_secs(301));
    let r = echo(&s, &[("Authorization", cred)]).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn mpp_pays_once_and_binds_its_challenge() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let www = echo(&s, &[]).await.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let cred = mpp_credential(&k, &www, None);
    let r = echo(&s, &[("Authorization", cred.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    // (re-request to read the receipt header)
    let www2 = echo(&s, &[]).await.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = echo(&s, &[("Authorization", mpp_credential(&k, &www2, None))]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let receipt = r.headers()["payment-receipt"].to_str().unwrap();
    let rj: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(receipt)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rj["status"], "success");
    assert_eq!(rj["method"], "evm");
    // The challenge id is single use.
    let r = echo(&s, &[("Authorization", cred)]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().contains_key("www-authenticate"));
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        p["type"],
        "https://paymentauth.org/problems/credential-replayed"
    );
    // A nonce that does not bind the challenge.
    let www3 = echo(&s, &[]).await.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let bad = mpp_credential(&k, &www3, Some(alloy_primitives::B256::ZERO));
    let p: Value = echo(&s, &[("Authorization", bad)])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        p["type"],
        "https://paymentauth.org/problems/verification-failed"
    );
    // The pympp form of the binding nonce is accepted.
    let c = signing::parse_challenge(&www3);
    let json_nonce = sgl::payments::mpp::binding_nonce_json(&c["id"], &c["realm"]);
    let r = echo(
        &s,
        &[("Authorization", mpp_credential(&k, &www3, Some(json_nonce)))],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // A challenge issued for another resource (the top-up) does not pay here.
    let www4 = http()
        .post(format!("{}/compute/credits/topup", s.base))
        .json(&json!({"amount": "0.01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(www4.status(), StatusCode::BAD_REQUEST); // below the $1 minimum
}

#[tokio::test]
async fn wallet_signatures_api_keys_and_credits() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let wallet = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
    // Create a key with a signature.
    let body = br#"{"label":"agent"}"#;
    let n1 = nonce();
    let hs = xauth_headers(&k, "POST", "/compute/api-keys", body, now_ms(), &n1);
    let mut req = http()
        .post(format!("{}/compute/api-keys", s.base))
        .body(body.to_vec());
    for (h, v) in &hs {
        req = req.header(*h, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    assert!(api_key.starts_with("x402c_"));
    // The same signed request again: the nonce is spent.
    let mut req = http()
        .post(format!("{}/compute/api-keys", s.base))
        .body(body.to_vec());
    for (h, v) in &hs {
        req = req.header(*h, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "nonce_reused");
    // A timestamp outside the window.
    let old = xauth_headers(
        &k,
        "GET",
        "/compute/api-keys",
        b"",
        now_ms() - 301_000,
        &nonce(),
    );
    let mut req = http().get(format!("{}/compute/api-keys", s.base));
    for (h, v) in &old {
        req = req.header(*h, v);
    }
    let e: Value = req.send().await.unwrap().json().await.unwrap();
    assert_eq!(e["error"]["code"], "signature_expired");
    // An API key cannot mint keys.
    let r = http()
        .post(format!("{}/compute/api-keys", s.base))
        .header("X-API-Key", &api_key)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // List with the key; only the last four characters are shown.
    let list: Value = http()
        .get(format!("{}/compute/api-keys", s.base))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["api_keys"][0]["key_last4"],
        api_key[api_key.len() - 4..]
    );
    assert!(!list.to_string().contains(&api_key));
    // Conflicting keys in the two headers.
    let r = http()
        .get(format!("{}/compute/credits/balance", s.base))
        .bearer_auth(&api_key)
        .header("X-API-Key", "x402c_somethingelse_entirely")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Top up $2.50 with x402 v2, authenticated by the key.
    let topup_url = format!("{}/compute/credits/topup", s.base);
    let r = http()
        .post(&topup_url)
        .header("X-API-Key", &api_key)
        .json(&json!({"amount": 2.5, "network": "base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let v2 = decode(r.headers()["payment-required"].to_str().unwrap());
    assert_eq!(v2["accepts"][0]["amount"], "2500000");
    let pay = PayParams::new(PAY_TO, 2_500_000).x402_v2(&k, &topup_url);
    let r = http()
        .post(&topup_url)
        .header("X-API-Key", &api_key)
        .header("PAYMENT-SIGNATURE", pay)
        .json(&json!({"amount": 2.5, "network": "base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["new_balance"], "2.50");
    assert_eq!(t["wallet"], wallet);
    // Spend with the key: exactly the price comes off.
    let r = echo(&s, &[("X-API-Key", api_key.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["balance_micros"], 2_500_000 - ECHO_PRICE.0);
    let bal: Value = http()
        .get(format!("{}/compute/credits/balance", s.base))
        .header("X-API-Key", &api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bal["balance"], "2.49");
    assert_eq!(bal["total_deposited"], "2.50");
    assert_eq!(bal["total_spent"], "0.01");
    // Another wallet's payment cannot top up this account.
    let pay = PayParams::new(PAY_TO, 1_000_000).x402_v2(&key(ANVIL1), &topup_url);
    let r = http()
        .post(&topup_url)
        .header("X-API-Key", &api_key)
        .header("PAYMENT-SIGNATURE", pay.clone())
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // …and that refusal consumed nothing: unauthenticated, it credits its payer.
    let r = http()
        .post(&topup_url)
        .header("PAYMENT-SIGNATURE", pay)
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["wallet"], "0x70997970c51812dc3a010c7d01b50e0d17dc79c8");
    // Revoke with a signature; the key stops working.
    let id = created["id"].as_str().unwrap();
    let path = format!("/compute/api-keys/{id}");
    let mut req = http().delete(format!("{}{path}", s.base));
    for (h, v) in xauth_headers(&k, "DELETE", &path, b"", now_ms(), &nonce()) {
        req = req.header(h, v);
    }
    assert_eq!(req.send().await.unwrap().status(), StatusCode::OK);
    let r = echo(&s, &[("X-API-Key", api_key)]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Without credits, a signed wallet is told so with a 402.
    let k1 = key(ANVIL1);
    let echo_body = serde_json::to_vec(&json!({"hi": 1})).unwrap();
    let mut req = http()
        .post(echo_url(&s))
        .body(echo_body.clone())
        .header("content-type", "application/json");
    for (h, v) in xauth_headers(&k1, "POST", "/paid/echo", &echo_body, now_ms(), &nonce()) {
        req = req.header(h, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK); // the $1 top-up above pays for it
    let _ = s;
}

#[tokio::test]
async fn insufficient_credits_is_a_402_with_a_challenge() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let (key, _) = s
        .payments
        .create_api_key(
            &sgl::store::WalletId::new_unchecked("0xabc0000000000000000000000000000000000001"),
            "t",
        )
        .await
        .unwrap();
    let r = echo(&s, &[("X-API-Key", key.secret.to_string())]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(r.headers().contains_key("payment-required"));
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "insufficient_credits");
    assert_eq!(b["x402Version"], 1);
    let _ = k;
}

#[tokio::test]
async fn facilitator_client_speaks_the_api() {
    let fac = pay_common::facilitator::start().await;
    let c = FacilitatorClient::new(&format!("{}/", fac.url)).unwrap();
    let sup = c.supported().await.unwrap();
    assert!(sup
        .kinds
        .iter()
        .any(|k| k.x402_version == 2 && k.network == "eip155:8453"));
    let payload = json!({"x402Version": 2, "payload": {"signature": "0x", "authorization": {"from": "0xabc", "nonce": "0x01"}}});
    let req = json!({"network": "eip155:8453", "asset": "0xdef"});
    let v = c.verify(2, &payload, &req).await.unwrap();
    assert!(v.is_valid);
    assert_eq!(v.payer.as_deref(), Some("0xabc"));
    let st = c.settle(2, &payload, &req).await.unwrap();
    assert!(st.success);
    assert_eq!(st.network, "eip155:8453");
    let again = c.settle(2, &payload, &req).await.unwrap();
    assert!(!again.success);
    // The startup check against the stand-in, and against a facilitator
    // that does not list the configured network.
    let s = server::start().await;
    s.payments.check_facilitator().await.unwrap();
    let mut cfg = s.payments.config().clone();
    cfg.networks = vec![sgl::payments::EvmNetwork::base_sepolia_usdc()];
    let other = sgl::payments::Payments::new(cfg, s.payments.store().clone()).unwrap();
    assert!(other.check_facilitator().await.is_err());
    // Unreachable facilitator: an error, never a success.
    let dead = FacilitatorClient::new("http://127.0.0.1:9").unwrap();
    assert!(dead.supported().await.is_err());
    assert!(dead.settle(2, &payload, &req).await.is_err());
}

async fn metered(s: &TestServer, body: Value, headers: &[(&str, String)]) -> reqwest::Response {
    let mut r = http().post(format!("{}/paid/metered", s.base)).json(&body);
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn metered_requests_charge_actual_cost_and_nothing_on_failure() {
    let s = server::start().await;
    let k = key(ANVIL0);
    let wallet = sgl::store::WalletId::new_unchecked("0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266");
    s.payments
        .store()
        .top_up(&wallet, sgl::money::Micros(1_000_000), "seed")
        .await
        .unwrap();
    let (api_key, _) = s.payments.create_api_key(&wallet, "m").await.unwrap();
    let key_h = [("X-API-Key", api_key.secret.to_string())];
    // Credits: held at the quote, charged at the actual cost.
    let r = metered(&s, json!({"actual": 12_345}), &key_h).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["charged"], 12_345);
    let b = s.payments.balance(&wallet).await.unwrap();
    assert_eq!((b.balance.0, b.held.0), (1_000_000 - 12_345, 0));
    // A failed job costs nothing.
    let r = metered(&s, json!({"fail": true}), &key_h).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        s.payments.balance(&wallet).await.unwrap().balance.0,
        1_000_000 - 12_345
    );
    // The actual cost never exceeds the quote.
    let r = metered(&s, json!({"actual": 999_999}), &key_h).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["charged"],
        server::METERED_QUOTE.0
    );
    let ledger = s.payments.store().ledger(&wallet, 20).await.unwrap();
    let settled: Vec<u64> = ledger
        .iter()
        .filter(|e| e.kind == "settle")
        .map(|e| e.amount.0)
        .collect();
    assert_eq!(settled, [server::METERED_QUOTE.0, 12_345]);
    // A per-request payment of the quote: released on failure, so the same
    // authorization pays the next attempt; settled on success.
    let url = format!("{}/paid/metered", s.base);
    let pay = PayParams::new(PAY_TO, server::METERED_QUOTE.0).x402_v2(&k, &url);
    let r = metered(
        &s,
        json!({"fail": true}),
        &[("PAYMENT-SIGNATURE", pay.clone())],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 0);
    let r = metered(
        &s,
        json!({"actual": 1}),
        &[("PAYMENT-SIGNATURE", pay.clone())],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("payment-response"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["charged"], server::METERED_QUOTE.0);
    assert_eq!(v["method"], "x402-v2");
    let r = metered(&s, json!({"actual": 1}), &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
}

#[tokio::test]
async fn credits_top_up_with_mpp() {
    let s = server::start().await;
    let k = key(ANVIL1);
    let url = format!("{}/compute/credits/topup", s.base);
    let body = json!({"amount": "1.25", "network": "base"});
    let r = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let cred = mpp_credential(&k, &www, None);
    let r = http()
        .post(&url)
        .header("Authorization", cred.clone())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("payment-receipt"));
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["deposited_micros"], 1_250_000);
    assert_eq!(t["wallet"], "0x70997970c51812dc3a010c7d01b50e0d17dc79c8");
    // The same credential cannot top up twice.
    let r = http()
        .post(&url)
        .header("Authorization", cred)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    // A fresh challenge for $1.25 does not pay a $2 top-up.
    let r = http().post(&url).json(&body).send().await.unwrap();
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let r = http()
        .post(&url)
        .json(&json!({"amount": 2}))
        .send()
        .await
        .unwrap();
    let www2 = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let r = http()
        .post(&url)
        .header("Authorization", mpp_credential(&k, &www, None))
        .json(&json!({"amount": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let r = http()
        .post(&url)
        .header("Authorization", mpp_credential(&k, &www2, None))
        .json(&json!({"amount": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let w = sgl::store::WalletId::new_unchecked("0x70997970c51812dc3a010c7d01b50e0d17dc79c8");
    assert_eq!(s.payments.balance(&w).await.unwrap().balance.0, 3_250_000);
}
