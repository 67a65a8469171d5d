//! The engine on the real SmolLM2-135M: determinism, seeded sampling inside a
//! batch, stop strings, budgets and exact token counts, and the prefix
//! cache changing none of it. Skipped (with a message)
//! when the model is not cached; SGL_REQUIRE_MODEL=1 makes that a failure.
#![cfg(feature = "node")]

use crate::engine_support;

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use sgl::engine::model::{self, KvCache, Model, StepItem, WeightFormat};
use sgl::engine::{
    Engine, EngineConfig, EngineHandle, GenerationEvent, GenerationRequest, SubmitError,
};
use sgl::proto::openai::{ChatMessage, FinishReason};

fn engine() -> Option<&'static EngineHandle> {
    static ENGINE: OnceLock<Option<EngineHandle>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = engine_support::model_path()?;
            let mut cfg = EngineConfig::new(path, engine_support::MODEL_ID);
            // Small chunks so that the prompts here take several prefill steps.
            cfg.prefill_chunk = 16;
            // Every prompt computed in full: the tests below compare this
            // engine's answers with the prefix-caching one's.
            cfg.prefix_cache_bytes = 0;
            Some(Engine::load(cfg).expect("load the model"))
        })
        .as_ref()
}

/// The same engine with a prefix cache of its own (each test its own, so
/// that its counters count that test's requests only).
async fn cached_engine() -> Option<EngineHandle> {
    let path = engine_support::model_path()?;
    let mut cfg = EngineConfig::new(path, engine_support::MODEL_ID);
    cfg.prefill_chunk = 16;
    cfg.prefix_cache_bytes = 64 << 20;
    let e = tokio::task::spawn_blocking(move || Engine::load(cfg).expect("load the model"));
    Some(e.await.unwrap())
}

#[derive(Debug, Clone, PartialEq)]
struct Output {
    text: String,
    finish: FinishReason,
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// An output and the prompt tokens the prefix cache supplied.
async fn run_cached(engine: &EngineHandle, req: GenerationRequest) -> (Output, u32) {
    let mut rx = engine.submit(req).expect("submit");
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let out = Output {
                    text,
                    finish: finish_reason,
                    prompt_tokens,
                    completion_tokens,
                };
                return (out, cached_tokens);
            }
            GenerationEvent::Error { message } => panic!("engine error: {message}"),
        }
    }
    panic!("stream ended without Done");
}

async fn run(engine: &EngineHandle, req: GenerationRequest) -> Output {
    let mut rx = engine.submit(req).expect("submit");
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                return Output {
                    text,
                    finish: finish_reason,
                    prompt_tokens,
                    completion_tokens,
                }
            }
            GenerationEvent::Error { message } => panic!("engine error: {message}"),
        }
    }
    panic!("stream ended without Done");
}

fn ask(q: &str) -> GenerationRequest {
    GenerationRequest::chat(vec![ChatMessage::new("user", q)])
}

#[tokio::test]
async fn greedy_answer_names_paris_and_is_deterministic() {
    let Some(e) = engine() else { return };
    let req = ask("What is the capital of France?")
        .temperature(0.0)
        .max_tokens(48);
    let a = run(e, req.clone()).await;
    assert!(a.text.contains("Paris"), "answer: {:?}", a.text);
    let b = run(e, req).await;
    assert_eq!(a, b);
}

#[tokio::test]
async fn seeded_request_is_the_same_alone_and_in_a_batch_of_eight() {
    let Some(e) = engine() else { return };
    let seeded = ask("Tell me a short story about a cat.")
        .temperature(0.9)
        .top_p(0.95)
        .seed(1234)
        .max_tokens(40);
    let alone = run(e, seeded.clone()).await;
    let others = [
        "Name three colours.",
        "What is 2 + 2?",
        "Describe the sea in one sentence.",
        "Write a haiku about autumn leaves falling slowly to the ground.",
        "Who wrote Hamlet?",
        "List some fruits.",
        "What is the boiling point of water?",
    ];
    let mut tasks = Vec::new();
    for (i, q) in others.iter().enumerate() {
        let r = ask(q)
            .temperature(1.0)
            .seed(i as u64)
            .max_tokens(30 + i as u32 * 3);
        tasks.push(tokio::spawn(run(e, r)));
    }
    let in_batch = run(e, seeded).await;
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(alone, in_batch);
    // Sampling really happened: a different seed gives different text.
    let other_seed = run(
        e,
        ask("Tell me a short story about a cat.")
            .temperature(0.9)
            .top_p(0.95)
            .seed(99)
            .max_tokens(40),
    )
    .await;
    assert_ne!(alone.text, other_seed.text);
}

#[tokio::test]
async fn batched_greedy_outputs_equal_single_sequence_outputs() {
    let Some(e) = engine() else { return };
    let prompts = [
        "What is the capital of Italy?",
        "Explain photosynthesis briefly.",
        "Count from one to ten.",
        "Give me a synonym for happy.",
    ];
    let mut single = Vec::new();
    for p in prompts {
        single.push(run(e, ask(p).temperature(0.0).max_tokens(32)).await);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| tokio::spawn(run(e, ask(p).temperature(0.0).max_tokens(32))))
        .collect();
    for (t, s) in tasks.into_iter().zip(single) {
        assert_eq!(t.await.unwrap(), s);
    }
}

#[tokio::test]
async fn stop_string_ends_the_text_before_it() {
    let Some(e) = engine() else { return };
    let base = run(
        e,
        ask("What is the capital of France?")
            .temperature(0.0)
            .max_tokens(48),
    )
    .await;
    let at = base.text.find("Paris").expect("Paris in the greedy answer");
    let stopped = run(
        e,
        ask("What is the capital of France?")
            .temperature(0.0)
            .max_tokens(48)
            .stop("Paris"),
    )
    .await;
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, base.text[..at]);
    assert!(!stopped.text.contains("Paris"));
}

#[tokio::test]
async fn max_tokens_gives_length() {
    let Some(e) = engine() else { return };
    let out = run(
        e,
        ask("Write a long essay about the history of Europe.")
            .temperature(0.0)
            .max_tokens(5),
    )
    .await;
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(out.completion_tokens, 5);
}

#[tokio::test]
async fn token_counts_match_the_tokenizer() {
    let Some(e) = engine() else { return };
    let messages = vec![ChatMessage::new("user", "What is the capital of France?")];
    let req = GenerationRequest::chat(messages.clone())
        .temperature(0.0)
        .max_tokens(64);
    let out = run(e, req).await;
    let rendered = e.render_chat(&messages).unwrap();
    // The model's own template adds its default system prompt.
    assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(rendered.ends_with("<|im_start|>assistant\n"));
    let prompt = e.tokenizer().encode(&rendered).unwrap();
    assert_eq!(out.prompt_tokens as usize, prompt.len());
    assert_eq!(out.finish, FinishReason::Stop, "{out:?}");
    let completion = e.tokenizer().encode(&out.text).unwrap();
    assert_eq!(out.completion_tokens as usize, completion.len(), "{out:?}");
}

#[tokio::test]
async fn long_prompt_is_prefilled_in_chunks() {
    let Some(e) = engine() else { return };
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let out = run(
        e,
        ask(&format!("{long}\nHow many foxes are mentioned?"))
            .temperature(0.0)
            .max_tokens(8),
    )
    .await;
    assert!(out.prompt_tokens > 400, "{out:?}");
    assert!(out.completion_tokens >= 1);
}

#[tokio::test]
async fn bad_requests_are_refused_at_submit() {
    let Some(e) = engine() else { return };
    let err = |r: GenerationRequest| e.submit(r).expect_err("refused");
    assert!(matches!(
        err(GenerationRequest::chat(vec![])),
        SubmitError::InvalidRequest(_)
    ));
    assert!(matches!(
        err(GenerationRequest::chat(vec![ChatMessage::new(
            "wizard", "hi"
        )])),
        SubmitError::InvalidRequest(_)
    ));
    assert!(matches!(
        err(ask("hi").max_tokens(0)),
        SubmitError::InvalidRequest(_)
    ));
    assert!(matches!(
        err(ask("hi").max_tokens(1_000_000)),
        SubmitError::InvalidRequest(_)
    ));
    assert!(matches!(
        err(ask("hi").temperature(3.0)),
        SubmitError::InvalidRequest(_)
    ));
    let huge = "word ".repeat(9000);
    assert!(matches!(
        err(ask(&huge)),
        SubmitError::ContextLengthExceeded { .. }
    ));
}

#[tokio::test]
async fn dropped_receiver_frees_the_slot() {
    let Some(e) = engine() else { return };
    let mut req = ask("Write a very long story.")
        .temperature(0.0)
        .max_tokens(4000);
    req.ignore_eos = true;
    let mut rx = e.submit(req).unwrap();
    // Wait for the first token, then walk away.
    match rx.recv().await {
        Some(GenerationEvent::Token { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let before = e
        .metrics()
        .requests_cancelled
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(rx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while e
        .metrics()
        .requests_cancelled
        .load(std::sync::atomic::Ordering::Relaxed)
        == before
    {
        assert!(std::time::Instant::now() < deadline, "not cancelled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A system prompt of a few hundred tokens, as chat clients resend each turn.
fn system_prompt() -> String {
    let mut s = String::from(
        "You are a careful assistant for a shipping company. Answer briefly and politely. ",
    );
    for i in 0..12 {
        s.push_str(&format!(
            "Rule {i}: parcels to zone {i} leave on day {} and cost {} euros per kilogram. ",
            i % 7 + 1,
            i * 3 + 2
        ));
    }
    s
}

fn step_logits(m: &Model, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let mut items = [StepItem {
        tokens,
        cache,
        want_logits: true,
    }];
    let l = m.forward(&mut items).expect("forward").expect("logits");
    model::row(&l, 0).expect("row")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn rows(cache: &KvCache, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    cache.export(0, n, &mut out).expect("export");
    bits(&out)
}

/// The rows a cache hit restores are the rows a full prefill computes, and
/// the logits after them (prefill of the rest, then decode) are the same bit
/// for bit: whether the rest runs alone or beside another sequence's
/// prefill, and whichever chunks filled the cache.
#[test]
fn logits_after_a_cached_prefix_are_bit_identical() {
    use candle_core::Device;
    use sgl::engine::prefix::{PrefixCache, BLOCK_TOKENS};
    use sgl::engine::tokenizer::TextTokenizer;
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let (m, content) =
        Model::load_gguf(&path, &Device::Cpu, WeightFormat::Auto, None).expect("load");
    let tok = TextTokenizer::from_gguf(&content.metadata).expect("tokenizer");
    let sys = system_prompt();
    let chat = |q: &str| {
        format!("<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    };
    let a = tok
        .encode(&chat("Which day do parcels to zone 4 leave?"))
        .unwrap();
    let b = tok
        .encode(&chat("How much is a kilogram to zone 9?"))
        .unwrap();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(
        common >= 4 * BLOCK_TOKENS,
        "shared prefix of {common} tokens"
    );

    // The reference: the whole prompt in one step, then one decode step.
    let mut full = KvCache::new(&m, a.len() + 2).unwrap();
    let want = step_logits(&m, &mut full, &a);
    let next = argmax(&want);
    let want_next = step_logits(&m, &mut full, &[next]);

    // Another prompt with the same prefix fills the cache, in chunks of 16
    // (positions computed in other step shapes than the reference's).
    let mut other = KvCache::new(&m, b.len()).unwrap();
    for c in b.chunks(16) {
        step_logits(&m, &mut other, c);
    }
    let per = other.floats_per_position().expect("host KV rows");
    let mut prefix = PrefixCache::new(64 << 20, per).expect("a budget of blocks");
    prefix.insert(&b, &other).unwrap();
    assert_eq!(prefix.blocks(), b.len() / BLOCK_TOKENS);

    // A hit: whole blocks of the shared prefix, restored exactly.
    let mut hit = KvCache::new(&m, a.len() + 2).unwrap();
    let got = prefix.restore(&a, a.len() - 1, &mut hit).unwrap();
    assert_eq!(got.tokens, common / BLOCK_TOKENS * BLOCK_TOKENS);
    assert_eq!(hit.len(), got.tokens);
    assert_eq!(rows(&hit, got.tokens), rows(&full, got.tokens));

    // The rest of the prompt alone in one step, then a decode step.
    let logits = step_logits(&m, &mut hit, &a[got.tokens..]);
    assert_eq!(bits(&logits), bits(&want), "logits after the prefill");
    assert_eq!(bits(&step_logits(&m, &mut hit, &[next])), bits(&want_next));

    // The rest beside another sequence's prefill in the same step.
    let mut again = KvCache::new(&m, a.len()).unwrap();
    let got = prefix.restore(&a, a.len() - 1, &mut again).unwrap();
    let mut stranger = KvCache::new(&m, 64).unwrap();
    let stranger_tokens: Vec<u32> = (0..40).map(|i| 200 + i * 31).collect();
    let mut items = [
        StepItem {
            tokens: &stranger_tokens,
            cache: &mut stranger,
            want_logits: true,
        },
        StepItem {
            tokens: &a[got.tokens..],
            cache: &mut again,
            want_logits: true,
        },
    ];
    let l = m.forward(&mut items).unwrap().unwrap();
    assert_eq!(bits(&model::row(&l, 1).unwrap()), bits(&want), "in a batch");

    // The cache never restores the last prompt token (its logits are needed).
    let mut whole = KvCache::new(&m, b.len()).unwrap();
    let got = prefix.restore(&b, b.len() - 1, &mut whole).unwrap();
    assert!(got.tokens < b.len());
}

/// A seeded, sampled request gives the same text with the prefix cache as
/// without it, on a miss and on hits; the hits say how many prompt tokens
/// they skipped, and the metrics count them.
#[tokio::test]
async fn seeded_request_is_the_same_with_and_without_the_prefix_cache() {
    let (Some(plain), Some(cached)) = (engine(), cached_engine().await) else {
        return;
    };
    let cached = &cached;
    let sys = system_prompt();
    let req = |q: &str| {
        GenerationRequest::chat(vec![
            ChatMessage::new("system", &sys),
            ChatMessage::new("user", q),
        ])
        .temperature(0.8)
        .top_p(0.95)
        .seed(77)
        .max_tokens(24)
    };
    let q = "Tell me about zone 3.";
    let want = run(plain, req(q)).await;
    let m = cached.metrics();
    let lookups = m.prefix_cache_lookups.load(Ordering::Relaxed);
    let hits = m.prefix_cache_hits.load(Ordering::Relaxed);
    // Another question first: the system prompt is then cached.
    run_cached(cached, req("What is zone 5?")).await;
    let (first, first_cached) = run_cached(cached, req(q)).await;
    let (second, second_cached) = run_cached(cached, req(q)).await;
    assert_eq!(first, want);
    assert_eq!(second, want);
    assert!(
        first_cached > 100,
        "the system prompt is reused: {first_cached}"
    );
    assert_eq!(first_cached % 32, 0);
    // The second time the whole prompt and the reply before are cached,
    // all but the last partial block.
    assert!(second_cached >= first_cached);
    assert!(second_cached < want.prompt_tokens);
    assert!(want.prompt_tokens - second_cached <= 32, "{second_cached}");
    assert_eq!(m.prefix_cache_lookups.load(Ordering::Relaxed), lookups + 3);
    assert_eq!(m.prefix_cache_hits.load(Ordering::Relaxed), hits + 2);
    let text = m.render_prometheus("m");
    for name in [
        "sgl_prefix_cache_lookups_total",
        "sgl_prefix_cache_hits_total",
        "sgl_prefix_cache_tokens_total",
        "sgl_prefix_cache_hit_ratio",
        "sgl_prefix_cache_bytes",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

/// A chat's next turn resends the first turn's prompt and reply: the cache
/// holds the reply's rows too, and every turn answers as without the cache.
#[tokio::test]
async fn multi_turn_chat_reuses_the_previous_turn() {
    let (Some(plain), Some(cached)) = (engine(), cached_engine().await) else {
        return;
    };
    let cached = &cached;
    let sys = format!("{} (Conversation about rivers.)", system_prompt());
    let mut messages = vec![ChatMessage::new("system", &sys)];
    let mut prev_prompt = 0;
    for (turn, q) in ["Name a long river.", "Where does it flow?", "Thank you."]
        .iter()
        .enumerate()
    {
        messages.push(ChatMessage::new("user", q));
        let req = GenerationRequest::chat(messages.clone())
            .temperature(0.0)
            .max_tokens(20);
        let want = run(plain, req.clone()).await;
        let (got, cached_tokens) = run_cached(cached, req).await;
        assert_eq!(got, want, "turn {turn}");
        if turn > 0 {
            // At least the previous turn's prompt, to its last whole block.
            assert!(
                cached_tokens as usize >= prev_prompt / 32 * 32,
                "turn {turn}: {cached_tokens} of {prev_prompt}"
            );
        }
        prev_prompt = want.prompt_tokens as usize;
        messages.push(ChatMessage::new("assistant", &got.text));
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}
