//! The HTTP edge of replica mode: the gate that refuses work once the
//! lease is lost, and the routing of node calls to the replica that holds
//! their node or job (see the module comment of [`super`]).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use std::time::Instant;

use super::{status_of, Outgoing, Replica, CALL_SLICE, CALL_TIMEOUT, FORWARDED, MAX_ANSWER_BYTES};
use crate::coordinator::client_api::MAX_BODY_BYTES;
use crate::coordinator::error::{ClientError, NodeApiError};
use crate::coordinator::state::Grid;
use crate::proto::headers;
use crate::proto::identity::NodeId;

/// Every request of a replica that lost its lease: 503, so a load balancer
/// takes it out and clients retry elsewhere.
/// Also drops a [`FORWARDED`] mark from outside: only replicas set it, on
/// calls that never pass here.
pub async fn gate(State(grid): State<Grid>, mut req: Request, next: Next) -> Response {
    req.headers_mut().remove(FORWARDED);
    match &grid.replica {
        Some(r) if !r.healthy() => {
            let mut resp = ClientError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "replica_unavailable",
                "this coordinator replica lost its database; retry on another",
            )
            .into_response();
            // The connection closes with the answer: a client (a node's
            // heartbeats above all) keeping it alive through a balancer
            // that balances connections would otherwise stay on this
            // replica, refused, instead of reconnecting to another.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        _ => next.run(req).await,
    }
}

/// What a node call is about.
enum Subject {
    Job(String),
    Node(NodeId),
    Socket(NodeId),
    Register,
    Other,
}

fn subject(req: &Request) -> Subject {
    let parts: Vec<&str> = req.uri().path().split('/').collect();
    let node = |s: &str| NodeId::parse(s).map_or(Subject::Other, Subject::Node);
    match parts.as_slice() {
        ["", "grid", "jobs", id, "chunk" | "complete" | "fail"] => Subject::Job(id.to_string()),
        ["", "grid", "nodes", "register"] => Subject::Register,
        ["", "grid", "nodes", "heartbeat"] => req
            .headers()
            .get(headers::NODE_ID)
            .and_then(|v| v.to_str().ok())
            .map_or(Subject::Other, node),
        ["", "grid", "nodes", id, "ws"] => {
            NodeId::parse(id).map_or(Subject::Other, Subject::Socket)
        }
        ["", "grid", "nodes", id]
        | ["", "grid", "nodes", id, "challenge" | "verify-attestation" | "status"] => node(id),
        _ => Subject::Other,
    }
}

fn unavailable(why: &str) -> Response {
    NodeApiError::new(StatusCode::SERVICE_UNAVAILABLE, "replica_unavailable", why).into_response()
}

/// Send a node call to the replica that holds its node or job, or handle
/// it here (adopting the node when no live replica holds it).
pub async fn route_node_call(State(grid): State<Grid>, req: Request, next: Next) -> Response {
    let Some(rep) = grid.replica.clone() else {
        return next.run(req).await;
    };
    let forwarded = req.headers().get(FORWARDED).is_some();
    let subject = subject(&req);
    match &subject {
        Subject::Other => return next.run(req).await,
        Subject::Register => return register(&rep, req, next).await,
        Subject::Socket(node_id) => {
            return adopt_and_run(&grid, &rep, *node_id, true, req, next).await
        }
        Subject::Job(job_id) if forwarded || grid.lock().job(job_id).is_some() => {
            return next.run(req).await
        }
        Subject::Node(node_id) if forwarded => {
            hold_here(&grid, &rep, *node_id).await;
            return next.run(req).await;
        }
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return NodeApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "the request body is too large",
        )
        .into_response();
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return NodeApiError::bad("invalid_request", "the body is not UTF-8").into_response();
    };
    let out = Outgoing {
        method: parts.method.as_str().to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-") || *k == header::CONTENT_TYPE)
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: text.to_string(),
    };
    let start = Instant::now();
    // A job pushed here by its owner: the owner is known without a lookup,
    // the first time round (a lookup follows if it does not answer).
    let mut remembered = match &subject {
        Subject::Job(job_id) => rep.pusher_of(job_id),
        _ => None,
    };
    loop {
        let holder = match (&subject, remembered.take()) {
            (Subject::Job(_), Some(owner)) => Ok(Some(owner)),
            (Subject::Job(job_id), None) => rep.db.job_owner(job_id).await,
            (Subject::Node(node_id), _) => rep.db.node_owner(&node_id.to_string()).await,
            _ => Ok(None),
        };
        let holder = match holder {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "replica lookup failed");
                return unavailable(
                    "the replica holding this call's node or job cannot be found now",
                );
            }
        };
        match holder {
            Some(to) if to != rep.id() => {
                if let Some((status, body)) = rep.call(&to, &out, CALL_SLICE).await {
                    return (
                        status_of(status),
                        [(header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                        .into_response();
                }
                if let Subject::Job(job_id) = &subject {
                    rep.forget_pusher(job_id);
                }
                if start.elapsed() >= CALL_TIMEOUT {
                    return unavailable(
                        "the replica holding this call's node or job did not answer",
                    );
                }
                // Looked up again: the holder may have died or moved.
            }
            holder => {
                let req = Request::from_parts(parts, Body::from(bytes));
                return match (&subject, holder) {
                    // No live replica holds the node: this one takes it.
                    (Subject::Node(node_id), None) => {
                        adopt_and_run(&grid, &rep, *node_id, false, req, next).await
                    }
                    (Subject::Node(node_id), Some(_)) => {
                        hold_here(&grid, &rep, *node_id).await;
                        next.run(req).await
                    }
                    // A job unknown here and held by no live replica: the
                    // client is gone, and the node is told so.
                    _ => next.run(req).await,
                };
            }
        }
    }
}

/// Make sure a node this replica holds is in memory as its own.
async fn hold_here(grid: &Grid, rep: &Replica, node_id: NodeId) {
    if !grid.adopt(&node_id, None) {
        let doc = rep.db.node_doc(&node_id.to_string()).await.ok().flatten();
        grid.adopt(&node_id, doc.as_deref());
    }
}

/// A registration: the node is held here until its WebSocket opens.
async fn register(rep: &Replica, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ANSWER_BYTES)
        .await
        .unwrap_or_default();
    let node = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["node_id"].as_str().map(str::to_string));
    if let Some(node) = node {
        if let Err(e) = rep.db.claim_node(&node, false, true).await {
            tracing::error!(error = %e, "could not record the node's replica");
            return unavailable("the registration could not be recorded; retry");
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Hold the node here, then handle the call; a successful call claims the
/// node for this replica (`socket`: a WebSocket opened, which also proves
/// the node alive).
async fn adopt_and_run(
    grid: &Grid,
    rep: &Replica,
    node_id: NodeId,
    socket: bool,
    req: Request,
    next: Next,
) -> Response {
    let doc = match rep.db.node_doc(&node_id.to_string()).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "node lookup failed");
            return unavailable("the node cannot be read now");
        }
    };
    grid.adopt(&node_id, doc.as_deref());
    if socket {
        // Claimed before the socket opens, so that no refresh of the
        // mirrors in between takes the node back for its old holder.
        let token = query_token(&req);
        let known = token.is_some_and(|t| {
            let inner = grid.lock();
            grid.authenticate(&inner, &node_id, &t)
        });
        if known {
            if let Err(e) = rep.db.claim_node(&node_id.to_string(), true, true).await {
                tracing::error!(error = %e, %node_id, "could not claim the node");
                return unavailable("the node cannot be claimed now");
            }
            grid.touch(&node_id);
        }
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    if resp.status().is_success() {
        // Taken only from a replica that is gone (or from none).
        if let Err(e) = rep.db.claim_node(&node_id.to_string(), false, false).await {
            tracing::error!(error = %e, %node_id, "could not claim the node");
        }
    }
    resp
}

/// The `auth_token` of a WebSocket request.
fn query_token(req: &Request) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Q {
        auth_token: Option<String>,
    }
    axum::extract::Query::<Q>::try_from_uri(req.uri())
        .ok()?
        .0
        .auth_token
}
