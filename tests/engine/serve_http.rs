//! `sgl node serve` as a real process on loopback with the real SmolLM2:
//! JSON and SSE completions, OpenAI error bodies, back-pressure, health,
//! metrics, and a disconnecting client freeing its slot.
#![cfg(feature = "node")]

use crate::engine_support;

use std::time::Duration;

use engine_support::{model_path, Server, MODEL_ID};
use serde_json::{json, Value};

fn chat(q: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": q}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// `body` as a stream that ends with a usage chunk.
fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

async fn post_chat(base: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get_json(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Parse an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string()))
        })
        .collect()
}

struct Streamed {
    content: String,
    finish: Option<String>,
    usage: Option<Value>,
    done: bool,
    role_first: bool,
}

fn parse_stream(body: &str) -> Streamed {
    let mut s = Streamed {
        content: String::new(),
        finish: None,
        usage: None,
        done: false,
        role_first: false,
    };
    for (i, d) in sse_events(body).iter().enumerate() {
        if d == "[DONE]" {
            s.done = true;
            continue;
        }
        assert!(!s.done, "data after [DONE]");
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if i == 0 {
            s.role_first = v["choices"][0]["delta"]["role"] == "assistant";
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(v["choices"].as_array().unwrap().len(), 0);
            s.usage = Some(u.clone());
            continue;
        }
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            s.content.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            s.finish = Some(f.to_string());
        }
    }
    s
}

async fn expect_error(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status);
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    v
}

#[tokio::test]
async fn completions_errors_health_and_metrics() {
    if model_path().is_none() {
        return;
    }
    let server = Server::start(&[]).await;
    let base = &server.base;
    let http = reqwest::Client::new();

    let health = get_json(format!("{base}/health")).await;
    assert_eq!(health["status"], "ok");
    let models = get_json(format!("{base}/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_ID);

    // Non-stream.
    let r = post_chat(base, &chat("What is the capital of France?", 48)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    // SSE with usage: the same greedy text.
    let r = post_chat(base, &streaming(chat("What is the capital of France?", 48))).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let s = parse_stream(&r.text().await.unwrap());
    assert!(s.role_first && s.done);
    assert_eq!(s.content, content);
    assert_eq!(s.finish.as_deref(), Some("stop"));
    // The same counts; the second time the prompt's whole blocks but the
    // last come from the prefix cache (on by default).
    let su = s.usage.as_ref().unwrap();
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(su[k], u[k], "{k}");
    }
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        su["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        (prompt - 1) / 32 * 32
    );

    // Without include_usage there is no usage chunk; max_tokens gives length.
    let mut body = chat("Write a long essay about rivers.", 4);
    body["stream"] = json!(true);
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = parse_stream(&r.text().await.unwrap());
    assert!(s.usage.is_none() && s.done);
    assert_eq!(s.finish.as_deref(), Some("length"));

    // Bad input: 400 with an OpenAI error body.
    let post = |b: Value| {
        http.post(format!("{base}/v1/chat/completions"))
            .json(&b)
            .send()
    };
    let mut b = chat("hi", 8);
    b["model"] = json!("gpt-17");
    let e = expect_error(post(b).await.unwrap(), 400).await;
    assert_eq!(e["error"]["code"], "model_not_found");
    let mut b = chat("hi", 8);
    b["messages"] = json!([]);
    expect_error(post(b).await.unwrap(), 400).await;
    let mut b = chat("hi", 8);
    b["messages"][0]["role"] = json!("wizard");
    expect_error(post(b).await.unwrap(), 400).await;
    expect_error(post(chat("hi", 0)).await.unwrap(), 400).await;
    expect_error(post(chat("hi", 10_000_000)).await.unwrap(), 400).await;
    let mut b = chat("hi", 8);
    b["temperature"] = json!(5);
    expect_error(post(b).await.unwrap(), 400).await;
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    // An oversized body: 413 with a JSON error, on its own connection (the
    // server stops reading it and closes that connection).
    let huge = "x".repeat(5 << 20);
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat(&huge, 8))
        .send()
        .await
        .unwrap();
    expect_error(r, 413).await;

    // Eight concurrent streams all complete, each with its own greedy text.
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Say the number {i} in words."))
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        let v: Value = post(chat(p, 16)).await.unwrap().json().await.unwrap();
        solo.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut b = chat(p, 16);
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
            let req = http.post(format!("{base}/v1/chat/completions")).json(&b);
            tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    for (t, want) in tasks.into_iter().zip(solo) {
        let s = parse_stream(&t.await.unwrap());
        assert!(s.done && s.usage.is_some() && s.finish.is_some());
        assert_eq!(s.content, want);
    }

    // Metrics reflect the work.
    let m = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(m.status(), 200);
    let text = m.text().await.unwrap();
    for name in [
        "sgl_prompt_tokens_total",
        "sgl_completion_tokens_total",
        "sgl_time_to_first_token_seconds_bucket",
        "sgl_inter_token_seconds_bucket",
        "sgl_queue_depth",
        "sgl_active_sequences",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    let completion: f64 = text
        .lines()
        .find(|l| l.starts_with("sgl_completion_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(completion > 0.0);
}

/// A second turn of a chat with a long system prompt: the answer says how
/// many prompt tokens the prefix cache supplied, in JSON and in the stream's
/// usage chunk, the text is the same as on the first, uncached turn, and
/// `/metrics` counts the hits.
#[tokio::test]
async fn prefix_cache_reports_cached_tokens() {
    if model_path().is_none() {
        return;
    }
    let server = Server::start(&["--prefix-cache-mb", "32"]).await;
    let base = &server.base;
    let system = "You answer questions about a library. ".repeat(40);
    let body = |q: &str| {
        json!({
            "model": MODEL_ID,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": q},
            ],
            "temperature": 0,
            "max_tokens": 12,
        })
    };
    let first: Value = post_chat(base, &body("When does it open?"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 200, "{first}");
    let again: Value = post_chat(base, &body("When does it open?"))
        .await
        .json()
        .await
        .unwrap();
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached > 0 && cached < prompt && cached.is_multiple_of(32),
        "{again}"
    );
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(again["usage"]["prompt_tokens"], prompt);
    // Another question after the same system prompt, streamed.
    let r = post_chat(base, &streaming(body("Can I borrow ten books?"))).await;
    let s = parse_stream(&r.text().await.unwrap());
    let usage = s.usage.expect("a usage chunk");
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 200
    );

    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(value("sgl_prefix_cache_lookups_total"), 3.0);
    assert_eq!(value("sgl_prefix_cache_hits_total"), 2.0);
    assert!(value("sgl_prefix_cache_tokens_total") >= (cached + 200) as f64);
    assert!((value("sgl_prefix_cache_hit_ratio") - 2.0 / 3.0).abs() < 1e-9);
    assert!(value("sgl_prefix_cache_bytes") > 0.0);
}

#[tokio::test]
async fn full_queue_is_429_and_a_disconnect_frees_the_slot() {
    if model_path().is_none() {
        return;
    }
    let server = Server::start(&["--max-batch", "1", "--max-queue", "1"]).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let long = || {
        let mut b = chat("Write a very long story about the ocean.", 4000);
        b["stream"] = json!(true);
        b["ignore_eos"] = json!(true);
        b
    };
    // One request runs, one waits; after that the queue is full.
    let mut open = Vec::new();
    let mut saw_429 = false;
    for _ in 0..4 {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&long())
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            let retry = r
                .headers()
                .get("retry-after")
                .expect("Retry-After")
                .to_str()
                .unwrap()
                .to_string();
            assert!(retry.parse::<u64>().unwrap() >= 1);
            let v = expect_error(r, 429).await;
            assert_eq!(v["error"]["code"], "queue_full");
            saw_429 = true;
        } else {
            assert_eq!(r.status(), 200);
            open.push(r);
        }
    }
    assert!(saw_429, "no 429 with max-batch 1 and max-queue 1");
    assert!(!open.is_empty());

    // Read a token from the running stream, then hang up on everything.
    let mut first = open.remove(0);
    let chunk = tokio::time::timeout(Duration::from_secs(60), first.chunk())
        .await
        .expect("a first chunk")
        .unwrap();
    assert!(chunk.is_some());
    drop(first);
    drop(open);

    // With the only slot freed, a short request completes quickly instead of
    // waiting behind 4000 tokens.
    // The server notices a hang-up when it next writes to that connection, so
    // the queued request may still hold the queue for a moment: retry on 429
    // as a client would.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let r = loop {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat("Say hi.", 4))
            .send()
            .await
            .unwrap();
        if r.status() != 429 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cancelled: f64 = text
        .lines()
        .find(|l| l.starts_with("sgl_requests_cancelled_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(cancelled >= 1.0, "{text}");
}

/// `node serve --engine echo`, the load-test engine: no model is loaded (this
/// runs without one), and the last user message comes back at once as a
/// plain completion and as a stream, with usage counted in words.
#[tokio::test]
async fn echo_engine_answers_plain_and_stream_without_a_model() {
    let server = Server::start(&["--engine", "echo"]).await;
    let base = &server.base;
    let models = get_json(format!("{base}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], MODEL_ID);

    let r = post_chat(base, &chat("one two three", 16)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    assert_eq!(v["choices"][0]["message"]["content"], "one two three");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The echo engine's counts: words plus one per message in, words out.
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // A stream, cut by max_tokens.
    let r = post_chat(base, &streaming(chat("one two three", 2))).await;
    assert_eq!(r.status(), 200);
    let s = parse_stream(&r.text().await.unwrap());
    assert!(s.role_first && s.done);
    assert_eq!(s.content, "one two ");
    assert_eq!(s.finish.as_deref(), Some("length"));
    assert_eq!(s.usage.unwrap()["completion_tokens"], 2);

    // It answers only to its model id, like the engine.
    let mut b = chat("hi", 8);
    b["model"] = json!("gpt-17");
    let e = expect_error(post_chat(base, &b).await, 400).await;
    assert_eq!(e["error"]["code"], "model_not_found");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sgl_engine_ready 1"), "{metrics}");
}
