//! The transformer forward on the CPU, without a tensor library.
//!
//! A decode step of a small model is a few hundred tiny operations; run as
//! tensor ops, each allocates and dispatches, and the step costs several times
//! the weight reads that bound it. Here a step is plain loops over buffers
//! reused from step to step, the matmuls are the integer kernels of
//! [`qmat`], and the parallel sections run on a fixed [`pool::Pool`].
//!
//! Same contract as the candle forward in `model.rs`: each row of a step is
//! computed independently of the others, so a sequence's logits do not depend
//! on what else is in the batch.

mod attn;
pub mod bandwidth;
pub mod pool;
pub mod qmat;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;

use self::pool::Pool;
use self::qmat::{matmul, ActQ, QMatrix};
use super::model::{Arch, ModelConfig};
use super::EngineError;

/// Which block formats the CPU forward keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFormats {
    /// Q4_1 and Q8_0 as the file has them; anything else requantised to Q8_0.
    Native,
    /// Every matrix requantised to Q8_0.
    AllQ8,
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: QMatrix,
    qkv_bias: Option<Vec<f32>>,
    o: QMatrix,
    ffn_norm: Vec<f32>,
    gate_up: QMatrix,
    down: QMatrix,
}

/// Buffers a step needs, kept between steps.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    aq: ActQ,
    pos: Vec<usize>,
}

pub struct CpuModel {
    cfg: ModelConfig,
    embed: QMatrix,
    /// `None`: tied to the embedding.
    lm_head: Option<QMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pool: Pool,
    scratch: Mutex<Scratch>,
    pub weight_bytes_per_token: u64,
    pub formats: Vec<String>,
}

/// One sequence's KV cache for this forward: per layer, K and V as
/// `[position][kv_head][head_dim]`.
pub struct HostCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
}

impl HostCache {
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        let row = cfg.n_kv_head * cfg.head_dim;
        HostCache {
            k: (0..cfg.n_layer)
                .map(|_| vec![0f32; capacity * row])
                .collect(),
            v: (0..cfg.n_layer)
                .map(|_| vec![0f32; capacity * row])
                .collect(),
            row,
        }
    }

    /// Grow to `capacity` positions, keeping what is there.
    pub fn grow(&mut self, capacity: usize) {
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.resize(capacity * self.row, 0.0);
        }
    }

    /// Floats positions take, all layers' K and V: the size of what
    /// [`HostCache::export`] appends per position.
    pub fn floats_per_position(&self) -> usize {
        2 * self.k.len() * self.row
    }

    /// Append positions `from..from + n` to `out`, per layer its K rows then
    /// its V rows. `None` where the cache does not hold them.
    pub fn export(&self, from: usize, n: usize, out: &mut Vec<f32>) -> Option<()> {
        let (a, b) = (from * self.row, (from + n) * self.row);
        for (k, v) in self.k.iter().zip(&self.v) {
            out.extend_from_slice(k.get(a..b)?);
            out.extend_from_slice(v.get(a..b)?);
        }
        Some(())
    }

    /// Write what [`HostCache::export`] gave (any number of whole positions)
    /// at position `at`. `None` where it does not fit.
    pub fn import(&mut self, at: usize, data: &[f32]) -> Option<()> {
        let per = self.floats_per_position();
        if per == 0 || !data.len().is_multiple_of(per) {
            return None;
        }
        let span = data.len() / per * self.row;
        let a = at * self.row;
        let mut parts = data.chunks_exact(span);
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            k.get_mut(a..a + span)?.copy_from_slice(parts.next()?);
            v.get_mut(a..a + span)?.copy_from_slice(parts.next()?);
        }
        Some(())
    }
}

/// One sequence's part of a step.
pub struct HostItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut HostCache,
    /// Positions already in the cache.
    pub past: usize,
    pub want_logits: bool,
}

fn ce(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.to_string())
}

fn read_raw(
    content: &gguf_file::Content,
    file: &mut File,
    info: &gguf_file::TensorInfo,
    bytes: usize,
) -> Result<Vec<u8>, EngineError> {
    file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
    let mut buf = vec![0u8; bytes];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// Load one weight matrix in a format the kernels take.
fn load_matrix(
    content: &gguf_file::Content,
    file: &mut File,
    name: &str,
    formats: CpuFormats,
) -> Result<QMatrix, EngineError> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| EngineError::Model(format!("GGUF lacks tensor {name}")))?;
    let (n, k) = info.shape.dims2().map_err(ce)?;
    let bad = |e: qmat::QError| EngineError::Model(format!("{name}: {e}"));
    match info.ggml_dtype {
        GgmlDType::Q4_1 if formats == CpuFormats::Native && k % 64 == 0 => {
            let raw = read_raw(content, file, info, n * k / 32 * 20)?;
            QMatrix::from_gguf_q4_1(&raw, n, k).map_err(bad)
        }
        GgmlDType::Q8_0 => {
            let raw = read_raw(content, file, info, n * k / 32 * 34)?;
            QMatrix::from_gguf_q8_0(&raw, n, k).map_err(bad)
        }
        _ => {
            let t = content.tensor(file, name, &Device::Cpu).map_err(ce)?;
            let f = t
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(ce)?;
            QMatrix::q8_from_f32(&f, n, k).map_err(bad)
        }
    }
}

/// Where the CPU forward's weights come from, named as in GGUF
/// (`blk.N.attn_q.weight`, …).
pub trait WeightSource {
    fn has(&self, name: &str) -> bool;
    fn matrix(&mut self, name: &str, formats: CpuFormats) -> Result<QMatrix, EngineError>;
    fn vector(&mut self, name: &str) -> Result<Vec<f32>, EngineError>;
}

/// A GGUF file.
pub struct GgufSource<'a> {
    pub content: &'a gguf_file::Content,
    pub file: &'a mut File,
}

impl WeightSource for GgufSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn matrix(&mut self, name: &str, formats: CpuFormats) -> Result<QMatrix, EngineError> {
        load_matrix(self.content, self.file, name, formats)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>, EngineError> {
        load_vec(self.content, self.file, name)
    }
}

fn to_q8(m: &QMatrix) -> Result<QMatrix, EngineError> {
    let (n, k) = (m.rows(), m.cols());
    let mut f = vec![0f32; n * k];
    for (j, row) in f.chunks_exact_mut(k).enumerate() {
        m.dequantize_row(j, row);
    }
    QMatrix::q8_from_f32(&f, n, k).map_err(|e| EngineError::Model(e.to_string()))
}

/// Stack q/k/v (or gate/up); mixed formats fall back to Q8_0 for all.
fn stack(parts: Vec<QMatrix>) -> Result<QMatrix, EngineError> {
    let same = parts.windows(2).all(|w| w[0].format() == w[1].format());
    let parts = if same {
        parts
    } else {
        parts.iter().map(to_q8).collect::<Result<_, _>>()?
    };
    QMatrix::stack(parts).map_err(|e| EngineError::Model(e.to_string()))
}

fn load_vec(
    content: &gguf_file::Content,
    file: &mut File,
    name: &str,
) -> Result<Vec<f32>, EngineError> {
    content
        .tensor(file, name, &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce)
}

impl CpuModel {
    pub fn load(
        src: &mut dyn WeightSource,
        cfg: ModelConfig,
        formats: CpuFormats,
    ) -> Result<Self, EngineError> {
        let embed = src.matrix("token_embd.weight", formats)?;
        if embed.cols() != cfg.hidden || embed.rows() != cfg.vocab_size {
            return Err(EngineError::Model("embedding shape mismatch".into()));
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut m = |s: &str| src.matrix(&format!("{p}.{s}.weight"), formats);
            let q = m("attn_q")?;
            let k = m("attn_k")?;
            let v = m("attn_v")?;
            let o = m("attn_output")?;
            let gate = m("ffn_gate")?;
            let up = m("ffn_up")?;
            let down = m("ffn_down")?;
            let qkv_bias = if src.has(&format!("{p}.attn_q.bias")) {
                let mut b = src.vector(&format!("{p}.attn_q.bias"))?;
                b.extend(src.vector(&format!("{p}.attn_k.bias"))?);
                b.extend(src.vector(&format!("{p}.attn_v.bias"))?);
                Some(b)
            } else {
                None
            };
            let qkv = stack(vec![q, k, v])?;
            let gate_up = stack(vec![gate, up])?;
            let q_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim;
            if qkv.rows() != q_out
                || qkv.cols() != cfg.hidden
                || o.rows() != cfg.hidden
                || gate_up.rows() != 2 * cfg.ffn
                || down.cols() != cfg.ffn
                || qkv_bias.as_ref().is_some_and(|b| b.len() != q_out)
            {
                return Err(EngineError::Model(format!("{p}: tensor shapes disagree")));
            }
            layers.push(Layer {
                attn_norm: src.vector(&format!("{p}.attn_norm.weight"))?,
                qkv,
                qkv_bias,
                o,
                ffn_norm: src.vector(&format!("{p}.ffn_norm.weight"))?,
                gate_up,
                down,
            });
        }
        let norm = src.vector("output_norm.weight")?;
        let lm_head = if src.has("output.weight") {
            Some(src.matrix("output.weight", formats)?)
        } else {
            None
        };
        let mut bytes: u64 = 0;
        let mut names = std::collections::BTreeSet::new();
        for l in &layers {
            for mtx in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                bytes += mtx.storage_bytes() as u64;
                names.insert(format!("{}(cpu)", mtx.format().name()));
            }
            bytes += ((l.attn_norm.len() + l.ffn_norm.len()) * 4) as u64;
        }
        let head = lm_head.as_ref().unwrap_or(&embed);
        bytes += head.storage_bytes() as u64 + (norm.len() * 4) as u64;
        names.insert(format!("{}(cpu)", head.format().name()));
        // One embedding row per token.
        bytes += (cfg.hidden * 4) as u64;
        let (cos, sin) = rope_tables(&cfg);
        tracing::info!(
            kernels = qmat::isa().name(),
            amx = qmat::amx_available(),
            "CPU kernels"
        );
        Ok(CpuModel {
            cfg,
            embed,
            lm_head,
            layers,
            norm,
            cos,
            sin,
            pool: Pool::new(Pool::default_threads()),
            scratch: Mutex::new(Scratch::default()),
            weight_bytes_per_token: bytes,
            formats: names.into_iter().collect(),
        })
    }

    /// See `Model::inject_panic`.
    #[cfg(test)]
    pub(crate) fn inject_panic(&self) {
        let last = self.pool.threads() - 1;
        self.pool.run(self.pool.threads(), &|t| {
            if t == last {
                panic!("injected fault in share {t}");
            }
        });
    }

    /// Run one step; logits `[rows, vocab]` (row-major) for the items that
    /// want them, in order.
    pub fn forward(&self, items: &mut [HostItem<'_>]) -> Result<Option<Vec<f32>>, EngineError> {
        let c = &self.cfg;
        let (nh, nkv, hd, hidden) = (c.n_head, c.n_kv_head, c.head_dim, c.hidden);
        let qkv_n = (nh + 2 * nkv) * hd;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        s.pos.clear();
        let mut spans = Vec::with_capacity(items.len());
        let mut want = Vec::new();
        for it in items.iter() {
            let end = it.past + it.tokens.len();
            if end * it.cache.row > it.cache.k.first().map_or(0, |b| b.len())
                || end > c.context_length
            {
                return Err(EngineError::Model("sequence exceeds its KV cache".into()));
            }
            spans.push((s.pos.len(), it.tokens.len(), it.past));
            s.pos.extend(it.past..end);
            if it.want_logits && !it.tokens.is_empty() {
                want.push(s.pos.len() - 1);
            }
        }
        let t = s.pos.len();
        if t == 0 {
            return Ok(None);
        }
        s.x.resize(t * hidden, 0.0);
        let mut r = 0;
        for it in items.iter() {
            for &tok in it.tokens {
                if tok as usize >= c.vocab_size {
                    return Err(EngineError::Model(format!("token {tok} is out of range")));
                }
                self.embed
                    .dequantize_row(tok as usize, &mut s.x[r * hidden..(r + 1) * hidden]);
                r += 1;
            }
        }
        s.h.resize(t * hidden, 0.0);
        s.qkv.resize(t * qkv_n, 0.0);
        s.attn.resize(t * nh * hd, 0.0);
        s.tmp.resize(t * hidden, 0.0);
        s.gu.resize(t * 2 * c.ffn, 0.0);
        s.act.resize(t * c.ffn, 0.0);
        let eps = c.eps as f32;
        let half = hd / 2;

        for (li, layer) in self.layers.iter().enumerate() {
            let norm =
                |_: usize, x: &[f32], h: &mut [f32]| rms_norm(x, &layer.attn_norm, eps, hidden, h);
            par_rows(&self.pool, &s.x, hidden, &mut s.h, hidden, &norm);
            s.aq.quantize_par(&s.h, t, hidden, layer.qkv.format(), &self.pool);
            matmul(&layer.qkv, &s.aq, &mut s.qkv, &self.pool);
            if let Some(b) = &layer.qkv_bias {
                for row in s.qkv.chunks_exact_mut(qkv_n) {
                    for (v, bb) in row.iter_mut().zip(b) {
                        *v += bb;
                    }
                }
            }
            let (pos, cos_t, sin_t, arch) = (&s.pos, &self.cos, &self.sin, c.arch);
            let rotate = |r: usize, row: &mut [f32]| {
                let p = pos[r];
                let cos = &cos_t[p * half..(p + 1) * half];
                let sin = &sin_t[p * half..(p + 1) * half];
                for head in row[..(nh + nkv) * hd].chunks_exact_mut(hd) {
                    rope(head, cos, sin, arch);
                }
            };
            par_rows_mut(&self.pool, &mut s.qkv, qkv_n, &rotate);
            for (it, &(start, n, p0)) in items.iter_mut().zip(spans.iter()) {
                let row = it.cache.row;
                for i in 0..n {
                    let src = &s.qkv[(start + i) * qkv_n..(start + i + 1) * qkv_n];
                    let at = (p0 + i) * row;
                    it.cache.k[li][at..at + row].copy_from_slice(&src[nh * hd..(nh + nkv) * hd]);
                    it.cache.v[li][at..at + row].copy_from_slice(&src[(nh + nkv) * hd..]);
                }
            }
            self.attention(items, &spans, li, &s.qkv, &mut s.attn);
            s.aq.quantize_par(&s.attn, t, nh * hd, layer.o.format(), &self.pool);
            matmul(&layer.o, &s.aq, &mut s.tmp, &self.pool);
            add_into(&mut s.x, &s.tmp);

            let norm =
                |_: usize, x: &[f32], h: &mut [f32]| rms_norm(x, &layer.ffn_norm, eps, hidden, h);
            par_rows(&self.pool, &s.x, hidden, &mut s.h, hidden, &norm);
            s.aq.quantize_par(&s.h, t, hidden, layer.gate_up.format(), &self.pool);
            matmul(&layer.gate_up, &s.aq, &mut s.gu, &self.pool);
            let f = c.ffn;
            let silu = |_: usize, gu: &[f32], a: &mut [f32]| silu_mul(&gu[..f], &gu[f..], a);
            par_rows(&self.pool, &s.gu, 2 * f, &mut s.act, f, &silu);
            s.aq.quantize_par(&s.act, t, f, layer.down.format(), &self.pool);
            matmul(&layer.down, &s.aq, &mut s.tmp, &self.pool);
            add_into(&mut s.x, &s.tmp);
        }
        if want.is_empty() {
            return Ok(None);
        }
        let nw = want.len();
        let mut last = vec![0f32; nw * hidden];
        for (o, &r) in last.chunks_exact_mut(hidden).zip(&want) {
            o.copy_from_slice(&s.x[r * hidden..(r + 1) * hidden]);
        }
        let mut normed = vec![0f32; nw * hidden];
        rms_norm(&last, &self.norm, eps, hidden, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        s.aq.quantize_par(&normed, nw, hidden, head.format(), &self.pool);
        let mut logits = vec![0f32; nw * c.vocab_size];
        matmul(head, &s.aq, &mut logits, &self.pool);
        Ok(Some(logits))
    }

    /// Causal attention of every new row against its sequence's cache.
    /// Work units are (sequence, KV head, block of query rows), spread over
    /// the threads; the query heads sharing a KV head read each K/V row once.
    fn attention(
        &self,
        items: &[HostItem<'_>],
        spans: &[(usize, usize, usize)],
        li: usize,
        qkv: &[f32],
        out: &mut [f32],
    ) {
        const ROWS: usize = 8;
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let groups = nh / nkv;
        let qkv_n = (nh + 2 * nkv) * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut units = Vec::new();
        for (ii, &(_, n, _)) in spans.iter().enumerate() {
            for kvh in 0..nkv {
                let mut i0 = 0;
                while i0 < n {
                    units.push((ii, kvh, i0, (i0 + ROWS).min(n)));
                    i0 += ROWS;
                }
            }
        }
        // The costliest units (the last rows of a prefill) first.
        units.reverse();
        let out_ptr = OutPtr(out.as_mut_ptr());
        let threads = self.pool.threads();
        let units = &units;
        // Units are claimed as threads come free (later rows of a prefill
        // cost more, and the cores of a shared machine run unevenly).
        let next = std::sync::atomic::AtomicUsize::new(0);
        self.pool.run(threads, &|_| {
            let mut scores = Vec::new();
            let mut acc = vec![0f32; groups * hd];
            loop {
                let u = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(ii, kvh, i0, i1)) = units.get(u) else {
                    break;
                };
                let (start, _, p0) = spans[ii];
                let kc = &items[ii].cache.k[li];
                let vc = &items[ii].cache.v[li];
                let row = nkv * hd;
                for i in i0..i1 {
                    let len = p0 + i + 1;
                    let q = &qkv[(start + i) * qkv_n..];
                    scores.clear();
                    scores.resize(groups * len, 0.0);
                    for g in 0..groups {
                        let h = kvh * groups + g;
                        let sg = &mut scores[g * len..(g + 1) * len];
                        attn::scores(&q[h * hd..h * hd + hd], kc, row, kvh * hd, scale, sg);
                        softmax(sg);
                    }
                    acc.fill(0.0);
                    for g in 0..groups {
                        let sg = &scores[g * len..(g + 1) * len];
                        attn::weighted_sum(sg, vc, row, kvh * hd, &mut acc[g * hd..(g + 1) * hd]);
                    }
                    for g in 0..groups {
                        let h = kvh * groups + g;
                        let at = (start + i) * nh * hd + h * hd;
                        // SAFETY: each (row, head) slot is written by exactly
                        // one unit; `out` outlives the section.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                acc[g * hd..].as_ptr(),
                                out_ptr.get().add(at),
                                hd,
                            )
                        };
                    }
                }
            }
        });
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only for disjoint writes from pool tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so closures capture the whole (Sync) wrapper, not the field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn rope_tables(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let theta = cfg.rope_theta as f64;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / cfg.head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(cfg.context_length * half);
    let mut sin = Vec::with_capacity(cfg.context_length * half);
    for p in 0..cfg.context_length {
        for f in &inv {
            // f64 angles: positions in the thousands lose digits in f32.
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate one head in place: interleaved pairs for Llama GGUFs (their q/k
/// rows are permuted for it), halves for Qwen2 (NeoX style).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], arch: Arch) {
    let half = x.len() / 2;
    match arch {
        Arch::Llama => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        Arch::Qwen2 | Arch::LlamaHf => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// Sum of products in 16 lanes, the lanes then added as a tree (a serial sum
/// of sixteen lanes would be a chain of dependent adds per dot product).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rows from which a row-wise step is worth a parallel section.
const PAR_ROWS: usize = 8;

/// A row-wise step: `(row index, input row, output row)`.
type RowFn<'a> = dyn Fn(usize, &[f32], &mut [f32]) + Sync + 'a;

/// `f(r, input row r, output row r)` for every row of `inp` (`iw` wide) and
/// `out` (`ow` wide), spread over the pool when there are many rows (a
/// prefill chunk); a decode step's few rows are not worth waking threads.
fn par_rows(pool: &Pool, inp: &[f32], iw: usize, out: &mut [f32], ow: usize, f: &RowFn<'_>) {
    let rows = (inp.len() / iw).min(out.len() / ow);
    let threads = pool.threads();
    if rows < PAR_ROWS || threads == 1 {
        for (r, (i, o)) in inp
            .chunks_exact(iw)
            .zip(out.chunks_exact_mut(ow))
            .enumerate()
        {
            f(r, i, o);
        }
        return;
    }
    let per = rows.div_ceil(threads);
    // Each task takes its own rows (a Mutex each, never contended).
    let parts: Vec<_> = inp[..rows * iw]
        .chunks(per * iw)
        .zip(out[..rows * ow].chunks_mut(per * ow))
        .map(Mutex::new)
        .collect();
    pool.run(threads, &|t| {
        let Some(part) = parts.get(t) else { return };
        let mut g = part.lock().unwrap_or_else(|e| e.into_inner());
        let (i, o) = &mut *g;
        for (r, (ir, or)) in i.chunks_exact(iw).zip(o.chunks_exact_mut(ow)).enumerate() {
            f(t * per + r, ir, or);
        }
    });
}

/// `f(r, row r)` in place for every `w`-wide row of `data`, as [`par_rows`].
fn par_rows_mut(pool: &Pool, data: &mut [f32], w: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = data.len() / w;
    let threads = pool.threads();
    if rows < PAR_ROWS || threads == 1 {
        for (r, row) in data.chunks_exact_mut(w).enumerate() {
            f(r, row);
        }
        return;
    }
    let per = rows.div_ceil(threads);
    let parts: Vec<_> = data[..rows * w]
        .chunks_mut(per * w)
        .map(Mutex::new)
        .collect();
    pool.run(threads, &|t| {
        let Some(part) = parts.get(t) else { return };
        let mut g = part.lock().unwrap_or_else(|e| e.into_inner());
        for (r, row) in g.chunks_exact_mut(w).enumerate() {
            f(t * per + r, row);
        }
    });
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `exp` to about 1 ulp over the range softmax and SiLU use, written so the
/// compiler vectorises loops over it (libm's `expf` is a call per element).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    e * f32::from_bits(bits)
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = fast_exp(*v - max);
    }
    for v in x.iter() {
        sum += v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(g).zip(u) {
        *o = a / (1.0 + fast_exp(-a)) * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close_to_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(
                (a - b).abs() <= 4e-7 * b.max(f32::MIN_POSITIVE),
                "{x}: {a} vs {b}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = vec![1.0, 2.0, 3.0, -50.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[2] > v[1] && v[1] > v[0]);
    }
}
