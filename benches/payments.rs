//! Payments throughput: offline x402 verification (EIP-712 hash + ecrecover),
//! X-Auth EIP-191 verification, and store debits on SQLite and PostgreSQL
//! (serialised under contention). A plain timing harness (no framework):
//!
//! `cargo bench --features payments --bench payments`
//! (`--profile test` reuses the test build). PostgreSQL is measured when
//! reachable at SGL_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use alloy_primitives::Address;
use serde_json::Value;
use sgl::money::Micros;
use sgl::payments::x402::{self, Offer};
use sgl::payments::xauth::{self, AuthHeaders};
use sgl::payments::PaymentsConfig;
use sgl::store::{Store, WalletId};

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/payments.json"
    ))
    .expect("tests/data/payments.json");
    serde_json::from_str(&text).expect("JSON")
}

fn report(what: &str, n: u32, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{what:<48} {n:>7} ops  {:>10.1} ops/s  {:>8.1} µs/op",
        f64::from(n) / secs,
        secs * 1e6 / f64::from(n)
    );
}

async fn debits(store: Store, label: &str) {
    let w = WalletId::new_unchecked("0xbench000000000000000000000000000000000001");
    store
        .top_up(
            &w,
            Micros(1_000_000_000),
            &format!("bench-{label}-{}", std::process::id()),
        )
        .await
        .expect("top up");
    let n = 2_000u32;
    let start = Instant::now();
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 16 {
                store
                    .debit(&w, Micros(1), &format!("d{t}-{i}"))
                    .await
                    .expect("debit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    report(
        &format!("store debit, 16 concurrent writers ({label})"),
        n,
        start,
    );
}

#[tokio::main]
async fn main() {
    let v = vectors();
    let h = &v["x402_headers"];
    let mut cfg = PaymentsConfig::new(
        Address::from_str("0x209693Bc6afc0C5328bA36FaF03C514EF312287C").expect("address"),
        "http://127.0.0.1:9",
    );
    cfg.max_timeout_seconds = 600;
    let offer = Offer {
        resource_url: "https://grid.example.com/v1/chat/completions".into(),
        price: Micros(90_000_000),
        description: "SGL grid chat completion".into(),
        mime_type: "application/json".into(),
    };
    let header = h["v2"]["payment_signature_header_value"]
        .as_str()
        .expect("header");
    let n = 5_000;
    let start = Instant::now();
    for _ in 0..n {
        let p = x402::parse_payment_header(header).expect("parse");
        x402::verify(&cfg, &p, &offer, 1_700_000_300).expect("verify");
    }
    report("x402 v2 header parse + offline verify", n, start);

    let xa = &v["eip191_vectors"][1]["headers"];
    let s = |k: &str| xa[k].as_str().expect("field");
    let ah = AuthHeaders {
        address: s("X-Auth-Address"),
        chain: s("X-Auth-Chain"),
        signature: s("X-Auth-Signature"),
        timestamp: s("X-Auth-Timestamp"),
        nonce: s("X-Auth-Nonce"),
        sig_encoding: Some("hex"),
    };
    let start = Instant::now();
    for _ in 0..n {
        xauth::verify(
            &ah,
            "GET",
            &["/compute/instances"],
            b"",
            1_767_225_600_000,
            300_000,
        )
        .expect("xauth");
    }
    report("X-Auth EIP-191 verify", n, start);

    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Store::open(dir.path().join("bench.db").to_str().expect("path"))
        .await
        .expect("sqlite");
    debits(sqlite, "SQLite WAL").await;
    let url = std::env::var("SGL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("sgl_bench_{}", std::process::id());
    match Store::open_in_schema(&url, Some(&schema)).await {
        Ok(pg) => {
            debits(pg.clone(), "PostgreSQL").await;
            pg.close().await;
            let _ = Store::drop_postgres_schema(&url, &schema).await;
        }
        Err(e) => println!("PostgreSQL not measured: {e}"),
    }
}
