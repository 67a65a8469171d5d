//! Simulated evidence (PROTOCOL.md §7a, `simulated`): for development and
//! tests only. The report is `"SGLSIM01"` (8) ‖ report_data (64) ‖
//! measurement (48) ‖ ed25519 signature (64) over the first 120 bytes, signed
//! by a simulated-TEE key generated on this machine. It proves nothing about
//! hardware: it is never reported as hardware, and a verifier refuses it
//! unless started in explicit development mode with that key named.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use super::AttestError;
use crate::private_file;
use crate::proto::identity::{Ed25519Public, Signature};

pub const MAGIC: &[u8; 8] = b"SGLSIM01";
pub const REPORT_LEN: usize = 184;
pub const SIGNED_LEN: usize = 120;

/// The file name of the simulated-TEE key in the node's config directory.
pub const KEY_FILE: &str = "simulated-tee-key.json";

/// A parsed simulated report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub signature: Signature,
    signed: [u8; SIGNED_LEN],
}

impl SimReport {
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.len() != REPORT_LEN {
            return Err(format!(
                "simulated report is {} bytes, expected {REPORT_LEN}",
                raw.len()
            ));
        }
        if &raw[..8] != MAGIC {
            return Err("simulated report does not start with SGLSIM01".into());
        }
        let mut report_data = [0u8; 64];
        report_data.copy_from_slice(&raw[8..72]);
        let mut measurement = [0u8; 48];
        measurement.copy_from_slice(&raw[72..120]);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&raw[120..184]);
        let mut signed = [0u8; SIGNED_LEN];
        signed.copy_from_slice(&raw[..SIGNED_LEN]);
        Ok(SimReport {
            report_data,
            measurement,
            signature: Signature(sig),
            signed,
        })
    }

    /// Verify under any of the named simulated-TEE keys.
    pub fn verify(&self, keys: &[Ed25519Public]) -> Result<Ed25519Public, String> {
        if keys.is_empty() {
            return Err("no simulated-TEE key is configured to verify it with".into());
        }
        keys.iter()
            .find(|k| k.verify(&self.signed, &self.signature).is_ok())
            .copied()
            .ok_or_else(|| {
                "the signature does not verify under any configured simulated-TEE key".into()
            })
    }
}

/// The simulated TEE's signing key. Not `Clone`; `Debug` shows the public key.
pub struct SimKey(SigningKey);

impl std::fmt::Debug for SimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimKey({}, <redacted>)", self.public())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    /// Says what this is to anyone who finds it.
    kind: String,
    seed_hex: String,
}

impl SimKey {
    pub fn generate() -> Self {
        SimKey(SigningKey::generate(&mut rand_core::OsRng))
    }

    pub fn public(&self) -> Ed25519Public {
        Ed25519Public(self.0.verifying_key().to_bytes())
    }

    /// Load the key at `path`, creating it (0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self, AttestError> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate();
        let file = KeyFile {
            kind: "sgl simulated TEE key (development only; proves nothing)".into(),
            seed_hex: hex::encode(key.0.to_bytes()),
        };
        let text = Zeroizing::new(serde_json::to_string_pretty(&file).unwrap_or_default());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AttestError::io(dir, e))?;
        }
        private_file::write(path, text.as_bytes())
            .map_err(|e| AttestError::Parse(e.to_string()))?;
        Ok(key)
    }

    pub fn load(path: &Path) -> Result<Self, AttestError> {
        private_file::tighten(path, private_file::FILE_MODE)
            .map_err(|e| AttestError::Parse(e.to_string()))?;
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| AttestError::io(path, e))?);
        let file: KeyFile = serde_json::from_str(&text)
            .map_err(|e| AttestError::Parse(format!("{}: {e}", path.display())))?;
        let seed = Zeroizing::new(
            hex::decode(&file.seed_hex)
                .map_err(|_| AttestError::Parse(format!("{}: seed is not hex", path.display())))?,
        );
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| AttestError::Parse(format!("{}: seed is not 32 bytes", path.display())))?;
        Ok(SimKey(SigningKey::from_bytes(&seed)))
    }

    /// Make a simulated report.
    pub fn report(&self, report_data: &[u8; 64], measurement: &[u8; 48]) -> Vec<u8> {
        let mut r = Vec::with_capacity(REPORT_LEN);
        r.extend_from_slice(MAGIC);
        r.extend_from_slice(report_data);
        r.extend_from_slice(measurement);
        let sig = self.0.sign(&r);
        r.extend_from_slice(&sig.to_bytes());
        r
    }
}

/// The simulated measurement: SHA-384 of the running executable, so that a
/// development policy can still pin which build produced the evidence.
pub fn self_measurement() -> [u8; 48] {
    let mut h = Sha384::new();
    match std::env::current_exe().and_then(std::fs::read) {
        Ok(bytes) => h.update(&bytes),
        Err(_) => h.update(b"sgl: executable unreadable"),
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = SimKey::generate();
        let r = k.report(&[7; 64], &[9; 48]);
        let p = SimReport::parse(&r).unwrap();
        assert_eq!(p.report_data, [7; 64]);
        assert_eq!(p.verify(&[k.public()]).unwrap(), k.public());
        assert!(p.verify(&[]).is_err());
        assert!(p.verify(&[SimKey::generate().public()]).is_err());
        for i in [0, 8, 100, 130] {
            let mut t = r.clone();
            t[i] ^= 1;
            assert!(SimReport::parse(&t)
                .and_then(|p| p.verify(&[k.public()]))
                .is_err());
        }
        assert!(!format!("{k:?}").contains(&hex::encode(k.0.to_bytes())));
    }
}
