//! The node's local server (`sgl node serve`): OpenAI chat completions and
//! the model list straight from the engine, health and metrics.

use serde_json::{json, Value};

use super::build::{add_metrics_and_document, Doc, Op};
use crate::proto::openai::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelList,
};
use crate::proto::routes;

const DESCRIPTION: &str = "The SGL node's local OpenAI-compatible server (`sgl node serve`): \
no coordinator and no sealing. Errors have the OpenAI shape `{\"error\": {\"message\", \
\"type\", \"code\"}}`; a route it does not serve answers 404 with code `not_supported`.";

pub(super) fn document() -> Value {
    let mut d = Doc::default();
    let err = d.schema::<ErrorResponse>();
    let req = d.schema::<ChatCompletionRequest>();
    let resp = d.schema::<ChatCompletionResponse>();
    let chunk = d.schema::<ChatCompletionChunk>();
    let sse = d.named(
        "ChatEventStream",
        json!({"type": "string", "description": format!(
            "Server-sent events: `data: <chunk>` lines, each a ChatCompletionChunk ({}), \
             then `data: [DONE]`.",
            chunk["$ref"].as_str().unwrap_or_default())}),
    );
    d.add(
        "post",
        routes::CHAT_COMPLETIONS,
        Op::new("chat_completions", "chat", "An OpenAI chat completion")
            .body(req, true)
            .answer(
                200,
                "The answer; with `stream: true`, server-sent events",
                &[("application/json", resp), ("text/event-stream", sse)],
            )
            .errors(&[400, 404, 413, 415, 422, 429, 503], &err),
    );
    let models = d.schema::<ModelList>();
    d.add(
        "get",
        routes::MODELS,
        Op::new("list_models", "chat", "The models served")
            .json(200, "The OpenAI model list", models)
            .errors(&[503], &err),
    );
    let health = d.named(
        "NodeHealth",
        json!({"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ok", "loading", "error"]},
            "model": {"type": "string"},
            "error": {"type": "string"}}}),
    );
    d.add(
        "get",
        routes::HEALTH,
        Op::new("health", "operations", "Ready once the model has loaded")
            .json(
                200,
                "Ready: `{\"status\": \"ok\", \"model\"}`",
                health.clone(),
            )
            .json(
                503,
                "Loading, or the model failed to load: `{\"status\", \"error\"?}`",
                health,
            ),
    );
    add_metrics_and_document(&mut d);
    d.finish("SGL node local server", DESCRIPTION, json!({}))
}
