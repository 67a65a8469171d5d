//! The coordinator on loopback, driven by a client and a node that speak the
//! real wire protocol (the node side uses `sgl::node::jobs`, the same code the
//! node agent runs; its text comes from a script instead of the engine, since
//! what is under test here is the coordinator's protocol handling).
#![cfg(feature = "coordinator")]

use crate::grid_support;

use std::time::Duration;

use grid_support::MODEL;
use serde_json::{json, Value};
use sgl::coordinator::Config;
use sgl::node::jobs::{self, Reply, StreamChunks};
use sgl::proto::api::{HardwareReport, PendingJob, ReserveResponse};
use sgl::proto::e2e::{self, ResponseKey, ALG_V2};
use sgl::proto::envelope::{self, ResultKind};
use sgl::proto::identity::{Ed25519Public, NodeIdentity, X25519Public, KEY_VERSION};
use sgl::proto::openai::{FinishReason, Usage};

pub(crate) async fn start(config: Config) -> String {
    grid_support::in_process::coordinator(config).await
}

pub(crate) fn dev() -> Config {
    Config {
        dev: true,
        ..Config::default()
    }
}

pub(crate) struct TestNode {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) id: NodeIdentity,
    pub(crate) node_id: String,
    pub(crate) token: String,
    pub(crate) active: Vec<String>,
}

impl TestNode {
    pub(crate) async fn join(base: &str) -> TestNode {
        let http = reqwest::Client::new();
        let id = NodeIdentity::generate();
        let reg: Value = http
            .post(format!("{base}/grid/nodes/register"))
            .json(&json!({"wallet_address": "0xoperator", "tee_type": "none", "available_models": [MODEL],
                          "public_key": id.ed25519_public().to_b58(), "cpu_cores": 2, "ram_gb": 24.0,
                          "gpu_model": "none", "supported_runtimes": ["candle"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let node_id = reg["node_id"].as_str().unwrap().to_string();
        let token = reg["auth_token"].as_str().unwrap().to_string();
        let node = TestNode {
            base: base.into(),
            http,
            id,
            node_id,
            token,
            active: vec![],
        };
        let ch: Value = node
            .post(
                &format!("/grid/nodes/{}/challenge", node.node_id),
                &json!({}),
            )
            .await
            .json()
            .await
            .unwrap();
        let challenge = ch["challenge"].as_str().unwrap();
        assert_eq!(challenge.len(), 64);
        let mut report = HardwareReport {
            tee_type: "none".into(),
            cpu_cores: 2,
            ..Default::default()
        };
        report.report_hash = report.compute_report_hash();
        let v = node
            .post(
                &format!("/grid/nodes/{}/verify-attestation", node.node_id),
                &json!({"signature": node.id.sign(challenge.as_bytes()).to_b58(),
                        "encryption_public_key": node.id.x25519_public().to_b58(),
                        "hardware_report": report, "key_version": KEY_VERSION,
                        "encryption_public_key_signature": node.keybind()}),
            )
            .await;
        assert_eq!(v.status(), 200);
        let v: Value = v.json().await.unwrap();
        assert_eq!(v["verified"], true);
        assert_eq!(v["attestation_level"], "self_reported");
        node.heartbeat().await;
        node
    }

    pub(crate) fn keybind(&self) -> String {
        let nid = sgl::proto::identity::NodeId::parse(&self.node_id).unwrap();
        self.id.sign_keybind(&nid, KEY_VERSION).to_b58()
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("X-Node-Auth", &self.token)
            .header("X-Node-Id", &self.node_id)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn heartbeat(&self) -> Vec<PendingJob> {
        let r = self
            .post(
                "/grid/nodes/heartbeat",
                &json!({"current_load": 0.0, "available_models": [MODEL],
                        "encryption_public_key": self.id.x25519_public().to_b58(),
                        "encryption_public_key_signature": self.keybind(), "key_version": KEY_VERSION,
                        "capabilities": {"streaming": true, "context_size": 8192, "signed_usage": true},
                        "active_job_ids": self.active, "max_concurrent_jobs": 2}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        serde_json::from_value(v["pending_jobs"].clone()).unwrap()
    }

    pub(crate) async fn next_job(&mut self) -> PendingJob {
        for _ in 0..200 {
            if let Some(j) = self.heartbeat().await.into_iter().next() {
                self.active.push(j.id.clone());
                return j;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no job offered");
    }

    /// Take one job and answer it with `tokens`, streaming when asked to.
    pub(crate) async fn serve(&mut self, tokens: &[&str]) -> String {
        let job = self.next_job().await;
        let chat = jobs::parse_job(&self.id, &job, true).unwrap();
        let usage = Usage::new(9, tokens.len() as u64);
        match chat.reply {
            Reply::Stream { .. } => {
                let mut s = StreamChunks::new(&self.id, &chat).unwrap();
                let mut bodies = Vec::new();
                for t in tokens {
                    bodies.extend(s.push_token(t).unwrap());
                }
                bodies.extend(s.flush().unwrap());
                bodies.push(s.finish(usage).unwrap());
                for b in bodies {
                    let r = self
                        .post(
                            &format!("/grid/jobs/{}/chunk", job.id),
                            &serde_json::to_value(&b).unwrap(),
                        )
                        .await;
                    assert_eq!(r.status(), 200);
                }
            }
            _ => {
                let body = jobs::complete_body(
                    &self.id,
                    &chat,
                    &tokens.concat(),
                    usage,
                    FinishReason::Stop,
                )
                .unwrap();
                let r = self
                    .post(
                        &format!("/grid/jobs/{}/complete", job.id),
                        &serde_json::to_value(&body).unwrap(),
                    )
                    .await;
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            }
        }
        self.active.retain(|j| j != &job.id);
        job.id
    }
}

pub(crate) async fn reserve(base: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/reserve"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn sealed_request(res: &ReserveResponse, stream: bool, nonce: &str) -> (Value, ResponseKey) {
    let x = X25519Public::from_b58(&res.node_x25519_pubkey).unwrap();
    let mut inner = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "temperature": 0.7, "max_tokens": 64});
    if stream {
        inner["stream"] = json!(true);
        inner["nonce"] = json!(nonce);
    }
    let (enc, key) = e2e::seal_input(&x, inner.to_string().as_bytes()).unwrap();
    let body = json!({"reservation_token": res.reservation_token, "max_tokens": 64, "stream": stream, "enc": enc});
    (body, key)
}

pub(crate) async fn chat(base: String, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn sealed_non_stream_round_trip() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(res.node_id, node.node_id);
    assert_eq!(res.node_ed25519_pubkey, node.id.ed25519_public().to_b58());
    // The keybind the client receives verifies.
    sgl::proto::identity::verify_keybind(
        &res.node_id,
        &Ed25519Public::from_b58(&res.node_ed25519_pubkey).unwrap(),
        &X25519Public::from_b58(&res.node_x25519_pubkey).unwrap(),
        res.key_version.unwrap(),
        &sgl::proto::identity::Signature::from_b58(res.node_x25519_pubkey_sig.as_deref().unwrap())
            .unwrap(),
    )
    .unwrap();
    let (body, key) = sealed_request(&res, false, "");
    let client = tokio::spawn(chat(base.clone(), body));
    let job_id = node.serve(&["Paris", " is", " the", " capital."]).await;
    let resp = client.await.unwrap();
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["id"], format!("chatcmpl-{job_id}"));
    assert_eq!(reply["result_envelope_version"], "v1");
    envelope::verify_sealed_reply(Some(&res.node_ed25519_pubkey), &reply).unwrap();
    let usage: Usage = serde_json::from_value(reply["usage"].clone()).unwrap();
    envelope::verify_usage(
        &node.id.ed25519_public(),
        &job_id,
        MODEL,
        &usage,
        reply["usage_signature"].as_str(),
    )
    .unwrap();
    let sealed = serde_json::from_value(reply["sealed_result"].clone()).unwrap();
    let plain: Value = serde_json::from_slice(&key.open_output(&sealed).unwrap()).unwrap();
    assert_eq!(plain["content"], "Paris is the capital.");
    // The reservation was single use.
    let (again, _) = sealed_request(&res, false, "");
    let r = chat(base.clone(), again).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_reservation"
    );
}

/// Parse an SSE body into (event name, data) pairs.
pub(crate) fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                assert!(data.is_none(), "an event must be a single data line");
                data = Some(d.to_string());
            }
        }
        if let Some(d) = data {
            out.push((event, d));
        }
    }
    out
}

#[tokio::test]
async fn sealed_stream_is_relayed_signed_and_in_order() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let nonce = "N5L7eAc4PsHfZViqAMbFEH";
    let (body, key) = sealed_request(&res, true, nonce);
    let client = tokio::spawn(chat(base.clone(), body));
    let tokens = [
        "The", " capital", " of", " France", " is", " Paris", ".", " It", " is", " lovely", ".",
    ];
    let job_id = node.serve(&tokens).await;
    let resp = client.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let signer = Ed25519Public::from_b58(&res.node_ed25519_pubkey).unwrap();
    let mut opener = key.stream_opener(nonce).unwrap();
    let mut out = String::new();
    let chunks = &events[..events.len() - 1];
    for (i, (name, data)) in chunks.iter().enumerate() {
        assert!(name.is_none());
        let c: Value = serde_json::from_str(data).unwrap();
        assert_eq!(c["seq"], i as u64);
        assert_eq!(c["job"], job_id);
        assert_eq!(c["sigv"], "v1");
        assert_eq!(c.get("eph").is_some(), i == 0);
        let fin = c["final"].as_bool().unwrap();
        assert_eq!(fin, i == chunks.len() - 1);
        let ct = c["ct"].as_str().unwrap();
        envelope::verify_result(
            &signer,
            &job_id,
            ResultKind::Stream {
                seq: i as u64,
                is_final: fin,
            },
            ct,
            c["sig"].as_str(),
            Some("v1"),
        )
        .unwrap();
        out.push_str(&opener.open(i as u64, fin, c["eph"].as_str(), ct).unwrap());
        if fin {
            let usage: Usage = serde_json::from_value(c["usage"].clone()).unwrap();
            envelope::verify_usage(
                &signer,
                &job_id,
                MODEL,
                &usage,
                c["usage_signature"].as_str(),
            )
            .unwrap();
        }
    }
    opener.finish().unwrap();
    assert_eq!(out, tokens.concat());
}

#[tokio::test]
async fn a_node_abort_mid_stream_is_an_sse_error() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let (body, _) = sealed_request(&res, true, "12drXXUifSrRnXLGbXg8E");
    let client = tokio::spawn(chat(base.clone(), body));
    let job = node.next_job().await;
    let chat_job = jobs::parse_job(&node.id, &job, true).unwrap();
    let mut s = StreamChunks::new(&node.id, &chat_job).unwrap();
    for t in ["a", "b", "c", "d", "e"] {
        assert!(s.push_token(t).unwrap().is_none());
    }
    let first = s.push_token("f").unwrap().unwrap();
    assert_eq!(
        node.post(
            &format!("/grid/jobs/{}/chunk", job.id),
            &serde_json::to_value(&first).unwrap()
        )
        .await
        .status(),
        200
    );
    let r: Value = node
        .post(
            &format!("/grid/jobs/{}/chunk", job.id),
            &json!({"error": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"ok": true, "closed": true}));
    let text = client.await.unwrap().text().await.unwrap();
    let events = sse_events(&text);
    // The error event, then the stream closes: no `[DONE]` (§5.6).
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].0.is_none());
    assert_eq!(events[1].0.as_deref(), Some("error"));
    assert!(!text.contains("[DONE]"), "{text}");
    let err: Value = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(err["error"]["code"], "stream_aborted");
    assert!(!text.contains("\"final\":true"));
}

#[tokio::test]
async fn failures_and_forgeries_fail_the_job() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;

    // The node fails the job: the client gets 502 node_failed.
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let (body, _) = sealed_request(&res, false, "");
    let client = tokio::spawn(chat(base.clone(), body));
    let job = node.next_job().await;
    let r = node
        .post(
            &format!("/grid/jobs/{}/fail", job.id),
            &json!({"reason": "decrypt failed: test"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let resp = client.await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "node_failed"
    );
    node.active.clear();

    // A result signed by another key: the node gets 400, the client 502.
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let (body, _) = sealed_request(&res, false, "");
    let client = tokio::spawn(chat(base.clone(), body));
    let job = node.next_job().await;
    let chat_job = jobs::parse_job(&node.id, &job, true).unwrap();
    let forger = NodeIdentity::generate();
    let body = jobs::complete_body(
        &forger,
        &chat_job,
        "forged",
        Usage::new(1, 1),
        FinishReason::Stop,
    )
    .unwrap();
    let r = node
        .post(
            &format!("/grid/jobs/{}/complete", job.id),
            &serde_json::to_value(&body).unwrap(),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_signature");
    assert_eq!(client.await.unwrap().status(), 502);
    // Completing it again: the job is gone.
    let r = node
        .post(
            &format!("/grid/jobs/{}/complete", job.id),
            &serde_json::to_value(&body).unwrap(),
        )
        .await;
    assert_eq!(r.status(), 409);
    node.active.clear();

    // Ghost rule: acknowledged, then missing from active_job_ids.
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let (body, _) = sealed_request(&res, false, "");
    let client = tokio::spawn(chat(base.clone(), body));
    node.next_job().await;
    node.heartbeat().await; // acknowledges
    node.active.clear();
    node.heartbeat().await; // the job is gone from the node
    assert_eq!(client.await.unwrap().status(), 502);
}

#[tokio::test]
async fn client_errors_have_the_openai_shape() {
    let base = start(dev()).await;
    let node = TestNode::join(&base).await;
    let code = |v: Value| v["error"]["code"].as_str().unwrap().to_string();

    let r = reserve(&base, json!({})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(code(r.json().await.unwrap()), "invalid_request");
    let r = reserve(&base, json!({"model": "no-such-model"})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(code(r.json().await.unwrap()), "model_not_found");
    let r = reserve(&base, json!({"model": MODEL, "max_price": 0.0001})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(code(r.json().await.unwrap()), "price_cap_unmet");
    let r = reserve(
        &base,
        json!({"model": MODEL, "require_attestation": "hardware"}),
    )
    .await;
    assert_eq!(r.status(), 422);
    assert_eq!(code(r.json().await.unwrap()), "attestation_unmet");
    let r = reserve(&base, json!({"model": MODEL, "node": node.node_id})).await;
    assert_eq!(r.status(), 200);
    let res: ReserveResponse = r.json().await.unwrap();
    let r = reserve(
        &base,
        json!({"model": MODEL, "node": uuid::Uuid::new_v4().to_string()}),
    )
    .await;
    assert_eq!(r.status(), 503);

    let (mut body, _) = sealed_request(&res, false, "");
    body["enc"]["algorithm"] = json!("x25519-xchacha20poly1305");
    let r = chat(base.clone(), body).await;
    assert_eq!(r.status(), 400);
    assert_eq!(code(r.json().await.unwrap()), "unsupported_algorithm");
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = reserve(&base, json!({"model": MODEL, "cluster": "x"})).await;
    assert_eq!(code(r.json().await.unwrap()), "cluster_not_supported");

    // /v1/models and /grid/capacity see the node.
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["context_window"], 8192);
    let none: Value = reqwest::get(format!("{base}/v1/models?type=systemone"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none["data"], json!([]));
    let cap: Value = reqwest::get(format!("{base}/grid/capacity"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cap["total_nodes"], 1);
    assert_eq!(cap["by_tee_type"][0]["tee_type"], "none");
    let _ = ALG_V2;
}

#[tokio::test]
async fn node_auth_is_checked() {
    let base = start(dev()).await;
    let node = TestNode::join(&base).await;
    let http = reqwest::Client::new();
    let hb = json!({"available_models": [MODEL], "active_job_ids": [], "max_concurrent_jobs": 1});
    let r = http
        .post(format!("{base}/grid/nodes/heartbeat"))
        .header("X-Node-Auth", "wrong")
        .header("X-Node-Id", &node.node_id)
        .json(&hb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let r = http
        .post(format!("{base}/grid/nodes/heartbeat"))
        .json(&hb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A challenge is single use: verifying twice fails.
    let ch: Value = node
        .post(
            &format!("/grid/nodes/{}/challenge", node.node_id),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let body = json!({"signature": node.id.sign(ch["challenge"].as_str().unwrap().as_bytes()).to_b58(),
                      "encryption_public_key": node.id.x25519_public().to_b58(), "hardware_report": {}});
    assert_eq!(
        node.post(
            &format!("/grid/nodes/{}/verify-attestation", node.node_id),
            &body
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        node.post(
            &format!("/grid/nodes/{}/verify-attestation", node.node_id),
            &body
        )
        .await
        .status(),
        400
    );
    // Outside development mode registration needs a code, used once.
    let base = start(Config {
        registration_codes: vec!["code-1".into()],
        ..Config::default()
    })
    .await;
    let reg = |code: Option<&str>| {
        let mut body = json!({"wallet_address": "0x1", "tee_type": "none", "available_models": [],
                              "public_key": NodeIdentity::generate().ed25519_public().to_b58()});
        if let Some(c) = code {
            body["registration_code"] = json!(c);
        }
        let base = base.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/grid/nodes/register"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(reg(None).await, 403);
    assert_eq!(reg(Some("code-1")).await, 200);
    assert_eq!(reg(Some("code-1")).await, 403);
}

pub(crate) fn plain_body(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is the capital of France?"}],
           "max_tokens": 32, "stream": stream, "stream_options": {"include_usage": true}})
}

#[tokio::test]
async fn plain_openai_mode_non_stream_and_stream() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;

    let client = tokio::spawn(chat(base.clone(), plain_body(false)));
    let job_id = node.serve(&["Paris", "."]).await;
    let resp = client.await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], format!("chatcmpl-{job_id}"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 2);

    let client = tokio::spawn(chat(base.clone(), plain_body(true)));
    let tokens = ["The", " capital", " of", " France", " is", " Paris", "."];
    node.serve(&tokens).await;
    let resp = client.await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)?
                .get("delta")?
                .get("content")?
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, tokens.concat());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], tokens.len() as u64);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn plain_mode_retries_once_on_another_node() {
    let base = start(dev()).await;
    let mut a = TestNode::join(&base).await;
    let mut b = TestNode::join(&base).await;
    let client = tokio::spawn(chat(base.clone(), plain_body(false)));
    // Whichever node got it fails it; the other must then get the retry.
    let (first, a_failed) = tokio::select! {
        j = a.next_job() => (j, true),
        j = b.next_job() => (j, false),
    };
    let (failing, second) = if a_failed { (&a, &mut b) } else { (&b, &mut a) };
    let r = failing
        .post(
            &format!("/grid/jobs/{}/fail", first.id),
            &json!({"reason": "engine wedged"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    second.serve(&["Paris"]).await;
    let v: Value = client.await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Paris");
}

#[tokio::test]
async fn plain_mode_validates_like_openai() {
    let base = start(dev()).await;
    let _node = TestNode::join(&base).await;
    for (body, needle) in [
        (json!({"model": MODEL, "messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            "role",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
            "temperature",
        ),
    ] {
        let r = chat(base.clone(), body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let r = chat(
        base.clone(),
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
}

/// The node's record as `GET /grid/nodes/{id}` reports it.
async fn node_record(node: &TestNode) -> Value {
    node.http
        .get(format!("{}/grid/nodes/{}", node.base, node.node_id))
        .header("X-Node-Auth", &node.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// §7f "The quote binds the node": the job carries the clear max_tokens in
/// clear as `max_tokens_cap`, the node's own reading of the job obeys it over
/// the sealed max_tokens, and usage above it fails the job unbilled and
/// counts against the node.
#[tokio::test]
async fn usage_above_the_quoted_cap_fails_the_job() {
    let base = start(dev()).await;
    let mut node = TestNode::join(&base).await;
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    // Sealed: 8,192 tokens; clear (what the payment is quoted for): 2.
    let x = X25519Public::from_b58(&res.node_x25519_pubkey).unwrap();
    let inner = json!({"messages": [{"role": "user", "content": "count to a thousand"}], "max_tokens": 8192});
    let (enc, _) = e2e::seal_input(&x, inner.to_string().as_bytes()).unwrap();
    let body = json!({"reservation_token": res.reservation_token, "max_tokens": 2, "enc": enc});
    let client = tokio::spawn(chat(base.clone(), body));
    let job = node.next_job().await;
    assert_eq!(job.input_payload["max_tokens_cap"], 2);
    let chat_job = jobs::parse_job(&node.id, &job, true).unwrap();
    assert_eq!(chat_job.max_tokens, 2, "the node obeys the cap");
    // A node that ignores the cap and reports 5 completion tokens.
    let over = jobs::complete_body(
        &node.id,
        &chat_job,
        "one two three four five",
        Usage::new(4, 5),
        FinishReason::Length,
    )
    .unwrap();
    let r = node
        .post(
            &format!("/grid/jobs/{}/complete", job.id),
            &serde_json::to_value(&over).unwrap(),
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "bad_usage", "{v}");
    let resp = client.await.unwrap();
    assert_eq!(resp.status(), 502);
    node.active.clear();
    // Counted against the node (the job failed there).
    let mut failed = 0;
    for _ in 0..200 {
        failed = node_record(&node).await["jobs_failed"].as_u64().unwrap();
        if failed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failed, 1);
}

/// Finding 7, ghost jobs: a heartbeat snapshotted before a job started and
/// arriving after its first chunk does not fail it; a heartbeat sent after
/// the job was known to run and not listing it does. The heartbeats are
/// made by hand with the node's credentials, so nothing depends on timing.
#[tokio::test]
async fn a_stale_heartbeat_does_not_make_a_running_job_a_ghost() {
    let base = start(dev()).await;
    let node = TestNode::join(&base).await;
    let res: ReserveResponse = reserve(&base, json!({"model": MODEL}))
        .await
        .json()
        .await
        .unwrap();
    let nonce = "N5L7eAc4PsHfZViqAMbFEH";
    let (body, _) = sealed_request(&res, true, nonce);
    // The answer's head comes with the first chunk.
    let client = tokio::spawn(chat(base.clone(), body));
    // The heartbeat that offers the job: the node takes it without listing it.
    let job = loop {
        if let Some(j) = node.heartbeat().await.into_iter().next() {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let chat_job = jobs::parse_job(&node.id, &job, true).unwrap();
    let mut s = StreamChunks::new(&node.id, &chat_job).unwrap();
    let chunk = |s: &mut StreamChunks<'_>| {
        for t in ["a", "b", "c", "d", "e"] {
            assert!(s.push_token(t).unwrap().is_none());
        }
        s.push_token("f").unwrap().unwrap()
    };
    let path = format!("/grid/jobs/{}/chunk", job.id);
    let first = chunk(&mut s);
    let r: Value = node
        .post(&path, &serde_json::to_value(&first).unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"ok": true, "closed": false}));
    let mut resp = client.await.unwrap();
    assert_eq!(resp.status(), 200);
    let head = next_sse(&mut resp).await;
    assert!(head.contains("\"seq\":0"), "{head}");

    // The stale heartbeat: snapshotted before the job started, it arrives
    // after the first chunk and lists nothing. The job keeps running.
    assert!(node.heartbeat().await.is_empty());
    let second = chunk(&mut s);
    let r = node
        .post(&path, &serde_json::to_value(&second).unwrap())
        .await;
    assert_eq!(r.status(), 200, "the job was failed as a ghost");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"ok": true, "closed": false})
    );

    // The next heartbeat was sent after the job ran: a job missing from it
    // is lost, and the client hears so.
    assert!(node.heartbeat().await.is_empty());
    let mut rest = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
            Ok(Ok(Some(c))) => rest.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) | Ok(Err(_)) => break,
            Err(_) => panic!("the lost job was not failed: {rest}"),
        }
    }
    assert!(rest.contains("event: error"), "{rest}");
    assert!(!rest.contains("[DONE]"), "{rest}");
}

/// Read the stream until one whole SSE event has arrived; its text.
async fn next_sse(resp: &mut reqwest::Response) -> String {
    let mut text = String::new();
    while !text.contains("\n\n") {
        let c = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("no event")
            .unwrap()
            .expect("the stream ended");
        text.push_str(&String::from_utf8_lossy(&c));
    }
    text
}
