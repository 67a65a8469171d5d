//! The verification policy: a TOML file (`attestation/policy.toml` is the
//! default and is compiled in), parsed strictly (unknown keys are errors, so a
//! typo cannot silently loosen it), and identified by a digest: the SHA-256 of
//! the RFC 8785 canonical JSON of the parsed policy (§7a `policy_digest`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::canonical::canonical_json;
use super::AttestError;

/// The default policy shipped with the code.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../attestation/policy.toml");
/// The largest policy file accepted.
pub const MAX_POLICY_FILE: u64 = 1 << 20;

/// A 48-byte measurement (SNP MEASUREMENT, TDX MRTD/RTMR), written as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Measurement(pub [u8; 48]);

impl std::fmt::Debug for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Measurement({})", hex::encode(self.0))
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Measurement {
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s.trim()).map_err(|e| format!("{s:?}: not hex: {e}"))?;
        let arr: [u8; 48] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{s:?}: {} bytes, expected 48", b.len()))?;
        Ok(Measurement(arr))
    }
}

impl Serialize for Measurement {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Measurement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Measurement::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A minimum SEV-SNP TCB: each security version number must be at least this.
/// `fmc` applies to Turin and later only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpPolicy {
    /// Accept a guest whose policy allows debugging. Development only.
    #[serde(default)]
    pub allow_debug: bool,
    /// The highest VMPL (privilege level) the report may come from.
    #[serde(default)]
    pub max_vmpl: u32,
    /// Accept reports signed by a VLEK (a key the cloud provider loaded)
    /// as well as by the chip's own VCEK.
    #[serde(default)]
    pub allow_vlek: bool,
    /// Minimum TCB per product (`milan`, `genoa`, `turin`). A product missing
    /// here is refused.
    #[serde(default)]
    pub min_tcb: BTreeMap<String, MinTcb>,
    /// Accepted launch measurements. Empty refuses every report unless the
    /// verifier is told to skip the measurement check.
    #[serde(default)]
    pub measurements: Vec<Measurement>,
}

/// One accepted TDX configuration. An absent RTMR is not checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxReference {
    pub mrtd: Measurement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<Measurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr1: Option<Measurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr2: Option<Measurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr3: Option<Measurement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxPolicy {
    /// TCB statuses (as Intel's TCB info names them) that are accepted.
    #[serde(default = "default_tcb_status")]
    pub accepted_tcb_status: Vec<String>,
    /// Accept a TD with the DEBUG attribute. Development only.
    #[serde(default)]
    pub allow_debug: bool,
    /// Accepted MRTD/RTMR combinations.
    #[serde(default)]
    pub reference: Vec<TdxReference>,
}

fn default_tcb_status() -> Vec<String> {
    vec!["UpToDate".to_string()]
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedPolicy {
    /// Accepted measurements of simulated evidence; empty means the
    /// measurement is not checked (simulated evidence proves nothing anyway,
    /// and is accepted only in development mode).
    #[serde(default)]
    pub measurements: Vec<Measurement>,
}

/// The whole policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy format version; this code reads version 1.
    pub version: u32,
    pub snp: SnpPolicy,
    pub tdx: TdxPolicy,
    #[serde(default)]
    pub simulated: SimulatedPolicy,
}

impl Policy {
    /// The compiled-in default (`attestation/policy.toml`).
    pub fn default_policy() -> Self {
        // The file ships with the code and a unit test parses it.
        Self::from_toml(DEFAULT_POLICY_TOML)
            .unwrap_or_else(|e| panic!("attestation/policy.toml: {e}"))
    }

    pub fn from_toml(text: &str) -> Result<Self, AttestError> {
        let p: Policy =
            toml::from_str(text).map_err(|e| AttestError::InvalidPolicy(e.to_string()))?;
        if p.version != 1 {
            return Err(AttestError::InvalidPolicy(format!(
                "policy version {} (this sgl reads version 1)",
                p.version
            )));
        }
        for k in p.snp.min_tcb.keys() {
            if !matches!(k.as_str(), "milan" | "genoa" | "turin") {
                return Err(AttestError::InvalidPolicy(format!(
                    "snp.min_tcb.{k}: unknown product (milan, genoa, turin)"
                )));
            }
        }
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self, AttestError> {
        let meta = std::fs::metadata(path).map_err(|e| AttestError::io(path, e))?;
        if meta.len() > MAX_POLICY_FILE {
            return Err(AttestError::InvalidPolicy(format!(
                "{} is larger than {MAX_POLICY_FILE} bytes",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| AttestError::io(path, e))?;
        Self::from_toml(&text)
    }

    /// The RFC 8785 canonical JSON of the parsed policy.
    pub fn canonical_json(&self) -> String {
        // A policy holds only integers, strings, booleans and containers, so
        // both steps succeed; an empty string would still hash distinctly.
        serde_json::to_value(self)
            .ok()
            .and_then(|v| canonical_json(&v))
            .unwrap_or_default()
    }

    /// `sha256:<hex>` of [`Policy::canonical_json`].
    pub fn digest(&self) -> String {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses_and_is_strict() {
        let p = Policy::default_policy();
        assert!(!p.snp.allow_debug);
        assert!(!p.tdx.allow_debug);
        assert_eq!(p.snp.max_vmpl, 0);
        assert_eq!(p.tdx.accepted_tcb_status, vec!["UpToDate".to_string()]);
        assert!(p.digest().starts_with("sha256:"));
        // Formatting does not change the digest; content does.
        let reformatted = DEFAULT_POLICY_TOML.replace(" = ", "=");
        assert_eq!(
            Policy::from_toml(&reformatted).unwrap().digest(),
            p.digest()
        );
        let mut q = p.clone();
        q.snp.max_vmpl = 1;
        assert_ne!(q.digest(), p.digest());
    }

    #[test]
    fn typos_and_bad_values_are_refused() {
        let base = DEFAULT_POLICY_TOML;
        assert!(Policy::from_toml(&base.replace("allow_debug", "alow_debug")).is_err());
        assert!(Policy::from_toml(&base.replace("version = 1", "version = 2")).is_err());
        let extra = format!(
            "{base}\n[snp.min_tcb.naples]\nbootloader = 0\ntee = 0\nsnp = 0\nmicrocode = 0\n"
        );
        assert!(Policy::from_toml(&extra).is_err());
        assert!(Measurement::from_hex("00").is_err());
    }
}
