//! What a node's sockets, heartbeats and a client's reservations may do to
//! the coordinator (PROTOCOL.md §6.5, §6.6, §7f), against an in-process
//! coordinator and a node that speaks the wire protocol from the test:
//! a closed WebSocket is taken as the node's death at once; a stray socket
//! opened with the node's token and closed again leaves its pushes in place;
//! heartbeat claims are bounded; reservations take no slot and are capped
//! per client.
#![cfg(feature = "coordinator")]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sgl::coordinator::Config;
use sgl::node::jobs::{self, StreamChunks};
use sgl::proto::api::{PendingJob, WsMessage};
use sgl::proto::openai::{FinishReason, Usage};
use tokio_tungstenite::tungstenite::Message;

use crate::coordinator_flow::{chat, dev, plain_body, reserve, start, TestNode};
use crate::grid_support::MODEL;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open the node's WebSocket with its token and read the hello.
async fn socket(node: &TestNode) -> Socket {
    let url = format!(
        "{}/grid/nodes/{}/ws?auth_token={}",
        node.base.replacen("http://", "ws://", 1),
        node.node_id,
        node.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"), "{hello:?}");
    ws
}

/// The next job pushed on `ws`.
async fn pushed(ws: &mut Socket) -> PendingJob {
    loop {
        let frame = ws.next().await.expect("socket open").unwrap();
        if let Message::Text(t) = frame {
            if let Ok(WsMessage::Job { job }) = serde_json::from_str::<WsMessage>(&t) {
                return job;
            }
        }
    }
}

/// Answer a non-stream job in full over REST.
async fn complete(node: &TestNode, job: &PendingJob, text: &str) {
    let chat_job = jobs::parse_job(&node.id, job, true).unwrap();
    let body = jobs::complete_body(
        &node.id,
        &chat_job,
        text,
        Usage::new(9, 1),
        FinishReason::Stop,
    )
    .unwrap();
    let r = node
        .post(
            &format!("/grid/jobs/{}/complete", job.id),
            &serde_json::to_value(&body).unwrap(),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_socket_fails_the_nodes_jobs_at_once_and_stops_routing() {
    let base = start(dev()).await;
    let node = TestNode::join(&base).await;
    let mut ws = socket(&node).await;
    let client = tokio::spawn(chat(base.clone(), plain_body(true)));
    let job = tokio::time::timeout(Duration::from_secs(10), pushed(&mut ws))
        .await
        .expect("the job is pushed");
    let chat_job = jobs::parse_job(&node.id, &job, true).unwrap();
    let mut chunks = StreamChunks::new(&node.id, &chat_job).unwrap();
    assert!(chunks.push_token("Hello").unwrap().is_none());
    let first = chunks.flush().unwrap().unwrap();
    let r = node
        .post(
            &format!("/grid/jobs/{}/chunk", job.id),
            &serde_json::to_value(&first).unwrap(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut resp = client.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while !seen.contains("Hello") {
        let c = resp.chunk().await.unwrap().expect("the first chunk");
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    // The node dies: its socket closes without a word, the job is still
    // running and the node's heartbeats are not yet missed.
    drop(ws);
    let rest = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(c) = resp.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&c));
        }
        seen
    })
    .await
    .expect("the client hears of the node's death within 3 s");
    assert!(rest.contains("event: error"), "{rest}");
    assert!(!rest.contains("[DONE]"), "{rest}");
    // And the dead node takes no new work.
    let r = reserve(&base, json!({"model": MODEL})).await;
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"], json!([]));
    // It comes back when it connects again.
    let _ws = socket(&node).await;
    let r = reserve(&base, json!({"model": MODEL})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_socket_closing_leaves_the_node_its_pushes() {
    let base = start(dev()).await;
    let node = TestNode::join(&base).await;
    let mut real = socket(&node).await;
    // Someone with the node's token opens a socket and closes it again.
    let mut stray = socket(&node).await;
    stray.close(None).await.unwrap();
    while stray.next().await.is_some() {}
    drop(stray);
    // Jobs still reach the node's own socket, at once (the node here never
    // polls: it heartbeated once, when it joined).
    let client = tokio::spawn(chat(base.clone(), plain_body(false)));
    let job = tokio::time::timeout(Duration::from_secs(5), pushed(&mut real))
        .await
        .expect("the job is pushed to the node's socket");
    complete(&node, &job, "Paris.").await;
    assert_eq!(client.await.unwrap().status(), 200);
    // The open socket is still the node's sign of life: not taken for dead.
    let r = reserve(&base, json!({"model": MODEL})).await;
    assert_eq!(r.status(), 200);
    real.send(Message::Close(None)).await.unwrap();
}

#[tokio::test]
async fn heartbeat_claims_are_bounded() {
    let base = start(Config {
        max_node_slots: 3,
        ..dev()
    })
    .await;
    let node = TestNode::join(&base).await;
    let hb = |models: Value, slots: u64| {
        json!({"current_load": 0.0, "available_models": models,
               "encryption_public_key": node.id.x25519_public().to_b58(),
               "encryption_public_key_signature": node.keybind(), "key_version": 1,
               "capabilities": {"streaming": true, "context_size": 8192},
               "active_job_ids": [], "max_concurrent_jobs": slots})
    };
    // More than 64 models: refused, in the node error shape.
    let many: Vec<String> = (0..65).map(|i| format!("model-{i}")).collect();
    let r = node
        .post("/grid/nodes/heartbeat", &hb(json!(many), 1))
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "too_many_models");
    // Models outside the catalogue are dropped; 2^32 − 1 slots are clamped.
    let mut claimed = vec![MODEL.to_string()];
    claimed.extend((0..40).map(|i| format!("garbage-{i}")));
    let r = node
        .post(
            "/grid/nodes/heartbeat",
            &hb(json!(claimed), u64::from(u32::MAX)),
        )
        .await;
    assert_eq!(r.status(), 200);
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL]);
    let r = reserve(&base, json!({"model": "garbage-1"})).await;
    assert_eq!(r.status(), 404);
    // Three slots, whatever was claimed: a fourth job waits for none.
    let waiting: Vec<_> = (0..3)
        .map(|_| tokio::spawn(chat(base.clone(), plain_body(false))))
        .collect();
    let mut offered = 0;
    while offered < 3 {
        let v: Value = node
            .post(
                "/grid/nodes/heartbeat",
                &hb(json!([MODEL]), u64::from(u32::MAX)),
            )
            .await
            .json()
            .await
            .unwrap();
        offered = v["pending_jobs"].as_array().unwrap().len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = chat(base.clone(), plain_body(false)).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_capacity");
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn reservations_take_no_slot_and_are_capped_per_client() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;
    // Two slots; sixteen reservations (the per-client cap) all succeed:
    // a reservation holds no slot.
    for _ in 0..16 {
        let r = reserve(&base, json!({"model": MODEL})).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["expires_in_ms"], 10_000);
    }
    // The seventeenth is over the cap: 429 with Retry-After.
    let r = reserve(&base, json!({"model": MODEL})).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_reservations");
    // A paying client is still served while the reservations live.
    let client = tokio::spawn(chat(base.clone(), plain_body(false)));
    node.serve(&["Paris", "."]).await;
    assert_eq!(client.await.unwrap().status(), 200);
}
