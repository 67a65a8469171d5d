//! The node-facing API (PROTOCOL.md §6): register, challenge,
//! verify-attestation, heartbeat, complete, chunk, fail, status. Every
//! signature is checked before anything is relayed or counted; what a node
//! posts about a job is checked and applied in [`super::results`].

use std::collections::HashSet;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::error::{NodeApiError, NodeJson};
use super::results;
use super::state::Grid;
use crate::proto::api::{
    AllowedBinaries, AttestationLevel, ChunkRequest, ChunkResponse, CompleteRequest, FailRequest,
    HeartbeatRequest, HeartbeatResponse, NodeInfoResponse, OkResponse, RegisterRequest,
    RegisterResponse, StatusRequest, StatusResponse, VerifyAttestationRequest,
    VerifyAttestationResponse,
};
use crate::proto::headers;
use crate::proto::identity::{verify_keybind, Ed25519Public, NodeId, Signature, X25519Public};

type NodeResult<T> = Result<Json<T>, NodeApiError>;

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn parse_node_id(s: &str) -> Result<NodeId, NodeApiError> {
    NodeId::parse(s).map_err(|_| NodeApiError::not_found("unknown node"))
}

/// Check `X-Node-Auth` for `node_id`; unknown nodes and bad tokens look alike.
fn authorize(grid: &Grid, headers: &HeaderMap, node_id: &NodeId) -> Result<(), NodeApiError> {
    let token = header(headers, headers::NODE_AUTH).ok_or_else(NodeApiError::unauthorized)?;
    let inner = grid.lock();
    if grid.authenticate(&inner, node_id, token) {
        Ok(())
    } else {
        Err(NodeApiError::unauthorized())
    }
}

/// At most this many models in a registration or a heartbeat (§7f).
pub const MAX_NODE_MODELS: usize = 64;

/// The models a node may advertise of those it claims (§7f): more than
/// [`MAX_NODE_MODELS`] is refused; a model that is neither in the catalogue
/// nor allowed by configuration is dropped (logged), so `/v1/models` lists
/// only known models while the node keeps serving the rest.
fn advertised_models(
    grid: &Grid,
    node: Option<&NodeId>,
    claimed: &[String],
) -> Result<Vec<String>, NodeApiError> {
    if claimed.len() > MAX_NODE_MODELS {
        return Err(NodeApiError::bad(
            "too_many_models",
            format!("at most {MAX_NODE_MODELS} models may be advertised"),
        ));
    }
    let mut kept: Vec<String> = Vec::with_capacity(claimed.len());
    for m in claimed {
        if !grid.model_allowed(m) {
            let shown: String = m.chars().take(64).collect();
            tracing::warn!(node_id = ?node, model = %shown, "advertised model not allowed; ignored");
        } else if !kept.contains(m) {
            kept.push(m.clone());
        }
    }
    Ok(kept)
}

pub async fn register(
    State(grid): State<Grid>,
    NodeJson(req): NodeJson<RegisterRequest>,
) -> NodeResult<RegisterResponse> {
    let ed25519 = Ed25519Public::from_b58(&req.public_key)
        .map_err(|e| NodeApiError::bad("invalid_public_key", e.to_string()))?;
    if req.wallet_address.trim().is_empty() || req.wallet_address.len() > 128 {
        return Err(NodeApiError::bad(
            "invalid_wallet",
            "wallet_address is required (at most 128 characters)",
        ));
    }
    if req.tee_type.len() > 32 {
        return Err(NodeApiError::bad("invalid_request", "a bad tee_type"));
    }
    let models = advertised_models(&grid, None, &req.available_models)?;
    let refused = |why: &str| NodeApiError::new(StatusCode::FORBIDDEN, "registration_refused", why);
    // The id is chosen before the code is spent, so the code records its node.
    let code_ok = match (&req.registration_code, grid.config.dev) {
        (_, true) => true,
        (None, false) => return Err(refused("registration needs a registration code")),
        (Some(code), false) => {
            let configured = grid.take_configured_code(code).await.map_err(|e| {
                tracing::error!(error = %e, "registration code lookup failed");
                NodeApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "internal error",
                )
            })?;
            if configured {
                true
            } else if let Some(store) = grid.store() {
                let hash = hex::encode(super::state::secret_hash(code));
                store
                    .use_registration_code(&hash, &req.wallet_address, "pending")
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "registration code lookup failed");
                        NodeApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal_error",
                            "internal error",
                        )
                    })?
            } else {
                false
            }
        }
    };
    if !code_ok {
        return Err(refused(
            "unknown or used registration code, or one made for another wallet",
        ));
    }
    let (node_id, auth_token) = grid.register(ed25519, req.wallet_address, req.tee_type, models);
    tracing::info!(%node_id, "node registered");
    Ok(Json(RegisterResponse {
        node_id: node_id.to_string(),
        auth_token,
    }))
}

pub async fn challenge(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> NodeResult<crate::proto::api::ChallengeResponse> {
    let node_id = parse_node_id(&id)?;
    authorize(&grid, &headers, &node_id)?;
    let mut inner = grid.lock();
    let challenge = grid
        .issue_challenge(&mut inner, &node_id)
        .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
    Ok(Json(crate::proto::api::ChallengeResponse {
        challenge,
        expires_at: None,
        expires_in_seconds: Some(grid.config.challenge_ttl.as_secs()),
    }))
}

pub async fn verify_attestation(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<VerifyAttestationRequest>,
) -> NodeResult<VerifyAttestationResponse> {
    let node_id = parse_node_id(&id)?;
    authorize(&grid, &headers, &node_id)?;
    // Everything the node claims is checked before anything is recorded.
    let (challenge, ed25519) = {
        let mut inner = grid.lock();
        let challenge = Grid::take_challenge(&mut inner, &node_id).ok_or_else(|| {
            NodeApiError::bad("challenge_expired", "no live challenge: request a new one")
        })?;
        let node = inner
            .node(&node_id)
            .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
        (challenge, node.ed25519)
    };
    let sig = Signature::from_b58(&req.signature)
        .map_err(|e| NodeApiError::bad("bad_signature", e.to_string()))?;
    ed25519.verify(challenge.as_bytes(), &sig).map_err(|_| {
        NodeApiError::bad("bad_signature", "the challenge signature does not verify")
    })?;
    let x25519 = X25519Public::from_b58(&req.encryption_public_key)
        .map_err(|e| NodeApiError::bad("invalid_encryption_key", e.to_string()))?;
    let report = &req.hardware_report;
    if !report.report_hash.is_empty() && report.compute_report_hash() != report.report_hash {
        return Err(NodeApiError::bad(
            "report_hash_mismatch",
            "hardware_report.report_hash does not match its fields",
        ));
    }
    let key_version = req.key_version.unwrap_or(1);
    let keybind = match &req.encryption_public_key_signature {
        Some(kb) => {
            let kb = Signature::from_b58(kb)
                .map_err(|e| NodeApiError::bad("bad_keybind", e.to_string()))?;
            verify_keybind(&node_id.to_string(), &ed25519, &x25519, key_version, &kb).map_err(
                |_| NodeApiError::bad("bad_keybind", "the keybind signature does not verify"),
            )?;
            Some(kb)
        }
        None => None,
    };
    // Hardware evidence (§7a): verified, or the request fails — a node is
    // never silently downgraded to self-reported.
    let mut level = AttestationLevel::SelfReported;
    let mut evidence_kept = None;
    let mut policy_digest = None;
    let mut checks = Vec::new();
    if let Some(ev) = &req.evidence {
        if keybind.is_none() {
            return Err(NodeApiError::bad(
                "evidence_rejected",
                "evidence needs the keybind signature (encryption_public_key_signature)",
            ));
        }
        let verdict = super::attestation::verify(
            &grid,
            ev,
            crate::attest::NodeBinding {
                node_id,
                ed25519,
                x25519,
                key_version,
                challenge: challenge.clone(),
            },
        )
        .await
        .map_err(|why| NodeApiError::bad("evidence_rejected", why))?;
        level = verdict.level;
        policy_digest = Some(verdict.policy_digest);
        checks = verdict.checks;
        evidence_kept = Some(verdict.evidence);
    }
    let mut inner = grid.lock();
    let node = inner
        .node_mut(&node_id)
        .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
    if let Some(kb) = keybind {
        node.keybind = Some(kb);
        node.key_version = key_version;
    }
    node.x25519 = Some(x25519);
    node.level = level;
    let verified_at = grid.config.clock.rfc3339_now();
    node.attestation = Some(super::state::AttestationRecord {
        challenge,
        evidence: evidence_kept,
        verified_at: verified_at.clone(),
        policy_digest: policy_digest.clone(),
        report_hash: report.compute_report_hash(),
        checks,
    });
    node.last_seen = Instant::now();
    grid.persist(&mut inner, &node_id);
    tracing::info!(%node_id, ?level, "node attested");
    Ok(Json(VerifyAttestationResponse {
        verified: true,
        status: "active".into(),
        attestation_level: Some(level),
        verified_at: Some(verified_at),
        policy_digest,
    }))
}

pub async fn heartbeat(
    State(grid): State<Grid>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<HeartbeatRequest>,
) -> NodeResult<HeartbeatResponse> {
    let node_id =
        parse_node_id(header(&headers, headers::NODE_ID).ok_or_else(NodeApiError::unauthorized)?)?;
    authorize(&grid, &headers, &node_id)?;
    let models = advertised_models(&grid, Some(&node_id), &req.available_models)?;
    let mut inner = grid.lock();
    let node = inner
        .node_mut(&node_id)
        .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
    if let Some(key) = &req.encryption_public_key {
        let x = X25519Public::from_b58(key)
            .map_err(|e| NodeApiError::bad("invalid_encryption_key", e.to_string()))?;
        let version = req.key_version.unwrap_or(1);
        if node.keybind.is_some() && version < node.key_version {
            return Err(NodeApiError::bad(
                "key_version_regressed",
                "key_version is lower than the one on record",
            ));
        }
        match &req.encryption_public_key_signature {
            Some(sig) => {
                let sig = Signature::from_b58(sig)
                    .map_err(|e| NodeApiError::bad("bad_keybind", e.to_string()))?;
                verify_keybind(&node_id.to_string(), &node.ed25519, &x, version, &sig).map_err(
                    |_| NodeApiError::bad("bad_keybind", "the keybind signature does not verify"),
                )?;
                // Hardware evidence bound the old key: it lapses (§7a).
                if node.level == AttestationLevel::Hardware
                    && (node.x25519 != Some(x) || node.key_version != version)
                {
                    tracing::warn!(%node_id, "serving key changed; hardware attestation lapses");
                    node.level = AttestationLevel::SelfReported;
                }
                node.keybind = Some(sig);
                node.key_version = version;
                node.x25519 = Some(x);
            }
            None => {
                // An unsigned key is not published.
                if node.x25519 != Some(x) {
                    node.keybind = None;
                    node.x25519 = Some(x);
                }
            }
        }
    }
    node.models = models;
    node.capabilities = req.capabilities.clone();
    node.max_concurrent_jobs = req
        .max_concurrent_jobs
        .clamp(1, grid.config.max_node_slots.max(1));
    node.heard_from(Instant::now());
    let new_auth_token = grid.maybe_rotate_token(node, node.last_seen);
    if new_auth_token.is_some() {
        tracing::info!(%node_id, "node token rotated");
    }
    let active: HashSet<&str> = req.active_job_ids.iter().map(String::as_str).collect();
    let (ghosts, pending) = inner.sync_jobs(&node_id, &active);
    // Replica mode: jobs of other replicas' clients are listed to them.
    let foreign: Vec<String> = match grid.replica {
        Some(_) => req
            .active_job_ids
            .iter()
            .filter(|id| inner.job(id).is_none())
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    grid.persist(&mut inner, &node_id);
    drop(inner);
    if let (Some(replica), false) = (&grid.replica, foreign.is_empty()) {
        replica.relay_listed(node_id, foreign);
    }
    for id in ghosts {
        tracing::warn!(job_id = %id, %node_id, "ghost job: acknowledged, then missing from active_job_ids");
        grid.fail_job_later(&id, "the node dropped the job".into());
    }
    Ok(Json(HeartbeatResponse {
        status: "ok".into(),
        pending_jobs: pending,
        token_expires_at: new_auth_token
            .as_ref()
            .map(|_| grid.config.clock.rfc3339_in(grid.config.token_lifetime)),
        new_auth_token,
    }))
}

pub async fn complete(
    State(grid): State<Grid>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<CompleteRequest>,
) -> NodeResult<OkResponse> {
    results::complete(&grid, &headers, &job_id, req)
        .await
        .map(Json)
}

pub async fn chunk(
    State(grid): State<Grid>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<ChunkRequest>,
) -> NodeResult<ChunkResponse> {
    results::chunk(&grid, &headers, &job_id, req)
        .await
        .map(Json)
}

pub async fn fail(
    State(grid): State<Grid>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<FailRequest>,
) -> NodeResult<OkResponse> {
    results::fail(&grid, &headers, &job_id, req).await.map(Json)
}

pub async fn set_status(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    headers: HeaderMap,
    NodeJson(req): NodeJson<StatusRequest>,
) -> NodeResult<StatusResponse> {
    let node_id = parse_node_id(&id)?;
    authorize(&grid, &headers, &node_id)?;
    let mut inner = grid.lock();
    let node = inner
        .node_mut(&node_id)
        .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
    node.off_grid = req.off_grid;
    grid.persist(&mut inner, &node_id);
    tracing::info!(%node_id, off_grid = req.off_grid, "node status changed");
    Ok(Json(StatusResponse {
        ok: true,
        off_grid: req.off_grid,
    }))
}

pub async fn node_info(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> NodeResult<NodeInfoResponse> {
    let node_id = parse_node_id(&id)?;
    authorize(&grid, &headers, &node_id)?;
    let inner = grid.lock();
    let node = inner
        .node(&node_id)
        .ok_or_else(|| NodeApiError::not_found("unknown node"))?;
    let status = if node.off_grid {
        "off_grid"
    } else if node.level == AttestationLevel::None {
        "pending_attestation"
    } else {
        "active"
    };
    Ok(Json(NodeInfoResponse {
        status: status.into(),
        attestation_verified: node.level != AttestationLevel::None,
        reputation_score: 80,
        jobs_completed: node.jobs_completed,
        jobs_failed: node.jobs_failed,
    }))
}

pub async fn allowed_binaries() -> Json<AllowedBinaries> {
    Json(AllowedBinaries::default())
}
