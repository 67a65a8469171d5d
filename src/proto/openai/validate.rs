//! The one check of a client's chat request, OpenAI's rules with the
//! protocol's caps: every client-facing server (the coordinator's plain mode,
//! `sgl node serve` with any engine) runs it before anything else, so the same
//! body gets the same answer wherever it is sent. OpenAI parameters no engine
//! implements are refused ([`super::unsupported`]); parameters that are not
//! OpenAI's are not, and are kept in [`ChatCompletionRequest::extra`].
//!
//! The message checks (count, bytes, text only) are shared with a job's
//! payload ([`crate::proto::job`]), which is otherwise lenient (§6.7).

use thiserror::Error;

use std::sync::Arc;

use super::response_format::{self, ResponseFormatError};
use super::tools::{self, ToolSpec, ToolsError};
use super::{ChatCompletionRequest, ChatMessage, ErrorResponse, JsonGrammar};
use crate::proto::limits::{
    DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_MAX_TOKENS, MAX_MESSAGES, MAX_MESSAGE_BYTES,
    MAX_N, MAX_STOP, MAX_STOP_LEN, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, MIN_TEMPERATURE,
};

/// Roles a message may have. `developer` is OpenAI's newer name for
/// `system`; a chat template that does not know it renders it as `system`.
pub const ROLES: &[&str] = &["system", "user", "assistant", "developer", "tool"];

/// Why a chat request is refused: HTTP 400, OpenAI type
/// `invalid_request_error`, code [`InvalidRequest::CODE`], whichever server
/// answers. The text names the field, never echoes more than a short role.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum InvalidRequest {
    #[error("messages must not be empty")]
    NoMessages,
    #[error("at most {MAX_MESSAGES} messages are allowed, got {0}")]
    TooManyMessages(usize),
    #[error("messages exceed {MAX_MESSAGE_BYTES} bytes of roles and contents")]
    MessagesTooLarge,
    #[error(
        "messages[{index}].role {role:?} is not one of system, user, assistant, developer, tool"
    )]
    UnknownRole { index: usize, role: String },
    #[error("messages[{0}] has non-text content; only text content parts are supported")]
    NonTextContent(usize),
    #[error("temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")]
    Temperature,
    #[error("top_p must be in (0, 1]")]
    TopP,
    #[error("max_tokens must be between 1 and {MAX_MAX_TOKENS}")]
    MaxTokens,
    #[error("at most {MAX_STOP} stop sequences are allowed")]
    TooManyStops,
    #[error("stop sequences must be 1 to {MAX_STOP_LEN} bytes")]
    StopLength,
    /// `response_format` is malformed or its schema uses what constrained
    /// decoding does not follow; the parameter is the keyword at fault.
    #[error("{0}")]
    ResponseFormat(ResponseFormatError),
    /// `tools` or `tool_choice` is malformed, over its caps, or names a
    /// function that is not declared.
    #[error("{0}")]
    Tools(ToolsError),
    #[error("n must be an integer between 1 and {MAX_N}")]
    N,
    #[error("logprobs must be a boolean")]
    Logprobs,
    #[error("top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}")]
    TopLogprobs,
    #[error("logprobs must be set to true if top_logprobs is used")]
    TopLogprobsWithoutLogprobs,
    #[error(
        "unsupported parameter: {param:?} is not implemented by this server's engine; send {accepted}, null, or leave it out"
    )]
    Unsupported {
        param: &'static str,
        accepted: &'static str,
    },
}

impl InvalidRequest {
    /// The HTTP status of every refusal.
    pub const STATUS: u16 = 400;
    /// The OpenAI error type of every refusal.
    pub const KIND: &'static str = "invalid_request_error";
    /// The error code of every refusal but [`InvalidRequest::Unsupported`].
    pub const CODE: &'static str = "invalid_request";
    /// The error code of [`InvalidRequest::Unsupported`], OpenAI's own.
    pub const UNSUPPORTED_CODE: &'static str = "unsupported_parameter";

    /// The error code of this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidRequest::Unsupported { .. } => Self::UNSUPPORTED_CODE,
            _ => Self::CODE,
        }
    }

    /// The parameter at fault (OpenAI's `param`).
    pub fn param(&self) -> String {
        match self {
            InvalidRequest::NoMessages
            | InvalidRequest::TooManyMessages(_)
            | InvalidRequest::MessagesTooLarge => "messages".into(),
            InvalidRequest::UnknownRole { index, .. } => format!("messages[{index}].role"),
            InvalidRequest::NonTextContent(i) => format!("messages[{i}].content"),
            InvalidRequest::Temperature => "temperature".into(),
            InvalidRequest::TopP => "top_p".into(),
            InvalidRequest::MaxTokens => "max_tokens".into(),
            InvalidRequest::TooManyStops | InvalidRequest::StopLength => "stop".into(),
            InvalidRequest::N => "n".into(),
            InvalidRequest::Logprobs => "logprobs".into(),
            InvalidRequest::TopLogprobs | InvalidRequest::TopLogprobsWithoutLogprobs => {
                "top_logprobs".into()
            }
            InvalidRequest::Unsupported { param, .. } => (*param).into(),
            InvalidRequest::ResponseFormat(e) => e.param(),
            InvalidRequest::Tools(e) => e.param(),
        }
    }

    /// The OpenAI error body (§1.5).
    pub fn to_response(&self) -> ErrorResponse {
        ErrorResponse::new(self.to_string(), Self::KIND, self.code()).with_param(Some(self.param()))
    }
}

/// The checks a chat's messages get everywhere, a client's request and a
/// job's payload alike (§6.7): not empty, at most [`MAX_MESSAGES`], at most
/// [`MAX_MESSAGE_BYTES`] of roles plus texts, text content only. Roles are
/// not checked here: a job's are the client's business (§6.7).
pub fn check_messages(messages: &[ChatMessage]) -> Result<(), InvalidRequest> {
    if messages.is_empty() {
        return Err(InvalidRequest::NoMessages);
    }
    if messages.len() > MAX_MESSAGES {
        return Err(InvalidRequest::TooManyMessages(messages.len()));
    }
    let mut total = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if m.content.has_non_text_parts() {
            return Err(InvalidRequest::NonTextContent(i));
        }
        total = total
            .saturating_add(m.role.len())
            .saturating_add(m.content.text_len());
        if total > MAX_MESSAGE_BYTES {
            return Err(InvalidRequest::MessagesTooLarge);
        }
    }
    Ok(())
}

impl ChatCompletionRequest {
    /// Refuse what OpenAI would refuse with 400, and what exceeds the
    /// protocol's caps. `model` is not checked: a server with one model may
    /// default it, the coordinator requires it to route.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        check_messages(&self.messages)?;
        if let Some((index, m)) = self
            .messages
            .iter()
            .enumerate()
            .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
        {
            return Err(InvalidRequest::UnknownRole {
                index,
                role: m.role.chars().take(32).collect(),
            });
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t)) {
                return Err(InvalidRequest::Temperature);
            }
        }
        if let Some(p) = self.top_p {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(InvalidRequest::TopP);
            }
        }
        if let Some(n) = self.requested_max_tokens() {
            if !(1..=MAX_MAX_TOKENS).contains(&n) {
                return Err(InvalidRequest::MaxTokens);
            }
        }
        let stops = self.stop.as_ref().map(|s| s.to_vec()).unwrap_or_default();
        if stops.len() > MAX_STOP {
            return Err(InvalidRequest::TooManyStops);
        }
        if stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(InvalidRequest::StopLength);
        }
        super::choices::check(self)?;
        // What no engine implements is refused by name, never dropped.
        if let Some(p) = super::first_unsupported(&self.extra) {
            return Err(InvalidRequest::Unsupported {
                param: p.name,
                accepted: p.accepted,
            });
        }
        self.response_grammar()?;
        self.tool_spec()?;
        Ok(())
    }

    /// The tools the request declares and how it wants them called; `None`
    /// when it asks for no call.
    pub fn tool_spec(&self) -> Result<Option<Arc<ToolSpec>>, InvalidRequest> {
        tools::parse(self.extra.get("tools"), self.extra.get("tool_choice"))
            .map(|s| s.map(Arc::new))
            .map_err(InvalidRequest::Tools)
    }

    /// The grammar the output follows: a forced tool call's, else
    /// `response_format`'s.
    pub fn output_grammar(&self) -> Result<Option<Arc<JsonGrammar>>, InvalidRequest> {
        match self.tool_spec()?.and_then(|s| s.grammar()) {
            Some(g) => Ok(Some(g)),
            None => self.response_grammar(),
        }
    }

    /// The messages a chat template gets ([`tools::render_messages`]).
    pub fn prompt_messages(&self) -> Result<Vec<ChatMessage>, InvalidRequest> {
        let spec = self.tool_spec()?;
        if !tools::needs_rendering(&self.messages, spec.as_deref()) {
            return Ok(self.messages.clone());
        }
        Ok(tools::render_messages(&self.messages, spec.as_deref()))
    }

    /// Whether the answer comes back as structured choices (sgl extension):
    /// `n`, `logprobs` or tools.
    pub fn wants_structured_reply(&self) -> bool {
        self.choice_params().is_extended() || matches!(self.tool_spec(), Ok(Some(_)))
    }

    /// The grammar `response_format` asks the output to follow; `None` for
    /// plain text.
    pub fn response_grammar(&self) -> Result<Option<Arc<JsonGrammar>>, InvalidRequest> {
        match self.extra.get("response_format") {
            None => Ok(None),
            Some(v) => response_format::parse(v).map_err(InvalidRequest::ResponseFormat),
        }
    }

    /// The completion budget: the one asked for, else [`DEFAULT_MAX_TOKENS`]
    /// (an engine lowers it further to the room its context leaves).
    pub fn effective_max_tokens(&self) -> u64 {
        self.requested_max_tokens().unwrap_or(DEFAULT_MAX_TOKENS)
    }

    /// The temperature: the one asked for, else [`DEFAULT_TEMPERATURE`].
    pub fn effective_temperature(&self) -> f64 {
        self.temperature.unwrap_or(DEFAULT_TEMPERATURE)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn req(body: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn user() -> serde_json::Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn openai_edge_cases() {
        let ok = |b: serde_json::Value| req(b).validate();
        assert_eq!(
            ok(
                json!({"messages": [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}]})
            ),
            Ok(())
        );
        assert_eq!(
            ok(json!({"messages": user(), "frobnicate": {"x": 1}, "logit_bias": {}})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"messages": user(), "temperature": 2.5})),
            Err(InvalidRequest::Temperature)
        );
        assert_eq!(ok(json!({"messages": user(), "temperature": 2})), Ok(()));
        assert_eq!(
            ok(json!({"messages": user(), "stop": ["a", "b", "c", "d", "e"]})),
            Err(InvalidRequest::TooManyStops)
        );
        assert_eq!(ok(json!({"messages": user(), "stop": "a"})), Ok(()));
        assert_eq!(
            ok(json!({"messages": user(), "stop": [""]})),
            Err(InvalidRequest::StopLength)
        );
        let many: Vec<_> = (0..10_000)
            .map(|_| json!({"role": "user", "content": "x"}))
            .collect();
        assert_eq!(
            ok(json!({ "messages": many })),
            Err(InvalidRequest::TooManyMessages(10_000))
        );
        assert_eq!(ok(json!({"messages": []})), Err(InvalidRequest::NoMessages));
        assert!(matches!(
            ok(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            Err(InvalidRequest::UnknownRole { index: 0, .. })
        ));
        for n in [0, 8193] {
            assert_eq!(
                ok(json!({"messages": user(), "max_tokens": n})),
                Err(InvalidRequest::MaxTokens)
            );
        }
        assert_eq!(
            ok(json!({"messages": user(), "max_completion_tokens": 9000})),
            Err(InvalidRequest::MaxTokens)
        );
        assert_eq!(
            ok(json!({"messages": user(), "top_p": 0})),
            Err(InvalidRequest::TopP)
        );
        assert_eq!(ok(json!({"messages": user(), "n": 2})), Ok(()));
        assert_eq!(
            ok(json!({"messages": user(), "n": 9})),
            Err(InvalidRequest::N)
        );
        assert_eq!(ok(json!({"messages": user(), "n": 1})), Ok(()));
        assert_eq!(
            ok(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
            ),
            Err(InvalidRequest::NonTextContent(0))
        );
    }

    #[test]
    fn defaults_are_the_protocol_defaults() {
        let r = req(json!({ "messages": user() }));
        assert_eq!(r.effective_max_tokens(), DEFAULT_MAX_TOKENS);
        assert_eq!(r.effective_temperature(), DEFAULT_TEMPERATURE);
        let r = req(json!({"messages": user(), "max_completion_tokens": 7, "temperature": 0}));
        assert_eq!(
            (r.effective_max_tokens(), r.effective_temperature()),
            (7, 0.0)
        );
    }

    #[test]
    fn message_bytes_are_capped() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let r = req(json!({"messages": [{"role": "user", "content": big}]}));
        assert_eq!(r.validate(), Err(InvalidRequest::MessagesTooLarge));
    }

    #[test]
    fn unimplemented_parameters_are_refused_by_name() {
        let refused = [
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!({"name": "f"})),
            ("logit_bias", json!({"50256": -100})),
            ("frequency_penalty", json!(0.5)),
            ("presence_penalty", json!(-1)),
            ("modalities", json!(["text", "audio"])),
            ("audio", json!({"voice": "alloy", "format": "wav"})),
            ("prediction", json!({"type": "content", "content": "x"})),
            ("web_search_options", json!({})),
            ("reasoning_effort", json!("low")),
            ("verbosity", json!("low")),
            ("service_tier", json!("flex")),
            ("store", json!(true)),
        ];
        assert_eq!(refused.len(), crate::proto::openai::UNSUPPORTED.len());
        for (name, value) in refused {
            let mut body = json!({"messages": user()});
            body[name] = value;
            let e = req(body).validate().unwrap_err();
            assert_eq!(e.code(), "unsupported_parameter", "{name}");
            assert_eq!(e.param(), name);
            assert!(e.to_string().contains(name), "{e}");
            let v = serde_json::to_value(e.to_response()).unwrap();
            assert_eq!(v["error"]["param"], name);
        }
        let noops = json!({
            "messages": user(), "n": 1, "logprobs": false, "top_logprobs": null,
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "functions": [], "function_call": "auto", "logit_bias": {},
            "frequency_penalty": 0, "presence_penalty": 0.0, "modalities": ["text"],
            "audio": null, "verbosity": "medium", "service_tier": "auto", "store": false,
            "parallel_tool_calls": true, "user": "u-1", "metadata": {"k": "v"},
        });
        assert_eq!(req(noops).validate(), Ok(()));
    }

    #[test]
    fn tools_are_checked_and_the_fault_named() {
        let tools = json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]);
        let with = |extra: serde_json::Value| {
            let mut b = json!({"messages": user(), "tools": tools});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            req(b)
        };
        assert_eq!(with(json!({})).validate(), Ok(()));
        assert!(with(json!({"tool_choice": "required"}))
            .output_grammar()
            .unwrap()
            .is_some());
        assert!(with(json!({})).output_grammar().unwrap().is_none());
        let e = with(json!({"tool_choice": {"type": "function", "function": {"name": "g"}}}))
            .validate()
            .unwrap_err();
        assert_eq!(
            (e.code(), e.param().as_str()),
            ("invalid_request", "tool_choice")
        );
        let e = with(json!({"tool_choice": "always"}))
            .validate()
            .unwrap_err();
        assert_eq!(e.param(), "tool_choice");
        let e = req(json!({"messages": user(), "tools": "f"}))
            .validate()
            .unwrap_err();
        assert_eq!(e.param(), "tools");
        // A follow-up turn: the assistant's call and the tool's result.
        let turn = req(json!({"messages": [
            {"role": "user", "content": "x?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"}], "tools": tools}));
        assert_eq!(turn.validate(), Ok(()));
        let p = turn.prompt_messages().unwrap();
        assert_eq!(p.len(), 4);
        assert!(p[3]
            .content
            .text()
            .contains("<tool_response>\n2\n</tool_response>"));
    }

    #[test]
    fn response_format_is_checked_and_its_keywords_named() {
        let with = |rf: serde_json::Value| req(json!({"messages": user(), "response_format": rf}));
        assert!(with(json!({"type": "json_object"})).validate().is_ok());
        let e = with(json!({"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}}}))
        .validate()
        .unwrap_err();
        assert_eq!(
            (e.code(), e.param()),
            ("invalid_request", "maximum".to_string())
        );
        assert!(e.to_string().contains("\"maximum\""), "{e}");
        let e = with(json!({"type": "yaml"})).validate().unwrap_err();
        assert_eq!(e.param(), "response_format");
    }

    #[test]
    fn refusals_have_the_openai_shape() {
        let v = serde_json::to_value(InvalidRequest::Temperature.to_response()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"));
    }
}
