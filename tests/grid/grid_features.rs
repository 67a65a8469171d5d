//! Routing by what a node's engine implements: `tools`, `response_format`,
//! `n` > 1 and `logprobs` go only to a node that advertises them in
//! `capabilities.features`. With only the echo engine (which advertises
//! none) each is a 400 `unsupported_parameter` naming the parameter, and a
//! request without them is served; with the real model beside it, such a
//! request always reaches the model. The second test is skipped when the
//! model is not cached, unless SGL_REQUIRE_MODEL=1.
#![cfg(feature = "coordinator")]

use crate::engine_support;
use crate::grid_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use grid_support::in_process::{self, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{providers, wait_online, MODEL};
use serde_json::{json, Value};
use sgl::coordinator::Config;
use sgl::engine::{Engine, EngineConfig};
use sgl::node::engine_executor::EngineExecutor;

fn dev() -> Config {
    Config {
        dev: true,
        heartbeat_interval: Duration::from_millis(200),
        ..Config::default()
    }
}

fn echo(base: &str) -> Agent {
    Agent::spawn(node_dir(base), |cfg| {
        cfg.heartbeat_interval = FAST_HEARTBEAT;
        cfg.drain_timeout = Duration::from_secs(2);
    })
}

async fn plain(base: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn ask(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "max_tokens": 16, "temperature": 0.0,
        "messages": [{"role": "user", "content": "the sea is blue"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The three parameters a node must advertise, each with the request that
/// asks for it.
fn extended() -> Vec<(&'static str, Value)> {
    vec![
        ("n", json!({"n": 2})),
        ("logprobs", json!({"logprobs": true})),
        (
            "response_format",
            json!({"response_format": {"type": "json_object"}}),
        ),
        (
            "tools",
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_no_node_implements_is_refused_by_name() {
    let base = in_process::coordinator(dev()).await;
    let node = echo(&base);
    wait_online(&base, Duration::from_secs(10)).await;
    for (param, extra) in extended() {
        let (status, v) = plain(&base, &ask(extra)).await;
        assert_eq!(status, 400, "{param}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // What asks for nothing beyond one text completion is still served.
    let plain_ones = [
        json!({}),
        json!({"n": 1, "logprobs": false, "response_format": {"type": "text"}}),
    ];
    for extra in plain_ones {
        let (status, v) = plain(&base, &ask(extra)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "the sea is blue");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_request_goes_to_the_node_that_implements_it() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let base = in_process::coordinator(dev()).await;
    let engine = tokio::task::spawn_blocking(move || {
        Engine::load(EngineConfig::new(path, MODEL)).expect("load the model")
    })
    .await
    .unwrap();
    let _echo = echo(&base);
    let _model = Agent::spawn_with(
        node_dir(&base),
        Arc::new(EngineExecutor::new(engine)),
        |cfg| {
            cfg.heartbeat_interval = FAST_HEARTBEAT;
            cfg.drain_timeout = Duration::from_secs(2);
        },
    );
    wait_online(&base, Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let v = providers(&base).await;
        let online = v["providers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["online"] == true).count());
        if online == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both nodes serve the model at the same price: without routing by
    // features some of these would reach the echo node and be refused.
    for _ in 0..3 {
        let (status, v) = plain(&base, &ask(json!({"n": 2, "logprobs": true}))).await;
        assert_eq!(status, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{v}");
        assert!(choices[0]["logprobs"]["content"].is_array(), "{v}");
        let (status, v) = plain(
            &base,
            &ask(json!({"response_format": {"type": "json_object"}, "max_tokens": 24})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            text.trim_start().starts_with('{'),
            "the model's constrained answer: {v}"
        );
    }
}
