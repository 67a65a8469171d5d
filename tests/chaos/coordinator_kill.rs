//! The coordinator SIGKILLed under 200 concurrent paying streams, on SQLite
//! and on PostgreSQL (SGL_TEST_POSTGRES_URL; skipped when unreachable unless
//! SGL_REQUIRE_POSTGRES=1), then restarted: no credit hold is left held,
//! every settled hold has its usage row, and the payer's balance fell by
//! exactly the sum of its usage rows.
//!
//! Nothing depends on speed: half the streams go to a node whose echo
//! engine stalls after the first chunk (`--echo-stall-after`), so at the
//! kill they are certainly mid-generation; the other half loop on a node
//! that answers at once, and the kill waits until some of them have been
//! billed, so settled holds exist whatever the timing.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::grid_support;
use crate::ledger;
use crate::pay_common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grid_support::{
    free_port, funded_api_key, node_init, node_start, providers, CoordinatorProc, Proc, MODEL,
    OPERATOR,
};
use serde_json::{json, Value};
use sgl::money::Micros;

const PAYER: &str = "0x7777777777777777777777777777777777777777";
/// Streams held open on the stalling node at the kill.
const STALLED: usize = 100;
/// Streams looping on the answering node at the kill.
const LOOPING: usize = 100;
/// Answered jobs to wait for before the kill.
const BILLED_BEFORE_KILL: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_sigkill_under_200_streams_strands_no_money() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("chaoskill", dir.path()) {
        eprintln!("backend: {}", db.backend);
        let work = dir.path().join(db.backend);
        std::fs::create_dir_all(&work).unwrap();
        kill_under_load(&db.url, &work, &[], BILLED_BEFORE_KILL).await;
    }
}

/// The same kill with answers released before their settlement batches
/// commit (`--credit-settle after-answer`): answers of the batch that was
/// committing at the kill go unpaid, and the ledger is as exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_sigkill_with_answers_before_commit_strands_no_money() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("chaoskilla", dir.path()) {
        eprintln!("backend: {}", db.backend);
        let work = dir.path().join(db.backend);
        std::fs::create_dir_all(&work).unwrap();
        kill_under_load(&db.url, &work, &["--credit-settle", "after-answer"], 1).await;
    }
}

/// The node id `sgl node start` registered in `dir`.
fn node_id(dir: &Path) -> String {
    grid_support::wait_until("the node to register", Duration::from_secs(60), || {
        std::fs::read_to_string(dir.join("node.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["node_id"].is_string())
    });
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("node.json")).unwrap()).unwrap();
    v["node_id"].as_str().unwrap().to_string()
}

/// An echo node in `dir` for `base`, `extra` engine flags.
fn echo_node(dir: &Path, base: &str, extra: &[&str]) -> (Proc, String) {
    let d = dir.to_str().unwrap();
    node_init(d, base, OPERATOR);
    let mut args = vec!["--engine", "echo", "--max-batch", "128"];
    args.extend_from_slice(extra);
    let p = node_start(d, &args, Stdio::null());
    (p, node_id(dir))
}

fn stream_body(node: &str, words: usize) -> Value {
    let text: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
    json!({"model": MODEL, "node": node, "stream": true, "max_tokens": 64,
           "messages": [{"role": "user", "content": text.join(" ")}]})
}

async fn kill_under_load(db: &str, work: &Path, extra: &[&str], min_billed: usize) {
    let key = funded_api_key(db, PAYER, "100");
    let deposited = Micros(100_000_000);
    let port = free_port();
    // Short leases, so that on PostgreSQL (where start-up releases only
    // lapsed holds) the crashed coordinator's holds lapse within seconds.
    let mut args = vec!["--database-url", db, "--hold-lease", "2"];
    args.extend_from_slice(extra);
    let mut coordinator = CoordinatorProc::on_port(port, &args);
    let base = coordinator.base.clone();
    let (_stalling, stall_id) = echo_node(&work.join("stall"), &base, &["--echo-stall-after", "6"]);
    let (_answering, fast_id) = echo_node(&work.join("fast"), &base, &[]);
    let start = Instant::now();
    loop {
        let v = providers(&base).await;
        let online = v["providers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["online"] == true).count());
        if online == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nodes not online: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // The stalled streams: each reads its first chunk, then waits for the end.
    let first_chunks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..STALLED {
        let (http, base, key, body) = (
            http.clone(),
            base.clone(),
            key.clone(),
            stream_body(&stall_id, 20),
        );
        let first_chunks = first_chunks.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut resp) = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
            else {
                return;
            };
            assert_eq!(resp.status(), 200);
            let mut seen = String::new();
            let mut counted = false;
            while let Ok(Some(c)) = resp.chunk().await {
                seen.push_str(&String::from_utf8_lossy(&c));
                if !counted && seen.contains("\"content\"") {
                    counted = true;
                    first_chunks.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert!(
                !seen.contains("[DONE]"),
                "a stalled stream finished: {seen}"
            );
        }));
    }
    // The looping streams: one after another until the coordinator is gone.
    let answered = Arc::new(AtomicUsize::new(0));
    for _ in 0..LOOPING {
        let (http, base, key, body) = (
            http.clone(),
            base.clone(),
            key.clone(),
            stream_body(&fast_id, 8),
        );
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(resp) = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                match resp.text().await {
                    Ok(t) if t.contains("[DONE]") => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    let start = Instant::now();
    while first_chunks.load(Ordering::SeqCst) < STALLED
        || answered.load(Ordering::SeqCst) < BILLED_BEFORE_KILL
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "load never built up: {} first chunks, {} answered",
            first_chunks.load(Ordering::SeqCst),
            answered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGKILL mid-flight: 100 streams certainly open, 100 more looping.
    coordinator.proc.0.kill().unwrap();
    coordinator.proc.0.wait().unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a client hung after the kill")
            .unwrap();
    }
    eprintln!(
        "killed with {} streams open; {} answered before",
        STALLED,
        answered.load(Ordering::SeqCst)
    );

    // Restarted on the same database: the money comes back to exact.
    coordinator = CoordinatorProc::on_port(port, &args);
    let store = ledger::open(db).await;
    ledger::wait_no_open_holds(&store, Duration::from_secs(60)).await;
    let billed = ledger::audit(&store, PAYER, deposited).await;
    assert!(billed >= min_billed, "only {billed} jobs billed");
    store.close().await;
    drop(coordinator);
}
