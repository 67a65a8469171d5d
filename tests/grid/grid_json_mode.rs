//! `response_format` through the grid with the real model: a development
//! coordinator in front of `sgl node start` (SmolLM2 on the candle engine).
//! Plain mode (JSON and SSE) and sealed mode (the payload carries
//! `response_format` inside the envelope, non-stream and stream) all answer
//! with JSON that parses and follows the schema; an unsupported keyword is
//! a 400 naming it before any node is asked. Skipped when the model is not
//! cached, unless SGL_REQUIRE_MODEL=1.
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;

use std::process::Stdio;

use grid_support::{ModelGrid, MODEL};
use serde_json::{json, Value};
use sgl::client::GridClient;
use sgl::proto::job::JobPayload;
use sgl::proto::openai::ChatMessage;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"enum": ["France", "Italy", "Spain"]},
            "population": {"type": "integer"},
            "landmarks": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 2
            }
        },
        "required": ["city", "country", "population", "landmarks"],
        "additionalProperties": false
    })
}

fn response_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true, "schema": schema()}})
}

fn check(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{text}"));
    assert_eq!(o.len(), 4, "{text}");
    assert!(o["city"].is_string(), "{text}");
    assert!(
        ["France", "Italy", "Spain"]
            .iter()
            .any(|c| o["country"] == *c),
        "{text}"
    );
    assert!(
        o["population"].is_i64() || o["population"].is_u64(),
        "{text}"
    );
    let l = o["landmarks"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"));
    assert!(l.len() <= 2 && l.iter().all(Value::is_string), "{text}");
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Describe Paris as JSON."}])
}

/// A plain-mode stream's text and finish reason.
async fn plain_stream(base: &str, body: &Value) -> (String, String) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (mut out, mut finish) = (String::new(), String::new());
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        if let Some(c) = v["choices"].get(0) {
            out.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (out, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_through_plain_and_sealed_modes() {
    if engine_support::model_path().is_none() {
        return;
    }
    let grid = ModelGrid::start(Stdio::inherit()).await;
    let base = grid.coord.base.as_str();
    let client = reqwest::Client::new();

    // Plain mode, JSON.
    let body = json!({"model": MODEL, "messages": messages(), "max_tokens": 120,
                      "temperature": 0.7, "seed": 3, "response_format": response_format()});
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    check(v["choices"][0]["message"]["content"].as_str().unwrap());

    // Plain mode, SSE; and json_object.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let (text, finish) = plain_stream(base, &stream).await;
    assert_eq!(finish, "stop", "{text}");
    check(&text);
    stream["response_format"] = json!({"type": "json_object"});
    let (text, finish) = plain_stream(base, &stream).await;
    assert_eq!(finish, "stop", "{text}");
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text}"
    );

    // A keyword outside the subset: 400 naming it, before any node runs.
    let mut bad = body.clone();
    bad["response_format"]["json_schema"]["schema"]["properties"]["population"]["minimum"] =
        json!(0);
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "minimum", "{v}");

    // Sealed mode: the payload inside the envelope carries response_format.
    let grid = GridClient::new(base, None).unwrap();
    for stream in [false, true] {
        let payload = JobPayload {
            messages: Some(vec![ChatMessage::new("user", "Describe Paris as JSON.")]),
            temperature: Some(0.7),
            max_tokens: Some(120),
            seed: Some(4),
            stream: stream.then_some(true),
            response_format: Some(response_format()),
            ..Default::default()
        };
        // Only a node that implements response_format is reserved.
        let res = grid
            .reserve_with(&sgl::proto::api::ReserveRequest {
                model: Some(MODEL.into()),
                features: sgl::client::payload_features(&payload),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(res.features.iter().any(|f| f == "response_format"));
        let mut live = String::new();
        let out = grid
            .send_sealed(&res, MODEL, payload)
            .await
            .unwrap()
            .open(|_, d| live.push_str(d))
            .await
            .unwrap();
        check(&out.content);
        if stream {
            assert_eq!(live, out.content);
        } else {
            assert_eq!(out.finish_reason.as_deref(), Some("stop"));
        }
    }
}
