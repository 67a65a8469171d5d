//! The grid with its store and billing, on SQLite and on PostgreSQL: invites,
//! API keys and credits, 402s, exact ledger arithmetic and the revenue split,
//! failures that cost nothing, client aborts, the job attestation proof, and a
//! coordinator restart that keeps nodes and ledger. The node is the real
//! agent with the echo load-test engine (token counts are then known exactly).
#![cfg(feature = "coordinator")]

use crate::grid_support;
use crate::pay_common;

use std::collections::HashMap;
use std::time::Duration;

use grid_support::in_process::{invite, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{providers, MODEL, OPERATOR};
use pay_common::stores::{each_backend, TestStore};
use serde_json::{json, Value};
use sgl::client::{ChatRequest, GridClient};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::{Micros, MicrosPerM, TokenPrice};
use sgl::payments::{Payments, PaymentsConfig};
use sgl::store::{Store, WalletId};
use tokio::sync::oneshot;

const PAYER: &str = "0x2222222222222222222222222222222222222222";
/// 5 USD and 10 USD per 1M tokens: large enough that every token shows.
const PRICE: TokenPrice = TokenPrice::new(MicrosPerM(5_000_000), MicrosPerM(10_000_000));

fn config() -> Config {
    let mut prices = HashMap::new();
    prices.insert(MODEL.to_string(), PRICE);
    Config {
        dev: false,
        heartbeat_interval: Duration::from_millis(200),
        reference_prices: prices,
        ..Config::default()
    }
}

struct Coordinator {
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(store: &Store, listen: Option<std::net::SocketAddr>) -> Coordinator {
    let payments = Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap();
    let grid = Grid::with_store(config(), store.clone(), Some(payments))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(listen.unwrap_or("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(coordinator::serve(grid, listener, async move {
        let _ = rx.await;
    }));
    Coordinator { base, stop, task }
}

fn start_node(base: &str, code: Option<String>) -> Agent {
    Agent::spawn(node_dir(base), |cfg| {
        cfg.heartbeat_interval = FAST_HEARTBEAT;
        cfg.registration_code = code;
        cfg.drain_timeout = Duration::from_secs(2);
    })
}

async fn wait_online(base: &str) {
    grid_support::wait_online(base, Duration::from_secs(10)).await;
}

fn request(text: &str, stream: bool) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![("user".into(), text.into())],
        max_tokens: 100,
        temperature: 0.0,
        stream,
        node: None,
        max_price: None,
        require_attestation: None,
        choices: Default::default(),
    }
}

fn wallet(s: &str) -> WalletId {
    WalletId::new_unchecked(s.to_ascii_lowercase())
}

async fn api_key(store: &Store) -> String {
    let p = Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap();
    let (key, _) = p.create_api_key(&wallet(PAYER), "test").await.unwrap();
    key.secret.as_str().to_string()
}

async fn billing_body(t: TestStore) -> TestStore {
    let store = t.store.clone();
    let c = start(&store, None).await;
    let base = c.base.clone();

    // Registration needs a code outside development mode, made for the wallet.
    let r = reqwest::Client::new()
        .post(format!("{base}/grid/nodes/register"))
        .json(&json!({"wallet_address": OPERATOR, "tee_type": "none", "public_key": "11111111111111111111111111111111"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let other = invite(&store, "0x3333333333333333333333333333333333333333").await;
    let r = reqwest::Client::new()
        .post(format!("{base}/grid/nodes/register"))
        .json(&json!({"wallet_address": OPERATOR, "tee_type": "none", "registration_code": other,
                      "public_key": sgl::proto::identity::NodeIdentity::generate().ed25519_public().to_b58()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a code made for another wallet");

    let code = invite(&store, OPERATOR).await;
    let node = start_node(&base, Some(code.clone()));
    wait_online(&base).await;

    // No credentials: a 402 challenge (x402 v1 body, v2 header).
    let anon = GridClient::new(&base, None).unwrap();
    let res = anon.reserve(&request("hello", false)).await.unwrap();
    let err = anon
        .chat(&res, &request("hello", false), |_| {})
        .await
        .unwrap_err();
    match err {
        sgl::client::ClientError::Status { status, body } => {
            assert_eq!(status, 402);
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["x402Version"], 1);
            assert!(v["accepts"][0]["maxAmountRequired"].is_string());
        }
        e => panic!("{e}"),
    }

    // A key without credits: 402 insufficient_credits.
    let key = api_key(&store).await;
    let client = GridClient::new(&base, Some(key.clone())).unwrap();
    let res = client.reserve(&request("hello", false)).await.unwrap();
    let err = client
        .chat(&res, &request("hello", false), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("402") && err.contains("insufficient_credits"),
        "{err}"
    );

    // Credits, then a sealed chat: billed exactly at the node's price.
    store
        .top_up(&wallet(PAYER), Micros(10_000_000), "grant-1")
        .await
        .unwrap();
    let text = "one two three four five six";
    let res = client.reserve(&request(text, false)).await.unwrap();
    let out = client
        .chat(&res, &request(text, false), |_| {})
        .await
        .unwrap();
    assert_eq!(out.content, text);
    let usage = out.usage.unwrap();
    // The echo engine: 6 words + 1 prompt tokens, 6 completion tokens.
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 6));
    let expected = (7 * 5_000_000 + 6 * 10_000_000u64).div_ceil(1_000_000);
    assert_eq!(expected, 95);
    let row = store.usage_for_job(&out.job_id).await.unwrap().unwrap();
    assert_eq!(row.status, "completed");
    assert_eq!(row.method, "credits");
    assert_eq!(row.cost, Micros(95));
    assert_eq!(
        (
            row.operator_share,
            row.platform_share,
            row.stakers_share,
            row.burn_share
        ),
        (Micros(76), Micros(6), Micros(9), Micros(4))
    );
    assert!(
        row.usage_signature.is_some(),
        "the node's usage signature is kept"
    );
    let b = store.balance(&wallet(PAYER)).await.unwrap();
    assert_eq!(b.balance, Micros(10_000_000 - 95));
    assert_eq!(b.held, Micros(0));

    // A stream is billed the same way.
    let out = client
        .chat(
            &client.reserve(&request(text, true)).await.unwrap(),
            &request(text, true),
            |_| {},
        )
        .await
        .unwrap();
    let row = store.usage_for_job(&out.job_id).await.unwrap().unwrap();
    assert_eq!((row.status.as_str(), row.cost), ("completed", Micros(95)));

    // The job's attestation proof: for the paying key only.
    let proof = reqwest::Client::new()
        .get(format!("{base}/grid/jobs/{}/attestation", out.job_id))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(proof.status(), 200);
    let proof: Value = proof.json().await.unwrap();
    assert_eq!(proof["job_id"], out.job_id.as_str());
    assert!(!proof["attestation_signature"].as_str().unwrap().is_empty());
    let other_key = {
        let p = Payments::new(
            PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
            store.clone(),
        )
        .unwrap();
        let (k, _) = p
            .create_api_key(&wallet("0x4444444444444444444444444444444444444444"), "x")
            .await
            .unwrap();
        k.secret.as_str().to_string()
    };
    let r = reqwest::Client::new()
        .get(format!("{base}/grid/jobs/{}/attestation", out.job_id))
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A failed job costs nothing: a prompt sealed to the wrong key fails to
    // open on the node, the client's fault (400 bad_sealed_input, §7f).
    let before = store.balance(&wallet(PAYER)).await.unwrap();
    let res = client.reserve(&request("x", false)).await.unwrap();
    let mut wrong = res.clone();
    wrong.node_x25519_pubkey = sgl::proto::identity::NodeIdentity::generate()
        .x25519_public()
        .to_b58();
    let http = reqwest::Client::new();
    let (enc, _) = sgl::proto::e2e::seal_input(
        &sgl::proto::identity::X25519Public::from_b58(&wrong.node_x25519_pubkey).unwrap(),
        br#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .unwrap();
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"reservation_token": res.reservation_token, "max_tokens": 100, "enc": enc}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after = store.balance(&wallet(PAYER)).await.unwrap();
    assert_eq!(after.balance, before.balance);
    assert_eq!(after.held, Micros(0));
    let failed = store.usage_rows(10).await.unwrap();
    assert!(failed
        .iter()
        .any(|r| r.status == "failed" && r.cost == Micros::ZERO));

    // A restart keeps the node (it re-attaches with its token) and the ledger.
    let rows_before = store.usage_rows(100).await.unwrap().len();
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
    let c = start(&store, Some(addr)).await;
    wait_online(&c.base).await;
    let out = client
        .chat(
            &client.reserve(&request(text, false)).await.unwrap(),
            &request(text, false),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(out.content, text);
    assert_eq!(store.usage_rows(100).await.unwrap().len(), rows_before + 1);
    let v: Value = providers(&c.base).await;
    assert_eq!(v["count"], 1, "the same node, not a second registration");
    // The code was single use.
    let r = reqwest::Client::new()
        .post(format!("{}/grid/nodes/register", c.base))
        .json(&json!({"wallet_address": OPERATOR, "tee_type": "none", "registration_code": code,
                      "public_key": sgl::proto::identity::NodeIdentity::generate().ed25519_public().to_b58()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    node.stop().await;
    let _ = c.stop.send(());
    let _ = c.task.await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn billing_ledger_and_restart_on_both_stores() {
    each_backend("billing", billing_body).await;
}
