//! Property tests of the E2E v2 crypto through the public API: sealing then
//! opening returns the plaintext, and any tampering is detected.

use proptest::prelude::*;
use sgl::proto::b58;
use sgl::proto::e2e::{
    open_input, seal_input, seal_output, EncEnvelope, ResponseKey, SealedChunk, StreamSealer,
    MAX_CIPHERTEXT_CHARS,
};
use sgl::proto::identity::NodeIdentity;
use sgl::proto::ProtoError;

fn node() -> NodeIdentity {
    NodeIdentity::from_seed(&[0x42; 32])
}

fn flip(ct: &str, index: usize, mask: u8) -> String {
    let mut blob = b58::decode_vec(ct, "ct", usize::MAX).unwrap();
    let i = index % blob.len();
    blob[i] ^= mask;
    b58::encode(&blob)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn input_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let id = node();
        let (env, _resp) = seal_input(&id.x25519_public(), &plain).unwrap();
        let opened = open_input(&id, &env).unwrap();
        prop_assert_eq!(&opened.plaintext[..], &plain[..]);
        prop_assert_eq!(opened.reply_to.to_b58(), env.client_response_pubkey);
    }

    #[test]
    fn any_flipped_input_byte_is_detected(plain in proptest::collection::vec(any::<u8>(), 0..512), index in any::<usize>(), mask in 1u8..=255) {
        let id = node();
        let (env, _) = seal_input(&id.x25519_public(), &plain).unwrap();
        let tampered = EncEnvelope { ciphertext: flip(&env.ciphertext, index, mask), ..env };
        prop_assert!(open_input(&id, &tampered).is_err());
    }

    #[test]
    fn swapped_keys_are_detected(plain in proptest::collection::vec(any::<u8>(), 0..64)) {
        let id = node();
        let (env, _) = seal_input(&id.x25519_public(), &plain).unwrap();
        let (other, _) = seal_input(&id.x25519_public(), &plain).unwrap();
        let swapped_resp = EncEnvelope { client_response_pubkey: other.client_response_pubkey.clone(), ..env.clone() };
        prop_assert!(open_input(&id, &swapped_resp).is_err());
        let swapped_eph = EncEnvelope { client_ephemeral_pubkey: other.client_ephemeral_pubkey, ..env.clone() };
        prop_assert!(open_input(&id, &swapped_eph).is_err());
        // Sealed to another node.
        let stranger = NodeIdentity::from_seed(&[0x07; 32]);
        prop_assert!(open_input(&stranger, &env).is_err());
    }

    #[test]
    fn output_round_trips_and_detects_flips(plain in proptest::collection::vec(any::<u8>(), 0..2048), index in any::<usize>(), mask in 1u8..=255) {
        let resp = ResponseKey::from_secret_bytes([0x33; 32]);
        let sealed = seal_output(&resp.public(), &plain).unwrap();
        prop_assert_eq!(&resp.open_output(&sealed).unwrap()[..], &plain[..]);
        let mut tampered = sealed.clone();
        tampered.ciphertext = flip(&sealed.ciphertext, index, mask);
        prop_assert!(resp.open_output(&tampered).is_err());
        // Another client's key cannot open it.
        prop_assert!(ResponseKey::from_secret_bytes([0x34; 32]).open_output(&sealed).is_err());
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Flip {
        chunk: usize,
        index: usize,
        mask: u8,
    },
    Swap {
        a: usize,
        b: usize,
    },
    Drop {
        chunk: usize,
    },
    DropFinal,
    Replay {
        chunk: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::None),
        (any::<usize>(), any::<usize>(), 1u8..=255)
            .prop_map(|(chunk, index, mask)| Mutation::Flip { chunk, index, mask }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        any::<usize>().prop_map(|chunk| Mutation::Drop { chunk }),
        Just(Mutation::DropFinal),
        any::<usize>().prop_map(|chunk| Mutation::Replay { chunk }),
    ]
}

/// Open a delivered sequence the way a client does; Ok(text) only if every
/// chunk opened and the final one came.
fn receive(resp: &ResponseKey, nonce: &str, chunks: &[SealedChunk]) -> Result<String, ProtoError> {
    let mut opener = resp.stream_opener(nonce)?;
    let mut text = String::new();
    for c in chunks {
        text.push_str(&opener.open(
            c.seq,
            c.is_final,
            c.ephemeral_public_key.as_deref(),
            &c.ciphertext,
        )?);
        if opener.is_finished() {
            break;
        }
    }
    opener.finish()?;
    Ok(text)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn stream_tampering_is_detected(texts in proptest::collection::vec("\\PC{0,12}", 1..6), m in mutation()) {
        let resp = ResponseKey::from_secret_bytes([0x88; 32]);
        let nonce = "12drXXUifSrRnXLGbXg8E";
        let mut sealer = StreamSealer::new(&resp.public(), nonce).unwrap();
        let mut chunks: Vec<SealedChunk> = texts.iter().map(|t| sealer.seal(t).unwrap()).collect();
        chunks.push(sealer.finish("").unwrap());
        let n = chunks.len();
        let mut delivered = chunks.clone();
        let changed = match m {
            Mutation::None => false,
            Mutation::Flip { chunk, index, mask } => {
                let c = &mut delivered[chunk % n];
                c.ciphertext = flip(&c.ciphertext, index, mask);
                true
            }
            Mutation::Swap { a, b } => {
                let (a, b) = (a % n, b % n);
                delivered.swap(a, b);
                a != b
            }
            Mutation::Drop { chunk } => {
                delivered.remove(chunk % n);
                true
            }
            Mutation::DropFinal => {
                delivered.pop();
                true
            }
            Mutation::Replay { chunk } => {
                let i = chunk % n;
                let c = delivered[i].clone();
                delivered.insert(i + 1, c);
                // Replaying the final chunk after it is never read: clients stop at final.
                i != n - 1
            }
        };
        let got = receive(&resp, nonce, &delivered);
        if changed {
            prop_assert!(got.is_err(), "{:?} was not detected", m);
        } else {
            prop_assert_eq!(got.unwrap(), texts.concat());
        }
    }
}

#[test]
fn oversized_ciphertext_is_refused_before_decoding() {
    let id = node();
    let (env, _) = seal_input(&id.x25519_public(), b"{}").unwrap();
    let huge = EncEnvelope {
        ciphertext: "2".repeat(MAX_CIPHERTEXT_CHARS + 1),
        ..env
    };
    assert!(matches!(
        open_input(&id, &huge),
        Err(ProtoError::TooLarge { .. })
    ));
}

#[test]
fn a_large_payload_round_trips() {
    // 64 KiB: far more than a chat prompt for the served context, well under the cap.
    let id = node();
    let plain: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let (env, resp) = seal_input(&id.x25519_public(), &plain).unwrap();
    assert!(env.ciphertext.len() < MAX_CIPHERTEXT_CHARS);
    let opened = open_input(&id, &env).unwrap();
    assert_eq!(&opened.plaintext[..], &plain[..]);
    let sealed = seal_output(&opened.reply_to, &plain).unwrap();
    assert_eq!(&resp.open_output(&sealed).unwrap()[..], &plain[..]);
}

#[test]
fn a_ciphertext_at_the_cap_is_decoded_not_refused() {
    // Exactly the cap: decoded (the cost this cap bounds), then refused by the tag check.
    let id = node();
    let (env, _) = seal_input(&id.x25519_public(), b"{}").unwrap();
    let at_cap = EncEnvelope {
        ciphertext: "z".repeat(MAX_CIPHERTEXT_CHARS),
        ..env
    };
    assert_eq!(open_input(&id, &at_cap).unwrap_err(), ProtoError::Decrypt);
}
