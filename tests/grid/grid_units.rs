//! The shipped systemd units (`systemd/`): each one's `ExecStart` command
//! line, read from the unit, runs with the unit's `Environment=` lines and
//! the environment file it names (the template shipped beside it), with
//! system paths moved into a temp dir, and serves; and each scores at most
//! 2.0 in `systemd-analyze security --offline=true`. Without
//! systemd-analyze the scoring is skipped with a message, unless
//! SGL_REQUIRE_SYSTEMD=1.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::engine_support;
use crate::grid_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use grid_support::{free_port, sgl_ok, wait_until, Proc, OPERATOR, SGL};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(Path::new(UNITS).join(name)).unwrap()
}

/// The `KEY=value` lines of the unit's `[Service]` section, in order.
fn service_lines(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn one(lines: &[(String, String)], key: &str) -> String {
    let v: Vec<_> = lines.iter().filter(|(k, _)| k == key).collect();
    assert_eq!(v.len(), 1, "one {key}= line expected");
    v[0].1.clone()
}

/// `NAME=value` lines of an environment file (comments and blanks skipped).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A unit as a child process: its ExecStart with the binary under test, its
/// environment (Environment= lines, then the environment file) with every
/// path in `moves` replaced, and nothing inherited but PATH.
struct Launch {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

fn launch(
    unit_name: &str,
    env_template: &str,
    moves: &[(&str, String)],
    extra: &[(&str, String)],
) -> Launch {
    let unit = unit_text(unit_name);
    let lines = service_lines(&unit);
    let subst = |s: &str| {
        moves
            .iter()
            .fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
    };
    let exec = one(&lines, "ExecStart").replace("@SGL_BIN@", SGL);
    let argv: Vec<String> = exec.split_whitespace().map(String::from).collect();
    assert_eq!(argv[0], SGL, "{exec}");
    let mut env = BTreeMap::new();
    for (_, v) in lines.iter().filter(|(k, _)| k == "Environment") {
        let (name, value) = v.split_once('=').unwrap();
        env.insert(name.to_string(), subst(value));
    }
    // The environment file the unit names; a leading `-` makes it optional.
    let named = one(&lines, "EnvironmentFile");
    let path = named.trim_start_matches('-');
    assert!(path.starts_with("/etc/sgl/"), "{named}");
    let shipped = Path::new(UNITS).join(env_template);
    let text = std::fs::read_to_string(&shipped)
        .unwrap_or_else(|e| panic!("{} beside the unit: {e}", shipped.display()));
    for (k, v) in env_file(&text) {
        env.insert(k, subst(&v));
    }
    for (k, v) in extra {
        env.insert(k.to_string(), v.clone());
    }
    Launch { argv, env }
}

impl Launch {
    fn spawn(&self, home: &Path) -> Proc {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Proc(c.spawn().unwrap())
    }
}

/// `GET /health` answers 200 `ok` (plain HTTP/1.1 on loopback).
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_units_start_as_shipped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let state = root.join("var/lib/sgl-coordinator");
    std::fs::create_dir_all(&state).unwrap();

    // The coordinator: as shipped (billing off), listening where the test
    // says instead of 0.0.0.0:8080.
    let coord = launch(
        "sgl-coordinator.service",
        "sgl-coordinator.env",
        &[
            ("/var/lib/sgl-coordinator", state.display().to_string()),
            ("0.0.0.0:8080", format!("127.0.0.1:{port}")),
        ],
        &[],
    );
    assert_eq!(
        coord.env.get("SGL_NO_BILLING").map(String::as_str),
        Some("true")
    );
    let _coord = coord.spawn(root);
    wait_until(
        "the shipped coordinator to serve /health",
        Duration::from_secs(60),
        || health(port),
    );
    // Its store is where the unit's state directory says.
    assert!(state.join("coordinator.db").exists());
    // Billing off: a chat is refused, not served free.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": grid_support::MODEL,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status().as_u16(), 200);

    // The node: initialised once as the unit's comment says, invited by the
    // coordinator's operator, then started by its ExecStart.
    let Some(model) = engine_support::model_path() else {
        return;
    };
    let model_dir = model.parent().unwrap().display().to_string();
    let node_dir = root.join("var/lib/sgl-node");
    let db = state.join("coordinator.db").display().to_string();
    let code = sgl_ok(&[
        "coordinator",
        "nodes",
        "invite",
        "--wallet",
        OPERATOR,
        "--database-url",
        &db,
    ]);
    sgl_ok(&[
        "node",
        "init",
        "--config-dir",
        node_dir.to_str().unwrap(),
        "--wallet",
        OPERATOR,
        "--coordinator",
        &base,
    ]);
    let node = launch(
        "sgl-node.service",
        "sgl-node.env",
        &[
            ("/var/lib/sgl-node", node_dir.display().to_string()),
            ("/var/cache/sgl/models", model_dir),
            (
                "/var/cache/sgl",
                root.join("var/cache/sgl").display().to_string(),
            ),
        ],
        &[("SGL_REGISTRATION_CODE", code.trim().to_string())],
    );
    let _node = node.spawn(root);
    grid_support::wait_online(&base, Duration::from_secs(180)).await;
}

fn systemd_analyze() -> Option<PathBuf> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("systemd-analyze"));
    }
    if std::env::var("SGL_REQUIRE_SYSTEMD").as_deref() == Ok("1") {
        panic!(
            "SGL_REQUIRE_SYSTEMD=1 but systemd-analyze is not installed (apt-get install systemd)"
        );
    }
    eprintln!("skipping: systemd-analyze is not installed (apt-get install systemd)");
    None
}

#[test]
fn shipped_units_score_at_most_2_in_systemd_analyze_security() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["sgl-coordinator.service", "sgl-node.service"] {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            unit_text(name).replace("@SGL_BIN@", "/usr/local/bin/sgl"),
        )
        .unwrap();
        let out = Command::new(&tool)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| {
                panic!(
                    "no score for {name}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unreadable score line {line:?}"));
        eprintln!("{name}: {score}");
        assert!(score <= 2.0, "{name} scores {score} (> 2.0):\n{text}");
    }
}
