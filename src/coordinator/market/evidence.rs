//! The public proof behind nodes and jobs (PROTOCOL.md §7b, §5.11): a
//! node's attestation evidence, and the attestation of one paid job.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::json;

use super::{node_or_404, shown_tee_type};
use crate::coordinator::error::ClientError;
use crate::coordinator::state::Grid;
use crate::proto::api::{AttestationLevel, EvidenceResponse};
use crate::proto::identity::NodeId;

/// `GET /grid/nodes/{id}/attestation/evidence` (§7b): no auth.
pub async fn evidence(
    State(grid): State<Grid>,
    Path(id): Path<String>,
) -> Result<Json<EvidenceResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    let inner = grid.lock();
    let n = inner
        .node(&node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    let (Some(x), Some(att)) = (n.x25519, n.attestation.as_ref()) else {
        return Err(ClientError::not_found(
            "not_attested",
            "this node has not attested",
        ));
    };
    Ok(Json(EvidenceResponse {
        node_id: node_id.to_string(),
        key_version: n.key_version,
        ed25519_pubkey: n.ed25519.to_b58(),
        x25519_pubkey: x.to_b58(),
        keybind_signature: n.keybind.map(|k| k.to_b58()),
        challenge: Some(att.challenge.clone()),
        evidence: att.evidence.clone(),
        verified_at: Some(att.verified_at.clone()),
        attestation_level: n.level,
        policy_digest: att.policy_digest.clone(),
    }))
}

/// `GET /grid/jobs/{id}/attestation` (§5.11): the proof behind one job, for
/// the API key (or wallet) that paid for it; 404 for anyone else.
pub async fn job_attestation(
    State(grid): State<Grid>,
    Path(job_id): Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<crate::proto::api::AttestationProof>, ClientError> {
    let not_found = || ClientError::not_found("job_not_found", "no such job");
    let (Some(store), Some(payments)) = (grid.store(), grid.payments.as_ref()) else {
        return Err(not_found());
    };
    let parts = crate::payments::RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &[],
    };
    let payer = payments
        .authenticate(&parts)
        .await
        .ok()
        .flatten()
        .ok_or_else(not_found)?;
    let row = store
        .usage_for_job(&job_id)
        .await
        .map_err(ClientError::internal)?
        .ok_or_else(not_found)?;
    let paid = match (&payer, &row.api_key_id) {
        (crate::payments::Payer::ApiKey { key_id, .. }, Some(k)) => key_id == k,
        (_, None) => row.payer_wallet.as_deref() == Some(payer.wallet().as_str()),
        _ => false,
    };
    if !paid || row.status != "completed" {
        return Err(not_found());
    }
    let node_id = NodeId::parse(&row.node_id).map_err(|_| not_found())?;
    // A replica knows the nodes the live replicas hold, but not one whose
    // holder died before it was mirrored here: the job's row is in the
    // shared database, so its node is read from there too, and the proof
    // is the same whichever replica is asked.
    let stored = if grid.lock().node(&node_id).is_none() {
        grid.stored_node(&node_id).await
    } else {
        None
    };
    let inner = grid.lock();
    let n = inner
        .node(&node_id)
        .or(stored.as_ref())
        .ok_or_else(not_found)?;
    let att = n.attestation.as_ref();
    let report = json!({
        "attestation_level": n.level,
        "evidence_url": format!(
            "{}{}",
            grid.config.public_url.trim_end_matches('/'),
            crate::proto::routes::path(crate::proto::routes::NODE_EVIDENCE, &node_id.to_string())
        ),
        "report_hash": att.map(|a| a.report_hash.clone()),
        "policy_digest": att.and_then(|a| a.policy_digest.clone()),
    });
    Ok(Json(crate::proto::api::AttestationProof {
        node_id: row.node_id.clone(),
        tee_type: shown_tee_type(n),
        job_id: row.job_id.clone(),
        attestation_signature: row.result_signature.clone().unwrap_or_default(),
        attestation_report: report.to_string(),
        verified: n.level != AttestationLevel::None,
        verified_at: att.map(|a| a.verified_at.clone()),
    }))
}
