//! In-process inference on candle: model loading (GGUF, safetensors), tokenizer,
//! chat template, sampler, continuous-batching scheduler, KV cache, metering.
//!
//! Owns: tokens in, tokens out. May not touch: HTTP, keys, the wire protocol.
