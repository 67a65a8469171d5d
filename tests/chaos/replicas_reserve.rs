//! Sealed mode (PROTOCOL.md §5.1) across coordinator replicas on one
//! PostgreSQL database, with one echo node held by replica B:
//!
//! - a client reserves on replica A and sends its sealed chat to replica
//!   C: the answer opens, the job is billed once, at its usage row's cost,
//!   and the reservation is then spent on every replica;
//! - the job's attestation proof (§5.11) is served by every replica, the
//!   ones that neither ran the job nor hold its node included, and alike;
//! - concurrent reserves of one client spread over the three replicas are
//!   admitted exactly up to `--max-reservations-per-client`.
//!
//! Skipped without PostgreSQL unless SGL_REQUIRE_POSTGRES=1.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::grid_support;
use crate::ledger;
use crate::replicas::{
    echo_node, log_paths, postgres_with_key, replica_with, session, wait_online_at, Logs,
};

use std::time::Duration;

use grid_support::{free_port, MODEL};
use serde_json::{json, Value};
use sgl::client::{ChatRequest, GridClient};
use sgl::money::Micros;
use sgl::store::WalletId;

const PAYER: &str = "0x7878787878787878787878787878787878787878";
/// `--max-reservations-per-client` of the replicas.
const PER_CLIENT: usize = 4;

fn request(text: &str, node: &str) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![("user".into(), text.into())],
        max_tokens: 100,
        temperature: 0.0,
        stream: false,
        node: Some(node.to_string()),
        max_price: None,
        require_attestation: None,
        choices: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_reserve_on_one_chat_on_another_billed_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some((db, key)) = postgres_with_key("replicarsv", dir.path(), PAYER) else {
        return;
    };
    let url = db.url.clone();
    let deposited = Micros(100_000_000);
    let logs = log_paths(dir.path(), &["a", "b", "c", "node"]);
    let _dump = Logs(logs.clone());
    let limit = PER_CLIENT.to_string();
    let ports = [free_port(), free_port(), free_port()];
    let _replicas: Vec<_> = ports
        .iter()
        .zip(&logs)
        .map(|(p, log)| replica_with(*p, &url, log, &["--max-reservations-per-client", &limit]))
        .collect();
    let [a, b, c] = ports.map(|p| format!("http://127.0.0.1:{p}"));
    let (_node, node) = echo_node(&dir.path().join("n"), &b, &logs[3]);
    wait_online_at(&[a.clone(), b.clone(), c.clone()], 1).await;
    let (holder, attached) = session(&url, &node).expect("the node has a replica");
    assert!(attached, "the node is attached");

    // Reserved on A, chatted on C (neither holds the node).
    let on_a = GridClient::new(&a, Some(key.clone())).unwrap();
    let on_c = GridClient::new(&c, Some(key.clone())).unwrap();
    let text = "one two three four five six";
    let req = request(text, &node);
    let res = on_a.reserve(&req).await.unwrap();
    assert_eq!(res.node_id, node);
    let out = on_c.chat(&res, &req, |_| {}).await.unwrap();
    assert_eq!(out.content, text);
    assert!(out.usage_signed, "the node's usage receipt verifies");

    // Spent: refused on every replica, the one it was made on included.
    for base in [&a, &b, &c] {
        let again = GridClient::new(base, Some(key.clone())).unwrap();
        let err = again
            .chat(&res, &req, |_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid_reservation"), "{base}: {err}");
    }

    // Billed once, at the usage row's cost; nothing left held.
    let store = ledger::open(&url).await;
    ledger::wait_no_open_holds(&store, Duration::from_secs(30)).await;
    let row = store.usage_for_job(&out.job_id).await.unwrap().unwrap();
    assert_eq!(row.status, "completed");
    assert!(row.cost > Micros::ZERO);
    let billed = ledger::audit(&store, PAYER, deposited).await;
    assert_eq!(billed, 1, "one job, billed once");
    let ledger_rows = store
        .ledger(&WalletId::new_unchecked(PAYER), 100)
        .await
        .unwrap();
    let charged: Vec<_> = ledger_rows
        .iter()
        .filter(|e| e.kind == "settle" || e.kind == "debit")
        .collect();
    assert_eq!(
        charged.len(),
        1,
        "one charge in the ledger: {ledger_rows:?}"
    );

    // The proof of the job on every replica, the same everywhere.
    let http = reqwest::Client::new();
    let mut proofs = Vec::new();
    for base in [&a, &b, &c] {
        let r = http
            .get(format!("{base}/grid/jobs/{}/attestation", out.job_id))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let mut body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "{base} (node held by {holder}): {body}");
        assert_eq!(body["job_id"], out.job_id.as_str());
        assert_eq!(body["node_id"], node.as_str());
        assert!(!body["attestation_signature"]
            .as_str()
            .unwrap_or_default()
            .is_empty());
        // The evidence URL names the replica's own public URL (one shared
        // URL in production); the rest must match.
        let mut report: Value =
            serde_json::from_str(body["attestation_report"].as_str().unwrap()).unwrap();
        let evidence = report["evidence_url"].as_str().unwrap().to_string();
        assert_eq!(
            evidence,
            format!("{base}/grid/nodes/{node}/attestation/evidence")
        );
        report["evidence_url"] = Value::Null;
        body["attestation_report"] = report;
        proofs.push(body);
    }
    assert!(
        proofs.windows(2).all(|w| w[0] == w[1]),
        "the replicas disagree: {proofs:?}"
    );

    // Concurrent reserves of one key over the three replicas: exactly the
    // limit is admitted, the others refused 429 too_many_reservations.
    let body = json!({"model": MODEL, "node": node});
    let mut tasks = Vec::new();
    for i in 0..(8 * PER_CLIENT) {
        let (http, key, body) = (http.clone(), key.clone(), body.clone());
        let base = [&a, &b, &c][i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/reserve"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v)
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        match status {
            200 => admitted += 1,
            429 => assert_eq!(v["error"]["code"], "too_many_reservations", "{v}"),
            other => panic!("reserve answered {other}: {v}"),
        }
    }
    assert_eq!(admitted, PER_CLIENT, "reserves admitted past the limit");
    store.close().await;
}
