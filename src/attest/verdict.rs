//! The verdict: every check with pass/fail and why, in the order the verifier
//! ran them, so an operator or a client sees exactly which step failed.

use serde::{Deserialize, Serialize};

use super::evidence::{EvidenceFormat, SnpCerts};

/// One step of verification. The string forms are stable (they appear in
/// `--json` output and in logs, and the coordinator keeps them with a node's
/// record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Evidence shape and size limits.
    Format,
    /// Simulated evidence needs development mode; hardware evidence passes.
    DevMode,
    /// The report or quote parses.
    Parse,
    /// SNP: where the VCEK/VLEK came from (evidence, KDS, cache).
    Certificates,
    /// SNP: VEK ← ASK/ASVK ← pinned ARK, validity at the verification time.
    Chain,
    /// TDX: the collateral's source and validity at the verification time.
    Collateral,
    /// SNP report signature / TDX quote (PCK chain, CRLs, QE, signature) /
    /// simulated signature.
    Signature,
    /// SNP: the VEK's hwID equals the report's CHIP_ID.
    ChipId,
    /// SNP: the VEK's TCB extensions equal REPORTED_TCB.
    VekTcb,
    /// SNP: REPORTED_TCB at least the policy minimum; TDX: TCB status accepted.
    Tcb,
    /// The debug bit is clear (or the policy allows it).
    Debug,
    /// SNP: VMPL at most the policy's.
    Vmpl,
    /// SNP: signed by VCEK, or by VLEK when the policy allows it.
    KeyKind,
    /// Measurement (SNP MEASUREMENT, TDX MRTD/RTMR) on the allow-list.
    Measurement,
    /// The report data equals the binding.
    ReportData,
    /// The challenge in the binding is current.
    Freshness,
    /// GPU evidence: carried, not verified by this version (never claimed).
    Gpu,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Format => "format",
            Step::DevMode => "dev_mode",
            Step::Parse => "parse",
            Step::Certificates => "certificates",
            Step::Chain => "chain",
            Step::Collateral => "collateral",
            Step::Signature => "signature",
            Step::ChipId => "chip_id",
            Step::VekTcb => "vek_tcb",
            Step::Tcb => "tcb",
            Step::Debug => "debug",
            Step::Vmpl => "vmpl",
            Step::KeyKind => "key_kind",
            Step::Measurement => "measurement",
            Step::ReportData => "report_data",
            Step::Freshness => "freshness",
            Step::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Fail,
    /// Not checked, on purpose, and the detail says who decided that.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub step: Step,
    pub status: CheckStatus,
    pub detail: String,
}

/// §7a levels. `Simulated` never counts as hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestationLevel {
    Hardware,
    Simulated,
    None,
}

/// What the evidence says, for display and for the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_tcb: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcb_status: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub advisory_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr: Option<[String; 4]>,
}

/// The result of [`super::verify_evidence`].
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub format: EvidenceFormat,
    /// True exactly when no check failed.
    pub verified: bool,
    /// The level a registry may record: `none` unless verified.
    pub attestation_level: AttestationLevel,
    pub checks: Vec<Check>,
    /// `sha256:<hex>` of the canonical policy (§7a).
    pub policy_digest: String,
    /// The verification time (unix seconds) and its RFC 3339 form.
    pub verified_at_unix: u64,
    pub verified_at: String,
    pub claims: Claims,
    /// GPU evidence is carried but not verified by this version.
    pub gpu_verified: bool,
    /// Certificates the verifier fetched itself (§7b: the coordinator adds them
    /// to the published evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched_certs: Option<SnpCerts>,
    /// Collateral the verifier fetched itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched_collateral: Option<dcap_qvl::QuoteCollateralV3>,
}

impl Verdict {
    pub fn check(&self, step: Step) -> Option<&Check> {
        self.checks.iter().find(|c| c.step == step)
    }

    /// The status of `step`, or `None` when it was not part of this verdict.
    pub fn status(&self, step: Step) -> Option<CheckStatus> {
        self.check(step).map(|c| c.status)
    }

    pub fn failed_steps(&self) -> Vec<Step> {
        self.checks
            .iter()
            .filter(|c| c.status == CheckStatus::Fail)
            .map(|c| c.step)
            .collect()
    }

    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == CheckStatus::Fail)
    }

    /// The step-by-step text `sgl attest verify` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let mark = match c.status {
                CheckStatus::Pass => "PASS",
                CheckStatus::Fail => "FAIL",
                CheckStatus::Skipped => "SKIP",
            };
            s.push_str(&format!(
                "{mark:4}  {:<12}  {}\n",
                c.step.as_str(),
                c.detail
            ));
        }
        s.push_str(&format!("policy      {}\n", self.policy_digest));
        s.push_str(&format!("verified at {}\n", self.verified_at));
        match (self.verified, self.first_failure()) {
            (true, _) => s.push_str(&format!(
                "VERIFIED: {} evidence, level {}\n",
                self.format,
                match self.attestation_level {
                    AttestationLevel::Hardware => "hardware",
                    AttestationLevel::Simulated => "simulated (development only, not hardware)",
                    AttestationLevel::None => "none",
                }
            )),
            (false, Some(f)) => s.push_str(&format!(
                "REJECTED: {} evidence failed at step {}: {}\n",
                self.format, f.step, f.detail
            )),
            (false, None) => s.push_str("REJECTED\n"),
        }
        s
    }
}
