//! Hardware evidence at the coordinator (PROTOCOL.md §7a): the attestation
//! room's verifier with this coordinator's policy, and what is kept of a
//! verdict for the public evidence document (§7b).

use super::state::Grid;
use crate::attest::{self, NodeBinding, VerifyOptions};
use crate::proto::api::{AttestationLevel, Evidence as WireEvidence};

/// Where the verifier fetches what evidence lacks (AMD KDS, Intel PCS or a
/// PCCS); the defaults of `sgl coordinator serve` name the vendors' own.
#[derive(Debug, Clone)]
pub struct VendorServices {
    pub kds_url: String,
    pub pcs_url: String,
    pub root_crl_url: String,
    pub cache_dir: Option<std::path::PathBuf>,
}

/// A verified piece of evidence.
#[derive(Debug)]
pub struct Accepted {
    pub level: AttestationLevel,
    pub policy_digest: String,
    /// Every step the verifier ran, as it ran them (shown by the grid
    /// explorer).
    pub checks: Vec<attest::Check>,
    /// The evidence as published: the node's, plus any certificates or
    /// collateral the verifier fetched itself.
    pub evidence: WireEvidence,
}

/// Verify a node's evidence; `Err` names every failed step.
pub async fn verify(
    grid: &Grid,
    wire: &WireEvidence,
    binding: NodeBinding,
) -> Result<Accepted, String> {
    let value = serde_json::to_vec(wire).map_err(|e| e.to_string())?;
    let evidence = attest::Evidence::from_json(&value).map_err(|e| e.to_string())?;
    let now = grid.config.clock.now_secs();
    let mut opts = VerifyOptions::new(now);
    opts.dev_mode = grid.config.dev;
    // In development mode the measurement of a simulated or test enclave is
    // not on any allow-list; the verdict records that it was skipped.
    opts.allow_any_measurement = grid.config.dev;
    opts.simulated_keys = grid.config.simulated_tee_keys.clone();
    if let Some(v) = &grid.config.vendor_services {
        opts =
            opts.with_vendor_services(&v.kds_url, &v.pcs_url, &v.root_crl_url, v.cache_dir.clone());
    }
    let binding = attest::Binding::Node {
        binding,
        challenge_expires_at: None,
    };
    let verdict = attest::verify_evidence(&evidence, &binding, &grid.config.policy, &opts).await;
    if !verdict.verified {
        let failed: Vec<String> = verdict
            .checks
            .iter()
            .filter(|c| c.status == attest::CheckStatus::Fail)
            .map(|c| format!("{:?}: {}", c.step, c.detail))
            .collect();
        return Err(format!("evidence rejected: {}", failed.join("; ")));
    }
    let level = match verdict.attestation_level {
        attest::AttestationLevel::Hardware => AttestationLevel::Hardware,
        attest::AttestationLevel::Simulated => AttestationLevel::Simulated,
        attest::AttestationLevel::None => return Err("evidence verified at no level".into()),
    };
    let mut published = evidence.clone();
    if published.certs.is_none() {
        published.certs = verdict.fetched_certs.clone();
    }
    if published.collateral.is_none() {
        published.collateral = verdict.fetched_collateral.clone();
    }
    let evidence: WireEvidence = serde_json::to_value(&published)
        .and_then(serde_json::from_value)
        .map_err(|e| e.to_string())?;
    Ok(Accepted {
        level,
        policy_digest: verdict.policy_digest,
        checks: verdict.checks,
        evidence,
    })
}
