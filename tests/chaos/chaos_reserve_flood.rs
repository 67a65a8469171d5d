//! A reservation flood: anonymous clients reserve every slot of an 8-slot
//! node and more. Reservations hold no slot (a slot is taken when a chat
//! call claims one), so a paying client, an API key with credits, is still
//! served; past the per-client cap the flood is answered 429
//! `too_many_reservations` with `Retry-After`.
#![cfg(all(feature = "coordinator", unix))]

use serde_json::{json, Value};

use crate::chaos_grid::{on_each_store, plain_chat, EchoGrid};
use crate::grid_support::{funded_api_key, CoordinatorProc, MODEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_flood_leaves_paying_clients_served() {
    on_each_store("flood", flood_on).await;
}

async fn flood_on(db: String) {
    let db = db.as_str();
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

/// Behind a reverse proxy (PROTOCOL.md §7f): with `--trusted-proxy` (here
/// from SGL_TRUSTED_PROXIES, comma-separated), requests from the proxy are
/// counted per X-Forwarded-For client, so two clients behind it get a cap
/// each; a peer that is not a trusted proxy (127.0.0.2 on loopback) is
/// counted as itself whatever X-Forwarded-For it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_trusted_proxy_get_a_cap_each_and_spoofing_gains_nothing() {
    use crate::grid_support::{free_port, wait_until, Proc, SGL};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    // A bad block stops the start, naming it.
    let out = Command::new(SGL)
        .args(["coordinator", "serve", "--dev", "--in-memory", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--trusted-proxy", "10.0.0.0/33"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.0.0.0/33"), "{err}");

    const CAP: usize = 3;
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let proc = Proc(
        Command::new(SGL)
            .args([
                "coordinator",
                "serve",
                "--dev",
                "--in-memory",
                "--listen",
                &listen,
            ])
            .args(["--heartbeat-interval", "1", "--max-reservations-per-client"])
            .arg(CAP.to_string())
            .env("SGL_TRUSTED_PROXIES", "10.0.0.0/8,127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let coordinator = CoordinatorProc {
        base: format!("http://127.0.0.1:{port}"),
        proc,
    };
    let grid = EchoGrid::with(coordinator, &[]).await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let (proxy, stranger) = (from("127.0.0.1"), from("127.0.0.2"));
    let reserve = |http: &reqwest::Client, xff: String| {
        let r = http
            .post(format!("{}/v1/reserve", grid.base))
            .header("x-forwarded-for", xff)
            .json(&json!({"model": MODEL}))
            .send();
        async move { r.await.unwrap().status().as_u16() }
    };
    // Two clients behind the proxy (one behind a second, trusted hop):
    // a cap each.
    for client in ["198.51.100.1", "198.51.100.2, 10.9.9.9"] {
        for i in 0..CAP {
            assert_eq!(
                reserve(&proxy, client.to_string()).await,
                200,
                "{client} #{i}"
            );
        }
        assert_eq!(reserve(&proxy, client.to_string()).await, 429, "{client}");
    }
    // An untrusted peer naming a new client each time: one cap, its own.
    for i in 0..CAP {
        assert_eq!(reserve(&stranger, format!("203.0.113.{i}")).await, 200);
    }
    assert_eq!(reserve(&stranger, "203.0.113.99".into()).await, 429);
    // Nor can it pose as a client of the proxy.
    assert_eq!(reserve(&stranger, "198.51.100.9".into()).await, 429);
    // The proxy's own requests without the header count as the proxy.
    assert_eq!(reserve(&proxy, String::new()).await, 200);
}
