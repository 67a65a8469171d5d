//! Three coordinator replicas (`--replica`) on one PostgreSQL database
//! behind a load balancer ([`Balancer`]), two echo nodes whose WebSockets
//! are held by different replicas, paying streaming clients on every
//! replica and through the balancer, each asking for both nodes (so most
//! jobs cross replicas). One replica is SIGKILLed under that load:
//!
//! - the streams open on it end with an error (none hangs);
//! - every stream on the two other replicas finishes, those of the killed
//!   replica's node included, and so does every request made through the
//!   balancer after the kill;
//! - the killed replica's node is attached to another replica within two
//!   heartbeats;
//! - the ledger is exact: no hold left, each settled hold with its usage
//!   row, the balance down by exactly the sum of the usage rows; the
//!   killed replica's unsettled jobs are not billed at all (a job it
//!   settled just before the kill may have lost its last bytes).
//!
//! Skipped without PostgreSQL unless SGL_REQUIRE_POSTGRES=1.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::grid_support;
use crate::ledger;
use crate::pay_common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grid_support::balancer::Balancer;
use grid_support::{
    free_port, funded_api_key, node_init, node_start, providers, spawn_sgl, wait_until, Proc,
    MODEL, OPERATOR,
};
use serde_json::{json, Value};
use sgl::money::Micros;

const PAYER: &str = "0x8888888888888888888888888888888888888888";
/// The heartbeat interval of the replicas and nodes.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Looping clients: spread over the three replicas and the balancer.
const CLIENTS: usize = 24;

/// Prints the tail of each process log when the test fails.
pub(crate) struct Logs(pub(crate) Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.0 {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("==== {} (last 60 lines)\n{tail}", p.display());
        }
    }
}

fn replica(port: u16, db: &str, log: &Path) -> Proc {
    replica_with(port, db, log, &[])
}

/// A replica on `port` over database `db`, with `extra` arguments.
pub(crate) fn replica_with(port: u16, db: &str, log: &Path, extra: &[&str]) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "coordinator",
        "serve",
        "--dev",
        "--replica",
        "--listen",
        &listen,
        "--heartbeat-interval",
        "1",
        "--database-url",
        db,
        "--hold-lease",
        "2",
    ];
    args.extend_from_slice(extra);
    let p = spawn_sgl(&args, Stdio::from(File::create(log).unwrap()));
    wait_until("a replica to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

/// An echo node in `dir` for `base`; its process and id.
pub(crate) fn echo_node(dir: &Path, base: &str, log: &Path) -> (Proc, String) {
    let d = dir.to_str().unwrap();
    node_init(d, base, OPERATOR);
    let args = [
        "--engine",
        "echo",
        "--max-batch",
        "64",
        "--echo-token-delay-ms",
        "20",
    ];
    let p = node_start(d, &args, Stdio::from(File::create(log).unwrap()));
    let file = dir.join("node.json");
    wait_until("the node to register", Duration::from_secs(60), || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["node_id"].is_string())
    });
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    (p, v["node_id"].as_str().unwrap().to_string())
}

/// The PostgreSQL database of `tag` (replicas need one: `None`, with a
/// message, without it; dropped with the value) and an API key of `payer`
/// funded with 100 USD.
pub(crate) fn postgres_with_key(
    tag: &str,
    dir: &Path,
    payer: &str,
) -> Option<(pay_common::stores::CliDatabase, String)> {
    let Some(db) = pay_common::stores::cli_databases(tag, dir)
        .into_iter()
        .find(|d| d.backend == "postgres")
    else {
        eprintln!("skipping: no PostgreSQL");
        return None;
    };
    let key = funded_api_key(&db.url, payer, "100");
    Some((db, key))
}

/// One log file in `dir` for each of `names`.
pub(crate) fn log_paths(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| dir.join(format!("{n}.log"))).collect()
}

/// Wait (at most 60 s) until each of `bases` lists `n` providers online.
pub(crate) async fn wait_online_at(bases: &[String], n: usize) {
    let start = Instant::now();
    for base in bases {
        loop {
            let v = providers(base).await;
            let online = v["providers"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p["online"] == true).count());
            if online == n {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "nodes not online at {base}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Wait (at most 30 s after `since`, looking every `poll`) until `node` is
/// attached to a replica other than `from`; how long after `since` it was.
pub(crate) async fn attached_elsewhere(
    db: &str,
    node: &str,
    from: &str,
    since: Instant,
    poll: Duration,
) -> Duration {
    loop {
        if let Some((holder, true)) = session(db, node) {
            if holder != from {
                return since.elapsed();
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{node} never attached to another replica"
        );
        tokio::time::sleep(poll).await;
    }
}

/// (replica id, attached) of `node` in the shared tables.
pub(crate) fn session(db: &str, node: &str) -> Option<(String, bool)> {
    let out = std::process::Command::new("psql")
        .args([
            db,
            "-tA",
            "-F",
            "|",
            "-c",
            &format!(
                "SELECT replica_id, attached FROM grid_node_sessions WHERE node_id = '{node}'"
            ),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (replica, attached) = text.trim().split_once('|')?;
    Some((replica.to_string(), attached == "t"))
}

pub(crate) fn stream_body(node: &str) -> Value {
    let text: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    json!({"model": MODEL, "node": node, "stream": true, "max_tokens": 64,
           "messages": [{"role": "user", "content": text.join(" ")}]})
}

/// One client request: where it went, when, and whether its stream finished.
#[derive(Debug, Clone)]
struct Outcome {
    target: usize,
    node: usize,
    started: Instant,
    ended: Instant,
    done: bool,
    /// Printed with the outcome when an assertion fails.
    #[allow(dead_code)]
    why: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_only_its_own_streams() {
    let dir = tempfile::tempdir().unwrap();
    let Some((db, key)) = postgres_with_key("replicas", dir.path(), PAYER) else {
        return;
    };
    let url = db.url.clone();
    let deposited = Micros(100_000_000);
    let logs = log_paths(dir.path(), &["r1", "r2", "r3", "node1", "node2"]);
    let _dump = Logs(logs.clone());

    let ports = [free_port(), free_port(), free_port()];
    let mut replicas: Vec<Option<Proc>> = ports
        .iter()
        .zip(&logs)
        .map(|(p, log)| Some(replica(*p, &url, log)))
        .collect();
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    // Node 1's socket sticks to replica 1, node 2's to replica 2; their
    // other calls and the clients' go round the three.
    let lb1 = Balancer::start(vec![ports[0], ports[1], ports[2]]).await;
    let lb2 = Balancer::start(vec![ports[1], ports[2], ports[0]]).await;
    let lb_clients = Balancer::start(vec![ports[2], ports[0], ports[1]]).await;
    let (_n1, node1) = echo_node(&dir.path().join("n1"), &lb1.base, &logs[3]);
    let (_n2, node2) = echo_node(&dir.path().join("n2"), &lb2.base, &logs[4]);
    let nodes = [node1.clone(), node2.clone()];

    // Both nodes routable from every replica.
    wait_online_at(&bases, 2).await;
    let (holder1, attached1) = session(&url, &node1).expect("node 1 has a replica");
    let (holder2, attached2) = session(&url, &node2).expect("node 2 has a replica");
    assert!(attached1 && attached2, "both nodes attached");
    assert_ne!(holder1, holder2, "the nodes are held by different replicas");

    // Clients: targets 0..3 are the replicas, 3 the balancer.
    let mut targets = bases.clone();
    targets.push(lb_clients.base.clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (target, node) = (i % 4, (i / 4) % 2);
        let (http, url, key, body) = (
            http.clone(),
            format!("{}/v1/chat/completions", targets[target]),
            key.clone(),
            stream_body(&nodes[node]),
        );
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let one = async {
                    let resp = http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    let status = resp.status();
                    let text = resp.text().await.map_err(|e| format!("read: {e}"))?;
                    if status == 200 && text.contains("[DONE]") {
                        Ok(())
                    } else {
                        Err(format!("{status}: {}", &text[..text.len().min(300)]))
                    }
                };
                let result = tokio::time::timeout(Duration::from_secs(30), one)
                    .await
                    .unwrap_or_else(|_| Err("hung for 30 s".into()));
                let refused = matches!(&result, Err(e) if e.starts_with("send"));
                outcomes.lock().unwrap().push(Outcome {
                    target,
                    node,
                    started,
                    ended: Instant::now(),
                    done: result.is_ok(),
                    why: result.err().unwrap_or_default(),
                });
                if refused && target < 3 {
                    // Its replica is gone: nothing more to ask it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }

    // Load up: every replica has streamed from both nodes.
    let start = Instant::now();
    loop {
        let done: Vec<(usize, usize)> = outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.done)
            .map(|o| (o.target, o.node))
            .collect();
        let every = (0..4).all(|t| (0..2).all(|n| done.contains(&(t, n))));
        if every && done.len() >= 60 {
            break;
        }
        let failed: Vec<Outcome> = outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| !o.done)
            .cloned()
            .collect();
        assert!(failed.is_empty(), "failures before the kill: {failed:?}");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "load never built up: {} streams done",
            done.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGKILL the replica holding node 1, mid-stream.
    let mut killed = replicas[0].take().unwrap();
    let kill_sent = Instant::now();
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    // Reaped: its sockets are closed from here on.
    let killed_at = Instant::now();
    drop(killed);

    // Node 1 attaches to another replica within two heartbeats.
    let reattached =
        attached_elsewhere(&url, &node1, &holder1, killed_at, Duration::from_millis(20)).await;
    eprintln!("node 1 attached to another replica {reattached:?} after the kill");
    assert!(
        reattached <= 2 * HEARTBEAT,
        "node 1 took {reattached:?} to attach to another replica"
    );

    // More load after the kill, then stop.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a client hung")
            .unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let on = |t: usize| outcomes.iter().filter(move |o| o.target == t);
    let open_at_kill = |o: &&Outcome| o.started < kill_sent && o.ended >= kill_sent;
    // The killed replica's open streams ended with an error.
    let cut: Vec<&Outcome> = on(0).filter(open_at_kill).collect();
    assert!(!cut.is_empty(), "no stream was open on the killed replica");
    let cut_failed = cut.iter().filter(|o| !o.done).count();
    assert!(cut_failed > 0, "no stream on the killed replica was cut");
    // Everything on the other replicas finished, before, at and after the kill.
    for t in [1, 2] {
        let failed: Vec<&Outcome> = on(t).filter(|o| !o.done).collect();
        assert!(failed.is_empty(), "replica {} failed: {failed:?}", t + 1);
        assert!(
            on(t).any(|o| o.node == 0 && o.started > killed_at + 2 * HEARTBEAT && o.done),
            "replica {} streamed nothing from node 1 after it moved",
            t + 1
        );
    }
    let after: Vec<&Outcome> = on(3).filter(|o| o.started > killed_at && !o.done).collect();
    assert!(
        after.is_empty(),
        "requests through the balancer failed after the kill: {after:?}"
    );
    let open = outcomes.iter().filter(open_at_kill).count();
    eprintln!(
        "{} requests, {open} open at the kill, {cut_failed} of {} cut on the killed replica",
        outcomes.len(),
        cut.len()
    );

    // The ledger: the killed replica's holds lapse, the others' return.
    let store = ledger::open(&url).await;
    ledger::wait_no_open_holds(&store, Duration::from_secs(60)).await;
    let billed = ledger::audit(&store, PAYER, deposited).await;
    // Every billed job was streamed to its client, but for a settlement
    // the killed replica committed just before its last bytes were sent.
    let finished = outcomes.iter().filter(|o| o.done).count();
    let cut_anywhere = outcomes
        .iter()
        .filter(open_at_kill)
        .filter(|o| !o.done)
        .count();
    assert!(
        billed <= finished + cut_anywhere,
        "{billed} jobs billed, {finished} streams finished, {cut_anywhere} cut"
    );
    store.close().await;
    drop(replicas);
}
