//! The tokenizer: rebuilt from a GGUF's `tokenizer.ggml.*` metadata (byte-level
//! BPE as used by GPT-2, SmolLM, Llama 3 and Qwen2) or read from a
//! `tokenizer.json`; plus incremental detokenisation for streaming.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

use super::EngineError;

/// A tokenizer with the model's special tokens.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens that end generation.
    stop_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether the model expects BOS in front of the prompt (and the template
    /// does not write it).
    pub add_bos: Option<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

/// Token names that end a turn in the common chat formats.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "</s>",
];

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

fn meta_str<'a>(md: &'a HashMap<String, gguf_file::Value>, key: &str) -> Option<&'a str> {
    md.get(key)
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str())
}

fn meta_u32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

fn meta_strings(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<Vec<String>> {
    let v = md.get(key)?.to_vec().ok()?;
    v.iter()
        .map(|x| x.to_string().ok().cloned())
        .collect::<Option<Vec<_>>>()
}

/// The regex llama.cpp and Hugging Face use for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        _ => byte_level(true),
    }
}

impl TextTokenizer {
    /// Build the tokenizer from GGUF metadata. Only byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) is rebuilt; other models need a
    /// `tokenizer.json`.
    pub fn from_gguf(md: &HashMap<String, gguf_file::Value>) -> Result<Self, EngineError> {
        let model = meta_str(md, "tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not byte-level BPE; pass a tokenizer.json"
            )));
        }
        let tokens = meta_strings(md, "tokenizer.ggml.tokens")
            .ok_or_else(|| tok_err("GGUF has no tokenizer.ggml.tokens"))?;
        let merges = meta_strings(md, "tokenizer.ggml.merges")
            .ok_or_else(|| tok_err("GGUF has no tokenizer.ggml.merges"))?;
        let types: Vec<i64> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| {
                v.iter()
                    .map(|x| x.to_i32().map(i64::from).unwrap_or(1))
                    .collect()
            })
            .unwrap_or_default();
        let pre = meta_str(md, "tokenizer.ggml.pre").unwrap_or("default");

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
            // 3 = control, 4 = user defined: matched whole, never split by BPE.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3
                }));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre),
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        let inner = tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(tok_err)?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos_id = meta_u32(md, "tokenizer.ggml.bos_token_id");
        let eos_id = meta_u32(md, "tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut t = TextTokenizer {
            inner,
            stop_ids: Vec::new(),
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            add_bos: if add_bos { bos_id } else { None },
            vocab_size: tokens.len(),
        };
        t.collect_stop_ids(eos_id);
        Ok(t)
    }

    /// Read a Hugging Face `tokenizer.json` (and the special tokens from
    /// `tokenizer_config.json` beside it when present).
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(tok_err)?;
        let cfg: Option<Value> = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        let special = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let eos_token = special("eos_token");
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let vocab_size = inner.get_vocab_size(true);
        let mut t = TextTokenizer {
            inner,
            stop_ids: Vec::new(),
            bos_token: special("bos_token"),
            eos_token,
            add_bos: None,
            vocab_size,
        };
        t.collect_stop_ids(eos_id);
        Ok(t)
    }

    /// The vocabulary as a Hugging Face `tokenizer.json` document.
    pub fn to_json(&self) -> Result<String, EngineError> {
        self.inner.to_string(false).map_err(tok_err)
    }

    fn collect_stop_ids(&mut self, eos: Option<u32>) {
        let mut ids: Vec<u32> = eos.into_iter().collect();
        for name in END_OF_TURN {
            if let Some(id) = self.inner.token_to_id(name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        self.stop_ids = ids;
    }

    /// The Hugging Face tokenizer underneath, for reading the vocabulary.
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// True when this token ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encode a rendered prompt. Special tokens written in the text (such as
    /// `<|im_start|>`) are matched whole; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.add_bos {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes of one token, for `logprobs`: a byte-level BPE token (GPT-2's
    /// printable stand-ins for bytes) maps back to its bytes, so a token that
    /// holds part of a character gives that part; any other token gives its
    /// decoded text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(b) = self
            .inner
            .id_to_token(id)
            .and_then(|p| byte_level_bytes(&p))
        {
            return b;
        }
        self.inner
            .decode(&[id], false)
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    /// Decode, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, true).map_err(tok_err)
    }
}

/// Bytes GPT-2's byte-level alphabet writes as themselves; the other 68 are
/// written as U+0100 onwards, in byte order.
fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// A byte-level BPE token's bytes; `None` when a character is outside that
/// alphabet (the vocabulary is not byte-level).
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            match u8::try_from(c) {
                Ok(b) if is_printable_byte(b) => Some(b),
                Ok(_) => None,
                Err(_) => {
                    let n = c.checked_sub(256)? as usize;
                    (0..=255u8).filter(|&b| !is_printable_byte(b)).nth(n)
                }
            }
        })
        .collect()
}

/// Turns a growing list of token ids into text deltas, holding back bytes that
/// do not yet form whole UTF-8 characters.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; returns the new text, if any is complete.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        // Decoding a short window keeps this O(1) per token; the window starts
        // a few tokens back so that decoders that look at neighbours agree.
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod byte_level_tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_maps_back_to_bytes() {
        assert_eq!(byte_level_bytes("\u{120}the"), Some(b" the".to_vec()));
        assert_eq!(byte_level_bytes("\u{10A}"), Some(b"\n".to_vec()));
        // "é" is 0xC3 0xA9: both printable stand-ins.
        assert_eq!(
            byte_level_bytes("\u{C3}\u{A9}"),
            Some("é".as_bytes().to_vec())
        );
        assert_eq!(byte_level_bytes("\u{2581}the"), None);
    }
}
