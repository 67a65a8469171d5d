//! The client surface both OpenAI-compatible servers share, as real
//! processes: a development coordinator in front of an echo node, and
//! `sgl node serve --engine echo`. Each OpenAI parameter no engine implements
//! gets the same 400 from both (raw HTTP and openai-python); images are
//! refused up front; routes outside the protocol answer `not_supported`; and
//! both `/metrics`, scraped after traffic, pass `promtool check metrics`
//! (skipped without promtool unless SGL_REQUIRE_PROMTOOL=1).
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use grid_support::{node_init, node_start, wait_online, CoordinatorProc, Proc, MODEL, OPERATOR};
use serde_json::{json, Value};

/// A development coordinator with one echo node online, and an echo
/// `node serve`.
struct Servers {
    coord: CoordinatorProc,
    _node: Proc,
    _dir: tempfile::TempDir,
    local: engine_support::Server,
}

async fn servers() -> Servers {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let coord = CoordinatorProc::start(&["--in-memory"]);
    node_init(d, &coord.base, OPERATOR);
    let node = node_start(
        d,
        &["--engine", "echo", "--evidence", "none"],
        Stdio::null(),
    );
    wait_online(&coord.base, Duration::from_secs(60)).await;
    let local = engine_support::Server::start(&["--engine", "echo"]).await;
    Servers {
        coord,
        _node: node,
        _dir: dir,
        local,
    }
}

async fn send(method: reqwest::Method, url: String, body: Option<&Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

async fn chat(base: &str, body: &Value) -> (u16, Value) {
    send(
        reqwest::Method::POST,
        format!("{base}/v1/chat/completions"),
        Some(body),
    )
    .await
}

fn hello() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
}

/// Every parameter of the table, with a value that asks for what no engine
/// does.
fn unsupported() -> Vec<(&'static str, Value)> {
    vec![
        ("functions", json!([{"name": "f", "parameters": {}}])),
        ("function_call", json!({"name": "f"})),
        ("logit_bias", json!({"1": 5})),
        ("frequency_penalty", json!(1.0)),
        ("presence_penalty", json!(0.5)),
        ("modalities", json!(["text", "audio"])),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("web_search_options", json!({})),
        ("reasoning_effort", json!("high")),
        ("verbosity", json!("high")),
        ("service_tier", json!("priority")),
        ("store", json!(true)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_refuse_what_they_do_not_implement_alike() {
    let s = servers().await;
    let bases = [s.coord.base.as_str(), s.local.base.as_str()];
    let table = unsupported();
    assert_eq!(table.len(), sgl::proto::openai::UNSUPPORTED.len());
    for (name, value) in table {
        let mut body = hello();
        body[name] = value;
        let (cs, cb) = chat(bases[0], &body).await;
        let (ls, lb) = chat(bases[1], &body).await;
        assert_eq!(cs, 400, "{name}: {cb}");
        assert_eq!((cs, &cb), (ls, &lb), "{name}: the servers differ");
        assert_eq!(cb["error"]["code"], "unsupported_parameter", "{cb}");
        assert_eq!(cb["error"]["type"], "invalid_request_error", "{cb}");
        assert_eq!(cb["error"]["param"], name, "{cb}");
        assert!(
            cb["error"]["message"].as_str().unwrap().contains(name),
            "{cb}"
        );
    }

    // Defaults that ask for nothing are served, by both.
    let mut noop = hello();
    for (k, v) in [
        ("n", json!(1)),
        ("logprobs", json!(false)),
        ("response_format", json!({"type": "text"})),
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("frequency_penalty", json!(0)),
        ("store", json!(false)),
        ("user", json!("someone")),
    ] {
        noop[k] = v;
    }
    for base in bases {
        let (status, v) = chat(base, &noop).await;
        assert_eq!(status, 200, "{base}: {v}");
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    }

    // Images: no vision model is served, so they are refused before any
    // node is asked, in a reservation and in a plain request alike.
    let mut image = hello();
    image["messages"] = json!([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ]}]);
    let (cs, cb) = chat(bases[0], &image).await;
    let (ls, lb) = chat(bases[1], &image).await;
    assert_eq!(cs, 400, "{cb}");
    assert_eq!((cs, &cb), (ls, &lb));
    assert_eq!(cb["error"]["param"], "messages[0].content");
    let (status, v) = send(
        reqwest::Method::POST,
        format!("{}/v1/reserve", bases[0]),
        Some(&json!({"model": MODEL, "image_count": 1})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "images_not_supported");
    assert_eq!(v["error"]["param"], "image_count");
    let (status, v) = send(
        reqwest::Method::POST,
        format!("{}/v1/reserve", bases[0]),
        Some(&json!({"model": MODEL, "image_count": 0})),
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // Calls outside the protocol (§5.12) and unknown routes: JSON
    // `not_supported`, never a bare 404, on both servers.
    use reqwest::Method as M;
    for (method, path) in [
        (M::POST, "/v1/embeddings"),
        (M::POST, "/v1/audio/transcriptions"),
        (M::POST, "/v1/audio/transcriptions/reserve"),
        (M::POST, "/v1/audio/speech"),
        (M::POST, "/v1/systemone"),
        (M::POST, "/grid/jobs"),
        (M::GET, "/grid/jobs/8d7f0c6e-1111-4222-8333-444455556666"),
        (M::GET, "/v1/completions"),
        (M::GET, "/nothing/here"),
    ] {
        for base in bases {
            let (status, v) = send(method.clone(), format!("{base}{path}"), Some(&json!({}))).await;
            assert_eq!(status, 404, "{method} {base}{path}: {v}");
            assert_eq!(v["error"]["code"], "not_supported", "{path}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{path}: {v}");
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    }

    // The official client sees the same refusal from both.
    if grid_support::python_has("openai") {
        for base in bases {
            grid_support::run_py("openai_params_check.py", &[base, MODEL]).await;
        }
    }
}

/// promtool, or `None` (skipped) when it is not installed; with
/// SGL_REQUIRE_PROMTOOL=1 a missing promtool fails the test.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("SGL_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
        panic!("SGL_REQUIRE_PROMTOOL=1 but promtool is not installed (apt-get install prometheus)");
    }
    eprintln!(
        "skipping the promtool check: promtool is not installed (apt-get install prometheus)"
    );
    None
}

/// `promtool check metrics` over `text`, which must pass with no problem.
fn promtool_check(tool: &str, what: &str, text: &str) {
    use std::io::Write;
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics fails on {what}:\n{}{}\n--- the metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn scrape(base: &str) -> String {
    let resp = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of the sample `series` (name and labels exactly), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_metrics_count_traffic_and_pass_promtool() {
    let s = servers().await;
    let coord = s.coord.base.as_str();
    // Traffic: answers whole and streamed, a refusal, an unknown route, a
    // node URL with an id in it.
    for _ in 0..3 {
        assert_eq!(chat(coord, &hello()).await.0, 200);
    }
    let mut streamed = hello();
    streamed["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{coord}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("[DONE]"));
    let mut bad = hello();
    bad["n"] = json!(9);
    assert_eq!(chat(coord, &bad).await.0, 400);
    let _ = reqwest::get(format!("{coord}/no/such/path/{}", "x".repeat(40))).await;
    let _ = reqwest::get(format!(
        "{coord}/grid/nodes/{}/attestation/evidence",
        uuid::Uuid::new_v4()
    ))
    .await;
    assert_eq!(chat(&s.local.base, &hello()).await.0, 200);

    let text = scrape(coord).await;
    let chat_ok = "sgl_coordinator_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"}";
    assert_eq!(sample(&text, chat_ok), Some(4.0), "{text}");
    let refused = "sgl_coordinator_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"400\"}";
    assert_eq!(sample(&text, refused), Some(1.0), "{text}");
    // Routes are templates: neither the made-up path nor the node id is a
    // label value.
    assert!(text.contains("route=\"unmatched\""), "{text}");
    assert!(
        text.contains("route=\"/grid/nodes/{id}/attestation/evidence\""),
        "{text}"
    );
    assert!(!text.contains("xxxxxxxx"), "{text}");
    assert!(
        text.contains("sgl_coordinator_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\",le=\"+Inf\"} 4"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sgl_coordinator_jobs_total{outcome=\"completed\"}"),
        Some(4.0),
        "{text}"
    );
    let completion = sample(
        &text,
        "sgl_coordinator_billed_tokens_total{kind=\"completion\",method=\"free\"}",
    );
    assert!(completion.is_some_and(|n| n > 0.0), "{text}");
    assert!(
        text.contains("sgl_coordinator_nodes{state=\"active\","),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sgl_coordinator_websocket_connections"),
        Some(1.0),
        "{text}"
    );

    let node = scrape(&s.local.base).await;
    assert!(node.contains("sgl_engine_ready 1"), "{node}");
    let Some(tool) = promtool() else {
        return;
    };
    promtool_check(tool, "the coordinator's /metrics", &text);
    promtool_check(tool, "the echo node's /metrics", &node);
    // The engine's own series, from the real model when it is cached.
    if engine_support::model_path().is_some() {
        let engine = engine_support::Server::start(&[]).await;
        let mut one = hello();
        one["max_tokens"] = json!(4);
        assert_eq!(chat(&engine.base, &one).await.0, 200);
        let text = scrape(&engine.base).await;
        assert_eq!(
            sample(&text, "sgl_time_to_first_token_seconds_count"),
            Some(1.0),
            "{text}"
        );
        promtool_check(tool, "the engine's /metrics", &text);
    }
}
