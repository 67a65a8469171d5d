//! The chat job payload: the JSON object a client seals inside `enc`
//! (PROTOCOL.md §3.4) and the plain `input_payload` of a job (§6.7), with
//! sgl's extra sampling fields (`top_p`, `seed`, `stop`). The coordinator and
//! the sealed client build it; the node reads it with the rules of §6.7.
//!
//! Reading is lenient exactly where §6.7 is, because the public SDKs and
//! nodes send and expect these payloads: a missing temperature or budget gets
//! the default, an out-of-range one is clamped, a key this node does not know
//! is ignored, and an extra sgl field of the wrong type is ignored rather than
//! failing the job. Only the fields §6.7 names (`messages`, `prompt`,
//! `temperature`, `max_tokens`) fail the job when malformed.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use thiserror::Error;

use super::limits::{
    DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_MAX_TOKENS, MAX_N, MAX_STOP, MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS, MIN_TEMPERATURE,
};
use super::openai::{
    check_messages, ChatCompletionRequest, ChatMessage, ChoiceParams, InvalidRequest,
};
use std::sync::Arc;

use super::openai::response_format::{self, ResponseFormatError};
use super::openai::tools::{self, ToolsError};
use super::openai::{JsonGrammar, ToolSpec};

/// The payload of a chat job. Absent fields are not written, so a payload
/// built for a public node carries only what §3.4 shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobPayload {
    /// The conversation; when present `prompt` is not read (§6.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// A single user message, for payloads without `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::token_count"
    )]
    pub max_tokens: Option<u64>,
    /// Read when `max_tokens` is absent (newer OpenAI clients send it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::token_count"
    )]
    pub max_completion_tokens: Option<u64>,
    /// sgl extension: nucleus sampling, in (0, 1]; anything else is ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::top_p"
    )]
    pub top_p: Option<f64>,
    /// sgl extension: a fixed sampler seed; anything but a u64 is ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::seed"
    )]
    pub seed: Option<u64>,
    /// sgl extension: a string or a list of strings; written as a list.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::stop"
    )]
    pub stop: Option<Vec<String>>,
    /// Sealed streams only (§3.4): `true` asks for a stream.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::flag"
    )]
    pub stream: Option<bool>,
    /// Sealed streams only (§3.6): the request nonce, b58 of 16 random bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::text"
    )]
    pub nonce: Option<String>,
    /// sgl extension: OpenAI's `response_format`, as the client sent it.
    /// Unlike the other extras a malformed one fails the job: ignoring it
    /// would answer with text the client cannot parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// sgl extension: completions of the prompt (OpenAI's `n`), clamped to
    /// [1, [`MAX_N`]]; anything but a count is ignored. Written only above 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::count"
    )]
    pub n: Option<u64>,
    /// sgl extension: `true` asks for each token's logprob.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::flag"
    )]
    pub logprobs: Option<bool>,
    /// sgl extension: alternatives per token with `logprobs`, clamped to
    /// [0, [`MAX_TOP_LOGPROBS`]]; anything but a count is ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::count"
    )]
    pub top_logprobs: Option<u64>,
    /// sgl extension: OpenAI's `tools`, as the client sent them. Like
    /// `response_format`, a malformed one fails the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    /// sgl extension: OpenAI's `tool_choice`, as the client sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
}

/// A message after §6.7: its role and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TextMessage {
    pub role: String,
    pub content: String,
}

/// A job's request after the rules of §6.7.
#[derive(Debug, Clone, PartialEq)]
pub struct JobParams {
    pub messages: Vec<TextMessage>,
    /// Clamped to [0, 2]; default 0.7.
    pub temperature: f64,
    /// Clamped to [1, 8192]; default 2048.
    pub max_tokens: u64,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Non-empty strings, at most [`MAX_STOP`].
    pub stop: Vec<String>,
    /// The grammar `response_format` asks for; `None` for plain text.
    pub grammar: Option<Arc<JsonGrammar>>,
    /// `n`, `logprobs` and `top_logprobs`, clamped.
    pub choices: ChoiceParams,
    /// The tools and how they are called; `None` when no call is asked for.
    /// The messages already show them to the model.
    pub tools: Option<Arc<ToolSpec>>,
}

/// Why a job's payload cannot run; the node fails the job with this reason.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum JobPayloadError {
    #[error("neither messages nor prompt")]
    NoPrompt,
    #[error(transparent)]
    Messages(#[from] InvalidRequest),
    #[error(transparent)]
    ResponseFormat(#[from] ResponseFormatError),
    #[error(transparent)]
    Tools(#[from] ToolsError),
}

/// A job's completion budget under §6.7: the one asked for, else the default,
/// clamped to [1, 8192]. The coordinator quotes a sealed request with it.
pub fn job_max_tokens(requested: Option<u64>) -> u64 {
    requested
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .clamp(1, MAX_MAX_TOKENS)
}

/// A job's temperature under §6.7: the one asked for, else the default,
/// clamped to [0, 2].
pub fn job_temperature(requested: Option<f64>) -> f64 {
    match requested {
        Some(t) if t.is_finite() => t.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE),
        _ => DEFAULT_TEMPERATURE,
    }
}

impl JobPayload {
    /// The payload for a client's (validated) OpenAI request, sealed by the
    /// coordinator in plain mode or handed to a local executor: text
    /// messages, the temperature made explicit, the budget given, and for a
    /// stream the marker and its nonce.
    pub fn from_openai(
        req: &ChatCompletionRequest,
        max_tokens: u64,
        stream_nonce: Option<&str>,
    ) -> Self {
        let present = |k: &str| req.extra.get(k).filter(|v| !v.is_null()).cloned();
        JobPayload {
            messages: Some(
                req.messages
                    .iter()
                    .map(|m| {
                        let mut t = ChatMessage::new(&m.role, &m.content.text());
                        t.tool_calls = m.tool_calls.clone().filter(|c| !c.is_empty());
                        t.tool_call_id = m.tool_call_id.clone();
                        t
                    })
                    .collect(),
            ),
            prompt: None,
            temperature: Some(req.effective_temperature()),
            max_tokens: Some(max_tokens),
            max_completion_tokens: None,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop.as_ref().map(|s| s.to_vec()),
            stream: stream_nonce.map(|_| true),
            nonce: stream_nonce.map(String::from),
            response_format: req
                .extra
                .get("response_format")
                .filter(|v| !v.is_null())
                .cloned(),
            n: None,
            logprobs: None,
            top_logprobs: None,
            // Only a request that asks for a call carries its tools, so a
            // payload without one keeps the shape public nodes know (§3.4).
            tools: req
                .tool_spec()
                .ok()
                .flatten()
                .and_then(|_| present("tools")),
            tool_choice: req
                .tool_spec()
                .ok()
                .flatten()
                .and_then(|_| present("tool_choice")),
        }
        .with_choices(req.choice_params())
    }

    /// Carry `n`, `logprobs` and `top_logprobs`; a payload that asks for one
    /// completion without logprobs writes none of them, so it keeps the
    /// shape public nodes know (§3.4).
    pub fn with_choices(mut self, c: ChoiceParams) -> Self {
        self.n = (c.n > 1).then_some(u64::from(c.n));
        self.logprobs = c.logprobs.map(|_| true);
        self.top_logprobs = c.logprobs.filter(|&k| k > 0).map(u64::from);
        self
    }

    /// What the payload asks of `n`, `logprobs` and `top_logprobs`, clamped
    /// to the caps (§6.7's leniency: a payload is not refused for them).
    pub fn choices(&self) -> ChoiceParams {
        let n = self.n.unwrap_or(1).clamp(1, u64::from(MAX_N)) as u32;
        let top = self
            .top_logprobs
            .unwrap_or(0)
            .min(u64::from(MAX_TOP_LOGPROBS)) as u8;
        ChoiceParams {
            n,
            logprobs: (self.logprobs == Some(true)).then_some(top),
        }
    }

    /// Whether the payload asks for a stream (§3.6: one of three conditions).
    pub fn wants_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Apply §6.7: `messages` or else `prompt`, the message caps, defaults
    /// and clamps; extra fields as far as they make sense.
    pub fn params(&self) -> Result<JobParams, JobPayloadError> {
        let spec = tools::parse(self.tools.as_ref(), self.tool_choice.as_ref())?.map(Arc::new);
        let messages = match (&self.messages, &self.prompt) {
            (Some(m), _) => {
                check_messages(m)?;
                let rendered;
                let m = if tools::needs_rendering(m, spec.as_deref()) {
                    rendered = tools::render_messages(m, spec.as_deref());
                    &rendered
                } else {
                    m
                };
                m.iter()
                    .map(|m| TextMessage {
                        role: m.role.clone(),
                        content: m.content.text(),
                    })
                    .collect()
            }
            (None, Some(p)) => {
                let m = [ChatMessage::new("user", p)];
                tools::render_messages(&m, spec.as_deref())
                    .into_iter()
                    .map(|m| TextMessage {
                        role: m.role,
                        content: m.content.text(),
                    })
                    .collect()
            }
            (None, None) => return Err(JobPayloadError::NoPrompt),
        };
        let grammar = match &self.response_format {
            Some(v) => response_format::parse(v)?,
            None => None,
        };
        // A forced call's grammar wins over `response_format`'s.
        let grammar = spec.as_ref().and_then(|s| s.grammar()).or(grammar);
        Ok(JobParams {
            grammar,
            tools: spec,
            messages,
            temperature: job_temperature(self.temperature),
            max_tokens: job_max_tokens(self.max_tokens.or(self.max_completion_tokens)),
            top_p: self.top_p,
            seed: self.seed,
            stop: self
                .stop
                .iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .take(MAX_STOP)
                .cloned()
                .collect(),
            choices: self.choices(),
        })
    }
}

/// Field readers for the lenient fields of §6.7.
mod lenient {
    use super::*;

    /// A token count: a non-negative integer as is, a negative one as 0 and a
    /// fraction rounded down (both then clamped up to 1), `null` as absent;
    /// anything else fails the job, as §6.7 names the field.
    pub fn token_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Ok(Some(u)),
                (None, Some(_), _) => Ok(Some(0)),
                (None, None, Some(f)) if f.is_finite() => Ok(Some(f.max(0.0) as u64)),
                _ => Err(serde::de::Error::custom("max_tokens is not a number")),
            },
            _ => Err(serde::de::Error::custom("max_tokens is not a number")),
        }
    }

    /// `top_p` in (0, 1]; anything else is ignored.
    pub fn top_p<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Value::deserialize(d)?
            .as_f64()
            .filter(|p| p.is_finite() && *p > 0.0 && *p <= 1.0))
    }

    /// A u64 seed; anything else is ignored.
    pub fn seed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Value::deserialize(d)?.as_u64())
    }

    /// One string or a list (its strings kept); anything else is ignored.
    pub fn stop<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(vec![s]),
            Value::Array(a) => Some(
                a.into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        })
    }

    /// A non-negative integer; anything else is absent.
    pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Value::deserialize(d)?.as_u64())
    }

    /// A boolean; anything else is absent.
    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        Ok(Value::deserialize(d)?.as_bool())
    }

    /// A string; anything else is absent.
    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn payload(v: Value) -> JobPayload {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_sdk_payload_reads_with_defaults_and_clamps() {
        // What singularity-grid seals (§3.4).
        let p = payload(json!({"messages": [{"role": "user", "content": "hi"}],
                               "temperature": 0.7, "max_tokens": 512}));
        let j = p.params().unwrap();
        assert_eq!((j.temperature, j.max_tokens), (0.7, 512));
        let j = payload(json!({"prompt": "hi"})).params().unwrap();
        assert_eq!((j.temperature, j.max_tokens), (0.7, 2048));
        assert_eq!(j.messages[0].role, "user");
        let j = payload(json!({"prompt": "x", "temperature": 9, "max_tokens": 100000}))
            .params()
            .unwrap();
        assert_eq!((j.temperature, j.max_tokens), (2.0, 8192));
        let j = payload(json!({"prompt": "x", "temperature": -1, "max_tokens": -5}))
            .params()
            .unwrap();
        assert_eq!((j.temperature, j.max_tokens), (0.0, 1));
        let j = payload(json!({"prompt": "x", "max_tokens": 3.9, "temperature": null}))
            .params()
            .unwrap();
        assert_eq!((j.temperature, j.max_tokens), (0.7, 3));
        let j = payload(json!({"prompt": "x", "max_completion_tokens": 5}))
            .params()
            .unwrap();
        assert_eq!(j.max_tokens, 5);
    }

    #[test]
    fn tools_travel_only_when_a_call_may_be_made() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let named = json!({"type": "function", "function": {"name": "f"}});
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "x"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"}],
            "tools": tools, "tool_choice": named}))
        .unwrap();
        let p = JobPayload::from_openai(&req, 16, None);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["tools"], tools);
        assert_eq!(v["tool_choice"], named);
        assert_eq!(v["messages"][1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(v["messages"][2]["tool_call_id"], "call_1");
        let j = p.params().unwrap();
        assert!(j.tools.is_some() && j.grammar.is_some());
        assert_eq!(j.messages[0].role, "system");
        assert!(j.messages[3]
            .content
            .contains("<tool_response>\ndone\n</tool_response>"));
        // "none" or no tools: the payload keeps the shape public nodes know.
        for extra in [
            json!({"tools": tools, "tool_choice": "none"}),
            json!({"tools": []}),
        ] {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            for (k, x) in extra.as_object().unwrap() {
                body[k] = x.clone();
            }
            let req: ChatCompletionRequest = serde_json::from_value(body).unwrap();
            let v = serde_json::to_value(JobPayload::from_openai(&req, 16, None)).unwrap();
            assert!(
                v.get("tools").is_none() && v.get("tool_choice").is_none(),
                "{v}"
            );
            assert!(v["messages"][0].get("tool_calls").is_none(), "{v}");
        }
        // A malformed tool fails the job.
        let bad = payload(json!({"prompt": "x", "tools": [{"type": "function"}]}));
        assert!(matches!(bad.params(), Err(JobPayloadError::Tools(_))));
    }

    #[test]
    fn unknown_and_malformed_extras_are_ignored() {
        let p = payload(
            json!({"prompt": "x", "top_p": "high", "seed": -1, "stop": 7,
                               "stream": "yes", "nonce": 3, "logit_bias": {"1": 2}}),
        );
        let j = p.params().unwrap();
        assert_eq!((j.top_p, j.seed, j.stop.len()), (None, None, 0));
        assert!(!p.wants_stream() && p.nonce.is_none());
        let j =
            payload(json!({"prompt": "x", "top_p": 1.5, "stop": ["", "a", 1, "b", "c", "d", "e"]}))
                .params()
                .unwrap();
        assert_eq!(j.top_p, None);
        assert_eq!(j.stop, ["a", "b", "c", "d"]);
        let j = payload(json!({"prompt": "x", "top_p": 0.5, "seed": 9, "stop": "END"}))
            .params()
            .unwrap();
        assert_eq!((j.top_p, j.seed), (Some(0.5), Some(9)));
        assert_eq!(j.stop, ["END"]);
    }

    #[test]
    fn the_named_fields_fail_the_job_when_malformed() {
        for bad in [
            json!({"prompt": "x", "max_tokens": "many"}),
            json!({"prompt": "x", "temperature": "hot"}),
            json!({"prompt": 5}),
            json!({"messages": "hi"}),
            json!({"messages": [{"content": "no role"}]}),
            json!({"messages": [{"role": "user", "content": 5}]}),
        ] {
            assert!(
                serde_json::from_value::<JobPayload>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            payload(json!({"temperature": 1})).params(),
            Err(JobPayloadError::NoPrompt)
        );
        assert!(payload(json!({"messages": []})).params().is_err());
        let img = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
        assert!(payload(img).params().is_err());
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        assert_eq!(payload(parts).params().unwrap().messages[0].content, "ab");
    }

    #[test]
    fn a_built_payload_has_the_section_3_4_shape() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}],
            "stop": "x", "frobnicate": 1
        }))
        .unwrap();
        let v = serde_json::to_value(JobPayload::from_openai(&req, 64, None)).unwrap();
        assert_eq!(
            v,
            json!({"messages": [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}],
                   "temperature": 0.7, "max_tokens": 64, "stop": ["x"]})
        );
        let v = serde_json::to_value(JobPayload::from_openai(&req, 64, Some("n1"))).unwrap();
        assert_eq!(
            (v["stream"].clone(), v["nonce"].clone()),
            (json!(true), json!("n1"))
        );
        // And it reads back as what was meant.
        let back: JobPayload = serde_json::from_value(v).unwrap();
        let j = back.params().unwrap();
        assert_eq!((j.max_tokens, j.stop.clone()), (64, vec!["x".to_string()]));
        assert!(back.wants_stream());
    }

    #[test]
    fn response_format_travels_and_a_bad_one_fails_the_job() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        let v = serde_json::to_value(JobPayload::from_openai(&req, 8, None)).unwrap();
        assert_eq!(v["response_format"], json!({"type": "json_object"}));
        let back: JobPayload = serde_json::from_value(v).unwrap();
        assert!(back.params().unwrap().grammar.is_some());
        let text = payload(json!({"prompt": "x", "response_format": {"type": "text"}}));
        assert!(text.params().unwrap().grammar.is_none());
        let bad = payload(
            json!({"prompt": "x", "response_format": {"type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "a+"}}}}),
        );
        assert!(matches!(
            bad.params(),
            Err(JobPayloadError::ResponseFormat(_))
        ));
    }

    #[test]
    fn choices_travel_only_when_asked_for_and_read_leniently() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "n": 3, "logprobs": true, "top_logprobs": 2
        }))
        .unwrap();
        let v = serde_json::to_value(JobPayload::from_openai(&req, 8, None)).unwrap();
        assert_eq!(
            (
                v["n"].clone(),
                v["logprobs"].clone(),
                v["top_logprobs"].clone()
            ),
            (json!(3), json!(true), json!(2))
        );
        let back: JobPayload = serde_json::from_value(v).unwrap();
        assert_eq!(
            back.params().unwrap().choices,
            ChoiceParams {
                n: 3,
                logprobs: Some(2)
            }
        );
        let j = payload(json!({"prompt": "x", "n": 99, "logprobs": true, "top_logprobs": 50}))
            .params()
            .unwrap();
        assert_eq!(
            j.choices,
            ChoiceParams {
                n: MAX_N,
                logprobs: Some(MAX_TOP_LOGPROBS)
            }
        );
        let j = payload(json!({"prompt": "x", "n": "two", "logprobs": 1, "top_logprobs": -1}))
            .params()
            .unwrap();
        assert_eq!(j.choices, ChoiceParams::default());
    }
}
