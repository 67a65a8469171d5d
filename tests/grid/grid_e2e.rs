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
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;
use crate::pay_common;

use std::process::Stdio;
use std::time::Duration;

use grid_support::{
    balance, free_port, funded_api_key, node_init, node_start, ok, python_has, run_py, sgl,
    usage_rows, wait_node_active, CoordinatorProc, OPERATOR, SGL,
};
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
