//! A node that dies mid-stream: a real `sgl node start` is SIGKILLed while
//! it streams an answer to a paying client (an API key with credits). The
//! client's SSE stream ends with `event: error`, the key's wallet is charged
//! nothing, the job is recorded failed, and the node leaves routing after
//! its missed heartbeats. Runs on SQLite and on a fresh PostgreSQL database
//! (SGL_TEST_POSTGRES_URL; skipped when unreachable unless
//! SGL_REQUIRE_POSTGRES=1).
//!
//! Nothing depends on speed: the node runs the echo engine with
//! `--echo-stall-after`, which emits a first chunk's tokens and then holds
//! the job open, so the kill lands after the first chunk and while the
//! generation is certain to continue.
#![cfg(all(feature = "coordinator", unix))]

use crate::grid_support;
use crate::pay_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use grid_support::{
    any_online, balance, funded_api_key, node_init, node_start, providers, usage_rows, wait_online,
    CoordinatorProc, MODEL, OPERATOR,
};
use serde_json::json;

const PAYER: &str = "0x2222222222222222222222222222222222222222";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_mid_stream_costs_nothing_and_leaves_routing() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("kill", dir.path()) {
        eprintln!("backend: {}", db.backend);
        killed_node_on(&db.url).await;
    }
}

async fn killed_node_on(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("node");
    let nd = nd.to_str().unwrap();

    // A paying client: an API key with 1 USD of credits.
    let key = funded_api_key(db, PAYER, "1");
    let before = balance(db, PAYER);

    let coordinator = CoordinatorProc::start(&["--database-url", db, "--missed-heartbeats", "2"]);
    let base = coordinator.base.clone();
    node_init(nd, &base, OPERATOR);
    // Twelve tokens (two chunks), then the job is held open until killed.
    let mut node = node_start(
        nd,
        &["--engine", "echo", "--echo-stall-after", "12"],
        Stdio::null(),
    );
    wait_online(&base, Duration::from_secs(60)).await;

    // A plain (OpenAI-mode) stream the echo engine would answer with forty
    // words; it stalls after twelve.
    let words: Vec<String> = (0..40).map(|i| format!("word{i}")).collect();
    let mut resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": words.join(" ")}],
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
    while any_online(&providers(&base).await) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the dead node stays routable"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Nothing charged, and the job recorded failed.
    assert_eq!(balance(db, PAYER), before);
    let rows = usage_rows(db);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "failed", "{rows:?}");
    assert_eq!(rows[0]["cost_micro_usd"], 0, "{rows:?}");
}
