//! OpenAI chat completion types: the request, the response, the stream chunk,
//! the model list and the error body. The node's local server, the engine's
//! callers and the coordinator's plain mode all use these, and nothing else
//! shapes an OpenAI body.
//!
//! Requests keep unknown parameters in `extra`, because the public grid forwards
//! them inside the job payload (PROTOCOL.md §5.4). [`ChatCompletionRequest::validate`]
//! is the one check every client-facing server runs on a request; it refuses
//! the OpenAI parameters no engine implements ([`UNSUPPORTED`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod choices;
pub mod json_schema;
pub mod response_format;
pub mod tools;
mod unsupported;
mod validate;

pub use choices::{ChoiceLogprobs, ChoiceParams, TokenLogprob, TopLogprob};
pub use json_schema::JsonGrammar;
pub use tools::{ToolCall, ToolCallDelta, ToolSpec};
pub use unsupported::{first_unsupported, Unsupported, UNSUPPORTED};
pub use validate::{check_messages, InvalidRequest, ROLES};

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Newer OpenAI clients send this instead of `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Every other parameter, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// The effective completion budget the caller asked for, if any.
    pub fn requested_max_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StopSequences::One(s) => vec![s.clone()],
            StopSequences::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

/// One chat message. `content` is a string or an array of parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: MessageContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's earlier calls ([`tools`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: MessageContent::Text(content.to_string()),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
    /// `null`, allowed by OpenAI for assistant messages with tool calls.
    Null(()),
}

impl Default for MessageContent {
    fn default() -> Self {
        MessageContent::Text(String::new())
    }
}

impl MessageContent {
    /// The text of the message: the string, or the text parts joined.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
            MessageContent::Null(()) => String::new(),
        }
    }

    /// The byte length of [`MessageContent::text`], without building it.
    pub fn text_len(&self) -> usize {
        match self {
            MessageContent::Text(s) => s.len(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .map(str::len)
                .sum(),
            MessageContent::Null(()) => 0,
        }
    }

    /// True when any part is not text (an image, say).
    pub fn has_non_text_parts(&self) -> bool {
        matches!(self, MessageContent::Parts(p) if p.iter().any(|p| p.kind != "text"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Token counts, exact from the engine.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// What OpenAI reports of the prompt: the tokens served from the prefix
    /// cache. Absent where the server does not say (the grid's signed usage
    /// covers the three counts above only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose computation a cached prefix saved (part of
    /// `prompt_tokens`, and billed as such).
    pub cached_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With `prompt_tokens_details.cached_tokens`.
    pub fn with_cached_tokens(mut self, cached_tokens: u64) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }

    /// `total_tokens` must equal the sum (PROTOCOL.md §7d).
    pub fn is_consistent(&self) -> bool {
        self.prompt_tokens.checked_add(self.completion_tokens) == Some(self.total_tokens)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// The model called tools ([`tools`]).
    ToolCalls,
}

impl FinishReason {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// Non-stream `chat.completion`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// sgl extension §7d, plain mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
    /// sgl extension §7f: what a per-request payment (x402, MPP) credited
    /// back to the payer's credits, quote − cost, in µUSD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_micros: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Present when the request asked for `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    /// `null` when the answer is tool calls alone.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    /// A text answer.
    pub fn text(content: String) -> Self {
        AssistantMessage {
            role: "assistant".into(),
            content: Some(content),
            tool_calls: None,
        }
    }

    /// The text, empty when there is none.
    pub fn text_or_empty(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }
}

/// Streamed `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Present only on the usage event (`stream_options.include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
    /// sgl extension §7f, on the last chunk before `[DONE]`: what a per-request payment (x402, MPP) credited
    /// back to the payer's credits, quote − cost, in µUSD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_micros: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// The logprobs of the tokens of this delta, when the request asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

impl ChatCompletionChunk {
    fn with(id: &str, created: u64, model: &str, choices: Vec<ChunkChoice>) -> Self {
        ChatCompletionChunk {
            id: id.to_string(),
            object: "chat.completion.chunk".to_string(),
            created,
            model: model.to_string(),
            choices,
            usage: None,
            usage_signature: None,
            refunded_micros: None,
        }
    }

    /// The first event: the assistant role and empty content.
    pub fn role(id: &str, created: u64, model: &str) -> Self {
        let delta = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            tool_calls: None,
        };
        Self::first_choice(id, created, model, delta)
    }

    /// A content delta.
    pub fn content(id: &str, created: u64, model: &str, text: &str) -> Self {
        let delta = Delta {
            role: None,
            content: Some(text.to_string()),
            tool_calls: None,
        };
        Self::first_choice(id, created, model, delta)
    }

    /// A delta of whole tool calls.
    pub fn tool_calls(id: &str, created: u64, model: &str, calls: Vec<ToolCallDelta>) -> Self {
        let delta = Delta {
            role: None,
            content: None,
            tool_calls: Some(calls),
        };
        Self::first_choice(id, created, model, delta)
    }

    /// A chunk of one delta for the only choice, unfinished.
    fn first_choice(id: &str, created: u64, model: &str, delta: Delta) -> Self {
        let choice = ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: None,
        };
        Self::with(id, created, model, vec![choice])
    }

    /// The closing event: an empty delta and the finish reason.
    pub fn finish(id: &str, created: u64, model: &str, reason: FinishReason) -> Self {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(reason),
        };
        Self::with(id, created, model, vec![choice])
    }

    /// The usage event: no choices, only usage (OpenAI's rule).
    pub fn usage(id: &str, created: u64, model: &str, usage: Usage) -> Self {
        let mut c = Self::with(id, created, model, vec![]);
        c.usage = Some(usage);
        c
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
}

/// The OpenAI error body: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, when there is one (OpenAI's `param`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorResponse {
    pub fn new(message: impl Into<String>, kind: &str, code: &str) -> Self {
        ErrorResponse {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: None,
                code: Some(code.to_string()),
            },
        }
    }

    /// The same body naming the parameter at fault.
    pub fn with_param(mut self, param: Option<String>) -> Self {
        self.error.param = param;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_unknown_parameters() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logit_bias":{"1":2},"stream":true,"stream_options":{"include_usage":true}}"#;
        let req: ChatCompletionRequest = serde_json::from_str(body).unwrap();
        assert!(req.is_stream());
        assert!(req.include_usage());
        assert!(req.extra.contains_key("logit_bias"));
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["logit_bias"]["1"], 2);
    }

    #[test]
    fn content_parts_and_null() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap();
        assert_eq!(m.content.text(), "a");
        assert!(m.content.has_non_text_parts());
        let m: ChatMessage =
            serde_json::from_str(r#"{"role":"assistant","content":null}"#).unwrap();
        assert_eq!(m.content.text(), "");
    }

    #[test]
    fn usage_reports_cached_tokens_only_when_known() {
        let plain = serde_json::to_value(Usage::new(2, 3)).unwrap();
        assert!(plain.get("prompt_tokens_details").is_none());
        let cached = Usage::new(40, 3).with_cached_tokens(32);
        let v = serde_json::to_value(cached).unwrap();
        assert_eq!(v["prompt_tokens_details"]["cached_tokens"], 32);
        assert_eq!(serde_json::from_value::<Usage>(v).unwrap(), cached);
    }

    #[test]
    fn chunk_shapes() {
        let c = ChatCompletionChunk::usage("id", 1, "m", Usage::new(2, 3));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
        assert_eq!(v["usage"]["total_tokens"], 5);
        let f = serde_json::to_value(ChatCompletionChunk::finish(
            "id",
            1,
            "m",
            FinishReason::Length,
        ))
        .unwrap();
        assert_eq!(f["choices"][0]["finish_reason"], "length");
        assert_eq!(f["choices"][0]["delta"], serde_json::json!({}));
    }
}
