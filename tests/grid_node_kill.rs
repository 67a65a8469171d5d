//! A node that dies mid-stream: a real `sgl node start` (SmolLM2 on the
//! candle engine) is SIGKILLed while it streams a long answer to a paying
//! client (an API key with credits). The client's SSE stream ends with
//! `event: error`, the key's wallet is charged nothing, the job is recorded
//! failed, and the node leaves routing after its missed heartbeats. Runs on
//! SQLite and on a fresh PostgreSQL database (SGL_TEST_POSTGRES_URL; skipped
//! when unreachable unless SGL_REQUIRE_POSTGRES=1).
//!
//! Skipped with a message when the model is missing, unless SGL_REQUIRE_MODEL=1.
#![cfg(all(feature = "coordinator", unix))]

mod engine_support;
mod pay_common;

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SGL: &str = env!("CARGO_BIN_EXE_sgl");
const PAYER: &str = "0x2222222222222222222222222222222222222222";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sgl(args: &[&str]) -> String {
    ok(Command::new(SGL).args(args).output().unwrap())
}

async fn providers_online(base: &str) -> bool {
    let v: Value = match reqwest::get(format!(
        "{base}/v1/providers?model={}",
        engine_support::MODEL_ID
    ))
    .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    v["providers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["online"] == true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_mid_stream_costs_nothing_and_leaves_routing() {
    if engine_support::model_path().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("kill", dir.path()) {
        eprintln!("backend: {}", db.backend);
        killed_node_on(&db.url).await;
    }
}

async fn killed_node_on(db: &str) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("node");
    let nd = nd.to_str().unwrap();

    // A paying client: an API key with 1 USD of credits.
    let key = sgl(&[
        "coordinator",
        "keys",
        "create",
        "--wallet",
        PAYER,
        "--database-url",
        db,
    ]);
    let key = key.trim().to_string();
    sgl(&[
        "coordinator",
        "credits",
        "grant",
        "--wallet",
        PAYER,
        "--amount",
        "1",
        "--database-url",
        db,
    ]);
    let balance = || {
        sgl(&[
            "coordinator",
            "credits",
            "balance",
            "--wallet",
            PAYER,
            "--database-url",
            db,
        ])
    };
    let before = balance();

    let _coordinator = Proc(
        Command::new(SGL)
            .args(["coordinator", "serve", "--dev", "--database-url", db])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--heartbeat-interval", "1", "--missed-heartbeats", "2"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    sgl(&[
        "node",
        "init",
        "--config-dir",
        nd,
        "--coordinator",
        &base,
        "--wallet",
        "0x1111111111111111111111111111111111111111",
    ]);
    let mut node = Proc(
        Command::new(SGL)
            .args([
                "node",
                "start",
                "--config-dir",
                nd,
                "--model",
                engine_support::MODEL_ID,
            ])
            .args(["--heartbeat-interval", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !providers_online(&base).await {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the node never came online"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A long plain (OpenAI-mode) stream: far more tokens than arrive before the kill.
    let mut resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": engine_support::MODEL_ID,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 4000,
            "temperature": 0.7,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    // Wait for the first content chunk, then kill the node process outright.
    while !seen.contains("\"content\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(120), resp.chunk())
            .await
            .expect("no token arrived")
            .unwrap()
            .expect("the stream ended before any token");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!seen.contains("[DONE]"), "finished before the kill: {seen}");
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(120), resp.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) | Ok(Err(_)) => break,
            Err(_) => panic!("the stream neither ended nor failed: {seen}"),
        }
    }
    assert!(seen.contains("event: error"), "no error event: {seen}");
    assert!(!seen.contains("[DONE]"), "{seen}");

    // The node leaves routing once its heartbeats are missed.
    let start = Instant::now();
    while providers_online(&base).await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the dead node stays routable"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Nothing charged, and the job recorded failed.
    assert_eq!(balance(), before);
    let usage = sgl(&["coordinator", "usage", "--database-url", db]);
    let rows: Vec<Value> = usage
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(rows[0]["status"], "failed", "{usage}");
    assert_eq!(rows[0]["cost_micro_usd"], 0, "{usage}");
}
