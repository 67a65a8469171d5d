//! Shared by the grid tests: the real `sgl` binary as child processes on
//! loopback (a development coordinator, node agents, the CLI), the Python
//! clients, and waiting for a node to be routable. In-process coordinators
//! and agents are in [`in_process`]. Per-test databases are in
//! `pay_common::stores` (`cli_databases` for a coordinator process).
#![allow(dead_code)]

pub mod balancer;
#[cfg(feature = "coordinator")]
pub mod in_process;
pub mod relay;
pub mod schemathesis;

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SGL: &str = env!("CARGO_BIN_EXE_sgl");
/// The model every test node advertises (the echo engine answers to it too).
pub const MODEL: &str = "smollm2-135m";
/// The operator wallet of test nodes.
pub const OPERATOR: &str = "0x1111111111111111111111111111111111111111";

/// A loopback port that was free a moment ago, for a process that cannot be
/// handed a listener.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed (and reaped) on drop so a failing test leaves
/// nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `sgl ARGS` in the background; its stdout is discarded.
pub fn spawn_sgl(args: &[&str], stderr: Stdio) -> Proc {
    Proc(
        Command::new(SGL)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

/// Run `sgl ARGS` to completion.
pub fn sgl(args: &[&str]) -> Output {
    Command::new(SGL).args(args).output().unwrap()
}

/// The stdout of a command that must have succeeded; both streams otherwise.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `sgl ARGS`, which must succeed; its stdout.
pub fn sgl_ok(args: &[&str]) -> String {
    ok(sgl(args))
}

/// Poll `f` until it holds; fail the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn sigterm(p: &Child) {
    let r = Command::new("kill")
        .args(["-TERM", &p.id().to_string()])
        .status()
        .unwrap();
    assert!(r.success());
}

/// A grid of the real model: a development coordinator in memory and one
/// node serving [`MODEL`] with no evidence, online. Dropping it stops both
/// and removes the node's directory.
pub struct ModelGrid {
    pub coord: CoordinatorProc,
    pub node: Proc,
    pub dir: tempfile::TempDir,
}

impl ModelGrid {
    /// Start it and wait (up to three minutes: the model loads) until the
    /// node is online.
    pub async fn start(node_stderr: Stdio) -> ModelGrid {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let coord = CoordinatorProc::start(&["--in-memory"]);
        node_init(d, &coord.base, OPERATOR);
        let node = node_start(d, &["--model", MODEL, "--evidence", "none"], node_stderr);
        wait_online(&coord.base, Duration::from_secs(180)).await;
        ModelGrid { coord, node, dir }
    }
}

/// `sgl coordinator serve --dev` on a free loopback port, heartbeats every
/// second, plus `args` (the store: `--in-memory` or `--database-url`).
pub struct CoordinatorProc {
    pub base: String,
    pub proc: Proc,
}

impl CoordinatorProc {
    /// Start it and wait until it accepts connections.
    pub fn start(args: &[&str]) -> CoordinatorProc {
        Self::on_port(free_port(), args)
    }

    /// The same on a port chosen beforehand (for a node identity that must
    /// name the coordinator before it runs).
    pub fn on_port(port: u16, args: &[&str]) -> CoordinatorProc {
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec![
            "coordinator",
            "serve",
            "--dev",
            "--listen",
            &listen,
            "--heartbeat-interval",
            "1",
        ];
        all.extend_from_slice(args);
        let proc = spawn_sgl(&all, Stdio::null());
        wait_until("the coordinator to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        CoordinatorProc {
            base: format!("http://{listen}"),
            proc,
        }
    }
}

/// `sgl node init` in `dir` for the coordinator at `base`.
pub fn node_init(dir: &str, base: &str, wallet: &str) {
    sgl_ok(&[
        "node",
        "init",
        "--config-dir",
        dir,
        "--wallet",
        wallet,
        "--coordinator",
        base,
    ]);
}

/// `sgl node start` from `dir`, heartbeats every second, plus `args` (the
/// engine, the evidence).
pub fn node_start(dir: &str, args: &[&str], stderr: Stdio) -> Proc {
    let mut all = vec![
        "node",
        "start",
        "--config-dir",
        dir,
        "--heartbeat-interval",
        "1",
    ];
    all.extend_from_slice(args);
    spawn_sgl(&all, stderr)
}

/// Wait until `sgl node status` reports the node in `dir` active.
pub fn wait_node_active(dir: &str, timeout: Duration) {
    wait_until("the node to be active", timeout, || {
        let out = sgl(&["node", "status", "--config-dir", dir, "--json"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"active\"")
    });
}

/// `GET /v1/providers?model=MODEL`; `Null` when it cannot be had.
pub async fn providers(base: &str) -> Value {
    match reqwest::get(format!("{base}/v1/providers?model={MODEL}")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Whether a providers listing has a node that takes work.
pub fn any_online(providers: &Value) -> bool {
    providers["providers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["online"] == true))
}

/// Wait until a node serving MODEL is online at `base`; the listing then.
pub async fn wait_online(base: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = providers(base).await;
        if any_online(&v) {
            return v;
        }
        assert!(start.elapsed() < timeout, "no node came online at {base}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new API key for `wallet`, made with the real CLI in the
/// coordinator's database.
pub fn api_key(db: &str, wallet: &str) -> String {
    sgl_ok(&[
        "coordinator",
        "keys",
        "create",
        "--wallet",
        wallet,
        "--database-url",
        db,
    ])
    .trim()
    .to_string()
}

/// An API key for `wallet` holding `usd` of credits, made with the real CLI
/// in the coordinator's database.
pub fn funded_api_key(db: &str, wallet: &str, usd: &str) -> String {
    let key = api_key(db, wallet);
    sgl_ok(&[
        "coordinator",
        "credits",
        "grant",
        "--wallet",
        wallet,
        "--amount",
        usd,
        "--database-url",
        db,
    ]);
    key
}

/// `sgl coordinator credits balance` for `wallet`, as printed.
pub fn balance(db: &str, wallet: &str) -> String {
    sgl_ok(&[
        "coordinator",
        "credits",
        "balance",
        "--wallet",
        wallet,
        "--database-url",
        db,
    ])
}

/// The usage ledger's newest rows (`sgl coordinator usage`), one JSON each.
pub fn usage_rows(db: &str) -> Vec<Value> {
    sgl_ok(&["coordinator", "usage", "--database-url", db])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The Python the client tests run (SGL_PYTHON, default python3).
pub fn python() -> String {
    std::env::var("SGL_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Whether `modules` import: skipped with a message when not, unless
/// SGL_REQUIRE_PY_CLIENTS=1, which fails the test instead.
pub fn python_has(modules: &str) -> bool {
    let ok = Command::new(python())
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

/// Run `tests/py/SCRIPT ARGS`, which must succeed within five minutes; its
/// stdout (also printed).
pub async fn run_py(script: &str, args: &[&str]) -> String {
    run_py_with(script, args, &[]).await
}

/// [`run_py`] with extra environment variables.
pub async fn run_py_with(script: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(python())
            .arg(&path)
            .args(args)
            .envs(envs.iter().copied())
            .output(),
    )
    .await
    .expect("the script timed out")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    stdout
}
