//! Per-request payment on the grid (PROTOCOL.md §5.10): a chat request
//! without credentials gets a 402 priced at the node's effective price for
//! the prompt bound and max_tokens; an x402 v2 payment for that challenge
//! runs the job, is settled through the facilitator before the answer is
//! released, and is recorded in the ledger; the same payment twice is
//! refused; what the job did not use is credited back to the payer. The
//! node is the real agent with the echo load-test engine; the
//! facilitator is the loopback stand-in.
#![cfg(feature = "coordinator")]

use crate::grid_support;
use crate::pay_common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use grid_support::in_process::{invite, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{python_has, run_py, wait_online, MODEL};
use pay_common::server::PAY_TO;
use pay_common::signing::{key, PayParams, ANVIL0};
use pay_common::{facilitator, stores};
use serde_json::{json, Value};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::{MicrosPerM, TokenPrice};
use sgl::payments::{Payments, PaymentsConfig};

fn decode(h: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(h).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn x402_pays_a_grid_chat_once() {
    let t = stores::sqlite_store().await;
    let fac = facilitator::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut pcfg = PaymentsConfig::new(PAY_TO, fac.url.clone());
    pcfg.public_base_url = Some(base.clone());
    let payments = Payments::new(pcfg, t.store.clone()).unwrap();
    let mut prices = HashMap::new();
    prices.insert(
        MODEL.to_string(),
        TokenPrice::new(MicrosPerM(5_000_000), MicrosPerM(10_000_000)),
    );
    let config = Config {
        dev: false,
        public_url: base.clone(),
        heartbeat_interval: Duration::from_millis(200),
        reference_prices: prices,
        ..Config::default()
    };
    let grid = Grid::with_store(config, t.store.clone(), Some(payments))
        .await
        .unwrap();
    tokio::spawn(coordinator::serve(grid, listener, std::future::pending()));

    // A node, registered with an invite.
    let code = invite(&t.store, grid_support::OPERATOR).await;
    let _node = Agent::spawn(node_dir(&base), |cfg| {
        cfg.heartbeat_interval = FAST_HEARTBEAT;
        cfg.registration_code = Some(code);
    });
    wait_online(&base, Duration::from_secs(10)).await;

    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"model": MODEL, "max_tokens": 20,
                      "messages": [{"role": "user", "content": "pay per request"}]});
    // No credentials: a 402 priced for this request.
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 402);
    let v2 = decode(r.headers()["payment-required"].to_str().unwrap());
    let amount: u64 = v2["accepts"][0]["amount"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Prompt bound: role + content bytes + 16 = 4 + 15 + 16 = 35, plus 256
    // for the chat template (§7f) = 291 tokens at 5 USD/1M, plus 20
    // completion tokens at 10 USD/1M.
    let expected_quote = ((35 + 256) * 5_000_000u64 + 20 * 10_000_000).div_ceil(1_000_000);
    assert_eq!(amount, expected_quote);
    assert_eq!(v2["resource"]["url"], url.as_str());
    let v1: Value = r.json().await.unwrap();
    assert_eq!(v1["x402Version"], 1);

    // Pay it.
    let pay = PayParams::new(PAY_TO, amount).x402_v2(&key(ANVIL0), &url);
    let r = http
        .post(&url)
        .header("PAYMENT-SIGNATURE", &pay)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let receipt = decode(r.headers()["payment-response"].to_str().unwrap());
    assert_eq!(receipt["success"], true);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "pay per request"
    );
    assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 1);
    let job_id = answer["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_string();
    let row = t.store.usage_for_job(&job_id).await.unwrap().unwrap();
    assert_eq!(row.method, "x402-v2");
    assert_eq!(row.status, "completed");
    // The quote was settled; the job's cost (4 prompt tokens as the echo
    // engine counts them, 3 completion tokens) is kept and the rest
    // credited back to the payer (PROTOCOL.md §7f).
    let cost = (4 * 5_000_000u64 + 3 * 10_000_000).div_ceil(1_000_000);
    assert_eq!((row.quoted.0, row.cost.0), (amount, cost));
    assert_eq!(answer["refunded_micros"], amount - cost);
    assert_eq!(
        row.payer_wallet.as_deref(),
        Some("0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266")
    );

    // The same payment again is refused, and nothing more is settled.
    let r = http
        .post(&url)
        .header("PAYMENT-SIGNATURE", &pay)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 1);

    // The official x402 Python client pays the same coordinator (v2 through
    // its transport, v1 from the body, and a v1 replay refused).
    if python_has("x402, eth_account") {
        run_py("x402_grid_pay.py", &[&base, MODEL]).await;
        assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 3);
    }
    stores::cleanup(t).await;
}
