//! A loopback TCP load balancer for the replica tests, as any HTTP load
//! balancer in front of coordinator replicas would be: each connection goes
//! to the next backend in turn, skipping those that refuse it; a node's
//! WebSocket (`GET …/ws?…`) goes to the first backend of the list that
//! accepts, as a balancer with sticky sockets would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub struct Balancer {
    pub base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// Listen on a free loopback port in front of `ports`.
    pub async fn start(ports: Vec<u16>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let ports = Arc::new(ports);
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (ports, next) = (ports.clone(), next.clone());
                tokio::spawn(async move {
                    let first = if is_websocket(&client).await {
                        0
                    } else {
                        next.fetch_add(1, Ordering::Relaxed)
                    };
                    pipe(client, &ports, first).await;
                });
            }
        });
        Balancer { base, task }
    }
}

/// Whether the connection opens with a WebSocket request of a node.
async fn is_websocket(client: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    for _ in 0..100 {
        let n = client.peek(&mut buf).await.unwrap_or(0);
        let head = &buf[..n];
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&head[..end]);
            return line.starts_with("GET ") && line.contains("/ws?");
        }
        if n == buf.len() || n == 0 {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Join `client` to the first backend from `first` on that accepts.
async fn pipe(mut client: TcpStream, ports: &[u16], first: usize) {
    for i in 0..ports.len() {
        let port = ports[(first + i) % ports.len()];
        let Ok(Ok(mut backend)) = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            continue;
        };
        let _ = backend.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
        return;
    }
}
