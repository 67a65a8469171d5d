//! The grid as an operator and a client run it: real `sgl` processes on
//! loopback — `coordinator serve --dev`, `node init`, `node start`, `chat`,
//! `node status|off-grid|on-grid`, SIGTERM, and `node service install`.
//! The node runs the echo load-test engine here; the real model is exercised
//! by the engine and grid end-to-end tests.
#![cfg(all(feature = "coordinator", unix))]

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SGL: &str = env!("CARGO_BIN_EXE_sgl");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sgl(args: &[&str]) -> Output {
    Command::new(SGL).args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn sigterm(p: &Child) {
    let r = Command::new("kill")
        .args(["-TERM", &p.id().to_string()])
        .status()
        .unwrap();
    assert!(r.success());
}

#[test]
fn operator_and_client_commands_end_to_end() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _coord = Proc(
        Command::new(SGL)
            .args([
                "coordinator",
                "serve",
                "--dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat-interval",
                "1",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(sgl(&[
        "node",
        "init",
        "--config-dir",
        d,
        "--wallet",
        "0x1111111111111111111111111111111111111111",
        "--coordinator",
        &base,
    ]));
    let mut node = Proc(
        Command::new(SGL)
            .args([
                "node",
                "start",
                "--config-dir",
                d,
                "--engine",
                "echo",
                "--heartbeat-interval",
                "1",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the node to be active", || {
        let out = sgl(&["node", "status", "--config-dir", d, "--json"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"active\"")
    });

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
