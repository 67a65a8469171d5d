//! A coordinator replica cut off from PostgreSQL (a TCP relay between it
//! and the database, [`Relay`]) while a stream runs on it and its node's
//! WebSocket is held by it; a second replica keeps its database:
//!
//! - within a lease the cut replica answers every call 503
//!   `replica_unavailable` (a JSON error body), `/health` included;
//! - it closes its node's WebSocket, and the node attaches to the other
//!   replica (through a balancer with health checks), which then serves
//!   it;
//! - the stream open on it ends (it does not hang);
//! - the relay restored, the replica takes its lease again and work with
//!   it, without a restart;
//! - the ledger is exact: no hold left, every settled hold with its usage
//!   row, the balance down by exactly the usage rows, and no job billed
//!   whose stream did not finish.
//!
//! Skipped without PostgreSQL unless SGL_REQUIRE_POSTGRES=1.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::grid_support;
use crate::ledger;
use crate::replicas::{
    attached_elsewhere, echo_node, log_paths, postgres_with_key, replica_with, session,
    stream_body, wait_online_at, Logs,
};

use std::time::{Duration, Instant};

use grid_support::balancer::Balancer;
use grid_support::free_port;
use grid_support::relay::Relay;
use serde_json::Value;
use sgl::money::Micros;

const PAYER: &str = "0x8989898989898989898989898989898989898989";

/// One streamed chat on `base`: Ok when it finished with `[DONE]`, else
/// what came back.
async fn stream(http: &reqwest::Client, base: &str, key: &str, node: &str) -> Result<(), String> {
    let one = async {
        let resp = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&stream_body(node))
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
    tokio::time::timeout(Duration::from_secs(30), one)
        .await
        .unwrap_or_else(|_| Err("hung for 30 s".into()))
}

/// The status and JSON body of `GET|POST base+path`.
async fn call(http: &reqwest::Client, post: bool, url: &str, key: &str) -> (u16, Value) {
    let req = if post {
        http.post(url)
            .bearer_auth(key)
            .json(&serde_json::json!({"model": grid_support::MODEL,
                "messages": [{"role": "user", "content": "hi"}]}))
    } else {
        http.get(url)
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Whether replica `id` holds a live lease.
fn leased(db: &str, id: &str) -> bool {
    let out = std::process::Command::new("psql")
        .args([
            db,
            "-tA",
            "-c",
            &format!(
                "SELECT lease_until > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT \
                 FROM grid_replicas WHERE id = '{id}'"
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "t"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_a_replica_that_loses_the_database_stops_taking_work() {
    let dir = tempfile::tempdir().unwrap();
    let Some((db, key)) = postgres_with_key("replicaloss", dir.path(), PAYER) else {
        return;
    };
    let url = db.url.clone();
    // The same database through the relay: postgres://user@HOST:PORT/name.
    let (head, name) = url.rsplit_once('/').unwrap();
    let (scheme_user, hostport) = head.rsplit_once('@').unwrap();
    let relay = Relay::start(hostport).await;
    let relayed = format!("{scheme_user}@127.0.0.1:{}/{name}", relay.port);
    let deposited = Micros(100_000_000);
    let logs = log_paths(dir.path(), &["cut", "kept", "node"]);
    let _dump = Logs(logs.clone());

    // Replica A reaches the database through the relay, B directly.
    let ports = [free_port(), free_port()];
    let _a = replica_with(ports[0], &relayed, &logs[0], &[]);
    let _b = replica_with(ports[1], &url, &logs[1], &[]);
    let [a, b] = ports.map(|p| format!("http://127.0.0.1:{p}"));
    // The node's socket goes to A while A is healthy.
    let lb = Balancer::start_checked(vec![ports[0], ports[1]]).await;
    let (_node, node) = echo_node(&dir.path().join("n"), &lb.base, &logs[2]);
    wait_online_at(&[a.clone(), b.clone()], 1).await;
    let (holder_a, attached) = session(&url, &node).expect("the node has a replica");
    assert!(attached, "the node is attached");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut finished = 0;
    for base in [&a, &b, &a, &b] {
        stream(&http, base, &key, &node).await.unwrap();
        finished += 1;
    }

    // Cut A's database while a stream runs on it.
    let open = {
        let (http, a, key, node) = (http.clone(), a.clone(), key.clone(), node.clone());
        tokio::spawn(async move { stream(&http, &a, &key, &node).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut_at = Instant::now();
    relay.cut();

    // A refuses work within a lease: 503 replica_unavailable, JSON.
    loop {
        let (status, _) = call(&http, false, &format!("{a}/health"), &key).await;
        if status == 503 {
            break;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(5),
            "the cut replica still answers /health {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the cut replica failed /health {:?} after the cut",
        cut_at.elapsed()
    );
    for (post, path) in [
        (true, "/v1/chat/completions"),
        (false, "/v1/models"),
        (false, "/health"),
    ] {
        let (status, body) = call(&http, post, &format!("{a}{path}"), &key).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(
            body["error"]["code"], "replica_unavailable",
            "{path}: {body}"
        );
    }

    // The stream open on A ended, one way or the other.
    let cut_stream = open.await.unwrap();
    eprintln!("the stream open at the cut: {cut_stream:?}");
    if cut_stream.is_ok() {
        finished += 1;
    }

    // The node left A and attached to B, which serves it.
    let moved = attached_elsewhere(&url, &node, &holder_a, cut_at, Duration::from_millis(50)).await;
    eprintln!("the node attached to the other replica {moved:?} after the cut");
    let start = Instant::now();
    loop {
        match stream(&http, &b, &key, &node).await {
            Ok(()) => break,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "the other replica cannot serve the node: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finished += 1;

    // Restored, A takes its lease and work again, without a restart.
    relay.restore();
    let restored = Instant::now();
    loop {
        let (status, _) = call(&http, false, &format!("{a}/health"), &key).await;
        if status == 200 && leased(&url, &holder_a) {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "the replica did not come back once its database did"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the replica took work again {:?} after the restore",
        restored.elapsed()
    );
    let start = Instant::now();
    loop {
        match stream(&http, &a, &key, &node).await {
            Ok(()) => break,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "the restored replica cannot serve the node held by the other: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finished += 1;

    // The ledger: A's hold lapses or settles; nothing unfinished is billed.
    let store = ledger::open(&url).await;
    ledger::wait_no_open_holds(&store, Duration::from_secs(60)).await;
    let billed = ledger::audit(&store, PAYER, deposited).await;
    // Every finished stream was billed before its answer went out; the cut
    // one only if its settlement committed just as the link went down.
    let cut_unfinished = usize::from(cut_stream.is_err());
    assert!(
        finished <= billed && billed <= finished + cut_unfinished,
        "{billed} jobs billed, {finished} streams finished"
    );
    store.close().await;
}
