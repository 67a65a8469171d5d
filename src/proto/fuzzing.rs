//! Entry points for the fuzz targets in `fuzz/`. Each takes arbitrary bytes,
//! drives a parser or an opener with them, and must never panic; the stream
//! target also checks that only the genuine chunk sequence is ever accepted.

use rand_core::{CryptoRng, RngCore};

use super::e2e::{
    open_input, seal_input_with_rng, EncEnvelope, ResponseKey, SealedResult, StreamSealer, ALG_V2,
};
use super::envelope::{verify_sealed_reply, ResultKind};
use super::identity::{NodeId, NodeIdentity, X25519Public};
use super::{b58, openai};

/// A deterministic byte stream for building fixtures. Not a CSPRNG: fuzzing only.
struct FixtureRng(u64);

impl RngCore for FixtureRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for FixtureRng {}

/// Envelope parsing and opening: JSON bodies, raw blobs under valid keys, and
/// the small text parsers (keys, node ids, kinds, keypair files).
pub fn e2e_envelope(data: &[u8]) {
    let node = NodeIdentity::from_seed(&[0x42; 32]);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(env) = serde_json::from_slice::<EncEnvelope>(rest) {
                if let Ok(opened) = open_input(&node, &env) {
                    let _ = opened.json_object();
                }
            }
            if let Ok(sr) = serde_json::from_slice::<SealedResult>(rest) {
                let _ = ResponseKey::from_secret_bytes([0x33; 32]).open_output(&sr);
            }
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = verify_sealed_reply(Some(&node.ed25519_public().to_b58()), &v);
            }
            let _ = serde_json::from_slice::<openai::ChatCompletionRequest>(rest);
        }
        1 => {
            // Arbitrary blob bytes under genuine keys: must fail the tag, never panic.
            let (env, _) =
                match seal_input_with_rng(&mut FixtureRng(1), &node.x25519_public(), b"{}") {
                    Ok(v) => v,
                    Err(_) => return,
                };
            let forged = EncEnvelope {
                ciphertext: b58::encode(rest),
                ..env
            };
            assert!(open_input(&node, &forged).is_err() || rest.len() >= 40);
        }
        2 => {
            // Arbitrary ephemeral / response keys.
            if rest.len() >= 64 {
                let (env, _) =
                    match seal_input_with_rng(&mut FixtureRng(2), &node.x25519_public(), b"{}") {
                        Ok(v) => v,
                        Err(_) => return,
                    };
                let forged = EncEnvelope {
                    client_ephemeral_pubkey: b58::encode(&rest[..32]),
                    client_response_pubkey: b58::encode(&rest[32..64]),
                    algorithm: Some(ALG_V2.to_string()),
                    ..env
                };
                let _ = open_input(&node, &forged);
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = ResultKind::parse(s);
                let _ = NodeId::parse(s);
                let _ = X25519Public::from_b58(s);
                let _ = NodeIdentity::from_keypair_json(s);
            }
        }
    }
}

/// Stream opening driven by arbitrary operations over a genuine 4-chunk
/// stream. Each input byte picks a chunk and may tamper with it. The opener
/// may finish successfully only if it saw exactly chunks 0, 1, 2, 3 untouched.
pub fn e2e_stream(data: &[u8]) {
    let resp = ResponseKey::from_secret_bytes([0x88; 32]);
    let nonce = "12drXXUifSrRnXLGbXg8E";
    let Ok(mut sealer) = StreamSealer::with_rng(FixtureRng(3), &resp.public(), nonce) else {
        return;
    };
    let mut chunks = Vec::new();
    for text in ["Hello", " from", " the grid"] {
        match sealer.seal(text) {
            Ok(c) => chunks.push(c),
            Err(_) => return,
        }
    }
    match sealer.finish("") {
        Ok(c) => chunks.push(c),
        Err(_) => return,
    }
    let Ok(mut opener) = resp.stream_opener(nonce) else {
        return;
    };
    let mut genuine_in_order = 0usize;
    let mut tampered = false;
    for (i, &op) in data.iter().enumerate().take(16) {
        let c = &chunks[(op & 3) as usize];
        let mut seq = c.seq;
        let mut is_final = c.is_final;
        let mut ct = c.ciphertext.clone();
        if op & 4 != 0 {
            is_final = !is_final;
        }
        if op & 8 != 0 {
            // Swap one character of the b58 text for another alphabet character.
            let pos = data.get(i + 1).copied().unwrap_or(0) as usize % ct.len();
            let mut bytes = ct.into_bytes();
            bytes[pos] = if bytes[pos] == b'2' { b'3' } else { b'2' };
            ct = String::from_utf8(bytes).unwrap_or_default();
        }
        if op & 16 != 0 {
            seq = seq.wrapping_add(1);
        }
        let modified = is_final != c.is_final || ct != c.ciphertext || seq != c.seq;
        let eph = if op & 32 != 0 {
            None
        } else {
            c.ephemeral_public_key.as_deref()
        };
        let ok = opener.open(seq, is_final, eph, &ct).is_ok();
        if ok {
            if modified || c.seq as usize != genuine_in_order {
                tampered = true;
            }
            genuine_in_order += 1;
        }
    }
    if opener.finish().is_ok() {
        assert!(!tampered, "a tampered or reordered chunk was accepted");
        assert_eq!(genuine_in_order, 4);
    }
}
