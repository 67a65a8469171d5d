//! A loopback TCP load balancer for the replica tests, as any HTTP load
//! balancer in front of coordinator replicas would be: each connection goes
//! to the next backend in turn, skipping those that refuse it; a node's
//! WebSocket (`GET …/ws?…`) goes to the first backend of the list that
//! accepts, as a balancer with sticky sockets would. Started with
//! [`Balancer::start_checked`], it also probes each backend's `/health` and
//! skips those that fail it (a replica that lost its database), as a
//! balancer with health checks would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
        Self::start_with(ports, false).await
    }

    /// [`Balancer::start`], skipping backends whose `/health` fails.
    pub async fn start_checked(ports: Vec<u16>) -> Balancer {
        Self::start_with(ports, true).await
    }

    async fn start_with(ports: Vec<u16>, checked: bool) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let up: Arc<Vec<AtomicBool>> =
            Arc::new(ports.iter().map(|_| AtomicBool::new(true)).collect());
        let ports = Arc::new(ports);
        let next = Arc::new(AtomicUsize::new(0));
        let probe = checked.then(|| {
            let (ports, up) = (ports.clone(), up.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_millis(500))
                    .build()
                    .unwrap();
                loop {
                    for (i, port) in ports.iter().enumerate() {
                        let ok = http
                            .get(format!("http://127.0.0.1:{port}/health"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        up[i].store(ok, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let task = tokio::spawn(async move {
            let _probe = probe.map(Aborted);
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (ports, next, up) = (ports.clone(), next.clone(), up.clone());
                tokio::spawn(async move {
                    let first = if is_websocket(&client).await {
                        0
                    } else {
                        next.fetch_add(1, Ordering::Relaxed)
                    };
                    pipe(client, &ports, &up, first).await;
                });
            }
        });
        Balancer { base, task }
    }
}

/// A task aborted with its owner.
struct Aborted(tokio::task::JoinHandle<()>);

impl Drop for Aborted {
    fn drop(&mut self) {
        self.0.abort();
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

/// Join `client` to the first backend from `first` on that accepts, of
/// those up (of all, when none is).
async fn pipe(mut client: TcpStream, ports: &[u16], up: &[AtomicBool], first: usize) {
    let any_up = up.iter().any(|u| u.load(Ordering::SeqCst));
    for i in 0..ports.len() {
        let k = (first + i) % ports.len();
        if any_up && !up[k].load(Ordering::SeqCst) {
            continue;
        }
        let port = ports[k];
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
