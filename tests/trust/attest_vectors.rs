//! The verifier against real vendor samples (tests/data/tee/, copied from the
//! `sev` 8.0.0 and `dcap-qvl` 0.7.1 crates; see tests/data/tee/README.md):
//! the genuine evidence verifies, and every single mutation fails at the step
//! that names it.

use sgl::attest::evidence::B64Bytes;
use sgl::attest::policy::{Measurement, TdxReference};
use sgl::attest::sim::SimKey;
use sgl::attest::{
    verify_evidence, AttestationLevel, Binding, CheckStatus, Evidence, EvidenceFormat, NodeBinding,
    Policy, SnpCerts, Step, Verdict, VerifyOptions,
};
use sgl::proto::identity::{NodeId, NodeIdentity};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tee");
/// 2025-07-01T00:00:00Z: inside the Milan VCEK's validity and the TDX
/// sample's collateral window.
const NOW_2025: u64 = 1_751_328_000;
/// 2026-10-20T00:00:00Z: inside the TD 1.5ex sample's collateral window.
const NOW_TD15EX: u64 = 1_792_454_400;
/// 2026-03-05T00:00:00Z: inside the outdated sample's collateral window.
const NOW_OUTDATED: u64 = 1_772_668_800;

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DATA}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&read("expected.json")).unwrap()
}

fn hex64(s: &str) -> [u8; 64] {
    hex::decode(s).unwrap().try_into().unwrap()
}

fn milan_report() -> Vec<u8> {
    hex::decode(String::from_utf8(read("report_milan.hex")).unwrap().trim()).unwrap()
}

fn milan_rd() -> [u8; 64] {
    hex64(expected()["snp_milan"]["report_data_hex"].as_str().unwrap())
}

fn milan_measurement() -> Measurement {
    Measurement::from_hex(expected()["snp_milan"]["measurement_hex"].as_str().unwrap()).unwrap()
}

fn snp_evidence(report: Vec<u8>, vcek: &str) -> Evidence {
    Evidence {
        format: EvidenceFormat::SevSnp,
        report: B64Bytes(report),
        certs: Some(SnpCerts {
            vcek: Some(B64Bytes(read(vcek))),
            ..Default::default()
        }),
        collateral: None,
        gpu: Vec::new(),
    }
}

/// The default policy with the sample's measurement allowed.
fn snp_policy() -> Policy {
    let mut p = Policy::default_policy();
    p.snp.measurements = vec![milan_measurement()];
    p
}

async fn verify_snp(ev: &Evidence, policy: &Policy, rd: [u8; 64], now: u64) -> Verdict {
    verify_evidence(
        ev,
        &Binding::ReportData(rd),
        policy,
        &VerifyOptions::new(now),
    )
    .await
}

fn assert_only_failures(v: &Verdict, steps: &[Step]) {
    assert!(!v.verified, "{}", v.render());
    assert_eq!(v.attestation_level, AttestationLevel::None);
    let mut failed = v.failed_steps();
    failed.sort_by_key(|s| s.as_str());
    let mut want = steps.to_vec();
    want.sort_by_key(|s| s.as_str());
    assert_eq!(failed, want, "{}", v.render());
}

#[tokio::test]
async fn milan_report_verifies_with_builtin_roots() {
    let ev = snp_evidence(milan_report(), "vcek_milan.der");
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), NOW_2025).await;
    assert!(v.verified, "{}", v.render());
    assert_eq!(v.attestation_level, AttestationLevel::Hardware);
    for step in [
        Step::Format,
        Step::DevMode,
        Step::Parse,
        Step::Certificates,
        Step::Chain,
        Step::Signature,
        Step::KeyKind,
        Step::ChipId,
        Step::VekTcb,
        Step::Tcb,
        Step::Debug,
        Step::Vmpl,
        Step::Measurement,
        Step::ReportData,
    ] {
        assert_eq!(
            v.status(step),
            Some(CheckStatus::Pass),
            "{step}: {}",
            v.render()
        );
    }
    // Raw report data carries no challenge, and the verdict says so.
    assert_eq!(v.status(Step::Freshness), Some(CheckStatus::Skipped));
    assert_eq!(v.claims.product.as_deref(), Some("Milan"));
    assert!(v
        .check(Step::Chain)
        .unwrap()
        .detail
        .contains("ARK-Milan (pinned)"));
    assert_eq!(v.policy_digest, snp_policy().digest());
}

#[tokio::test]
async fn every_single_byte_flip_of_the_milan_report_fails() {
    let report = milan_report();
    let policy = snp_policy();
    for i in 0..report.len() {
        let mut r = report.clone();
        r[i] ^= 0x01;
        let v = verify_snp(
            &snp_evidence(r, "vcek_milan.der"),
            &policy,
            milan_rd(),
            NOW_2025,
        )
        .await;
        assert!(!v.verified, "flip at {i:#x} verified");
        let parse_failed = v.status(Step::Parse) == Some(CheckStatus::Fail);
        let sig_failed = v.status(Step::Signature) == Some(CheckStatus::Fail);
        assert!(parse_failed || sig_failed, "flip at {i:#x}: {}", v.render());
        if (0x50..0x90).contains(&i) {
            assert_eq!(
                v.status(Step::ReportData),
                Some(CheckStatus::Fail),
                "{i:#x}"
            );
        }
        if (0x90..0xC0).contains(&i) {
            assert_eq!(
                v.status(Step::Measurement),
                Some(CheckStatus::Fail),
                "{i:#x}"
            );
        }
    }
}

#[tokio::test]
async fn turin_vcek_fails_at_signature_and_chip_id() {
    let ev = snp_evidence(milan_report(), "vcek_turin.der");
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), NOW_2025).await;
    // The Turin VCEK chains to the pinned Turin root, but it did not sign this
    // report and names another chip at another TCB.
    assert_eq!(
        v.status(Step::Chain),
        Some(CheckStatus::Pass),
        "{}",
        v.render()
    );
    assert_eq!(v.status(Step::Signature), Some(CheckStatus::Fail));
    assert_eq!(v.status(Step::ChipId), Some(CheckStatus::Fail));
    assert!(!v.verified);
}

#[tokio::test]
async fn wrong_expected_report_data_fails_only_there() {
    let ev = snp_evidence(milan_report(), "vcek_milan.der");
    let mut rd = milan_rd();
    rd[63] ^= 0x80;
    let v = verify_snp(&ev, &snp_policy(), rd, NOW_2025).await;
    assert_only_failures(&v, &[Step::ReportData]);
}

#[tokio::test]
async fn debug_bit_fails_at_debug_and_signature() {
    let mut r = milan_report();
    r[0x08 + 2] |= 0x08; // guest policy bit 19
    let v = verify_snp(
        &snp_evidence(r, "vcek_milan.der"),
        &snp_policy(),
        milan_rd(),
        NOW_2025,
    )
    .await;
    // The bit is inside the signed area, so the signature breaks too.
    assert_only_failures(&v, &[Step::Debug, Step::Signature]);
}

#[tokio::test]
async fn vmpl_above_the_policy_fails() {
    let mut r = milan_report();
    r[0x30] = 2;
    let v = verify_snp(
        &snp_evidence(r, "vcek_milan.der"),
        &snp_policy(),
        milan_rd(),
        NOW_2025,
    )
    .await;
    assert_only_failures(&v, &[Step::Vmpl, Step::Signature]);
}

#[tokio::test]
async fn tcb_below_the_policy_minimum_fails_only_there() {
    let ev = snp_evidence(milan_report(), "vcek_milan.der");
    let mut p = snp_policy();
    p.snp.min_tcb.get_mut("milan").unwrap().microcode = 116;
    let v = verify_snp(&ev, &p, milan_rd(), NOW_2025).await;
    assert_only_failures(&v, &[Step::Tcb]);
    assert!(v
        .check(Step::Tcb)
        .unwrap()
        .detail
        .contains("microcode 115 < 116"));
    // A product without a minimum is refused.
    let mut p = snp_policy();
    p.snp.min_tcb.remove("milan");
    assert_only_failures(
        &verify_snp(&ev, &p, milan_rd(), NOW_2025).await,
        &[Step::Tcb],
    );
}

#[tokio::test]
async fn measurement_not_allowed_fails_and_skip_is_stated() {
    let ev = snp_evidence(milan_report(), "vcek_milan.der");
    let mut p = snp_policy();
    p.snp.measurements = vec![Measurement([0x11; 48])];
    assert_only_failures(
        &verify_snp(&ev, &p, milan_rd(), NOW_2025).await,
        &[Step::Measurement],
    );
    // The default policy allows nothing.
    let d = Policy::default_policy();
    assert_only_failures(
        &verify_snp(&ev, &d, milan_rd(), NOW_2025).await,
        &[Step::Measurement],
    );
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.allow_any_measurement = true;
    let v = verify_evidence(&ev, &Binding::ReportData(milan_rd()), &d, &opts).await;
    assert!(v.verified, "{}", v.render());
    let m = v.check(Step::Measurement).unwrap();
    assert_eq!(m.status, CheckStatus::Skipped);
    assert!(m.detail.contains("--allow-any-measurement"));
}

#[tokio::test]
async fn a_foreign_ark_or_unknown_issuer_fails_the_chain() {
    let mut ev = snp_evidence(milan_report(), "vcek_milan.der");
    let turin_ark = x509_der_from_pem(&read("turin_ark.pem"));
    ev.certs.as_mut().unwrap().ark = Some(B64Bytes(turin_ark));
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), NOW_2025).await;
    assert_eq!(
        v.status(Step::Chain),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert!(v.check(Step::Chain).unwrap().detail.contains("pinned"));
    // The ASK in place of the VCEK: its issuer is a root, not an ASK.
    let mut ev = snp_evidence(milan_report(), "vcek_milan.der");
    ev.certs.as_mut().unwrap().vcek = Some(B64Bytes(x509_der_from_pem(&read("milan_ask.pem"))));
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), NOW_2025).await;
    assert_eq!(
        v.status(Step::Chain),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert_eq!(v.status(Step::Signature), Some(CheckStatus::Fail));
}

#[tokio::test]
async fn a_time_outside_the_vcek_validity_fails_the_chain() {
    let ev = snp_evidence(milan_report(), "vcek_milan.der");
    // 2031-01-01, after the VCEK's notAfter (2030-04-03).
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), 1_924_992_000).await;
    assert_eq!(
        v.status(Step::Chain),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert!(!v.verified);
}

#[tokio::test]
async fn no_vcek_and_no_kds_fails_at_certificates() {
    let mut ev = snp_evidence(milan_report(), "vcek_milan.der");
    ev.certs = None;
    let v = verify_snp(&ev, &snp_policy(), milan_rd(), NOW_2025).await;
    assert_eq!(
        v.status(Step::Certificates),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert!(!v.verified);
}

fn x509_der_from_pem(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(pem.to_vec()).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

// ---- TDX ----

fn tdx_expected(file: &str) -> serde_json::Value {
    expected()["tdx"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["file"] == file)
        .cloned()
        .unwrap()
}

fn tdx_evidence(quote: &str, collateral: &str) -> Evidence {
    Evidence {
        format: EvidenceFormat::Tdx,
        report: B64Bytes(read(quote)),
        certs: None,
        collateral: Some(serde_json::from_slice(&read(collateral)).unwrap()),
        gpu: Vec::new(),
    }
}

fn tdx_policy(file: &str) -> Policy {
    let t = tdx_expected(file);
    let m = |k: &str| Measurement::from_hex(t[k].as_str().unwrap()).unwrap();
    let mut p = Policy::default_policy();
    p.tdx.reference = vec![TdxReference {
        mrtd: m("mr_td_hex"),
        rtmr0: Some(m("rtmr0_hex")),
        rtmr1: Some(m("rtmr1_hex")),
        rtmr2: Some(m("rtmr2_hex")),
        rtmr3: Some(m("rtmr3_hex")),
    }];
    p
}

fn tdx_rd(file: &str) -> [u8; 64] {
    hex64(tdx_expected(file)["report_data_hex"].as_str().unwrap())
}

#[tokio::test]
async fn tdx_quote_v4_verifies_at_the_pinned_time() {
    let ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(tdx_rd("tdx_quote")),
        &tdx_policy("tdx_quote"),
        &VerifyOptions::new(NOW_2025),
    )
    .await;
    assert!(v.verified, "{}", v.render());
    assert_eq!(v.attestation_level, AttestationLevel::Hardware);
    assert_eq!(v.claims.tcb_status.as_deref(), Some("UpToDate"));
    for step in [
        Step::Collateral,
        Step::Signature,
        Step::Tcb,
        Step::Debug,
        Step::Measurement,
        Step::ReportData,
    ] {
        assert_eq!(v.status(step), Some(CheckStatus::Pass), "{step}");
    }
}

#[tokio::test]
async fn tdx_quote_v5_td15ex_verifies_at_its_pinned_time() {
    let ev = tdx_evidence("tdx_quote_td15ex", "tdx_quote_td15ex_collateral.json");
    let rd = hex64(
        tdx_expected("tdx_quote_td15ex")["report_data_hex"]
            .as_str()
            .unwrap(),
    );
    let mut p = Policy::default_policy();
    p.tdx.reference = vec![TdxReference {
        mrtd: Measurement::from_hex(
            tdx_expected("tdx_quote_td15ex")["mr_td_hex"]
                .as_str()
                .unwrap(),
        )
        .unwrap(),
        rtmr0: None,
        rtmr1: None,
        rtmr2: None,
        rtmr3: None,
    }];
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(rd),
        &p,
        &VerifyOptions::new(NOW_TD15EX),
    )
    .await;
    assert!(v.verified, "{}", v.render());
}

#[tokio::test]
async fn tdx_outdated_sample_fails_at_tcb() {
    let ev = tdx_evidence("tdx_quote_outdated", "tdx_quote_outdated_collateral.json");
    let quote = read("tdx_quote_outdated");
    let rd: [u8; 64] = quote[574..638].try_into().unwrap();
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(rd),
        &Policy::default_policy(),
        &VerifyOptions::new(NOW_OUTDATED),
    )
    .await;
    assert_eq!(
        v.status(Step::Tcb),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert_eq!(
        v.status(Step::Collateral),
        Some(CheckStatus::Pass),
        "{}",
        v.render()
    );
    assert!(!v.verified);
}

#[tokio::test]
async fn tdx_tampered_quote_fails_at_signature() {
    let mut ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    ev.report.0[568] ^= 1; // report_data
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(tdx_rd("tdx_quote")),
        &tdx_policy("tdx_quote"),
        &VerifyOptions::new(NOW_2025),
    )
    .await;
    // The TCB status is only known from a verified quote, so it is not established either.
    assert_only_failures(&v, &[Step::Signature, Step::Tcb, Step::ReportData]);
    let mut ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    ev.report.0[184] ^= 1; // mr_td
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(tdx_rd("tdx_quote")),
        &tdx_policy("tdx_quote"),
        &VerifyOptions::new(NOW_2025),
    )
    .await;
    assert_only_failures(&v, &[Step::Signature, Step::Tcb, Step::Measurement]);
    let mut ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    ev.report.0[48 + 120] |= 1; // td_attributes.DEBUG
    let v = verify_evidence(
        &ev,
        &Binding::ReportData(tdx_rd("tdx_quote")),
        &tdx_policy("tdx_quote"),
        &VerifyOptions::new(NOW_2025),
    )
    .await;
    assert!(v.failed_steps().contains(&Step::Debug), "{}", v.render());
    assert!(
        v.failed_steps().contains(&Step::Signature),
        "{}",
        v.render()
    );
}

#[tokio::test]
async fn tdx_time_outside_the_collateral_window_fails_at_collateral() {
    let ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    let t = tdx_expected("tdx_quote");
    let policy = tdx_policy("tdx_quote");
    for now in [
        t["dcap_qvl_0_7_1_accepted_now_first"].as_u64().unwrap() - 1,
        t["dcap_qvl_0_7_1_accepted_now_last"].as_u64().unwrap() + 1,
    ] {
        let v = verify_evidence(
            &ev,
            &Binding::ReportData(tdx_rd("tdx_quote")),
            &policy,
            &VerifyOptions::new(now),
        )
        .await;
        assert_eq!(
            v.status(Step::Collateral),
            Some(CheckStatus::Fail),
            "{now}: {}",
            v.render()
        );
        assert!(!v.verified);
    }
}

#[tokio::test]
async fn tdx_policy_mismatches_fail_at_their_steps() {
    let ev = tdx_evidence("tdx_quote", "tdx_quote_collateral.json");
    let rd = Binding::ReportData(tdx_rd("tdx_quote"));
    let opts = VerifyOptions::new(NOW_2025);
    let mut p = tdx_policy("tdx_quote");
    p.tdx.reference[0].rtmr3 = Some(Measurement([1; 48]));
    assert_only_failures(
        &verify_evidence(&ev, &rd, &p, &opts).await,
        &[Step::Measurement],
    );
    let mut p = tdx_policy("tdx_quote");
    p.tdx.accepted_tcb_status = vec!["OutOfDate".into()];
    assert_only_failures(&verify_evidence(&ev, &rd, &p, &opts).await, &[Step::Tcb]);
    let mut no_coll = ev.clone();
    no_coll.collateral = None;
    let v = verify_evidence(&no_coll, &rd, &tdx_policy("tdx_quote"), &opts).await;
    assert_eq!(
        v.status(Step::Collateral),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    // The other sample's collateral does not fit this quote.
    let mut wrong = ev.clone();
    wrong.collateral =
        Some(serde_json::from_slice(&read("tdx_quote_td15ex_collateral.json")).unwrap());
    let v = verify_evidence(
        &wrong,
        &rd,
        &tdx_policy("tdx_quote"),
        &VerifyOptions::new(NOW_TD15EX),
    )
    .await;
    assert!(!v.verified);
}

// ---- simulated ----

fn node_binding(challenge: &str) -> NodeBinding {
    let id = NodeIdentity::from_seed(&[0x42; 32]);
    NodeBinding {
        node_id: NodeId::parse("f617ee39-17e3-4904-9474-112446c9326a").unwrap(),
        ed25519: id.ed25519_public(),
        x25519: id.x25519_public(),
        key_version: 1,
        challenge: challenge.into(),
    }
}

fn sim_evidence(key: &SimKey, b: &NodeBinding) -> Evidence {
    Evidence {
        format: EvidenceFormat::Simulated,
        report: B64Bytes(key.report(&b.report_data(), &[3; 48])),
        certs: None,
        collateral: None,
        gpu: Vec::new(),
    }
}

#[tokio::test]
async fn simulated_evidence_needs_development_mode_and_is_never_hardware() {
    let key = SimKey::generate();
    let b = node_binding("3f6c0d2a9b8e7f1021324354657687988a9bacbdcedfe0f1a2b3c4d5e6f70819");
    let ev = sim_evidence(&key, &b);
    let binding = Binding::Node {
        binding: b.clone(),
        challenge_expires_at: Some(NOW_2025 + 300),
    };
    let policy = Policy::default_policy();
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.simulated_keys = vec![key.public()];
    let v = verify_evidence(&ev, &binding, &policy, &opts).await;
    assert_only_failures(&v, &[Step::DevMode]);

    opts.dev_mode = true;
    let v = verify_evidence(&ev, &binding, &policy, &opts).await;
    assert!(v.verified, "{}", v.render());
    assert_eq!(v.attestation_level, AttestationLevel::Simulated);
    assert_eq!(v.status(Step::Freshness), Some(CheckStatus::Pass));

    // An expired challenge fails freshness only.
    let expired = Binding::Node {
        binding: b.clone(),
        challenge_expires_at: Some(NOW_2025 - 1),
    };
    assert_only_failures(
        &verify_evidence(&ev, &expired, &policy, &opts).await,
        &[Step::Freshness],
    );
    // Another challenge: the report data no longer binds it.
    let other = Binding::Node {
        binding: node_binding("another challenge"),
        challenge_expires_at: None,
    };
    assert_only_failures(
        &verify_evidence(&ev, &other, &policy, &opts).await,
        &[Step::ReportData],
    );
    // Another key version or X25519 key: also the report data.
    let mut kv = b.clone();
    kv.key_version = 2;
    let kv = Binding::Node {
        binding: kv,
        challenge_expires_at: None,
    };
    assert_only_failures(
        &verify_evidence(&ev, &kv, &policy, &opts).await,
        &[Step::ReportData],
    );
    // A key the verifier was not told about.
    opts.simulated_keys = vec![SimKey::generate().public()];
    assert_only_failures(
        &verify_evidence(&ev, &binding, &policy, &opts).await,
        &[Step::Signature],
    );
}

#[test]
fn report_data_binding_matches_the_protocol_vector() {
    let b = node_binding("3f6c0d2a9b8e7f1021324354657687988a9bacbdcedfe0f1a2b3c4d5e6f70819");
    assert_eq!(
        hex::encode(b.report_data()),
        "dba94ac570f795af9e50a0fe75316bfb0b786cdaca096ab99ed00c201b18daacd33f374d346f094fa8af9b3e90479a84daf9fdc1ab8419bf5db2918a592d3fc3"
    );
}

#[tokio::test]
async fn gpu_evidence_is_carried_but_never_claimed() {
    let key = SimKey::generate();
    let b = node_binding("c");
    let mut ev = sim_evidence(&key, &b);
    ev.gpu = vec![sgl::attest::GpuEvidence {
        vendor: "nvidia".into(),
        arch: "hopper".into(),
        evidence: B64Bytes(vec![1, 2, 3]),
        certificate_chain: B64Bytes(vec![4]),
    }];
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.dev_mode = true;
    opts.simulated_keys = vec![key.public()];
    let binding = Binding::Node {
        binding: b,
        challenge_expires_at: None,
    };
    let v = verify_evidence(&ev, &binding, &Policy::default_policy(), &opts).await;
    assert!(v.verified, "{}", v.render());
    assert!(!v.gpu_verified);
    assert_eq!(v.status(Step::Gpu), Some(CheckStatus::Skipped));
}
