//! Idle and slow sockets: with the coordinator's open-file limit at 1,024,
//! 1,100 idle connections neither stop it accepting nor cost a normal client
//! its answer or the node its heartbeats; a connection that sends half a
//! request head, one kept alive and idle, and one whose body trickles are
//! each closed after their timeout.
#![cfg(all(feature = "coordinator", unix))]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::chaos_grid::{
    coordinator_with_file_limit, on_each_store, plain_chat, post_chat, EchoGrid,
};
use crate::grid_support::providers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_the_file_limit_leave_clients_served() {
    on_each_store(
        "sockets",
        idle_sockets_past_the_file_limit_leave_clients_served_on,
    )
    .await;
}

async fn idle_sockets_past_the_file_limit_leave_clients_served_on(db: String) {
    // A header timeout far longer than the test: only the connection limit
    // keeps the coordinator accepting.
    let coordinator = coordinator_with_file_limit(
        1024,
        &["--database-url", &db, "--header-read-timeout", "600"],
    );
    let grid = EchoGrid::with(coordinator, &[]).await;
    let addr = grid.base.trim_start_matches("http://").to_string();
    let mut idle = Vec::with_capacity(1100);
    for _ in 0..1100 {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
            .await
            .expect("connect stalled")
            .unwrap();
        idle.push(tcp);
    }
    // A normal client, on a new connection, is answered.
    let http = reqwest::Client::new();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        post_chat(&http, &grid.base, &plain_chat(4, false)),
    )
    .await
    .expect("the normal client was not served");
    assert_eq!(r.status(), 200);
    // The node's heartbeats still arrive: online after three intervals.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let v = providers(&grid.base).await;
    assert_eq!(v["providers"][0]["online"], true, "{v}");
    let r = post_chat(&http, &grid.base, &plain_chat(4, false)).await;
    assert_eq!(r.status(), 200);
    drop(idle);
}

/// Everything `tcp` receives until the server closes it; `None` if it is
/// still open after `wait`.
async fn until_closed(tcp: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    on_each_store("slow", slow_and_idle_connections_are_closed_on).await;
}

async fn slow_and_idle_connections_are_closed_on(db: String) {
    let grid = EchoGrid::start(
        &db,
        &["--header-read-timeout", "2", "--body-read-timeout", "2"],
        &[],
    )
    .await;
    let addr = grid.base.trim_start_matches("http://").to_string();
    let wait = Duration::from_secs(10);

    // Half a request head, then nothing.
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut half, wait)
        .await
        .expect("a half-sent head was not cut off");

    // A kept-alive connection, idle after its answer.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = until_closed(&mut kept, wait)
        .await
        .expect("an idle kept-alive connection was not closed");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // A body that trickles: the request fails (JSON) and the connection closes.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let text = until_closed(&mut slow, wait)
        .await
        .expect("a trickling body was not cut off");
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );

    // Served as ever meanwhile.
    let http = reqwest::Client::new();
    let r = post_chat(&http, &grid.base, &plain_chat(4, false)).await;
    assert_eq!(r.status(), 200);
}
