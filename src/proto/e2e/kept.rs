//! Keys kept across messages, so that a busy sender or receiver does not pay
//! an X25519 scalar multiplication (tens of microseconds) for every one.
//!
//! §3 derives each direction's AEAD key from one X25519 agreement. Every
//! message still gets a fresh random 24-byte nonce, and XChaCha20's nonce is
//! long enough to be drawn at random for as many messages as a key will ever
//! see, so a key used for many messages never repeats a nonce. The AAD
//! still names both public keys, and whoever opens a message derives the key
//! from the public keys it carries, exactly as for a one-off key: the wire
//! format does not change and a peer cannot tell.
//!
//! - [`KeyMemo`]: keys already agreed with a peer public key seen lately.
//!   A memo of a pure function: the node opening inputs from a sender that
//!   keeps its ephemeral key, a response key opening replies from a node
//!   that keeps its own.
//! - [`OutputKeys`]: the node's ephemeral key for the replies to one response
//!   key, kept for [`KEEP_FOR`].
//! - [`SealChannel`]: one ephemeral key and one response key for the
//!   requests of one sender to one node, which the coordinator keeps per
//!   node for the requests it seals itself (plain mode, where it is the
//!   client), for [`KEEP_FOR`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{
    b58, input_aad, output_aad, random_secret, AeadKey, EncEnvelope, ResponseKey, SealedResult,
    ALG_V2, HKDF_INFO_INPUT, HKDF_INFO_OUTPUT,
};
use crate::proto::identity::X25519Public;
use crate::proto::ProtoError;

/// How long a kept ephemeral key serves before a new one is drawn: a key in
/// memory exposes at most this long a window of messages.
pub const KEEP_FOR: Duration = Duration::from_secs(60);

/// The peers a [`KeyMemo`] remembers, most recent first.
const MEMO_SLOTS: usize = 32;
/// The response keys an [`OutputKeys`] keeps an ephemeral key for.
const OUTPUT_SLOTS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is a cache: whatever a panicking holder left is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Memo {
    peer: [u8; 32],
    info: &'static [u8],
    okm: Zeroizing<[u8; 32]>,
}

/// Keys one secret agreed lately, by peer public key and direction.
#[derive(Default)]
pub struct KeyMemo(Mutex<VecDeque<Memo>>);

impl KeyMemo {
    /// [`AeadKey::agree`], remembered: what agreeing again would give.
    pub(super) fn agree(
        &self,
        secret: &StaticSecret,
        peer: &X25519Public,
        info: &'static [u8],
    ) -> Result<AeadKey, ProtoError> {
        // Public keys are public: comparing them need not be constant-time.
        if let Some(m) = lock(&self.0)
            .iter()
            .find(|m| m.peer == peer.0 && m.info == info)
        {
            return Ok(AeadKey(Zeroizing::new(*m.okm)));
        }
        let key = AeadKey::agree(secret, peer, info)?;
        let mut memo = lock(&self.0);
        memo.push_front(Memo {
            peer: peer.0,
            info,
            okm: Zeroizing::new(*key.0),
        });
        memo.truncate(MEMO_SLOTS);
        Ok(key)
    }
}

struct Kept {
    reply_to: [u8; 32],
    eph_b58: String,
    okm: Zeroizing<[u8; 32]>,
    since: Instant,
}

/// The node's kept ephemeral keys for sealing replies (§3.5), by response
/// key: a client that sends many requests with one response key (the
/// coordinator in plain mode) gets its replies under one kept key, opened
/// with one agreement on its side.
#[derive(Default)]
pub struct OutputKeys(Mutex<VecDeque<Kept>>);

impl OutputKeys {
    /// Seal a non-stream reply to `reply_to`, under the ephemeral key kept
    /// for it or a fresh one.
    pub fn seal<R: RngCore + CryptoRng>(
        &self,
        rng: &mut R,
        reply_to: &X25519Public,
        plaintext: &[u8],
    ) -> Result<SealedResult, ProtoError> {
        let now = Instant::now();
        let kept = lock(&self.0)
            .iter()
            .find(|k| k.reply_to == reply_to.0 && now.duration_since(k.since) < KEEP_FOR)
            .map(|k| (k.eph_b58.clone(), AeadKey(Zeroizing::new(*k.okm))));
        let (eph_b58, key) = match kept {
            Some(k) => k,
            None => {
                let eph = random_secret(rng);
                let eph_b58 = X25519Public(PublicKey::from(&eph).to_bytes()).to_b58();
                let key = AeadKey::agree(&eph, reply_to, HKDF_INFO_OUTPUT)?;
                let mut kept = lock(&self.0);
                kept.retain(|k| k.reply_to != reply_to.0);
                kept.push_front(Kept {
                    reply_to: reply_to.0,
                    eph_b58: eph_b58.clone(),
                    okm: Zeroizing::new(*key.0),
                    since: now,
                });
                kept.truncate(OUTPUT_SLOTS);
                (eph_b58, key)
            }
        };
        let blob = key.seal(
            rng,
            plaintext,
            output_aad(&reply_to.to_b58(), &eph_b58).as_bytes(),
        )?;
        Ok(SealedResult {
            ciphertext: b58::encode(&blob),
            ephemeral_public_key: eph_b58,
            algorithm: Some(ALG_V2.to_string()),
            encoding: None,
        })
    }
}

/// One sender's kept keys for sealing requests to one node (§3.4): the
/// ephemeral key, the response key its replies come back to, and the input
/// key they agree on.
pub struct SealChannel {
    node_b58: String,
    eph_b58: String,
    key: AeadKey,
    resp: Arc<ResponseKey>,
    since: Instant,
}

impl SealChannel {
    /// A channel to `node` with fresh keys.
    pub fn new(node: &X25519Public) -> Result<Self, ProtoError> {
        Self::with_rng(&mut rand_core::OsRng, node)
    }

    /// [`SealChannel::new`] with the randomness supplied. Draw order:
    /// ephemeral secret (32 bytes), response secret (32).
    pub fn with_rng<R: RngCore + CryptoRng>(
        rng: &mut R,
        node: &X25519Public,
    ) -> Result<Self, ProtoError> {
        let eph = random_secret(rng);
        let eph_b58 = X25519Public(PublicKey::from(&eph).to_bytes()).to_b58();
        let resp = random_secret(rng);
        let key = AeadKey::agree(&eph, node, HKDF_INFO_INPUT)?;
        Ok(SealChannel {
            node_b58: node.to_b58(),
            eph_b58,
            key,
            resp: Arc::new(ResponseKey::from_secret(resp)),
            since: Instant::now(),
        })
    }

    /// Whether the channel's keys are older than [`KEEP_FOR`] and should
    /// give way to a new channel.
    pub fn is_stale(&self) -> bool {
        self.since.elapsed() >= KEEP_FOR
    }

    /// Seal one request: the `enc` object and the key that opens its reply.
    pub fn seal(&self, plaintext: &[u8]) -> Result<(EncEnvelope, Arc<ResponseKey>), ProtoError> {
        let resp_b58 = self.resp.public().to_b58();
        let aad = input_aad(&self.node_b58, &self.eph_b58, &resp_b58);
        let blob = self
            .key
            .seal(&mut rand_core::OsRng, plaintext, aad.as_bytes())?;
        let envelope = EncEnvelope {
            ciphertext: b58::encode(&blob),
            client_ephemeral_pubkey: self.eph_b58.clone(),
            client_response_pubkey: resp_b58,
            algorithm: Some(ALG_V2.to_string()),
        };
        Ok((envelope, Arc::clone(&self.resp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::e2e::open_input;
    use crate::proto::identity::NodeIdentity;

    #[test]
    fn a_channel_seals_many_requests_that_the_node_opens_and_answers() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        let channel = SealChannel::new(&node.x25519_public()).unwrap();
        let outputs = OutputKeys::default();
        let mut ephs = Vec::new();
        for i in 0..3u8 {
            let (enc, resp) = channel.seal(&[b'{', b'}', i]).unwrap();
            let opened = open_input(&node, &enc).unwrap();
            assert_eq!(&opened.plaintext[..], &[b'{', b'}', i]);
            let sealed = outputs
                .seal(&mut rand_core::OsRng, &opened.reply_to, &[i; 5])
                .unwrap();
            assert_eq!(&resp.open_output(&sealed).unwrap()[..], &[i; 5]);
            ephs.push((enc.client_ephemeral_pubkey, sealed.ephemeral_public_key));
        }
        // One kept key each way, and never the same ciphertext twice.
        assert!(ephs.windows(2).all(|w| w[0] == w[1]));
        let (a, _) = channel.seal(b"{}").unwrap();
        let (b, _) = channel.seal(b"{}").unwrap();
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn replies_to_different_response_keys_use_different_ephemeral_keys() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        let outputs = OutputKeys::default();
        let a = SealChannel::new(&node.x25519_public()).unwrap();
        let b = SealChannel::new(&node.x25519_public()).unwrap();
        let (_, ra) = a.seal(b"{}").unwrap();
        let (_, rb) = b.seal(b"{}").unwrap();
        let sa = outputs
            .seal(&mut rand_core::OsRng, &ra.public(), b"x")
            .unwrap();
        let sb = outputs
            .seal(&mut rand_core::OsRng, &rb.public(), b"y")
            .unwrap();
        assert_ne!(sa.ephemeral_public_key, sb.ephemeral_public_key);
        assert_eq!(&ra.open_output(&sa).unwrap()[..], b"x");
        assert_eq!(&rb.open_output(&sb).unwrap()[..], b"y");
        // A reply for one key does not open with the other.
        assert!(rb.open_output(&sa).is_err());
    }

    #[test]
    fn a_memo_gives_what_agreeing_again_gives_and_refuses_low_order_points() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        let memo = KeyMemo::default();
        let peer = NodeIdentity::from_seed(&[7; 32]).x25519_public();
        let fresh = AeadKey::agree(node.x25519_secret(), &peer, HKDF_INFO_INPUT).unwrap();
        for _ in 0..2 {
            let kept = memo
                .agree(node.x25519_secret(), &peer, HKDF_INFO_INPUT)
                .unwrap();
            assert_eq!(*kept.0, *fresh.0);
        }
        let other = memo
            .agree(node.x25519_secret(), &peer, HKDF_INFO_OUTPUT)
            .unwrap();
        assert_ne!(*other.0, *fresh.0);
        let zero = X25519Public([0; 32]);
        assert!(memo
            .agree(node.x25519_secret(), &zero, HKDF_INFO_INPUT)
            .is_err());
    }
}
