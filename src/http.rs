//! What the project's HTTP servers share: one accept loop with the limits
//! every public server needs (PROTOCOL.md §7f).
//!
//! - **Header-read and idle timeout.** A connection must deliver a whole
//!   request head within [`ServerLimits::header_read_timeout`] of opening, and
//!   a kept-alive one within the same time of its last response (the same
//!   hyper timer runs while a connection waits for its next request), or it
//!   is closed.
//! - **Slow bodies.** A request body not fully received within
//!   [`ServerLimits::body_read_timeout`] of its head fails the request (400)
//!   and the connection is closed.
//! - **Connection limit.** At most [`ServerLimits::max_connections`] are
//!   served at once, by default the process's open-file limit less
//!   [`FD_HEADROOM`], so `accept` never fails for want of a descriptor. When
//!   the limit is reached and another client connects, the oldest connection
//!   that has not yet sent a request is closed to make room; with none such,
//!   new connections wait in the listen backlog.
//!
//! HTTP/1.1 only (no h2c): the timeouts above are HTTP/1's.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Request;
use axum::Router;
use http_body::Frame;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower::ServiceExt;

/// Descriptors kept free beside the connections: the store, log files,
/// outgoing connections (facilitator, key servers), upgraded WebSockets
/// (which leave the connection count once upgraded) and the listener.
pub const FD_HEADROOM: usize = 256;
/// Never fewer connections than this, whatever the file limit.
const MIN_CONNECTIONS: usize = 32;

/// The limits of one server. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: default_max_connections(),
        }
    }
}

/// The soft open-file limit (`RLIMIT_NOFILE`) of this process, when it can
/// be read (Linux: `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&text)
}

/// The soft limit of the `Max open files` row; `None` when unlimited.
fn parse_open_files(limits: &str) -> Option<u64> {
    let row = limits.lines().find(|l| l.starts_with("Max open files"))?;
    row["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The open-file limit less [`FD_HEADROOM`] (at least 32); 65,536 less the
/// headroom when there is no limit to read. With systemd's
/// `LimitNOFILE=65536` that is 65,280 connections.
pub fn default_max_connections() -> usize {
    let files = open_file_limit().unwrap_or(65_536);
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    files.saturating_sub(FD_HEADROOM).max(MIN_CONNECTIONS)
}

/// The peer address of the connection a request came on (set by [`serve`];
/// absent for a router driven without a socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Extracts the [`PeerAddr`], or `None`.
#[derive(Debug, Clone, Copy)]
pub struct MaybePeer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for MaybePeer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(MaybePeer(parts.extensions.get::<PeerAddr>().map(|p| p.0)))
    }
}

/// The request body failed to arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body timed out")]
pub struct BodyTimeout;

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One accepted connection, as the accept loop sees it.
struct Conn {
    /// Set at its first request: from then on it is never shed.
    served: AtomicBool,
    shed: Notify,
}

/// Connections that have not sent a request yet, oldest first.
#[derive(Default)]
struct Fresh {
    next: u64,
    conns: BTreeMap<u64, Arc<Conn>>,
}

/// Serve `app` on `listener` with `limits` until `shutdown` resolves, then
/// finish the requests in flight. `TCP_NODELAY` is set on every socket:
/// replies, SSE chunks and WebSocket pushes are small writes that must leave
/// at once (with Nagle's algorithm they stalled about 40 ms under load).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let fresh = Arc::new(Mutex::new(Fresh::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(
        max_connections = max,
        header_read_timeout_s = limits.header_read_timeout.as_secs_f64(),
        body_read_timeout_s = limits.body_read_timeout.as_secs_f64(),
        "serving"
    );
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a connection reset before accept:
                // wait a little rather than spin, and go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing the oldest connection that has
                // sent nothing yet (an idle or slow-header one), or wait.
                let victim = {
                    let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
                    f.conns.pop_first().map(|(_, c)| c)
                };
                match victim {
                    Some(c) => c.shed.notify_one(),
                    None => tracing::warn!(max, "connection limit reached"),
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let conn = Arc::new(Conn {
            served: AtomicBool::new(false),
            shed: Notify::new(),
        });
        let id = {
            let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
            f.next += 1;
            let id = f.next;
            f.conns.insert(id, conn.clone());
            id
        };
        let task = ConnTask {
            app: app.clone(),
            limits,
            conn,
            id,
            fresh: fresh.clone(),
            stop: stop_rx.clone(),
        };
        tokio::spawn(async move {
            task.run(tcp, peer).await;
            drop(permit);
        });
    }
    // Stop: every connection finishes its request in flight and closes.
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

struct ConnTask {
    app: Router,
    limits: ServerLimits,
    conn: Arc<Conn>,
    id: u64,
    fresh: Arc<Mutex<Fresh>>,
    stop: watch::Receiver<bool>,
}

impl ConnTask {
    async fn run(mut self, tcp: TcpStream, peer: SocketAddr) {
        let app = self.app.clone();
        let conn = self.conn.clone();
        let fresh = self.fresh.clone();
        let id = self.id;
        let body_timeout = self.limits.body_read_timeout;
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            if !conn.served.swap(true, Ordering::Relaxed) {
                let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
                f.conns.remove(&id);
            }
            let deadline = Box::pin(tokio::time::sleep(body_timeout));
            let mut req = req.map(|inner| {
                Body::new(TimedBody {
                    inner: Body::new(inner),
                    deadline,
                })
            });
            req.extensions_mut().insert(PeerAddr(peer));
            app.clone().oneshot(req)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true);
        let served = builder
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let mut served = std::pin::pin!(served);
        let mut stopping = false;
        loop {
            tokio::select! {
                r = served.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    break;
                }
                _ = self.conn.shed.notified() => {
                    tracing::debug!(%peer, "idle connection closed to make room");
                    break;
                }
                changed = self.stop.changed(), if !stopping => {
                    stopping = true;
                    if changed.is_err() || *self.stop.borrow() {
                        served.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        let mut f = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        f.conns.remove(&self.id);
    }
}

/// An error response that is not JSON (axum's own: 404, 405, a body limit)
/// in the OpenAI error shape; anything else as it is. The OpenAI-compatible
/// servers (the node's local server, `sgl proxy`) map every response
/// through it, so a client's SDK can always parse an error.
pub async fn openai_json_edge(resp: axum::response::Response) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (kind, code) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("invalid_request_error", "method_not_allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("invalid_request_error", "unsupported_media_type"),
        StatusCode::NOT_FOUND => ("invalid_request_error", "not_supported"),
        s if s.is_server_error() => ("server_error", "internal_error"),
        _ => ("invalid_request_error", "invalid_request"),
    };
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    let body = crate::proto::openai::ErrorResponse::new(message, kind, code);
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_read() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(parse_open_files(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files(unlimited), None);
    }

    #[test]
    fn the_connection_limit_stays_under_the_file_limit() {
        let max = default_max_connections();
        if let Some(files) = open_file_limit() {
            assert!(
                max as u64 + FD_HEADROOM as u64
                    <= files.max(MIN_CONNECTIONS as u64 + FD_HEADROOM as u64)
            );
        }
        assert!(max >= MIN_CONNECTIONS);
    }
}
