//! Tool calls on the real SmolLM2-135M: a forced call (`tool_choice`
//! "required" or a named function) decodes to exactly one call of a declared
//! function whose arguments follow its parameters, and the engine's text
//! splits into that call. Skipped (with a message) when the model is not
//! cached; SGL_REQUIRE_MODEL=1 makes that a failure.
#![cfg(feature = "node")]

use crate::engine_support;

use serde_json::{json, Value};
use sgl::engine::{Engine, EngineConfig, EngineHandle, GenerationEvent, GenerationRequest};
use sgl::proto::openai::choices::tool_message;
use sgl::proto::openai::{ChatCompletionRequest, FinishReason};

async fn load() -> Option<EngineHandle> {
    let path = engine_support::model_path()?;
    let cfg = EngineConfig::new(path, engine_support::MODEL_ID);
    let e = tokio::task::spawn_blocking(move || Engine::load(cfg).expect("load the model"));
    Some(e.await.unwrap())
}

async fn run(engine: &EngineHandle, req: GenerationRequest) -> (String, FinishReason) {
    let mut rx = engine.submit(req).expect("submit");
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done { finish_reason, .. } => return (text, finish_reason),
            GenerationEvent::Error { message } => panic!("engine error: {message}"),
        }
    }
    panic!("no Done event");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add",
            "description": "Add two integers.",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// The arguments follow the declared parameters, checked by hand.
fn check_args(name: &str, args: &Value) {
    let o = args.as_object().unwrap_or_else(|| panic!("{args}"));
    match name {
        "get_weather" => {
            assert_eq!(o.len(), 2, "{args}");
            assert!(
                o["city"].as_str().is_some_and(|c| c.chars().count() <= 30),
                "{args}"
            );
            assert!(
                o["unit"] == "celsius" || o["unit"] == "fahrenheit",
                "{args}"
            );
        }
        "add" => {
            assert_eq!(o.len(), 2, "{args}");
            assert!(o["a"].is_i64() && o["b"].is_i64(), "{args}");
        }
        other => panic!("not a declared function: {other}"),
    }
}

#[tokio::test]
async fn a_forced_call_is_one_valid_call() {
    let Some(engine) = load().await else { return };
    let cases = [
        (json!("required"), None, "What is the weather in Paris?"),
        (
            json!({"type": "function", "function": {"name": "add"}}),
            Some("add"),
            "What is 2 plus 40?",
        ),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            Some("get_weather"),
            "Is it cold in Oslo?",
        ),
    ];
    for (seed, (choice, only, prompt)) in cases.into_iter().enumerate() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": prompt}],
            "tools": tools(), "tool_choice": choice,
            "max_tokens": 120, "temperature": 0.7, "seed": seed,
        }))
        .unwrap();
        req.validate().unwrap();
        let gen = GenerationRequest::from_openai(&req).unwrap();
        assert!(gen.grammar.is_some());
        let (text, finish) = run(&engine, gen).await;
        assert_eq!(finish, FinishReason::Stop, "{text}");
        // The text is the call's JSON and nothing else.
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let name = v["name"].as_str().unwrap_or_else(|| panic!("{text}"));
        if let Some(only) = only {
            assert_eq!(name, only, "{text}");
        }
        check_args(name, &v["arguments"]);
        let spec = req.tool_spec().unwrap();
        let (msg, finish) = tool_message(spec.as_ref(), text.clone(), Some(finish));
        assert_eq!(finish, Some(FinishReason::ToolCalls));
        assert_eq!(msg.content, None);
        let calls = msg.tool_calls.unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, name);
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert_eq!(args, v["arguments"]);
    }
}

#[tokio::test]
async fn the_tools_reach_the_prompt_and_auto_answers_in_text_or_calls() {
    let Some(engine) = load().await else { return };
    let req: ChatCompletionRequest = serde_json::from_value(json!({
        "messages": [{"role": "user", "content": "What is 2 plus 40?"}],
        "tools": tools(), "max_tokens": 60, "temperature": 0, "seed": 1,
    }))
    .unwrap();
    req.validate().unwrap();
    let gen = GenerationRequest::from_openai(&req).unwrap();
    assert!(gen.grammar.is_none());
    let sgl::engine::Prompt::Chat(msgs) = &gen.prompt else {
        panic!("not a chat prompt")
    };
    assert_eq!(msgs[0].role, "system");
    assert!(msgs[0]
        .content
        .text()
        .contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""));
    // Whatever the small model writes, the answer is text or declared calls.
    let (text, finish) = run(&engine, gen).await;
    let spec = req.tool_spec().unwrap();
    let (msg, finish) = tool_message(spec.as_ref(), text.clone(), Some(finish));
    for c in msg.tool_calls.iter().flatten() {
        assert!(
            ["get_weather", "add"].contains(&c.function.name.as_str()),
            "{text}"
        );
        assert!(serde_json::from_str::<Value>(&c.function.arguments)
            .unwrap()
            .is_object());
        assert_ne!(finish, Some(FinishReason::Stop));
    }
    if msg.tool_calls.is_none() {
        assert_eq!(msg.content.as_deref(), Some(text.as_str()));
    }
}

/// The second family's own template with tools: Qwen2.5's ChatML renders
/// the tools system turn, a forced call on its weights decodes to one valid
/// call, and an automatic answer is text or declared calls.
#[tokio::test]
async fn qwen2_renders_the_tools_and_answers_with_valid_calls() {
    let Some(path) = engine_support::catalogue_model_path(engine_support::QWEN2_MODEL_ID) else {
        return;
    };
    let cfg = EngineConfig::new(path, engine_support::QWEN2_MODEL_ID);
    let engine = tokio::task::spawn_blocking(move || Engine::load(cfg).expect("load Qwen2"))
        .await
        .unwrap();
    let request = |choice: Value| -> ChatCompletionRequest {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
            "tools": tools(), "tool_choice": choice,
            "max_tokens": 60, "temperature": 0, "seed": 1,
        }))
        .unwrap();
        req.validate().unwrap();
        req
    };

    let auto = request(json!("auto"));
    let gen = GenerationRequest::from_openai(&auto).unwrap();
    let sgl::engine::Prompt::Chat(msgs) = &gen.prompt else {
        panic!("not a chat prompt")
    };
    let rendered = engine.render_chat(msgs).unwrap();
    assert!(rendered.starts_with("<|im_start|>system\n"), "{rendered:?}");
    assert!(rendered.contains("<tools>"), "{rendered:?}");
    assert!(
        rendered.contains("\"name\": \"get_weather\""),
        "{rendered:?}"
    );
    assert!(
        rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    let (text, finish) = run(&engine, gen).await;
    let spec = auto.tool_spec().unwrap();
    let (msg, _) = tool_message(spec.as_ref(), text.clone(), Some(finish));
    for c in msg.tool_calls.iter().flatten() {
        check_args(
            &c.function.name,
            &serde_json::from_str(&c.function.arguments).unwrap(),
        );
    }
    if msg.tool_calls.is_none() {
        assert_eq!(msg.content.as_deref(), Some(text.as_str()));
    }

    let forced = request(json!({"type": "function", "function": {"name": "get_weather"}}));
    let gen = GenerationRequest::from_openai(&forced).unwrap();
    assert!(gen.grammar.is_some());
    let (text, finish) = run(&engine, gen).await;
    assert_eq!(finish, FinishReason::Stop, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["name"], "get_weather", "{text}");
    check_args("get_weather", &v["arguments"]);
}
