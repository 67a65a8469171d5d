//! The grid end to end with the real model: `sgl coordinator serve --dev`,
//! a node (`sgl node start`, SmolLM2 on the candle engine, simulated
//! evidence) and, against them, the public singularity-grid 0.12 SDK (sealed
//! non-stream and stream), the OpenAI Python SDK (plain non-stream and
//! stream), and `sgl chat --stream --verify-evidence`. The answers must
//! mention Paris. Every call pays with an API key made and funded with the
//! real CLI, and the key's wallet is charged for exactly the jobs it ran.
//!
//! Runs on SQLite and on a fresh PostgreSQL database (SGL_TEST_POSTGRES_URL;
//! skipped when unreachable unless SGL_REQUIRE_POSTGRES=1). Skipped with a
//! message when the model or the Python packages are missing, unless
//! SGL_REQUIRE_MODEL=1 / SGL_REQUIRE_PY_CLIENTS=1.
//!
//! Beside it, every client-facing server answers the same edge-case bodies
//! alike: the coordinator in plain mode (an echo node behind it),
//! `sgl node serve --engine candle` and `--engine echo` give the same status,
//! and for a refusal the same error code and message.
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;
use crate::pay_common;

use std::process::Stdio;
use std::time::Duration;

use grid_support::{
    balance, free_port, funded_api_key, node_init, node_start, ok, python_has, run_py, sgl,
    usage_rows, wait_node_active, wait_online, CoordinatorProc, OPERATOR, SGL,
};
use serde_json::{json, Value};
use sgl::money::Micros;

const PAYER: &str = "0x2222222222222222222222222222222222222222";
/// Enough for "The capital of France is Paris." and a little more; small,
/// because the model runs on the CPU and every call below generates.
const MAX_TOKENS: &str = "32";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_sdks_and_sgl_chat_against_a_local_grid() {
    if engine_support::model_path().is_none() || !python_has("singularity_grid, openai") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("e2e", dir.path()) {
        eprintln!("backend: {}", db.backend);
        sdks_and_chat_on(&db.url).await;
    }
}

/// The balance `sgl coordinator credits balance` prints, in micro-USD.
fn balance_micros(db: &str) -> u64 {
    let text = balance(db, PAYER);
    let usd = text
        .split("balance ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no balance in {text:?}"));
    Micros::parse_usd(usd)
        .unwrap_or_else(|| panic!("bad amount in {text:?}"))
        .0
}

async fn sdks_and_chat_on(db: &str) {
    let key = funded_api_key(db, PAYER, "1");
    let before = balance_micros(db);
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("node");
    let d = nd.to_str().unwrap();
    // The node identity first: the development coordinator is told to trust
    // this node's simulated-TEE key.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    node_init(d, &base, OPERATOR);
    let sim = sgl::attest::sim::SimKey::load_or_create(&nd.join(sgl::attest::sim::KEY_FILE))
        .unwrap()
        .public()
        .to_b58();
    let _coordinator =
        CoordinatorProc::on_port(port, &["--database-url", db, "--simulated-tee-key", &sim]);
    let _node = node_start(
        d,
        &[
            "--evidence",
            "simulated",
            "--model",
            engine_support::MODEL_ID,
        ],
        Stdio::inherit(),
    );
    wait_node_active(d, Duration::from_secs(180));
    // The node attested with (simulated) evidence, published for clients.
    let node_id = sgl::node::identity_files::load_node_file(&nd)
        .unwrap()
        .node_id
        .unwrap();
    let ev: serde_json::Value =
        reqwest::get(format!("{base}/grid/nodes/{node_id}/attestation/evidence"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(ev["attestation_level"], "simulated");
    assert_eq!(ev["evidence"]["format"], "simulated");

    let text = run_py(
        "grid_sdk_check.py",
        &[&base, engine_support::MODEL_ID, &key, MAX_TOKENS],
    )
    .await;
    assert_eq!(text.lines().count(), 4, "{text}");

    let answer = ok(std::process::Command::new(SGL)
        .args(["chat", "--coordinator", &base, "--api-key", &key])
        .args(["--stream", "--verify-evidence"])
        .args(["--simulated-tee-key", &sim, "--allow-any-measurement"])
        .args(["--temperature", "0", "--max-tokens", MAX_TOKENS])
        .arg("What is the capital of France?")
        .output()
        .unwrap());
    assert!(answer.to_lowercase().contains("paris"), "{answer}");
    // Without trusting the simulated key, --verify-evidence refuses the node
    // before the prompt is sent.
    let refused = sgl(&[
        "chat",
        "--coordinator",
        &base,
        "--api-key",
        &key,
        "--verify-evidence",
        "hello",
    ]);
    assert!(!refused.status.success());

    // Five paid jobs (two sealed SDK calls, two plain OpenAI calls, one
    // `sgl chat`), each charged to the key's wallet with the node's signed
    // usage; the balance fell by exactly what the rows say.
    let rows = usage_rows(db);
    assert_eq!(rows.len(), 5, "{rows:?}");
    let mut charged = 0;
    for r in &rows {
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["method"], "credits", "{r}");
        assert_eq!(r["payer_wallet"], PAYER, "{r}");
        assert!(r["usage_signature"].is_string(), "{r}");
        let cost = r["cost_micro_usd"].as_u64().unwrap();
        assert!(cost > 0, "{r}");
        charged += cost;
    }
    assert_eq!(balance_micros(db), before - charged);
}

/// How a server answered one body, as far as the servers must agree: the
/// status, and for a refusal the OpenAI error's code and message.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    code: Option<String>,
    message: Option<String>,
}

async fn answer(base: &str, body: &Value) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    if status == 200 {
        assert_eq!(v["object"], "chat.completion", "{v}");
        return Answer {
            status,
            code: None,
            message: None,
        };
    }
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    Answer {
        status,
        code: v["error"]["code"].as_str().map(String::from),
        message: v["error"]["message"].as_str().map(String::from),
    }
}

/// The bodies, each with the status OpenAI gives it. The model answers in a
/// few tokens where a body succeeds, so the real model keeps this quick.
fn edge_cases() -> Vec<(&'static str, Value, u16)> {
    let model = engine_support::MODEL_ID;
    let ask = || json!([{"role": "user", "content": "What is the capital of France?"}]);
    let many: Vec<Value> = (0..10_000)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    vec![
        (
            "a developer message",
            json!({"model": model, "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "developer", "content": "Answer in one word."},
                                {"role": "user", "content": "What is the capital of France?"}]}),
            200,
        ),
        (
            "temperature 2.5",
            json!({"model": model, "messages": ask(), "max_tokens": 8, "temperature": 2.5}),
            400,
        ),
        (
            "no max_tokens",
            json!({"model": model, "messages": ask(), "temperature": 0}),
            200,
        ),
        (
            "5 stop strings",
            json!({"model": model, "messages": ask(), "max_tokens": 8,
                   "stop": ["a", "b", "c", "d", "e"]}),
            400,
        ),
        (
            "10,000 messages",
            json!({"model": model, "messages": many, "max_tokens": 8}),
            400,
        ),
        (
            "unknown fields",
            json!({"model": model, "messages": ask(), "max_tokens": 8, "temperature": 0,
                   "frobnicate": {"x": [1, 2]}, "logit_bias": {}, "service_tier": "auto"}),
            200,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_answers_the_same_body_alike() {
    // The real model when it is there (required in CI by SGL_REQUIRE_MODEL=1);
    // it loads while the rest starts.
    let candle = engine_support::model_path()
        .map(|_| tokio::spawn(async { engine_support::Server::start(&[]).await }));
    let echo = engine_support::Server::start(&["--engine", "echo"]).await;
    let coordinator = CoordinatorProc::start(&["--in-memory"]);
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("node");
    let d = nd.to_str().unwrap();
    node_init(d, &coordinator.base, OPERATOR);
    let _node = node_start(d, &["--engine", "echo"], Stdio::null());
    wait_online(&coordinator.base, Duration::from_secs(30)).await;
    let candle = match candle {
        Some(task) => Some(task.await.unwrap()),
        None => None,
    };
    let mut servers = vec![
        ("coordinator (plain mode)", coordinator.base.clone()),
        ("node serve --engine echo", echo.base.clone()),
    ];
    if let Some(c) = &candle {
        servers.push(("node serve --engine candle", c.base.clone()));
    }
    for (case, body, want) in edge_cases() {
        let mut answers = Vec::new();
        for (server, base) in &servers {
            answers.push((*server, answer(base, &body).await));
        }
        let first = &answers[0].1;
        assert_eq!(first.status, want, "{case}: {answers:?}");
        if want != 200 {
            assert_eq!(first.code.as_deref(), Some("invalid_request"), "{case}");
        }
        for (server, a) in &answers[1..] {
            assert_eq!(a, first, "{case}: {server} differs: {answers:?}");
        }
    }
}
