//! The OpenAPI documents: `docs/openapi/` holds what the code generates
//! (SGL_UPDATE_OPENAPI=1 rewrites it), each server answers the same at
//! `/openapi.json`, and schemathesis, fuzzing from that document, finds
//! nothing on a real coordinator (a database, an API key with credits, an
//! echo node attached, plain and sealed chat) nor on `sgl node serve
//! --engine echo`: no 5xx, every status and content type documented,
//! every JSON body of its schema.

use crate::grid_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use grid_support::schemathesis::{have_schemathesis, schemathesis};
use grid_support::{Proc, SGL};

/// The checked-in copy of a document.
fn checked_in(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/openapi")
        .join(format!("{name}.json"))
}

/// Where two texts first differ, with a few lines of each around it.
fn first_difference(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let at = (0..w.len().max(g.len()))
        .find(|&i| w.get(i) != g.get(i))
        .unwrap_or(0);
    let from = at.saturating_sub(3);
    let show = |v: &[&str]| {
        v.iter()
            .enumerate()
            .skip(from)
            .take(8)
            .map(|(i, l)| format!("{:>6} {l}\n", i + 1))
            .collect::<String>()
    };
    format!(
        "first difference at line {}\n--- generated\n{}--- checked in\n{}",
        at + 1,
        show(&w),
        show(&g)
    )
}

/// Every `{param}` of a path is declared, every operation has a unique id
/// and a success, and every `$ref` names a schema that is there.
fn check_whole(doc: &serde_json::Value) {
    assert_eq!(doc["openapi"], "3.1.0");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "missing schema {name}");
    }
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "{id} twice");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|k| k.starts_with('2') || k == "101"),
                "{method} {path}"
            );
            let declared = op["parameters"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["in"] == "path").count())
                .unwrap_or(0);
            assert_eq!(declared, path.matches('{').count(), "{method} {path}");
        }
    }
}

#[test]
fn the_checked_in_openapi_documents_are_current() {
    for (name, doc) in [
        ("coordinator", sgl::openapi::coordinator()),
        ("node", sgl::openapi::node()),
    ] {
        check_whole(&doc);
        let generated = sgl::openapi::to_json(&doc);
        let path = checked_in(name);
        if std::env::var("SGL_UPDATE_OPENAPI").as_deref() == Ok("1") {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} is not the generated document; run \
             `SGL_UPDATE_OPENAPI=1 cargo test --features full --test grid -- openapi_documents` \
             and commit it.\n{}",
            path.display(),
            first_difference(&generated, &on_disk)
        );
    }
}

/// `GET /openapi.json` of a running server equals the checked-in file.
async fn serves_the_checked_in_document(base: &str, name: &str) {
    let r = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served = r.text().await.unwrap();
    let file = std::fs::read_to_string(checked_in(name)).unwrap();
    assert!(served == file, "{}", first_difference(&served, &file));
}

#[cfg(all(feature = "coordinator", unix))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_on_the_coordinator() {
    use grid_support::{
        free_port, funded_api_key, node_init, node_start, wait_node_active, wait_until, OPERATOR,
    };
    if !have_schemathesis() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let db = db.to_str().unwrap();
    let key = funded_api_key(db, "0x3333333333333333333333333333333333333333", "5");

    // A simulated-TEE echo node the coordinator trusts, so that plain and
    // sealed chat reach a node.
    let nd = dir.path().join("node");
    let d = nd.to_str().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    node_init(d, &base, OPERATOR);
    let sim = sgl::attest::sim::SimKey::load_or_create(&nd.join(sgl::attest::sim::KEY_FILE))
        .unwrap()
        .public()
        .to_b58();
    let listen = format!("127.0.0.1:{port}");
    let _coordinator = Proc(
        Command::new(SGL)
            .args(["coordinator", "serve", "--dev", "--listen", &listen])
            .args(["--heartbeat-interval", "1", "--database-url", db])
            .args(["--simulated-tee-key", &sim])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let _node = node_start(
        d,
        &["--engine", "echo", "--evidence", "simulated"],
        Stdio::inherit(),
    );
    wait_node_active(d, Duration::from_secs(60));

    serves_the_checked_in_document(&base, "coordinator").await;
    let auth = format!("Authorization: Bearer {key}");
    schemathesis(&base, &[auth], &[]).await;
}

#[cfg(all(feature = "node", unix))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_on_node_serve() {
    if !have_schemathesis() {
        return;
    }
    let mut child = Command::new(SGL)
        .args(["node", "serve", "--engine", "echo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _server = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    serves_the_checked_in_document(&base, "node").await;
    schemathesis(&base, &[], &[]).await;
}
