//! The engine on a second model family from the catalogue: a real
//! Qwen2-architecture GGUF (Qwen2.5-Coder-0.5B-Instruct), so the qwen2 forward
//! (q/k/v biases, NeoX RoPE at theta 1e6, an untied output matrix, K-quant
//! matrices requantised on load) and its ChatML template run on real weights.
//! Kept to a few greedy tokens: the model is four times SmolLM2's size. Skipped
//! (with a message) when the model is not cached; SGL_REQUIRE_MODEL=1 makes
//! that a failure.
#![cfg(feature = "node")]

use crate::engine_support;

use sgl::engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest};
use sgl::proto::openai::{ChatMessage, FinishReason};

#[tokio::test]
async fn qwen2_greedy_answer_names_paris_and_ends_at_im_end() {
    let Some(path) = engine_support::catalogue_model_path(engine_support::QWEN2_MODEL_ID) else {
        return;
    };
    let e = Engine::load(EngineConfig::new(path, engine_support::QWEN2_MODEL_ID))
        .expect("load the Qwen2 model");
    assert_eq!(e.info().architecture, "qwen2");

    let messages = vec![ChatMessage::new("user", "What is the capital of France?")];
    // The GGUF's own template: ChatML with Qwen's default system prompt.
    let rendered = e.render_chat(&messages).unwrap();
    assert!(
        rendered.starts_with("<|im_start|>system\nYou are Qwen"),
        "{rendered:?}"
    );
    assert!(
        rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );

    let req = GenerationRequest::chat(messages)
        .temperature(0.0)
        .max_tokens(12);
    let mut rx = e.submit(req).expect("submit");
    let mut text = String::new();
    let (finish, completion_tokens) = loop {
        match rx.recv().await.expect("stream ended without Done") {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done {
                finish_reason,
                completion_tokens,
                ..
            } => break (finish_reason, completion_tokens),
            GenerationEvent::Error { message } => panic!("engine error: {message}"),
        }
    };
    assert!(text.contains("Paris"), "answer: {text:?}");
    // A short sentence that ends on the model's <|im_end|>, not on the budget:
    // the end-of-turn token was read from the GGUF and the text is not noise.
    assert_eq!(finish, FinishReason::Stop, "answer: {text:?}");
    assert!(completion_tokens < 12, "answer: {text:?}");
}
