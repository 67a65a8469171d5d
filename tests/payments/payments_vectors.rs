//! Every vector and negative case of `tests/data/payments.json` (a copy of
//! the project's shared payment vectors, produced with eth-account 0.14.0
//! and the x402 2.25.0 Python SDK, and cross-checked with viem, mppx and a
//! Rust implementation; see that file's `source`).
#![cfg(feature = "payments")]

use std::str::FromStr;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use serde_json::Value;
use sgl::money::Micros;
use sgl::payments::config::{EvmNetwork, MppConfig, PaymentsConfig};
use sgl::payments::error::PaymentError;
use sgl::payments::evm::{self, Authorization, TokenDomain};
use sgl::payments::mpp;
use sgl::payments::x402::{self, Offer, Presented};
use sgl::payments::xauth::{self, AuthHeaders};
use zeroize::Zeroizing;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/payments.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

fn addr(v: &Value) -> Address {
    Address::from_str(s(v)).unwrap()
}

fn domain(d: &Value) -> TokenDomain {
    TokenDomain {
        name: s(&d["name"]).into(),
        version: s(&d["version"]).into(),
        chain_id: d["chainId"].as_u64().unwrap(),
        verifying_contract: addr(&d["verifyingContract"]),
    }
}

fn authorization(m: &Value) -> Authorization {
    Authorization::parse(
        s(&m["from"]),
        s(&m["to"]),
        s(&m["value"]),
        s(&m["validAfter"]),
        s(&m["validBefore"]),
        s(&m["nonce"]),
    )
    .unwrap()
}

fn network_for(d: &TokenDomain) -> EvmNetwork {
    EvmNetwork {
        v1_name: if d.chain_id == 8453 {
            "base".into()
        } else {
            "base-sepolia".into()
        },
        chain_id: d.chain_id,
        asset: d.verifying_contract,
        asset_name: d.name.clone(),
        asset_version: d.version.clone(),
    }
}

#[test]
fn eip3009_vectors_hash_and_recover() {
    let v = vectors();
    for vec in v["eip3009_vectors"].as_array().unwrap() {
        let d = domain(&vec["domain"]);
        let auth = authorization(&vec["message"]);
        let digest = auth.signing_hash(&d);
        assert_eq!(
            digest,
            B256::from_str(s(&vec["digest"])).unwrap(),
            "{}",
            vec["name"]
        );
        let signer = auth.recover(&d, s(&vec["signature"])).unwrap();
        assert_eq!(signer, addr(&vec["recovered_address"]));
        assert_eq!(signer, auth.from);
        // The full offline check at the vector's pinned time.
        let now = vec["valid_now_example"].as_u64().unwrap();
        x402::check_authorization(&auth, s(&vec["signature"]), &network_for(&d), &auth.to, now)
            .unwrap();
    }
}

#[test]
fn eip3009_edge_and_negative_cases() {
    let v = vectors();
    let base: Vec<&Value> = v["eip3009_vectors"].as_array().unwrap().iter().collect();
    let find = |name: &str| *base.iter().find(|b| b["name"] == name).unwrap();
    for case in v["eip3009_edge_and_negative_cases"].as_array().unwrap() {
        let b = find(s(&case["based_on"]));
        let mut d = domain(&b["domain"]);
        if let Some(o) = case.get("domain_override") {
            let mut dv = b["domain"].clone();
            for (k, val) in o.as_object().unwrap() {
                dv[k] = val.clone();
            }
            d = domain(&dv);
        }
        let mut msg = b["message"].clone();
        if let Some(o) = case.get("message_override") {
            for (k, val) in o.as_object().unwrap() {
                msg[k] = val.clone();
            }
        }
        let auth = authorization(&msg);
        let sig = case
            .get("signature")
            .map(s)
            .unwrap_or_else(|| s(&b["signature"]));
        let now = case
            .get("now")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| b["valid_now_example"].as_u64().unwrap());
        let net = network_for(&d);
        let result = x402::check_authorization(&auth, sig, &net, &auth.to, now);
        let name = s(&case["name"]);
        match name {
            "B_v_as_0_1" => {
                result.unwrap();
                assert_eq!(
                    auth.recover(&d, sig).unwrap(),
                    addr(&case["recovered_address"])
                );
            }
            "B_high_s_malleated" => {
                assert!(
                    matches!(result, Err(PaymentError::HighS)),
                    "{name}: {result:?}"
                );
                assert_eq!(
                    result.unwrap_err().code(),
                    "invalid_exact_evm_payload_signature"
                );
            }
            "B_value_tampered" | "B_wrong_domain_name" | "A_under_base_mainnet_domain" => {
                assert!(
                    matches!(result, Err(PaymentError::InvalidSignature)),
                    "{name}: {result:?}"
                );
                assert_eq!(
                    auth.recover(&d, sig).unwrap(),
                    addr(&case["recovered_address"]),
                    "{name}"
                );
                if let Some(dg) = case.get("digest") {
                    assert_eq!(auth.signing_hash(&d), B256::from_str(s(dg)).unwrap());
                }
            }
            "B_expired" => assert!(matches!(result, Err(PaymentError::Expired)), "{result:?}"),
            "B_not_yet_valid" => {
                assert!(
                    matches!(result, Err(PaymentError::NotYetValid)),
                    "{result:?}"
                )
            }
            other => panic!("unhandled vector case {other}"),
        }
        assert!(s(&case["expected"]).starts_with(if name == "B_v_as_0_1" {
            "accept"
        } else {
            "reject"
        }));
    }
}

#[test]
fn eip191_vectors() {
    let v = vectors();
    for vec in v["eip191_vectors"].as_array().unwrap() {
        let msg = s(&vec["message_utf8"]).as_bytes();
        let signer = evm::recover_personal(msg, s(&vec["signature"])).unwrap();
        assert_eq!(signer, addr(&vec["recovered_address"]));
        if let Some(neg) = vec.get("negative") {
            let other =
                evm::recover_personal(s(&neg["message_utf8"]).as_bytes(), s(&vec["signature"]))
                    .unwrap();
            assert_eq!(other, addr(&neg["recovered_address"]));
            assert_ne!(other, signer);
        }
    }
}

fn headers(h: &Value) -> AuthHeaders<'_> {
    AuthHeaders {
        address: s(&h["X-Auth-Address"]),
        chain: s(&h["X-Auth-Chain"]),
        signature: s(&h["X-Auth-Signature"]),
        timestamp: s(&h["X-Auth-Timestamp"]),
        nonce: s(&h["X-Auth-Nonce"]),
        sig_encoding: h.get("X-Auth-Sig-Encoding").map(s),
    }
}

const WINDOW_MS: i64 = 300_000;

#[test]
fn x402_compute_auth_evm_vector() {
    let v = vectors();
    let vec = &v["eip191_vectors"][1];
    assert_eq!(vec["name"], "eip191_x402_compute_auth");
    let lines: Vec<&str> = vec["message_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let built = xauth::message(
        lines[2], lines[3], lines[4], lines[5], b"", lines[7], lines[8],
    );
    assert_eq!(built, s(&vec["message_utf8"]));
    let h = headers(&vec["headers"]);
    let ts: i64 = h.timestamp.parse().unwrap();
    let by = xauth::verify(&h, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).unwrap();
    assert_eq!(by.chain, "base");
    assert_eq!(
        by.wallet.as_str(),
        "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
    );
    // Window: ±300 s inclusive, then refused.
    xauth::verify(
        &h,
        "GET",
        &["/compute/instances"],
        b"",
        ts + WINDOW_MS,
        WINDOW_MS,
    )
    .unwrap();
    assert!(matches!(
        xauth::verify(
            &h,
            "GET",
            &["/compute/instances"],
            b"",
            ts + WINDOW_MS + 1,
            WINDOW_MS
        ),
        Err(PaymentError::AuthExpired)
    ));
    assert!(matches!(
        xauth::verify(
            &h,
            "GET",
            &["/compute/instances"],
            b"",
            ts - WINDOW_MS - 1,
            WINDOW_MS
        ),
        Err(PaymentError::AuthExpired)
    ));
    // Another path, method or body is another message.
    for (m, p, b) in [
        ("GET", "/compute/other", &b""[..]),
        ("POST", "/compute/instances", b""),
        ("GET", "/compute/instances", b"{}"),
    ] {
        assert!(matches!(
            xauth::verify(&h, m, &[p], b, ts, WINDOW_MS),
            Err(PaymentError::AuthInvalid(_))
        ));
    }
}

#[test]
fn solana_ed25519_vectors() {
    let v = vectors();
    let sol = &v["solana_ed25519_vectors"];
    let canonical = &sol[0];
    let lines: Vec<&str> = canonical["message_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(
        xauth::message(lines[2], lines[3], lines[4], lines[5], b"", lines[7], lines[8]),
        s(&canonical["message_utf8"])
    );
    let h = headers(&canonical["headers"]);
    let ts: i64 = h.timestamp.parse().unwrap();
    let by = xauth::verify(&h, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).unwrap();
    assert_eq!(by.chain, "solana");
    assert_eq!(by.wallet.as_str(), s(&canonical["pubkey_b58"]));
    // The same signature in base58 and hex encodings.
    for (enc, sig) in [
        ("base58", s(&canonical["signature_b58"])),
        ("hex", s(&canonical["signature_hex"])),
    ] {
        let h2 = AuthHeaders {
            signature: sig,
            sig_encoding: Some(enc),
            ..h.clone()
        };
        xauth::verify(&h2, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).unwrap();
    }
    // The signature over the EVM message is a valid ed25519 signature of
    // other bytes: refused as Solana auth, and as Base auth.
    let over_evm = &sol[1];
    let h3 = AuthHeaders {
        signature: s(&over_evm["signature_b64"]),
        ..h.clone()
    };
    assert!(xauth::verify(&h3, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).is_err());
    let evm_h = headers(&v["eip191_vectors"][1]["headers"]);
    let h4 = AuthHeaders {
        signature: s(&over_evm["signature_hex"]),
        ..evm_h
    };
    assert!(xauth::verify(&h4, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).is_err());
    // A flipped bit is refused.
    let mut bad = hex::decode(s(&canonical["signature_hex"])).unwrap();
    bad[5] ^= 1;
    let bad_hex = hex::encode(bad);
    let h5 = AuthHeaders {
        signature: &bad_hex,
        sig_encoding: Some("hex"),
        ..h
    };
    assert!(xauth::verify(&h5, "GET", &["/compute/instances"], b"", ts, WINDOW_MS).is_err());
}

#[test]
fn mpp_vector() {
    let v = vectors();
    let m = &v["mpp"];
    let i = &m["inputs"];
    let request = &i["request_object"];
    assert_eq!(mpp::jcs(request), s(&m["request_jcs_utf8"]));
    let net = EvmNetwork::base_usdc();
    let pay_to = addr(&request["recipient"]);
    assert_eq!(&mpp::charge_request(&net, &pay_to, 1_000_000), request);
    let id = mpp::challenge_id(
        s(&i["secret_key_utf8"]).as_bytes(),
        s(&i["realm"]),
        s(&i["method"]),
        s(&i["intent"]),
        s(&m["request_b64url"]),
        s(&i["expires"]),
        "",
        "",
    );
    assert_eq!(id, s(&m["challenge_id"]));
    let ch = mpp::Challenge {
        id: id.clone(),
        realm: s(&i["realm"]).into(),
        method: "evm".into(),
        intent: "charge".into(),
        request_b64: s(&m["request_b64url"]).into(),
        expires: s(&i["expires"]).into(),
        opaque_b64: None,
    };
    assert_eq!(ch.www_authenticate(), s(&m["www_authenticate"]));
    // Negatives: a changed expiry or another secret give other ids.
    for neg in m["negatives"].as_array().unwrap() {
        match s(&neg["name"]) {
            "mpp_id_expires_changed" => assert_eq!(
                mpp::challenge_id(
                    b"test-secret",
                    s(&i["realm"]),
                    "evm",
                    "charge",
                    s(&m["request_b64url"]),
                    "2030-01-15T12:06:00Z",
                    "",
                    ""
                ),
                s(&neg["recomputed_id"])
            ),
            "mpp_id_wrong_secret" => assert_eq!(
                mpp::challenge_id(
                    b"other-secret",
                    s(&i["realm"]),
                    "evm",
                    "charge",
                    s(&m["request_b64url"]),
                    s(&i["expires"]),
                    "",
                    ""
                ),
                s(&neg["recomputed_id"])
            ),
            "mpp_nonce_not_bound" => {
                let required = mpp::binding_nonce(&id, s(&i["realm"]));
                assert_eq!(format!("{required:#x}"), s(&neg["required_nonce"]));
                assert_ne!(s(&neg["presented_nonce"]), s(&neg["required_nonce"]));
            }
            other => panic!("unhandled MPP negative {other}"),
        }
    }
    // The binding nonce and the signed authorization.
    assert_eq!(
        format!("{:#x}", mpp::binding_nonce(&id, s(&i["realm"]))),
        s(&m["eip3009_nonce"])
    );
    let e = &m["eip3009"];
    let d = domain(&e["domain"]);
    let auth = authorization(&e["message"]);
    assert_eq!(
        auth.signing_hash(&d),
        B256::from_str(s(&e["digest"])).unwrap()
    );
    x402::check_authorization(
        &auth,
        s(&e["signature"]),
        &net,
        &pay_to,
        e["valid_now_example"].as_u64().unwrap(),
    )
    .unwrap();
    // The credential: parse the header, and re-serialise it byte for byte.
    let cred = mpp::parse_authorization(s(&m["authorization_header"])).unwrap();
    assert_eq!(cred.challenge.id, id);
    assert_eq!(cred.payload.nonce, s(&m["eip3009_nonce"]));
    assert_eq!(
        mpp::jcs(&m["credential_object"]),
        s(&m["credential_jcs_utf8"])
    );
    assert_eq!(
        mpp::jcs(&serde_json::to_value(&cred).unwrap()),
        s(&m["credential_jcs_utf8"])
    );
    // The receipt.
    let r = &m["receipt_example_object"];
    let ts = sgl::timefmt::parse_rfc3339(s(&r["timestamp"])).unwrap();
    assert_eq!(
        mpp::receipt(s(&r["reference"]), ts),
        s(&m["payment_receipt_header_example"])
    );
    // Full verification of the vector credential against a server
    // configured like the vector's: the vector's challenge has no `opaque`
    // resource binding, which this server always issues, so it is refused
    // for that (and only that) reason.
    let cfg = MppConfig {
        realm: s(&i["realm"]).into(),
        secret: Zeroizing::new(b"test-secret".to_vec()),
        validity: Duration::from_secs(300),
        recipient: None,
    };
    let offer = Offer {
        resource_url: "http://127.0.0.1:8080/paid".into(),
        price: Micros(1_000_000),
        description: "x".into(),
        mime_type: "application/json".into(),
    };
    let r = mpp::verify(&cfg, &net, &pay_to, &offer, &cred, 1_894_700_000);
    assert!(
        matches!(r, Err(PaymentError::RequirementsMismatch("resource"))),
        "{r:?}"
    );
}

fn header_cfg() -> PaymentsConfig {
    let mut cfg = PaymentsConfig::new(
        Address::from_str("0x209693Bc6afc0C5328bA36FaF03C514EF312287C").unwrap(),
        "http://127.0.0.1:9",
    );
    cfg.max_timeout_seconds = 600;
    cfg
}

fn header_offer(price: u64) -> Offer {
    Offer {
        resource_url: "https://grid.example.com/v1/chat/completions".into(),
        price: Micros(price),
        description: "SGL grid chat completion".into(),
        mime_type: "application/json".into(),
    }
}

#[test]
fn x402_header_vectors() {
    let v = vectors();
    let h = &v["x402_headers"];
    let cfg = header_cfg();
    let now = h["verify_now"].as_u64().unwrap();
    // v2 PAYMENT-REQUIRED: byte-identical to the SDK's encoding.
    let pr = x402::payment_required_v2(&cfg, &header_offer(90_000_000), "Payment required");
    assert_eq!(
        x402::encode_header_json(&pr),
        s(&h["v2"]["payment_required_header_value"])
    );
    // v1 402 body.
    let body = x402::payment_required_v1(
        &cfg,
        &header_offer(90_000_000),
        "X-PAYMENT header is required",
    );
    assert_eq!(body, h["v1"]["payment_required_body"]);
    // v1 X-PAYMENT and v2 PAYMENT-SIGNATURE decode and verify.
    for (ver, value, json) in [
        (
            1,
            &h["v1"]["x_payment_header_value"],
            &h["v1"]["x_payment_json"],
        ),
        (
            2,
            &h["v2"]["payment_signature_header_value"],
            &h["v2"]["payment_signature_json"],
        ),
    ] {
        let presented = x402::parse_payment_header(s(value)).unwrap();
        match (&presented, ver) {
            (Presented::V1(p), 1) => assert_eq!(&serde_json::to_value(p).unwrap(), json),
            (Presented::V2(p), 2) => assert_eq!(&serde_json::to_value(p).unwrap(), json),
            _ => panic!("wrong version"),
        }
        let ok = x402::verify(&cfg, &presented, &header_offer(90_000_000), now).unwrap();
        assert_eq!(ok.payer, addr(&h["payer"]));
        assert_eq!(ok.version, ver);
        assert_eq!(ok.key.nonce, format!("0x{}", "0".repeat(64)));
        // The SDK's negatives.
        let neg = &h["sdk_facilitator_negatives"];
        let code = |now: u64, price: u64| {
            x402::verify(&cfg, &presented, &header_offer(price), now)
                .unwrap_err()
                .code()
                .to_owned()
        };
        assert_eq!(
            code(neg["expired"]["now"].as_u64().unwrap(), 90_000_000),
            s(&neg["expired"]["v2_invalid_reason"])
        );
        assert_eq!(
            code(neg["not_yet_valid"]["now"].as_u64().unwrap(), 90_000_000),
            s(&neg["not_yet_valid"]["v2_invalid_reason"])
        );
        if ver == 2 {
            assert_eq!(
                code(now, 90_000_001),
                s(&neg["amount_mismatch"]["v2_invalid_reason"])
            );
        } else {
            // v1: the authorization must be at least the price.
            assert_eq!(
                code(now, 90_000_001),
                "invalid_exact_evm_payload_authorization_value"
            );
            x402::verify(&cfg, &presented, &header_offer(89_000_000), now).unwrap();
        }
    }
    // A corrupted signature in the v2 payload.
    let neg = &h["sdk_facilitator_negatives"]["corrupted_signature"];
    let mut pj = h["v2"]["payment_signature_json"].clone();
    pj["payload"]["signature"] = neg["signature"].clone();
    let presented = x402::parse_payment_header(&x402::encode_header_json(&pj)).unwrap();
    let err = x402::verify(&cfg, &presented, &header_offer(90_000_000), now).unwrap_err();
    assert_eq!(err.code(), s(&neg["v2_invalid_reason"]));
    // A v2 payment for another resource, to another payee, on another
    // network: all refused.
    let mut other = h["v2"]["payment_signature_json"].clone();
    other["resource"]["url"] = "https://grid.example.com/v1/other".into();
    let p = x402::parse_payment_header(&x402::encode_header_json(&other)).unwrap();
    assert_eq!(
        x402::verify(&cfg, &p, &header_offer(90_000_000), now)
            .unwrap_err()
            .code(),
        "invalid_payment_requirements"
    );
    let mut other = h["v2"]["payment_signature_json"].clone();
    other["accepted"]["network"] = "eip155:84532".into();
    let p = x402::parse_payment_header(&x402::encode_header_json(&other)).unwrap();
    assert_eq!(
        x402::verify(&cfg, &p, &header_offer(90_000_000), now)
            .unwrap_err()
            .code(),
        "invalid_network"
    );
    let mut cfg2 = header_cfg();
    cfg2.pay_to = Address::from_str("0x0000000000000000000000000000000000000001").unwrap();
    let p = x402::parse_payment_header(s(&h["v2"]["payment_signature_header_value"])).unwrap();
    assert!(x402::verify(&cfg2, &p, &header_offer(90_000_000), now).is_err());
    let p = x402::parse_payment_header(s(&h["v1"]["x_payment_header_value"])).unwrap();
    assert_eq!(
        x402::verify(&cfg2, &p, &header_offer(90_000_000), now)
            .unwrap_err()
            .code(),
        "invalid_exact_evm_payload_recipient_mismatch"
    );
}

#[test]
fn malformed_headers_are_refused() {
    for bad in ["", "!!!", "bm90IGpzb24=", "eyJ4NDAyVmVyc2lvbiI6M30="] {
        assert!(x402::parse_payment_header(bad).is_err(), "{bad}");
    }
    let huge = "A".repeat(x402::MAX_HEADER_BYTES + 1);
    assert!(x402::parse_payment_header(&huge).is_err());
    assert!(mpp::parse_authorization("Bearer abc").is_err());
    assert!(mpp::parse_authorization("Payment !!!").is_err());
}
