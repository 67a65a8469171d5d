//! A node SIGKILLed mid-stream: its client hears `event: error` within 3 s,
//! long before the node's heartbeats are missed (15 s here), because its
//! closed WebSocket is taken as its death; and the node takes no new work.
//! The echo engine pauses 50 ms before each of 400 tokens, so the stream
//! is certain to be running when the first chunk arrives and the kill lands.
#![cfg(all(feature = "coordinator", unix))]

use std::time::{Duration, Instant};

use serde_json::json;

use crate::chaos_grid::{on_each_store, plain_chat, post_chat, read_until, EchoGrid};
use crate::grid_support::{providers, MODEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_fails_its_client_within_three_seconds() {
    on_each_store(
        "nodekill",
        a_node_killed_mid_stream_fails_its_client_within_three_seconds_on,
    )
    .await;
}

async fn a_node_killed_mid_stream_fails_its_client_within_three_seconds_on(db: String) {
    let mut grid = EchoGrid::start(
        &db,
        &["--missed-heartbeats", "15"],
        // The node sends a few tokens, then holds the job open until it is
        // cancelled: the answer cannot finish before the kill, however
        // slowly its first chunk travels on a loaded machine.
        &["--echo-stall-after", "8"],
    )
    .await;
    let http = reqwest::Client::new();
    let mut resp = post_chat(&http, &grid.base, &plain_chat(400, true)).await;
    assert_eq!(resp.status(), 200, "node log:\n{}", grid.node_log());
    let seen = read_until(&mut resp, "\"content\"").await;
    assert!(!seen.contains("[DONE]"), "finished before the kill: {seen}");
    grid.node.0.kill().unwrap();
    let killed = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(3), async {
        let mut rest = String::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => rest.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => break,
                // Kept in the text, so that a stream cut without its
                // error event says how it ended.
                Err(e) => {
                    rest.push_str(&format!("\n[read error: {e:?}]"));
                    break;
                }
            }
        }
        rest
    })
    .await
    .expect("no error within 3 s of the kill");
    assert!(rest.contains("event: error"), "{rest}");
    assert!(!rest.contains("[DONE]"), "{rest}");
    eprintln!("client error {:?} after the kill", killed.elapsed());
    // The dead node is no longer offered work, heartbeats not yet missed.
    let v = providers(&grid.base).await;
    assert_eq!(v["providers"][0]["online"], false, "{v}");
    let r = http
        .post(format!("{}/v1/reserve", grid.base))
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let _ = grid.node.0.wait();
}
