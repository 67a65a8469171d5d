//! Pay before the first byte (PROTOCOL.md §7f) on a real grid on loopback:
//! a coordinator with payments over a store, node agents, the stand-in
//! facilitator. An x402 (or MPP) payment is verified, bound to its job,
//! settled before any byte of the answer leaves (the receipt in the
//! response headers, stream or not), and what the job did not use comes
//! back to the payer as credits, visible with its X-Auth signature. A
//! settlement failure is a 402 that no node ever sees. A job whose node
//! dies before any output is retried on another node with the same
//! settled payment; one that dies mid-stream is refunded whole.
//!
//! The nodes run a test engine that echoes the last user message word by
//! word (token counts known exactly) and, when gated, stops after the first
//! chunk's worth of tokens until the test opens its gate: a node is killed
//! only once its streams have delivered a first chunk and while their
//! generation is certain to continue. Each node runs on its own runtime, so
//! killing it ends every task it had, as a killed process would.
#![cfg(all(feature = "coordinator", feature = "node"))]

use crate::grid_support;
use crate::pay_common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use grid_support::in_process::{invite, node_dir, FAST_HEARTBEAT};
use grid_support::{wait_online, MODEL};
use pay_common::facilitator::{self, Facilitator};
use pay_common::server::PAY_TO;
use pay_common::signing::{
    key, mpp_credential, unix_now, xauth_headers, PayParams, ANVIL0, ANVIL1,
};
use pay_common::stores::{self, TestStore};
use serde_json::{json, Value};
use sgl::coordinator::{self, Config, Grid};
use sgl::money::{MicrosPerM, TokenPrice};
use sgl::node::agent::{self, AgentConfig};
use sgl::node::executor::{ExecError, ExecEvent, Executor, ServedModel};
use sgl::node::jobs::ChatJob;
use sgl::payments::{MppConfig, Payments, PaymentsConfig};
use sgl::proto::api::{ReserveResponse, SealedReplyPlaintext};
use sgl::proto::e2e;
use sgl::proto::identity::X25519Public;
use sgl::proto::limits::TOKENS_PER_CHUNK;
use sgl::store::WalletId;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

/// The price table of the test grid, µUSD per 1M tokens.
const IN_PER_M: u64 = 5_000_000;
const OUT_PER_M: u64 = 10_000_000;
/// Anvil key #0's address: the payer of every test payment.
const PAYER: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";

/// A quote or cost at the test prices, computed here from the price table
/// (rounded once, up, to the µUSD), not by the code under test.
fn at_price(prompt_tokens: u64, completion_tokens: u64) -> u64 {
    (prompt_tokens * IN_PER_M + completion_tokens * OUT_PER_M).div_ceil(1_000_000)
}

/// The coordinator's prompt bound of a plain request with one user message
/// (§5.10, §7f): role bytes + content bytes + 16, plus 256 for the chat
/// template.
fn prompt_bound(text: &str) -> u64 {
    ("user".len() + text.len()) as u64 + 16 + 256
}

/// The prompt tokens the test engine reports for one user message: its
/// words plus one.
fn echo_prompt_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64 + 1
}

fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn decode(h: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(h).unwrap()).unwrap()
}

/// The echo engine with a gate: each job sends its first `before_gate`
/// tokens at once, then waits for the gate to open before the rest.
struct GatedEcho {
    gate: watch::Receiver<bool>,
    before_gate: usize,
    started: Arc<AtomicUsize>,
}

impl Executor for GatedEcho {
    fn models(&self) -> Vec<ServedModel> {
        vec![ServedModel {
            name: MODEL.into(),
            context_size: 8192,
        }]
    }

    fn slots(&self) -> u32 {
        128
    }

    fn start(&self, job: &ChatJob) -> Result<mpsc::Receiver<ExecEvent>, ExecError> {
        if job.model != MODEL {
            return Err(ExecError::UnknownModel(job.model.clone()));
        }
        let last = job
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let prompt_tokens: u64 = job
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64 + 1)
            .sum();
        let words: Vec<String> = last
            .split_inclusive(' ')
            .take(job.max_tokens as usize)
            .map(str::to_string)
            .collect();
        let finish = if (words.len() as u64) < job.max_tokens {
            sgl::proto::openai::FinishReason::Stop
        } else {
            sgl::proto::openai::FinishReason::Length
        };
        let (tx, rx) = mpsc::channel(words.len() + 1);
        let mut gate = self.gate.clone();
        let before = self.before_gate;
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let completion_tokens = words.len() as u64;
            for (i, w) in words.into_iter().enumerate() {
                if i == before {
                    // Closed gate: generation is paused, never finished.
                    if gate.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                }
                if tx.send(ExecEvent::Token(w)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(ExecEvent::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens: 0,
                })
                .await;
        });
        Ok(rx)
    }
}

/// A node agent on its own runtime, with a gated echo engine.
struct Node {
    runtime: Option<tokio::runtime::Runtime>,
    gate: watch::Sender<bool>,
    started: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn spawn(grid: &PaidGrid, gated: bool) -> Node {
        let code = invite(&grid.t.store, grid_support::OPERATOR).await;
        let dir = node_dir(&grid.base);
        let mut cfg = AgentConfig::new(dir.path().to_path_buf());
        cfg.heartbeat_interval = FAST_HEARTBEAT;
        cfg.registration_code = Some(code);
        let (gate, rx) = watch::channel(!gated);
        let started = Arc::new(AtomicUsize::new(0));
        let exec = Arc::new(GatedEcho {
            gate: rx,
            before_gate: TOKENS_PER_CHUNK,
            started: started.clone(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(agent::run(cfg, exec, None, std::future::pending()));
        Node {
            runtime: Some(runtime),
            gate,
            started,
            _dir: dir,
        }
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// End every task of the node at once, as SIGKILL would: no fail, no
    /// settlement chunk, no further heartbeat.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator with x402 (and MPP) payments over a test store.
struct PaidGrid {
    base: String,
    url: String,
    fac: Facilitator,
    t: TestStore,
}

async fn paid_grid(t: TestStore) -> PaidGrid {
    let fac = facilitator::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let mut pcfg = PaymentsConfig::new(PAY_TO, fac.url.clone());
    pcfg.public_base_url = Some(base.clone());
    pcfg.mpp = Some(MppConfig {
        realm: addr.to_string(),
        secret: Zeroizing::new(b"grid-test-secret".to_vec()),
        validity: Duration::from_secs(300),
        recipient: None,
    });
    let payments = Payments::new(pcfg, t.store.clone()).unwrap();
    let mut prices = HashMap::new();
    prices.insert(
        MODEL.to_string(),
        TokenPrice::new(MicrosPerM(IN_PER_M), MicrosPerM(OUT_PER_M)),
    );
    // Heartbeats every 100 ms from the nodes; a node is dropped from
    // routing (and its jobs failed) after 5 s of silence, far beyond any
    // scheduling delay of a loaded machine.
    let config = Config {
        dev: false,
        public_url: base.clone(),
        heartbeat_interval: Duration::from_secs(1),
        missed_heartbeats: 5,
        reference_prices: prices,
        ..Config::default()
    };
    let grid = Grid::with_store(config, t.store.clone(), Some(payments))
        .await
        .unwrap();
    tokio::spawn(coordinator::serve(grid, listener, std::future::pending()));
    PaidGrid {
        url: format!("{base}/v1/chat/completions"),
        base,
        fac,
        t,
    }
}

impl PaidGrid {
    async fn wait_nodes(&self, n: usize) {
        let start = Instant::now();
        loop {
            let v = wait_online(&self.base, Duration::from_secs(20)).await;
            let online = v["providers"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["online"] == true).count())
                .unwrap_or(0);
            if online >= n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn settle_calls(&self) -> usize {
        self.fac.state.settle_calls.load(Ordering::SeqCst)
    }

    /// The payer's credits, read as the payer would: `GET
    /// /compute/credits/balance` signed with its key (X-Auth).
    async fn payer_credits(&self) -> u64 {
        let path = "/compute/credits/balance";
        let nonce = format!("n{}", uuid::Uuid::new_v4().simple());
        let now_ms = i64::try_from(unix_now()).unwrap() * 1000;
        let mut r = reqwest::Client::new().get(format!("{}{path}", self.base));
        for (k, v) in xauth_headers(&key(ANVIL0), "GET", path, b"", now_ms, &nonce) {
            r = r.header(k, v);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["wallet"], PAYER);
        v["balance_micros"].as_u64().unwrap()
    }

    /// A plain chat request paid with a fresh x402 v2 authorization of
    /// `amount` µUSD.
    async fn pay(&self, body: &Value, amount: u64) -> reqwest::Response {
        let pay = PayParams::new(PAY_TO, amount).x402_v2(&key(ANVIL0), &self.url);
        self.send_paid(body, &pay).await
    }

    async fn send_paid(&self, body: &Value, pay: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(&self.url)
            .header("PAYMENT-SIGNATURE", pay)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The quote of `body`, from the coordinator's 402 challenge.
    async fn quote(&self, body: &Value) -> u64 {
        let r = reqwest::Client::new()
            .post(&self.url)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 402);
        let v2 = decode(r.headers()["payment-required"].to_str().unwrap());
        v2["accepts"][0]["amount"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// The SSE `data:` payloads of a stream body read so far.
fn sse_data(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .collect()
}

/// Whether a stream body read so far carries content text.
fn has_content(text: &str) -> bool {
    sse_data(text).iter().any(|d| {
        serde_json::from_str::<Value>(d)
            .ok()
            .and_then(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .is_some_and(|c| !c.is_empty())
    })
}

/// The job id of a plain answer or chunk (`chatcmpl-{job}`).
fn job_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_string()
}

/// Read a stream to its end; its whole body.
async fn read_all(mut r: reqwest::Response, mut seen: String) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), r.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) | Ok(Err(_)) => return seen,
            Err(_) => panic!("the stream neither ended nor failed: {seen}"),
        }
    }
}

/// The last JSON chunk before `[DONE]` of a finished stream.
fn last_chunk(text: &str) -> Value {
    let data = sse_data(text);
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    serde_json::from_str(data[data.len() - 2]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_settlement_is_a_402_before_any_byte_and_a_settled_stream_carries_its_receipt() {
    let g = paid_grid(stores::sqlite_store().await).await;
    let mut a = Node::spawn(&g, false).await;
    let mut b = Node::spawn(&g, false).await;
    g.wait_nodes(2).await;
    let text = words(20);
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 64,
                      "messages": [{"role": "user", "content": text}]});
    let quote = g.quote(&body).await;
    assert_eq!(quote, at_price(prompt_bound(&text), 64));
    let pay = PayParams::new(PAY_TO, quote).x402_v2(&key(ANVIL0), &g.url);

    // The facilitator cannot settle: a 402 challenge with the reason, as
    // the status, no SSE; one settle attempt; no node saw the job.
    g.fac.state.refuse_settle.store(true, Ordering::SeqCst);
    let r = g.send_paid(&body, &pay).await;
    assert_eq!(r.status(), 402);
    assert!(!r.headers().contains_key("payment-response"));
    let raw = r.text().await.unwrap();
    assert!(!raw.contains("data:"), "{raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["x402Version"], 1, "{v}");
    assert_eq!(v["error"], "unexpected_settle_error", "{v}");
    assert_eq!(g.settle_calls(), 1);
    assert_eq!(a.started() + b.started(), 0, "a node ran an unpaid job");
    assert_eq!(g.payer_credits().await, 0);

    // Two nodes, and the refusal is not retried on the other: exactly one
    // settle attempt for a non-stream request too.
    let plain = json!({"model": MODEL, "max_tokens": 64,
                       "messages": [{"role": "user", "content": text}]});
    let r = g.pay(&plain, quote).await;
    assert_eq!(r.status(), 402);
    assert_eq!(g.settle_calls(), 2);
    assert_eq!(a.started() + b.started(), 0);

    // The refused payment consumed nothing: once it can settle, the same
    // authorization pays. The receipt is in the headers, which arrive
    // before the first chunk; the last chunk says what was refunded.
    g.fac.state.refuse_settle.store(false, Ordering::SeqCst);
    let r = g.send_paid(&body, &pay).await;
    assert_eq!(r.status(), 200);
    let receipt = decode(r.headers()["payment-response"].to_str().unwrap());
    assert_eq!(receipt["success"], true);
    let all = read_all(r, String::new()).await;
    let last = last_chunk(&all);
    let cost = at_price(echo_prompt_tokens(&text), 20);
    assert_eq!(last["refunded_micros"], quote - cost, "{all}");
    assert_eq!(g.settle_calls(), 3);
    assert_eq!(g.payer_credits().await, quote - cost);
    let job = job_of(&last);
    let paid = g.t.store.job_payments(&job).await.unwrap();
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(
        (paid[0].scheme.as_str(), paid[0].state.as_str()),
        ("x402-v2", "settled")
    );

    // The same authorization again: refused, never settled twice.
    let r = g.send_paid(&body, &pay).await;
    assert_eq!(r.status(), 402);
    assert_eq!(g.settle_calls(), 3);
    // Settle attempts per authorization: the refused stream's (refused,
    // then settled) and the refused non-stream one's.
    let mut per_key: Vec<usize> = g
        .fac
        .state
        .settle_attempts
        .lock()
        .unwrap()
        .values()
        .copied()
        .collect();
    per_key.sort();
    assert_eq!(per_key, [1, 2]);
    a.kill();
    b.kill();
    stores::cleanup(g.t).await;
}

/// A paid chat that uses 20 of its 2,048 quoted tokens: the payer ends with
/// exactly quote − cost in credits, and the answer says so.
async fn quote_minus_cost_on(t: TestStore) -> TestStore {
    let g = paid_grid(t).await;
    let _node = Node::spawn(&g, false).await;
    g.wait_nodes(1).await;
    let text = words(20);
    // No max_tokens: the default 2,048 is quoted.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": text}]});
    let quote = at_price(prompt_bound(&text), 2048);
    assert_eq!(g.quote(&body).await, quote);
    let r = g.pay(&body, quote).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("payment-response"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let cost = at_price(echo_prompt_tokens(&text), 20);
    assert_eq!(v["refunded_micros"], quote - cost, "{v}");
    assert_eq!(g.payer_credits().await, quote - cost);
    let job = job_of(&v);
    let row = g.t.store.usage_for_job(&job).await.unwrap().unwrap();
    assert_eq!(
        (row.method.as_str(), row.status.as_str()),
        ("x402-v2", "completed")
    );
    assert_eq!((row.cost.0, row.quoted.0), (cost, quote));
    let ledger =
        g.t.store
            .ledger(&WalletId::new_unchecked(PAYER), 10)
            .await
            .unwrap();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].kind, "refund");
    assert_eq!(ledger[0].amount.0, quote - cost);
    assert_eq!(
        ledger[0].reference.as_deref(),
        Some(format!("refund:{job}").as_str())
    );
    assert_eq!(g.settle_calls(), 1);

    // MPP takes the same path: settled before the answer, its receipt in
    // the headers, the unused part credited back.
    let r = reqwest::Client::new()
        .post(&g.url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let cred = mpp_credential(&key(ANVIL0), &www, None);
    let r = reqwest::Client::new()
        .post(&g.url)
        .header("Authorization", &cred)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("payment-receipt"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["refunded_micros"], quote - cost, "{v}");
    assert_eq!(g.payer_credits().await, 2 * (quote - cost));
    let paid = g.t.store.job_payments(&job_of(&v)).await.unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(
        (paid[0].scheme.as_str(), paid[0].state.as_str()),
        ("mpp", "settled")
    );
    g.t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_chat_leaves_the_payer_quote_minus_cost_in_credits() {
    stores::each_backend("prepaid", quote_minus_cost_on).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_payment_wallet_must_be_the_authenticated_one() {
    let g = paid_grid(stores::sqlite_store().await).await;
    let _node = Node::spawn(&g, false).await;
    g.wait_nodes(1).await;
    let text = words(5);
    let body = json!({"model": MODEL, "max_tokens": 16,
                      "messages": [{"role": "user", "content": text}]});
    let raw = serde_json::to_vec(&body).unwrap();
    let quote = g.quote(&body).await;
    let pay = PayParams::new(PAY_TO, quote).x402_v2(&key(ANVIL0), &g.url);
    let signed = |k: &str| {
        let nonce = format!("n{}", uuid::Uuid::new_v4().simple());
        let now_ms = i64::try_from(unix_now()).unwrap() * 1000;
        xauth_headers(
            &key(k),
            "POST",
            "/v1/chat/completions",
            &raw,
            now_ms,
            &nonce,
        )
    };
    let send = |headers: Vec<(&'static str, String)>, pay: Option<&str>| {
        let mut r = reqwest::Client::new()
            .post(&g.url)
            .header("content-type", "application/json")
            .body(raw.clone());
        for (k, v) in headers {
            r = r.header(k, v);
        }
        if let Some(p) = pay {
            r = r.header("PAYMENT-SIGNATURE", p);
        }
        r.send()
    };
    // Signed by ANVIL1, paid by ANVIL0: 403 with the reason, nothing settled.
    let r = send(signed(ANVIL1), Some(&pay)).await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payer_mismatch", "{v}");
    assert_eq!(g.settle_calls(), 0);
    // Signed and paid by the same wallet: accepted (the refused attempt
    // consumed nothing).
    let r = send(signed(ANVIL0), Some(&pay)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(g.settle_calls(), 1);

    // A wallet signature without credits: 402 with the balance and what
    // was needed (the quote).
    let r = send(signed(ANVIL1), None).await.unwrap();
    assert_eq!(r.status(), 402);
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    assert_eq!(e["code"], "insufficient_credits", "{v}");
    assert_eq!(
        (e["balance_micros"].as_u64(), e["needed_micros"].as_u64()),
        (Some(0), Some(quote))
    );
    assert_eq!(e["balance"], "0.00", "{v}");
    assert_eq!(v["x402Version"], 1);
    stores::cleanup(g.t).await;
}

/// What one of the concurrent chats came to.
#[derive(Debug)]
enum Ended {
    /// A whole answer (stream or not) and what it says was refunded.
    Answered { job: String, refunded: u64 },
    /// A stream cut by its node's death after its first chunk.
    Cut { job: String },
}

/// 100 concurrent paid chats (half streamed) over two nodes; one node is
/// killed once every stream has its first chunk and every job has started.
async fn hundred_paid_chats_on(t: TestStore) -> TestStore {
    const N: usize = 100;
    let g = Arc::new(paid_grid(t).await);
    let mut a = Node::spawn(&g, true).await;
    let b = Node::spawn(&g, true).await;
    g.wait_nodes(2).await;
    let text = words(30);
    let max_tokens = 64;
    let quote = at_price(prompt_bound(&text), max_tokens);
    let cost = at_price(echo_prompt_tokens(&text), 30);

    let (first_tx, mut first_rx) = mpsc::channel::<()>(N);
    let mut tasks = Vec::new();
    for i in 0..N {
        let g = g.clone();
        let first_tx = first_tx.clone();
        let text = text.clone();
        let stream = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": MODEL, "stream": stream, "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": text}]});
            let mut r = g.pay(&body, quote).await;
            assert_eq!(r.status(), 200);
            assert!(r.headers().contains_key("payment-response"));
            if !stream {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
                let refunded = v["refunded_micros"].as_u64().unwrap();
                return Ended::Answered {
                    job: job_of(&v),
                    refunded,
                };
            }
            let mut seen = String::new();
            while !has_content(&seen) {
                let c = tokio::time::timeout(Duration::from_secs(60), r.chunk())
                    .await
                    .expect("no first chunk")
                    .unwrap()
                    .expect("the stream ended before its first chunk");
                seen.push_str(&String::from_utf8_lossy(&c));
            }
            first_tx.send(()).await.unwrap();
            let all = read_all(r, seen).await;
            let data = sse_data(&all);
            let job = job_of(&serde_json::from_str(data[0]).unwrap());
            if all.contains("event: error") {
                assert!(!all.contains("[DONE]"), "{all}");
                return Ended::Cut { job };
            }
            let last = last_chunk(&all);
            let content: String = data
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| {
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert_eq!(content, text);
            Ended::Answered {
                job,
                refunded: last["refunded_micros"].as_u64().unwrap(),
            }
        }));
    }
    drop(first_tx);
    // Every stream has its first chunk and every job runs (paused at the
    // gate) on one node or the other.
    for _ in 0..N / 2 {
        tokio::time::timeout(Duration::from_secs(120), first_rx.recv())
            .await
            .expect("streams without a first chunk")
            .unwrap();
    }
    let start = Instant::now();
    while a.started() + b.started() < N {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "jobs not started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        a.started() > 0 && b.started() > 0,
        "one node took every job"
    );
    let on_a = a.started();
    a.kill();
    b.open_gate();

    let mut answered = Vec::new();
    let mut cut = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("a chat never ended")
            .unwrap()
        {
            Ended::Answered { job, refunded } => answered.push((job, refunded)),
            Ended::Cut { job } => cut.push(job),
        }
    }
    // Every payment was settled once, and only once.
    assert_eq!(g.settle_calls(), N);
    let per_key = g.fac.state.settle_attempts.lock().unwrap().clone();
    assert_eq!(per_key.len(), N);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    // The streams on the killed node were cut; its non-stream jobs were
    // retried on the other node and answered.
    assert_eq!(answered.len() + cut.len(), N);
    assert!(
        !cut.is_empty() && cut.len() < on_a,
        "cut {} of {on_a}",
        cut.len()
    );
    assert_eq!(b.started(), N - cut.len(), "retries ran on the live node");
    let jobs: HashSet<&String> = answered.iter().map(|(j, _)| j).chain(&cut).collect();
    assert_eq!(jobs.len(), N, "one job per payment");
    // Each answer kept the cost and refunded the rest; each cut stream was
    // refunded whole.
    for (_, refunded) in &answered {
        assert_eq!(*refunded, quote - cost);
    }
    let payer = WalletId::new_unchecked(PAYER);
    let ledger = g.t.store.ledger(&payer, 1000).await.unwrap();
    let refunds: HashMap<String, u64> = ledger
        .iter()
        .map(|e| {
            assert_eq!(e.kind, "refund", "{e:?}");
            (e.reference.clone().unwrap(), e.amount.0)
        })
        .collect();
    assert_eq!(refunds.len(), N, "one refund row per job");
    let mut total_cost = 0;
    for (job, _) in &answered {
        assert_eq!(refunds[&format!("refund:{job}")], quote - cost);
        let row = g.t.store.usage_for_job(job).await.unwrap().unwrap();
        assert_eq!(
            (row.status.as_str(), row.cost.0),
            ("completed", cost),
            "{row:?}"
        );
        total_cost += row.cost.0;
    }
    for job in &cut {
        assert_eq!(refunds[&format!("refund:{job}")], quote);
        let row = g.t.store.usage_for_job(job).await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.cost.0), ("failed", 0), "{row:?}");
    }
    for job in &jobs {
        let paid = g.t.store.job_payments(job).await.unwrap();
        assert_eq!(paid.len(), 1, "{job}: {paid:?}");
        assert_eq!(paid[0].state, "settled");
    }
    // The ledger adds up to the micro-dollar: what was settled is what the
    // jobs cost plus what the payer holds in credits.
    let credits = g.payer_credits().await;
    assert_eq!(credits, refunds.values().sum::<u64>());
    assert_eq!(N as u64 * quote, total_cost + credits);
    drop(b);
    drop(a);
    Arc::try_unwrap(g).ok().expect("no task holds the grid").t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_paid_chats_and_a_killed_node_settle_each_payment_once() {
    stores::each_backend("prepaid100", hundred_paid_chats_on).await;
}

/// Reserve a node anonymously and seal `inner` to it: the clear body of a
/// sealed chat (PROTOCOL.md §5) and the key that opens its answer.
async fn sealed_body(
    g: &PaidGrid,
    inner: Value,
    max_tokens: u64,
    stream: bool,
) -> (Value, e2e::ResponseKey) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/reserve", g.base))
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let res: ReserveResponse = r.json().await.unwrap();
    let x = X25519Public::from_b58(&res.node_x25519_pubkey).unwrap();
    let (enc, rk) = e2e::seal_input(&x, inner.to_string().as_bytes()).unwrap();
    let mut body =
        json!({"reservation_token": res.reservation_token, "max_tokens": max_tokens, "enc": enc});
    if stream {
        body["stream"] = json!(true);
    }
    (body, rk)
}

/// The sealed-mode paid path (§7f) runs the same prepay as plain mode: an
/// x402 payment is settled before the job is dispatched (no content byte,
/// no node job, when settlement fails), its receipt is in the headers of
/// streams and non-streams, and quote − cost comes back as credits, stated
/// beside the usage (in the last sealed chunk of a stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_chat_is_settled_before_dispatch_and_metered() {
    let g = paid_grid(stores::sqlite_store().await).await;
    let node = Node::spawn(&g, false).await;
    g.wait_nodes(1).await;
    let text = words(20);
    let cost = at_price(echo_prompt_tokens(&text), 20);

    // A stream whose settlement fails: a 402 before any byte, no SSE, the
    // node never sees the job, nothing credited.
    let nonce = e2e::random_request_nonce();
    let inner = json!({"messages": [{"role": "user", "content": text}],
                       "max_tokens": 64, "stream": true, "nonce": nonce});
    let (body, rk) = sealed_body(&g, inner, 64, true).await;
    let quote = g.quote(&body).await;
    assert!(quote > cost);
    let pay = PayParams::new(PAY_TO, quote).x402_v2(&key(ANVIL0), &g.url);
    g.fac.state.refuse_settle.store(true, Ordering::SeqCst);
    let r = g.send_paid(&body, &pay).await;
    assert_eq!(r.status(), 402);
    assert!(!r.headers().contains_key("payment-response"));
    let raw = r.text().await.unwrap();
    assert!(!raw.contains("data:"), "{raw}");
    assert_eq!(g.settle_calls(), 1);
    assert_eq!(node.started(), 0, "a node ran an unpaid sealed job");
    assert_eq!(g.payer_credits().await, 0);

    // Settled: the receipt in the headers, the sealed chunks open to the
    // echo, and the last one states the refund of quote − cost.
    g.fac.state.refuse_settle.store(false, Ordering::SeqCst);
    let r = g.send_paid(&body, &pay).await;
    assert_eq!(r.status(), 200);
    let receipt = decode(r.headers()["payment-response"].to_str().unwrap());
    assert_eq!(receipt["success"], true);
    let all = read_all(r, String::new()).await;
    let data = sse_data(&all);
    assert_eq!(data.last(), Some(&"[DONE]"), "{all}");
    let mut opener = rk.stream_opener(&nonce).unwrap();
    let mut content = String::new();
    let mut last = Value::Null;
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        let text = opener
            .open(
                c["seq"].as_u64().unwrap(),
                c["final"].as_bool().unwrap(),
                c["eph"].as_str(),
                c["ct"].as_str().unwrap(),
            )
            .unwrap();
        content.push_str(&text);
        last = c;
    }
    opener.finish().unwrap();
    assert_eq!(content, text);
    assert_eq!(last["refunded_micros"], quote - cost, "{last}");
    assert_eq!(g.settle_calls(), 2);
    assert_eq!(g.payer_credits().await, quote - cost);
    let job = last["job"].as_str().unwrap().to_string();
    let row = g.t.store.usage_for_job(&job).await.unwrap().unwrap();
    assert_eq!(
        (
            row.method.as_str(),
            row.status.as_str(),
            row.cost.0,
            row.quoted.0
        ),
        ("x402-v2", "completed", cost, quote)
    );
    let paid = g.t.store.job_payments(&job).await.unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].state, "settled");

    // Non-stream: the same, the refund beside the usage in the body.
    let inner = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 64});
    let (body, rk) = sealed_body(&g, inner, 64, false).await;
    let quote2 = g.quote(&body).await;
    let r = g.pay(&body, quote2).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("payment-response"));
    let v: Value = r.json().await.unwrap();
    let sealed = serde_json::from_value(v["sealed_result"].clone()).unwrap();
    let reply: SealedReplyPlaintext =
        serde_json::from_slice(&rk.open_output(&sealed).unwrap()).unwrap();
    assert_eq!(reply.content, text);
    assert_eq!(v["usage"]["completion_tokens"], 20, "{v}");
    assert_eq!(v["refunded_micros"], quote2 - cost, "{v}");
    assert_eq!(g.settle_calls(), 3);
    assert_eq!(g.payer_credits().await, quote - cost + quote2 - cost);
    assert_eq!(node.started(), 2);
    drop(node);
    stores::cleanup(g.t).await;
}
