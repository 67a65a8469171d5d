//! `sgl proxy` against a real grid on loopback: a development coordinator
//! (SQLite, logging at trace level to a file), an echo node with simulated
//! evidence, and the proxy as a process, driven by the unmodified OpenAI
//! Python SDK, stream and non-stream. The coordinator never sees the prompt
//! or the answer in clear: neither is in its log or its database. A proxy
//! that does not trust the node's evidence refuses with a 502 before
//! anything is sealed, and no job runs.
#![cfg(all(feature = "coordinator", unix))]

use crate::grid_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grid_support::{
    free_port, funded_api_key, node_init, node_start, python_has, run_py, sigterm, usage_rows,
    wait_node_active, wait_until, Proc, MODEL, OPERATOR, SGL,
};
use serde_json::{json, Value};

const PAYER: &str = "0x3333333333333333333333333333333333333333";
/// Words that appear nowhere else, so that finding any of them anywhere the
/// coordinator writes means a leak. The echo engine answers the prompt back.
const CANARIES: [&str; 2] = ["quokka-canary-7f3a9c", "lantern-canary-5521"];

fn prompt() -> String {
    format!("Please keep {} and {} between us", CANARIES[0], CANARIES[1])
}

/// `sgl proxy` on a free loopback port, once it accepts connections.
fn start_proxy(base: &str, key: &str, extra: &[&str]) -> (Proc, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "proxy",
        "--listen",
        &listen,
        "--coordinator",
        base,
        "--api-key",
        key,
    ];
    args.extend_from_slice(extra);
    let proc = Proc(
        Command::new(SGL)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_until("the proxy to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, format!("http://{listen}"))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_through_sgl_proxy_is_sealed_end_to_end() {
    if !python_has("openai") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let db = db.to_str().unwrap();
    let log_path = dir.path().join("coordinator.log");
    let key = funded_api_key(db, PAYER, "1");

    // The node identity first: the development coordinator is told to trust
    // this node's simulated-TEE key.
    let nd = dir.path().join("node");
    let d = nd.to_str().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    node_init(d, &base, OPERATOR);
    let sim = sgl::attest::sim::SimKey::load_or_create(&nd.join(sgl::attest::sim::KEY_FILE))
        .unwrap()
        .public()
        .to_b58();

    // The coordinator at its most verbose, every line to a file.
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(&log_path).unwrap();
    let coordinator = Proc(
        Command::new(SGL)
            .args(["coordinator", "serve", "--dev", "--listen", &listen])
            .args(["--heartbeat-interval", "1", "--database-url", db])
            .args(["--simulated-tee-key", &sim])
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let _node = node_start(
        d,
        &["--engine", "echo", "--evidence", "simulated"],
        Stdio::null(),
    );
    wait_node_active(d, Duration::from_secs(60));

    let (_proxy, proxy_base) = start_proxy(
        &base,
        &key,
        &["--simulated-tee-key", &sim, "--allow-any-measurement"],
    );
    let prompt = prompt();
    let out = run_py(
        "openai_proxy_check.py",
        &[&proxy_base, MODEL, &prompt, "simulated"],
    )
    .await;
    let report: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let jobs: Vec<String> = report["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap().to_string())
        .collect();
    let answers: Vec<String> = report["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(answers, vec![prompt.clone(), prompt.clone()]);

    // A proxy that does not trust the simulated key refuses the node: a 502
    // before anything is sealed, stream or not, and no job is dispatched.
    let (_strict, strict_base) = start_proxy(&base, &key, &[]);
    let http = reqwest::Client::new();
    for stream in [false, true] {
        let r = http
            .post(format!("{strict_base}/v1/chat/completions"))
            .json(&json!({"model": MODEL, "stream": stream,
                          "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "evidence_rejected", "{v}");
        assert_eq!(v["error"]["type"], "server_error", "{v}");
    }
    // Unknown routes and methods answer OpenAI-shaped JSON too.
    let r = http
        .post(format!("{proxy_base}/v1/embeddings"))
        .json(&json!({"model": MODEL, "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_supported", "{v}");

    // Two jobs ran, both sealed, both billed to the key's wallet.
    let rows = usage_rows(db);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["payer_wallet"], PAYER, "{r}");
    }

    // Stop the coordinator so its log and database are complete.
    sigterm(&coordinator.0);
    let start = Instant::now();
    let mut coordinator = coordinator;
    while coordinator.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let log = std::fs::read(&log_path).unwrap();
    let mut store = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // The database and its WAL and shared-memory files.
        if name.starts_with("coordinator.db") {
            store.extend(std::fs::read(&path).unwrap());
        }
    }
    // The search can find things: the log has trace lines and names each
    // job as a sealed one, and the database holds the jobs.
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("TRACE"),
        "the coordinator did not log at trace level"
    );
    assert!(
        !text.contains("plain job dispatched"),
        "a request went in plain mode"
    );
    for job in &jobs {
        assert!(
            text.lines()
                .any(|l| l.contains("sealed job dispatched") && l.contains(job.as_str())),
            "job {job} is not logged as sealed"
        );
        assert!(contains(&store, job), "job {job} is not in the database");
    }
    // Neither the prompt nor the answer, nor any part that names them.
    let mut secrets: Vec<&str> = vec![&prompt];
    secrets.extend(answers.iter().map(String::as_str));
    secrets.extend(CANARIES);
    for s in secrets {
        assert!(
            !contains(&log, s),
            "the coordinator's log holds {s:?} in clear"
        );
        assert!(
            !contains(&store, s),
            "the coordinator's database holds {s:?} in clear"
        );
    }
}
