//! The node WebSocket (PROTOCOL.md §6.6, §7e): `GET /grid/nodes/{id}/ws?auth_token=…`.
//! Jobs are pushed as `{"type":"job"}` the moment they are dispatched, and
//! every job still waiting for the node is pushed again on (re)connect. The
//! REST heartbeat keeps running beside it and stays the fallback.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::error::NodeApiError;
use super::state::{Grid, SocketLoss};
use crate::proto::api::{PendingJob, WsMessage};
use crate::proto::identity::NodeId;

/// Frames larger than this from a node are refused.
const MAX_FRAME_BYTES: usize = 1024 * 1024;

#[derive(Debug, serde::Deserialize)]
pub struct WsQuery {
    auth_token: Option<String>,
}

pub async fn upgrade(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, NodeApiError> {
    let node_id = NodeId::parse(&id).map_err(|_| NodeApiError::unauthorized())?;
    let token = q.auth_token.ok_or_else(NodeApiError::unauthorized)?;
    {
        let inner = grid.lock();
        if !grid.authenticate(&inner, &node_id, &token) {
            return Err(NodeApiError::unauthorized());
        }
    }
    Ok(ws
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(grid, node_id, socket)))
}

fn frame(msg: &WsMessage) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

async fn session(grid: Grid, node_id: NodeId, socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<PendingJob>();
    let (generation, waiting) = {
        let mut inner = grid.lock();
        let Some(generation) = inner.attach_socket(&node_id, tx) else {
            return;
        };
        (generation, inner.offered_to(&node_id))
    };
    tracing::info!(%node_id, generation, "node WebSocket connected");
    let open = grid.metrics.socket_opened();
    talk(&mut rx, socket, waiting).await;
    drop(open);
    // The socket is gone. If it was the node's last, the node is taken for
    // dead at once (a killed process closes its sockets long before its
    // heartbeats are missed): its jobs fail now, and it is not routed to
    // until it connects or heartbeats again.
    let loss = grid
        .lock()
        .detach_socket(&node_id, generation, std::time::Instant::now());
    match loss {
        SocketLoss::Other(push, again) => {
            tracing::info!(%node_id, generation, "node WebSocket closed; another is open");
            if let Some(push) = push {
                for job in again {
                    let _ = push.send(job);
                }
            }
        }
        SocketLoss::Dead(jobs) => {
            tracing::warn!(%node_id, generation, jobs = jobs.len(), "node WebSocket closed; node taken for dead");
            for job_id in jobs {
                grid.fail_job_later(&job_id, "the node's connection closed".into());
            }
        }
    }
}

/// Push jobs to the node and answer its frames until the socket closes.
async fn talk(
    rx: &mut mpsc::UnboundedReceiver<PendingJob>,
    socket: WebSocket,
    waiting: Vec<PendingJob>,
) {
    let (mut sink, mut stream) = socket.split();
    let hello = WsMessage::Hello {
        protocol: "sgl-ws-v1".into(),
        features: vec![],
    };
    if sink.send(frame(&hello)).await.is_err() {
        return;
    }
    for job in waiting {
        if sink.send(frame(&WsMessage::Job { job })).await.is_err() {
            return;
        }
    }
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    ping.tick().await;
    loop {
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => {
                    if sink.send(frame(&WsMessage::Job { job })).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = ping.tick() => {
                if sink.send(frame(&WsMessage::Ping)).await.is_err() {
                    break;
                }
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // Pongs and unknown frames are fine; nothing else is taken over
                    // the socket yet (chunks travel over REST).
                    if let Ok(WsMessage::Pong) | Ok(WsMessage::Unknown) | Err(_) = serde_json::from_str::<WsMessage>(&text) {
                        continue;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}
