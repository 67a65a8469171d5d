//! What the project's HTTP servers share.

use std::net::SocketAddr;

use axum::serve::{Listener, ListenerExt};
use tokio::net::{TcpListener, TcpStream};

/// `listener` with Nagle's algorithm off on every accepted socket. Replies,
/// SSE chunks and WebSocket job pushes are small writes that must leave at
/// once: with Nagle's algorithm on, a write waiting for the peer's delayed
/// ACK stalled requests by about 40 ms under load. A socket that refuses the
/// option still serves, only slower.
pub fn no_delay(listener: TcpListener) -> impl Listener<Io = TcpStream, Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}
