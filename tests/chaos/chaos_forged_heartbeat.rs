//! Forged heartbeats: a bad keybind signature, another node's token, no
//! token, and claims over the bounds (65 models, models outside the
//! catalogue, 2^32 − 1 slots). Each is refused in the node error shape or
//! clamped; the node keeps its published key and `/v1/models` lists only
//! real models.
#![cfg(all(feature = "coordinator", unix))]

use serde_json::{json, Value};
use sgl::proto::identity::{NodeId, NodeIdentity};

use crate::chaos_grid::{on_each_store, plain_chat, post_chat, EchoGrid};
use crate::grid_support::MODEL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_are_refused_or_clamped() {
    on_each_store("forged", forged_heartbeats_are_refused_or_clamped_on).await;
}

async fn forged_heartbeats_are_refused_or_clamped_on(db: String) {
    let grid = EchoGrid::start(&db, &["--max-node-slots", "8"], &[]).await;
    let (node_id, token) = grid.node_credentials();
    let http = reqwest::Client::new();
    let base = grid.base.clone();
    let heartbeat = |token: String, body: Value| {
        let http = http.clone();
        let base = base.clone();
        let node_id = node_id.clone();
        async move {
            let r = http
                .post(format!("{base}/grid/nodes/heartbeat"))
                .header("X-Node-Auth", token)
                .header("X-Node-Id", node_id)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            assert!(ct.starts_with("application/json"), "{status} {ct}");
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let published: Value = http
        .post(format!("{base}/v1/reserve"))
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // A key bound by someone else's signature.
    let other = NodeIdentity::generate();
    let nid = NodeId::parse(&node_id).unwrap();
    let forged = json!({"available_models": [MODEL], "active_job_ids": [], "max_concurrent_jobs": 1,
                        "encryption_public_key": other.x25519_public().to_b58(),
                        "encryption_public_key_signature": other.sign_keybind(&nid, 1).to_b58(),
                        "key_version": 1});
    let (status, v) = heartbeat(token.clone(), forged.clone()).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["code"], "bad_keybind");

    // Another node's token, and none at all.
    let reg: Value = http
        .post(format!("{base}/grid/nodes/register"))
        .json(
            &json!({"wallet_address": "0x4444444444444444444444444444444444444444",
                      "tee_type": "none", "available_models": [MODEL],
                      "public_key": other.ed25519_public().to_b58()}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (status, _) = heartbeat(reg["auth_token"].as_str().unwrap().into(), forged).await;
    assert_eq!(status, 401);
    let (status, _) = heartbeat(String::new(), json!({"available_models": [MODEL]})).await;
    assert_eq!(status, 401);

    // Over the bounds.
    let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
    let (status, v) = heartbeat(
        token.clone(),
        json!({"available_models": many, "active_job_ids": [], "max_concurrent_jobs": 1}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["code"], "too_many_models");
    let mut claimed = vec![MODEL.to_string()];
    claimed.extend((0..63).map(|i| format!("garbage-{i}")));
    let (status, _) = heartbeat(
        token.clone(),
        json!({"available_models": claimed, "active_job_ids": [], "max_concurrent_jobs": u32::MAX}),
    )
    .await;
    assert_eq!(status, 200);
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models["data"][0]["id"], MODEL);

    // The node's key is the one it published, and it still serves.
    let now: Value = http
        .post(format!("{base}/v1/reserve"))
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(now["node_x25519_pubkey"], published["node_x25519_pubkey"]);
    let r = post_chat(&http, &base, &plain_chat(4, false)).await;
    assert_eq!(r.status(), 200);
}
