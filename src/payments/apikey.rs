//! API keys: `x402c_` + 43 base58 characters of 32 random bytes… shown once
//! at creation; only SHA-256(key) is stored, and lookups compare that hash
//! in constant time.

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub const PREFIX: &str = "x402c_";
/// Keys longer than this are refused before hashing.
pub const MAX_KEY_LEN: usize = 128;

/// A freshly minted key. `Debug` never shows the secret.
pub struct NewKey {
    pub secret: Zeroizing<String>,
    pub hash: [u8; 32],
    pub last4: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("secret", &"<redacted>")
            .field("last4", &self.last4)
            .finish()
    }
}

/// Mint a key from the OS RNG.
pub fn generate() -> NewKey {
    let mut raw = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut raw[..]);
    let secret = Zeroizing::new(format!("{PREFIX}{}", crate::proto::b58::encode(&raw[..])));
    let last4 = secret[secret.len() - 4..].to_owned();
    NewKey {
        hash: hash(&secret),
        secret,
        last4,
    }
}

/// SHA-256 of the key string.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two key hashes.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Whether `key` is shaped like a key this server issues (cheap filter
/// before touching the store).
pub fn well_formed(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN && key.starts_with(PREFIX) && key.len() > PREFIX.len() + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_unique_and_redacted() {
        let a = generate();
        let b = generate();
        assert!(a.secret.starts_with(PREFIX));
        assert!(well_formed(&a.secret));
        assert_ne!(*a.secret, *b.secret);
        assert_eq!(hash(&a.secret), a.hash);
        assert!(hashes_equal(&a.hash, &hash(&a.secret)));
        assert!(!hashes_equal(&a.hash, &b.hash));
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(&a.secret[PREFIX.len()..]));
    }
}
