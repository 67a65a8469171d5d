//! Node identity (PROTOCOL.md §2): the ed25519 keypair, the X25519 key derived
//! from its seed, `keypair.json`, the keybind signature and the attestation
//! report_data binding (§7a).
//!
//! The derivation `x25519_secret = SHA-256("sgl-x25519-derive:" ‖ seed)` is the
//! protocol's own, not the birational ed25519→curve25519 map.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256, Sha512};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{b58, ProtoError};

/// The keybind message label (§2.4).
pub const KEYBIND_LABEL: &[u8] = b"SGL-NODE-KEYBIND-v1";
/// The attestation binding label (§7a).
pub const ATTEST_LABEL: &[u8] = b"SGL-ATTEST-v1";
/// The X25519 derivation prefix (§2.3), 18 ASCII bytes.
const X25519_DERIVE_PREFIX: &[u8] = b"sgl-x25519-derive:";
/// The key version sgl nodes publish (§2.5).
pub const KEY_VERSION: u32 = 1;

/// A node id: a UUID, shown as the canonical lowercase dashed text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(uuid::Uuid);

impl NodeId {
    pub fn new_random() -> Self {
        NodeId(uuid::Uuid::new_v4())
    }

    /// Accepts the dashed form in either case, as PYSDK does
    /// (`str(UUID(x)) == x.lower()`); refuses braces, URNs and the undashed form.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(ProtoError::InvalidNodeId);
        }
        for (i, c) in b.iter().enumerate() {
            let ok = match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            };
            if !ok {
                return Err(ProtoError::InvalidNodeId);
            }
        }
        uuid::Uuid::parse_str(s)
            .map(NodeId)
            .map_err(|_| ProtoError::InvalidNodeId)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

macro_rules! key_newtype {
    ($(#[$m:meta])* $name:ident, $len:expr, $what:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn from_b58(s: &str) -> Result<Self, ProtoError> {
                b58::decode_array::<$len>(s, $what).map($name)
            }
            pub fn to_b58(&self) -> String {
                b58::encode(&self.0)
            }
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_b58())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_b58())
            }
        }
    };
}

key_newtype!(
    /// An ed25519 public key (the node's identity on the wire).
    Ed25519Public, 32, "ed25519 public key"
);
key_newtype!(
    /// An X25519 public key.
    X25519Public, 32, "X25519 public key"
);
key_newtype!(
    /// An ed25519 signature, b58 on the wire.
    Signature, 64, "ed25519 signature"
);

impl Ed25519Public {
    /// Verify `sig` over `msg`. Strict verification: no malleable signatures.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> Result<(), ProtoError> {
        let vk = verifying_key(&self.0)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        vk.verify_strict(msg, &sig)
            .map_err(|_| ProtoError::BadSignature)
    }
}

/// The verifying keys of the signers seen lately, most recent first:
/// decompressing a key costs about as much as a third of a verification,
/// and a coordinator checks two signatures of the same few nodes per job.
static VERIFYING: std::sync::Mutex<std::collections::VecDeque<([u8; 32], VerifyingKey)>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const VERIFYING_SLOTS: usize = 64;

/// The decompressed key of `bytes`, remembered.
fn verifying_key(bytes: &[u8; 32]) -> Result<VerifyingKey, ProtoError> {
    let lock = || VERIFYING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, vk)) = lock().iter().find(|(b, _)| b == bytes) {
        return Ok(*vk);
    }
    let vk = VerifyingKey::from_bytes(bytes).map_err(|_| ProtoError::BadSignature)?;
    let mut seen = lock();
    seen.push_front((*bytes, vk));
    seen.truncate(VERIFYING_SLOTS);
    Ok(vk)
}

/// The node's secret identity: the ed25519 signing key and the X25519 secret
/// derived from its seed. Not `Clone`, not `Serialize`; `Debug` shows public
/// halves only; the secrets are zeroized on drop.
pub struct NodeIdentity {
    signing: SigningKey,
    x25519: StaticSecret,
    /// The public half, computed once: every sealed job's AAD names it.
    x25519_public: X25519Public,
    /// Input keys agreed with senders' ephemeral keys lately.
    inputs: super::e2e::KeyMemo,
    /// Ephemeral keys kept for the replies to each response key.
    outputs: super::e2e::OutputKeys,
}

impl NodeIdentity {
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let mut h = Sha256::new();
        h.update(X25519_DERIVE_PREFIX);
        h.update(seed);
        let digest: Zeroizing<[u8; 32]> = Zeroizing::new(h.finalize().into());
        let x25519 = StaticSecret::from(*digest);
        NodeIdentity {
            signing,
            x25519_public: X25519Public(PublicKey::from(&x25519).to_bytes()),
            x25519,
            inputs: Default::default(),
            outputs: Default::default(),
        }
    }

    pub fn generate() -> Self {
        Self::generate_with_rng(&mut rand_core::OsRng)
    }

    pub fn generate_with_rng<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    pub fn ed25519_public(&self) -> Ed25519Public {
        Ed25519Public(self.signing.verifying_key().to_bytes())
    }

    pub fn x25519_public(&self) -> X25519Public {
        self.x25519_public
    }

    pub(crate) fn x25519_secret(&self) -> &StaticSecret {
        &self.x25519
    }

    pub(crate) fn kept_inputs(&self) -> &super::e2e::KeyMemo {
        &self.inputs
    }

    pub(crate) fn kept_outputs(&self) -> &super::e2e::OutputKeys {
        &self.outputs
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature(self.signing.sign(msg).to_bytes())
    }

    /// `keypair.json`: a JSON array of 64 integers, seed then public key (§2.1).
    pub fn to_keypair_json(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(64));
        bytes.extend_from_slice(self.signing.as_bytes());
        bytes.extend_from_slice(&self.ed25519_public().0);
        let parts: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
        Zeroizing::new(format!("[{}]", parts.join(",")))
    }

    /// Load `keypair.json`. Exactly 64 integers 0–255; only the seed is used and
    /// the public key is recomputed, and a stored public key that disagrees is refused.
    pub fn from_keypair_json(text: &str) -> Result<Self, ProtoError> {
        let values: Zeroizing<Vec<u64>> = Zeroizing::new(
            serde_json::from_str(text)
                .map_err(|_| ProtoError::Keypair("not a JSON array of integers"))?,
        );
        if values.len() != 64 {
            return Err(ProtoError::Keypair("expected exactly 64 integers"));
        }
        let mut bytes = Zeroizing::new([0u8; 64]);
        for (dst, v) in bytes.iter_mut().zip(values.iter()) {
            *dst = u8::try_from(*v).map_err(|_| ProtoError::Keypair("integer out of 0..=255"))?;
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[..32]);
        let id = Self::from_seed(&seed);
        if id.ed25519_public().0[..] != bytes[32..] {
            return Err(ProtoError::Keypair("public key does not match the seed"));
        }
        Ok(id)
    }

    /// The keybind signature (§2.4) for this identity's own X25519 key.
    pub fn sign_keybind(&self, node_id: &NodeId, key_version: u32) -> Signature {
        let msg = keybind_message(
            node_id,
            &self.ed25519_public(),
            &self.x25519_public(),
            key_version,
        );
        self.sign(&msg)
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("ed25519", &self.ed25519_public())
            .field("x25519", &self.x25519_public())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The 104-byte keybind message (§2.4).
pub fn keybind_message(
    node_id: &NodeId,
    ed: &Ed25519Public,
    x: &X25519Public,
    key_version: u32,
) -> [u8; 104] {
    let mut m = [0u8; 104];
    m[..19].copy_from_slice(KEYBIND_LABEL);
    m[19] = 0;
    m[20..36].copy_from_slice(node_id.as_bytes());
    m[36..68].copy_from_slice(&ed.0);
    m[68..100].copy_from_slice(&x.0);
    m[100..].copy_from_slice(&key_version.to_le_bytes());
    m
}

/// Verify a keybind as PYSDK does: a canonical dashed UUID (either case), both
/// keys 32 bytes, a 64-byte signature over the message.
pub fn verify_keybind(
    node_id: &str,
    ed: &Ed25519Public,
    x: &X25519Public,
    key_version: u32,
    sig: &Signature,
) -> Result<(), ProtoError> {
    let id = NodeId::parse(node_id)?;
    ed.verify(&keybind_message(&id, ed, x, key_version), sig)
}

/// The 64 bytes of TEE report data that bind evidence to a node's keys and a
/// coordinator challenge (§7a):
/// `SHA-512("SGL-ATTEST-v1" ‖ 0x00 ‖ uuid(16) ‖ ed25519(32) ‖ x25519(32) ‖ key_version(u32 LE) ‖ challenge)`.
pub fn attestation_report_data(
    node_id: &NodeId,
    ed: &Ed25519Public,
    x: &X25519Public,
    key_version: u32,
    challenge: &str,
) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(ATTEST_LABEL);
    h.update([0u8]);
    h.update(node_id.as_bytes());
    h.update(ed.0);
    h.update(x.0);
    h.update(key_version.to_le_bytes());
    h.update(challenge.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_matches_protocol_example() {
        let id = NodeIdentity::from_seed(&[0x42; 32]);
        assert_eq!(
            id.ed25519_public().to_b58(),
            "3F5qRPtKg8GhGNnbd3qCj6nVJxWsGxq7pvH84okYLAqf"
        );
        assert_eq!(
            id.x25519_public().to_b58(),
            "A2MEKT8hNfpfNCrf9QyQesHWxnfxgS3TuL5DcX6jBwxT"
        );
        assert_eq!(
            hex::encode(id.x25519_secret().to_bytes()),
            "3d05e9880c86ab93697e2886a82eda7f6eee4cf239517b5c7358a02e3dfc5bdb"
        );
    }

    #[test]
    fn keybind_protocol_vectors() {
        let node_id = NodeId::parse("f617ee39-17e3-4904-9474-112446c9326a").unwrap();
        let id = NodeIdentity::from_seed(&[0x07; 32]);
        let x = X25519Public([0x09; 32]);
        let msg = keybind_message(&node_id, &id.ed25519_public(), &x, 1);
        assert_eq!(
            hex::encode(msg),
            "53474c2d4e4f44452d4b455942494e442d763100f617ee3917e349049474112446c9326a\
             ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c\
             0909090909090909090909090909090909090909090909090909090909090909\
             01000000"
        );
        assert_eq!(
            id.ed25519_public().to_b58(),
            "GmaDrppBC7P5ARKV8g3djiwP89vz1jLK23V2GBjuAEGB"
        );
        assert_eq!(
            id.sign(&msg).to_b58(),
            "4jBsDkZf16V7j8jCGm6HzupyWbG75CDHpv8EKo2SmSJ5A3LUSKhEUdtgvypBdpeLq638i5asyU9tpKjEGzL3xjHj"
        );
        let a = NodeIdentity::from_seed(&[0x42; 32]);
        assert_eq!(
            a.sign_keybind(&node_id, 1).to_b58(),
            "TnTrHD8Rwm76xoPFWconN5mCQAsn1dhTrLtFH55za1b9g4zJ6ADGaLNQLSq4VC9Fw5jWs7YDiTo4iPyWmHy83WL"
        );
    }

    #[test]
    fn attestation_binding_vector() {
        let id = NodeIdentity::from_seed(&[0x42; 32]);
        let node_id = NodeId::parse("f617ee39-17e3-4904-9474-112446c9326a").unwrap();
        let challenge = "3f6c0d2a9b8e7f1021324354657687988a9bacbdcedfe0f1a2b3c4d5e6f70819";
        let rd = attestation_report_data(
            &node_id,
            &id.ed25519_public(),
            &id.x25519_public(),
            1,
            challenge,
        );
        assert_eq!(
            hex::encode(rd),
            "dba94ac570f795af9e50a0fe75316bfb0b786cdaca096ab99ed00c201b18daacd33f374d346f094fa8af9b3e90479a84daf9fdc1ab8419bf5db2918a592d3fc3"
        );
        assert_eq!(
            id.sign(challenge.as_bytes()).to_b58(),
            "5iCizu68CNttzwp8Vrj1g5XuAazGeDhWt9a2UGedJa6QDyqvSK6Z5MMJteL1Q4ta4XYMbZvsRSAUvfD5HmBtfwgx"
        );
    }

    #[test]
    fn node_id_forms() {
        assert!(NodeId::parse("F617EE39-17E3-4904-9474-112446C9326A").is_ok());
        assert!(NodeId::parse("f617ee3917e349049474112446c9326a").is_err());
        assert!(NodeId::parse("{f617ee39-17e3-4904-9474-112446c9326a}").is_err());
        let id = NodeId::parse("F617EE39-17E3-4904-9474-112446C9326A").unwrap();
        assert_eq!(id.to_string(), "f617ee39-17e3-4904-9474-112446c9326a");
    }

    #[test]
    fn keypair_json_round_trip_and_refusals() {
        let id = NodeIdentity::from_seed(&[0x42; 32]);
        let text = id.to_keypair_json();
        let back = NodeIdentity::from_keypair_json(&text).unwrap();
        assert_eq!(back.ed25519_public(), id.ed25519_public());
        assert!(NodeIdentity::from_keypair_json("[1,2,3]").is_err());
        assert!(
            NodeIdentity::from_keypair_json(&format!("[{}]", vec!["256"; 64].join(","))).is_err()
        );
        let mut v: Vec<u64> = serde_json::from_str(&text).unwrap();
        v[63] ^= 1;
        assert!(NodeIdentity::from_keypair_json(&serde_json::to_string(&v).unwrap()).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let seed = [0x42u8; 32];
        let id = NodeIdentity::from_seed(&seed);
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&hex::encode(seed)));
        assert!(!dbg.contains(&hex::encode(id.x25519_secret().to_bytes())));
        assert!(!dbg.contains("66, 66"));
        assert!(dbg.contains("redacted"));
    }
}
