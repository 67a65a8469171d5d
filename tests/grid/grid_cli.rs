//! The grid as an operator and a client run it: real `sgl` processes on
//! loopback — `coordinator serve --dev`, `node init`, `node start`, `chat`,
//! `node status|off-grid|on-grid`, SIGTERM, and `node service install`.
//! The node runs the echo load-test engine here; the real model is exercised
//! by the engine and grid end-to-end tests.
#![cfg(all(feature = "coordinator", unix))]

use crate::engine_support;
use crate::grid_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use grid_support::{
    node_init, node_start, ok, sgl, sigterm, wait_node_active, wait_online, CoordinatorProc,
    ModelGrid, MODEL, OPERATOR, SGL,
};

#[test]
fn operator_and_client_commands_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let coord = CoordinatorProc::start(&["--database-url", db.to_str().unwrap()]);
    let base = coord.base.clone();
    let nd = dir.path().join("node");
    let d = nd.to_str().unwrap();
    node_init(d, &base, OPERATOR);
    let mut node = node_start(d, &["--engine", "echo"], Stdio::null());
    wait_node_active(d, Duration::from_secs(30));

    let answer = ok(sgl(&[
        "chat",
        "--coordinator",
        &base,
        "--stream",
        "hello sealed world",
    ]));
    assert_eq!(answer.trim(), "hello sealed world");
    let json: serde_json::Value = serde_json::from_str(&ok(sgl(&[
        "chat",
        "--coordinator",
        &base,
        "--json",
        "one two three",
    ])))
    .unwrap();
    assert_eq!(json["content"], "one two three");
    assert_eq!(json["usage_signed"], true);
    assert_eq!(json["signatures_verified"], true);
    // The echo engine implements neither `n` nor `logprobs`: nothing is
    // reserved, and the error names the parameter.
    for flags in [&["-n", "2"][..], &["--logprobs"][..]] {
        let mut args = vec!["chat", "--coordinator", &base];
        args.extend_from_slice(flags);
        args.push("two answers");
        let refused = sgl(&args);
        assert!(!refused.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("unsupported_parameter"), "{flags:?}: {err}");
    }

    ok(sgl(&["node", "off-grid", "--config-dir", d]));
    let refused = sgl(&["chat", "--coordinator", &base, "nobody serves"]);
    assert!(!refused.status.success());
    ok(sgl(&["node", "on-grid", "--config-dir", d]));
    ok(sgl(&["chat", "--coordinator", &base, "back again"]));

    // SIGTERM: the agent goes off-grid, drains and exits cleanly.
    sigterm(&node.0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = node.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let status = ok(sgl(&["node", "status", "--config-dir", d, "--json"]));
    assert!(status.contains("\"off_grid\""), "{status}");
}

#[test]
fn service_install_writes_the_hardened_unit() {
    let units = tempfile::tempdir().unwrap();
    let out = ok(sgl(&[
        "node",
        "service",
        "install",
        "--unit-dir",
        units.path().to_str().unwrap(),
        "--no-enable",
    ]));
    assert!(out.contains("sgl-node.service"));
    let path = units.path().join("sgl-node.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    assert!(unit.contains(&format!("ExecStart={SGL} node start")));
    assert!(unit.contains("ProtectSystem=strict"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn node_start_explains_missing_identity() {
    let dir = tempfile::tempdir().unwrap();
    let out = sgl(&[
        "node",
        "start",
        "--config-dir",
        dir.path().to_str().unwrap(),
        "--engine",
        "echo",
        "--coordinator",
        "http://127.0.0.1:9",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keypair.json"), "{err}");
}

/// The coordinator's added latency as the README measures it: `sgl bench
/// --compare-url` against `node serve --engine echo` and a development
/// coordinator in front of a `node start --engine echo` node. Both answer
/// instantly, so each run reports both endpoints at each concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_an_echo_node_with_the_coordinator_in_front_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let coord = CoordinatorProc::start(&["--in-memory"]);
    node_init(d, &coord.base, OPERATOR);
    let _node = node_start(
        d,
        &["--engine", "echo", "--evidence", "none"],
        Stdio::null(),
    );
    wait_online(&coord.base, Duration::from_secs(30)).await;
    let direct = engine_support::Server::start(&["--engine", "echo"]).await;

    let out = tokio::process::Command::new(SGL)
        .args(["bench", "--url", &direct.base, "--compare-url", &coord.base])
        .args(["--requests", "40", "--concurrency", "1,4", "--json", "-"])
        .output()
        .await
        .unwrap();
    let text = ok(out);
    // The table, then the JSON report.
    let json = &text[text.find("\n{").expect("a JSON report") + 1..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(report["model"], MODEL);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    for (run, concurrency) in runs.iter().zip([1, 4]) {
        assert_eq!(run["concurrency"], concurrency);
        assert_eq!(run["direct"]["url"], direct.base.as_str());
        assert_eq!(run["compared"]["url"], coord.base.as_str());
        for side in [&run["direct"], &run["compared"]] {
            assert_eq!(side["requests"], 40);
            assert!(side["p50_ms"].as_f64().unwrap() > 0.0, "{run}");
            assert!(
                side["p99_ms"].as_f64().unwrap() >= side["p50_ms"].as_f64().unwrap(),
                "{run}"
            );
            assert!(side["requests_per_s"].as_f64().unwrap() > 0.0, "{run}");
        }
        // The added latency is the difference of the two sides.
        for q in ["p50", "p99"] {
            let added = run[format!("added_{q}_ms")].as_f64().unwrap();
            let (c, d) = (
                run["compared"][format!("{q}_ms")].as_f64().unwrap(),
                run["direct"][format!("{q}_ms")].as_f64().unwrap(),
            );
            assert!((added - (c - d)).abs() < 1e-9, "{run}");
        }
    }
}

/// `sgl chat -n`, `--logprobs` and `--top-logprobs` against a node running
/// the real model: every choice printed under its label, each token on a
/// line with its log probability and the alternatives asked for; the same
/// in `--json` and with `--stream`. Skipped when the model is not cached,
/// unless SGL_REQUIRE_MODEL=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prints_every_choice_and_the_logprobs() {
    if engine_support::model_path().is_none() {
        return;
    }
    let grid = ModelGrid::start(Stdio::null()).await;
    let base = grid.coord.base.as_str();
    let chat = |extra: &[&str]| {
        let mut args = vec!["chat", "--coordinator", base, "--max-tokens", "4"];
        args.extend_from_slice(extra);
        args.push("Name a fruit.");
        ok(sgl(&args))
    };

    for stream in [false, true] {
        let mut flags = vec!["-n", "3", "--temperature", "0.9"];
        if stream {
            flags.push("--stream");
        }
        let out = chat(&flags);
        for i in 0..3 {
            assert!(out.contains(&format!("--- choice {i} ---\n")), "{out}");
        }
        assert!(!out.contains("--- choice 3 ---"), "{out}");
        assert!(!out.contains("logprobs:"), "{out}");
    }

    // One choice with logprobs: no label, a line per token: the token
    // quoted, its logprob, then the two alternatives.
    let out = chat(&["--top-logprobs", "2", "--temperature", "0"]);
    assert!(!out.contains("--- choice"), "{out}");
    let (_, tokens) = out
        .split_once("logprobs:\n")
        .unwrap_or_else(|| panic!("{out}"));
    let lines: Vec<&str> = tokens.lines().collect();
    assert!(!lines.is_empty() && lines.len() <= 4, "{out}");
    for l in &lines {
        let fields: Vec<&str> = l.trim_start().split('\t').collect();
        assert_eq!(fields.len(), 3, "{l}");
        assert!(
            fields[0].starts_with('"') && fields[0].ends_with('"'),
            "{l}"
        );
        let lp: f32 = fields[1].parse().unwrap_or_else(|_| panic!("{l}"));
        assert!(lp <= 0.0, "{l}");
        assert_eq!(fields[2].matches(", ").count(), 1, "two alternatives: {l}");
    }

    // --logprobs without alternatives, two choices, as JSON.
    let v: serde_json::Value =
        serde_json::from_str(&chat(&["--json", "-n", "2", "--logprobs"])).unwrap();
    let choices = v["choices"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(choices.len(), 2, "{v}");
    for c in choices {
        let lp = c["logprobs"]["content"].as_array().unwrap();
        assert!(!lp.is_empty(), "{v}");
        assert!(
            lp.iter()
                .all(|t| t["top_logprobs"] == serde_json::json!([])),
            "{v}"
        );
    }
    assert_eq!(v["content"], choices[0]["message"]["content"], "{v}");
}
