//! The request features a node's engine may or may not implement, as a node
//! advertises them in `capabilities.features` (sgl extension to §6.5) and as
//! a plain request needs them. A public node, an older `sgl` node and the
//! echo engine advertise none: the coordinator routes a request that needs
//! one only to a node that lists it, so that no parameter is dropped.

use super::openai::{response_format, ChatCompletionRequest};

/// `response_format` other than text: constrained decoding.
pub const RESPONSE_FORMAT: &str = "response_format";
/// `n` above 1.
pub const N: &str = "n";
/// `logprobs: true` (with or without `top_logprobs`).
pub const LOGPROBS: &str = "logprobs";

/// `tools` with a `tool_choice` other than `"none"`: the tools rendered
/// into the prompt, calls parsed or forced.
pub const TOOLS: &str = "tools";

/// Every feature, in the order a refusal names the first missing one.
pub const ALL: [&str; 4] = [TOOLS, RESPONSE_FORMAT, N, LOGPROBS];

/// The features a checked request needs; each is also the name of the
/// parameter that asks for it.
pub fn required(req: &ChatCompletionRequest) -> Vec<&'static str> {
    let mut needs = Vec::new();
    if matches!(req.tool_spec(), Ok(Some(_))) {
        needs.push(TOOLS);
    }
    let structured = req
        .extra
        .get("response_format")
        .is_some_and(|v| matches!(response_format::parse(v), Ok(Some(_))));
    if structured {
        needs.push(RESPONSE_FORMAT);
    }
    let choices = req.choice_params();
    if choices.n > 1 {
        needs.push(N);
    }
    if choices.logprobs.is_some() {
        needs.push(LOGPROBS);
    }
    needs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(extra: serde_json::Value) -> ChatCompletionRequest {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_request_needs_what_it_asks_beyond_one_text_completion() {
        assert!(required(&req(json!({}))).is_empty());
        assert!(required(&req(json!({"n": 1, "logprobs": false, "top_logprobs": 0}))).is_empty());
        assert!(required(&req(json!({"response_format": {"type": "text"}}))).is_empty());
        assert!(required(&req(json!({"response_format": null}))).is_empty());
        assert_eq!(
            required(&req(json!({"response_format": {"type": "json_object"}}))),
            [RESPONSE_FORMAT]
        );
        assert_eq!(required(&req(json!({"n": 2}))), [N]);
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(required(&req(json!({"tools": tools}))), [TOOLS]);
        assert!(required(&req(json!({"tools": tools, "tool_choice": "none"}))).is_empty());
        assert_eq!(
            required(&req(json!({"logprobs": true, "top_logprobs": 3, "n": 4}))),
            [N, LOGPROBS]
        );
    }
}
