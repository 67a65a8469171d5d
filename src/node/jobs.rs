//! A job's protocol side on the node (PROTOCOL.md §3.6, §6.7–§6.10): turn a
//! [`PendingJob`] into a validated chat request (its payload read by
//! [`JobPayload`] under the rules of §6.7), and the engine's output into the
//! signed `/complete` and `/chunk` bodies. No I/O and no engine here: the
//! agent feeds text in and posts what comes out.
//!
//! Fail-closed rules: a sealed job that does not open fails with a reason
//! starting `decrypt failed:` and never falls back to plaintext; a stream job
//! without a request nonce fails; only `inference` jobs run.
//!
//! PROTOCOL.md §7f: a job generates at most the clear `max_tokens_cap` the
//! coordinator quoted (whatever the sealed `max_tokens` asks), and a sealed
//! input that cannot be opened or read fails with the code
//! `bad_sealed_input` ([`JobError::fail_code`]): the client's fault, not the
//! node's.

use std::sync::Arc;

use thiserror::Error;

use crate::proto::api::{
    ChunkRequest, CompleteRequest, PendingJob, SealedInputPayload, SealedReplyPlaintext,
    FAIL_BAD_SEALED_INPUT,
};
use crate::proto::e2e::{self, Algorithm, StreamSealer};
use crate::proto::envelope::{self, ResultKind, ENVELOPE_VERSION};
use crate::proto::identity::{NodeIdentity, X25519Public};
pub use crate::proto::job::TextMessage as Message;
use crate::proto::job::{JobParams, JobPayload};
use crate::proto::limits::TOKENS_PER_CHUNK;
use crate::proto::openai::choices::{self, StructuredChunk};
use crate::proto::openai::{
    tools, Choice, ChoiceParams, ChunkChoice, Delta, FinishReason, JsonGrammar, TokenLogprob,
    ToolSpec, Usage,
};
use crate::proto::ProtoError;

/// Why a job cannot run; the text goes to `/fail` as the reason.
#[derive(Debug, Error, PartialEq)]
pub enum JobError {
    #[error("Unsupported job type: {0}")]
    UnsupportedJobType(String),
    #[error("decrypt failed: {0}")]
    Decrypt(ProtoError),
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The client's sealed payload opened but is not a valid job.
    #[error("invalid input: {0}")]
    SealedInvalid(String),
    #[error("stream job without a request nonce")]
    MissingNonce,
    #[error("sealing failed: {0}")]
    Seal(ProtoError),
}

impl JobError {
    /// The `/fail` code: [`FAIL_BAD_SEALED_INPUT`] when the client's sealed
    /// input is at fault (it does not open, or what it holds is not a job).
    pub fn fail_code(&self) -> Option<&'static str> {
        match self {
            JobError::Decrypt(_) | JobError::SealedInvalid(_) | JobError::MissingNonce => {
                Some(FAIL_BAD_SEALED_INPUT)
            }
            _ => None,
        }
    }
}

/// The validated request of a job, whatever its transport.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatJob {
    pub job_id: String,
    pub model: String,
    pub messages: Vec<Message>,
    /// Clamped to [0, 2]; default 0.7.
    pub temperature: f64,
    /// Clamped to [1, 8192]; default 2048.
    pub max_tokens: u64,
    /// sgl reads these OpenAI parameters too; the public node ignores them.
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `response_format`: the grammar the output follows.
    pub grammar: Option<Arc<JsonGrammar>>,
    /// `n`, `logprobs` and `top_logprobs` (sgl extension); `max_tokens` is
    /// the budget of each of the `n` completions.
    pub choices: ChoiceParams,
    /// `tools`: the messages already show them; the output's calls are
    /// lifted out of its text.
    pub tools: Option<Arc<ToolSpec>>,
    pub reply: Reply,
}

impl ChatJob {
    /// Whether the answer travels as structured choices (sgl extension):
    /// `n`, `logprobs` or tools.
    pub fn is_structured(&self) -> bool {
        self.choices.is_extended() || self.tools.is_some()
    }
}

/// How the result travels back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Plain payload: `/complete` with `encrypted_result` text (not encrypted).
    Plain,
    /// Sealed, non-stream: `/complete` with `sealed_result`.
    Sealed { reply_to: X25519Public },
    /// Sealed stream: `/chunk` calls.
    Stream {
        reply_to: X25519Public,
        request_nonce: String,
    },
}

/// Parse and validate a job. `node_streams` says whether this node streams;
/// the stream path runs only when the coordinator marked the job, the sealed
/// payload asks for it, and the input was v2 (§3.6).
pub fn parse_job(
    node: &NodeIdentity,
    job: &PendingJob,
    node_streams: bool,
) -> Result<ChatJob, JobError> {
    if job.job_type != "inference" {
        return Err(JobError::UnsupportedJobType(
            job.job_type.chars().take(64).collect(),
        ));
    }
    let payload = job
        .input_payload
        .as_object()
        .ok_or_else(|| JobError::Invalid("input_payload is not an object".into()))?;
    // The quoted cap (§7f), in clear beside either payload shape; a value
    // that is not a count is ignored, as §6.7 ignores a bad extra field.
    let cap = payload
        .get("max_tokens_cap")
        .and_then(serde_json::Value::as_u64);
    if !payload.contains_key("enc") {
        let plain: JobPayload = serde_json::from_value(job.input_payload.clone())
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        return plain_job(&job.id, &job.model, &plain).and_then(|j| j.capped(cap));
    }
    let sealed: SealedInputPayload = serde_json::from_value(job.input_payload.clone())
        .map_err(|e| JobError::Decrypt(ProtoError::Json(e.to_string())))?;
    let opened = e2e::open_input(node, &sealed.enc).map_err(JobError::Decrypt)?;
    // Anything but a JSON object is refused as undecryptable (§3.7).
    let inner = opened.json_object().map_err(JobError::Decrypt)?;
    let inner: JobPayload = serde_json::from_value(serde_json::Value::Object(inner))
        .map_err(|e| JobError::SealedInvalid(e.to_string()))?;
    let wants_stream = node_streams && sealed.stream == Some(true) && inner.wants_stream();
    let reply = if wants_stream {
        let nonce = inner.nonce.as_deref().unwrap_or("");
        if nonce.is_empty() {
            return Err(JobError::MissingNonce);
        }
        e2e::check_request_nonce(nonce).map_err(|e| JobError::SealedInvalid(e.to_string()))?;
        Reply::Stream {
            reply_to: opened.reply_to,
            request_nonce: nonce.to_string(),
        }
    } else {
        Reply::Sealed {
            reply_to: opened.reply_to,
        }
    };
    chat_job(&job.id, &job.model, &inner, reply)
        .map_err(|e| match e {
            JobError::Invalid(why) => JobError::SealedInvalid(why),
            other => other,
        })
        .and_then(|j| {
            j.capped(cap).map_err(|e| match e {
                JobError::Invalid(why) => JobError::SealedInvalid(why),
                other => other,
            })
        })
}

impl ChatJob {
    /// At most `cap` completion tokens (the quoted cap, §7f), when given:
    /// the cap is the job's whole budget, so `n` completions get a share of
    /// it each, and a cap smaller than `n` cannot be kept.
    fn capped(mut self, cap: Option<u64>) -> Result<ChatJob, JobError> {
        if let Some(cap) = cap {
            let n = u64::from(self.choices.n.max(1));
            if cap < n {
                return Err(JobError::Invalid(format!(
                    "{n} completions do not fit the quoted budget of {cap} tokens"
                )));
            }
            self.max_tokens = self
                .max_tokens
                .min(crate::proto::job::job_max_tokens(Some(cap / n)));
        }
        Ok(self)
    }
}

/// A plain payload validated exactly as a plain grid job's is, for the
/// node's local server when an [`Executor`](super::executor::Executor)
/// answers it (`sgl node serve --engine echo`): both paths then feed the
/// executor the same request.
pub fn plain_job(job_id: &str, model: &str, payload: &JobPayload) -> Result<ChatJob, JobError> {
    chat_job(job_id, model, payload, Reply::Plain)
}

fn chat_job(
    job_id: &str,
    model: &str,
    payload: &JobPayload,
    reply: Reply,
) -> Result<ChatJob, JobError> {
    let JobParams {
        messages,
        temperature,
        max_tokens,
        top_p,
        seed,
        stop,
        grammar,
        choices,
        tools,
    } = payload
        .params()
        .map_err(|e| JobError::Invalid(e.to_string()))?;
    Ok(ChatJob {
        job_id: job_id.to_string(),
        model: model.to_string(),
        messages,
        temperature,
        max_tokens,
        top_p,
        seed,
        stop,
        grammar,
        choices,
        tools,
        reply,
    })
}

/// The `/complete` body for a finished non-stream job, signed, with the usage receipt.
pub fn complete_body(
    node: &NodeIdentity,
    job: &ChatJob,
    content: &str,
    usage: Usage,
    finish: FinishReason,
) -> Result<CompleteRequest, JobError> {
    complete_choices_body(node, job, content, usage, finish, None)
}

/// [`complete_body`] with every choice of a job that asked for `n` or
/// `logprobs` (sgl extension: `choices` beside `content`, which stays the
/// first choice's text for the SDKs that read only it).
pub fn complete_choices_body(
    node: &NodeIdentity,
    job: &ChatJob,
    content: &str,
    usage: Usage,
    finish: FinishReason,
    choices: Option<Vec<Choice>>,
) -> Result<CompleteRequest, JobError> {
    let result = SealedReplyPlaintext {
        content: content.to_string(),
        model: job.model.clone(),
        usage,
        finish_reason: Some(finish.as_str().to_string()),
        choices,
    };
    let text = serde_json::to_string(&result)
        .map_err(|e| JobError::Seal(ProtoError::Json(e.to_string())))?;
    let usage_signature =
        Some(envelope::sign_usage(node, &job.job_id, &job.model, &usage).to_b58());
    match &job.reply {
        Reply::Plain => Ok(CompleteRequest {
            result_envelope_signature: Some(
                envelope::sign_result(node, &job.job_id, ResultKind::Plain, &text).to_b58(),
            ),
            result_envelope_version: Some(ENVELOPE_VERSION.into()),
            encrypted_result: Some(text),
            sealed_result: None,
            usage: Some(usage),
            usage_signature,
        }),
        // A stream job that ended up answered in one piece still goes sealed.
        Reply::Sealed { reply_to } | Reply::Stream { reply_to, .. } => {
            let sealed =
                e2e::seal_output_kept(node, reply_to, text.as_bytes()).map_err(JobError::Seal)?;
            let sig =
                envelope::sign_result(node, &job.job_id, ResultKind::Sealed, &sealed.ciphertext);
            Ok(CompleteRequest {
                encrypted_result: None,
                sealed_result: Some(sealed),
                usage: Some(usage),
                result_envelope_signature: Some(sig.to_b58()),
                result_envelope_version: Some(ENVELOPE_VERSION.into()),
                usage_signature,
            })
        }
    }
}

/// Builds the `/chunk` bodies of one stream job: deltas batched every
/// [`TOKENS_PER_CHUNK`] tokens, each sealed and signed; the final chunk empty
/// with the signed usage. `finish` consumes the stream.
pub struct StreamChunks<'n> {
    node: &'n NodeIdentity,
    job_id: String,
    model: String,
    sealer: StreamSealer,
    pending: String,
    pending_tokens: usize,
    tokens_sent: u64,
    /// A job that asked for `n` or `logprobs`: chunks carry
    /// [`StructuredChunk`] JSON instead of raw text.
    structured: Option<Vec<ChunkChoice>>,
    /// Lifts tool calls out of a structured job's text.
    splitter: tools::DeltaSplitter,
}

impl<'n> StreamChunks<'n> {
    pub fn new(node: &'n NodeIdentity, job: &ChatJob) -> Result<Self, JobError> {
        let Reply::Stream {
            reply_to,
            request_nonce,
        } = &job.reply
        else {
            return Err(JobError::Invalid("not a stream job".into()));
        };
        Ok(StreamChunks {
            node,
            job_id: job.job_id.clone(),
            model: job.model.clone(),
            sealer: StreamSealer::new(reply_to, request_nonce).map_err(JobError::Seal)?,
            pending: String::new(),
            pending_tokens: 0,
            tokens_sent: 0,
            structured: job.is_structured().then(Vec::new),
            splitter: tools::DeltaSplitter::new(job.tools.clone()),
        })
    }

    /// Add a piece of choice `index` (a structured job's token text and
    /// logprobs); returns a chunk to post when one is due.
    pub fn push_piece(
        &mut self,
        index: u32,
        text: &str,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<Option<ChunkRequest>, JobError> {
        let Some(pending) = self.structured.as_mut() else {
            return self.push_token(text);
        };
        let tokens = logprobs.len().max(1);
        let mut deltas = self.splitter.push(index, text);
        if deltas.is_empty() && !logprobs.is_empty() {
            deltas.push(Delta {
                content: Some(String::new()),
                ..Delta::default()
            });
        }
        let mut logprobs = Some(logprobs);
        for delta in deltas {
            let lps = logprobs.take().unwrap_or_default();
            push_delta(pending, index, delta, lps);
        }
        self.pending_tokens += tokens;
        if self.pending_tokens >= TOKENS_PER_CHUNK {
            return self.flush();
        }
        Ok(None)
    }

    /// Choice `index` of a structured job ended; its finish reason goes
    /// with the next chunk.
    pub fn push_choice_end(&mut self, index: u32, finish: FinishReason) {
        let (rest, finish) = self.splitter.end(index, finish);
        if let Some(pending) = self.structured.as_mut() {
            for delta in rest {
                push_delta(pending, index, delta, Vec::new());
            }
            pending.push(ChunkChoice {
                index,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some(finish),
            });
        }
    }

    /// Add one decoded token's text; returns a chunk to post when one is due.
    pub fn push_token(&mut self, text: &str) -> Result<Option<ChunkRequest>, JobError> {
        self.pending.push_str(text);
        self.pending_tokens += 1;
        if self.pending_tokens >= TOKENS_PER_CHUNK {
            return self.flush();
        }
        Ok(None)
    }

    /// Seal whatever is buffered (nothing when the buffer is empty).
    pub fn flush(&mut self) -> Result<Option<ChunkRequest>, JobError> {
        if let Some(pending) = self.structured.as_mut() {
            if pending.is_empty() {
                self.tokens_sent += std::mem::take(&mut self.pending_tokens) as u64;
                return Ok(None);
            }
            let chunk = StructuredChunk {
                choices: std::mem::take(pending),
            };
            let text = serde_json::to_string(&chunk)
                .map_err(|e| JobError::Seal(ProtoError::Json(e.to_string())))?;
            let chunk = self.sealer.seal(&text).map_err(JobError::Seal)?;
            self.tokens_sent += std::mem::take(&mut self.pending_tokens) as u64;
            return Ok(Some(self.body(chunk, None)));
        }
        if self.pending.is_empty() {
            self.tokens_sent += self.pending_tokens as u64;
            self.pending_tokens = 0;
            return Ok(None);
        }
        let text = std::mem::take(&mut self.pending);
        let chunk = self.sealer.seal(&text).map_err(JobError::Seal)?;
        self.tokens_sent += std::mem::take(&mut self.pending_tokens) as u64;
        Ok(Some(self.body(chunk, None)))
    }

    /// Completion tokens carried by the chunks built so far (for settling a
    /// client abort: only delivered completion tokens are billed, §6.12).
    pub fn tokens_sent(&self) -> u64 {
        self.tokens_sent
    }

    /// The final chunk: empty text, the usage and its signature.
    pub fn finish(self, usage: Usage) -> Result<ChunkRequest, JobError> {
        let node = self.node;
        let (job_id, model) = (self.job_id.clone(), self.model.clone());
        let chunk = self.sealer.finish("").map_err(JobError::Seal)?;
        let usage_sig = envelope::sign_usage(node, &job_id, &model, &usage).to_b58();
        let mut body = chunk_body(node, &job_id, chunk);
        body.usage = Some(usage);
        body.usage_signature = Some(usage_sig);
        Ok(body)
    }

    fn body(&self, chunk: e2e::SealedChunk, usage: Option<Usage>) -> ChunkRequest {
        let mut b = chunk_body(self.node, &self.job_id, chunk);
        b.usage = usage;
        b
    }
}

/// Add a delta of choice `index` to a structured chunk: consecutive content
/// of one choice makes one delta; a tool call is a delta of its own.
fn push_delta(
    pending: &mut Vec<ChunkChoice>,
    index: u32,
    delta: Delta,
    logprobs: Vec<TokenLogprob>,
) {
    match pending.last_mut() {
        Some(c)
            if c.index == index
                && c.finish_reason.is_none()
                && c.delta.tool_calls.is_none()
                && delta.tool_calls.is_none() =>
        {
            c.delta
                .content
                .get_or_insert_with(String::new)
                .push_str(delta.content.as_deref().unwrap_or(""));
            match c.logprobs.as_mut() {
                Some(lp) => lp.content.get_or_insert_with(Vec::new).extend(logprobs),
                None => c.logprobs = choices::delta_logprobs(logprobs),
            }
        }
        _ => pending.push(ChunkChoice {
            index,
            delta,
            logprobs: choices::delta_logprobs(logprobs),
            finish_reason: None,
        }),
    }
}

fn chunk_body(node: &NodeIdentity, job_id: &str, chunk: e2e::SealedChunk) -> ChunkRequest {
    let kind = ResultKind::Stream {
        seq: chunk.seq,
        is_final: chunk.is_final,
    };
    let sig = envelope::sign_result(node, job_id, kind, &chunk.ciphertext);
    ChunkRequest {
        seq: Some(chunk.seq),
        is_final: Some(chunk.is_final),
        ciphertext: Some(chunk.ciphertext),
        algorithm: Some(Algorithm::V2Stream.as_str().into()),
        ephemeral_public_key: chunk.ephemeral_public_key,
        usage: None,
        result_envelope_signature: Some(sig.to_b58()),
        result_envelope_version: Some(ENVELOPE_VERSION.into()),
        usage_signature: None,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proto::e2e::seal_input;
    use crate::proto::limits::MAX_MESSAGE_BYTES;
    use serde_json::Value;

    fn node() -> NodeIdentity {
        NodeIdentity::from_seed(&[0x42; 32])
    }

    fn job(payload: Value) -> PendingJob {
        PendingJob {
            id: "job-1".into(),
            job_type: "inference".into(),
            model: "smollm2-135m".into(),
            input_payload: payload,
        }
    }

    fn sealed_job(
        node: &NodeIdentity,
        inner: Value,
        marker: Option<bool>,
    ) -> (PendingJob, e2e::ResponseKey) {
        let (enc, key) = seal_input(&node.x25519_public(), inner.to_string().as_bytes()).unwrap();
        let mut payload = json!({ "enc": enc });
        if let Some(m) = marker {
            payload["stream"] = json!(m);
        }
        (job(payload), key)
    }

    #[test]
    fn plain_defaults_and_clamps() {
        let n = node();
        let j = parse_job(&n, &job(json!({"prompt": "hi"})), true).unwrap();
        assert_eq!(
            j.messages,
            vec![Message {
                role: "user".into(),
                content: "hi".into()
            }]
        );
        assert_eq!(
            (j.temperature, j.max_tokens, j.reply.clone()),
            (0.7, 2048, Reply::Plain)
        );
        let j = parse_job(&n, &job(json!({"messages": [{"role":"user","content":"x"}], "temperature": 9, "max_tokens": 100000})), true)
            .unwrap();
        assert_eq!((j.temperature, j.max_tokens), (2.0, 8192));
        let j = parse_job(
            &n,
            &job(json!({"prompt": "x", "temperature": -1, "max_tokens": 0})),
            true,
        )
        .unwrap();
        assert_eq!((j.temperature, j.max_tokens), (0.0, 1));
    }

    #[test]
    fn limits_fail_the_job() {
        let n = node();
        let many: Vec<Value> = (0..257)
            .map(|_| json!({"role":"user","content":"x"}))
            .collect();
        assert!(matches!(
            parse_job(&n, &job(json!({"messages": many})), true),
            Err(JobError::Invalid(_))
        ));
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(
            parse_job(
                &n,
                &job(json!({"messages": [{"role":"user","content": big}]})),
                true
            ),
            Err(JobError::Invalid(_))
        ));
        assert!(matches!(
            parse_job(&n, &job(json!({"temperature": 1})), true),
            Err(JobError::Invalid(_))
        ));
        let mut other = job(json!({"prompt": "x"}));
        other.job_type = "embedding".into();
        assert_eq!(
            parse_job(&n, &other, true).unwrap_err().to_string(),
            "Unsupported job type: embedding"
        );
        let img = json!({"messages": [{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]});
        assert!(parse_job(&n, &job(img), true).is_err());
    }

    #[test]
    fn sealed_job_opens_and_answers_sealed() {
        let n = node();
        let (j, key) = sealed_job(
            &n,
            json!({"messages":[{"role":"user","content":"hello"}],"temperature":0.2,"max_tokens":16}),
            None,
        );
        let chat = parse_job(&n, &j, true).unwrap();
        assert!(matches!(chat.reply, Reply::Sealed { .. }));
        assert_eq!((chat.temperature, chat.max_tokens), (0.2, 16));
        let body = complete_body(&n, &chat, "Paris", Usage::new(5, 1), FinishReason::Stop).unwrap();
        let sealed = body.sealed_result.clone().unwrap();
        envelope::verify_result(
            &n.ed25519_public(),
            "job-1",
            ResultKind::Sealed,
            &sealed.ciphertext,
            body.result_envelope_signature.as_deref(),
            body.result_envelope_version.as_deref(),
        )
        .unwrap();
        envelope::verify_usage(
            &n.ed25519_public(),
            "job-1",
            "smollm2-135m",
            &Usage::new(5, 1),
            body.usage_signature.as_deref(),
        )
        .unwrap();
        let plain: SealedReplyPlaintext =
            serde_json::from_slice(&key.open_output(&sealed).unwrap()).unwrap();
        assert_eq!(plain.content, "Paris");
        assert!(body.encrypted_result.is_none());
    }

    #[test]
    fn a_sealed_job_that_does_not_open_fails_with_decrypt_failed() {
        let n = node();
        let other = NodeIdentity::from_seed(&[7; 32]);
        let (j, _) = sealed_job(&other, json!({"prompt":"x"}), None);
        let err = parse_job(&n, &j, true).unwrap_err();
        assert!(err.to_string().starts_with("decrypt failed:"), "{err}");
        // A v1 or missing tag is refused, never read as plaintext.
        let (mut j, _) = sealed_job(&n, json!({"prompt":"x"}), None);
        j.input_payload["enc"]["algorithm"] = json!("x25519-xchacha20poly1305");
        assert!(parse_job(&n, &j, true)
            .unwrap_err()
            .to_string()
            .starts_with("decrypt failed:"));
        j.input_payload["enc"]
            .as_object_mut()
            .unwrap()
            .remove("algorithm");
        assert!(parse_job(&n, &j, true)
            .unwrap_err()
            .to_string()
            .starts_with("decrypt failed:"));
        // A sealed payload that is not a JSON object.
        let (enc, _) = seal_input(&n.x25519_public(), b"[1,2]").unwrap();
        assert!(parse_job(&n, &job(json!({"enc": enc})), true)
            .unwrap_err()
            .to_string()
            .starts_with("decrypt failed:"));
    }

    #[test]
    fn stream_path_needs_every_condition_and_a_nonce() {
        let n = node();
        let inner = json!({"messages":[{"role":"user","content":"x"}],"stream":true,"nonce":"12drXXUifSrRnXLGbXg8E"});
        let (j, _) = sealed_job(&n, inner.clone(), Some(true));
        assert!(matches!(
            parse_job(&n, &j, true).unwrap().reply,
            Reply::Stream { .. }
        ));
        // No marker, or a node that does not stream: the sealed non-stream path.
        let (j, _) = sealed_job(&n, inner.clone(), None);
        assert!(matches!(
            parse_job(&n, &j, true).unwrap().reply,
            Reply::Sealed { .. }
        ));
        let (j, _) = sealed_job(&n, inner, Some(true));
        assert!(matches!(
            parse_job(&n, &j, false).unwrap().reply,
            Reply::Sealed { .. }
        ));
        // Marker and payload agree, but no nonce: fail.
        let (j, _) = sealed_job(&n, json!({"prompt":"x","stream":true}), Some(true));
        assert_eq!(parse_job(&n, &j, true).unwrap_err(), JobError::MissingNonce);
    }

    #[test]
    fn stream_chunks_batch_tokens_and_end_with_signed_usage() {
        let n = node();
        let nonce = "12drXXUifSrRnXLGbXg8E";
        let inner = json!({"messages":[{"role":"user","content":"x"}],"stream":true,"nonce":nonce});
        let (j, key) = sealed_job(&n, inner, Some(true));
        let chat = parse_job(&n, &j, true).unwrap();
        let mut s = StreamChunks::new(&n, &chat).unwrap();
        let mut bodies = Vec::new();
        let tokens = [
            "Pa", "ris", " is", " the", " cap", "ital", " of", " Fr", "ance", "é",
        ];
        for t in tokens {
            if let Some(b) = s.push_token(t).unwrap() {
                bodies.push(b);
            }
        }
        bodies.extend(s.flush().unwrap());
        assert_eq!(s.tokens_sent(), tokens.len() as u64);
        bodies.push(s.finish(Usage::new(3, 10)).unwrap());
        assert_eq!(bodies.len(), 3);
        let mut opener = key.stream_opener(nonce).unwrap();
        let mut text = String::new();
        for b in &bodies {
            let (seq, fin, ct) = (
                b.seq.unwrap(),
                b.is_final.unwrap(),
                b.ciphertext.as_deref().unwrap(),
            );
            assert_eq!(b.algorithm.as_deref(), Some(e2e::ALG_V2_STREAM));
            assert_eq!(b.ephemeral_public_key.is_some(), seq == 0);
            envelope::verify_result(
                &n.ed25519_public(),
                "job-1",
                ResultKind::Stream { seq, is_final: fin },
                ct,
                b.result_envelope_signature.as_deref(),
                Some("v1"),
            )
            .unwrap();
            text.push_str(
                &opener
                    .open(seq, fin, b.ephemeral_public_key.as_deref(), ct)
                    .unwrap(),
            );
        }
        opener.finish().unwrap();
        assert_eq!(text, tokens.concat());
        let last = bodies.last().unwrap();
        envelope::verify_usage(
            &n.ed25519_public(),
            "job-1",
            "smollm2-135m",
            &Usage::new(3, 10),
            last.usage_signature.as_deref(),
        )
        .unwrap();
    }

    #[test]
    fn the_quoted_cap_bounds_the_budget() {
        let n = node();
        let (mut j, _) = sealed_job(&n, json!({"prompt": "x", "max_tokens": 8192}), None);
        j.input_payload["max_tokens_cap"] = json!(3);
        assert_eq!(parse_job(&n, &j, true).unwrap().max_tokens, 3);
        // A cap above the sealed budget changes nothing; a malformed one is
        // refused (fail closed: the coordinator always sends an integer).
        j.input_payload["max_tokens_cap"] = json!(100_000);
        assert_eq!(parse_job(&n, &j, true).unwrap().max_tokens, 8192);
        j.input_payload["max_tokens_cap"] = json!("many");
        assert!(parse_job(&n, &j, true).is_err());
        let p = job(json!({"prompt": "x", "max_tokens": 50, "max_tokens_cap": 7}));
        assert_eq!(parse_job(&n, &p, true).unwrap().max_tokens, 7);
    }

    #[test]
    fn n_completions_share_the_quoted_cap() {
        let n = node();
        let (mut j, _) = sealed_job(&n, json!({"prompt": "x", "max_tokens": 100, "n": 3}), None);
        j.input_payload["max_tokens_cap"] = json!(60);
        let chat = parse_job(&n, &j, true).unwrap();
        assert_eq!((chat.choices.n, chat.max_tokens), (3, 20));
        j.input_payload["max_tokens_cap"] = json!(2);
        let e = parse_job(&n, &j, true).unwrap_err();
        assert_eq!(e.fail_code(), Some(FAIL_BAD_SEALED_INPUT), "{e}");
    }

    #[test]
    fn a_structured_stream_carries_each_choices_pieces_and_end() {
        let n = node();
        let nonce = "12drXXUifSrRnXLGbXg8E";
        let inner = json!({"messages":[{"role":"user","content":"x"}],"stream":true,
                           "nonce":nonce,"n":2,"logprobs":true});
        let (j, key) = sealed_job(&n, inner, Some(true));
        let chat = parse_job(&n, &j, true).unwrap();
        let mut s = StreamChunks::new(&n, &chat).unwrap();
        let lp = |t: &str| TokenLogprob {
            token: t.into(),
            logprob: -1.0,
            bytes: Some(t.as_bytes().to_vec()),
            top_logprobs: vec![],
        };
        let mut bodies = Vec::new();
        for (i, t) in [(0, "Pa"), (1, "Lo"), (0, "ris"), (1, "ndon")] {
            bodies.extend(s.push_piece(i, t, vec![lp(t)]).unwrap());
        }
        s.push_choice_end(0, FinishReason::Stop);
        s.push_choice_end(1, FinishReason::Length);
        bodies.extend(s.flush().unwrap());
        bodies.push(s.finish(Usage::new(3, 4)).unwrap());
        let mut opener = key.stream_opener(nonce).unwrap();
        let mut answers = choices::Answers::new(true);
        for b in &bodies {
            let (seq, fin) = (b.seq.unwrap(), b.is_final.unwrap());
            let text = opener
                .open(
                    seq,
                    fin,
                    b.ephemeral_public_key.as_deref(),
                    b.ciphertext.as_deref().unwrap(),
                )
                .unwrap()
                .to_string();
            if text.is_empty() {
                continue;
            }
            let chunk: StructuredChunk = serde_json::from_str(&text).unwrap();
            for c in chunk.choices {
                let lps = c.logprobs.and_then(|l| l.content).unwrap_or_default();
                answers.push(c.index, c.delta.content.as_deref().unwrap_or(""), lps);
                if let Some(f) = c.finish_reason {
                    answers.done(c.index, f, 0, 2, 0);
                }
            }
        }
        let (got, _) = answers.finish().unwrap();
        assert_eq!(got[0].message.text_or_empty(), "Paris");
        assert_eq!(got[1].message.text_or_empty(), "London");
        assert_eq!(got[1].finish_reason, Some(FinishReason::Length));
        let toks: Vec<_> = got[0]
            .logprobs
            .as_ref()
            .unwrap()
            .content
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| t.token.clone())
            .collect();
        assert_eq!(toks, ["Pa", "ris"]);
    }

    #[test]
    fn a_bad_sealed_input_is_the_clients_fault() {
        let n = node();
        let other = NodeIdentity::from_seed(&[7; 32]);
        let (j, _) = sealed_job(&other, json!({"prompt": "x"}), None);
        let code = |j: &PendingJob| parse_job(&n, j, true).unwrap_err().fail_code();
        assert_eq!(code(&j), Some(FAIL_BAD_SEALED_INPUT));
        let (j, _) = sealed_job(&n, json!({"messages": "nope"}), None);
        assert_eq!(code(&j), Some(FAIL_BAD_SEALED_INPUT));
        let (j, _) = sealed_job(&n, json!({"temperature": 1}), None);
        assert_eq!(code(&j), Some(FAIL_BAD_SEALED_INPUT));
        // A plain payload is the coordinator's, not the client's sealed input.
        assert_eq!(code(&job(json!({"temperature": 1}))), None);
        let mut other_type = job(json!({"prompt": "x"}));
        other_type.job_type = "embedding".into();
        assert_eq!(code(&other_type), None);
    }

    #[test]
    fn plain_completion_signs_the_exact_text() {
        let n = node();
        let chat = parse_job(&n, &job(json!({"prompt":"x"})), true).unwrap();
        let body = complete_body(&n, &chat, "ok", Usage::new(1, 1), FinishReason::Length).unwrap();
        let text = body.encrypted_result.as_deref().unwrap();
        assert!(text
            .starts_with(r#"{"content":"ok","model":"smollm2-135m","usage":{"prompt_tokens":1"#));
        envelope::verify_result(
            &n.ed25519_public(),
            "job-1",
            ResultKind::Plain,
            text,
            body.result_envelope_signature.as_deref(),
            Some("v1"),
        )
        .unwrap();
    }
}
