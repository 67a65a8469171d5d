//! OpenAI's `n` and `logprobs` through the grid with the real model: a node
//! agent running SmolLM2 on the candle engine behind a coordinator with a
//! store, asked in plain mode (JSON and SSE) and in sealed mode (the `sgl`
//! client, non-stream and stream). Each answer has its `n` choices with
//! logprobs, the usage counts every choice's tokens, the ledger bills them
//! all, and the quote covers `n` × `max_tokens` (a balance that pays one
//! completion's quote but not eight is refused eight).
//! Skipped when the model is not cached, unless SGL_REQUIRE_MODEL=1.
#![cfg(feature = "coordinator")]

use crate::engine_support;
use crate::grid_support;
use crate::pay_common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use grid_support::in_process::{invite, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{MODEL, OPERATOR};
use serde_json::{json, Value};
use sgl::client::{ChatRequest, GridClient};
use sgl::coordinator::{self, Config, Grid};
use sgl::engine::{Engine, EngineConfig};
use sgl::money::{Micros, MicrosPerM, TokenPrice};
use sgl::node::engine_executor::EngineExecutor;
use sgl::payments::{Payments, PaymentsConfig};
use sgl::proto::openai::ChoiceParams;
use sgl::store::{Store, WalletId};

const PAYER: &str = "0x2222222222222222222222222222222222222222";
/// 5 USD and 10 USD per 1M tokens.
pub(crate) const PRICE: TokenPrice = TokenPrice::new(MicrosPerM(5_000_000), MicrosPerM(10_000_000));

pub(crate) fn wallet(s: &str) -> WalletId {
    WalletId::new_unchecked(s.to_ascii_lowercase())
}

/// The cost the ledger must show for a usage, rounded up to whole µUSD:
/// every prompt token at the full price, cached or not.
pub(crate) fn cost(prompt: u64, completion: u64) -> Micros {
    Micros((prompt * 5_000_000 + completion * 10_000_000).div_ceil(1_000_000))
}

/// A coordinator on `store` that bills the model at [`PRICE`] (a facilitator
/// that is never called: API-key credits only). Its base URL.
pub(crate) async fn coordinator(store: &Store) -> String {
    let mut prices = HashMap::new();
    prices.insert(MODEL.to_string(), PRICE);
    let config = Config {
        dev: false,
        heartbeat_interval: Duration::from_millis(200),
        reference_prices: prices,
        ..Config::default()
    };
    let payments = Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap();
    let grid = Grid::with_store(config, store.clone(), Some(payments))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(coordinator::serve(grid, listener, std::future::pending()));
    base
}

/// A coordinator on `store` that bills the model at [`PRICE`], one node of
/// the real model at `path` online behind it, and a new API key of
/// `payer`'s wallet, funded with `funds`: the base URL, the node, the key.
pub(crate) async fn billed_model_grid(
    store: &Store,
    path: PathBuf,
    payer: &str,
    funds: Micros,
) -> (String, Agent, String) {
    let base = coordinator(store).await;
    let engine = tokio::task::spawn_blocking(move || {
        Engine::load(EngineConfig::new(path, MODEL)).expect("load the model")
    })
    .await
    .unwrap();
    let code = invite(store, OPERATOR).await;
    let node = Agent::spawn_with(
        node_dir(&base),
        Arc::new(EngineExecutor::new(engine)),
        |cfg| {
            cfg.heartbeat_interval = FAST_HEARTBEAT;
            cfg.registration_code = Some(code);
            cfg.drain_timeout = Duration::from_secs(2);
        },
    );
    grid_support::wait_online(&base, Duration::from_secs(30)).await;
    let p = Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap();
    let (key, _) = p.create_api_key(&wallet(payer), "test").await.unwrap();
    store
        .top_up(&wallet(payer), funds, "grant-1")
        .await
        .unwrap();
    (base, node, key.secret.as_str().to_string())
}

/// A plain-mode chat request paid with API key `key`.
pub(crate) async fn plain(base: &str, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// One streamed choice: its text, its logprob entries, its finish reason.
type SseChoice = (String, usize, Option<String>);

/// Each choice's text, logprob entries and finish reason, and the usage,
/// from a plain-mode SSE body.
fn read_sse(text: &str) -> (Vec<SseChoice>, Option<Value>) {
    let mut choices: Vec<SseChoice> = Vec::new();
    let mut usage = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if choices.len() <= i {
                choices.resize(i + 1, (String::new(), 0, None));
            }
            choices[i].0 += c["delta"]["content"].as_str().unwrap_or("");
            choices[i].1 += c["logprobs"]["content"].as_array().map_or(0, |a| a.len());
            if let Some(f) = c["finish_reason"].as_str() {
                choices[i].2 = Some(f.to_string());
            }
        }
    }
    (choices, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_and_logprobs_through_plain_and_sealed_modes_are_billed_in_full() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let t = pay_common::stores::sqlite_store().await;
    let store = t.store.clone();
    // Enough for the quote of one completion of 8,192 tokens (about 82,000
    // µUSD) but not for eight of them.
    let (base, _node, key) = billed_model_grid(&store, path, PAYER, Micros(200_000)).await;
    let ask = json!([{"role": "user", "content": "Say something about the sea."}]);

    // The quote covers n × max_tokens.
    let big = |n: u32| json!({"model": MODEL, "messages": ask, "n": n, "max_tokens": 8192});
    let r = plain(&base, &key, &big(8)).await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
    // Out of range: refused before any node or payment.
    let r = plain(
        &base,
        &key,
        &json!({"model": MODEL, "messages": ask, "n": 9}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "n", "{v}");

    // Plain, JSON.
    let body = json!({"model": MODEL, "messages": ask, "n": 3, "logprobs": true,
                      "top_logprobs": 2, "max_tokens": 6, "temperature": 0.9, "seed": 7});
    let r = plain(&base, &key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    let mut tokens = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64, "{v}");
        let lp = c["logprobs"]["content"].as_array().unwrap();
        assert!(!lp.is_empty(), "{v}");
        assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2, "{v}");
        tokens += lp.len() as u64;
    }
    let (prompt, completion) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(completion, tokens, "every choice's tokens count: {v}");
    let job = v["id"].as_str().unwrap().trim_start_matches("chatcmpl-");
    let row = store.usage_for_job(job).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.cost),
        ("completed", cost(prompt, completion))
    );

    // Plain, SSE.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = plain(&base, &key, &sbody).await;
    assert_eq!(r.status(), 200);
    let (choices, usage) = read_sse(&r.text().await.unwrap());
    assert_eq!(choices.len(), 3, "{choices:?}");
    assert!(
        choices.iter().all(|c| c.1 > 0 && c.2.is_some()),
        "{choices:?}"
    );
    let usage = usage.expect("a usage chunk");
    let streamed: usize = choices.iter().map(|c| c.1).sum();
    assert_eq!(usage["completion_tokens"], streamed as u64);

    // Sealed, through the `sgl` client, non-stream and stream.
    let client = GridClient::new(&base, Some(key.clone())).unwrap();
    for stream in [false, true] {
        let req = ChatRequest {
            model: MODEL.into(),
            messages: vec![("user".into(), "Name a fruit.".into())],
            max_tokens: 5,
            temperature: 0.9,
            stream,
            node: None,
            max_price: None,
            require_attestation: None,
            choices: ChoiceParams {
                n: 2,
                logprobs: Some(1),
            },
        };
        let res = client.reserve(&req).await.unwrap();
        let out = client.chat(&res, &req, |_| {}).await.unwrap();
        assert_eq!(out.choices.len(), 2, "stream {stream}: {out:?}");
        let mut tokens = 0;
        for c in &out.choices {
            let lp = c
                .logprobs
                .as_ref()
                .and_then(|l| l.content.as_ref())
                .unwrap();
            assert!(!lp.is_empty() && lp.len() <= 5, "{out:?}");
            assert!(lp.iter().all(|t| t.top_logprobs.len() == 1), "{out:?}");
            tokens += lp.len() as u64;
        }
        assert_eq!(out.content, out.choices[0].message.text_or_empty());
        let usage = out.usage.unwrap();
        assert_eq!(usage.completion_tokens, tokens, "stream {stream}");
        assert!(out.usage_signed);
        let row = store.usage_for_job(&out.job_id).await.unwrap().unwrap();
        assert_eq!(
            (row.status.as_str(), row.cost),
            (
                "completed",
                cost(usage.prompt_tokens, usage.completion_tokens)
            ),
            "stream {stream}"
        );
    }
    pay_common::stores::cleanup(t).await;
}
