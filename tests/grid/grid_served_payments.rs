//! Payments as an operator switches them on and a client uses them, all
//! through the shipped binary: `sgl coordinator serve --pay-to …
//! --facilitator-url … [--mpp …] [--facilitator-token-file |
//! --facilitator-cdp-key-file …]` as a process, a node process on the echo
//! engine, and the loopback stand-in facilitator (which demands credentials
//! the way a hosted one does).
//!
//! - The official MPP clients, PyPI `pympp` 0.16 and npm `mppx` 0.11, each
//!   pay a chat and a credits top-up through MPP (not the x402 fallback),
//!   with `Payment-Receipt`, and their replays are refused; on SQLite and
//!   PostgreSQL.
//! - The facilitator's credentials (bearer token, CDP JWT with Ed25519 and
//!   ES256 keys) are sent and never printed; a facilitator that refuses them,
//!   or whose `GET /supported` lacks the configured network, stops the
//!   coordinator at start with an error naming its URL and what is missing.
//! - `sgl chat --wallet-key FILE` pays per request with x402 (settled
//!   through the facilitator) or with the wallet's credits by signature.
#![cfg(all(feature = "coordinator", unix))]

use crate::grid_support;
use crate::pay_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use grid_support::{
    free_port, node_init, node_start, ok, python_has, run_py, sgl, usage_rows, wait_node_active,
    Proc, MODEL, OPERATOR, SGL,
};
use pay_common::facilitator::{self, ExpectedAuth, Facilitator};
use serde_json::Value;

/// The payee of every test coordinator.
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
/// Anvil test keys #0 and #1 and their addresses.
const KEY0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const ADDR0: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
const KEY1: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const ADDR1: &str = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";
const CDP_KEY_ID: &str = "organizations/0b7c1a9e/apiKeys/5f0e6f4d-1b7e-4d43-9b0a-3c1f5e2a7d11";

/// A file written with the given mode (secrets are written loose on
/// purpose: the binary must tighten them to 0600 before reading).
fn write_file(path: &Path, text: &str, mode: u32) -> String {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_string()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A paid coordinator process (not development mode).
struct Served {
    base: String,
    _proc: Proc,
    stderr: PathBuf,
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn serve_command(db: &str, fac: &str, listen: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(SGL);
    c.args([
        "coordinator",
        "serve",
        "--listen",
        listen,
        "--database-url",
        db,
        "--pay-to",
        PAY_TO,
        "--facilitator-url",
        fac,
        "--heartbeat-interval",
        "1",
    ])
    .args(extra)
    .env_remove("SGL_FACILITATOR_TOKEN")
    .env_remove("SGL_FACILITATOR_CDP_KEY_SECRET")
    .env_remove("SGL_MPP_SECRET")
    .stdout(Stdio::null());
    c
}

/// `sgl coordinator serve` with payments and `extra`, waited for until it
/// listens (it fails the test if the process exits first).
fn serve(dir: &Path, db: &str, fac: &str, extra: &[&str], envs: &[(&str, &str)]) -> Served {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let stderr = dir.join(format!("coordinator-{port}.log"));
    let mut c = serve_command(db, fac, &listen, extra);
    c.envs(envs.iter().copied())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let mut proc = Proc(c.spawn().unwrap());
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = proc.0.try_wait().unwrap() {
            panic!(
                "the coordinator exited ({status}): {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Served {
        base: format!("http://{listen}"),
        _proc: proc,
        stderr,
    }
}

/// `sgl coordinator serve` that must refuse to start; its stderr.
fn serve_refused(db: &str, fac: &str, extra: &[&str], envs: &[(&str, &str)]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut c = serve_command(db, fac, &listen, extra);
    c.envs(envs.iter().copied()).stderr(Stdio::piped());
    let mut child = Proc(c.spawn().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator started although it must not"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// A node on the echo engine, registered with `code`, active at `base`.
fn echo_node(dir: &Path, base: &str, code: &str) -> Proc {
    let nd = dir.join(format!("node-{}", free_port()));
    let d = nd.to_str().unwrap();
    node_init(d, base, OPERATOR);
    let node = node_start(
        d,
        &[
            "--engine",
            "echo",
            "--evidence",
            "none",
            "--registration-code",
            code,
        ],
        Stdio::null(),
    );
    wait_node_active(d, Duration::from_secs(60));
    node
}

/// The wallet's credits balance in micro-USD, from `sgl coordinator credits balance`.
fn balance_micros(db: &str, wallet: &str) -> u64 {
    let out = grid_support::balance(db, wallet);
    let usd = out
        .split("balance ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no balance in {out:?}"));
    sgl::money::Micros::parse_usd(usd).unwrap().0
}

/// The usage rows paid by `wallet` with `method`.
fn rows_paid(db: &str, wallet: &str, method: &str) -> Vec<Value> {
    usage_rows(db)
        .into_iter()
        .filter(|r| r["payer_wallet"] == wallet && r["method"] == method)
        .collect()
}

/// mppx 0.11.0 (and the viem it signs with) installed with npm into a
/// cache directory, once; None (the check is skipped with a message) when
/// npm is missing or cannot install, unless SGL_REQUIRE_NPM_CLIENTS=1.
fn mppx_dir() -> Option<PathBuf> {
    let root = std::env::var_os("SGL_NPM_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("sgl").join("npm")))
        .expect("a cache directory");
    let dir = root.join("mppx-0.11.0");
    let installed = |d: &Path| {
        d.join("node_modules/mppx/package.json").exists()
            && d.join("node_modules/viem/package.json").exists()
    };
    if installed(&dir) {
        return Some(dir);
    }
    let required = std::env::var("SGL_REQUIRE_NPM_CLIENTS").as_deref() == Ok("1");
    // Installed beside the final place, then renamed: a half-done install
    // is never taken for a finished one.
    let tmp = root.join(format!("mppx-0.11.0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new("npm")
        .args([
            "install",
            "--prefix",
            tmp.to_str().unwrap(),
            "--no-audit",
            "--no-fund",
            // viem's newest releases name a later mppx as an optional peer.
            "--legacy-peer-deps",
            "mppx@0.11.0",
            "viem@2.54.6",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() && installed(&tmp) => {
            if std::fs::rename(&tmp, &dir).is_err() {
                // Another run finished first; its install is as good.
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Some(dir)
        }
        other => {
            let _ = std::fs::remove_dir_all(&tmp);
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                !required,
                "SGL_REQUIRE_NPM_CLIENTS=1 but npm cannot install mppx: {why}"
            );
            eprintln!("skipping the mppx client: npm cannot install it: {why}");
            None
        }
    }
}

/// Run the mppx script from `dir` (where its packages are); its stdout.
async fn run_mppx(dir: &Path, base: &str, key: &str) -> String {
    let script = dir.join("mppx_grid_pay.mjs");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/mppx_grid_pay.mjs"),
        &script,
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(&script)
            .args([base, MODEL])
            .env("SGL_TEST_PAYER_KEY", key)
            .output(),
    )
    .await
    .expect("the mppx script timed out")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "mppx_grid_pay.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The payer a client script reported (`payer=0x…`).
fn payer(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("payer="))
        .expect("the script names its payer")
        .to_string()
}

/// An Ed25519 CDP key: the stand-in's expectation and the key file's JSON,
/// as the CDP portal offers it.
fn cdp_ed25519_key() -> (ExpectedAuth, String) {
    let sk = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let json = serde_json::json!({
        "id": CDP_KEY_ID,
        "privateKey": STANDARD.encode(sk.to_keypair_bytes()),
    });
    (
        ExpectedAuth::CdpEd25519 {
            key_id: CDP_KEY_ID.into(),
            key: sk.verifying_key(),
        },
        json.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_mpp_clients_pay_chats_and_topups_through_mpp() {
    let pympp = python_has("mpp, mpp.methods.evm, eth_account, httpx");
    let mppx = mppx_dir();
    if !pympp && mppx.is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("mpp", dir.path()) {
        eprintln!("backend: {}", db.backend);
        mpp_clients_on(dir.path(), &db.url, pympp, mppx.as_deref()).await;
    }
}

async fn mpp_clients_on(dir: &Path, db: &str, pympp: bool, mppx: Option<&Path>) {
    // The facilitator takes a CDP key: every verify and settle is signed.
    let (expected, key_json) = cdp_ed25519_key();
    let fac = facilitator::start_with(Some(expected)).await;
    let tag = free_port();
    let key_file = write_file(&dir.join(format!("cdp-{tag}.json")), &key_json, 0o644);
    let secret_file = write_file(
        &dir.join(format!("mpp-secret-{tag}")),
        &hex::encode(rand_core::RngCore::next_u64(&mut rand_core::OsRng).to_be_bytes()).repeat(3),
        0o600,
    );
    let code = format!("sglreg_mpp_{tag}");
    let c = serve(
        dir,
        db,
        &fac.url,
        &[
            "--registration-code",
            &code,
            "--facilitator-cdp-key-file",
            &key_file,
            "--mpp",
            "--mpp-secret-file",
            &secret_file,
        ],
        &[],
    );
    assert_eq!(
        mode(&key_file),
        0o600,
        "the key file was tightened before use"
    );
    let _node = echo_node(dir, &c.base, &code);

    let mut payers = Vec::new();
    if pympp {
        let out = run_py("mpp_grid_pay.py", &[&c.base, MODEL]).await;
        payers.push(payer(&out));
    }
    if let Some(mppx) = mppx {
        let out = run_mppx(mppx, &c.base, KEY1).await;
        payers.push(payer(&out));
    }
    for p in &payers {
        // The chat was billed as an MPP payment by this wallet…
        let rows = rows_paid(db, p, "mpp");
        assert_eq!(rows.len(), 1, "one MPP-paid chat by {p}: {rows:?}");
        assert_eq!(rows[0]["status"], "completed");
        // …and the top-up credited it (at least $1: a metered refund of the
        // chat's unused quote may add to it).
        assert!(balance_micros(db, p) >= 1_000_000, "{p} was credited");
    }
    // Each payment settled once (chat and top-up per client; the replays
    // never reached the facilitator), every request signed with the key.
    assert_eq!(
        fac.state.settle_calls.load(Ordering::SeqCst),
        2 * payers.len()
    );
    assert_eq!(fac.state.auth_refused.load(Ordering::SeqCst), 0);
    assert!(fac.state.auth_accepted.load(Ordering::SeqCst) > 4 * payers.len());
    let secret: Value = serde_json::from_str(&key_json).unwrap();
    let secret = secret["privateKey"].as_str().unwrap();
    assert!(
        !c.log().contains(&secret[..24]),
        "no key material in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facilitator_credentials_and_supported_networks_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let db = db.to_str().unwrap();

    // A bearer token from a file: the start-up check passes with it.
    let token = "sgl-test-facilitator-token-5d1c0b7a";
    let fac: Facilitator = facilitator::start_with(Some(ExpectedAuth::Bearer(token.into()))).await;
    let token_file = write_file(&dir.path().join("token"), token, 0o600);
    let c = serve(
        dir.path(),
        db,
        &fac.url,
        &["--facilitator-token-file", &token_file],
        &[],
    );
    assert!(fac.state.auth_accepted.load(Ordering::SeqCst) >= 1);
    assert!(!c.log().contains(token), "the token is never printed");
    drop(c);

    // A wrong token (from the environment): refused at start, naming the
    // facilitator, without printing the token.
    let wrong = "sgl-wrong-token-0e9f";
    let err = serve_refused(db, &fac.url, &[], &[("SGL_FACILITATOR_TOKEN", wrong)]);
    assert!(err.contains(&fac.url), "{err}");
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains(wrong), "{err}");
    assert!(fac.state.auth_refused.load(Ordering::SeqCst) >= 1);

    // A CDP key: Ed25519 from the portal's JSON file, ES256 from a PEM file
    // with its id given apart. Each start's GET /supported is signed.
    let (expected, key_json) = cdp_ed25519_key();
    let fac = facilitator::start_with(Some(expected)).await;
    let key_file = write_file(&dir.path().join("cdp.json"), &key_json, 0o600);
    drop(serve(
        dir.path(),
        db,
        &fac.url,
        &["--facilitator-cdp-key-file", &key_file],
        &[],
    ));
    assert_eq!(fac.state.auth_accepted.load(Ordering::SeqCst), 1);

    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    let pem = sk.to_sec1_pem(Default::default()).unwrap();
    let fac = facilitator::start_with(Some(ExpectedAuth::CdpEs256 {
        key_id: CDP_KEY_ID.into(),
        key: p256::ecdsa::VerifyingKey::from(sk.public_key()),
    }))
    .await;
    let pem_file = write_file(&dir.path().join("cdp.pem"), &pem, 0o600);
    let c = serve(
        dir.path(),
        db,
        &fac.url,
        &[
            "--facilitator-cdp-key-file",
            &pem_file,
            "--facilitator-cdp-key-id",
            CDP_KEY_ID,
        ],
        &[],
    );
    assert_eq!(fac.state.auth_accepted.load(Ordering::SeqCst), 1);
    assert!(!c.log().contains("PRIVATE KEY"));
    drop(c);
    // The same key signed by another key id: refused.
    let err = serve_refused(
        db,
        &fac.url,
        &[
            "--facilitator-cdp-key-file",
            &pem_file,
            "--facilitator-cdp-key-id",
            "another-key",
        ],
        &[],
    );
    assert!(err.contains("credentials"), "{err}");

    // A facilitator whose /supported lacks the configured network: the
    // coordinator does not start, and says which URL lacks what.
    let fac = facilitator::start().await;
    let err = serve_refused(db, &fac.url, &["--network", "base-sepolia"], &[]);
    assert!(err.contains(&format!("{}/supported", fac.url)), "{err}");
    assert!(
        err.contains("base-sepolia") || err.contains("eip155:84532"),
        "{err}"
    );
    // Only v2 listed: the v1 network is named as missing.
    fac.state
        .kinds
        .lock()
        .unwrap()
        .retain(|k| k["x402Version"] == 2);
    let err = serve_refused(db, &fac.url, &[], &[]);
    assert!(err.contains("\"base\"") && err.contains("x402 v1"), "{err}");
    // No facilitator at all.
    let err = serve_refused(db, "http://127.0.0.1:9", &[], &[]);
    assert!(err.contains("http://127.0.0.1:9/supported"), "{err}");

    // MPP misconfigured: refused with the reason.
    let fac = facilitator::start().await;
    let short = write_file(&dir.path().join("short"), "too short", 0o600);
    let err = serve_refused(db, &fac.url, &["--mpp", "--mpp-secret-file", &short], &[]);
    assert!(err.contains("at least 32 bytes"), "{err}");
    let err = serve_refused(db, &fac.url, &["--mpp-realm", "grid.example"], &[]);
    assert!(err.contains("need --mpp"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sgl_chat_pays_with_its_wallet_by_x402_or_credits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let db = db.to_str().unwrap();
    let fac = facilitator::start().await;
    let code = "sglreg_chat_wallet";
    let c = serve(
        dir.path(),
        db,
        &fac.url,
        &["--registration-code", code],
        &[],
    );
    let _node = echo_node(dir.path(), &c.base, code);

    // Per-request x402 from a wallet key file (written loose: tightened).
    let key0 = write_file(&dir.path().join("wallet0.key"), &format!("{KEY0}\n"), 0o644);
    let out = ok(sgl(&[
        "chat",
        "--coordinator",
        &c.base,
        "--wallet-key",
        &key0,
        "--json",
        "paid by my wallet",
    ]));
    assert_eq!(mode(&key0), 0o600);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["content"], "paid by my wallet");
    assert_eq!(v["signatures_verified"], true);
    let p = &v["payment"];
    assert_eq!(p["scheme"], "x402-v2");
    assert_eq!(p["payer"], ADDR0);
    assert_eq!(p["settlement"]["success"], true, "{p}");
    let tx = p["settlement"]["transaction"].as_str().unwrap();
    assert!(tx.starts_with("0x") && tx.len() == 66, "{tx}");
    assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 1);
    let rows = rows_paid(db, ADDR0, "x402-v2");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["job_id"], v["job_id"]);
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(
        rows[0]["quoted_micro_usd"].as_u64(),
        p["amount_micro_usd"].as_u64(),
        "the wallet paid the quote"
    );

    // A 402 above the cap is refused unsigned: nothing more settles.
    let refused = sgl(&[
        "chat",
        "--coordinator",
        &c.base,
        "--wallet-key",
        &key0,
        "--max-payment",
        "0.000001",
        "too dear",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("above the cap"), "{err}");
    assert!(!err.contains(&KEY0[2..]), "the key is never printed");
    assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 1);

    // Credits by signature: the wallet's prepaid credits pay.
    ok(sgl(&[
        "coordinator",
        "credits",
        "grant",
        "--wallet",
        ADDR1,
        "--amount",
        "1",
        "--database-url",
        db,
    ]));
    let key1 = write_file(&dir.path().join("wallet1.key"), KEY1, 0o600);
    let out = ok(sgl(&[
        "chat",
        "--coordinator",
        &c.base,
        "--wallet-key",
        &key1,
        "--pay",
        "credits",
        "--json",
        "paid from my credits",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["content"], "paid from my credits");
    assert!(v["payment"].is_null());
    let rows: Vec<Value> = usage_rows(db)
        .into_iter()
        .filter(|r| r["job_id"] == v["job_id"])
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["payer_wallet"], ADDR1);
    let cost = rows[0]["cost_micro_usd"].as_u64().unwrap();
    assert!(cost > 0);
    assert_eq!(balance_micros(db, ADDR1), 1_000_000 - cost);
    assert_eq!(
        fac.state.settle_calls.load(Ordering::SeqCst),
        1,
        "credits never reach the facilitator"
    );

    // Without credits the signed request gets the 402 (insufficient credits).
    let key_poor = write_file(
        &dir.path().join("wallet-poor.key"),
        "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
        0o600,
    );
    let poor = sgl(&[
        "chat",
        "--coordinator",
        &c.base,
        "--wallet-key",
        &key_poor,
        "--pay",
        "credits",
        "no credits",
    ]);
    assert!(!poor.status.success());
    assert!(String::from_utf8_lossy(&poor.stderr).contains("402"));
}
