//! Routing by what a node's engine implements: `tools`, `response_format`,
//! `n` > 1 and `logprobs` go only to a node that advertises them in
//! `capabilities.features`. With only the echo engine (which advertises
//! none) each is a 400 `unsupported_parameter` naming the parameter, and a
//! request without them is served; with the real model beside it, such a
//! request always reaches the model. In sealed mode, where the coordinator
//! cannot read the request, the `sgl` client names the features in its
//! reservation and gets only a node that lists them, or a 400 naming the
//! parameter; `/v1/providers` lists each node's features. The second test
//! is skipped when the model is not cached, unless SGL_REQUIRE_MODEL=1.
#![cfg(feature = "coordinator")]

use crate::engine_support;
use crate::grid_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use grid_support::in_process::{self, node_dir, Agent, FAST_HEARTBEAT};
use grid_support::{providers, wait_online, MODEL};
use serde_json::{json, Value};
use sgl::client::{payload_features, ChatRequest, ClientError, GridClient};
use sgl::coordinator::Config;
use sgl::engine::{Engine, EngineConfig};
use sgl::node::engine_executor::EngineExecutor;
use sgl::proto::api::ReserveRequest;
use sgl::proto::job::JobPayload;
use sgl::proto::openai::{ChatMessage, ChoiceParams};

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

/// A sealed request through the `sgl` client asking `choices` of `n` and
/// `logprobs`.
fn sealed(choices: ChoiceParams) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![("user".into(), "the sea is blue".into())],
        max_tokens: 8,
        temperature: 0.0,
        stream: false,
        node: None,
        max_price: None,
        require_attestation: None,
        choices,
    }
}

/// The sealed requests that need a feature: the feature, and its choices.
fn sealed_extended() -> Vec<(&'static str, ChoiceParams)> {
    vec![
        (
            "n",
            ChoiceParams {
                n: 2,
                logprobs: None,
            },
        ),
        (
            "logprobs",
            ChoiceParams {
                n: 1,
                logprobs: Some(0),
            },
        ),
    ]
}

/// A sealed payload asking for JSON.
fn json_payload() -> JobPayload {
    JobPayload {
        messages: Some(vec![ChatMessage::new("user", "Describe the sea as JSON.")]),
        temperature: Some(0.0),
        max_tokens: Some(24),
        response_format: Some(json!({"type": "json_object"})),
        ..Default::default()
    }
}

/// The reservation for [`json_payload`].
fn json_reservation() -> ReserveRequest {
    ReserveRequest {
        model: Some(MODEL.into()),
        features: payload_features(&json_payload()),
        ..Default::default()
    }
}

/// The coordinator's 400 `unsupported_parameter` naming `param`.
fn assert_unsupported(err: ClientError, param: &str) {
    let ClientError::Status { status, body } = err else {
        panic!("{param}: {err}");
    };
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
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

    // The echo engine lists no features.
    let v = providers(&base).await;
    assert_eq!(v["providers"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["providers"][0].get("features").is_none(), "{v}");
    // Sealed mode: the coordinator cannot read the request, so the client
    // names what it needs in the reservation, and no node is reserved.
    let client = GridClient::new(&base, None).unwrap();
    for (param, choices) in sealed_extended() {
        assert_unsupported(client.reserve(&sealed(choices)).await.unwrap_err(), param);
    }
    let err = client.reserve_with(&json_reservation()).await.unwrap_err();
    assert_unsupported(err, "response_format");
    // A feature the coordinator does not know is refused by name.
    let err = client
        .reserve_with(&ReserveRequest {
            model: Some(MODEL.into()),
            features: vec!["telepathy".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let ClientError::Status { status, body } = err else {
        panic!("{err}");
    };
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("telepathy"), "{body}");
    // What needs nothing is reserved and served.
    let req = sealed(ChoiceParams::default());
    let res = client.reserve(&req).await.unwrap();
    assert!(res.features.is_empty(), "{res:?}");
    let out = client.chat(&res, &req, |_| {}).await.unwrap();
    assert_eq!(out.content, "the sea is blue");
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
    // Both online, and the model's node has advertised its features (they
    // come with its heartbeats: a node may be online a moment before).
    let start = Instant::now();
    loop {
        let v = providers(&base).await;
        let list = v["providers"].as_array().cloned().unwrap_or_default();
        let online = list.iter().filter(|p| p["online"] == true).count();
        let advertised = list
            .iter()
            .any(|p| p["features"].as_array().is_some_and(|f| !f.is_empty()));
        if online == 2 && advertised {
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

    // `/v1/providers` shows what each node implements: the model all three
    // features, the echo engine none (the field absent).
    let v = providers(&base).await;
    let listed = v["providers"].as_array().unwrap();
    let model_node = listed
        .iter()
        .find(|p| p.get("features").is_some())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        model_node["features"],
        json!(sgl::proto::features::ALL),
        "{v}"
    );
    assert_eq!(
        listed
            .iter()
            .filter(|p| p.get("features").is_none())
            .count(),
        1,
        "{v}"
    );
    let model_id = model_node["node_id"].as_str().unwrap();

    // Sealed mode: each reservation that needs a feature gets the model's
    // node, never the echo node beside it at the same price.
    let client = GridClient::new(&base, None).unwrap();
    for _ in 0..3 {
        for (param, choices) in sealed_extended() {
            let req = sealed(choices);
            let res = client.reserve(&req).await.unwrap();
            assert_eq!(res.node_id, model_id, "{param}");
            assert!(res.features.iter().any(|f| f == param), "{res:?}");
            let out = client.chat(&res, &req, |_| {}).await.unwrap();
            assert_eq!(out.choices.len(), choices.n as usize, "{param}: {out:?}");
            if choices.logprobs.is_some() {
                assert!(out.choices[0].logprobs.is_some(), "{out:?}");
            }
        }
        let res = client.reserve_with(&json_reservation()).await.unwrap();
        assert_eq!(res.node_id, model_id);
        let out = client
            .send_sealed(&res, MODEL, json_payload())
            .await
            .unwrap()
            .open(|_, _| {})
            .await
            .unwrap();
        assert!(
            out.content.trim_start().starts_with('{'),
            "the model's constrained answer: {out:?}"
        );
    }
}
