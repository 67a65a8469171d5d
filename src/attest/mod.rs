//! TEE evidence: sources (SEV-SNP, TDX, simulated) behind one trait, and the
//! verifier (certificate chain, policy, report_data binding).
//!
//! Owns: evidence collection and verification, the policy file, and the two
//! small clients for the vendors' key services (AMD KDS, Intel PCS/PCCS)
//! whose base URLs are configuration. May not touch: the engine, the node's
//! job path, the coordinator's registry.
//!
//! How the types fit (PROTOCOL.md §7a):
//!
//! - [`Evidence`] is the wire object `evidence`: a format tag, the raw report
//!   or quote, and optional SNP certificates / TDX collateral.
//! - [`source::EvidenceSource`] produces evidence for 64 bytes of report data;
//!   [`source::best_source`] picks the best one available on this machine and
//!   [`produce_evidence`] binds it to a node's keys and a challenge.
//! - [`Binding`] is what the report data must equal: the §7a hash of a node's
//!   keys and a challenge, or raw bytes given by the caller.
//! - [`Policy`] is the operator's verification policy (`attestation/policy.toml`).
//! - [`verify_evidence`] runs every check and returns a [`Verdict`] that lists
//!   each step with pass/fail and why. It never returns early on failure: every
//!   check that can be evaluated is, so an operator sees everything that is
//!   wrong at once, and `Verdict::verified` is true only when none failed.
//!
//! The verifier takes `now` from [`VerifyOptions`], never from the clock, so
//! tests pin it and the vendors' time-bounded samples verify.

pub mod canonical;
pub mod evidence;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod kds;
pub mod pcs;
pub mod policy;
pub mod roots;
pub mod sim;
pub mod snp;
pub mod source;
pub mod tdx;
pub mod verdict;
mod verify;

use thiserror::Error;

pub use evidence::{Evidence, EvidenceFormat, GpuEvidence, SnpCerts};
pub use policy::Policy;
pub use verdict::{AttestationLevel, Check, CheckStatus, Step, Verdict};
pub use verify::{verify_evidence, Binding, VerifyOptions};

use crate::proto::identity::{attestation_report_data, Ed25519Public, NodeId, X25519Public};

/// Errors of the attestation room. Verification failures are not errors: they
/// are failed checks in a [`Verdict`]. These are for collection, parsing of
/// configuration, and the vendor clients.
#[derive(Debug, Error)]
pub enum AttestError {
    #[error("invalid evidence: {0}")]
    InvalidEvidence(String),
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("no evidence source is available: {0}")]
    NoSource(String),
    #[error("evidence source {source_name}: {detail}")]
    Source {
        source_name: &'static str,
        detail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{service} request to {url} failed: {detail}")]
    Http {
        service: &'static str,
        url: String,
        detail: String,
    },
    #[error("{0}")]
    Parse(String),
}

impl AttestError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        AttestError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a node binds its evidence to (§7a). The report data is
/// `attestation_report_data(node_id, ed25519, x25519, key_version, challenge)`.
#[derive(Debug, Clone)]
pub struct NodeBinding {
    pub node_id: NodeId,
    pub ed25519: Ed25519Public,
    pub x25519: X25519Public,
    pub key_version: u32,
    pub challenge: String,
}

impl NodeBinding {
    pub fn report_data(&self) -> [u8; 64] {
        attestation_report_data(
            &self.node_id,
            &self.ed25519,
            &self.x25519,
            self.key_version,
            &self.challenge,
        )
    }
}

/// Produce evidence for a node's keys and a challenge from `source` (the node
/// agent's entry point; use [`source::best_source`] to choose the source).
/// Blocking: it talks to the kernel's guest interfaces.
pub fn produce_evidence(
    source: &dyn source::EvidenceSource,
    binding: &NodeBinding,
) -> Result<Evidence, AttestError> {
    source.collect(&binding.report_data())
}
