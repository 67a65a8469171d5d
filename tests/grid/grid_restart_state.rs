//! What survives a coordinator restart (PROTOCOL.md §7f): a single-use
//! `--registration-code` stays used, and a price change inside the cooldown
//! stays refused, and the job counts of the last second stay counted, when
//! the same `sgl coordinator serve` process is stopped and started again on
//! the same store. SQLite and a fresh PostgreSQL database (skipped when
//! unreachable unless SGL_REQUIRE_POSTGRES=1).
#![cfg(all(feature = "coordinator", unix))]

use crate::grid_support;
use crate::pay_common;

use std::process::Stdio;
use std::time::Duration;

use grid_support::{
    free_port, node_init, node_start, sigterm, spawn_sgl, wait_online, wait_until, CoordinatorProc,
    Proc, MODEL, OPERATOR,
};
use serde_json::{json, Value};
use sgl::proto::identity::NodeIdentity;

const CODE: &str = "sglreg_restart-test-code-1";
const OTHER_CODE: &str = "sglreg_restart-test-code-2";

/// `sgl coordinator serve` outside development mode, billing off, with two
/// command-line registration codes and the default 60 s price cooldown.
fn serve(port: u16, db: &str) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let p = spawn_sgl(
        &[
            "coordinator",
            "serve",
            "--listen",
            &listen,
            "--database-url",
            db,
            "--no-billing",
            "--registration-code",
            CODE,
            "--registration-code",
            OTHER_CODE,
        ],
        Stdio::null(),
    );
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

fn stop(mut p: Proc) {
    sigterm(&p.0);
    let status = p.0.wait().unwrap();
    assert!(status.success(), "the coordinator exited with {status}");
}

async fn register(base: &str, code: &str) -> (u16, Value) {
    let body = json!({
        "public_key": NodeIdentity::generate().ed25519_public().to_b58(),
        "wallet_address": OPERATOR,
        "tee_type": "none",
        "available_models": [MODEL],
        "registration_code": code,
    });
    let r = reqwest::Client::new()
        .post(format!("{base}/grid/nodes/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn reset_price(base: &str, node: &str, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/grid/nodes/{node}/prices"))
        .header("X-Node-Auth", token)
        .json(&json!({"model": MODEL, "reset": true}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_codes_and_price_cooldowns_survive_a_restart_on_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("restart_state", dir.path()) {
        eprintln!("backend: {}", db.backend);
        restart_on(&db.url).await;
    }
}

async fn restart_on(db: &str) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let coord = serve(port, db);
    let (status, reg) = register(&base, CODE).await;
    assert_eq!(status, 200, "{reg}");
    let node = reg["node_id"].as_str().unwrap().to_string();
    let token = reg["auth_token"].as_str().unwrap().to_string();
    let (status, body) = register(&base, CODE).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = reset_price(&base, &node, &token).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = reset_price(&base, &node, &token).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "price_cooldown");

    stop(coord);
    let coord = serve(port, db);
    // The used code stays used; the unused one still works once.
    let (status, body) = register(&base, CODE).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "registration_refused");
    let (status, body) = register(&base, OTHER_CODE).await;
    assert_eq!(status, 200, "{body}");
    // The node kept its token, and the change made before the restart still
    // holds the cooldown, also as shown in its prices.
    let (status, body) = reset_price(&base, &node, &token).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "price_cooldown");
    let wait = body["retry_after_s"].as_u64().unwrap();
    assert!((1..=60).contains(&wait), "{body}");
    let prices: Value = reqwest::get(format!("{base}/grid/nodes/{node}/prices"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == MODEL)
        .unwrap_or_else(|| panic!("{prices}"));
    assert!(entry["cooldown_until"].is_string(), "{entry}");

    // A second restart: the other code is now spent as well.
    stop(coord);
    let coord = serve(port, db);
    let (status, body) = register(&base, OTHER_CODE).await;
    assert_eq!(status, 403, "{body}");
    stop(coord);
}

/// A node's job counts are written once a second; a SIGTERM right after
/// the last job writes them before the process leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_counts_of_the_last_second_survive_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("restart_counts", dir.path()) {
        eprintln!("backend: {}", db.backend);
        counts_on(&db.url, dir.path()).await;
    }
}

async fn counts_on(db: &str, dir: &std::path::Path) {
    let port = free_port();
    let args = ["--database-url", db, "--no-billing"];
    let coord = CoordinatorProc::on_port(port, &args);
    let node_dir = tempfile::tempdir_in(dir).unwrap();
    let d = node_dir.path().to_str().unwrap();
    node_init(d, &coord.base, OPERATOR);
    let mut node = node_start(
        d,
        &["--engine", "echo", "--evidence", "none"],
        Stdio::null(),
    );
    wait_online(&coord.base, Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    const JOBS: u64 = 3;
    for _ in 0..JOBS {
        let r = client
            .post(format!("{}/v1/chat/completions", coord.base))
            .json(&json!({"model": MODEL, "max_tokens": 4,
                "messages": [{"role": "user", "content": "count me"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // At once: well inside the second before the counts' next write.
    let _ = node.0.kill();
    let _ = node.0.wait();
    stop(coord.proc);

    let coord = CoordinatorProc::on_port(port, &args);
    let explorer: Value = reqwest::get(format!("{}/grid/explorer.json", coord.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nodes = explorer["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{explorer}");
    assert_eq!(nodes[0]["jobs_completed"], JOBS, "{explorer}");
    stop(coord.proc);
}
