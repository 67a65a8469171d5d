//! Routing (PROTOCOL.md §5.1): which node takes a request — one that serves
//! the model, is attested (to the level asked), on grid, online, with a
//! published keybind, a free slot and a price under the cap, honouring a pin
//! and an exclusion, whose engine implements the features the request needs
//! — and offering it the job.

use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc;

use super::billing::JobBilling;
use super::error::ClientError;
use super::job::{Job, JobEvent};
use super::state::{Grid, Inner};
use crate::money::MicrosPerM;
use crate::proto::api::{AttestationLevel, ReserveRequest};
use crate::proto::identity::NodeId;
use crate::proto::openai::InvalidRequest;

/// Pick a node for a model (§5.1): served, attested, on grid, online, with a
/// published keybind, a free slot, a blended price under the cap and every
/// feature in `needs` ([`crate::proto::features`]) advertised; the cheapest,
/// then the least loaded.
pub(crate) fn choose_node(
    grid: &Grid,
    inner: &Inner,
    req: &ReserveRequest,
    model: &str,
    exclude: Option<NodeId>,
    needs: &[&'static str],
) -> Result<NodeId, ClientError> {
    let now = Instant::now();
    let require_hardware = match req.require_attestation.as_deref() {
        None | Some("self_reported") => false,
        Some("hardware") => true,
        Some(other) => {
            return Err(ClientError::invalid(
                "invalid_request",
                format!("require_attestation {other:?}"),
            ))
        }
    };
    let pin = match &req.node {
        Some(p) => Some(
            NodeId::parse(p)
                .map_err(|_| ClientError::invalid("invalid_request", "node is not a node id"))?,
        ),
        None => None,
    };
    let serving: Vec<_> = inner
        .nodes()
        .filter(|n| n.models.iter().any(|m| m == model))
        .collect();
    if serving.is_empty() {
        return Err(ClientError::not_found(
            "model_not_found",
            format!("no node serves {model}"),
        ));
    }
    let usable: Vec<_> = serving
        .into_iter()
        .filter(|n| {
            n.level != AttestationLevel::None
                && !n.off_grid
                && grid.is_online(n, now)
                && n.x25519.is_some()
                && n.keybind.is_some()
                && pin.is_none_or(|p| p == n.id)
                && exclude != Some(n.id)
        })
        .collect();
    // A node that does not advertise a feature would drop the parameter
    // (a public node) or refuse it (the echo engine): never offered the job.
    let capable: Vec<_> = usable
        .iter()
        .copied()
        .filter(|n| needs.iter().all(|f| n.capabilities.has(f)))
        .collect();
    if capable.is_empty() && !usable.is_empty() {
        // Name a feature no usable node has; else the first, which no node
        // has together with the rest.
        let missing = needs
            .iter()
            .find(|f| !usable.iter().any(|n| n.capabilities.has(f)))
            .or(needs.first())
            .copied()
            .unwrap_or_default();
        return Err(unsupported(model, missing));
    }
    let usable = capable;
    let attested: Vec<_> = usable
        .iter()
        .filter(|n| !require_hardware || n.level == AttestationLevel::Hardware)
        .collect();
    if attested.is_empty() && !usable.is_empty() {
        return Err(ClientError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "attestation_unmet",
            "no node serving this model meets the attestation requirement",
        ));
    }
    let cap = match req.max_price {
        None => None,
        Some(usd) => Some(MicrosPerM::from_usd(usd).ok_or_else(|| {
            ClientError::invalid("invalid_request", "max_price must be a non-negative number")
        })?),
    };
    let price = |id: &NodeId| {
        inner
            .node(id)
            .map(|n| grid.effective_price(n, model).blended())
            .unwrap_or(MicrosPerM(u64::MAX))
    };
    let affordable: Vec<_> = attested
        .iter()
        .filter(|n| cap.is_none_or(|cap| price(&n.id) <= cap))
        .collect();
    if affordable.is_empty() && !attested.is_empty() {
        return Err(ClientError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "price_cap_unmet",
            "nodes serve this model, but none at or under max_price",
        ));
    }
    affordable
        .iter()
        .filter(|n| inner.load(&n.id) < n.max_concurrent_jobs)
        .min_by(|a, b| {
            let la = inner.load(&a.id) as f64 / a.max_concurrent_jobs as f64;
            let lb = inner.load(&b.id) as f64 / b.max_concurrent_jobs as f64;
            price(&a.id).cmp(&price(&b.id)).then(la.total_cmp(&lb))
        })
        .map(|n| n.id)
        .ok_or_else(ClientError::no_capacity)
}

/// 400: no online node serving `model` implements what `param` asks for;
/// the body of the validator's refusals of an unimplemented parameter.
fn unsupported(model: &str, param: &str) -> ClientError {
    ClientError::new(
        axum::http::StatusCode::BAD_REQUEST,
        InvalidRequest::KIND,
        InvalidRequest::UNSUPPORTED_CODE,
        format!(
            "unsupported parameter: {param:?} is not implemented by any node serving {model} now; leave it out or try later"
        ),
    )
    .with_param(param)
}

/// Create a job for a reserved node and offer it; returns its events.
/// `client_sealed`: the client sealed the input (sealed mode). With
/// `retry`, a failure before any output hands the billing back
/// ([`JobEvent::Unstarted`]) instead of closing it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch(
    grid: &Grid,
    job_id: &str,
    node_id: NodeId,
    model: &str,
    payload: Value,
    stream: bool,
    billing: JobBilling,
    client_sealed: bool,
    retry: bool,
) -> mpsc::Receiver<JobEvent> {
    let (tx, rx) = mpsc::channel(64);
    let mut job = Job::offered(
        job_id.to_string(),
        node_id,
        model.to_string(),
        payload,
        stream,
        Instant::now(),
        tx,
        Some(billing),
    );
    job.client_sealed = client_sealed;
    job.retry = retry;
    let mut inner = grid.lock();
    let pending = job.pending();
    inner.insert_job(job);
    let node = inner.node(&node_id);
    let push = node.and_then(|n| n.push().cloned());
    let here = node.is_some_and(|n| !n.is_remote());
    drop(inner);
    match (&grid.replica, push) {
        // The node's calls about the job may reach any replica: the job's
        // replica is recorded before the node can make one (by the push
        // itself, for a node another replica holds).
        (Some(replica), push) if here => {
            let (replica, job_id) = (replica.clone(), job_id.to_string());
            tokio::spawn(async move {
                replica.record_job(&job_id).await;
                if let Some(push) = push {
                    let _ = push.send(pending);
                }
            });
        }
        (_, Some(push)) => {
            let _ = push.send(pending);
        }
        (_, None) => {}
    }
    rx
}
