//! A Hugging Face checkpoint directory (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json) served by path. The checkpoint is
//! made here from the real SmolLM2 GGUF: weights dequantised to f16, q/k rows
//! put back in Hugging Face order (GGUF permutes them for interleaved RoPE),
//! the GGUF's vocabulary written as tokenizer.json. It must answer like the
//! GGUF does.
#![cfg(feature = "node")]

use crate::engine_support;

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use sgl::engine::model::{self, KvCache, Model, StepItem, WeightFormat};
use sgl::engine::tokenizer::TextTokenizer;
use sgl::engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest};
use sgl::proto::openai::ChatMessage;

fn hf_name(gguf: &str) -> String {
    let map = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").expect("layer tensor");
            let (layer, part) = rest.split_once('.').unwrap();
            let (base, kind) = part.rsplit_once('.').unwrap();
            let module = map.iter().find(|(g, _)| *g == base).expect("known").1;
            format!("model.layers.{layer}.{module}.{kind}")
        }
    }
}

/// Undo llama.cpp's permutation of q/k rows: GGUF row `h*hd + 2i + t` is
/// Hugging Face row `h*hd + t*hd/2 + i`.
fn unpermute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = h * hd + 2 * i + t;
                let dst = h * hd + t * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

async fn answer(model: String) -> (String, u32) {
    let mut cfg = EngineConfig::new(&model, "test-model");
    cfg.max_context = Some(512);
    let e = tokio::task::spawn_blocking(move || Engine::load(cfg))
        .await
        .unwrap()
        .expect("load");
    let req = GenerationRequest::chat(vec![ChatMessage::new(
        "user",
        "What is the capital of France?",
    )])
    .temperature(0.0)
    .max_tokens(24);
    let mut rx = e.submit(req).expect("submit");
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Done { prompt_tokens, .. } => return (text, prompt_tokens),
            GenerationEvent::Error { message } => panic!("{message}"),
        }
    }
    panic!("no Done")
}

#[tokio::test]
async fn a_safetensors_checkpoint_answers_like_the_gguf() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let md = &content.metadata;
    let u = |k: &str| md[&format!("llama.{k}")].to_u32().unwrap() as u64;
    let (n_head, n_kv) = (
        u("attention.head_count") as usize,
        u("attention.head_count_kv") as usize,
    );
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut vocab = 0;
    let mut ffn = 0;
    for name in names {
        let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        let t = q.dequantize(&Device::Cpu).unwrap();
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            let (r, c) = t.dims2().unwrap();
            let heads = if name.ends_with("attn_q.weight") {
                n_head
            } else {
                n_kv
            };
            let w = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            Tensor::from_vec(unpermute(&w, r, c, heads), (r, c), &Device::Cpu).unwrap()
        } else {
            t
        };
        if name == "token_embd.weight" {
            vocab = t.dims2().unwrap().0;
        }
        if name == "blk.0.ffn_gate.weight" {
            ffn = t.dims2().unwrap().0;
        }
        tensors.insert(hf_name(name), t.to_dtype(DType::F16).unwrap());
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": u("embedding_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": u("block_count"),
        "intermediate_size": ffn,
        "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"].to_f32().unwrap(),
        "rope_theta": md["llama.rope.freq_base"].to_f32().unwrap(),
        "max_position_embeddings": u("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let tok = TextTokenizer::from_gguf(md).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let tc = serde_json::json!({
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": md["tokenizer.chat_template"].to_string().unwrap(),
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    drop(content);

    // The same logits as the GGUF (both end up as Q8_0 blocks; the f16 step
    // moves them a little), and the same top token, on a raw prompt.
    let ids = tok.encode("The capital of France is").unwrap();
    let (st, _) = Model::load_safetensors(dir.path(), &Device::Cpu, Some(128)).expect("load");
    let (gg, _) = Model::load_gguf(&path, &Device::Cpu, WeightFormat::Q8_0, Some(128)).unwrap();
    let last = |m: &Model| {
        let mut cache = KvCache::new(m, 64).unwrap();
        let mut items = [StepItem {
            tokens: &ids,
            cache: &mut cache,
            want_logits: true,
        }];
        model::row(&m.forward(&mut items).unwrap().unwrap(), 0).unwrap()
    };
    let (a, b) = (last(&st), last(&gg));
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    assert_eq!(argmax(&a), argmax(&b), "top token");
    assert_eq!(tok.decode(&[argmax(&a) as u32]).unwrap().trim(), "Paris");
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        diff < 0.1 * scale,
        "logits differ by {diff} (scale {scale})"
    );
    drop((st, gg));

    // Served by path through the engine: the same rendered prompt.
    let (text, prompt_tokens) = answer(dir.path().display().to_string()).await;
    let (gguf_text, gguf_prompt) = answer(path.display().to_string()).await;
    assert!(!text.is_empty());
    assert_eq!(prompt_tokens, gguf_prompt, "the same rendered prompt");
    eprintln!("safetensors: {text:?}\ngguf:        {gguf_text:?}");
}
