//! `tools` through the grid with the real model: a development coordinator
//! in front of `sgl node start` (SmolLM2 on the candle engine). Plain mode
//! (JSON and SSE) and sealed mode (the payload carries `tools` and
//! `tool_choice` inside the envelope, non-stream and stream) answer a named
//! `tool_choice` with one call of that function whose arguments follow its
//! parameters, and finish_reason `tool_calls`. Skipped when the model is not
//! cached, unless SGL_REQUIRE_MODEL=1. (The echo node's refusal of `tools`
//! is in grid_features.)
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;

use std::process::Stdio;

use grid_support::{ModelGrid, MODEL};
use serde_json::{json, Value};
use sgl::client::GridClient;
use sgl::proto::job::JobPayload;
use sgl::proto::openai::{ChatMessage, FinishReason};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {}}}}
    ])
}

fn named() -> Value {
    json!({"type": "function", "function": {"name": "get_weather"}})
}

/// One call of `get_weather` with valid arguments.
fn check_call(name: &str, arguments: &str) {
    assert_eq!(name, "get_weather", "{arguments}");
    let v: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{e}: {arguments}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{arguments}"));
    assert_eq!(o.len(), 2, "{arguments}");
    assert!(
        o["city"].as_str().is_some_and(|c| c.chars().count() <= 30),
        "{arguments}"
    );
    assert!(
        o["unit"] == "celsius" || o["unit"] == "fahrenheit",
        "{arguments}"
    );
}

fn messages() -> Value {
    json!([{"role": "user", "content": "What is the weather in Rome?"}])
}

/// A plain-mode stream's calls (name, arguments), content and finish reason.
async fn plain_stream(base: &str, body: &Value) -> (Vec<(String, String)>, String, String) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (mut calls, mut content, mut finish) =
        (Vec::<(String, String)>::new(), String::new(), String::new());
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        if let Some(c) = v["choices"].get(0) {
            content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = d["index"].as_u64().unwrap() as usize;
                if calls.len() <= i {
                    calls.resize(i + 1, Default::default());
                    assert!(d["id"].as_str().unwrap().starts_with("call_"), "{d}");
                    assert_eq!(d["type"], "function", "{d}");
                }
                calls[i]
                    .0
                    .push_str(d["function"]["name"].as_str().unwrap_or(""));
                calls[i]
                    .1
                    .push_str(d["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (calls, content, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_tool_call_through_plain_and_sealed_modes() {
    if engine_support::model_path().is_none() {
        return;
    }
    let grid = ModelGrid::start(Stdio::inherit()).await;
    let base = grid.coord.base.as_str();
    let client = reqwest::Client::new();

    // Plain mode, JSON.
    let body = json!({"model": MODEL, "messages": messages(), "max_tokens": 100,
                      "temperature": 0.7, "seed": 3, "tools": tools(), "tool_choice": named()});
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"), "{v}");
    check_call(
        calls[0]["function"]["name"].as_str().unwrap(),
        calls[0]["function"]["arguments"].as_str().unwrap(),
    );

    // Plain mode, SSE.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let (calls, content, finish) = plain_stream(base, &stream).await;
    assert_eq!(finish, "tool_calls", "{calls:?} {content}");
    assert_eq!(content, "");
    assert_eq!(calls.len(), 1);
    check_call(&calls[0].0, &calls[0].1);

    // A function that is not declared: 400 naming tool_choice.
    let mut bad = body.clone();
    bad["tool_choice"]["function"]["name"] = json!("launch");
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "tool_choice", "{v}");

    // Sealed mode: the payload inside the envelope carries the tools.
    let grid = GridClient::new(base, None).unwrap();
    for stream in [false, true] {
        let res = grid
            .reserve_with(&sgl::proto::api::ReserveRequest {
                model: Some(MODEL.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let payload = JobPayload {
            messages: Some(vec![ChatMessage::new(
                "user",
                "What is the weather in Rome?",
            )]),
            temperature: Some(0.7),
            max_tokens: Some(100),
            seed: Some(4),
            stream: stream.then_some(true),
            tools: Some(tools()),
            tool_choice: Some(named()),
            ..Default::default()
        };
        let out = grid
            .send_sealed(&res, MODEL, payload)
            .await
            .unwrap()
            .open(|_, _| {})
            .await
            .unwrap();
        assert_eq!(out.choices.len(), 1, "{out:?}");
        let c = &out.choices[0];
        assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls), "{out:?}");
        assert_eq!(c.message.content, None, "{out:?}");
        let calls = c.message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 1, "{out:?}");
        assert!(calls[0].id.starts_with("call_"));
        check_call(&calls[0].function.name, &calls[0].function.arguments);
        if !stream {
            assert_eq!(out.finish_reason.as_deref(), Some("tool_calls"));
        }
    }
}
