//! Code execution (`POST /api/x402/compute`) and discovery
//! (`GET /.well-known/x402`) served by `sgl coordinator serve --code-exec`
//! as a real process on loopback, paid through the stand-in facilitator:
//! the official x402 clients (PyPI `x402`, npm `@x402/fetch` +
//! `@x402/evm`), 20 concurrent paid runs on two slots, the 400/413/408
//! answers and what each settles, a replayed payment, credits, and
//! `sgl compute run`.
//!
//! The runs need bubblewrap, python3 and node; without a working bwrap the
//! tests are skipped with a message, unless SGL_REQUIRE_SANDBOX=1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::grid_support::{free_port, funded_api_key, python_has, run_py, wait_until, Proc, SGL};
use crate::pay_common::facilitator::{self, Facilitator};
use crate::pay_common::server::PAY_TO;
use crate::pay_common::signing::{self, PayParams, ANVIL0, ANVIL1};

/// A key whose address is the pay-to wallet of the discovery test.
const PAYEE_KEY: &str = "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";

/// Whether sandboxes can run here: bwrap, python3 and node present and a
/// trivial bwrap namespace starts. Skips with a message otherwise, unless
/// SGL_REQUIRE_SANDBOX=1, which fails the test instead.
pub(crate) fn sandbox_available() -> bool {
    let tools = ["/usr/bin/bwrap", "/usr/bin/python3", "/usr/bin/node"];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !Path::new(t).exists())
        .collect();
    let why = if !missing.is_empty() {
        Some(format!("missing {}", missing.join(", ")))
    } else {
        let ok = Command::new("/usr/bin/bwrap")
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-all",
                "--die-with-parent",
                "/bin/true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        (!ok).then(|| "bwrap cannot create namespaces here".to_owned())
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("SGL_REQUIRE_SANDBOX").as_deref() != Ok("1"),
                "SGL_REQUIRE_SANDBOX=1 but the sandbox cannot run: {why} (apt install bubblewrap python3 nodejs)"
            );
            eprintln!("skipping: the sandbox cannot run: {why}");
            false
        }
    }
}

/// A coordinator serving code execution, with its stand-in facilitator and
/// directories.
struct ExecServer {
    base: String,
    db: String,
    fac: Facilitator,
    _proc: Proc,
    dir: tempfile::TempDir,
    /// The sandboxes' work root: apart from `dir`, whose 0700 the
    /// sandbox's uid could not pass.
    _work: tempfile::TempDir,
}

impl ExecServer {
    fn url(&self) -> String {
        format!("{}/api/x402/compute", self.base)
    }

    fn settled(&self) -> usize {
        self.fac.state.settle_calls.load(Ordering::SeqCst)
    }
}

/// The `sgl coordinator serve` arguments of an exec server on `port`.
fn serve_args(db: &str, port: u16, pay_to: &str, fac: &str, work: &Path) -> Vec<String> {
    // A uid range of its own (below 2^31, apart from the default one the
    // in-process sandbox tests use): runs' leftovers are killed by uid, so
    // processes sharing a range would kill each other's sandboxes.
    let uid_base =
        1_000_000_000 + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 12_000) * 65_536;
    let uid_base = uid_base.to_string();
    [
        "coordinator",
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        db,
        "--pay-to",
        pay_to,
        "--facilitator-url",
        fac,
        "--code-exec",
        "--code-exec-work-dir",
        work.to_str().unwrap(),
        "--code-exec-uid-base",
        &uid_base,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Start a code-execution coordinator (SQLite) with `extra` flags.
async fn start(pay_to: &str, extra: &[&str]) -> ExecServer {
    let dir = tempfile::tempdir().unwrap();
    let fac = facilitator::start().await;
    let db = dir
        .path()
        .join("coordinator.db")
        .to_str()
        .unwrap()
        .to_owned();
    let port = free_port();
    let work = tempfile::tempdir().unwrap();
    let mut args = serve_args(&db, port, pay_to, &fac.url, work.path());
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(SGL)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!("the coordinator exited at start ({status}); see its stderr above");
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    ExecServer {
        base: format!("http://127.0.0.1:{port}"),
        db,
        fac,
        _proc: proc,
        dir,
        _work: work,
    }
}

fn pay_to() -> String {
    format!("{PAY_TO:#x}")
}

/// POST a body with extra headers; status, headers and JSON.
async fn post(
    url: &str,
    body: &Value,
    headers: &[(&str, String)],
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().post(url).json(body);
    for (n, v) in headers {
        req = req.header(*n, v);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let h = r.headers().clone();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, h, v)
}

/// A v2 `PAYMENT-SIGNATURE` from ANVIL0 for `amount` at `url`.
fn payment(url: &str, amount: u64) -> String {
    PayParams::new(PAY_TO, amount).x402_v2(&signing::key(ANVIL0), url)
}

fn decoded_header(h: &reqwest::header::HeaderMap, name: &str) -> Value {
    let v = h.get(name).unwrap_or_else(|| panic!("no {name}"));
    serde_json::from_slice(&STANDARD.decode(v.to_str().unwrap()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_client_pays_and_runs_python() {
    if !sandbox_available()
        || !python_has("x402, x402.http.clients.httpx, eth_account, httpx, jsonschema")
    {
        return;
    }
    let s = start(&pay_to(), &[]).await;
    let out = run_py("x402_exec_pay.py", &[&s.base]).await;
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["stdout"], "2\n");
    assert_eq!(s.settled(), 1);
}

/// @x402/fetch and @x402/evm 2.27.0 (and the viem they sign with)
/// installed with npm into a cache directory, once; None (skipped with a
/// message) when npm is missing or cannot install, unless
/// SGL_REQUIRE_NPM_CLIENTS=1.
fn x402_npm_dir() -> Option<PathBuf> {
    let root = std::env::var_os("SGL_NPM_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("sgl").join("npm")))
        .expect("a cache directory");
    let dir = root.join("x402-fetch-2.27.0");
    let installed = |d: &Path| {
        ["@x402/fetch", "@x402/evm", "viem"]
            .iter()
            .all(|p| d.join("node_modules").join(p).join("package.json").exists())
    };
    if installed(&dir) {
        return Some(dir);
    }
    let required = std::env::var("SGL_REQUIRE_NPM_CLIENTS").as_deref() == Ok("1");
    // Installed beside the final place, then renamed: a half-done install
    // is never taken for a finished one.
    let tmp = root.join(format!("x402-fetch-2.27.0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new("npm")
        .args([
            "install",
            "--prefix",
            tmp.to_str().unwrap(),
            "--no-audit",
            "--no-fund",
            "@x402/fetch@2.27.0",
            "@x402/evm@2.27.0",
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
                "SGL_REQUIRE_NPM_CLIENTS=1 but npm cannot install @x402/fetch: {why}"
            );
            eprintln!("skipping the @x402/fetch client: npm cannot install it: {why}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_npm_client_pays_and_runs_node() {
    if !sandbox_available() {
        return;
    }
    let Some(dir) = x402_npm_dir() else { return };
    let s = start(&pay_to(), &[]).await;
    let script = dir.join("x402_exec_pay.mjs");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/x402_exec_pay.mjs"),
        &script,
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&s.base)
            .env("SGL_TEST_PAYER_KEY", format!("0x{ANVIL1}"))
            .output(),
    )
    .await
    .expect("the @x402/fetch script timed out")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "x402_exec_pay.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["stdout"], "node says 2\n");
    assert_eq!(s.settled(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_paid_runs_on_two_slots() {
    if !sandbox_available() {
        return;
    }
    let s = start(
        &pay_to(),
        &["--code-exec-slots", "2", "--code-exec-queue-wait-ms", "300"],
    )
    .await;
    let url = s.url();
    let body = json!({"code": "import time\ntime.sleep(0.3)\nprint('done')"});
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (url, body) = (url.clone(), body.clone());
        let sig = payment(&url, 2000);
        tasks.push(tokio::spawn(async move {
            let r = post(&url, &body, &[("payment-signature", sig.clone())]).await;
            (r, sig)
        }));
    }
    let mut ok = 0;
    let mut busy = Vec::new();
    for t in tasks {
        let ((st, h, v), sig) = t.await.unwrap();
        match st {
            StatusCode::OK => {
                ok += 1;
                assert_eq!(v["stdout"], "done\n", "{v}");
                assert_eq!(decoded_header(&h, "payment-response")["success"], true);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(h.contains_key("retry-after"), "{h:?}");
                assert_eq!(v["error"]["code"], "sandboxes_busy", "{v}");
                busy.push(sig);
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    println!("{ok} served, {} busy", busy.len());
    assert_eq!(ok + busy.len(), 20, "none lost");
    assert!(ok >= 2, "{ok} served");
    // Exactly the executed runs were settled, each once.
    assert_eq!(s.settled(), ok);
    let attempts = s.fac.state.settle_attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), ok);
    assert!(attempts.values().all(|n| *n == 1));
    // A refused (503) payment was given back: it pays for a later run.
    if let Some(sig) = busy.first() {
        let (st, _, v) = post(&url, &body, &[("payment-signature", sig.clone())]).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(s.settled(), ok + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_sizes_timeouts_and_replays() {
    if !sandbox_available() {
        return;
    }
    let s = start(&pay_to(), &[]).await;
    let url = s.url();
    // 400s come before any payment is asked for.
    for (body, code) in [
        (
            json!({"code": "print(1)", "stack": "ruby"}),
            "invalid_stack",
        ),
        (json!({"code": "print(1)", "size": "xl"}), "invalid_size"),
        (json!({"stack": "python"}), "missing_code"),
        (
            json!({"code": "x", "files": {"a.txt": "%%%"}}),
            "invalid_file",
        ),
        (
            json!({"code": "x", "files": {"../a.txt": "aGk="}}),
            "invalid_file_name",
        ),
        (
            json!({"code": "x", "timeout_seconds": -1}),
            "invalid_timeout_seconds",
        ),
    ] {
        let (st, h, v) = post(&url, &body, &[]).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!h.contains_key("payment-required"));
    }
    // 413: code over 1 MB, files over 10 MB decoded.
    let (st, _, v) = post(&url, &json!({"code": "#".repeat(1_000_001)}), &[]).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "code_too_large");
    let six = STANDARD.encode(vec![7u8; 6_000_000]);
    let (st, _, v) = post(
        &url,
        &json!({"code": "print(1)", "files": {"a.bin": six, "b.bin": six}}),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "files_too_large");
    // A body declared past the route's limit is refused before a byte of
    // it is read (sent by hand: a client still writing it would see the
    // connection close under it).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = s.base.trim_start_matches("http://").to_owned();
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /api/x402/compute HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: 30000000\r\nconnection: close\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("body_too_large"), "{answer}");
    }
    assert_eq!(s.fac.state.verify_calls.load(Ordering::SeqCst), 0);

    // The quote: a longer timeout costs the per-second rate beyond 30 s.
    let (st, h, v) = post(
        &url,
        &json!({"code": "print(1)", "timeout_seconds": 90}),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(v["accepts"][0]["amount"], "5000", "{v}");
    assert_eq!(decoded_header(&h, "payment-required"), v);
    assert_eq!(v["error"], "PAYMENT-SIGNATURE header is required");
    assert!(v["extensions"]["bazaar"]["schema"].is_object());

    // 408: a loop past its 1 s timeout is stopped and not settled; its
    // output is withheld; the same authorization then pays for a run.
    let sig = payment(&url, 2000);
    let spin =
        json!({"code": "print('secret', flush=True)\nwhile True: pass", "timeout_seconds": 1});
    let (st, h, v) = post(&url, &spin, &[("payment-signature", sig.clone())]).await;
    assert_eq!(st, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_eq!(v["error"]["code"], "execution_timeout");
    assert!(!v.to_string().contains("secret"));
    assert!(!h.contains_key("payment-response"));
    assert_eq!(s.settled(), 0);
    let (st, h, v) = post(
        &url,
        &json!({"code": "print(1)"}),
        &[("payment-signature", sig.clone())],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(h.contains_key("payment-response"));
    assert_eq!(s.settled(), 1);

    // The settled authorization again: refused, nothing settled.
    let (st, h, v) = post(
        &url,
        &json!({"code": "print(1)"}),
        &[("payment-signature", sig)],
    )
    .await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(v["error"], "invalid_exact_evm_nonce_already_used");
    assert!(h.contains_key("payment-required"));
    assert_eq!(s.settled(), 1);

    // A non-zero exit is a 200, and is paid for.
    let (st, _, v) = post(
        &url,
        &json!({"code": "import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)"}),
        &[("payment-signature", payment(&url, 2000))],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["exit_code"].as_i64(), v["stderr"].as_str()),
        (Some(3), Some("bad\n"))
    );
    assert_eq!(s.settled(), 2);

    // x402 v2 only: a v1 payment is refused with the v2 challenge.
    let v1 = PayParams::new(PAY_TO, 2000).x402_v1(&signing::key(ANVIL0));
    let (st, h, v) = post(&url, &json!({"code": "print(1)"}), &[("x-payment", v1)]).await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(v["x402Version"], 2);
    assert!(h.contains_key("payment-required"));
    // An underpaying authorization is refused.
    let (st, _, v) = post(
        &url,
        &json!({"code": "print(1)", "timeout_seconds": 90}),
        &[("payment-signature", payment(&url, 2000))],
    )
    .await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(s.settled(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_pay_the_exact_price() {
    if !sandbox_available() {
        return;
    }
    let s = start(&pay_to(), &[]).await;
    let url = s.url();
    let wallet = "0x4000000000000000000000000000000000000004";
    let key = funded_api_key(&s.db, wallet, "1");
    let balance = || async {
        let r = reqwest::Client::new()
            .get(format!("{}/compute/credits/balance", s.base))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        (
            v["balance_micros"].as_u64().unwrap(),
            v["held_micros"].as_u64(),
        )
    };
    // 60 s on small: 2000 + 30 × 50.
    let (st, h, v) = post(
        &url,
        &json!({"code": "print('paid by credits')", "timeout_seconds": 60}),
        &[("x-api-key", key.clone())],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["stdout"], "paid by credits\n");
    assert!(!h.contains_key("payment-response"));
    let (b, held) = balance().await;
    assert_eq!(b, 1_000_000 - 3_500);
    assert_eq!(held.unwrap_or(0), 0);
    // A timeout takes nothing.
    let (st, _, v) = post(
        &url,
        &json!({"code": "while True: pass", "timeout_seconds": 1}),
        &[("x-api-key", key.clone())],
    )
    .await;
    assert_eq!(st, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_eq!(balance().await.0, 1_000_000 - 3_500);
    // A wallet signature pays from the same credits.
    let body = json!({"code": "print(2)"});
    let bytes = serde_json::to_vec(&body).unwrap();
    let k = signing::key(ANVIL1);
    let signer = format!("{:#x}", signing::address(&k));
    crate::grid_support::sgl_ok(&[
        "coordinator",
        "credits",
        "grant",
        "--wallet",
        &signer,
        "--amount",
        "0.001",
        "--database-url",
        &s.db,
    ]);
    let now_ms = i64::try_from(signing::unix_now() * 1000).unwrap();
    let mut req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(bytes.clone());
    for (n, v) in signing::xauth_headers(
        &k,
        "POST",
        "/api/x402/compute",
        &bytes,
        now_ms,
        "exec-credits-1",
    ) {
        req = req.header(n, v);
    }
    let r = req.send().await.unwrap();
    // 0.001 USD is short of the 0.002 a run costs.
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
    assert_eq!(v["shortfall_micros"], 1_000);
    assert_eq!(s.settled(), 0);
}

/// `sgl compute ARGS`; its exit status, stdout and stderr.
fn sgl_compute(base: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SGL)
        .args(["compute", "--url", base])
        .args(args)
        .env_remove("COMPUTE_API_KEY")
        .env_remove("SGL_WALLET_KEY_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sgl_compute_run_end_to_end() {
    if !sandbox_available() {
        return;
    }
    let s = start(&pay_to(), &[]).await;
    let d = s.dir.path();
    let wallet = d.join("wallet.key");
    std::fs::write(&wallet, ANVIL0).unwrap();
    let prog = d.join("prog.py");
    std::fs::write(
        &prog,
        "import os, sys\nos.makedirs('out', exist_ok=True)\n\
         open('out/r.txt', 'w').write(open('in.txt').read().upper())\n\
         print('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(5)\n",
    )
    .unwrap();
    let input = d.join("input.txt");
    std::fs::write(&input, "hello").unwrap();
    let out_dir = d.join("results");
    let (code, stdout, stderr) = sgl_compute(
        &s.base,
        &[
            "run",
            prog.to_str().unwrap(),
            "--file",
            &format!("in.txt={}", input.display()),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--wallet-key-file",
            wallet.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 5, "{stdout}\n{stderr}");
    assert_eq!(stdout, "to stdout\n");
    assert!(stderr.contains("to stderr"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("out/r.txt")).unwrap(),
        "HELLO"
    );
    assert_eq!(s.settled(), 1);

    // Node.js, paid from credits with an API key.
    let key = funded_api_key(&s.db, "0x5000000000000000000000000000000000000005", "1");
    let js = d.join("prog.js");
    std::fs::write(&js, "console.log([1, 2, 3].map(x => x * 2).join(','))\n").unwrap();
    let (code, stdout, stderr) = sgl_compute(
        &s.base,
        &[
            "run",
            "--stack",
            "node",
            js.to_str().unwrap(),
            "--pay",
            "credits",
            "--api-key",
            &key,
        ],
    );
    assert_eq!((code, stdout.as_str()), (0, "2,4,6\n"), "{stderr}");
    // A timeout exits 124 and costs nothing.
    let spin = d.join("spin.py");
    std::fs::write(&spin, "while True: pass\n").unwrap();
    let (code, _, stderr) = sgl_compute(
        &s.base,
        &[
            "run",
            spin.to_str().unwrap(),
            "--timeout",
            "1",
            "--wallet-key-file",
            wallet.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 124, "{stderr}");
    assert_eq!(s.settled(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_resources_and_proves_ownership() {
    if !sandbox_available() {
        return;
    }
    let payee = signing::key(PAYEE_KEY);
    let payee_addr = signing::address(&payee);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("payee.key");
    std::fs::write(&key_file, PAYEE_KEY).unwrap();
    let public = "https://exec.example.test";
    let s = start(
        &format!("{payee_addr:#x}"),
        &[
            "--ownership-key-file",
            key_file.to_str().unwrap(),
            "--public-url",
            public,
        ],
    )
    .await;
    let v: Value = reqwest::get(format!("{}/.well-known/x402", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], 1);
    let resources: Vec<&str> = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        resources,
        [
            "https://exec.example.test/api/x402/compute",
            "https://exec.example.test/v1/chat/completions"
        ]
    );
    let md = v["instructions"].as_str().unwrap();
    assert!(md.starts_with("# "), "{md}");
    assert!(md.contains("/api/x402/compute"));
    let proofs = v["ownershipProofs"].as_array().unwrap();
    assert_eq!(proofs.len(), 1);
    let signer =
        sgl::payments::evm::recover_personal(public.as_bytes(), proofs[0].as_str().unwrap())
            .unwrap();
    assert_eq!(signer, payee_addr);
    // The 402 names the same payee the proof does.
    let (st, _, c) = post(&s.url(), &json!({"code": "print(1)"}), &[]).await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        c["resource"]["url"],
        "https://exec.example.test/api/x402/compute"
    );
    assert_eq!(
        c["accepts"][0]["payTo"].as_str().unwrap().to_lowercase(),
        format!("{payee_addr:#x}")
    );

    // A key that is not the pay-to key, and a missing bwrap, stop the
    // server at start with a message naming them.
    let fac = facilitator::start().await;
    let db = dir.path().join("other.db");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, ANVIL0).unwrap();
    let work = tempfile::tempdir().unwrap();
    for (extra, says) in [
        (
            vec!["--ownership-key-file", wrong.to_str().unwrap()],
            "not of the pay-to wallet",
        ),
        (vec!["--code-exec-bwrap", "/nonexistent/bwrap"], "bwrap"),
    ] {
        let mut args = serve_args(
            db.to_str().unwrap(),
            free_port(),
            &format!("{payee_addr:#x}"),
            &fac.url,
            work.path(),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(SGL).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(says), "{err}");
    }
}

/// The host's primary non-loopback address of a family: the source address
/// the host's routes pick towards a public address (a UDP "connect" sends
/// nothing). None where the host has no such route.
fn host_address(v6: bool) -> Option<std::net::IpAddr> {
    let (bind, to) = if v6 {
        ("[::]:0", "[2606:4700:4700::1111]:53")
    } else {
        ("0.0.0.0:0", "1.1.1.1:53")
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

// Linux errno values, as the sandboxed Python reports them.
const EPERM: i32 = 1;
const EACCES: i32 = 13;
const ENETUNREACH: i32 = 101;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Python for the egress test: each connection attempt as the errno it met
/// (0 when it connected), the answers to route and rule changes sent over
/// rtnetlink, and DNS.
const EGRESS_PROBE: &str = r#"
import json, socket, struct
targets = json.loads(TARGETS)
def connect(h, p):
    fam = socket.AF_INET6 if ':' in h else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(4)
    try:
        s.connect((h, p))
        return 0
    except socket.timeout:
        return 'timeout'
    except OSError as e:
        return e.errno
    finally:
        s.close()
def netlink(msg_type, body):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    s.bind((0, 0))
    # NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    s.send(struct.pack('=IHHII', 16 + len(body), msg_type, 0x1 | 0x4 | 0x400, 1, 0) + body)
    data = s.recv(65536)
    return -struct.unpack('=i', data[16:20])[0]
# RTM_NEWROUTE 10.0.0.0/8 via lo in the main table.
route = struct.pack('=BBBBBBBBI', socket.AF_INET, 8, 0, 0, 254, 3, 0, 1, 0) \
    + struct.pack('=HH4s', 8, 1, bytes([10, 0, 0, 0])) + struct.pack('=HHI', 8, 4, 1)
# RTM_DELRULE of the rule that prohibits 10.0.0.0/8 (priority 200).
rule = struct.pack('=BBBBBBBBI', socket.AF_INET, 8, 0, 0, 0, 0, 0, 8, 0) \
    + struct.pack('=HH4s', 8, 1, bytes([10, 0, 0, 0])) + struct.pack('=HHI', 8, 6, 200)
out = {'new_route': netlink(24, route), 'del_rule': netlink(33, rule)}
for name, (h, p) in targets.items():
    out[name] = connect(h, p)
try:
    out['dns'] = socket.getaddrinfo('pypi.org', 443, socket.AF_INET)[0][4][0]
except OSError as e:
    out['dns'] = str(e)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_out_but_never_the_host_or_private_ranges() {
    if !sandbox_available() {
        return;
    }
    if !Path::new("/usr/bin/pasta").exists() {
        assert!(
            std::env::var("SGL_REQUIRE_SANDBOX").as_deref() != Ok("1"),
            "SGL_REQUIRE_SANDBOX=1 but pasta is missing (apt install passt)"
        );
        eprintln!("skipping: no pasta (apt install passt)");
        return;
    }
    let s = start(&pay_to(), &["--code-exec-network", "egress"]).await;
    let url = s.url();
    let own: u16 = s.base.rsplit(':').next().unwrap().parse().unwrap();
    // A listener of the host on every address, IPv4 and IPv6: whatever
    // reaches the host's addresses would land here.
    let trap4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = trap4.local_addr().unwrap().port();
    let trap6 = std::net::TcpListener::bind(format!("[::]:{port}")).ok();
    for t in std::iter::once(&trap4).chain(trap6.as_ref()) {
        t.set_nonblocking(true).unwrap();
    }
    let mut targets = serde_json::Map::new();
    let mut add = |name: &str, host: String, p: u16| {
        targets.insert(name.into(), json!([host, p]));
    };
    add("postgres", "127.0.0.1".into(), 5432);
    add("own_loopback", "127.0.0.1".into(), own);
    add("trap_loopback", "127.0.0.1".into(), port);
    add("trap_v6_loopback", "::1".into(), port);
    add("own_v6_loopback", "::1".into(), own);
    // A private address: the host's resolver on this kind of host, else
    // any; prohibited whether or not something answers there.
    add("private", "10.255.255.53".into(), 53);
    add("private_172", "172.16.0.1".into(), 80);
    add("private_192", "192.168.0.1".into(), 80);
    add("link_local_metadata", "169.254.169.254".into(), 80);
    add("ula_v6", "fd00::1".into(), 80);
    let host4 = host_address(false);
    let host6 = host_address(true);
    for (tag, a) in [("v4", host4), ("v6", host6)] {
        if let Some(a) = a {
            add(&format!("own_host_{tag}"), a.to_string(), own);
            add(&format!("trap_host_{tag}"), a.to_string(), port);
        }
    }
    // A public address: routed out through pasta (connected where the host
    // has internet, refused or timed out where it has not; never refused
    // by a rule).
    add("public", "1.1.1.1".into(), 443);
    let targets = Value::Object(targets).to_string();
    let code = format!("TARGETS = {targets:?}\n{EGRESS_PROBE}");
    let (st, _, v) = post(
        &url,
        &json!({"code": code}),
        &[("payment-signature", payment(&url, 2000))],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    let out: Value = serde_json::from_str(v["stdout"].as_str().unwrap().trim()).unwrap();
    eprintln!("egress probe: {out}");

    // The code holds no CAP_NET_ADMIN over its namespace.
    assert_eq!(out["new_route"], EPERM, "{out}");
    assert_eq!(out["del_rule"], EPERM, "{out}");
    // Prohibited by a rule (EACCES), so never sent at all.
    for k in [
        "private",
        "private_172",
        "private_192",
        "link_local_metadata",
        "ula_v6",
    ] {
        assert_eq!(out[k], EACCES, "{k}: {out}");
    }
    // The loopback and the host's own addresses are the namespace's own
    // (nothing listens there) or prohibited: refused either way.
    for (k, r) in out.as_object().unwrap() {
        if k.starts_with("own_") || k.starts_with("trap_") || k == "postgres" {
            assert!(*r == ECONNREFUSED || *r == EACCES, "{k}: {out}");
        }
    }
    for t in std::iter::once(&trap4).chain(trap6.as_ref()) {
        assert!(t.accept().is_err(), "the sandbox reached the host: {out}");
    }
    // The public address was routed: not prohibited, not unroutable.
    assert!(
        ![EACCES, ENETUNREACH, EHOSTUNREACH, EPERM]
            .iter()
            .any(|e| out["public"] == *e),
        "{out}"
    );
    // DNS goes through the host's resolver: a name the host resolves, the
    // sandbox resolves.
    use std::net::ToSocketAddrs as _;
    if ("pypi.org", 443).to_socket_addrs().is_ok() {
        assert!(
            out["dns"]
                .as_str()
                .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok()),
            "{out}"
        );
    }
    assert_eq!(s.settled(), 1);

    // The server stays up and the next run is normal; its namespace is gone
    // after it.
    let (st, _, v) = post(
        &url,
        &json!({"code": "print(6 * 7)"}),
        &[("payment-signature", payment(&url, 2000))],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["stdout"], "42\n", "{v}");
    let pid = s._proc.0.id();
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("sgl-egress-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}
