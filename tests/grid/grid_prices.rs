//! Node prices (PROTOCOL.md §5.8) as an operator changes them: `sgl price
//! show|set|reset` against a real `sgl coordinator serve` process, and the
//! owner-wallet signature path of `POST /grid/nodes/{id}/prices` — a
//! signature by the node's wallet accepted, one by another wallet refused,
//! a replayed one refused. The node agent runs the echo load-test engine:
//! these tests change prices, they run no inference. Each runs on SQLite
//! and on a fresh PostgreSQL database (SGL_TEST_POSTGRES_URL; skipped when
//! unreachable unless SGL_REQUIRE_POSTGRES=1).
#![cfg(all(feature = "coordinator", feature = "payments", unix))]

use crate::grid_support;
use crate::pay_common;

use std::process::Stdio;
use std::time::Duration;

use grid_support::{node_init, node_start, ok, sgl, wait_until, CoordinatorProc, Proc, MODEL};
use pay_common::signing::{address, key, xauth_headers, ANVIL0, ANVIL1};
use serde_json::{json, Value};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn entry<'a>(prices: &'a Value, model: &str) -> &'a Value {
    prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == model)
        .unwrap_or_else(|| panic!("no {model} in {prices}"))
}

/// A coordinator with a store (so wallet signatures and their nonces are
/// checked) and a registered node whose wallet is Anvil key #0.
struct Grid {
    _dir: tempfile::TempDir,
    node_dir: String,
    base: String,
    _coord: CoordinatorProc,
    _node: Proc,
}

fn grid(price_cooldown: &str, db: &str) -> Grid {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let coord = CoordinatorProc::start(&["--database-url", db, "--price-cooldown", price_cooldown]);
    let owner = format!("{:#x}", address(&key(ANVIL0)));
    let d = node_dir.to_str().unwrap().to_string();
    node_init(&d, &coord.base, &owner);
    let node = node_start(&d, &["--engine", "echo"], Stdio::null());
    wait_until(
        "the node to advertise its model",
        Duration::from_secs(30),
        || {
            let out = sgl(&["price", "show", "--config-dir", &d, "--json"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(MODEL)
        },
    );
    Grid {
        _dir: dir,
        node_dir: d,
        base: coord.base.clone(),
        _coord: coord,
        _node: node,
    }
}

fn show(g: &Grid) -> Value {
    serde_json::from_str(&ok(sgl(&[
        "price",
        "show",
        "--config-dir",
        &g.node_dir,
        "--json",
    ])))
    .unwrap()
}

fn each_database(tag: &str, body: impl Fn(&str)) {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases(tag, dir.path()) {
        eprintln!("backend: {}", db.backend);
        body(&db.url);
    }
}

#[test]
fn price_cli_shows_sets_and_resets_on_a_real_coordinator() {
    each_database("price_cli", price_cli_on);
}

fn price_cli_on(db: &str) {
    let g = grid("0", db);
    let prices = show(&g);
    let e = entry(&prices, MODEL);
    assert!(e["custom"].is_null(), "{e}");
    let r_in = e["reference"]["inputPerM"].as_f64().unwrap();
    let r_out = e["reference"]["outputPerM"].as_f64().unwrap();
    assert!(r_in > 0.0 && r_out > 0.0, "{e}");
    assert_eq!(e["effective"], e["reference"]);

    // The text form names the model and its prices.
    let text = ok(sgl(&["price", "show", "--config-dir", &g.node_dir]));
    assert!(text.contains(MODEL) && text.contains("effective"), "{text}");

    let (want_in, want_out) = (r_in * 2.0, r_out * 3.0);
    let set = ok(sgl(&[
        "price",
        "set",
        "--config-dir",
        &g.node_dir,
        "--model",
        MODEL,
        "--input-per-m",
        &want_in.to_string(),
        "--output-per-m",
        &want_out.to_string(),
    ]));
    assert!(set.contains(MODEL), "{set}");
    let prices = show(&g);
    let e = entry(&prices, MODEL);
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(close(&e["custom"]["inputPerM"], want_in), "{e}");
    assert!(close(&e["custom"]["outputPerM"], want_out), "{e}");
    assert_eq!(e["effective"], e["custom"]);
    // Out of the band: refused, the coordinator's reason shown, nothing changed.
    let refused = sgl(&[
        "price",
        "set",
        "--config-dir",
        &g.node_dir,
        "--model",
        MODEL,
        "--input-per-m",
        &(r_in * 100.0).to_string(),
        "--output-per-m",
        &r_out.to_string(),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("price_out_of_band"), "{err}");
    // A model the node does not advertise.
    let refused = sgl(&[
        "price",
        "reset",
        "--config-dir",
        &g.node_dir,
        "--model",
        "no-such-model",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("model_not_advertised"), "{err}");
    // Bad input never reaches the coordinator.
    let refused = sgl(&[
        "price",
        "set",
        "--config-dir",
        &g.node_dir,
        "--model",
        MODEL,
        "--input-per-m",
        "-1",
        "--output-per-m",
        "1",
    ]);
    assert!(!refused.status.success());

    ok(sgl(&[
        "price",
        "reset",
        "--config-dir",
        &g.node_dir,
        "--model",
        MODEL,
    ]));
    let prices = show(&g);
    let e = entry(&prices, MODEL);
    assert!(e["custom"].is_null(), "{e}");
    assert_eq!(e["effective"], e["reference"]);
}

#[test]
fn price_cli_reports_the_cooldown() {
    each_database("price_cooldown", price_cooldown_on);
}

fn price_cooldown_on(db: &str) {
    let g = grid("60", db);
    let prices = show(&g);
    let r_in = entry(&prices, MODEL)["reference"]["inputPerM"]
        .as_f64()
        .unwrap();
    let r_out = entry(&prices, MODEL)["reference"]["outputPerM"]
        .as_f64()
        .unwrap();
    let set = |i: f64| {
        sgl(&[
            "price",
            "set",
            "--config-dir",
            &g.node_dir,
            "--model",
            MODEL,
            "--input-per-m",
            &i.to_string(),
            "--output-per-m",
            &r_out.to_string(),
        ])
    };
    ok(set(r_in * 2.0));
    let again = set(r_in * 3.0);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("429") && err.contains("price_cooldown"),
        "{err}"
    );
    let prices = show(&g);
    assert!(entry(&prices, MODEL)["cooldown_until"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_wallet_signature_sets_prices_and_is_single_use() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("price_owner", dir.path()) {
        eprintln!("backend: {}", db.backend);
        owner_signature_on(db.url.clone()).await;
    }
}

async fn owner_signature_on(db: String) {
    let g = tokio::task::spawn_blocking(move || grid("0", &db))
        .await
        .unwrap();
    let prices = show(&g);
    let node_id = prices["node_id"].as_str().unwrap().to_string();
    let r = &entry(&prices, MODEL)["reference"];
    let (r_in, r_out) = (
        r["inputPerM"].as_f64().unwrap(),
        r["outputPerM"].as_f64().unwrap(),
    );
    let path = format!("/grid/nodes/{node_id}/prices");
    let url = format!("{}{path}", g.base);
    let http = reqwest::Client::new();
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let mut req = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };

    // Signed by the node's wallet: accepted.
    let body = serde_json::to_vec(
        &json!({"model": MODEL, "input_per_m": r_in * 2.0, "output_per_m": r_out * 2.0}),
    )
    .unwrap();
    let owner = xauth_headers(
        &key(ANVIL0),
        "POST",
        &path,
        &body,
        now_ms(),
        "owner-nonce-0001",
    );
    let resp = post(owner.clone(), body.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(!v["price"]["custom"].is_null(), "{v}");
    let shown = show(&g);
    assert_eq!(entry(&shown, MODEL)["custom"], v["price"]["custom"]);

    // The same signature again: the nonce is spent.
    let resp = post(owner, body.clone()).await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "nonce_reused", "{v}");

    // A valid signature by another wallet: not the owner.
    let reset = serde_json::to_vec(&json!({"model": MODEL, "reset": true})).unwrap();
    let other = xauth_headers(
        &key(ANVIL1),
        "POST",
        &path,
        &reset,
        now_ms(),
        "other-nonce-0001",
    );
    let resp = post(other, reset.clone()).await.unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_node_owner", "{v}");

    // The owner's signature over a different body: refused.
    let forged = xauth_headers(
        &key(ANVIL0),
        "POST",
        &path,
        &body,
        now_ms(),
        "owner-nonce-0002",
    );
    let resp = post(forged, reset.clone()).await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_signature", "{v}");

    // Outside the time window: refused.
    let stale = xauth_headers(
        &key(ANVIL0),
        "POST",
        &path,
        &reset,
        now_ms() - 3_600_000,
        "owner-nonce-0003",
    );
    let resp = post(stale, reset.clone()).await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "signature_expired", "{v}");

    // Nothing above changed the price; a fresh owner signature resets it.
    let shown = show(&g);
    assert!(!entry(&shown, MODEL)["custom"].is_null());
    let fresh = xauth_headers(
        &key(ANVIL0),
        "POST",
        &path,
        &reset,
        now_ms(),
        "owner-nonce-0004",
    );
    let resp = post(fresh, reset).await.unwrap();
    assert_eq!(resp.status(), 200);
    let shown = show(&g);
    assert!(entry(&shown, MODEL)["custom"].is_null());
}
