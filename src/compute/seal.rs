//! Root passwords at rest: ChaCha20-Poly1305 under the coordinator's
//! compute secret, bound to the order id (associated data), so a sealed
//! value copied to another row does not open. Stored as base64 of
//! nonce ‖ ciphertext; erased once read.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open under this secret")]
    Open,
}

/// The sealing key.
#[derive(Clone)]
pub struct Sealer {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Sealer {
        Sealer {
            key: Zeroizing::new(key),
        }
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Sealer> {
        let bytes = Zeroizing::new(hex::decode(s.trim()).ok()?);
        let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(Sealer::new(key))
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(self.key.as_slice()))
    }

    pub fn seal(&self, order_id: &str, secret: &str) -> String {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: order_id.as_bytes(),
                },
            )
            // Encryption of an in-memory buffer cannot fail for this AEAD.
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        STANDARD.encode(out)
    }

    pub fn open(&self, order_id: &str, sealed: &str) -> Result<Zeroizing<String>, SealError> {
        let raw = STANDARD.decode(sealed).map_err(|_| SealError::Malformed)?;
        if raw.len() < 12 + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: order_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        String::from_utf8(pt)
            .map(Zeroizing::new)
            .map_err(|_| SealError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_passwords_open_only_for_their_order() {
        let s = Sealer::new([7; 32]);
        let sealed = s.seal("order-1", "v5{Fkvb#2ycPGwHs");
        assert!(!sealed.contains("Fkvb"));
        assert_eq!(
            s.open("order-1", &sealed).unwrap().as_str(),
            "v5{Fkvb#2ycPGwHs"
        );
        assert!(s.open("order-2", &sealed).is_err());
        assert!(Sealer::new([8; 32]).open("order-1", &sealed).is_err());
        assert!(Sealer::from_hex("00").is_none());
        assert!(Sealer::from_hex(&"ab".repeat(32)).is_some());
    }
}
