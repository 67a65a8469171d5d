//! The transformer forward for the llama family (Llama, SmolLM, Mistral-style)
//! and Qwen2, written for batching: one call runs a step made of several
//! sequences, each bringing its own new tokens (one for decode, a chunk for
//! prefill) and its own preallocated KV cache.
//!
//! Every row of the step is computed independently of the others (the linear
//! layers work row by row, attention per sequence), so a sequence's logits do not
//! depend on what else is in the batch. The scheduler relies on that for
//! reproducible seeded sampling.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::cpu::{CpuFormats, CpuModel, HostCache, HostItem};
use super::EngineError;

/// Architectures the forward implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM, Mistral: GGUF stores q/k permuted for interleaved RoPE.
    Llama,
    /// Qwen2: q/k/v biases, NeoX-style RoPE.
    Qwen2,
    /// A Llama-family checkpoint in Hugging Face layout (safetensors): q/k
    /// rows not permuted, so RoPE rotates halves as for Qwen2.
    LlamaHf,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub architecture: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub eps: f64,
    pub rope_theta: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

/// How the linear layers' weights are held after loading: `--requant`.
///
/// On the CPU the engine runs its own forward ([`super::cpu`]) unless
/// `native` (or, with the `cuda` feature, one of candle's formats) asks for
/// candle's; elsewhere candle runs every format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightFormat {
    /// The file's formats: on the CPU the engine's forward keeps Q4_1 and
    /// Q8_0 blocks as they are (any other matrix requantised to Q8_0); on a
    /// GPU candle runs the file's formats.
    #[default]
    Auto,
    /// Every matrix requantised to Q8_0 (the engine's forward on the CPU).
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
    /// candle's quantised matmuls in the file's formats, on any device: the
    /// reference the engine's own forward is tested against.
    #[value(alias = "none")]
    Native,
    /// candle with every matrix requantised to Q4_0.
    #[cfg(feature = "cuda")]
    #[value(name = "q4_0")]
    Q4_0,
    /// candle with every matrix requantised to Q4_1.
    #[cfg(feature = "cuda")]
    #[value(name = "q4_1")]
    Q4_1,
    /// candle with every matrix requantised to Q4_K.
    #[cfg(feature = "cuda")]
    #[value(name = "q4k", alias = "q4_k")]
    Q4K,
    /// candle with every matrix requantised to Q6_K.
    #[cfg(feature = "cuda")]
    #[value(name = "q6k", alias = "q6_k")]
    Q6K,
    /// candle with every matrix as f16.
    #[cfg(feature = "cuda")]
    #[value(name = "f16")]
    F16,
    /// candle with every matrix as f32.
    #[cfg(feature = "cuda")]
    #[value(name = "f32")]
    F32,
}

impl WeightFormat {
    /// The formats the engine's own CPU forward keeps, where it runs.
    fn cpu_formats(self) -> Option<CpuFormats> {
        match self {
            Self::Auto => Some(CpuFormats::Native),
            Self::Q8_0 => Some(CpuFormats::AllQ8),
            _ => None,
        }
    }

    /// The block format candle's matmuls get; `None` keeps the file's.
    fn candle_dtype(self) -> Option<GgmlDType> {
        Some(match self {
            Self::Auto | Self::Native => return None,
            Self::Q8_0 => GgmlDType::Q8_0,
            #[cfg(feature = "cuda")]
            Self::Q4_0 => GgmlDType::Q4_0,
            #[cfg(feature = "cuda")]
            Self::Q4_1 => GgmlDType::Q4_1,
            #[cfg(feature = "cuda")]
            Self::Q4K => GgmlDType::Q4K,
            #[cfg(feature = "cuda")]
            Self::Q6K => GgmlDType::Q6K,
            #[cfg(feature = "cuda")]
            Self::F16 => GgmlDType::F16,
            #[cfg(feature = "cuda")]
            Self::F32 => GgmlDType::F32,
        })
    }
}

/// A linear layer: output-row blocks (q, k, v say), each one of candle's
/// quantised matmuls; outputs concatenated.
struct Linear(Vec<QMatMul>);

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.0.as_slice() {
            [one] => one.forward(x),
            many => {
                let outs = many
                    .iter()
                    .map(|q| q.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    o: Linear,
    ffn_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// The forward on candle tensors (any device).
struct CandleWeights {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
}

enum Backend {
    Candle(CandleWeights),
    /// The engine's own CPU forward (`cpu.rs`).
    Cpu(Box<CpuModel>),
}

/// A loaded model.
pub struct Model {
    pub cfg: ModelConfig,
    backend: Backend,
    device: Device,
    /// Bytes of weights one decode step reads (every linear layer and norm;
    /// the embedding contributes one row only).
    pub weight_bytes_per_token: u64,
    /// The formats of the linear layers after loading, for reports.
    pub weight_formats: Vec<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn ce(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.to_string())
}

/// One sequence's KV cache, allocated for a capacity and written in place:
/// on the model's device, per layer a K and a V tensor of
/// `[kv_heads, capacity, head_dim]`; for the CPU forward, host buffers.
pub struct KvCache {
    store: KvStore,
    len: usize,
    cap: usize,
}

enum KvStore {
    Tensors { k: Vec<Tensor>, v: Vec<Tensor> },
    Host(HostCache),
}

impl KvCache {
    pub fn new(model: &Model, capacity: usize) -> Result<Self, EngineError> {
        let c = &model.cfg;
        let store = match &model.backend {
            Backend::Cpu(_) => KvStore::Host(HostCache::new(c, capacity)),
            Backend::Candle(_) => {
                let shape = (c.n_kv_head, capacity, c.head_dim);
                let mut k = Vec::with_capacity(c.n_layer);
                let mut v = Vec::with_capacity(c.n_layer);
                for _ in 0..c.n_layer {
                    k.push(Tensor::zeros(shape, DType::F32, &model.device).map_err(ce)?);
                    v.push(Tensor::zeros(shape, DType::F32, &model.device).map_err(ce)?);
                }
                KvStore::Tensors { k, v }
            }
        };
        Ok(KvCache {
            store,
            len: 0,
            cap: capacity,
        })
    }

    /// A host cache without a model, for tests of what holds caches.
    #[cfg(test)]
    pub(crate) fn host(cfg: &ModelConfig, capacity: usize) -> Self {
        KvCache {
            store: KvStore::Host(HostCache::new(cfg, capacity)),
            len: 0,
            cap: capacity,
        }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Floats one position takes in [`KvCache::export`]'s output (all
    /// layers, K and V); `None` where rows cannot be copied out: only the CPU
    /// forward's host cache can, so prefix caching runs on the CPU only.
    pub fn floats_per_position(&self) -> Option<usize> {
        match &self.store {
            KvStore::Host(h) => Some(h.floats_per_position()),
            KvStore::Tensors { .. } => None,
        }
    }

    /// Append positions `from..from + n` (all layers' K and V) to `out`.
    pub fn export(&self, from: usize, n: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
        match &self.store {
            KvStore::Host(h) if from + n <= self.len => h
                .export(from, n, out)
                .ok_or_else(|| EngineError::Model("KV export out of range".into())),
            KvStore::Host(_) => Err(EngineError::Model("KV export out of range".into())),
            KvStore::Tensors { .. } => Err(EngineError::Model(
                "KV rows are copied on the CPU forward only".into(),
            )),
        }
    }

    /// Append positions that [`KvCache::export`] gave (of another cache of the
    /// same model) after the ones held; they must fit the capacity.
    pub fn append(&mut self, data: &[f32]) -> Result<(), EngineError> {
        let KvStore::Host(h) = &mut self.store else {
            return Err(EngineError::Model(
                "KV rows are copied on the CPU forward only".into(),
            ));
        };
        let per = h.floats_per_position();
        let n = data.len().checked_div(per).unwrap_or(0);
        if n * per != data.len() || self.len + n > self.cap {
            return Err(EngineError::Model("KV rows do not fit the cache".into()));
        }
        h.import(self.len, data)
            .ok_or_else(|| EngineError::Model("KV rows do not fit the cache".into()))?;
        self.len += n;
        Ok(())
    }

    /// A copy of this cache, for a sibling completion of the same prompt
    /// (OpenAI's `n`): the prompt is computed once and its rows copied.
    pub fn fork(&self, model: &Model) -> Result<KvCache, EngineError> {
        match &self.store {
            KvStore::Host(_) => {
                let mut c = KvCache::new(model, self.cap)?;
                let mut rows = Vec::new();
                self.export(0, self.len, &mut rows)?;
                c.append(&rows)?;
                Ok(c)
            }
            KvStore::Tensors { k, v } => {
                let copy = |t: &Vec<Tensor>| -> Result<Vec<Tensor>, EngineError> {
                    t.iter().map(|x| x.copy().map_err(ce)).collect()
                };
                Ok(KvCache {
                    store: KvStore::Tensors {
                        k: copy(k)?,
                        v: copy(v)?,
                    },
                    len: self.len,
                    cap: self.cap,
                })
            }
        }
    }

    /// Forget every position (the buffers stay).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Make room for `needed` positions. The buffers grow by doubling (one copy
    /// per doubling), so a long generation costs O(n) copying in total rather
    /// than a concatenation every step.
    pub fn reserve(&mut self, needed: usize, max: usize) -> Result<(), EngineError> {
        if needed <= self.cap {
            return Ok(());
        }
        if needed > max {
            return Err(EngineError::Model("sequence exceeds the context".into()));
        }
        let new_cap = needed.max(self.cap.saturating_mul(2)).min(max);
        let (k, v) = match &mut self.store {
            KvStore::Host(h) => {
                h.grow(new_cap);
                self.cap = new_cap;
                return Ok(());
            }
            KvStore::Tensors { k, v } => (k, v),
        };
        for buf in k.iter_mut().chain(v.iter_mut()) {
            let (h, _, d) = buf.dims3().map_err(ce)?;
            let grown = Tensor::zeros((h, new_cap, d), DType::F32, buf.device()).map_err(ce)?;
            if self.len > 0 {
                let old = buf
                    .narrow(1, 0, self.len)
                    .map_err(ce)?
                    .contiguous()
                    .map_err(ce)?;
                grown.slice_set(&old, 1, 0).map_err(ce)?;
            }
            *buf = grown;
        }
        self.cap = new_cap;
        Ok(())
    }
}

/// One sequence's part of a step.
pub struct StepItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Return logits for the last of `tokens`.
    pub want_logits: bool,
}

fn md_get<'a>(
    md: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<&'a gguf_file::Value, EngineError> {
    md.get(key)
        .ok_or_else(|| EngineError::Model(format!("GGUF metadata lacks {key}")))
}

impl Model {
    /// Load a GGUF file. `format` requantises the linear layers.
    pub fn load_gguf(
        path: &Path,
        device: &Device,
        format: WeightFormat,
        max_context: Option<usize>,
    ) -> Result<(Self, gguf_file::Content), EngineError> {
        let cpu_formats = format.cpu_formats().filter(|_| device.is_cpu());
        let mut file = std::fs::File::open(path)?;
        let content = gguf_file::Content::read(&mut file).map_err(ce)?;
        let md = &content.metadata;
        let architecture = md_get(md, "general.architecture")?
            .to_string()
            .map_err(ce)?
            .clone();
        let arch = match architecture.as_str() {
            "llama" | "mistral" | "smollm" | "granite" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(EngineError::Model(format!(
                    "architecture {other} is not supported (llama family and qwen2 are)"
                )))
            }
        };
        let a = architecture.as_str();
        let u = |k: &str| -> Result<usize, EngineError> {
            Ok(md_get(md, &format!("{a}.{k}"))?.to_u32().map_err(ce)? as usize)
        };
        let n_head = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let n_kv_head = u("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = u("rope.dimension_count").unwrap_or(hidden / n_head);
        let eps = md_get(md, &format!("{a}.attention.layer_norm_rms_epsilon"))?
            .to_f32()
            .map_err(ce)? as f64;
        let rope_theta = md
            .get(&format!("{a}.rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let file_ctx = u("context_length").unwrap_or(4096);
        let context_length = max_context.map_or(file_ctx, |m| m.min(file_ctx));
        let n_layer = u("block_count")?;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || head_dim % 2 != 0 {
            return Err(EngineError::Model("inconsistent head counts".into()));
        }
        let info = |name: &str| {
            content
                .tensor_infos
                .get(name)
                .and_then(|t| t.shape.dims2().ok())
                .ok_or_else(|| EngineError::Model(format!("GGUF lacks tensor {name}")))
        };
        let cfg = ModelConfig {
            arch,
            architecture,
            n_layer,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            ffn: info("blk.0.ffn_gate.weight")?.0,
            eps,
            rope_theta,
            context_length,
            vocab_size: info("token_embd.weight")?.0,
        };
        if let Some(formats) = cpu_formats {
            let mut src = super::cpu::GgufSource {
                content: &content,
                file: &mut file,
            };
            let cpu = CpuModel::load(&mut src, cfg.clone(), formats)?;
            return Ok((Model::on_cpu(cfg, cpu), content));
        }

        let cpu = Device::Cpu;
        let mut read = |name: &str| -> Result<QTensor, EngineError> {
            content.tensor(&mut file, name, &cpu).map_err(ce)
        };
        let has = |name: &str| content.tensor_infos.contains_key(name);

        let embed_q = read("token_embd.weight")?;
        let (vocab_size, emb_dim) = embed_q.shape().dims2().map_err(ce)?;
        if emb_dim != hidden {
            return Err(EngineError::Model("embedding width mismatch".into()));
        }
        let embed = embed_q
            .dequantize(&cpu)
            .map_err(ce)?
            .to_device(device)
            .map_err(ce)?;
        let mut weight_bytes: u64 = 0;
        let mut formats = std::collections::BTreeSet::new();
        let mut linear = |parts: Vec<QTensor>| -> Result<Linear, EngineError> {
            let mut mats = Vec::with_capacity(parts.len());
            for p in parts {
                let q = convert(p, format, device)?;
                weight_bytes += q.storage_size_in_bytes() as u64;
                formats.insert(format!("{:?}", q.dtype()));
                mats.push(QMatMul::from_qtensor(q).map_err(ce)?);
            }
            Ok(Linear(mats))
        };
        let mut norm_bytes: u64 = 0;
        let mut vec_f32 = |q: QTensor| -> Result<Tensor, EngineError> {
            norm_bytes += (q.shape().elem_count() * 4) as u64;
            q.dequantize(&cpu)
                .map_err(ce)?
                .to_device(device)
                .map_err(ce)
        };

        let mut layers = Vec::with_capacity(n_layer);
        let mut ffn = 0;
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let q = read(&format!("{p}.attn_q.weight"))?;
            let k = read(&format!("{p}.attn_k.weight"))?;
            let v = read(&format!("{p}.attn_v.weight"))?;
            let qkv_bias = if has(&format!("{p}.attn_q.bias")) {
                let bq = read(&format!("{p}.attn_q.bias"))?
                    .dequantize(&cpu)
                    .map_err(ce)?;
                let bk = read(&format!("{p}.attn_k.bias"))?
                    .dequantize(&cpu)
                    .map_err(ce)?;
                let bv = read(&format!("{p}.attn_v.bias"))?
                    .dequantize(&cpu)
                    .map_err(ce)?;
                Some(
                    Tensor::cat(&[bq, bk, bv], 0)
                        .map_err(ce)?
                        .to_device(device)
                        .map_err(ce)?,
                )
            } else {
                None
            };
            let gate = read(&format!("{p}.ffn_gate.weight"))?;
            ffn = gate.shape().dims2().map_err(ce)?.0;
            let up = read(&format!("{p}.ffn_up.weight"))?;
            let down = read(&format!("{p}.ffn_down.weight"))?;
            let o = read(&format!("{p}.attn_output.weight"))?;
            layers.push(Layer {
                attn_norm: vec_f32(read(&format!("{p}.attn_norm.weight"))?)?,
                qkv: linear(vec![q, k, v])?,
                qkv_bias,
                o: linear(vec![o])?,
                ffn_norm: vec_f32(read(&format!("{p}.ffn_norm.weight"))?)?,
                gate_up: linear(vec![gate, up])?,
                down: linear(vec![down])?,
            });
        }
        let norm = vec_f32(read("output_norm.weight")?)?;
        let lm_head = if has("output.weight") {
            linear(vec![read("output.weight")?])?
        } else {
            // Tied embeddings: the output projection is the embedding matrix.
            linear(vec![embed_q])?
        };
        weight_bytes += norm_bytes + (hidden * 4) as u64;

        // The shapes as read from the tensors themselves.
        let cfg = ModelConfig {
            ffn,
            vocab_size,
            ..cfg
        };
        let (cos, sin) = rope_tables(&cfg, device)?;
        let model = Model {
            cfg,
            backend: Backend::Candle(CandleWeights {
                embed,
                layers,
                norm,
                lm_head,
                cos,
                sin,
            }),
            device: device.clone(),
            weight_bytes_per_token: weight_bytes,
            weight_formats: formats.into_iter().collect(),
        };
        Ok((model, content))
    }

    /// Load a Hugging Face checkpoint directory (see `safetensors.rs`). It
    /// runs on the CPU forward with Q8_0 weights; other devices take GGUF.
    pub fn load_safetensors(
        dir: &Path,
        device: &Device,
        max_context: Option<usize>,
    ) -> Result<(Self, super::safetensors::HfCheckpoint), EngineError> {
        if !device.is_cpu() {
            return Err(EngineError::Model(
                "safetensors checkpoints run on the CPU; convert to GGUF for a GPU".into(),
            ));
        }
        let mut ck = super::safetensors::HfCheckpoint::open(dir, max_context)?;
        let cfg = ck.cfg.clone();
        let cpu = CpuModel::load(&mut ck, cfg.clone(), CpuFormats::AllQ8)?;
        Ok((Model::on_cpu(cfg, cpu), ck))
    }

    fn on_cpu(cfg: ModelConfig, cpu: CpuModel) -> Self {
        Model {
            cfg,
            weight_bytes_per_token: cpu.weight_bytes_per_token,
            weight_formats: cpu.formats.clone(),
            backend: Backend::Cpu(Box::new(cpu)),
            device: Device::Cpu,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fault for tests: panic the way a kernel bug would, inside the CPU
    /// forward's parallel section (in a worker thread's share where the team
    /// has more than one thread).
    #[cfg(test)]
    pub(crate) fn inject_panic(&self) {
        match &self.backend {
            Backend::Cpu(m) => m.inject_panic(),
            Backend::Candle(_) => panic!("injected fault"),
        }
    }

    /// Run one step. Returns logits `[n, vocab]` for the items that want them,
    /// in order.
    pub fn forward(&self, items: &mut [StepItem<'_>]) -> Result<Option<Tensor>, EngineError> {
        match &self.backend {
            Backend::Candle(w) => self.forward_candle(w, items).map_err(ce),
            Backend::Cpu(m) => {
                let mut host = Vec::with_capacity(items.len());
                for it in items.iter_mut() {
                    let past = it.cache.len;
                    if past + it.tokens.len() > it.cache.cap {
                        return Err(EngineError::Model("sequence exceeds its KV cache".into()));
                    }
                    let KvStore::Host(cache) = &mut it.cache.store else {
                        return Err(EngineError::Model("KV cache of another backend".into()));
                    };
                    host.push(HostItem {
                        tokens: it.tokens,
                        cache,
                        past,
                        want_logits: it.want_logits,
                    });
                }
                let logits = m.forward(&mut host)?;
                drop(host);
                for it in items.iter_mut() {
                    it.cache.len += it.tokens.len();
                }
                match logits {
                    None => Ok(None),
                    Some(l) => {
                        let rows = l.len() / self.cfg.vocab_size;
                        Tensor::from_vec(l, (rows, self.cfg.vocab_size), &Device::Cpu)
                            .map(Some)
                            .map_err(ce)
                    }
                }
            }
        }
    }

    fn forward_candle(
        &self,
        w: &CandleWeights,
        items: &mut [StepItem<'_>],
    ) -> candle_core::Result<Option<Tensor>> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let groups = nh / nkv;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        let mut want_rows = Vec::new();
        for it in items.iter() {
            let start = ids.len();
            let p0 = it.cache.len;
            if p0 + it.tokens.len() > it.cache.cap || p0 + it.tokens.len() > c.context_length {
                candle_core::bail!("sequence exceeds its KV cache");
            }
            ids.extend_from_slice(it.tokens);
            pos.extend((p0..p0 + it.tokens.len()).map(|p| p as u32));
            spans.push((start, it.tokens.len(), p0));
            if it.want_logits && !it.tokens.is_empty() {
                want_rows.push((ids.len() - 1) as u32);
            }
        }
        let t = ids.len();
        if t == 0 {
            return Ok(None);
        }
        let ids = Tensor::from_vec(ids, t, &self.device)?;
        let pos = Tensor::from_vec(pos, t, &self.device)?;
        let cos = w.cos.index_select(&pos, 0)?;
        let sin = w.sin.index_select(&pos, 0)?;
        let mut x = w.embed.index_select(&ids, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();

        for (li, layer) in w.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.eps as f32)?;
            let mut qkv = layer.qkv.forward(&h)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let q = qkv
                .narrow(1, 0, nh * hd)?
                .reshape((t, nh, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let k = qkv
                .narrow(1, nh * hd, nkv * hd)?
                .reshape((t, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let v = qkv
                .narrow(1, (nh + nkv) * hd, nkv * hd)?
                .reshape((t, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?;
            let (q, k) = match c.arch {
                Arch::Llama => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                Arch::Qwen2 | Arch::LlamaHf => (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                ),
            };
            let q = q.squeeze(0)?;
            let k = k.squeeze(0)?;
            let mut outs = Vec::with_capacity(items.len());
            for (it, &(start, n, p0)) in items.iter_mut().zip(spans.iter()) {
                if n == 0 {
                    continue;
                }
                let KvStore::Tensors { k: ck, v: cv } = &mut it.cache.store else {
                    candle_core::bail!("KV cache of another backend");
                };
                let k_new = k.narrow(1, start, n)?.contiguous()?;
                let v_new = v.narrow(1, start, n)?.contiguous()?;
                ck[li].slice_set(&k_new, 1, p0)?;
                cv[li].slice_set(&v_new, 1, p0)?;
                let l = p0 + n;
                let kk = ck[li].narrow(1, 0, l)?;
                let vv = cv[li].narrow(1, 0, l)?;
                // Query heads that share a KV head are stacked as extra rows, so
                // GQA needs no copy of K/V.
                let qi = q
                    .narrow(1, start, n)?
                    .contiguous()?
                    .reshape((nkv, groups * n, hd))?;
                let mut att = (qi.matmul(&kk.t()?)? * scale)?;
                if n > 1 {
                    let mut mask = vec![0f32; n * l];
                    for i in 0..n {
                        for j in (p0 + i + 1)..l {
                            mask[i * l + j] = f32::NEG_INFINITY;
                        }
                    }
                    let mask = Tensor::from_vec(mask, (n, l), &self.device)?;
                    att = att
                        .reshape((nkv, groups, n, l))?
                        .broadcast_add(&mask)?
                        .reshape((nkv, groups * n, l))?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let o = att
                    .matmul(&vv)?
                    .reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?;
                outs.push(o);
            }
            let attn = match outs.len() {
                1 => outs.swap_remove(0),
                _ => Tensor::cat(&outs, 0)?,
            };
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.eps as f32)?;
            let gu = layer.gate_up.forward(&h)?;
            let gate = gu.narrow(1, 0, c.ffn)?;
            let up = gu.narrow(1, c.ffn, c.ffn)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        for (it, &(_, n, _)) in items.iter_mut().zip(spans.iter()) {
            it.cache.len += n;
        }
        if want_rows.is_empty() {
            return Ok(None);
        }
        let nw = want_rows.len();
        let rows = Tensor::from_vec(want_rows, nw, &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &w.norm, c.eps as f32)?;
        Ok(Some(w.lm_head.forward(&last)?))
    }
}

/// Bring one weight matrix to the requested format on the device. (Parts are
/// not concatenated as raw bytes: candle's CPU storage does not round-trip
/// every block type through `from_data`.)
fn convert(q: QTensor, format: WeightFormat, device: &Device) -> Result<QTensor, EngineError> {
    let cpu = Device::Cpu;
    let src = q.dtype();
    let target = match format.candle_dtype().unwrap_or(src) {
        // The engine computes in f32; keep bf16 files as f32 matmuls.
        GgmlDType::BF16 => GgmlDType::F32,
        t => t,
    };
    if target == src && device.is_cpu() {
        return Ok(q);
    }
    let f = q.dequantize(&cpu).map_err(ce)?;
    let k = f.dims2().map_err(ce)?.1;
    if k % target.block_size() != 0 {
        return Err(EngineError::Model(format!(
            "cannot requantise a row of {k} to {target:?}"
        )));
    }
    QTensor::quantize_onto(&f, target, device).map_err(ce)
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor), EngineError> {
    let half = cfg.head_dim / 2;
    let n = cfg.context_length;
    let theta = cfg.rope_theta as f64;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / cfg.head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            // f64 angles: positions in the thousands lose digits in f32.
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), device).map_err(ce)?;
    let sin = Tensor::from_vec(sin, (n, half), device).map_err(ce)?;
    Ok((cos, sin))
}

/// The logits of one row as a vector.
pub fn row(logits: &Tensor, i: usize) -> Result<Vec<f32>, EngineError> {
    logits
        .get(i)
        .and_then(|r| r.to_dtype(DType::F32))
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(ce)
}
