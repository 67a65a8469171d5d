//! The OpenAI chat-completions parameters no `sgl` engine implements: the
//! one table every client-facing server checks a request against (through
//! [`super::ChatCompletionRequest::validate`]), so that such a parameter is a
//! 400 `unsupported_parameter` naming it, never silently dropped.
//!
//! A value that asks for nothing beyond what the engine does anyway (OpenAI's
//! default, such as `function_call: "none"`) is accepted, and `null` always is,
//! as OpenAI reads it as absent. When an engine learns a parameter, its row
//! goes, together with [`crate::proto::job::JobPayload::from_openai`] learning
//! to carry it.
//!
//! The parameters an engine does implement are the typed fields of
//! [`super::ChatCompletionRequest`] (`model`, `messages`, `temperature`,
//! `top_p`, `max_tokens`, `max_completion_tokens`, `seed`, `stop`, `stream`,
//! `stream_options`), `response_format`, checked by [`super::response_format`],
//! `n`, `logprobs` and `top_logprobs`, read and checked by
//! [`super::choices`], and `tools` and `tool_choice`, checked by
//! [`super::tools`]. The legacy `functions` and `function_call` stay refused:
//! clients that call functions send `tools`. Request metadata that asks nothing of the engine
//! (`user`, `metadata`, `safety_identifier`, `prompt_cache_key`) and keys that
//! are not OpenAI's (the grid's `node`, `max_price`, `require_attestation`)
//! are not in the table and are accepted, as is `parallel_tool_calls` (the
//! model may always make several calls).

use serde_json::Value;

/// One parameter of the table.
pub struct Unsupported {
    /// The parameter's name in the request body.
    pub name: &'static str,
    /// The values accepted, in words, for the refusal's message.
    pub accepted: &'static str,
    /// Whether a value changes nothing here (`null` is never passed).
    pub is_noop: fn(&Value) -> bool,
}

fn never(_: &Value) -> bool {
    false
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_empty_list(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty)
}

/// `"none"`, or `"auto"`, which with no tools also calls none.
fn no_tool_call(v: &Value) -> bool {
    matches!(v.as_str(), Some("none" | "auto"))
}

/// Shrinks as engines learn: see the module documentation.
pub const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "functions",
        accepted: "an empty list",
        is_noop: is_empty_list,
    },
    Unsupported {
        name: "function_call",
        accepted: "\"none\" or \"auto\"",
        is_noop: no_tool_call,
    },
    Unsupported {
        name: "logit_bias",
        accepted: "an empty object",
        is_noop: |v| v.as_object().is_some_and(|o| o.is_empty()),
    },
    Unsupported {
        name: "frequency_penalty",
        accepted: "0",
        is_noop: is_zero,
    },
    Unsupported {
        name: "presence_penalty",
        accepted: "0",
        is_noop: is_zero,
    },
    Unsupported {
        name: "modalities",
        accepted: "[\"text\"]",
        is_noop: |v| v.as_array().is_some_and(|a| a.iter().all(|m| m == "text")),
    },
    Unsupported {
        name: "audio",
        accepted: "null",
        is_noop: never,
    },
    Unsupported {
        name: "prediction",
        accepted: "null",
        is_noop: never,
    },
    Unsupported {
        name: "web_search_options",
        accepted: "null",
        is_noop: never,
    },
    Unsupported {
        name: "reasoning_effort",
        accepted: "null",
        is_noop: never,
    },
    Unsupported {
        name: "verbosity",
        accepted: "\"medium\"",
        is_noop: |v| v == "medium",
    },
    Unsupported {
        name: "service_tier",
        accepted: "\"auto\" or \"default\"",
        is_noop: |v| matches!(v.as_str(), Some("auto" | "default")),
    },
    Unsupported {
        name: "store",
        accepted: "false",
        is_noop: is_false,
    },
];

/// The first parameter of the table `extra` sets to a value that would ask
/// for something, in the table's order.
pub fn first_unsupported(extra: &serde_json::Map<String, Value>) -> Option<&'static Unsupported> {
    UNSUPPORTED.iter().find(|p| {
        extra
            .get(p.name)
            .is_some_and(|v| !v.is_null() && !(p.is_noop)(v))
    })
}
