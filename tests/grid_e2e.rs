//! The grid end to end with the real model: `sgl coordinator serve --dev`,
//! a node (`sgl node start`, SmolLM2 on the candle engine, simulated
//! evidence) and, against them, the public singularity-grid 0.12 SDK (sealed
//! non-stream and stream), the OpenAI Python SDK (plain non-stream and
//! stream), and `sgl chat --stream --verify-evidence`. The answers must
//! mention Paris.
//!
//! Skipped with a message when the model or the Python packages are missing,
//! unless SGL_REQUIRE_MODEL=1 / SGL_REQUIRE_PY_CLIENTS=1.
#![cfg(all(feature = "coordinator", unix))]

mod engine_support;
mod grid_support;

use std::process::Stdio;
use std::time::Duration;

use grid_support::{
    free_port, node_init, node_start, ok, python_has, run_py, sgl, wait_node_active,
    CoordinatorProc, OPERATOR, SGL,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_sdks_and_sgl_chat_against_a_local_grid() {
    if engine_support::model_path().is_none() || !python_has("singularity_grid, openai") {
        return;
    }
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
        CoordinatorProc::on_port(port, &["--in-memory", "--simulated-tee-key", &sim]);
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

    let text = run_py("grid_sdk_check.py", &[&base, engine_support::MODEL_ID]).await;
    assert_eq!(text.lines().count(), 4, "{text}");

    let answer = ok(std::process::Command::new(SGL)
        .args([
            "chat",
            "--coordinator",
            &base,
            "--stream",
            "--verify-evidence",
        ])
        .args(["--simulated-tee-key", &sim, "--allow-any-measurement"])
        .args(["--temperature", "0", "--max-tokens", "48"])
        .arg("What is the capital of France?")
        .output()
        .unwrap());
    assert!(answer.to_lowercase().contains("paris"), "{answer}");
    // Without trusting the simulated key, --verify-evidence refuses the node.
    let refused = sgl(&["chat", "--coordinator", &base, "--verify-evidence", "hello"]);
    assert!(!refused.status.success());
}
