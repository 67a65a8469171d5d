//! `sgl attest` end to end on the real binary: the vendor samples verify and a
//! wrong binding is refused with a non-zero exit; simulated evidence made by
//! `sgl attest` is refused by `sgl attest verify` without `--dev` and accepted
//! with it; `sgl attest detect` explains what is missing.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tee");

fn sgl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgl"))
        .args(args)
        .env_remove("SGL_NODE_DIR")
        .output()
        .expect("running sgl")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DATA}/{name}")).unwrap()
}

fn write_milan_evidence(dir: &Path) -> String {
    let report = hex::decode(String::from_utf8(read("report_milan.hex")).unwrap().trim()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let ev = serde_json::json!({
        "format": "sev-snp",
        "report": b64.encode(report),
        "certs": {"vcek": b64.encode(read("vcek_milan.der"))},
    });
    let p = dir.join("milan.json");
    std::fs::write(&p, ev.to_string()).unwrap();
    p.display().to_string()
}

const MILAN_RD: &str = "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd";

#[test]
fn milan_sample_verifies_and_a_wrong_binding_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ev = write_milan_evidence(dir.path());
    let ok = sgl(&[
        "attest",
        "verify",
        &ev,
        "--expect-report-data",
        MILAN_RD,
        "--allow-any-measurement",
        "--now",
        "1751328000",
        "--offline",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("PASS  signature"), "{out}");
    assert!(out.contains("SKIP  measurement"), "{out}");
    assert!(
        out.contains("VERIFIED: sev-snp evidence, level hardware"),
        "{out}"
    );

    let mut wrong = MILAN_RD.to_string();
    wrong.replace_range(0..2, "00");
    let bad = sgl(&[
        "attest",
        "verify",
        &ev,
        "--expect-report-data",
        &wrong,
        "--allow-any-measurement",
        "--now",
        "1751328000",
        "--offline",
    ]);
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("FAIL  report_data"),
        "{}",
        text(&bad)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("first failed step: report_data"));

    // The default policy allows no measurement: refused at that step.
    let strict = sgl(&[
        "attest",
        "verify",
        &ev,
        "--expect-report-data",
        MILAN_RD,
        "--now",
        "1751328000",
        "--offline",
        "--json",
    ]);
    assert!(!strict.status.success(), "{}", text(&strict));
    let v: serde_json::Value = serde_json::from_slice(&strict.stdout).unwrap();
    assert_eq!(v["verified"], false);
    let m = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["step"] == "measurement")
        .unwrap();
    assert_eq!(m["status"], "fail");
    assert!(v["policy_digest"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn tdx_sample_verifies_with_its_collateral_through_a_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let coll: serde_json::Value =
        serde_json::from_slice(&read("tdx_quote_collateral.json")).unwrap();
    let ev = serde_json::json!({"format": "tdx", "report": b64.encode(read("tdx_quote")), "collateral": coll});
    let evp = dir.path().join("tdx.json");
    std::fs::write(&evp, ev.to_string()).unwrap();
    let policy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/attestation/policy.toml"))
        .unwrap()
        .replace(
            "reference = []",
            "reference = [{ mrtd = \"91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7\" }]",
        );
    let pp = dir.path().join("policy.toml");
    std::fs::write(&pp, policy).unwrap();
    let rd = "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20";
    let args = |now: &'static str| {
        vec![
            "attest".to_string(),
            "verify".into(),
            evp.display().to_string(),
            "--policy".into(),
            pp.display().to_string(),
            "--expect-report-data".into(),
            rd.into(),
            "--now".into(),
            now.into(),
            "--offline".into(),
        ]
    };
    let run = |a: Vec<String>| sgl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let ok = run(args("1751328000"));
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("PASS  measurement"));
    // A year later the collateral has expired.
    let late = run(args("1782864000"));
    assert!(!late.status.success(), "{}", text(&late));
    assert!(
        String::from_utf8_lossy(&late.stdout).contains("FAIL  collateral"),
        "{}",
        text(&late)
    );
}

#[test]
fn simulated_evidence_round_trips_only_in_development_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node");
    let cfg_s = cfg.display().to_string();
    let init = sgl(&["node", "init", "--config-dir", &cfg_s, "--json"]);
    assert!(init.status.success(), "{}", text(&init));
    let keys: serde_json::Value = serde_json::from_slice(&init.stdout).unwrap();
    let ed = keys["ed25519_public_key"].as_str().unwrap().to_string();
    let x = keys["x25519_public_key"].as_str().unwrap().to_string();
    let node_id = "f617ee39-17e3-4904-9474-112446c9326a";
    let challenge = "3f6c0d2a9b8e7f1021324354657687988a9bacbdcedfe0f1a2b3c4d5e6f70819";
    let evp = dir.path().join("evidence.json");
    let evs = evp.display().to_string();

    let made = sgl(&[
        "attest",
        "--challenge",
        challenge,
        "--node-id",
        node_id,
        "--simulated",
        "--config-dir",
        &cfg_s,
        "--out",
        &evs,
    ]);
    assert!(made.status.success(), "{}", text(&made));
    let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(&evp).unwrap()).unwrap();
    assert_eq!(ev["format"], "simulated");
    // The simulated-TEE key is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cfg.join("simulated-tee-key.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let verify = |extra: &[&str], ch: &str| {
        let mut a = vec![
            "attest",
            "verify",
            &evs,
            "--node-id",
            node_id,
            "--ed25519",
            &ed,
            "--x25519",
            &x,
            "--challenge",
            ch,
            "--config-dir",
            &cfg_s,
            "--offline",
        ];
        a.extend_from_slice(extra);
        sgl(&a)
    };
    let refused = verify(&[], challenge);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("FAIL  dev_mode"),
        "{}",
        text(&refused)
    );

    let accepted = verify(&["--dev"], challenge);
    assert!(accepted.status.success(), "{}", text(&accepted));
    let out = String::from_utf8_lossy(&accepted.stdout);
    assert!(out.contains("level simulated"), "{out}");
    assert!(!out.contains("level hardware"), "{out}");

    let other = verify(&["--dev"], "another challenge");
    assert!(!other.status.success(), "{}", text(&other));
    assert!(String::from_utf8_lossy(&other.stdout).contains("FAIL  report_data"));

    // Without a production source, plain `sgl attest` says why and fails.
    let none = sgl(&[
        "attest",
        "--challenge",
        challenge,
        "--node-id",
        node_id,
        "--config-dir",
        &cfg_s,
        "--configfs-tsm",
        &dir.path().join("no-tsm").display().to_string(),
    ]);
    if !Path::new("/dev/sev-guest").exists() {
        assert!(!none.status.success(), "{}", text(&none));
        assert!(
            String::from_utf8_lossy(&none.stderr).contains("no evidence source"),
            "{}",
            text(&none)
        );
    }
}

#[test]
fn detect_explains_each_source() {
    let dir = tempfile::tempdir().unwrap();
    let o = sgl(&[
        "attest",
        "detect",
        "--json",
        "--configfs-tsm",
        &dir.path().join("none").display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 5);
    for d in list {
        assert!(!d["reason"].as_str().unwrap().is_empty());
    }
    let snp = list
        .iter()
        .find(|d| d["source"] == "snp-configfs-tsm")
        .unwrap();
    assert_eq!(snp["available"], false);
    assert!(snp["reason"].as_str().unwrap().contains("does not exist"));
}
