//! The official Python clients as judges: PyPI `x402[evm,httpx]==2.25.0`
//! and `pympp[evm]==0.16.0` (with `eth_account`) pay and sign against an sgl
//! payments server on loopback, whose facilitator is a loopback stand-in.
//! The scripts live in tests/py/. Skipped with a message when the packages
//! are not importable, unless SGL_REQUIRE_PY_CLIENTS=1.
#![cfg(feature = "payments")]

use crate::grid_support;
use crate::pay_common;

use grid_support::{python_has, run_py};
use pay_common::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_python_client_pays_v2_and_v1() {
    if !python_has("x402, x402.http.clients.httpx, eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    run_py("x402_pay.py", &[&s.base]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pympp_client_pays_an_mpp_challenge() {
    if !python_has("mpp, mpp.methods.evm, eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    run_py("mpp_pay.py", &[&s.base]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eth_account_signed_requests() {
    if !python_has("eth_account, httpx") {
        return;
    }
    let s = server::start().await;
    let vectors = format!("{}/tests/data/payments.json", env!("CARGO_MANIFEST_DIR"));
    run_py("xauth_sign.py", &[&s.base, &vectors]).await;
}
