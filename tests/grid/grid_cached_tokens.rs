//! The prefix cache's saving through the grid with the real model: a node
//! agent running SmolLM2 on the candle engine behind a coordinator with a
//! store. The same long prompt asked twice: the first answer's usage has no
//! `prompt_tokens_details` (nothing was cached: the shape the public SDKs
//! know), the second reports `prompt_tokens_details.cached_tokens` > 0, in
//! plain mode (JSON and the SSE usage chunk) and in sealed mode (the `sgl`
//! client, non-stream and stream). Cached tokens are reported, not
//! discounted: every job is billed on its prompt and completion tokens.
//! Skipped when the model is not cached, unless SGL_REQUIRE_MODEL=1.
#![cfg(feature = "coordinator")]

use crate::engine_support;
use crate::grid_choices::{billed_model_grid, cost, plain};
use crate::grid_support;
use crate::pay_common;

use grid_support::MODEL;
use serde_json::{json, Value};
use sgl::client::{ChatRequest, GridClient};
use sgl::money::Micros;

const PAYER: &str = "0x3333333333333333333333333333333333333333";

/// A system prompt of a few hundred tokens, as chat clients resend each turn.
fn system() -> String {
    "You answer questions about the town library, briefly and politely. ".repeat(24)
}

/// `usage.prompt_tokens_details.cached_tokens`, when present.
fn cached(usage: &Value) -> Option<u64> {
    usage.get("prompt_tokens_details")?["cached_tokens"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reports_cached_tokens_and_is_billed_in_full() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let t = pay_common::stores::sqlite_store().await;
    let store = t.store.clone();
    let (base, _node, key) = billed_model_grid(&store, path, PAYER, Micros(1_000_000)).await;
    let body = json!({"model": MODEL, "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "system", "content": system()},
                     {"role": "user", "content": "When does it open?"}]});

    // Plain, JSON: the first ask fills the cache, the second uses it.
    let r = plain(&base, &key, &body).await;
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 200, "{first}");
    assert!(
        first["usage"].get("prompt_tokens_details").is_none(),
        "nothing was cached: {first}"
    );
    let r = plain(&base, &key, &body).await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    let hit = cached(&again["usage"]).unwrap_or_else(|| panic!("{again}"));
    assert!(hit > 0 && hit < prompt, "{again}");
    assert_eq!(again["usage"]["prompt_tokens"], prompt, "{again}");
    assert!(again["usage_signature"].is_string(), "{again}");
    let completion = again["usage"]["completion_tokens"].as_u64().unwrap();
    let job = again["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-");
    let row = store.usage_for_job(job).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.cost),
        ("completed", cost(prompt, completion)),
        "cached tokens are billed as prompt tokens"
    );

    // Plain, SSE: the usage chunk says it too.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = plain(&base, &key, &sbody).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|v| !v["usage"].is_null())
        .map(|v| v["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk: {text}"));
    assert!(cached(&usage).is_some_and(|c| c > 0), "{usage}");

    // Sealed, through the `sgl` client: the usage it opens and verifies.
    let client = GridClient::new(&base, Some(key.clone())).unwrap();
    for stream in [false, true] {
        let req = ChatRequest {
            model: MODEL.into(),
            messages: vec![
                ("system".into(), system()),
                ("user".into(), "Can I borrow ten books?".into()),
            ],
            max_tokens: 6,
            temperature: 0.0,
            stream,
            node: None,
            max_price: None,
            require_attestation: None,
            choices: Default::default(),
        };
        let res = client.reserve(&req).await.unwrap();
        let out = client.chat(&res, &req, |_| {}).await.unwrap();
        let usage = out.usage.unwrap();
        let hit = usage
            .prompt_tokens_details
            .map(|d| d.cached_tokens)
            .unwrap_or(0);
        assert!(
            hit > 0 && hit < usage.prompt_tokens,
            "stream {stream}: {usage:?}"
        );
        assert!(out.usage_signed, "stream {stream}");
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
