//! A reservation flood: anonymous clients reserve every slot of an 8-slot
//! node and more. Reservations hold no slot (a slot is taken when a chat
//! call claims one), so a paying client, an API key with credits, is still
//! served; past the per-client cap the flood is answered 429
//! `too_many_reservations` with `Retry-After`.
#![cfg(all(feature = "coordinator", unix))]

use serde_json::{json, Value};

use crate::chaos_grid::{plain_chat, EchoGrid};
use crate::grid_support::{funded_api_key, CoordinatorProc, MODEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_flood_leaves_paying_clients_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flood.db");
    let db = db.to_str().unwrap();
    let key = funded_api_key(db, "0x3333333333333333333333333333333333333333", "1");
    let coordinator = CoordinatorProc::start(&["--database-url", db]);
    let grid = EchoGrid::with(coordinator, &["--max-batch", "8"]).await;
    let http = reqwest::Client::new();
    let reserve = || async {
        http.post(format!("{}/v1/reserve", grid.base))
            .json(&json!({"model": MODEL}))
            .send()
            .await
            .unwrap()
    };
    // Every slot and twice over, from one anonymous client: all granted,
    // none holding a slot.
    for _ in 0..16 {
        let r = reserve().await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["expires_in_ms"].as_u64().unwrap() <= 10_000);
    }
    let r = reserve().await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_reservations");
    // The paying client is served, eight times over: every slot is free.
    let paid = (0..8).map(|_| {
        let http = http.clone();
        let base = grid.base.clone();
        let key = key.clone();
        tokio::spawn(async move {
            http.post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&plain_chat(4, false))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    for p in paid.collect::<Vec<_>>() {
        assert_eq!(p.await.unwrap(), 200);
    }
}
