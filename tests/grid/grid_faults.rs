//! Money under client and node faults (PROTOCOL.md §7f), on SQLite and on
//! PostgreSQL, with the real node agent running the echo engine (token
//! counts are then known exactly):
//!
//! - the quote binds the node: a sealed request whose sealed `max_tokens`
//!   exceeds the clear one is generated and billed at the clear one;
//! - the prompt bound of a quote never undercounts (short tokens);
//! - a client's bad sealed input is a 400 `bad_sealed_input`, billed
//!   nothing and not counted against the node.
#![cfg(feature = "coordinator")]

use crate::grid_support;
use crate::pay_common;

use std::collections::HashMap;
use std::time::Duration;

use grid_support::in_process::{invite, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{providers, MODEL};
use pay_common::stores::{each_backend, TestStore};
use serde_json::{json, Value};
use sgl::client::{ChatRequest, GridClient};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::{Micros, MicrosPerM, TokenPrice};
use sgl::payments::{Payments, PaymentsConfig};
use sgl::proto::api::{ReserveResponse, SealedReplyPlaintext};
use sgl::proto::b58;
use sgl::proto::e2e;
use sgl::proto::identity::X25519Public;
use sgl::store::{Store, WalletId};
use tokio::sync::oneshot;

const PAYER: &str = "0x5555555555555555555555555555555555555555";
/// 5 USD and 10 USD per 1M tokens: every token shows in the cost.
const PRICE: TokenPrice = TokenPrice::new(MicrosPerM(5_000_000), MicrosPerM(10_000_000));

struct Coordinator {
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Coordinator {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn payments(store: &Store) -> Payments {
    Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap()
}

async fn start(store: &Store) -> Coordinator {
    let mut prices = HashMap::new();
    prices.insert(MODEL.to_string(), PRICE);
    let config = Config {
        dev: false,
        heartbeat_interval: Duration::from_millis(200),
        reference_prices: prices,
        ..Config::default()
    };
    let grid = Grid::with_store(config, store.clone(), Some(payments(store)))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(coordinator::serve(grid, listener, async move {
        let _ = rx.await;
    }));
    Coordinator { base, stop, task }
}

fn wallet() -> WalletId {
    WalletId::new_unchecked(PAYER)
}

/// A coordinator with a node online and a funded API key; its client.
async fn grid_with_credits(store: &Store) -> (Coordinator, Agent, String, GridClient) {
    let c = start(store).await;
    let code = invite(store, grid_support::OPERATOR).await;
    let node = Agent::spawn(node_dir(&c.base), |cfg| {
        cfg.heartbeat_interval = FAST_HEARTBEAT;
        cfg.registration_code = Some(code);
        cfg.drain_timeout = Duration::from_secs(2);
    });
    grid_support::wait_online(&c.base, Duration::from_secs(10)).await;
    let (key, _) = payments(store)
        .create_api_key(&wallet(), "faults")
        .await
        .unwrap();
    let key = key.secret.as_str().to_string();
    store
        .top_up(&wallet(), Micros(10_000_000), "grant")
        .await
        .unwrap();
    let client = GridClient::new(&c.base, Some(key.clone())).unwrap();
    (c, node, key, client)
}

fn request() -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![("user".into(), "hi".into())],
        max_tokens: 16,
        temperature: 0.0,
        stream: false,
        node: None,
        max_price: None,
        require_attestation: None,
        choices: Default::default(),
    }
}

/// A sealed chat built by hand: `clear_max` in clear, `inner` sealed to
/// the reserved node. Returns the status, the body and the key that opens
/// the reply.
async fn sealed_chat(
    base: &str,
    key: &str,
    res: &ReserveResponse,
    clear_max: u64,
    inner: Value,
) -> (u16, Value, e2e::ResponseKey) {
    let x = X25519Public::from_b58(&res.node_x25519_pubkey).unwrap();
    let (enc, rk) = e2e::seal_input(&x, inner.to_string().as_bytes()).unwrap();
    let body =
        json!({"reservation_token": res.reservation_token, "max_tokens": clear_max, "enc": enc});
    let (status, v) = post_chat(base, key, &body).await;
    (status, v, rk)
}

async fn post_chat(base: &str, key: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The opened reply of a sealed non-stream answer.
fn open_reply(body: &Value, rk: &e2e::ResponseKey) -> SealedReplyPlaintext {
    let sealed = serde_json::from_value(body["sealed_result"].clone()).unwrap();
    serde_json::from_slice(&rk.open_output(&sealed).unwrap()).unwrap()
}

async fn quote_binds_body(t: TestStore) -> TestStore {
    let store = t.store.clone();
    let (c, node, key, client) = grid_with_credits(&store).await;

    // Finding 1: clear max_tokens 2, sealed 8,192, forty words to echo.
    // The node generates two tokens, says `length`, and two are billed.
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let res = client.reserve(&request()).await.unwrap();
    let (status, body, rk) = sealed_chat(
        &c.base,
        &key,
        &res,
        2,
        json!({"messages": [{"role": "user", "content": text}], "max_tokens": 8192}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reply = open_reply(&body, &rk);
    assert_eq!(reply.content, "w0 w1 ");
    assert_eq!(reply.finish_reason.as_deref(), Some("length"));
    // The echo engine: 40 words + 1 prompt tokens.
    assert_eq!(
        (reply.usage.prompt_tokens, reply.usage.completion_tokens),
        (41, 2)
    );
    let job = body["job_id"].as_str().unwrap();
    let row = store.usage_for_job(job).await.unwrap().unwrap();
    assert_eq!(row.cost, PRICE.cost(41, 2));
    assert!(row.quoted >= row.cost);

    // The prompt bound never undercounts: 300 one-byte words are 301
    // prompt tokens, far more than a quarter of the sealed bytes. The
    // whole prompt is billed, not the quote's guess.
    let digits = vec!["7"; 300].join(" ");
    let res = client.reserve(&request()).await.unwrap();
    let (status, body, rk) = sealed_chat(
        &c.base,
        &key,
        &res,
        1,
        json!({"messages": [{"role": "user", "content": digits}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reply = open_reply(&body, &rk);
    assert_eq!(
        (reply.usage.prompt_tokens, reply.usage.completion_tokens),
        (301, 1)
    );
    let row = store
        .usage_for_job(body["job_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.cost, PRICE.cost(301, 1));

    let b = store.balance(&wallet()).await.unwrap();
    assert_eq!(b.held, Micros::ZERO);
    assert_eq!(
        b.balance,
        Micros(10_000_000 - PRICE.cost(41, 2).0 - PRICE.cost(301, 1).0)
    );
    node.stop().await;
    c.stop().await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_jobs_are_generated_and_billed_at_the_quoted_cap() {
    each_backend("quotecap", quote_binds_body).await;
}

/// The public reputation of the only node.
async fn reputation(base: &str) -> i64 {
    providers(base).await["providers"][0]["reputation"]
        .as_i64()
        .unwrap()
}

async fn bad_input_body(t: TestStore) -> TestStore {
    let store = t.store.clone();
    let (c, node, key, client) = grid_with_credits(&store).await;
    // One good job: the node's record is then 1 of 1.
    let res = client.reserve(&request()).await.unwrap();
    client.chat(&res, &request(), |_| {}).await.unwrap();
    assert_eq!(reputation(&c.base).await, 100);
    let before = store.balance(&wallet()).await.unwrap();

    let inner = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8});
    type Spoil = fn(&mut Value);
    let kinds: [(&str, Spoil); 5] = [
        ("invalid base58", |enc| {
            enc["ciphertext"] = json!("0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl");
        }),
        ("truncated ciphertext", |enc| {
            let blob = b58::decode_vec(enc["ciphertext"].as_str().unwrap(), "ct", 1 << 20).unwrap();
            enc["ciphertext"] = json!(b58::encode(&blob[..blob.len() - 7]));
        }),
        ("bit-flipped ciphertext", |enc| {
            let mut blob =
                b58::decode_vec(enc["ciphertext"].as_str().unwrap(), "ct", 1 << 20).unwrap();
            let mid = blob.len() / 2;
            blob[mid] ^= 0x10;
            enc["ciphertext"] = json!(b58::encode(&blob));
        }),
        ("low-order ephemeral key", |enc| {
            enc["client_ephemeral_pubkey"] = json!(b58::encode(&[0u8; 32]));
        }),
        ("sealed to another key", |_| {}),
    ];
    for (what, spoil) in kinds {
        let res = client.reserve(&request()).await.unwrap();
        let to = if what == "sealed to another key" {
            sgl::proto::identity::NodeIdentity::generate().x25519_public()
        } else {
            X25519Public::from_b58(&res.node_x25519_pubkey).unwrap()
        };
        let (enc, _) = e2e::seal_input(&to, inner.to_string().as_bytes()).unwrap();
        let mut enc = serde_json::to_value(enc).unwrap();
        spoil(&mut enc);
        let body = json!({"reservation_token": res.reservation_token, "max_tokens": 8, "enc": enc});
        let (status, v) = post_chat(&c.base, &key, &body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["code"], "bad_sealed_input", "{what}: {v}");
    }
    // Nothing billed, nothing left held, and the node's record unchanged.
    let after = store.balance(&wallet()).await.unwrap();
    assert_eq!(
        (after.balance, after.held, after.total_spent),
        (before.balance, Micros::ZERO, before.total_spent)
    );
    assert_eq!(reputation(&c.base).await, 100);
    let rows = store.usage_rows(100).await.unwrap();
    assert_eq!(
        rows.iter()
            .filter(|r| r.status == "failed" && r.cost == Micros::ZERO)
            .count(),
        5,
        "{rows:?}"
    );
    node.stop().await;
    c.stop().await;
    t
}

/// Finding 10: a client's bad sealed input is the client's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_sealed_input_is_a_client_error_that_costs_nothing() {
    each_backend("badinput", bad_input_body).await;
}
