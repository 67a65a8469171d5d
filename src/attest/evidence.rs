//! The `evidence` object of PROTOCOL.md §7a, with size limits on every field.
//!
//! ```json
//! {"format": "sev-snp" | "tdx" | "simulated",
//!  "report": "<base64>",
//!  "certs": {"vcek" | "vlek": "<base64 DER>", "ask": "<base64 DER>", "ark": "<base64 DER>"},
//!  "collateral": { dcap-qvl QuoteCollateralV3 },
//!  "gpu": [ {"vendor", "arch", "evidence", "certificate_chain"} ]}
//! ```
//!
//! Unknown keys are ignored, as everywhere in the protocol.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::AttestError;

/// The largest evidence JSON accepted (TDX collateral with a full PCK CRL is
/// the big part; Intel's are tens of KiB).
pub const MAX_EVIDENCE_JSON: usize = 1 << 20;
/// The largest raw report or quote (an SNP report is 1184 bytes; a TDX quote
/// with its PCK chain is about 5 KiB).
pub const MAX_REPORT: usize = 64 * 1024;
/// The largest certificate in `certs`.
pub const MAX_CERT: usize = 16 * 1024;
/// The largest GPU evidence or certificate chain entry.
pub const MAX_GPU_BLOB: usize = 256 * 1024;
/// The most GPU entries.
pub const MAX_GPUS: usize = 16;

/// Which kind of evidence this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EvidenceFormat {
    #[serde(rename = "sev-snp")]
    SevSnp,
    #[serde(rename = "tdx")]
    Tdx,
    /// Development only: never hardware, refused outside development mode.
    #[serde(rename = "simulated")]
    Simulated,
}

impl EvidenceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceFormat::SevSnp => "sev-snp",
            EvidenceFormat::Tdx => "tdx",
            EvidenceFormat::Simulated => "simulated",
        }
    }
}

impl std::fmt::Display for EvidenceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes carried as standard base64 with padding.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct B64Bytes(pub Vec<u8>);

impl std::fmt::Debug for B64Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "B64Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for B64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s.trim())
            .map(B64Bytes)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// SEV-SNP certificates that came with the evidence (or that a verifier
/// fetched and adds, §7b). `ark` is only ever compared with the pinned root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpCerts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcek: Option<B64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlek: Option<B64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask: Option<B64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ark: Option<B64Bytes>,
}

impl SnpCerts {
    pub fn is_empty(&self) -> bool {
        self.vcek.is_none() && self.vlek.is_none() && self.ask.is_none() && self.ark.is_none()
    }
}

/// GPU confidential-computing evidence (§7a `gpu`). Carried, never verified
/// by this version of sgl, and it never changes the attestation level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEvidence {
    pub vendor: String,
    pub arch: String,
    pub evidence: B64Bytes,
    pub certificate_chain: B64Bytes,
}

/// The `evidence` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub format: EvidenceFormat,
    pub report: B64Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<SnpCerts>,
    /// TDX only: dcap-qvl's `QuoteCollateralV3` (byte fields as hex strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collateral: Option<dcap_qvl::QuoteCollateralV3>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu: Vec<GpuEvidence>,
}

impl Evidence {
    /// Parse the JSON object with the size limits applied.
    pub fn from_json(text: &[u8]) -> Result<Self, AttestError> {
        if text.len() > MAX_EVIDENCE_JSON {
            return Err(AttestError::InvalidEvidence(format!(
                "evidence JSON is {} bytes, more than the {} allowed",
                text.len(),
                MAX_EVIDENCE_JSON
            )));
        }
        let ev: Evidence = serde_json::from_slice(text)
            .map_err(|e| AttestError::InvalidEvidence(format!("not an evidence object: {e}")))?;
        ev.check_limits()?;
        Ok(ev)
    }

    pub fn to_json_pretty(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The size limits, and which extras belong to which format.
    pub fn check_limits(&self) -> Result<(), AttestError> {
        let bad = |m: String| Err(AttestError::InvalidEvidence(m));
        if self.report.0.is_empty() || self.report.0.len() > MAX_REPORT {
            return bad(format!(
                "report is {} bytes (1..={MAX_REPORT} allowed)",
                self.report.0.len()
            ));
        }
        if let Some(c) = &self.certs {
            if self.format != EvidenceFormat::SevSnp {
                return bad("certs apply to sev-snp evidence only".into());
            }
            for (name, v) in [
                ("vcek", &c.vcek),
                ("vlek", &c.vlek),
                ("ask", &c.ask),
                ("ark", &c.ark),
            ] {
                if let Some(b) = v {
                    if b.0.is_empty() || b.0.len() > MAX_CERT {
                        return bad(format!("certs.{name} is {} bytes", b.0.len()));
                    }
                }
            }
            if c.vcek.is_some() && c.vlek.is_some() {
                return bad("certs has both vcek and vlek".into());
            }
        }
        if self.collateral.is_some() && self.format != EvidenceFormat::Tdx {
            return bad("collateral applies to tdx evidence only".into());
        }
        if self.gpu.len() > MAX_GPUS {
            return bad(format!(
                "{} GPU entries (at most {MAX_GPUS})",
                self.gpu.len()
            ));
        }
        for g in &self.gpu {
            if g.evidence.0.len() > MAX_GPU_BLOB || g.certificate_chain.0.len() > MAX_GPU_BLOB {
                return bad("a GPU evidence entry is too large".into());
            }
            if g.vendor.len() > 64 || g.arch.len() > 64 {
                return bad("a GPU vendor or arch string is too long".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_unknown_keys() {
        let text = br#"{"format":"sev-snp","report":"AAEC","certs":{"vcek":"AQ=="},"future":1}"#;
        let ev = Evidence::from_json(text).unwrap();
        assert_eq!(ev.format, EvidenceFormat::SevSnp);
        assert_eq!(ev.report.0, vec![0, 1, 2]);
        let back = Evidence::from_json(ev.to_json_pretty().as_bytes()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn refuses_misplaced_extras_and_bad_sizes() {
        for bad in [
            r#"{"format":"tdx","report":"AAEC","certs":{"vcek":"AQ=="}}"#,
            r#"{"format":"sev-snp","report":""}"#,
            r#"{"format":"sev-snp","report":"!!"}"#,
            r#"{"format":"sgx","report":"AAEC"}"#,
            r#"{"format":"sev-snp","report":"AAEC","certs":{"vcek":"AQ==","vlek":"AQ=="}}"#,
        ] {
            assert!(Evidence::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let big = vec![b' '; MAX_EVIDENCE_JSON + 1];
        assert!(Evidence::from_json(&big).is_err());
    }
}
