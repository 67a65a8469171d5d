//! The official Python clients as judges: PyPI `x402[evm,httpx]==2.25.0`
//! and `pympp[evm]==0.16.0` (with `eth_account`) pay and sign against an sgl
//! payments server on loopback, whose facilitator is a loopback stand-in.
//! The scripts live in tests/py/. Skipped with a message when the packages
//! are not importable, unless SGL_REQUIRE_PY_CLIENTS=1.
#![cfg(feature = "payments")]

mod pay_common;

use std::time::Duration;

use pay_common::server;

fn python() -> String {
    std::env::var("SGL_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Whether `modules` import; panics instead of skipping when required.
fn available(modules: &str) -> bool {
    let ok = std::process::Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("SGL_REQUIRE_PY_CLIENTS").as_deref() == Ok("1") {
            panic!("SGL_REQUIRE_PY_CLIENTS=1 but `import {modules}` fails (pip install -r tests/py/requirements.txt)");
        }
        eprintln!("skipping: `import {modules}` fails; pip install -r tests/py/requirements.txt");
    }
    ok
}

async fn run_script(script: &str, args: &[&str]) {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&path)
            .args(args)
            .output(),
    )
    .await
    .expect("script timed out")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_python_client_pays_v2_and_v1() {
    if !available("x402, x402.http.clients.httpx, eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    run_script("x402_pay.py", &[&s.base]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pympp_client_pays_an_mpp_challenge() {
    if !available("mpp, mpp.methods.evm, eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    run_script("mpp_pay.py", &[&s.base]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eth_account_signed_requests() {
    if !available("eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    let vectors = format!("{}/tests/data/payments.json", env!("CARGO_MANIFEST_DIR"));
    run_script("xauth_sign.py", &[&s.base, &vectors]).await;
}
