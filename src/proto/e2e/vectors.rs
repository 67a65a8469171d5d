//! Known-answer tests: every vector and negative case of `sgl-e2e-v2.json`
//! (copied from the shared vectors into tests/data, produced with the
//! singularity-grid 0.12.0 SDK's own e2e helpers).

use serde_json::Value;

use super::*;
use crate::proto::envelope::{verify_result, verify_sealed_reply, ResultKind};
use crate::proto::identity::{keybind_message, verify_keybind, Ed25519Public, Signature};

const VECTORS: &str = include_str!("../../../tests/data/sgl-e2e-v2.json");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("vector file is JSON")
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("field {k}"))
}

fn h32(v: &Value, k: &str) -> [u8; 32] {
    hex::decode(s(v, k)).unwrap().try_into().unwrap()
}

fn hx(v: &Value, k: &str) -> Vec<u8> {
    hex::decode(s(v, k)).unwrap()
}

fn flag(v: &Value) -> bool {
    match &v["final"] {
        Value::Bool(b) => *b,
        Value::String(s) => s == "True" || s == "true" || s == "1",
        other => panic!("final: {other}"),
    }
}

fn seq(v: &Value) -> u64 {
    match &v["seq"] {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("seq: {other}"),
    }
}

/// An RNG that replays the exact bytes a vector was made with.
struct ScriptedRng(Vec<u8>);

impl RngCore for ScriptedRng {
    fn next_u32(&mut self) -> u32 {
        unimplemented!("only fill_bytes is used")
    }
    fn next_u64(&mut self) -> u64 {
        unimplemented!("only fill_bytes is used")
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        assert!(self.0.len() >= dest.len(), "script exhausted");
        let rest = self.0.split_off(dest.len());
        dest.copy_from_slice(&self.0);
        self.0 = rest;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for ScriptedRng {}

fn node(seed_hex_field: &Value) -> NodeIdentity {
    NodeIdentity::from_seed(&h32(seed_hex_field, "node_ed25519_seed_hex"))
}

#[test]
fn cross_language_input_vector_opens() {
    let d = vectors();
    let v = &d["cross_language_input_vector"];
    let id = node(v);
    assert_eq!(id.x25519_public().to_b58(), s(v, "node_x25519_pub_b58"));
    assert_eq!(
        hex::encode(id.x25519_secret().to_bytes()),
        s(v, "node_x25519_secret_hex")
    );
    let env: EncEnvelope = serde_json::from_value(v["enc_envelope"].clone()).unwrap();
    assert_eq!(
        input_aad(
            s(v, "node_x25519_pub_b58"),
            &env.client_ephemeral_pubkey,
            &env.client_response_pubkey
        ),
        s(v, "aad_utf8")
    );
    let opened = open_input(&id, &env).unwrap();
    assert_eq!(&opened.plaintext[..], &hx(v, "plaintext_hex")[..]);
    assert_eq!(opened.reply_to.to_b58(), s(v, "client_resp_pub_b58"));
    assert_eq!(
        serde_json::Value::Object(opened.json_object().unwrap()),
        v["expected_plaintext_json"]
    );
    // The intermediate key, from the published shared secret.
    let key = AeadKey::from_shared(&h32(v, "shared_secret_hex"), HKDF_INFO_INPUT).unwrap();
    assert_eq!(hex::encode(*key.0), s(v, "key_hex"));
}

#[test]
fn input_seals_reproduce_byte_for_byte() {
    let d = vectors();
    for v in d["input_seals"].as_array().unwrap() {
        let id = node(v);
        let node_pub = X25519Public::from_b58(s(v, "node_x25519_pub_b58")).unwrap();
        assert_eq!(id.x25519_public(), node_pub);
        let mut script = hx(v, "client_eph_secret_hex");
        script.extend(hx(v, "client_resp_secret_hex"));
        script.extend(hx(v, "xchacha_nonce_hex"));
        let (env, resp) =
            seal_input_with_rng(&mut ScriptedRng(script), &node_pub, &hx(v, "plaintext_hex"))
                .unwrap();
        assert_eq!(env.ciphertext, s(v, "blob_b58"), "{}", s(v, "name"));
        assert_eq!(env.client_ephemeral_pubkey, s(v, "client_eph_pub_b58"));
        assert_eq!(env.client_response_pubkey, s(v, "client_resp_pub_b58"));
        assert_eq!(resp.public().to_b58(), s(v, "client_resp_pub_b58"));
        let expected: EncEnvelope = serde_json::from_value(v["enc_envelope"].clone()).unwrap();
        assert_eq!(env, expected);
        let opened = open_input(&id, &expected).unwrap();
        assert_eq!(&opened.plaintext[..], &hx(v, "plaintext_hex")[..]);
        let key = AeadKey::from_shared(&h32(v, "shared_secret_hex"), HKDF_INFO_INPUT).unwrap();
        assert_eq!(hex::encode(*key.0), s(v, "key_hex"));
    }
}

#[test]
fn output_seals_reproduce_and_open_in_both_encodings() {
    let d = vectors();
    for v in d["output_seals"].as_array().unwrap() {
        let resp_pub = X25519Public::from_b58(s(v, "client_resp_pub_b58")).unwrap();
        let mut script = hx(v, "node_eph_secret_hex");
        script.extend(hx(v, "xchacha_nonce_hex"));
        let sealed =
            seal_output_with_rng(&mut ScriptedRng(script), &resp_pub, &hx(v, "plaintext_hex"))
                .unwrap();
        assert_eq!(sealed.ciphertext, s(v, "blob_b58"));
        assert_eq!(sealed.ephemeral_public_key, s(v, "node_eph_pub_b58"));
        assert_eq!(
            output_aad(s(v, "client_resp_pub_b58"), s(v, "node_eph_pub_b58")),
            s(v, "aad_utf8")
        );
        let key = ResponseKey::from_secret_bytes(h32(v, "client_resp_secret_hex"));
        for form in ["sealed_result_b58", "sealed_result_base64"] {
            let sr: SealedResult = serde_json::from_value(v[form].clone()).unwrap();
            let plain = key.open_output(&sr).unwrap();
            assert_eq!(&plain[..], &hx(v, "plaintext_hex")[..], "{form}");
        }
    }
}

#[test]
fn full_response_passes_require_verified_reply() {
    let d = vectors();
    let v = &d["full_response_output_1"];
    let res = &v["reservation"];
    let mut reply = v["response"].clone();
    verify_sealed_reply(res["node_ed25519_pubkey"].as_str(), &reply).unwrap();
    // Also with job_id removed: the id's chatcmpl- prefix is the fallback.
    reply.as_object_mut().unwrap().remove("job_id");
    verify_sealed_reply(res["node_ed25519_pubkey"].as_str(), &reply).unwrap();
    // A reservation without the node's ed25519 key makes every reply invalid.
    assert!(verify_sealed_reply(None, &reply).is_err());
    // The reservation's keybind verifies too.
    let ed = Ed25519Public::from_b58(s(res, "node_ed25519_pubkey")).unwrap();
    let x = X25519Public::from_b58(s(res, "node_x25519_pubkey")).unwrap();
    let sig = Signature::from_b58(s(res, "node_x25519_pubkey_sig")).unwrap();
    verify_keybind(s(res, "node_id"), &ed, &x, 1, &sig).unwrap();
    // And the reply opens with output_1's response key.
    let key = ResponseKey::from_secret_bytes(h32(&d["output_seals"][0], "client_resp_secret_hex"));
    let sr: SealedResult = serde_json::from_value(v["response"]["sealed_result"].clone()).unwrap();
    assert!(key.open_output(&sr).is_ok());
}

#[test]
fn stream_reproduces_and_opens_in_order() {
    let d = vectors();
    let v = &d["stream"];
    let chunks = v["chunks"].as_array().unwrap();
    let resp_pub = X25519Public::from_b58(s(v, "client_resp_pub_b58")).unwrap();
    let nonce = s(v, "request_nonce_b58");
    let mut script = hx(v, "node_stream_eph_secret_hex");
    for c in chunks {
        script.extend(hx(c, "xchacha_nonce_hex"));
    }
    let mut sealer = StreamSealer::with_rng(ScriptedRng(script), &resp_pub, nonce).unwrap();
    assert_eq!(
        sealer.ephemeral_public_b58(),
        s(v, "node_stream_eph_pub_b58")
    );
    let mut produced = Vec::new();
    let last = chunks.len() - 1;
    for c in &chunks[..last] {
        assert!(!flag(c));
        produced.push(sealer.seal(s(c, "plaintext_utf8")).unwrap());
    }
    produced.push(sealer.finish(s(&chunks[last], "plaintext_utf8")).unwrap());
    let signer = Ed25519Public::from_b58(s(v, "node_ed25519_pub_b58")).unwrap();
    let job = s(v, "job_id");
    let key = ResponseKey::from_secret_bytes(h32(v, "client_resp_secret_hex"));
    let mut opener = key.stream_opener(nonce).unwrap();
    let mut text = String::new();
    for (c, p) in chunks.iter().zip(&produced) {
        assert_eq!(p.seq, seq(c));
        assert_eq!(p.is_final, flag(c));
        assert_eq!(p.ciphertext, s(c, "blob_b58"));
        assert_eq!(
            stream_aad(
                &resp_pub.to_b58(),
                s(v, "node_stream_eph_pub_b58"),
                nonce,
                p.seq,
                p.is_final
            ),
            s(c, "aad_utf8")
        );
        let sse = &c["sse_data_json"];
        assert_eq!(sse["ct"], s(c, "blob_b58"));
        assert_eq!(p.ephemeral_public_key.as_deref(), sse["eph"].as_str());
        // The client checks the signature before decrypting.
        let kind = ResultKind::parse(s(c, "envelope_kind")).unwrap();
        assert_eq!(
            kind,
            ResultKind::Stream {
                seq: p.seq,
                is_final: p.is_final
            }
        );
        verify_result(
            &signer,
            job,
            kind,
            s(sse, "ct"),
            sse["sig"].as_str(),
            sse["sigv"].as_str(),
        )
        .unwrap();
        let out = opener
            .open(seq(sse), flag(sse), sse["eph"].as_str(), s(sse, "ct"))
            .unwrap();
        assert_eq!(out.as_bytes(), &hx(c, "plaintext_hex")[..]);
        text.push_str(&out);
    }
    opener.finish().unwrap();
    assert_eq!(text, s(v, "concatenated_text"));
    let k = AeadKey::agree(
        &key.secret,
        &X25519Public::from_b58(s(v, "node_stream_eph_pub_b58")).unwrap(),
        HKDF_INFO_OUTPUT,
    )
    .unwrap();
    assert_eq!(hex::encode(*k.0), s(v, "out_key_hex"));
}

#[test]
fn keybind_signatures_verify() {
    let d = vectors();
    for v in d["keybind_signatures"].as_array().unwrap() {
        let id = node(v);
        let node_id = crate::proto::identity::NodeId::parse(s(v, "node_id")).unwrap();
        let ed = Ed25519Public::from_b58(s(v, "node_ed25519_pub_b58")).unwrap();
        let x = X25519Public::from_b58(s(v, "node_x25519_pub_b58")).unwrap();
        let version = v["key_version"].as_u64().unwrap() as u32;
        assert_eq!(id.ed25519_public(), ed);
        assert_eq!(
            hex::encode(keybind_message(&node_id, &ed, &x, version)),
            s(v, "message_hex")
        );
        assert_eq!(
            id.sign(&keybind_message(&node_id, &ed, &x, version))
                .to_b58(),
            s(v, "signature_b58")
        );
        verify_keybind(
            s(v, "node_id"),
            &ed,
            &x,
            version,
            &Signature::from_b58(s(v, "signature_b58")).unwrap(),
        )
        .unwrap();
        // Upper case is accepted, as by the SDK.
        verify_keybind(
            &s(v, "node_id").to_uppercase(),
            &ed,
            &x,
            version,
            &Signature::from_b58(s(v, "signature_b58")).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn result_envelope_signatures_verify() {
    let d = vectors();
    for v in d["result_envelope_signatures"].as_array().unwrap() {
        let signer = Ed25519Public::from_b58(s(v, "signer_ed25519_pub_b58")).unwrap();
        let kind = ResultKind::parse(s(v, "kind")).unwrap();
        let msg = crate::proto::envelope::result_message(
            s(v, "job_id"),
            kind,
            s(v, "signed_payload_string"),
        );
        assert_eq!(msg, s(v, "message_utf8"));
        verify_result(
            &signer,
            s(v, "job_id"),
            kind,
            s(v, "signed_payload_string"),
            Some(s(v, "signature_b58")),
            Some("v1"),
        )
        .unwrap();
    }
}

/// Runs one negative case; `Err` is the expected outcome.
fn run_negative(v: &Value) -> Result<(), ProtoError> {
    match s(v, "operation") {
        "open_input" => {
            let id_secret = StaticSecret::from(h32(v, "node_x25519_secret_hex"));
            assert_eq!(
                X25519Public(PublicKey::from(&id_secret).to_bytes()).to_b58(),
                s(v, "node_x25519_pub_b58")
            );
            // open_input needs a NodeIdentity; every open_input case uses node A.
            let id = NodeIdentity::from_seed(&[0x42; 32]);
            assert_eq!(id.x25519_secret().to_bytes(), id_secret.to_bytes());
            let env = EncEnvelope {
                ciphertext: s(v, "blob_b58").to_string(),
                client_ephemeral_pubkey: s(v, "client_eph_pub_b58").to_string(),
                client_response_pubkey: s(v, "client_resp_pub_b58").to_string(),
                algorithm: Some(ALG_V2.to_string()),
            };
            if let Some(aad) = v["aad_utf8"].as_str() {
                // The case names the AAD the opener would use; ours must be built from the envelope.
                let ours = input_aad(
                    &id.x25519_public().to_b58(),
                    &env.client_ephemeral_pubkey,
                    &env.client_response_pubkey,
                );
                if ours != aad {
                    let blob = b58::decode_vec(&env.ciphertext, "ct", MAX_CIPHERTEXT_CHARS)?;
                    let eph = X25519Public::from_b58(&env.client_ephemeral_pubkey)?;
                    let key = AeadKey::agree(id.x25519_secret(), &eph, HKDF_INFO_INPUT)?;
                    return key.open(&blob, aad.as_bytes()).map(|_| ());
                }
            }
            open_input(&id, &env).map(|_| ())
        }
        "check_algorithm_then_open_input" => {
            let env: EncEnvelope = serde_json::from_value(v["enc_envelope"].clone()).unwrap();
            let id = NodeIdentity::from_seed(&[0x42; 32]);
            assert_eq!(
                hex::encode(id.x25519_secret().to_bytes()),
                s(v, "node_x25519_secret_hex")
            );
            let r = open_input(&id, &env).map(|_| ());
            assert!(
                matches!(
                    r,
                    Err(ProtoError::UnsupportedAlgorithm(_)) | Err(ProtoError::MissingAlgorithm)
                ),
                "{r:?}"
            );
            r
        }
        "open_output" | "open_output_base64" => {
            let key = ResponseKey::from_secret_bytes(h32(v, "client_resp_secret_hex"));
            assert_eq!(key.public().to_b58(), s(v, "client_resp_pub_b58"));
            let (ciphertext, encoding) = match v["blob_b64"].as_str() {
                Some(b64) => (b64.to_string(), Some("base64".to_string())),
                None => (s(v, "blob_b58").to_string(), None),
            };
            let sr = SealedResult {
                ciphertext,
                ephemeral_public_key: s(v, "node_eph_pub_b58").to_string(),
                algorithm: Some(ALG_V2.to_string()),
                encoding,
            };
            key.open_output(&sr).map(|_| ())
        }
        "open_stream_chunk" => {
            let key = AeadKey(Zeroizing::new(h32(v, "out_key_hex")));
            let aad = stream_aad(
                s(v, "client_resp_pub_b58"),
                s(v, "node_stream_eph_pub_b58"),
                s(v, "request_nonce_b58"),
                seq(v),
                flag(v),
            );
            assert_eq!(aad, s(v, "aad_utf8"));
            let blob = decode_blob(s(v, "blob_b58"), MAX_CHUNK_CIPHERTEXT_CHARS)?;
            key.open(&blob, aad.as_bytes()).map(|_| ())
        }
        "verify_keybind" => {
            let ed = Ed25519Public::from_b58(s(v, "ed25519_b58"))?;
            let x = X25519Public::from_b58(s(v, "x25519_b58"))?;
            let sig = Signature::from_b58(s(v, "signature_b58"))?;
            let version: u32 = match &v["key_version"] {
                Value::Number(n) => n.as_u64().unwrap() as u32,
                other => other.as_str().unwrap().parse().unwrap(),
            };
            verify_keybind(s(v, "node_id"), &ed, &x, version, &sig)
        }
        "verify_result_envelope" => {
            let signer = Ed25519Public::from_b58(s(v, "signer_ed25519_pub_b58"))?;
            let kind = ResultKind::parse(s(v, "kind")).unwrap();
            verify_result(
                &signer,
                s(v, "job_id"),
                kind,
                s(v, "signed_payload_string"),
                Some(s(v, "signature_b58")),
                Some("v1"),
            )
        }
        "require_verified_reply" => verify_sealed_reply(
            v["reservation"]["node_ed25519_pubkey"].as_str(),
            &v["response"],
        ),
        other => panic!("unknown operation {other}"),
    }
}

#[test]
fn every_negative_case_is_refused() {
    let d = vectors();
    let cases = d["negative_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 26);
    for v in cases {
        assert_eq!(s(v, "expected"), "reject");
        let r = run_negative(v);
        assert!(r.is_err(), "{} was accepted", s(v, "name"));
    }
}

#[test]
fn low_order_cases_fail_as_low_order_not_as_bad_tags() {
    let d = vectors();
    for v in d["negative_cases"].as_array().unwrap() {
        if s(v, "name").contains("low_order") {
            assert_eq!(
                run_negative(v),
                Err(ProtoError::LowOrderPoint),
                "{}",
                s(v, "name")
            );
        }
    }
}

#[test]
fn stream_opener_refuses_splices() {
    let d = vectors();
    let v = &d["stream"];
    let chunks: Vec<&Value> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["sse_data_json"])
        .collect();
    let key = ResponseKey::from_secret_bytes(h32(v, "client_resp_secret_hex"));
    let nonce = s(v, "request_nonce_b58");
    let open = |o: &mut StreamOpener, c: &Value| {
        o.open(seq(c), flag(c), c["eph"].as_str(), s(c, "ct"))
            .map(|_| ())
    };

    // Chunk 1 as seq 0: no eph and wrong AAD.
    let mut o = key.stream_opener(nonce).unwrap();
    assert!(o
        .open(
            0,
            false,
            Some(s(v, "node_stream_eph_pub_b58")),
            s(chunks[1], "ct")
        )
        .is_err());
    // Chunk 1 marked final.
    let mut o = key.stream_opener(nonce).unwrap();
    open(&mut o, chunks[0]).unwrap();
    assert!(o.open(1, true, None, s(chunks[1], "ct")).is_err());
    // A gap.
    let mut o = key.stream_opener(nonce).unwrap();
    open(&mut o, chunks[0]).unwrap();
    assert_eq!(
        open(&mut o, chunks[2]),
        Err(ProtoError::StreamOutOfOrder {
            expected: 1,
            got: 2
        })
    );
    // A duplicate.
    let mut o = key.stream_opener(nonce).unwrap();
    open(&mut o, chunks[0]).unwrap();
    assert!(open(&mut o, chunks[0]).is_err());
    // Truncation: no final chunk.
    let mut o = key.stream_opener(nonce).unwrap();
    for c in &chunks[..3] {
        open(&mut o, c).unwrap();
    }
    assert_eq!(o.finish(), Err(ProtoError::StreamTruncated));
    // Anything after final.
    let mut o = key.stream_opener(nonce).unwrap();
    for c in &chunks {
        open(&mut o, c).unwrap();
    }
    assert_eq!(open(&mut o, chunks[3]), Err(ProtoError::StreamAfterFinal));
    // Another request's nonce.
    let mut o = key.stream_opener("N5L7eAc4PsHfZViqAMbFEH").unwrap();
    assert!(open(&mut o, chunks[0]).is_err());
    // An empty nonce is refused outright.
    assert!(key.stream_opener("").is_err());
}
