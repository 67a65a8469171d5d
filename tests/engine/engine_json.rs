//! Constrained decoding on the real SmolLM2-135M: `json_schema` and
//! `json_object` outputs parse and validate, batched beside free text and
//! as `n` choices of one request, end with the value, and a budget that
//! cuts the value says `length`. Skipped (with a message) when the model is
//! not cached; SGL_REQUIRE_MODEL=1 makes that a failure.
#![cfg(feature = "node")]

use crate::engine_support;

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use sgl::engine::{Engine, EngineConfig, EngineHandle, GenerationEvent, GenerationRequest};
use sgl::proto::openai::{ChatMessage, FinishReason, JsonGrammar};

async fn load() -> Option<EngineHandle> {
    let path = engine_support::model_path()?;
    let cfg = EngineConfig::new(path, engine_support::MODEL_ID);
    let e = tokio::task::spawn_blocking(move || Engine::load(cfg).expect("load the model"));
    Some(e.await.unwrap())
}

/// The text, finish reason and completion tokens of a request.
async fn run(engine: &EngineHandle, req: GenerationRequest) -> (String, FinishReason, u32) {
    let mut rx = engine.submit(req).expect("submit");
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done {
                finish_reason,
                completion_tokens,
                ..
            } => return (text, finish_reason, completion_tokens),
            GenerationEvent::Error { message } => panic!("engine error: {message}"),
        }
    }
    panic!("no Done event");
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer"},
            "city": {"enum": ["Paris", "London", "Rome"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20},
                "maxItems": 3
            },
            "married": {"type": "boolean"},
            "height": {"type": ["number", "null"]}
        },
        "required": ["name", "age", "city", "tags", "married"],
        "additionalProperties": false
    })
}

/// `person_schema`, checked by hand.
fn check_person(v: &Value) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    for k in ["name", "age", "city", "tags", "married"] {
        assert!(o.contains_key(k), "missing {k}: {v}");
    }
    for (k, x) in o {
        let ok = match k.as_str() {
            "name" => x.as_str().is_some_and(|s| s.chars().count() <= 40),
            "age" => x.is_i64() || x.is_u64(),
            "city" => ["Paris", "London", "Rome"].iter().any(|c| x == c),
            "tags" => x
                .as_array()
                .is_some_and(|a| a.len() <= 3 && a.iter().all(Value::is_string)),
            "married" => x.is_boolean(),
            "height" => x.is_number() || x.is_null(),
            _ => false,
        };
        assert!(ok, "{k} is wrong: {v}");
    }
}

fn ask(grammar: &Arc<JsonGrammar>, seed: u64) -> GenerationRequest {
    GenerationRequest::chat(vec![
        ChatMessage::new("system", "You reply with JSON only."),
        ChatMessage::new("user", "Describe a person who lives in Paris."),
    ])
    .grammar(grammar.clone())
    .max_tokens(200)
    .temperature(0.8)
    .seed(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_parses_and_validates() {
    let Some(engine) = load().await else { return };
    let person = Arc::new(JsonGrammar::from_schema(&person_schema()).unwrap());
    let object = Arc::new(JsonGrammar::any_object());
    // Constrained sequences batched together and beside a free one.
    let free = GenerationRequest::raw("Once upon a time")
        .max_tokens(40)
        .temperature(0.0);
    let t0 = Instant::now();
    let (a, b, c, d, f) = tokio::join!(
        run(&engine, ask(&person, 1)),
        run(&engine, ask(&person, 2)),
        run(&engine, ask(&object, 3)),
        run(&engine, ask(&object, 4).temperature(0.0)),
        run(&engine, free),
    );
    let secs = t0.elapsed().as_secs_f64();
    for (text, finish, _) in [&a, &b] {
        assert_eq!(*finish, FinishReason::Stop, "{text}");
        check_person(&serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}")));
    }
    for (text, finish, _) in [&c, &d] {
        assert_eq!(*finish, FinishReason::Stop, "{text}");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{text}");
    }
    assert_eq!(f.1, FinishReason::Length);
    let tokens: u32 = [&a, &b, &c, &d, &f].iter().map(|r| r.2).sum();
    eprintln!(
        "5 sequences (4 constrained), {tokens} tokens in {secs:.2}s: {:.1} tokens/s",
        f64::from(tokens) / secs
    );

    // A budget that cuts the value: "length", and a prefix of the value.
    let (text, finish, n) = run(&engine, ask(&person, 5).max_tokens(4)).await;
    assert_eq!((finish, n), (FinishReason::Length, 4), "{text}");
    // JSON allows whitespace before the value; the model often writes a
    // newline first.
    assert!(text.trim_start().starts_with('{'), "{text:?}");

    // Scalars at the top: an integer ends on EOS or the budget, an enum as
    // soon as it is written.
    let int = Arc::new(JsonGrammar::from_schema(&json!({"type": "integer"})).unwrap());
    let (text, _, _) = run(&engine, ask(&int, 6).max_tokens(8)).await;
    assert!(text.parse::<i64>().is_ok(), "{text:?}");
    let pick = Arc::new(JsonGrammar::from_schema(&json!({"enum": ["yes", "no"]})).unwrap());
    let (text, finish, _) = run(&engine, ask(&pick, 7)).await;
    assert_eq!(finish, FinishReason::Stop);
    assert!(text == "\"yes\"" || text == "\"no\"", "{text}");
}

/// `n` completions of one constrained prompt (the engine's `n` with a
/// `json_schema`, as the grid sends it): each one's own grammar state, so
/// every choice parses and validates, and at a temperature above 0 the
/// choices are not all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_of_a_json_schema_each_validate() {
    let Some(engine) = load().await else { return };
    let person = Arc::new(JsonGrammar::from_schema(&person_schema()).unwrap());
    let mut req = ask(&person, 11).temperature(0.9);
    req.n = 4;
    let receivers = engine.submit_n(req).expect("submit");
    assert_eq!(receivers.len(), 4);
    let mut texts = Vec::new();
    for mut rx in receivers {
        let mut text = String::new();
        let finish = loop {
            match rx.recv().await.expect("a Done event") {
                GenerationEvent::Token { text: t, .. } => text.push_str(&t),
                GenerationEvent::Done { finish_reason, .. } => break finish_reason,
                GenerationEvent::Error { message } => panic!("engine error: {message}"),
            }
        };
        assert_eq!(finish, FinishReason::Stop, "{text}");
        check_person(&serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")));
        texts.push(text);
    }
    let mut distinct = texts.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > 1,
        "the choices are all the same: {texts:?}"
    );
}

/// The cost of the mask: the same greedy generation length with and without
/// a grammar (printed; the test asserts only that both run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_decoding_speed() {
    let Some(engine) = load().await else { return };
    let object = Arc::new(JsonGrammar::any_object());
    let free = GenerationRequest::chat(vec![ChatMessage::new("user", "Write a JSON object.")])
        .max_tokens(64)
        .temperature(0.0);
    let _ = run(&engine, free.clone()).await;
    let t0 = Instant::now();
    let (_, _, n_free) = run(&engine, free.clone()).await;
    let free_tps = f64::from(n_free) / t0.elapsed().as_secs_f64();
    let mut constrained = free.grammar(object);
    constrained.seed = Some(1);
    let t0 = Instant::now();
    let (text, _, n) = run(&engine, constrained).await;
    let tps = f64::from(n) / t0.elapsed().as_secs_f64();
    eprintln!(
        "free: {n_free} tokens at {free_tps:.1}/s; json_object: {n} tokens at {tps:.1}/s ({text})"
    );
    assert!(n > 0 && n_free > 0);
}
