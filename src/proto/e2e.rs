//! End-to-end encryption v2 (PROTOCOL.md §3): X25519 → HKDF-SHA256 →
//! XChaCha20-Poly1305, with the direction, the keys and (for streams) the
//! request nonce, `seq` and `final` bound in the AAD.
//!
//! The types split the two sides: a client seals with [`seal_input`] and keeps
//! the [`ResponseKey`] to open the reply; a node opens with [`open_input`] and
//! answers with [`seal_output`] or a [`StreamSealer`]. No public function takes
//! a nonce: nonces and ephemeral keys come from the RNG (each random entry
//! point has a `_with_rng` twin for known-answer tests).
//!
//! Fail-closed rules (§3.7): only the v2 tags are accepted (a missing tag and
//! the legacy v1 tag are refused, and sgl offers no v1 mode), a low-order peer
//! point is refused, every key must be 32 bytes, blobs under 40 bytes and
//! ciphertexts over the caps are refused before any work.

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::identity::{NodeIdentity, X25519Public};
use super::{b58, ProtoError};

/// The v2 tag: sealed input and sealed non-stream output.
pub const ALG_V2: &str = "x25519-xchacha20poly1305-hkdf-v2";
/// The v2 stream tag: every stream chunk.
pub const ALG_V2_STREAM: &str = "x25519-xchacha20poly1305-hkdf-v2-stream";

const HKDF_SALT: &[u8] = b"sgl-e2e-v2-salt";
const HKDF_INFO_INPUT: &[u8] = b"sgl-e2e-v2-input";
const HKDF_INFO_OUTPUT: &[u8] = b"sgl-e2e-v2-output";

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// nonce(24) ‖ tag(16): the smallest blob that can be genuine.
pub const MIN_BLOB_LEN: usize = NONCE_LEN + TAG_LEN;
/// The cap sgl enforces before decoding a sealed input or output, stricter
/// than the protocol's 8 MiB of b58 (§3.7; sgl choice). base58 conversion
/// grows faster than the length (as n^1.6, see `b58`): at this cap one blob
/// costs well under a second (`benches/b58.rs`), at 8 MiB it would cost a
/// minute. 512 KiB of b58 is about 375 KB of payload, roughly 90,000 tokens,
/// more than the context of any model served.
pub const MAX_CIPHERTEXT_CHARS: usize = 512 * 1024;
/// A stream chunk `ciphertext` string over this is refused (§3.7).
pub const MAX_CHUNK_CIPHERTEXT_CHARS: usize = 256_000;
/// The longest request nonce accepted (the SDKs send b58 of 16 bytes, ≤ 22 chars).
pub const MAX_REQUEST_NONCE_CHARS: usize = 64;

/// The algorithm tags sgl accepts. Anything else is refused before decryption;
/// tags compare exactly (case and whitespace matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    V2,
    V2Stream,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::V2 => ALG_V2,
            Algorithm::V2Stream => ALG_V2_STREAM,
        }
    }

    /// Parse a tag as found on the wire; `None` is a missing tag.
    pub fn parse(tag: Option<&str>) -> Result<Self, ProtoError> {
        match tag {
            None => Err(ProtoError::MissingAlgorithm),
            Some(ALG_V2) => Ok(Algorithm::V2),
            Some(ALG_V2_STREAM) => Ok(Algorithm::V2Stream),
            Some(other) => Err(ProtoError::UnsupportedAlgorithm(truncate(other))),
        }
    }

    /// Require exactly `self`.
    pub fn expect(self, tag: Option<&str>) -> Result<(), ProtoError> {
        let got = Self::parse(tag)?;
        if got == self {
            Ok(())
        } else {
            Err(ProtoError::UnsupportedAlgorithm(got.as_str().to_string()))
        }
    }
}

/// Echo at most a short prefix of a peer's string in an error.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The client's `enc` object (§3.4). Forwarded by the coordinator unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EncEnvelope {
    pub ciphertext: String,
    pub client_ephemeral_pubkey: String,
    pub client_response_pubkey: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// The node's `sealed_result` (§3.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedResult {
    pub ciphertext: String,
    pub ephemeral_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Absent means b58; PYSDK also knows canonical padded `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

/// One sealed stream chunk as the node produces it (§3.6, §6.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    pub seq: u64,
    pub is_final: bool,
    /// b58 blob.
    pub ciphertext: String,
    /// The stream ephemeral public key, on seq 0 only.
    pub ephemeral_public_key: Option<String>,
}

/// The AEAD key of one direction. Zeroized on drop; never printed.
struct AeadKey(Zeroizing<[u8; 32]>);

impl AeadKey {
    /// `HKDF-SHA256(IKM = X25519(secret, peer), salt, info)`, refusing a
    /// non-contributory (low-order) peer point.
    fn agree(secret: &StaticSecret, peer: &X25519Public, info: &[u8]) -> Result<Self, ProtoError> {
        let shared = secret.diffie_hellman(&PublicKey::from(peer.0));
        if !shared.was_contributory() {
            return Err(ProtoError::LowOrderPoint);
        }
        Self::from_shared(shared.as_bytes(), info)
    }

    fn from_shared(shared: &[u8; 32], info: &[u8]) -> Result<Self, ProtoError> {
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(HKDF_SALT), shared)
            .expand(info, okm.as_mut())
            .map_err(|_| ProtoError::Unreachable("HKDF output length"))?;
        Ok(AeadKey(okm))
    }

    fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, ProtoError> {
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        let ct = cipher
            .encrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| ProtoError::Unreachable("AEAD seal"))?;
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(nonce);
        blob.extend_from_slice(&ct);
        Ok(blob)
    }

    fn seal<R: RngCore + CryptoRng>(
        &self,
        rng: &mut R,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, ProtoError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, plaintext, aad)
    }

    fn open(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        if blob.len() < MIN_BLOB_LEN {
            return Err(ProtoError::TooShort {
                what: "sealed blob",
                min: MIN_BLOB_LEN,
                got: blob.len(),
            });
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| ProtoError::Decrypt)
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

// The AAD strings of §3.3. These three functions are the only place they are built.

/// `sgl-aad/v2/input|node={node}|eph={eph}|resp={resp}`
pub fn input_aad(node_x25519_b58: &str, eph_b58: &str, resp_b58: &str) -> String {
    format!("sgl-aad/v2/input|node={node_x25519_b58}|eph={eph_b58}|resp={resp_b58}")
}

/// `sgl-aad/v2/output|resp={resp}|eph={eph}`
pub fn output_aad(resp_b58: &str, eph_b58: &str) -> String {
    format!("sgl-aad/v2/output|resp={resp_b58}|eph={eph_b58}")
}

/// `sgl-aad/v2/stream|resp={resp}|eph={eph}|nonce={nonce}|seq={seq}|final={0|1}`
pub fn stream_aad(
    resp_b58: &str,
    eph_b58: &str,
    request_nonce: &str,
    seq: u64,
    is_final: bool,
) -> String {
    let f = if is_final { 1 } else { 0 };
    format!(
        "sgl-aad/v2/stream|resp={resp_b58}|eph={eph_b58}|nonce={request_nonce}|seq={seq}|final={f}"
    )
}

fn random_secret<R: RngCore + CryptoRng>(rng: &mut R) -> StaticSecret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    StaticSecret::from(*bytes)
}

fn decode_blob(s: &str, max_chars: usize) -> Result<Vec<u8>, ProtoError> {
    let blob = b58::decode_vec(s, "ciphertext", max_chars)?;
    if blob.len() < MIN_BLOB_LEN {
        return Err(ProtoError::TooShort {
            what: "sealed blob",
            min: MIN_BLOB_LEN,
            got: blob.len(),
        });
    }
    Ok(blob)
}

/// Validate a stream request nonce: non-empty b58 text of bounded length.
/// A fresh request nonce for a sealed stream (§3.6): 16 random bytes as b58.
pub fn random_request_nonce() -> String {
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    super::b58::encode(&b)
}

pub fn check_request_nonce(nonce: &str) -> Result<(), ProtoError> {
    const ALPHABET: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let ok = !nonce.is_empty()
        && nonce.len() <= MAX_REQUEST_NONCE_CHARS
        && nonce.chars().all(|c| ALPHABET.contains(c));
    if ok {
        Ok(())
    } else {
        Err(ProtoError::BadRequestNonce {
            max: MAX_REQUEST_NONCE_CHARS,
        })
    }
}

// ---------------------------------------------------------------- client side

/// The client's response keypair: opens the sealed reply or the stream.
/// Zeroized on drop; `Debug` shows the public key only.
pub struct ResponseKey {
    secret: StaticSecret,
    public: X25519Public,
    /// Output keys agreed lately: a node may keep its ephemeral key for the
    /// replies to one response key (`kept`).
    memo: KeyMemo,
}

impl ResponseKey {
    /// From a stored secret (tests, or a client that keeps its key).
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self::from_secret(StaticSecret::from(secret))
    }

    fn from_secret(secret: StaticSecret) -> Self {
        let public = X25519Public(PublicKey::from(&secret).to_bytes());
        ResponseKey {
            secret,
            public,
            memo: KeyMemo::default(),
        }
    }

    pub fn public(&self) -> X25519Public {
        self.public
    }

    /// Open a non-stream `sealed_result` (§3.5).
    pub fn open_output(&self, sealed: &SealedResult) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        Algorithm::V2.expect(sealed.algorithm.as_deref())?;
        let blob = match sealed.encoding.as_deref() {
            None | Some("b58") | Some("base58") => {
                decode_blob(&sealed.ciphertext, MAX_CIPHERTEXT_CHARS)?
            }
            Some("base64") => decode_canonical_base64(&sealed.ciphertext, MAX_CIPHERTEXT_CHARS)?,
            Some(other) => return Err(ProtoError::UnsupportedEncoding(truncate(other))),
        };
        let eph = X25519Public::from_b58(&sealed.ephemeral_public_key)?;
        let key = self.memo.agree(&self.secret, &eph, HKDF_INFO_OUTPUT)?;
        // The sender re-encodes the decoded keys: canonical b58 of both.
        key.open(
            &blob,
            output_aad(&self.public.to_b58(), &eph.to_b58()).as_bytes(),
        )
    }

    /// A stream opener bound to this key and the request nonce sent in the payload.
    pub fn stream_opener(&self, request_nonce: &str) -> Result<StreamOpener, ProtoError> {
        check_request_nonce(request_nonce)?;
        Ok(StreamOpener {
            // A copy, zeroized on drop like the original, so the opener can
            // outlive a borrow (an SSE relay task owns it).
            secret: self.secret.clone(),
            resp_b58: self.public.to_b58(),
            request_nonce: request_nonce.to_string(),
            state: OpenerState::AwaitingFirst,
        })
    }
}

impl fmt::Debug for ResponseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseKey")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn decode_canonical_base64(s: &str, max_chars: usize) -> Result<Vec<u8>, ProtoError> {
    if s.len() > max_chars {
        return Err(ProtoError::TooLarge {
            what: "ciphertext",
            max: max_chars,
            got: s.len(),
        });
    }
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine
        .decode(s)
        .map_err(|_| ProtoError::Base64 { what: "ciphertext" })?;
    if engine.encode(&bytes) != s {
        return Err(ProtoError::Base64 { what: "ciphertext" });
    }
    if bytes.len() < MIN_BLOB_LEN {
        return Err(ProtoError::TooShort {
            what: "sealed blob",
            min: MIN_BLOB_LEN,
            got: bytes.len(),
        });
    }
    Ok(bytes)
}

/// Seal a request payload to a node (§3.4). Returns the `enc` object and the
/// response key that opens the reply.
pub fn seal_input(
    node: &X25519Public,
    plaintext: &[u8],
) -> Result<(EncEnvelope, ResponseKey), ProtoError> {
    seal_input_with_rng(&mut rand_core::OsRng, node, plaintext)
}

/// [`seal_input`] with the randomness supplied. Draw order: ephemeral secret
/// (32 bytes), response secret (32), AEAD nonce (24).
pub fn seal_input_with_rng<R: RngCore + CryptoRng>(
    rng: &mut R,
    node: &X25519Public,
    plaintext: &[u8],
) -> Result<(EncEnvelope, ResponseKey), ProtoError> {
    let eph = random_secret(rng);
    let eph_pub = X25519Public(PublicKey::from(&eph).to_bytes());
    let resp = random_secret(rng);
    let resp_pub = X25519Public(PublicKey::from(&resp).to_bytes());
    let key = AeadKey::agree(&eph, node, HKDF_INFO_INPUT)?;
    let (eph_b58, resp_b58) = (eph_pub.to_b58(), resp_pub.to_b58());
    let blob = key.seal(
        rng,
        plaintext,
        input_aad(&node.to_b58(), &eph_b58, &resp_b58).as_bytes(),
    )?;
    let envelope = EncEnvelope {
        ciphertext: b58::encode(&blob),
        client_ephemeral_pubkey: eph_b58,
        client_response_pubkey: resp_b58,
        algorithm: Some(ALG_V2.to_string()),
    };
    Ok((envelope, ResponseKey::from_secret(resp)))
}

// ------------------------------------------------------------------ node side

/// A decrypted request: the plaintext and the key the reply must be sealed to.
pub struct OpenedInput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub reply_to: X25519Public,
}

impl OpenedInput {
    /// The payload as a JSON object (§3.7: anything else is refused).
    pub fn json_object(&self) -> Result<serde_json::Map<String, serde_json::Value>, ProtoError> {
        match serde_json::from_slice::<serde_json::Value>(&self.plaintext) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => Err(ProtoError::NotJsonObject),
            Err(e) => Err(ProtoError::Json(e.to_string())),
        }
    }
}

impl fmt::Debug for OpenedInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedInput")
            .field(
                "plaintext",
                &format_args!("<{} bytes>", self.plaintext.len()),
            )
            .field("reply_to", &self.reply_to)
            .finish()
    }
}

/// Open a client's `enc` object with the node's identity (§3.4, §3.7). The tag
/// is checked before anything else; the AAD uses the `eph` and `resp` strings
/// exactly as received.
pub fn open_input(node: &NodeIdentity, enc: &EncEnvelope) -> Result<OpenedInput, ProtoError> {
    Algorithm::V2.expect(enc.algorithm.as_deref())?;
    let blob = decode_blob(&enc.ciphertext, MAX_CIPHERTEXT_CHARS)?;
    let eph = X25519Public::from_b58(&enc.client_ephemeral_pubkey)?;
    let reply_to = X25519Public::from_b58(&enc.client_response_pubkey)?;
    // A sender may keep its ephemeral key (the coordinator sealing plain
    // requests does): the key agreed with it last time is remembered.
    let key = node
        .kept_inputs()
        .agree(node.x25519_secret(), &eph, HKDF_INFO_INPUT)?;
    let aad = input_aad(
        &node.x25519_public().to_b58(),
        &enc.client_ephemeral_pubkey,
        &enc.client_response_pubkey,
    );
    let plaintext = key.open(&blob, aad.as_bytes())?;
    Ok(OpenedInput {
        plaintext,
        reply_to,
    })
}

/// Seal a non-stream reply to the client's response key (§3.5).
pub fn seal_output(reply_to: &X25519Public, plaintext: &[u8]) -> Result<SealedResult, ProtoError> {
    seal_output_with_rng(&mut rand_core::OsRng, reply_to, plaintext)
}

/// [`seal_output`] by `node`, under the ephemeral key it keeps for the
/// replies to `reply_to` ([`OutputKeys`]): one agreement per response key
/// and [`KEEP_FOR`], not one per reply.
pub fn seal_output_kept(
    node: &NodeIdentity,
    reply_to: &X25519Public,
    plaintext: &[u8],
) -> Result<SealedResult, ProtoError> {
    node.kept_outputs()
        .seal(&mut rand_core::OsRng, reply_to, plaintext)
}

/// [`seal_output`] with the randomness supplied. Draw order: ephemeral secret
/// (32 bytes), AEAD nonce (24).
pub fn seal_output_with_rng<R: RngCore + CryptoRng>(
    rng: &mut R,
    reply_to: &X25519Public,
    plaintext: &[u8],
) -> Result<SealedResult, ProtoError> {
    let eph = random_secret(rng);
    let eph_pub = X25519Public(PublicKey::from(&eph).to_bytes());
    let key = AeadKey::agree(&eph, reply_to, HKDF_INFO_OUTPUT)?;
    let blob = key.seal(
        rng,
        plaintext,
        output_aad(&reply_to.to_b58(), &eph_pub.to_b58()).as_bytes(),
    )?;
    Ok(SealedResult {
        ciphertext: b58::encode(&blob),
        ephemeral_public_key: eph_pub.to_b58(),
        algorithm: Some(ALG_V2.to_string()),
        encoding: None,
    })
}

/// Seals one stream (§3.6): one ephemeral key, derived once; `seq` from 0; the
/// ephemeral public key on seq 0 only. [`StreamSealer::finish`] seals the final
/// chunk and consumes the sealer, so nothing can follow it.
pub struct StreamSealer<R: RngCore + CryptoRng = rand_core::OsRng> {
    rng: R,
    key: AeadKey,
    resp_b58: String,
    eph_b58: String,
    request_nonce: String,
    next_seq: u64,
}

impl StreamSealer<rand_core::OsRng> {
    pub fn new(reply_to: &X25519Public, request_nonce: &str) -> Result<Self, ProtoError> {
        Self::with_rng(rand_core::OsRng, reply_to, request_nonce)
    }
}

impl<R: RngCore + CryptoRng> StreamSealer<R> {
    /// Draw order: the stream ephemeral secret (32 bytes), then one 24-byte
    /// nonce per chunk.
    pub fn with_rng(
        mut rng: R,
        reply_to: &X25519Public,
        request_nonce: &str,
    ) -> Result<Self, ProtoError> {
        check_request_nonce(request_nonce)?;
        let eph = random_secret(&mut rng);
        let eph_pub = X25519Public(PublicKey::from(&eph).to_bytes());
        let key = AeadKey::agree(&eph, reply_to, HKDF_INFO_OUTPUT)?;
        Ok(StreamSealer {
            rng,
            key,
            resp_b58: reply_to.to_b58(),
            eph_b58: eph_pub.to_b58(),
            request_nonce: request_nonce.to_string(),
            next_seq: 0,
        })
    }

    pub fn ephemeral_public_b58(&self) -> &str {
        &self.eph_b58
    }

    /// The seq the next chunk will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seal a delta. A `&str` is whole characters, so chunks never split UTF-8.
    pub fn seal(&mut self, text: &str) -> Result<SealedChunk, ProtoError> {
        self.seal_chunk(text, false)
    }

    /// Seal the final chunk (normally empty text) and end the stream.
    pub fn finish(mut self, text: &str) -> Result<SealedChunk, ProtoError> {
        self.seal_chunk(text, true)
    }

    fn seal_chunk(&mut self, text: &str, is_final: bool) -> Result<SealedChunk, ProtoError> {
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or(ProtoError::StreamExhausted)?;
        let aad = stream_aad(
            &self.resp_b58,
            &self.eph_b58,
            &self.request_nonce,
            seq,
            is_final,
        );
        let blob = self
            .key
            .seal(&mut self.rng, text.as_bytes(), aad.as_bytes())?;
        self.next_seq = next;
        Ok(SealedChunk {
            seq,
            is_final,
            ciphertext: b58::encode(&blob),
            ephemeral_public_key: (seq == 0).then(|| self.eph_b58.clone()),
        })
    }
}

enum OpenerState {
    AwaitingFirst,
    Open {
        key: AeadKey,
        eph_b58: String,
        next_seq: u64,
    },
    Finished,
    Failed,
}

/// Opens one stream in order (§3.6): seq must run 0, 1, 2… with no gaps; the
/// key is derived once from the seq-0 ephemeral key; nothing is accepted after
/// the final chunk; any failure ends the stream; [`StreamOpener::finish`]
/// fails when no final chunk came (truncation).
pub struct StreamOpener {
    secret: StaticSecret,
    resp_b58: String,
    request_nonce: String,
    state: OpenerState,
}

impl fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamOpener")
            .field("resp", &self.resp_b58)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl StreamOpener {
    /// Open the next chunk; `eph` is the `eph` field (required on seq 0).
    pub fn open(
        &mut self,
        seq: u64,
        is_final: bool,
        eph: Option<&str>,
        ct: &str,
    ) -> Result<Zeroizing<String>, ProtoError> {
        let result = self.open_inner(seq, is_final, eph, ct);
        if result.is_err() {
            self.state = OpenerState::Failed;
        }
        result
    }

    fn open_inner(
        &mut self,
        seq: u64,
        is_final: bool,
        eph: Option<&str>,
        ct: &str,
    ) -> Result<Zeroizing<String>, ProtoError> {
        if let OpenerState::AwaitingFirst = self.state {
            if seq != 0 {
                return Err(ProtoError::StreamOutOfOrder {
                    expected: 0,
                    got: seq,
                });
            }
            let eph_b58 = eph.ok_or(ProtoError::Missing("stream ephemeral key on seq 0"))?;
            let eph_key = X25519Public::from_b58(eph_b58)?;
            let key = AeadKey::agree(&self.secret, &eph_key, HKDF_INFO_OUTPUT)?;
            self.state = OpenerState::Open {
                key,
                eph_b58: eph_key.to_b58(),
                next_seq: 0,
            };
        }
        let (key, eph_b58, next_seq) = match &mut self.state {
            OpenerState::Open {
                key,
                eph_b58,
                next_seq,
            } => (key, eph_b58, next_seq),
            OpenerState::Finished => return Err(ProtoError::StreamAfterFinal),
            OpenerState::Failed => return Err(ProtoError::Decrypt),
            OpenerState::AwaitingFirst => {
                return Err(ProtoError::Unreachable("stream opener state"))
            }
        };
        if seq != *next_seq {
            return Err(ProtoError::StreamOutOfOrder {
                expected: *next_seq,
                got: seq,
            });
        }
        // The key travels on seq 0 only; a later chunk naming another key is spliced.
        if let Some(e) = eph {
            if seq != 0 && X25519Public::from_b58(e)?.to_b58() != *eph_b58 {
                return Err(ProtoError::Decrypt);
            }
        }
        let blob = decode_blob(ct, MAX_CHUNK_CIPHERTEXT_CHARS)?;
        let aad = stream_aad(&self.resp_b58, eph_b58, &self.request_nonce, seq, is_final);
        let plain = key.open(&blob, aad.as_bytes())?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| ProtoError::StreamNotUtf8)?;
        *next_seq = seq.checked_add(1).ok_or(ProtoError::StreamExhausted)?;
        if is_final {
            self.state = OpenerState::Finished;
        }
        Ok(Zeroizing::new(text))
    }

    /// True once the final chunk has been opened.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, OpenerState::Finished)
    }

    /// End the stream: an error unless the final chunk was opened.
    pub fn finish(self) -> Result<(), ProtoError> {
        match self.state {
            OpenerState::Finished => Ok(()),
            OpenerState::Failed => Err(ProtoError::Decrypt),
            _ => Err(ProtoError::StreamTruncated),
        }
    }
}

mod kept;
pub use kept::{KeyMemo, OutputKeys, SealChannel, KEEP_FOR};

#[cfg(test)]
mod vectors;
