//! A short disk-full under a SQLite coordinator: its database lives on a
//! small tmpfs of the test's own, which the test fills. Paid requests then
//! fail cleanly (a 5xx with a JSON error body, money exact); once space is
//! freed the next paid requests succeed, without a restart (the store drops
//! a connection a failed COMMIT left inside a transaction).
//!
//! Mounting needs root (or CAP_SYS_ADMIN): skipped with a message when the
//! mount is refused, unless SGL_REQUIRE_CHAOS=1.
#![cfg(all(feature = "coordinator", feature = "node", target_os = "linux"))]

use crate::grid_support;
use crate::ledger;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use grid_support::{
    funded_api_key, node_init, node_start, wait_online, CoordinatorProc, MODEL, OPERATOR,
};
use serde_json::{json, Value};
use sgl::money::Micros;

const PAYER: &str = "0x8888888888888888888888888888888888888888";

/// A tmpfs mounted for this test; unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount `size` of tmpfs at `dir`; `None` (with a message) when mounting
    /// is not permitted, or a failed test under SGL_REQUIRE_CHAOS=1.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                if std::env::var("SGL_REQUIRE_CHAOS").as_deref() == Ok("1") {
                    panic!("SGL_REQUIRE_CHAOS=1 but a tmpfs cannot be mounted: {why}");
                }
                eprintln!("skipping the disk-full test: cannot mount a tmpfs: {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system holding `path` until a write fails.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 16 * 1024];
    loop {
        if f.write_all(&block).and_then(|_| f.sync_data()).is_err() {
            break;
        }
    }
    // Whatever partial block fit is left in place: not one byte is free.
}

/// One paid request: its status and JSON body (`Null` when not JSON).
async fn paid(base: &str, key: &str) -> (u16, Option<String>, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    (status, ct, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_recovers_from_a_full_disk_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_disk) = Tmpfs::mount(&mnt, "8m") else {
        return;
    };
    let db = mnt.join("coordinator.db");
    let db = db.to_str().unwrap();
    let key = funded_api_key(db, PAYER, "10");
    let deposited = Micros(10_000_000);

    let coordinator = CoordinatorProc::start(&["--database-url", db, "--hold-lease", "2"]);
    let base = coordinator.base.clone();
    let nd = dir.path().join("node");
    let nd = nd.to_str().unwrap();
    node_init(nd, &base, OPERATOR);
    let _node = node_start(nd, &["--engine", "echo"], Stdio::null());
    wait_online(&base, Duration::from_secs(60)).await;
    for _ in 0..3 {
        let (status, _, v) = paid(&base, &key).await;
        assert_eq!(status, 200, "{v}");
    }

    // The disk fills: paid requests fail, each with a 5xx JSON error.
    let filler = mnt.join("filler");
    fill(&filler);
    let mut failed = 0;
    for _ in 0..500 {
        let (status, ct, v) = paid(&base, &key).await;
        if status == 200 {
            continue;
        }
        assert!(status >= 500, "{status}: {v}");
        assert_eq!(ct.as_deref(), Some("application/json"), "{status}: {v}");
        assert!(v["error"]["message"].is_string(), "{status}: {v}");
        failed += 1;
        if failed >= 20 {
            break;
        }
    }
    assert!(failed > 0, "the full disk never failed a request");

    // Space comes back: the next paid requests succeed, no restart.
    std::fs::remove_file(&filler).unwrap();
    for i in 0..10 {
        let (status, _, v) = paid(&base, &key).await;
        assert_eq!(status, 200, "request {i} after the disk was freed: {v}");
    }

    // And the money is exact.
    let store = ledger::open(db).await;
    ledger::wait_no_open_holds(&store, Duration::from_secs(60)).await;
    let billed = ledger::audit(&store, PAYER, deposited).await;
    assert!(billed >= 13, "only {billed} jobs billed");
    store.close().await;
    drop(coordinator);
}
