//! A sealed-mode grid client (PROTOCOL.md §5.1, §5.3): reserve a node, seal
//! the prompt to its key, and open and verify the reply — every signature,
//! the usage receipt, the stream order — failing closed at the first fault.
//! `sgl chat` is a thin command over it, and [`proxy`] serves it to
//! unmodified OpenAI clients (`sgl proxy`).

use futures_util::StreamExt;
use serde_json::Value;
use thiserror::Error;

use crate::proto::api::{EvidenceResponse, ReserveRequest, ReserveResponse, SealedChatRequest};
use crate::proto::e2e::{self, ResponseKey};
use crate::proto::envelope::{self, ResultKind};
use crate::proto::identity::{
    attestation_report_data, verify_keybind, Ed25519Public, NodeId, Signature, X25519Public,
};
use crate::proto::job::JobPayload;
use crate::proto::openai::choices::{self, StructuredChunk};
use crate::proto::openai::{response_format, ChatMessage, Choice, ChoiceParams, Usage};
use crate::proto::{features, routes, ProtoError};

pub mod proxy;

/// A reply larger than this is refused.
const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the coordinator answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("verification failed: {0}")]
    Proto(#[from] ProtoError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the stream was aborted: {0}")]
    Aborted(String),
    #[error("payment: {0}")]
    Payment(String),
    /// The request needs a feature the reserved node was not shown to
    /// implement (a coordinator that does not route by features).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// How a wallet on this machine pays for chat requests.
#[cfg(feature = "payments")]
#[derive(Debug)]
pub enum WalletPayment {
    /// Answer each request's 402 with an x402 payment (an EIP-3009
    /// authorization of the USDC amount asked), never above `cap`.
    X402 {
        key: crate::payments::wallet::WalletKey,
        cap: crate::money::Micros,
    },
    /// Sign each request (`X-Auth-*`); the wallet's prepaid credits pay.
    Credits {
        key: crate::payments::wallet::WalletKey,
    },
}

/// One chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<(String, String)>,
    pub max_tokens: u64,
    pub temperature: f64,
    pub stream: bool,
    pub node: Option<String>,
    pub max_price: Option<f64>,
    pub require_attestation: Option<String>,
    /// `n` completions, `logprobs` (sgl extension, sealed inside the
    /// payload); `max_tokens` is the budget of each completion.
    pub choices: ChoiceParams,
}

/// A verified, opened answer.
#[derive(Debug, Clone)]
pub struct ChatOutcome {
    pub job_id: String,
    pub node_id: String,
    pub content: String,
    pub usage: Option<Usage>,
    /// Whether the node's signed usage receipt verified.
    pub usage_signed: bool,
    /// Why generation stopped (`stop`, `length`), when the node said so in
    /// its sealed reply; a stream does not carry it.
    pub finish_reason: Option<String>,
    /// What a per-request payment paid, and the coordinator's settlement
    /// receipt (`PAYMENT-RESPONSE`), when the request was paid that way.
    pub payment: Option<Value>,
    /// Every choice, with its logprobs, when the request asked for `n` or
    /// `logprobs`; `content` is the first one's text. Empty otherwise.
    pub choices: Vec<Choice>,
}

pub struct GridClient {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    #[cfg(feature = "payments")]
    wallet: Option<WalletPayment>,
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    Err(ClientError::Status {
        status,
        body: body.chars().take(1000).collect(),
    })
}

impl GridClient {
    pub fn new(base: &str, api_key: Option<String>) -> Result<Self, ClientError> {
        Ok(GridClient {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()?,
            base: base.trim_end_matches('/').to_string(),
            api_key,
            #[cfg(feature = "payments")]
            wallet: None,
        })
    }

    /// Pay chat requests from a wallet on this machine.
    #[cfg(feature = "payments")]
    pub fn with_wallet(mut self, wallet: WalletPayment) -> Self {
        self.wallet = Some(wallet);
        self
    }

    /// POST a JSON body to `path`, paying for it the configured way; the
    /// successful response and, for a per-request payment, what was paid.
    async fn post_paid(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<(reqwest::Response, Option<Value>), ClientError> {
        let request = || {
            self.post(path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec())
        };
        #[cfg(feature = "payments")]
        match &self.wallet {
            Some(WalletPayment::Credits { key }) => {
                let now_ms = crate::clock::Clock::system().now_ms();
                let mut r = request();
                for (name, value) in key.xauth_headers("POST", path, body, now_ms) {
                    r = r.header(name, value);
                }
                return Ok((check(r.send().await?).await?, None));
            }
            Some(WalletPayment::X402 { key, cap }) => {
                let first = request().send().await?;
                if first.status() != reqwest::StatusCode::PAYMENT_REQUIRED {
                    return Ok((check(first).await?, None));
                }
                let Some(required) = first
                    .headers()
                    .get(crate::payments::x402::PAYMENT_REQUIRED)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                else {
                    return Err(check(first).await.err().unwrap_or_else(|| {
                        ClientError::Payment("a 402 without PAYMENT-REQUIRED".into())
                    }));
                };
                let now = crate::clock::Clock::system().now_secs();
                let (header, paid) = key
                    .pay_x402(&required, *cap, now)
                    .map_err(|e| ClientError::Payment(e.to_string()))?;
                let resp = check(
                    request()
                        .header(crate::payments::x402::PAYMENT_SIGNATURE, header)
                        .send()
                        .await?,
                )
                .await?;
                let settlement = resp
                    .headers()
                    .get(crate::payments::x402::PAYMENT_RESPONSE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::payments::wallet::parse_payment_response);
                let payment = serde_json::json!({
                    "scheme": "x402-v2",
                    "payer": crate::payments::evm::lower(&key.address()),
                    "amount_micro_usd": paid.amount.0,
                    "network": paid.network,
                    "settlement": settlement,
                });
                return Ok((resp, Some(payment)));
            }
            None => {}
        }
        Ok((check(request().send().await?).await?, None))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.post(format!("{}{path}", self.base));
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// Reserve a node that implements what the request asks for, and check
    /// the keybind of the key it will seal to.
    pub async fn reserve(&self, req: &ChatRequest) -> Result<ReserveResponse, ClientError> {
        self.reserve_with(&ReserveRequest {
            model: Some(req.model.clone()),
            node: req.node.clone(),
            max_price: req.max_price,
            require_attestation: req.require_attestation.clone(),
            features: choice_features(req.choices),
            ..Default::default()
        })
        .await
    }

    /// [`GridClient::reserve`] for a reservation body as given. The node
    /// reserved must advertise every feature the body asks for: a sealed
    /// request is opaque to the coordinator, so this is the one place where
    /// a node that would drop a parameter is kept from the prompt. A
    /// coordinator that does not say what the node implements (one that
    /// predates routing by features) fails such a reservation closed.
    pub async fn reserve_with(
        &self,
        body: &ReserveRequest,
    ) -> Result<ReserveResponse, ClientError> {
        let resp = check(self.post(routes::RESERVE).json(body).send().await?).await?;
        let res: ReserveResponse = resp.json().await?;
        let ed = Ed25519Public::from_b58(&res.node_ed25519_pubkey)?;
        let x = X25519Public::from_b58(&res.node_x25519_pubkey)?;
        let sig = Signature::from_b58(
            res.node_x25519_pubkey_sig
                .as_deref()
                .ok_or(ProtoError::Missing("node_x25519_pubkey_sig"))?,
        )?;
        verify_keybind(&res.node_id, &ed, &x, res.key_version.unwrap_or(1), &sig)?;
        if let Some(missing) = body.features.iter().find(|f| !res.features.contains(f)) {
            return Err(ClientError::Unsupported(format!(
                "the request asks for {missing:?}, and the coordinator did not show that node {} implements it",
                res.node_id
            )));
        }
        Ok(res)
    }

    /// Seal, send, open and verify. `on_delta` sees stream text as it opens.
    pub async fn chat(
        &self,
        res: &ReserveResponse,
        req: &ChatRequest,
        mut on_delta: impl FnMut(&str),
    ) -> Result<ChatOutcome, ClientError> {
        // The §3.4 payload, as the public SDKs seal it.
        let inner = JobPayload {
            messages: Some(
                req.messages
                    .iter()
                    .map(|(r, c)| ChatMessage::new(r, c))
                    .collect(),
            ),
            temperature: Some(req.temperature),
            max_tokens: Some(req.max_tokens),
            stream: req.stream.then_some(true),
            ..Default::default()
        }
        .with_choices(req.choices);
        self.send_sealed(res, &req.model, inner)
            .await?
            .open(|_, delta| on_delta(delta))
            .await
    }

    /// Seal `payload` to the reserved node and send it; the reply's status
    /// and headers have come back successful, its body is not read yet. A
    /// stream (`payload.stream`) gets a fresh request nonce here, whatever
    /// the payload held.
    pub async fn send_sealed(
        &self,
        res: &ReserveResponse,
        model: &str,
        mut payload: JobPayload,
    ) -> Result<SealedReply, ClientError> {
        let x = X25519Public::from_b58(&res.node_x25519_pubkey)?;
        let ed = Ed25519Public::from_b58(&res.node_ed25519_pubkey)?;
        let stream = payload.wants_stream();
        let nonce = e2e::random_request_nonce();
        payload.nonce = stream.then(|| nonce.clone());
        let inner = serde_json::to_vec(&payload).map_err(|e| ProtoError::Json(e.to_string()))?;
        let (enc, key) = e2e::seal_input(&x, &inner)?;
        // The clear budget is what the coordinator quotes and caps the node
        // to: all `n` completions together.
        let n = u64::from(payload.choices().n);
        let body = SealedChatRequest {
            reservation_token: res.reservation_token.clone(),
            enc,
            max_tokens: payload.max_tokens.map(|m| m.saturating_mul(n)),
            stream: Some(stream),
            pay_in_coin: None,
        };
        let body = serde_json::to_vec(&body).map_err(|e| ProtoError::Json(e.to_string()))?;
        let (resp, payment) = self.post_paid(routes::CHAT_COMPLETIONS, &body).await?;
        Ok(SealedReply {
            resp,
            payment,
            key,
            nonce,
            choices: payload.choices(),
            structured: payload.choices().is_extended() || payload.tools.is_some(),
            ed,
            node_id: res.node_id.clone(),
            node_ed25519_b58: res.node_ed25519_pubkey.clone(),
            model: model.to_string(),
        })
    }
}

/// The request features ([`crate::proto::features`]) that `n` and
/// `logprobs` ask for, as a reservation names them.
pub fn choice_features(c: ChoiceParams) -> Vec<String> {
    let mut out = Vec::new();
    if c.n > 1 {
        out.push(features::N.to_string());
    }
    if c.logprobs.is_some() {
        out.push(features::LOGPROBS.to_string());
    }
    out
}

/// The request features a sealed payload asks for: `tools` (the payload
/// carries them only when a call may be made), `response_format` other
/// than text (a malformed one counts, since the node must refuse it rather
/// than drop it), then those of `n` and `logprobs`.
pub fn payload_features(p: &JobPayload) -> Vec<String> {
    let mut out = Vec::new();
    if p.tools.is_some() {
        out.push(features::TOOLS.to_string());
    }
    let structured = p
        .response_format
        .as_ref()
        .is_some_and(|v| !matches!(response_format::parse(v), Ok(None)));
    if structured {
        out.push(features::RESPONSE_FORMAT.to_string());
    }
    out.extend(choice_features(p.choices()));
    out
}

/// A sealed request the coordinator accepted, its reply still to be read,
/// verified and opened ([`SealedReply::open`]).
pub struct SealedReply {
    resp: reqwest::Response,
    payment: Option<Value>,
    key: ResponseKey,
    nonce: String,
    ed: Ed25519Public,
    node_id: String,
    node_ed25519_b58: String,
    model: String,
    /// What the sealed payload asked of `n` and `logprobs`: the stream's
    /// chunks are structured ([`StructuredChunk`]) when it asked for either.
    choices: ChoiceParams,
    /// `n`, `logprobs` or tools: structured chunks and choices.
    structured: bool,
}

impl SealedReply {
    /// Whether the reply is a sealed stream (SSE); otherwise one sealed JSON
    /// body, also when a stream was asked of a node that does not stream.
    pub fn is_stream(&self) -> bool {
        self.resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    }

    /// Read, verify and open the reply. `on_delta(job_id, text)` sees each
    /// piece of text once its signature has verified and it has opened (the
    /// whole answer at once for a JSON reply). Fails at the first fault; a
    /// caller that has shown deltas must then discard them.
    pub async fn open(
        self,
        mut on_delta: impl FnMut(&str, &str),
    ) -> Result<ChatOutcome, ClientError> {
        let payment = self.payment.clone();
        let mut out = if self.is_stream() {
            self.read_stream(&mut on_delta).await?
        } else {
            let bytes = self.resp.bytes().await?;
            if bytes.len() > MAX_REPLY_BYTES {
                return Err(ClientError::Protocol("reply too large".into()));
            }
            let reply: Value =
                serde_json::from_slice(&bytes).map_err(|e| ProtoError::Json(e.to_string()))?;
            let out = open_whole(
                &self.node_id,
                &self.node_ed25519_b58,
                &self.ed,
                &self.key,
                &reply,
            )?;
            on_delta(&out.job_id, &out.content);
            out
        };
        out.payment = payment;
        Ok(out)
    }

    async fn read_stream(
        self,
        on_delta: &mut impl FnMut(&str, &str),
    ) -> Result<ChatOutcome, ClientError> {
        let (ed, model) = (&self.ed, self.model.as_str());
        let mut opener = self.key.stream_opener(&self.nonce)?;
        let mut body = self.resp.bytes_stream();
        let mut buf = String::new();
        let mut content = String::new();
        let mut job_id = String::new();
        let mut usage = None;
        let mut usage_signed = false;
        let mut error_event = false;
        let structured = self.structured;
        let mut answers = choices::Answers::new(self.choices.logprobs.is_some());
        while let Some(piece) = body.next().await {
            let piece = piece?;
            buf.push_str(&String::from_utf8_lossy(&piece));
            if buf.len() > MAX_REPLY_BYTES {
                return Err(ClientError::Protocol("stream too large".into()));
            }
            while let Some(end) = buf.find('\n') {
                let line: String = buf.drain(..=end).collect();
                let line = line.trim_end();
                if line == "event: error" {
                    error_event = true;
                    continue;
                }
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if error_event {
                    return Err(ClientError::Aborted(data.to_string()));
                }
                if data == "[DONE]" {
                    continue;
                }
                let c: Value =
                    serde_json::from_str(data).map_err(|e| ProtoError::Json(e.to_string()))?;
                let seq = c["seq"].as_u64().ok_or(ProtoError::Missing("seq"))?;
                let is_final = c["final"] == Value::Bool(true);
                let ct = c["ct"].as_str().ok_or(ProtoError::Missing("ct"))?;
                let job = c["job"].as_str().ok_or(ProtoError::Missing("job"))?;
                if job_id.is_empty() {
                    job_id = job.to_string();
                } else if job_id != job {
                    return Err(ClientError::Protocol(
                        "chunks of two jobs in one stream".into(),
                    ));
                }
                envelope::verify_result(
                    ed,
                    job,
                    ResultKind::Stream { seq, is_final },
                    ct,
                    c["sig"].as_str(),
                    c["sigv"].as_str(),
                )?;
                let text = opener.open(seq, is_final, c["eph"].as_str(), ct)?;
                if structured && !text.is_empty() {
                    let chunk: StructuredChunk =
                        serde_json::from_str(&text).map_err(|e| ProtoError::Json(e.to_string()))?;
                    for ch in chunk.choices {
                        if let Some(calls) = ch.delta.tool_calls {
                            answers.push_calls(ch.index, calls);
                        }
                        let piece = ch.delta.content.unwrap_or_default();
                        let lp = ch.logprobs.and_then(|l| l.content).unwrap_or_default();
                        answers.push(ch.index, &piece, lp);
                        if let Some(f) = ch.finish_reason {
                            answers.done(ch.index, f, 0, 0, 0);
                        }
                        // What a reader of one answer sees: the first choice.
                        if ch.index == 0 && !piece.is_empty() {
                            content.push_str(&piece);
                            on_delta(job, &piece);
                        }
                    }
                } else if !structured {
                    content.push_str(&text);
                    on_delta(job, &text);
                }
                if is_final {
                    if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
                        let u: Usage = serde_json::from_value(u.clone())
                            .map_err(|e| ProtoError::Json(e.to_string()))?;
                        // The receipt names the node's model: the one reserved.
                        usage_signed = envelope::verify_usage(
                            ed,
                            job,
                            model,
                            &u,
                            c["usage_signature"].as_str(),
                        )
                        .is_ok();
                        usage = Some(u);
                    }
                    opener.finish()?;
                    let choices = if structured {
                        answers.finish().map(|(c, _)| c).ok_or_else(|| {
                            ClientError::Protocol("a choice of the stream did not end".into())
                        })?
                    } else {
                        Vec::new()
                    };
                    return Ok(ChatOutcome {
                        job_id,
                        node_id: self.node_id.clone(),
                        content,
                        usage,
                        usage_signed,
                        finish_reason: None,
                        payment: None,
                        choices,
                    });
                }
            }
        }
        opener.finish()?;
        Err(ClientError::Protocol("stream ended early".into()))
    }
}

fn open_whole(
    node_id: &str,
    node_ed25519_b58: &str,
    ed: &Ed25519Public,
    key: &ResponseKey,
    reply: &Value,
) -> Result<ChatOutcome, ClientError> {
    envelope::verify_sealed_reply(Some(node_ed25519_b58), reply)?;
    let sealed = serde_json::from_value(reply["sealed_result"].clone())
        .map_err(|e| ProtoError::Json(e.to_string()))?;
    let plain = key.open_output(&sealed)?;
    let result: Value =
        serde_json::from_slice(&plain).map_err(|e| ProtoError::Json(e.to_string()))?;
    let job_id = reply["job_id"].as_str().unwrap_or_default().to_string();
    let usage: Option<Usage> = serde_json::from_value(reply["usage"].clone()).ok();
    let model = result["model"].as_str().unwrap_or_default();
    let usage_signed = usage.as_ref().is_some_and(|u| {
        envelope::verify_usage(ed, &job_id, model, u, reply["usage_signature"].as_str()).is_ok()
    });
    Ok(ChatOutcome {
        job_id,
        node_id: node_id.to_string(),
        content: result["content"].as_str().unwrap_or_default().to_string(),
        usage,
        usage_signed,
        finish_reason: result["finish_reason"].as_str().map(String::from),
        payment: None,
        choices: result
            .get("choices")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default(),
    })
}

/// The first three steps of the §7b client procedure, which need no vendor
/// roots: the evidence names the keys the client sealed to, the keybind
/// verifies, and the binding the report must carry is recomputed. Returns
/// that 64-byte binding for the report check.
pub fn check_evidence_binding(
    res: &ReserveResponse,
    doc: &EvidenceResponse,
) -> Result<[u8; 64], ClientError> {
    if doc.node_id != res.node_id {
        return Err(ClientError::Protocol(
            "the evidence is for another node".into(),
        ));
    }
    if doc.ed25519_pubkey != res.node_ed25519_pubkey || doc.x25519_pubkey != res.node_x25519_pubkey
    {
        return Err(ClientError::Protocol(
            "the evidence binds other keys than the ones the prompt was sealed to".into(),
        ));
    }
    let ed = Ed25519Public::from_b58(&doc.ed25519_pubkey)?;
    let x = X25519Public::from_b58(&doc.x25519_pubkey)?;
    let kb = Signature::from_b58(
        doc.keybind_signature
            .as_deref()
            .ok_or(ProtoError::Missing("keybind_signature"))?,
    )?;
    verify_keybind(&doc.node_id, &ed, &x, doc.key_version, &kb)?;
    let node_id = NodeId::parse(&doc.node_id)?;
    let challenge = doc
        .challenge
        .as_deref()
        .ok_or(ProtoError::Missing("challenge"))?;
    Ok(attestation_report_data(
        &node_id,
        &ed,
        &x,
        doc.key_version,
        challenge,
    ))
}

impl GridClient {
    /// Fetch the node's public evidence document (§7b).
    pub async fn fetch_evidence(
        &self,
        res: &ReserveResponse,
    ) -> Result<EvidenceResponse, ClientError> {
        let url = match &res.evidence_url {
            Some(u) => u.clone(),
            None => format!(
                "{}{}",
                self.base,
                routes::path(routes::NODE_EVIDENCE, &res.node_id)
            ),
        };
        let resp = check(self.http.get(url).send().await?).await?;
        Ok(resp.json().await?)
    }
}

/// How `--verify-evidence` judges a node's evidence: the client's own policy
/// and roots, never the coordinator's word.
#[derive(Debug, Clone)]
pub struct EvidencePolicy {
    pub policy: crate::attest::Policy,
    /// Simulated-TEE keys to accept (a development grid); empty in production.
    pub simulated_keys: Vec<Ed25519Public>,
    pub allow_any_measurement: bool,
}

impl GridClient {
    /// The §7b client procedure: the evidence binds the very keys the prompt
    /// is sealed to (keybind, report data), and the report verifies against
    /// the client's pinned vendor roots and policy.
    pub async fn verify_node_evidence(
        &self,
        res: &ReserveResponse,
        how: &EvidencePolicy,
    ) -> Result<crate::attest::Verdict, ClientError> {
        use crate::attest::{self, Binding, VerifyOptions};
        let doc = self.fetch_evidence(res).await?;
        let expected = check_evidence_binding(res, &doc)?;
        let wire = doc.evidence.as_ref().ok_or_else(|| {
            ClientError::Protocol(format!(
                "the node is {:?}: it has no hardware evidence",
                doc.attestation_level
            ))
        })?;
        let bytes = serde_json::to_vec(wire).map_err(|e| ProtoError::Json(e.to_string()))?;
        let evidence = attest::Evidence::from_json(&bytes)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let now = crate::clock::Clock::system().now_secs();
        let mut opts = VerifyOptions::new(now);
        opts.simulated_keys = how.simulated_keys.clone();
        opts.dev_mode = !how.simulated_keys.is_empty();
        opts.allow_any_measurement = how.allow_any_measurement;
        let verdict = attest::verify_evidence(
            &evidence,
            &Binding::ReportData(expected),
            &how.policy,
            &opts,
        )
        .await;
        if !verdict.verified {
            let failed: Vec<String> = verdict
                .checks
                .iter()
                .filter(|c| c.status == attest::CheckStatus::Fail)
                .map(|c| format!("{:?}: {}", c.step, c.detail))
                .collect();
            return Err(ClientError::Protocol(format!(
                "the node's evidence does not verify: {}",
                failed.join("; ")
            )));
        }
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_payload_needs_the_features_it_asks_for() {
        assert!(payload_features(&JobPayload::default()).is_empty());
        let text = JobPayload {
            response_format: Some(json!({"type": "text"})),
            ..Default::default()
        };
        assert!(payload_features(&text).is_empty());
        let all = JobPayload {
            response_format: Some(json!({"type": "json_object"})),
            ..Default::default()
        }
        .with_choices(ChoiceParams {
            n: 3,
            logprobs: Some(0),
        });
        assert_eq!(payload_features(&all), ["response_format", "n", "logprobs"]);
        // A malformed format still needs a node that reads it (and refuses it).
        let bad = JobPayload {
            response_format: Some(json!({"type": "yaml"})),
            ..Default::default()
        };
        assert_eq!(payload_features(&bad), ["response_format"]);
    }
}
