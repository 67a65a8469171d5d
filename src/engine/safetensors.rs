//! Llama-family and Qwen2 checkpoints in Hugging Face layout: a directory
//! holding `config.json`, one or more `*.safetensors` files, `tokenizer.json`
//! and usually `tokenizer_config.json` (special tokens, chat template).
//!
//! The weights (f32, f16 or bf16) are quantised to Q8_0 at load for the CPU
//! forward; names are mapped to the GGUF names that forward asks for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::cpu::qmat::QMatrix;
use super::cpu::{CpuFormats, WeightSource};
use super::model::{Arch, ModelConfig};
use super::EngineError;

/// Largest `config.json` / `tokenizer_config.json` read.
const MAX_JSON: u64 = 16 << 20;

pub struct HfCheckpoint {
    pub cfg: ModelConfig,
    /// `chat_template` from `tokenizer_config.json`.
    pub chat_template: Option<String>,
    pub tokenizer_json: PathBuf,
    tensors: HashMap<String, Tensor>,
}

/// Whether `dir` looks like a checkpoint directory.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.is_dir() && dir.join("config.json").is_file()
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_JSON {
        return Err(EngineError::Model(format!(
            "{} is larger than {MAX_JSON} bytes",
            path.display()
        )));
    }
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))
}

fn ce(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.to_string())
}

/// The GGUF tensor name the CPU forward uses, in Hugging Face's naming.
fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let (base, kind) = part.rsplit_once('.')?;
            let module = match base {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => return None,
            };
            format!("model.layers.{layer}.{module}.{kind}")
        }
    })
}

impl HfCheckpoint {
    pub fn open(dir: &Path, max_context: Option<usize>) -> Result<Self, EngineError> {
        let c = read_json(&dir.join("config.json"))?;
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" | "mistral" => Arch::LlamaHf,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(EngineError::Model(format!(
                    "model_type {other:?} is not supported (llama, mistral and qwen2 are)"
                )))
            }
        };
        let u = |k: &str| c.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let need =
            |k: &str| u(k).ok_or_else(|| EngineError::Model(format!("config.json lacks {k}")));
        let hidden = need("hidden_size")?;
        let n_head = need("num_attention_heads")?;
        let n_kv_head = u("num_key_value_heads").unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model("inconsistent head counts".into()));
        }
        let head_dim = u("head_dim").unwrap_or(hidden / n_head);
        let file_ctx = u("max_position_embeddings").unwrap_or(4096);
        let cfg = ModelConfig {
            arch,
            architecture: model_type.to_string(),
            n_layer: need("num_hidden_layers")?,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            ffn: need("intermediate_size")?,
            eps: c
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: c
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
            context_length: max_context.map_or(file_ctx, |m| m.min(file_ctx)),
            vocab_size: need("vocab_size")?,
        };
        if head_dim % 2 != 0 || cfg.n_layer == 0 {
            return Err(EngineError::Model("inconsistent config.json".into()));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Model(format!(
                "no .safetensors file in {}",
                dir.display()
            )));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(candle_core::safetensors::load(f, &Device::Cpu).map_err(ce)?);
        }
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(EngineError::Tokenizer(format!(
                "{} lacks tokenizer.json",
                dir.display()
            )));
        }
        let tc = dir.join("tokenizer_config.json");
        let chat_template = if tc.is_file() {
            read_json(&tc)?
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string)
        } else {
            None
        };
        Ok(HfCheckpoint {
            cfg,
            chat_template,
            tokenizer_json,
            tensors,
        })
    }

    fn tensor(&self, name: &str) -> Result<&Tensor, EngineError> {
        hf_name(name)
            .and_then(|n| self.tensors.get(&n))
            .ok_or_else(|| EngineError::Model(format!("checkpoint lacks the weight for {name}")))
    }
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>, EngineError> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce)
}

impl WeightSource for HfCheckpoint {
    fn has(&self, name: &str) -> bool {
        hf_name(name).is_some_and(|n| self.tensors.contains_key(&n))
    }

    fn matrix(&mut self, name: &str, _formats: CpuFormats) -> Result<QMatrix, EngineError> {
        let t = self.tensor(name)?;
        let (n, k) = t.dims2().map_err(ce)?;
        QMatrix::q8_from_f32(&to_f32(t)?, n, k)
            .map_err(|e| EngineError::Model(format!("{name}: {e}")))
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>, EngineError> {
        to_f32(self.tensor(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn names_map_to_hugging_face_layout() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_v.bias").as_deref(),
            Some("model.layers.0.self_attn.v_proj.bias")
        );
        assert_eq!(
            hf_name("blk.12.ffn_norm.weight").as_deref(),
            Some("model.layers.12.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.1.unknown.weight"), None);
    }
}
