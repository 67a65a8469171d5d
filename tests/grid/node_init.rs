//! `sgl node init` / `sgl node keys` / `sgl proto selftest` as an operator runs
//! them: the real binary in a fresh HOME.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn sgl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sgl"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("SGL_NODE_DIR")
            .env_remove("SGL_COORDINATOR_URL")
            .output()
            .unwrap()
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join(".config/sgl-node")
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn init_creates_private_files_and_prints_keys() {
    let home = Home::new();
    let out = json(&home.sgl(&[
        "node",
        "init",
        "--json",
        "--tee-type",
        "sev-snp",
        "--wallet",
        "0xabc",
    ]));
    let cfg = home.config();
    assert_eq!(mode(&cfg), 0o700);
    assert_eq!(mode(&cfg.join("keypair.json")), 0o600);
    assert_eq!(mode(&cfg.join("node.json")), 0o600);
    // keypair.json: exactly 64 integers, seed then public key.
    let kp: Vec<u8> =
        serde_json::from_str(&std::fs::read_to_string(cfg.join("keypair.json")).unwrap()).unwrap();
    assert_eq!(kp.len(), 64);
    let public = sgl::proto::identity::Ed25519Public(kp[32..].try_into().unwrap());
    assert_eq!(out["ed25519_public_key"], public.to_b58());
    let seed: [u8; 32] = kp[..32].try_into().unwrap();
    let id = sgl::proto::identity::NodeIdentity::from_seed(&seed);
    assert_eq!(out["x25519_public_key"], id.x25519_public().to_b58());
    let node: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.join("node.json")).unwrap()).unwrap();
    assert_eq!(node["tee_type"], "sev-snp");
    assert_eq!(node["wallet_address"], "0xabc");
    for field in ["node_id", "auth_token", "orchestrator_url", "keypair_path"] {
        assert!(node.get(field).is_some(), "{field}");
    }
    // `keys` prints the same keys again, and no secret ever.
    let keys = home.sgl(&["node", "keys", "--json"]);
    assert_eq!(json(&keys)["ed25519_public_key"], out["ed25519_public_key"]);
    let text = stdout(&home.sgl(&["node", "keys"]));
    assert!(text.contains(out["x25519_public_key"].as_str().unwrap()));
    assert!(!text.contains(&hex::encode(seed)));
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let home = Home::new();
    let first = json(&home.sgl(&["node", "init", "--json"]));
    let again = home.sgl(&["node", "init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        json(&home.sgl(&["node", "keys", "--json"]))["ed25519_public_key"],
        first["ed25519_public_key"]
    );
    let forced = json(&home.sgl(&["node", "init", "--force", "--json"]));
    assert_ne!(forced["ed25519_public_key"], first["ed25519_public_key"]);
}

#[test]
fn loose_permissions_are_tightened_on_start() {
    let home = Home::new();
    json(&home.sgl(&["node", "init", "--json"]));
    let cfg = home.config();
    std::fs::set_permissions(
        cfg.join("keypair.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = home.sgl(&["node", "keys"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&cfg.join("keypair.json")), 0o600);
    assert_eq!(mode(&cfg), 0o700);
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let home = Home::new();
    let out = home.sgl(&["node", "keys"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sgl node init"));

    let out = home.sgl(&["node", "init", "--coordinator", "http://grid.example.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https"));
    assert!(!home.config().join("keypair.json").exists());

    json(&home.sgl(&[
        "node",
        "init",
        "--json",
        "--coordinator",
        "http://127.0.0.1:8080",
    ]));
    std::fs::write(home.config().join("keypair.json"), "[1,2,3]").unwrap();
    let out = home.sgl(&["node", "keys"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64"));
}

#[test]
fn selftest_passes_with_and_without_an_identity() {
    let home = Home::new();
    let out = home.sgl(&["proto", "selftest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("throwaway identity"));
    json(&home.sgl(&["node", "init", "--json"]));
    let out = home.sgl(&["proto", "selftest"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("all checks passed"));
    assert!(stdout(&out).contains("node identity in"));
}
