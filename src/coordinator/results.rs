//! What a node posts about its jobs (PROTOCOL.md §6.8–§6.10): a whole result,
//! a stream chunk, a failure. Each is checked against the node's key and the
//! job's [`Stage`](super::job::Stage), then ends the job or is relayed. A bad
//! signature or malformed result fails the job unbilled; an event out of
//! order is refused and leaves the job as it was. Usage above the token cap
//! the job was quoted for fails the job unbilled, against the node (§7f);
//! a sealed input the node cannot open fails it against the client.

use axum::http::HeaderMap;

use super::billing::{Billed, Outcome};
use super::error::NodeApiError;
use super::job::{ChunkHead, ChunkStep, JobEvent, Refused};
use super::state::Grid;
use crate::proto::api::{ChunkRequest, ChunkResponse, CompleteRequest, FailRequest, OkResponse};
use crate::proto::e2e::Algorithm;
use crate::proto::envelope::{self, ResultKind};
use crate::proto::identity::Ed25519Public;
use crate::proto::openai::Usage;

/// What checking a node's call about a job needs.
struct Owner {
    signer: Ed25519Public,
    model: String,
    signed_usage: bool,
    /// The completion-token cap the job was quoted for (§7f).
    cap: Option<u64>,
    client_sealed: bool,
}

/// Find a job, check it belongs to the calling node, and return the node's key.
fn job_owner(grid: &Grid, headers: &HeaderMap, job_id: &str) -> Result<Owner, NodeApiError> {
    let token = headers
        .get(crate::proto::headers::NODE_AUTH)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(NodeApiError::unauthorized)?;
    let inner = grid.lock();
    let job = inner
        .job(job_id)
        .ok_or_else(|| NodeApiError::conflict("unknown or finished job"))?;
    if !grid.authenticate(&inner, &job.node_id, token) {
        // Either a bad token, or a job of another node: neither learns which.
        return Err(NodeApiError::unauthorized());
    }
    let node = inner
        .node(&job.node_id)
        .ok_or_else(|| NodeApiError::conflict("unknown node"))?;
    Ok(Owner {
        signer: node.ed25519,
        model: job.model.clone(),
        signed_usage: node.capabilities.signed_usage == Some(true),
        cap: job
            .payload
            .get("max_tokens_cap")
            .and_then(serde_json::Value::as_u64),
        client_sealed: job.client_sealed,
    })
}

fn check_usage(
    owner: &Owner,
    job_id: &str,
    usage: Option<&Usage>,
    signature: Option<&str>,
) -> Result<(), String> {
    let (signer, model, required) = (&owner.signer, owner.model.as_str(), owner.signed_usage);
    match usage {
        Some(u) if !u.is_consistent() => {
            Err("usage total_tokens is not prompt + completion".into())
        }
        Some(u) if owner.cap.is_some_and(|cap| u.completion_tokens > cap) => Err(format!(
            "{} completion tokens exceed the quoted cap of {}",
            u.completion_tokens,
            owner.cap.unwrap_or_default()
        )),
        Some(u) if required => {
            envelope::verify_usage(signer, job_id, model, u, signature).map_err(|e| e.to_string())
        }
        Some(_) => Ok(()),
        None if required => Err("missing usage".into()),
        None => Ok(()),
    }
}

/// Fail a job after a bad call from its node, and answer the node 400.
fn reject(grid: &Grid, job_id: &str, code: &'static str, why: String) -> NodeApiError {
    tracing::warn!(job_id, code, why = %why, "rejecting a node result");
    grid.fail_job_later(job_id, format!("node sent an invalid result: {why}"));
    NodeApiError::bad(code, why)
}

/// An event the job's stage refuses: 409, the job left as it was.
fn refused(why: Refused) -> NodeApiError {
    NodeApiError::conflict(why.to_string())
}

/// The result signature of a whole result (§4).
fn verify_complete(
    signer: &crate::proto::identity::Ed25519Public,
    job_id: &str,
    req: &CompleteRequest,
) -> Result<(), String> {
    let sig = req.result_envelope_signature.as_deref();
    let version = req.result_envelope_version.as_deref();
    match (&req.sealed_result, &req.encrypted_result) {
        (Some(sealed), None) => Algorithm::V2
            .expect(sealed.algorithm.as_deref())
            .and_then(|_| {
                envelope::verify_result(
                    signer,
                    job_id,
                    ResultKind::Sealed,
                    &sealed.ciphertext,
                    sig,
                    version,
                )
            })
            .map_err(|e| e.to_string()),
        (None, Some(text)) => {
            envelope::verify_result(signer, job_id, ResultKind::Plain, text, sig, version)
                .map_err(|e| e.to_string())
        }
        _ => Err("exactly one of sealed_result and encrypted_result is required".into()),
    }
}

/// `POST /grid/jobs/{id}/complete`: the whole result of a job that has not
/// streamed.
pub async fn complete(
    grid: &Grid,
    headers: &HeaderMap,
    job_id: &str,
    req: CompleteRequest,
) -> Result<OkResponse, NodeApiError> {
    let owner = job_owner(grid, headers, job_id)?;
    let signer = owner.signer;
    let stage = grid
        .lock()
        .job(job_id)
        .map(|job| job.stage().may_complete());
    match stage {
        None => return Err(NodeApiError::conflict("unknown or finished job")),
        Some(Err(why)) => {
            // A stream ends with its final chunk: one that ends otherwise
            // fails, unbilled, rather than being billed as a whole result.
            tracing::warn!(job_id, why = %why, "a whole result for a streamed job");
            grid.fail_job_later(job_id, format!("node sent an invalid result: {why}"));
            return Err(refused(why));
        }
        Some(Ok(())) => {}
    }
    // The signature covers the whole result (up to the body limit): a long
    // one is checked off the async threads.
    let job = job_id.to_string();
    let size = req.sealed_result.as_ref().map_or(0, |r| r.ciphertext.len())
        + req.encrypted_result.as_ref().map_or(0, String::len);
    let (req, checked) = crate::cpu::run(size, move || {
        let checked = verify_complete(&signer, &job, &req);
        (req, checked)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "result check failed to run");
        NodeApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    })?;
    if let Err(why) = checked {
        return Err(reject(grid, job_id, "bad_signature", why));
    }
    let usage = req.usage.or_else(|| {
        req.encrypted_result
            .as_deref()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|v| serde_json::from_value(v.get("usage")?.clone()).ok())
    });
    if let Err(why) = check_usage(
        &owner,
        job_id,
        usage.as_ref(),
        req.usage_signature.as_deref(),
    ) {
        return Err(reject(grid, job_id, "bad_usage", why));
    }
    let outcome = Outcome::Completed {
        usage: usage.unwrap_or_default(),
        usage_signature: req.usage_signature.clone(),
        result_signature: req.result_envelope_signature.clone(),
    };
    grid.end_job(
        job_id,
        Some(JobEvent::Complete(req, Billed::default())),
        true,
        outcome,
    )
    .await
    .ok_or_else(|| NodeApiError::conflict("job already finished"))?;
    Ok(OkResponse { ok: true })
}

/// `POST /grid/jobs/{id}/chunk`: one stream chunk, or the abort form.
pub async fn chunk(
    grid: &Grid,
    headers: &HeaderMap,
    job_id: &str,
    req: ChunkRequest,
) -> Result<ChunkResponse, NodeApiError> {
    let owner = job_owner(grid, headers, job_id)?;
    let signer = owner.signer;
    if req.is_abort() {
        grid.end_job(
            job_id,
            Some(JobEvent::Failed("the node aborted the stream".into())),
            false,
            Outcome::Failed,
        )
        .await;
        return Ok(ChunkResponse {
            ok: true,
            closed: true,
        });
    }
    let (Some(head), Some(ct)) = (ChunkHead::of(&req), req.ciphertext.as_deref()) else {
        return Err(reject(
            grid,
            job_id,
            "invalid_chunk",
            "seq, final and ciphertext are required".into(),
        ));
    };
    if req.algorithm.as_deref() != Some(Algorithm::V2Stream.as_str()) {
        let alg = req.algorithm.clone().unwrap_or_default();
        return Err(reject(
            grid,
            job_id,
            "unsupported_algorithm",
            format!("chunk algorithm {alg:?} (expected the v2 stream tag)"),
        ));
    }
    if ct.len() > crate::proto::e2e::MAX_CHUNK_CIPHERTEXT_CHARS {
        return Err(reject(
            grid,
            job_id,
            "chunk_too_large",
            "chunk ciphertext over 256000 characters".into(),
        ));
    }
    // Order first: a chunk out of order is refused before its signature is
    // checked, and leaves the job alone; a repeat is answered again.
    let step = grid
        .lock()
        .job(job_id)
        .ok_or_else(|| NodeApiError::conflict("unknown or finished job"))?
        .stage()
        .classify(head, &req)
        .map_err(refused)?;
    if let ChunkStep::Repeat { closed } = step {
        return Ok(ChunkResponse { ok: true, closed });
    }
    let kind = ResultKind::Stream {
        seq: head.seq,
        is_final: head.is_final,
    };
    if let Err(e) = envelope::verify_result(
        &signer,
        job_id,
        kind,
        ct,
        req.result_envelope_signature.as_deref(),
        req.result_envelope_version.as_deref(),
    ) {
        return Err(reject(grid, job_id, "bad_signature", e.to_string()));
    }
    if head.is_final {
        if let Err(why) = check_usage(
            &owner,
            job_id,
            req.usage.as_ref(),
            req.usage_signature.as_deref(),
        ) {
            return Err(reject(grid, job_id, "bad_usage", why));
        }
    }
    // Take it: the stage may have moved while the signature was checked.
    let (step, tx) = {
        let mut inner = grid.lock();
        let job = inner
            .job_mut(job_id)
            .ok_or_else(|| NodeApiError::conflict("unknown or finished job"))?;
        let step = job.stage_mut().take_chunk(head, &req).map_err(refused)?;
        let tx = job.events.clone();
        inner.chunk_seen(job_id);
        (step, tx)
    };
    let closed = match step {
        ChunkStep::Repeat { closed } => closed,
        ChunkStep::Drop => true,
        ChunkStep::Settle => {
            // The client left: bill only the completion tokens delivered (§6.12).
            let outcome = Outcome::Aborted {
                completion_tokens: req.usage.map(|u| u.completion_tokens).unwrap_or(0),
                usage_signature: req.usage_signature.clone(),
            };
            grid.end_job(job_id, None, true, outcome).await;
            true
        }
        ChunkStep::Relay { is_final: true } => {
            // Bill (and settle a per-request payment) before the final chunk,
            // which completes the client's stream, is released.
            let outcome = Outcome::Completed {
                usage: req.usage.unwrap_or_default(),
                usage_signature: req.usage_signature.clone(),
                result_signature: req.result_envelope_signature.clone(),
            };
            let delivered = grid
                .end_job(job_id, Some(JobEvent::Chunk(req)), true, outcome)
                .await
                .unwrap_or(false);
            !delivered
        }
        ChunkStep::Relay { is_final: false } => {
            // In order: the node waits for this answer before posting the next chunk.
            let delivered = tx.send(JobEvent::Chunk(req)).await.is_ok();
            if !delivered {
                if let Some(job) = grid.lock().job_mut(job_id) {
                    job.stage_mut().client_gone();
                }
            }
            !delivered
        }
    };
    Ok(ChunkResponse { ok: true, closed })
}

/// `POST /grid/jobs/{id}/fail`: the job fails, unbilled.
pub async fn fail(
    grid: &Grid,
    headers: &HeaderMap,
    job_id: &str,
    req: FailRequest,
) -> Result<OkResponse, NodeApiError> {
    let owner = job_owner(grid, headers, job_id)?;
    let reason: String = req.reason.chars().take(500).collect();
    // The client's own sealed input did not open (§7f): its failure, not
    // the node's. In plain mode the coordinator sealed the input, so the
    // claim cannot be the client's fault and counts as a node failure.
    let client_fault = owner.client_sealed
        && req.code.as_deref() == Some(crate::proto::api::FAIL_BAD_SEALED_INPUT);
    tracing::info!(%job_id, reason = %reason, client_fault, "node failed a job");
    let (event, tally) = if client_fault {
        (JobEvent::BadInput(reason), None)
    } else {
        (JobEvent::Failed(reason), Some(false))
    };
    grid.end_job_tallied(job_id, Some(event), tally, Outcome::Failed)
        .await;
    Ok(OkResponse { ok: true })
}
