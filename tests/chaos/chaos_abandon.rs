//! Abandoned work: 100 streams whose clients leave after the first chunk
//! and 100 WebSockets opened with the node's token and dropped. The slots
//! come back, the node keeps its own socket and its work, and every slot
//! serves again afterwards.
#![cfg(all(feature = "coordinator", unix))]

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chaos_grid::{on_each_store, plain_chat, post_chat, read_until, EchoGrid};
use crate::grid_support::providers;

/// One stream, left after its first chunk; retried while every slot is busy.
async fn abandon_one(http: reqwest::Client, base: String) {
    let start = Instant::now();
    loop {
        let mut resp = post_chat(&http, &base, &plain_chat(200, true)).await;
        if resp.status() == 503 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no slot came free"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(resp.status(), 200);
        read_until(&mut resp, "\"content\"").await;
        return;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_and_sockets_free_their_slots() {
    on_each_store("abandon", abandoned_streams_and_sockets_free_their_slots_on).await;
}

async fn abandoned_streams_and_sockets_free_their_slots_on(db: String) {
    let grid = EchoGrid::start(
        &db,
        &[],
        &["--max-batch", "8", "--echo-token-delay-ms", "20"],
    )
    .await;
    let http = reqwest::Client::new();
    // 100 streams, four at a time, each left after its first chunk.
    for _ in 0..(100 / 4) {
        let round: Vec<_> = (0..4)
            .map(|_| tokio::spawn(abandon_one(http.clone(), grid.base.clone())))
            .collect();
        for r in round {
            r.await.unwrap();
        }
    }
    // 100 WebSockets with the node's token, dropped without a word.
    let (node_id, token) = grid.node_credentials();
    let url = format!(
        "{}/grid/nodes/{node_id}/ws?auth_token={token}",
        grid.base.replacen("http://", "ws://", 1)
    );
    let mut sockets = Vec::new();
    for _ in 0..100 {
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        sockets.push(ws);
    }
    drop(sockets);
    // The slots come back once the node hears its clients left.
    let start = Instant::now();
    loop {
        let v: Value = providers(&grid.base).await;
        let p = &v["providers"][0];
        if p["online"] == true && p["load"].as_f64() == Some(0.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slots still taken: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every slot serves again, at once.
    let all: Vec<_> = (0..8)
        .map(|_| {
            let http = http.clone();
            let base = grid.base.clone();
            tokio::spawn(async move {
                post_chat(&http, &base, &plain_chat(4, false))
                    .await
                    .status()
            })
        })
        .collect();
    for a in all {
        assert_eq!(a.await.unwrap(), 200);
    }
}
