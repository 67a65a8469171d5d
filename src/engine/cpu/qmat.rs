//! Quantised matrices and the integer matmul the CPU forward runs on.
//!
//! Weights stay in their GGUF block formats (Q4_1 as 4-bit nibbles, Q8_0 as
//! bytes, each block of 32 with its scale), so a decode step reads as few
//! bytes as the file holds. Activations are quantised per block of 32 to
//! signed bytes once per layer input, and every block product is an exact
//! integer dot product scaled by the two block scales; this is the Q8 x Q4/Q8
//! scheme of the fastest CPU engines.
//!
//! The weights are stored in panels of 16 rows (16 output columns), block by
//! block: one record per block of a panel holds the 16 rows' values four
//! bytes of a row at a time, then the 16 scales (and minimums). That is the
//! layout of an AMX tile's right-hand operand, and a layout in which each
//! lane of a 16-lane VNNI dot product is one output column. A panel is one
//! contiguous stream, which is how a decode step reads it from memory.
//!
//! Three kernels compute the same numbers, bit for bit: the AMX one for many
//! activation rows (prefill), the AVX-512 VNNI one for a few (decode), and a
//! portable one. For every output they do the same sequence of floating-point
//! operations (see [`reference`]), and each output depends only on its own
//! activation row and weight row. So a sequence's results do not depend on
//! what else is in the batch, nor on which kernel ran, which the scheduler
//! relies on for seeded requests that reproduce alone and inside a batch.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;

use super::pool::Pool;

/// Weights per block.
pub const QK: usize = 32;

/// Weight rows per panel: the output columns one kernel call computes.
const PANEL: usize = 16;

/// Activation rows of one AMX tile.
const TILE_ROWS: usize = 16;

/// One cache line of a panel, so that records start on line boundaries.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

const ZERO_LINE: Line = Line([0; 64]);

/// The block format of a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 32 signed bytes and one scale: `w = d * q`.
    Q8,
    /// 32 nibbles, a scale and a minimum: `w = d * q + m`. Byte `j` of a block
    /// holds element `j` in its low nibble and element `j + 16` in its high one.
    Q4_1,
}

impl QFormat {
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8 => "Q8_0",
            QFormat::Q4_1 => "Q4_1",
        }
    }

    /// Bytes of one block's values in GGUF order.
    fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8 => QK,
            QFormat::Q4_1 => QK / 2,
        }
    }

    /// Lines of a panel's record for one block: the values (line `t` holds
    /// bytes `4t..4t+4` of each of the 16 rows), the scales, the minimums.
    fn record_lines(self) -> usize {
        match self {
            QFormat::Q8 => self.value_lines() + 1,
            QFormat::Q4_1 => self.value_lines() + 2,
        }
    }

    /// Lines of values in a record (four bytes of each row a line); the
    /// scales follow them.
    fn value_lines(self) -> usize {
        self.block_bytes() / 4
    }
}

/// A `[n, k]` weight matrix (row `j` is output column `j`) in blocks of 32
/// along `k`, stored as panels of 16 rows (see the module docs).
///
/// In a record, Q8 values are stored offset by 128 (`w + 128` as an unsigned
/// byte), the operand the unsigned-by-signed dot product instructions take;
/// the kernels take `128 * sum(x)` off again. Q4_1 values are the GGUF bytes.
#[derive(Clone)]
pub struct QMatrix {
    n: usize,
    k: usize,
    format: QFormat,
    data: Vec<Line>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("format", &self.format)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QError {
    #[error("a row of {0} weights is not a whole number of blocks")]
    RaggedRow(usize),
    #[error("{what}: expected {expected} bytes, got {got}")]
    Size {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("matrices of different formats or widths cannot be stacked")]
    Mismatch,
}

fn f16_le(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// A matrix row by row, blocks in GGUF byte order: what the constructors
/// gather before packing the panels.
struct Rows {
    n: usize,
    k: usize,
    format: QFormat,
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl Rows {
    fn new(n: usize, k: usize, format: QFormat) -> Result<Self, QError> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(QError::RaggedRow(k));
        }
        let nb = n * k / QK;
        Ok(Rows {
            n,
            k,
            format,
            qs: vec![0; nb * format.block_bytes()],
            d: vec![0.0; nb],
            m: match format {
                QFormat::Q8 => Vec::new(),
                QFormat::Q4_1 => vec![0.0; nb],
            },
        })
    }

    fn pack(self) -> QMatrix {
        let nb = self.k / QK;
        let (bb, rl, vl) = (
            self.format.block_bytes(),
            self.format.record_lines(),
            self.format.value_lines(),
        );
        let mut data = vec![ZERO_LINE; self.n.div_ceil(PANEL) * nb * rl];
        for j in 0..self.n {
            let (p, c) = (j / PANEL, j % PANEL);
            for b in 0..nb {
                let rec = &mut data[(p * nb + b) * rl..(p * nb + b + 1) * rl];
                let src = &self.qs[(j * nb + b) * bb..(j * nb + b + 1) * bb];
                for (t, four) in src.chunks_exact(4).enumerate() {
                    let dst = &mut rec[t].0[c * 4..c * 4 + 4];
                    for (o, &v) in dst.iter_mut().zip(four) {
                        *o = match self.format {
                            QFormat::Q8 => v ^ 0x80,
                            QFormat::Q4_1 => v,
                        };
                    }
                }
                rec[vl].0[c * 4..c * 4 + 4].copy_from_slice(&self.d[j * nb + b].to_ne_bytes());
                if self.format == QFormat::Q4_1 {
                    rec[vl + 1].0[c * 4..c * 4 + 4]
                        .copy_from_slice(&self.m[j * nb + b].to_ne_bytes());
                }
            }
        }
        QMatrix {
            n: self.n,
            k: self.k,
            format: self.format,
            data,
        }
    }
}

/// Block `b` of row `j`: its values in GGUF order (the first
/// `block_bytes` of the array), its scale and its minimum (0 for Q8).
struct Block {
    q: [u8; QK],
    d: f32,
    m: f32,
}

impl QMatrix {
    /// From GGUF Q8_0 blocks (`f16 d, i8 q[32]`, 34 bytes each).
    pub fn from_gguf_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Rows::new(n, k, QFormat::Q8)?;
        let expected = n * k / QK * 34;
        if bytes.len() != expected {
            return Err(QError::Size {
                what: "Q8_0 tensor",
                expected,
                got: bytes.len(),
            });
        }
        for ((blk, q), d) in bytes
            .chunks_exact(34)
            .zip(w.qs.chunks_exact_mut(QK))
            .zip(w.d.iter_mut())
        {
            *d = f16_le(&blk[0..2]);
            q.copy_from_slice(&blk[2..34]);
        }
        Ok(w.pack())
    }

    /// From GGUF Q4_1 blocks (`f16 d, f16 m, u8 qs[16]`, 20 bytes each).
    pub fn from_gguf_q4_1(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Rows::new(n, k, QFormat::Q4_1)?;
        let expected = n * k / QK * 20;
        if bytes.len() != expected {
            return Err(QError::Size {
                what: "Q4_1 tensor",
                expected,
                got: bytes.len(),
            });
        }
        for (((blk, q), d), m) in bytes
            .chunks_exact(20)
            .zip(w.qs.chunks_exact_mut(QK / 2))
            .zip(w.d.iter_mut())
            .zip(w.m.iter_mut())
        {
            *d = f16_le(&blk[0..2]);
            *m = f16_le(&blk[2..4]);
            q.copy_from_slice(&blk[4..20]);
        }
        Ok(w.pack())
    }

    /// Quantise a row-major f32 matrix to Q8 (round to nearest, scale amax/127).
    pub fn q8_from_f32(w: &[f32], n: usize, k: usize) -> Result<Self, QError> {
        let mut out = Rows::new(n, k, QFormat::Q8)?;
        if w.len() != n * k {
            return Err(QError::Size {
                what: "f32 matrix",
                expected: n * k,
                got: w.len(),
            });
        }
        for ((xb, qb), db) in w
            .chunks_exact(QK)
            .zip(out.qs.chunks_exact_mut(QK))
            .zip(out.d.iter_mut())
        {
            let (d, _) = quantize_block(xb, qb);
            *db = d;
        }
        Ok(out.pack())
    }

    /// Stack matrices of one format and width along `n` (q, k and v as one).
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, QError> {
        let first = parts.first().ok_or(QError::Mismatch)?;
        let (k, format) = (first.k, first.format);
        if parts.iter().any(|p| p.k != k || p.format != format) {
            return Err(QError::Mismatch);
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut out = Rows::new(n, k, format)?;
        let (nb, bb) = (k / QK, format.block_bytes());
        let mut j = 0;
        for p in &parts {
            for pj in 0..p.n {
                for b in 0..nb {
                    let blk = p.block(pj, b);
                    let i = j * nb + b;
                    out.qs[i * bb..(i + 1) * bb].copy_from_slice(&blk.q[..bb]);
                    out.d[i] = blk.d;
                    if format == QFormat::Q4_1 {
                        out.m[i] = blk.m;
                    }
                }
                j += 1;
            }
        }
        Ok(out.pack())
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Bytes one pass over the matrix reads (the kernel's working format).
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Line>()
    }

    /// The record of block `b` of panel `p`.
    fn record(&self, p: usize, b: usize) -> &[Line] {
        let (nb, rl) = (self.k / QK, self.format.record_lines());
        &self.data[(p * nb + b) * rl..(p * nb + b + 1) * rl]
    }

    fn block(&self, j: usize, b: usize) -> Block {
        let (p, c) = (j / PANEL, j % PANEL);
        let rec = self.record(p, b);
        let vl = self.format.value_lines();
        let word = |line: &Line| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&line.0[c * 4..c * 4 + 4]);
            v
        };
        let mut q = [0u8; QK];
        for (t, four) in q[..self.format.block_bytes()]
            .chunks_exact_mut(4)
            .enumerate()
        {
            four.copy_from_slice(&word(&rec[t]));
            if self.format == QFormat::Q8 {
                for v in four {
                    *v ^= 0x80;
                }
            }
        }
        Block {
            q,
            d: f32::from_ne_bytes(word(&rec[vl])),
            m: match self.format {
                QFormat::Q8 => 0.0,
                QFormat::Q4_1 => f32::from_ne_bytes(word(&rec[vl + 1])),
            },
        }
    }

    /// Row `j` back to f32 (tests, and the tied embedding).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        for b in 0..nb {
            let blk = self.block(j, b);
            let o = &mut out[b * QK..(b + 1) * QK];
            match self.format {
                QFormat::Q8 => {
                    for (o, &v) in o.iter_mut().zip(&blk.q) {
                        *o = blk.d * f32::from(v as i8);
                    }
                }
                QFormat::Q4_1 => {
                    for (i, &v) in blk.q[..16].iter().enumerate() {
                        o[i] = blk.d * f32::from(v & 0x0f) + blk.m;
                        o[i + 16] = blk.d * f32::from(v >> 4) + blk.m;
                    }
                }
            }
        }
    }
}

/// Quantise one block to signed bytes; returns the scale and the sum of the
/// quantised values.
#[inline]
fn quantize_block(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(x) {
        let i = (v * inv).round().clamp(-127.0, 127.0) as i8;
        sum += i32::from(i);
        *o = i as u8;
    }
    (d, sum)
}

/// [`quantize_block`] with vectors, to the same bits: `f32::round` (half
/// away from zero) is the truncation plus one step away from zero where the
/// dropped fraction is at least a half; the fraction `v - trunc(v)` is exact.
///
/// # Safety
/// The CPU must have AVX-512 F/BW; `x` and `q` must hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == QK && q.len() == QK);
    let v = [
        _mm512_loadu_ps(x.as_ptr()),
        _mm512_loadu_ps(x.as_ptr().add(16)),
    ];
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    // As the scalar code: a block of zeros (or of -0.0) has amax 0.
    let amax = amax.max(0.0);
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut sum = _mm512_setzero_si512();
    for (h, v) in v.into_iter().enumerate() {
        let y = _mm512_mul_ps(v, inv);
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
        // One step away from zero: +1 or -1 with the sign of y.
        let step = _mm512_or_ps(one, _mm512_and_ps(y, _mm512_set1_ps(-0.0)));
        let r = _mm512_mask_add_ps(t, away, t, step);
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let i = _mm512_cvttps_epi32(r);
        sum = _mm512_add_epi32(sum, i);
        _mm_storeu_si128(
            q.as_mut_ptr().add(h * 16) as *mut __m128i,
            _mm512_cvtepi32_epi8(i),
        );
    }
    (d, _mm512_reduce_add_epi32(sum))
}

/// Activations `[m, k]` quantised per block of 32 to signed bytes in their
/// own order, with what the kernels need per block.
#[derive(Debug, Default)]
pub struct ActQ {
    m: usize,
    k: usize,
    format: Option<QFormat>,
    /// `[rows][k]` signed bytes; from `AMX_MIN_ROWS` rows on, padded with
    /// zeros to whole AMX tiles.
    q: Vec<u8>,
    /// Per block scale, `[rows][k / 32]`.
    d: Vec<f32>,
    /// Per block `d * sum(q)`: Q4_1's minimum term.
    s: Vec<f32>,
    /// Per block `-128 * sum(q)`: what Q8's offset weights add to a dot.
    c: Vec<i32>,
}

impl ActQ {
    /// Quantise `x` (`[m, k]`) for a matrix of `format`; reuses the buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, format: QFormat) {
        self.quantize_on(x, m, k, format, None)
    }

    /// The same, with the rows spread over `pool` when there are many.
    pub fn quantize_par(&mut self, x: &[f32], m: usize, k: usize, format: QFormat, pool: &Pool) {
        self.quantize_on(x, m, k, format, Some(pool))
    }

    fn quantize_on(&mut self, x: &[f32], m: usize, k: usize, format: QFormat, pool: Option<&Pool>) {
        debug_assert_eq!(x.len(), m * k);
        let nb = k / QK;
        // The AMX kernel reads whole tiles of rows; the others only `m`.
        let rows = if m >= AMX_MIN_ROWS {
            m.div_ceil(TILE_ROWS) * TILE_ROWS
        } else {
            m
        };
        self.m = m;
        self.k = k;
        self.format = Some(format);
        // Padding rows are read by whole tiles and never stored: any value
        // will do, zeros keep them finite.
        self.q.clear();
        self.q.resize(rows * k, 0);
        self.d.clear();
        self.d.resize(rows * nb, 0.0);
        self.s.clear();
        self.s.resize(rows * nb, 0.0);
        self.c.clear();
        self.c.resize(rows * nb, 0);
        let threads = match pool {
            Some(p) if m >= 8 => p.threads(),
            _ => 1,
        };
        let per = m.div_ceil(threads).max(1);
        // Each task takes its own rows of every buffer (a Mutex each, never
        // contended), so the split needs no unsafe code.
        let parts: Vec<_> = x
            .chunks(per * k)
            .zip(self.q[..m * k].chunks_mut(per * k))
            .zip(self.d[..m * nb].chunks_mut(per * nb))
            .zip(self.s[..m * nb].chunks_mut(per * nb))
            .zip(self.c[..m * nb].chunks_mut(per * nb))
            .map(|((((x, q), d), s), c)| std::sync::Mutex::new((x, q, d, s, c)))
            .collect();
        let task = |t: usize| {
            let Some(part) = parts.get(t) else { return };
            let mut g = part.lock().unwrap_or_else(|e| e.into_inner());
            let (x, q, d, s, c) = &mut *g;
            for (r, xr) in x.chunks_exact(k).enumerate() {
                let blocks = r * nb..(r + 1) * nb;
                quantize_row(
                    xr,
                    &mut q[r * k..(r + 1) * k],
                    &mut d[blocks.clone()],
                    &mut s[blocks.clone()],
                    &mut c[blocks],
                );
            }
        };
        match pool {
            Some(p) if threads > 1 => p.run(threads, &task),
            _ => task(0),
        }
    }
}

fn quantize_row(x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32], c: &mut [i32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        #[cfg(target_arch = "x86_64")]
        let (db, sum) = if simd_available() {
            // SAFETY: the CPU has AVX-512 F/BW; both blocks hold 32 values.
            unsafe { quantize_block_avx512(xb, qb) }
        } else {
            quantize_block(xb, qb)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (db, sum) = quantize_block(xb, qb);
        d[b] = db;
        s[b] = db * sum as f32;
        c[b] = -128 * sum;
    }
}

/// One output value as every kernel computes it: over the blocks in order,
/// `acc = fma(dot_b, d_w * d_x, acc)` with `dot_b` the exact integer block
/// product. For Q4_1 the minimum term `m_w * d_x * sum(q_x)` is summed
/// apart, even and odd blocks in two sums, and the result is
/// `acc + (even + odd)`.
///
/// Every order of these sums is as accurate as another; this one is pinned
/// because SmolLM2-135M's greedy answer to "What is the capital of France?"
/// sits on a knife edge between "The capital … is Paris" and "L'Étoile",
/// and most orders tried (all-sequential, minimums folded in, two or four
/// interleaved dot sums) tip it to the latter.
pub(crate) fn reference(w: &QMatrix, j: usize, x: &ActQ, r: usize) -> f32 {
    let k = w.k;
    let nb = k / QK;
    let xq = &x.q[r * k..(r + 1) * k];
    let (mut acc, mut mins) = (0f32, [0f32; 2]);
    for b in 0..nb {
        let blk = w.block(j, b);
        let xb = &xq[b * QK..(b + 1) * QK];
        let xi = r * nb + b;
        let dot: i32 = match w.format {
            QFormat::Q8 => blk
                .q
                .iter()
                .zip(xb)
                .map(|(&a, &c)| i32::from(a as i8) * i32::from(c as i8))
                .sum(),
            QFormat::Q4_1 => blk.q[..16]
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i32::from(v & 0x0f) * i32::from(xb[i] as i8)
                        + i32::from(v >> 4) * i32::from(xb[i + 16] as i8)
                })
                .sum(),
        };
        acc = (dot as f32).mul_add(blk.d * x.d[xi], acc);
        if w.format == QFormat::Q4_1 {
            mins[b % 2] = blk.m.mul_add(x.s[xi], mins[b % 2]);
        }
    }
    acc + (mins[0] + mins[1])
}

/// Which kernel a matmul runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    Vnni,
    Amx,
}

/// From this many activation rows on, AMX tiles beat VNNI vectors (measured
/// with `benches/kernels.rs`).
const AMX_MIN_ROWS: usize = 16;

impl Kernel {
    fn choose(m: usize) -> Kernel {
        if !simd_available() {
            Kernel::Portable
        } else if m >= AMX_MIN_ROWS && amx_available() {
            Kernel::Amx
        } else {
            Kernel::Vnni
        }
    }

    /// Whether this kernel can run here.
    pub(crate) fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Vnni => simd_available(),
            Kernel::Amx => amx_available(),
        }
    }
}

/// `out[r * n + j] = x[r] . w[j]` for every row of `x` and column of `w`.
pub fn matmul(w: &QMatrix, x: &ActQ, out: &mut [f32], pool: &Pool) {
    matmul_with(w, x, out, pool, Kernel::choose(x.m))
}

pub(crate) fn matmul_with(w: &QMatrix, x: &ActQ, out: &mut [f32], pool: &Pool, kernel: Kernel) {
    let (n, m) = (w.n, x.m);
    assert_eq!(x.k, w.k, "activation width");
    assert_eq!(x.format, Some(w.format), "activation format");
    assert!(out.len() >= m * n, "output size");
    assert!(kernel.available(), "{kernel:?} cannot run here");
    // Only then are the activations padded to whole tiles.
    assert!(
        kernel != Kernel::Amx || m >= AMX_MIN_ROWS,
        "AMX takes {AMX_MIN_ROWS} rows or more"
    );
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // Panel ranges claimed by the threads as they come free: on a shared
    // machine one core is often slower than the other, and a fixed half
    // each would leave the faster one waiting. One activation row is bound
    // by memory, not by the cores, and streams best in one long range a
    // thread; more rows take eight ranges a thread.
    let panels = n.div_ceil(PANEL);
    let tasks = pool.threads();
    let split = if m == 1 { tasks } else { tasks * 8 };
    let per = panels.div_ceil(split).max(1);
    let ranges = panels.div_ceil(per);
    let next = AtomicUsize::new(0);
    pool.run(tasks, &|_| {
        #[cfg(target_arch = "x86_64")]
        let mut amx = match kernel {
            // SAFETY: `amx_available` said the CPU and the OS allow tiles.
            Kernel::Amx => Some(unsafe { amx::Tiles::new(w) }),
            _ => None,
        };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= ranges {
                break;
            }
            for p in i * per..((i + 1) * per).min(panels) {
                match kernel {
                    Kernel::Portable => portable_panel(w, x, p, out_ptr),
                    // SAFETY: the kernel is available (asserted above); each
                    // panel is claimed by one task only, so tasks write
                    // disjoint columns of `out`, which outlives `run` (it
                    // returns only when every task is done). Which task
                    // computes a column does not change its value.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => unsafe { vnni::panel(w, x, p, out_ptr.0) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Amx => {
                        if let Some(t) = amx.as_mut() {
                            unsafe { t.panel(w, x, p, out_ptr.0) }
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => portable_panel(w, x, p, out_ptr),
                }
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used to write disjoint elements from pool tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// The lanes of panel `p` that are columns of an `n`-column matrix (the last
/// panel may be short), as a store mask.
#[cfg(target_arch = "x86_64")]
fn panel_mask(n: usize, p: usize) -> u16 {
    let cols = (n - p * PANEL).min(PANEL);
    if cols == PANEL {
        !0
    } else {
        (1u16 << cols) - 1
    }
}

fn portable_panel(w: &QMatrix, x: &ActQ, p: usize, out: SyncPtr) {
    let n = w.n;
    for j in p * PANEL..((p + 1) * PANEL).min(n) {
        for r in 0..x.m {
            // SAFETY: `out` holds `m * n` values (asserted by `matmul_with`)
            // and this panel's columns are written by this task only.
            unsafe { *out.0.add(r * n + j) = reference(w, j, x, r) };
        }
    }
}

/// Whether the AVX-512 VNNI kernels can run here.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::env::var_os("SGL_NO_SIMD").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AMX kernel can run here: the CPU has AMX-INT8 and the OS has
/// given this process the tile state (Linux hands it out on request).
/// `SGL_NO_AMX` turns it off.
pub fn amx_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            if !simd_available() || std::env::var_os("SGL_NO_AMX").is_some() {
                return false;
            }
            // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (3 << 24) != 3 << 24 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            rc == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The AVX-512 VNNI kernel: lane `c` of every vector is column `c` of the
/// panel, so a block's 32 products for 16 columns are eight `vpdpbusd`
/// against four activation bytes broadcast to every lane.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{ActQ, QFormat, QMatrix, PANEL, QK};
    use std::arch::x86_64::*;

    /// Panel `p` for every activation row, up to eight rows at a time (the
    /// panel's records stay in L1 for the later groups).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI; `out` must hold `x.m * w.n`
    /// values, and `x` must be quantised for `w`.
    pub unsafe fn panel(w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
        let mut r0 = 0;
        while r0 < x.m {
            let rows = (x.m - r0).min(8);
            macro_rules! go {
                ($q41:expr) => {
                    match rows {
                        1 => rows_of::<1, $q41>(w, x, p, r0, out),
                        2 => rows_of::<2, $q41>(w, x, p, r0, out),
                        3 => rows_of::<3, $q41>(w, x, p, r0, out),
                        4 => rows_of::<4, $q41>(w, x, p, r0, out),
                        5 => rows_of::<5, $q41>(w, x, p, r0, out),
                        6 => rows_of::<6, $q41>(w, x, p, r0, out),
                        7 => rows_of::<7, $q41>(w, x, p, r0, out),
                        _ => rows_of::<8, $q41>(w, x, p, r0, out),
                    }
                };
            }
            match w.format {
                QFormat::Q8 => go!(false),
                QFormat::Q4_1 => go!(true),
            }
            r0 += rows;
        }
    }

    /// How far ahead a thread asks for its panel's records: a decode step
    /// streams them from memory.
    const PREFETCH_BYTES: usize = 1024;

    /// Rows `r0..r0 + R` of panel `p`; `Q41` picks the format.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows_of<const R: usize, const Q41: bool>(
        w: &QMatrix,
        x: &ActQ,
        p: usize,
        r0: usize,
        out: *mut f32,
    ) {
        let (n, k) = (w.n, w.k);
        let nb = k / QK;
        let (rl, vl) = (w.format.record_lines(), w.format.value_lines());
        let base = w.data.as_ptr().add(p * nb * rl) as *const u8;
        let low = _mm512_set1_epi8(0x0f);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let rec = base.add(b * rl * 64);
            if r0 == 0 {
                for l in (0..rl * 64).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(rec.wrapping_add(PREFETCH_BYTES + l) as *const i8);
                }
            }
            // B row `t`: bytes `4t..4t+4` of the block for each column.
            let mut wv = [zero; 8];
            if Q41 {
                for t in 0..4 {
                    let v = _mm512_load_si512(rec.add(t * 64) as *const _);
                    wv[t] = _mm512_and_si512(v, low);
                    wv[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
            } else {
                for t in 0..8 {
                    wv[t] = _mm512_load_si512(rec.add(t * 64) as *const _);
                }
            }
            let dw = _mm512_load_ps(rec.add(vl * 64) as *const f32);
            for r in 0..R {
                let xi = (r0 + r) * nb + b;
                let xp = x.q.as_ptr().add((r0 + r) * k + b * QK) as *const i32;
                // Two chains halve the dependency on `vpdpbusd`'s latency;
                // integer sums are exact in any order.
                let mut s0 = if Q41 {
                    zero
                } else {
                    _mm512_set1_epi32(*x.c.get_unchecked(xi))
                };
                let mut s1 = zero;
                for t in (0..8).step_by(2) {
                    let a = _mm512_set1_epi32(xp.add(t).read_unaligned());
                    let c = _mm512_set1_epi32(xp.add(t + 1).read_unaligned());
                    s0 = _mm512_dpbusd_epi32(s0, wv[t], a);
                    s1 = _mm512_dpbusd_epi32(s1, wv[t + 1], c);
                }
                let dot = _mm512_add_epi32(s0, s1);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xi)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        let mask = super::panel_mask(n, p);
        if Q41 {
            let mut terms = [_mm512_setzero_ps(); R];
            mins::<R>(w, p, x, r0, &mut terms);
            for r in 0..R {
                acc[r] = _mm512_add_ps(acc[r], terms[r]);
            }
        }
        for r in 0..R {
            _mm512_mask_storeu_ps(out.add((r0 + r) * n + p * PANEL), mask, acc[r]);
        }
    }

    /// Q4_1's minimum terms of panel `p` for activation rows `r0..r0 + N`,
    /// each summed as [`super::reference`] does: even and odd blocks apart,
    /// then added. A pass of its own after the dot products, which then
    /// need fewer registers; the panel's records are still in L1. Several
    /// rows at a time, so that the sums' chains of dependent additions
    /// overlap.
    ///
    /// # Safety
    /// As [`panel`], for a Q4_1 matrix and rows that `x` holds (padding
    /// included).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn mins<const N: usize>(
        w: &QMatrix,
        p: usize,
        x: &ActQ,
        r0: usize,
        out: &mut [__m512; N],
    ) {
        let nb = w.k / QK;
        let rl = w.format.record_lines();
        let first = w
            .data
            .as_ptr()
            .add(p * nb * rl + w.format.value_lines() + 1) as *const f32;
        let xs = x.s.as_ptr().add(r0 * nb);
        let mut even = [_mm512_setzero_ps(); N];
        let mut odd = [_mm512_setzero_ps(); N];
        let mut b = 0;
        while b + 1 < nb {
            let m0 = _mm512_load_ps(first.add(b * rl * 16));
            let m1 = _mm512_load_ps(first.add((b + 1) * rl * 16));
            for i in 0..N {
                even[i] = _mm512_fmadd_ps(m0, _mm512_set1_ps(*xs.add(i * nb + b)), even[i]);
                odd[i] = _mm512_fmadd_ps(m1, _mm512_set1_ps(*xs.add(i * nb + b + 1)), odd[i]);
            }
            b += 2;
        }
        if b < nb {
            let m0 = _mm512_load_ps(first.add(b * rl * 16));
            for i in 0..N {
                even[i] = _mm512_fmadd_ps(m0, _mm512_set1_ps(*xs.add(i * nb + b)), even[i]);
            }
        }
        for i in 0..N {
            out[i] = _mm512_add_ps(even[i], odd[i]);
        }
    }
}

/// The AMX kernel: a panel against 16 activation rows at a time, one tile
/// product (`tdpbsud`, 16 x 16 outputs x 32 bytes) per block; the 16 x 16
/// integer results then get the scales as in the other kernels.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{ActQ, Line, QFormat, QMatrix, PANEL, QK, TILE_ROWS, ZERO_LINE};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The tile configuration (`ldtilecfg`'s 64-byte operand): tiles 0 and 1
    /// hold results (16 rows x 16 i32), 2 and 3 activations (16 rows x 32
    /// bytes), 4 and 5 weights (8 rows x 64 bytes).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
        tail: [u8; 16],
    }

    /// One thread's tile state and buffers for a matmul.
    pub struct Tiles {
        /// Q4_1 weights of one panel unpacked to bytes, 8 lines a block.
        unpacked: Vec<Line>,
        /// Two rounds of two result tiles, stored for the scaling: one
        /// round's tiles are computed while the other's are scaled.
        results: [Line; 4 * TILE_ROWS],
    }

    impl Tiles {
        /// Load the tile configuration on this thread.
        ///
        /// # Safety
        /// [`super::amx_available`] must be true.
        pub unsafe fn new(w: &QMatrix) -> Self {
            let mut cfg = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
                tail: [0; 16],
            };
            for (t, (colsb, rows)) in [(64, 16), (64, 16), (32, 16), (32, 16), (64, 8), (64, 8)]
                .into_iter()
                .enumerate()
            {
                cfg.colsb[t] = colsb;
                cfg.rows[t] = rows;
            }
            asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
            let unpacked = match w.format {
                QFormat::Q8 => Vec::new(),
                QFormat::Q4_1 => vec![ZERO_LINE; w.k / QK * 8],
            };
            Tiles {
                unpacked,
                results: [ZERO_LINE; 4 * TILE_ROWS],
            }
        }

        /// Panel `p` for every activation row.
        ///
        /// # Safety
        /// As [`super::vnni::panel`], and the tiles configured on this
        /// thread by [`Tiles::new`] for this matrix.
        pub unsafe fn panel(&mut self, w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
            match w.format {
                QFormat::Q8 => self.panel_of::<false>(w, x, p, out),
                QFormat::Q4_1 => self.panel_of::<true>(w, x, p, out),
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        #[allow(clippy::needless_range_loop)]
        unsafe fn panel_of<const Q41: bool>(
            &mut self,
            w: &QMatrix,
            x: &ActQ,
            p: usize,
            out: *mut f32,
        ) {
            let (n, k, m) = (w.n, w.k, x.m);
            let nb = k / QK;
            let (rl, vl) = (w.format.record_lines(), w.format.value_lines());
            let base = w.data.as_ptr().add(p * nb * rl) as *const u8;
            // Where block `b`'s weight tile is: Q8's is in its record,
            // Q4_1's nibbles are unpacked once for all row tiles.
            let (tiles, step) = if Q41 {
                let low = _mm512_set1_epi8(0x0f);
                let dst = self.unpacked.as_mut_ptr() as *mut u8;
                for b in 0..nb {
                    let rec = base.add(b * rl * 64);
                    for t in 0..4 {
                        let v = _mm512_load_si512(rec.add(t * 64) as *const _);
                        let lo = _mm512_and_si512(v, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                        _mm512_store_si512(dst.add((b * 8 + t) * 64) as *mut _, lo);
                        _mm512_store_si512(dst.add((b * 8 + t + 4) * 64) as *mut _, hi);
                    }
                }
                (self.unpacked.as_ptr() as *const u8, 8 * 64)
            } else {
                (base, rl * 64)
            };
            let res = self.results.as_mut_ptr() as *mut u8;
            let mask = super::panel_mask(n, p);
            let mut r0 = 0;
            while r0 < m {
                let xa = x.q.as_ptr().add(r0 * k);
                let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
                // The scaling of block `b`'s results from `res`, each row
                // in the order of `super::reference`.
                macro_rules! scale {
                    ($b:expr, $res:expr) => {{
                        let rec = base.add($b * rl * 64);
                        let dw = _mm512_load_ps(rec.add(vl * 64) as *const f32);
                        for i in 0..TILE_ROWS {
                            let xi = (r0 + i) * nb + $b;
                            let mut dot = _mm512_load_si512($res.add(i * 64) as *const _);
                            if !Q41 {
                                let c = _mm512_set1_epi32(*x.c.get_unchecked(xi));
                                dot = _mm512_add_epi32(dot, c);
                            }
                            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xi)));
                            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i]);
                        }
                    }};
                }
                // Two blocks a round. A round's tile products are issued
                // before the previous round's results are scaled, so the tile
                // unit and the vector units work at the same time.
                let mut pending: Option<(usize, *const u8, bool)> = None;
                let (mut b, mut round) = (0, 0);
                while b < nb {
                    let two = b + 1 < nb;
                    let r = res.add((round % 2) * 2 * TILE_ROWS * 64);
                    if two {
                        asm!(
                            "tileloadd tmm2, [{a0} + {k}]",
                            "tileloadd tmm4, [{w0} + {s}]",
                            "tileloadd tmm3, [{a1} + {k}]",
                            "tileloadd tmm5, [{w1} + {s}]",
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tdpbsud tmm0, tmm2, tmm4",
                            "tdpbsud tmm1, tmm3, tmm5",
                            "tilestored [{r0} + {s}], tmm0",
                            "tilestored [{r1} + {s}], tmm1",
                            a0 = in(reg) xa.add(b * QK),
                            a1 = in(reg) xa.add((b + 1) * QK),
                            k = in(reg) k,
                            w0 = in(reg) tiles.add(b * step),
                            w1 = in(reg) tiles.add((b + 1) * step),
                            s = in(reg) 64usize,
                            r0 = in(reg) r,
                            r1 = in(reg) r.add(TILE_ROWS * 64),
                            options(nostack),
                        );
                    } else {
                        asm!(
                            "tileloadd tmm2, [{a0} + {k}]",
                            "tileloadd tmm4, [{w0} + {s}]",
                            "tilezero tmm0",
                            "tdpbsud tmm0, tmm2, tmm4",
                            "tilestored [{r0} + {s}], tmm0",
                            a0 = in(reg) xa.add(b * QK),
                            k = in(reg) k,
                            w0 = in(reg) tiles.add(b * step),
                            s = in(reg) 64usize,
                            r0 = in(reg) r,
                            options(nostack),
                        );
                    }
                    if let Some((pb, pr, ptwo)) = pending {
                        scale!(pb, pr);
                        if ptwo {
                            scale!(pb + 1, pr.add(TILE_ROWS * 64));
                        }
                    }
                    pending = Some((b, r as *const u8, two));
                    b += if two { 2 } else { 1 };
                    round += 1;
                }
                if let Some((pb, pr, ptwo)) = pending {
                    scale!(pb, pr);
                    if ptwo {
                        scale!(pb + 1, pr.add(TILE_ROWS * 64));
                    }
                }
                if Q41 {
                    for q in 0..TILE_ROWS / 4 {
                        let mut terms = [_mm512_setzero_ps(); 4];
                        super::vnni::mins::<4>(w, p, x, r0 + q * 4, &mut terms);
                        for i in 0..4 {
                            acc[q * 4 + i] = _mm512_add_ps(acc[q * 4 + i], terms[i]);
                        }
                    }
                }
                for i in 0..TILE_ROWS.min(m - r0) {
                    _mm512_mask_storeu_ps(out.add((r0 + i) * n + p * PANEL), mask, acc[i]);
                }
                r0 += TILE_ROWS;
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: `new` configured the tiles on this thread; releasing
            // them returns the tile state to its initial (smaller) form.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator for test data in `[-0.5, 0.5)`.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// GGUF Q4_1 bytes for a random matrix.
    fn q41_bytes(n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n * k / QK {
            let d = f16::from_f32(0.01 + lcg(seed).abs() * 0.05);
            let m = f16::from_f32(lcg(seed) * 0.2);
            out.extend_from_slice(&d.to_bits().to_le_bytes());
            out.extend_from_slice(&m.to_bits().to_le_bytes());
            for _ in 0..16 {
                out.push(((lcg(seed) + 0.5) * 255.0) as u8);
            }
        }
        out
    }

    /// Every kernel that runs here gives the reference's bits for every
    /// output; the reference is close to the f32 product.
    fn check(w: &QMatrix, m: usize, seed: &mut u64, pool: &Pool) {
        let (n, k) = (w.rows(), w.cols());
        let x: Vec<f32> = (0..m * k).map(|_| lcg(seed)).collect();
        let mut a = ActQ::default();
        a.quantize(&x, m, k, w.format());
        let mut wr = vec![0f32; k];
        let mut want = vec![0f32; m * n];
        for j in 0..n {
            w.dequantize_row(j, &mut wr);
            for r in 0..m {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wr[i]).sum();
                let scale: f32 = (0..k).map(|i| (x[r * k + i] * wr[i]).abs()).sum();
                let got = reference(w, j, &a, r);
                assert!(
                    (got - exact).abs() <= 0.02 * scale + 1e-4,
                    "{r},{j}: {got} vs {exact}"
                );
                want[r * n + j] = got;
            }
        }
        for kernel in [Kernel::Portable, Kernel::Vnni, Kernel::Amx] {
            if !kernel.available() {
                eprintln!("{kernel:?} cannot run here; not checked");
                continue;
            }
            if kernel == Kernel::Amx && m < AMX_MIN_ROWS {
                continue;
            }
            let mut y = vec![f32::NAN; m * n];
            matmul_with(w, &a, &mut y, pool, kernel);
            for (i, (g, e)) in y.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "{kernel:?} {n}x{k}, m {m}: output {i}"
                );
            }
        }
        // The kernel chosen for one row alone gives the same bits.
        let mut a1 = ActQ::default();
        a1.quantize(&x[(m - 1) * k..], 1, k, w.format());
        let mut y1 = vec![0f32; n];
        matmul(w, &a1, &mut y1, pool);
        assert_eq!(&y1[..], &want[(m - 1) * n..], "last row alone");
    }

    #[test]
    fn q8_kernels_match_the_reference_bit_for_bit() {
        let pool = Pool::new(2);
        let mut s = 7u64;
        for &(n, k, m) in &[
            (37, 96, 6),
            (64, 576, 9),
            (5, 32, 1),
            (48, 160, 37),
            (16, 64, 16),
        ] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let q = QMatrix::q8_from_f32(&w, n, k).unwrap();
            check(&q, m, &mut s, &pool);
        }
    }

    #[test]
    fn q4_1_kernels_match_the_reference_bit_for_bit() {
        let pool = Pool::new(2);
        let mut s = 11u64;
        for &(n, k, m) in &[
            (33, 576, 7),
            (16, 128, 1),
            (9, 64, 5),
            (12, 1536, 3),
            (40, 96, 33),
            (16, 576, 20),
        ] {
            let bytes = q41_bytes(n, k, &mut s);
            let q = QMatrix::from_gguf_q4_1(&bytes, n, k).unwrap();
            check(&q, m, &mut s, &pool);
        }
    }

    #[test]
    fn vector_quantisation_gives_the_scalar_bits() {
        if !simd_available() {
            eprintln!("no AVX-512 here; not checked");
            return;
        }
        let mut s = 13u64;
        let mut blocks: Vec<Vec<f32>> = (0..2000)
            .map(|i| (0..QK).map(|_| lcg(&mut s) * (1 + i % 7) as f32).collect())
            .collect();
        // Halves exactly: amax 127 makes the scale 1, so x * inv = x.
        let mut halves: Vec<f32> = (0..QK).map(|i| i as f32 - 15.5).collect();
        halves[0] = 127.0;
        halves[1] = -0.5;
        halves[2] = 0.5;
        blocks.push(halves);
        blocks.push(vec![0.0; QK]);
        blocks.push(vec![-0.0; QK]);
        blocks.push((0..QK).map(|i| if i == 3 { -1e-30 } else { 0.0 }).collect());
        for x in &blocks {
            let (mut a, mut b) = ([0u8; QK], [0u8; QK]);
            let want = quantize_block(x, &mut a);
            // SAFETY: checked above that the CPU has AVX-512.
            let got = unsafe { quantize_block_avx512(x, &mut b) };
            assert_eq!(
                (got.0.to_bits(), got.1),
                (want.0.to_bits(), want.1),
                "{x:?}"
            );
            assert_eq!(a, b, "{x:?}");
        }
    }

    #[test]
    fn packing_keeps_the_gguf_values() {
        let mut s = 5u64;
        let (n, k) = (19, 96);
        let bytes = q41_bytes(n, k, &mut s);
        let q = QMatrix::from_gguf_q4_1(&bytes, n, k).unwrap();
        let mut row = vec![0f32; k];
        for j in [0, 15, 16, 18] {
            q.dequantize_row(j, &mut row);
            for (b, blk) in bytes[j * 3 * 20..(j + 1) * 3 * 20].chunks(20).enumerate() {
                let (d, m) = (f16_le(&blk[0..2]), f16_le(&blk[2..4]));
                for i in 0..16 {
                    assert_eq!(row[b * QK + i], d * f32::from(blk[4 + i] & 0x0f) + m);
                    assert_eq!(row[b * QK + i + 16], d * f32::from(blk[4 + i] >> 4) + m);
                }
            }
        }
        let mut q8 = Vec::new();
        for _ in 0..n * k / QK {
            q8.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
            q8.extend((0..QK).map(|i| (i as i8 - 16) as u8));
        }
        let q = QMatrix::from_gguf_q8_0(&q8, n, k).unwrap();
        q.dequantize_row(17, &mut row);
        assert_eq!(row[0], -8.0);
        assert_eq!(row[31], 7.5);
        assert_eq!(q.storage_bytes(), 2 * 3 * 9 * 64);
    }

    #[test]
    fn stacking_keeps_rows_and_refuses_mixed_formats() {
        let mut s = 3u64;
        let a: Vec<f32> = (0..2 * 64).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..3 * 64).map(|_| lcg(&mut s)).collect();
        let qa = QMatrix::q8_from_f32(&a, 2, 64).unwrap();
        let qb = QMatrix::q8_from_f32(&b, 3, 64).unwrap();
        let st = QMatrix::stack(vec![qa.clone(), qb.clone()]).unwrap();
        assert_eq!(st.rows(), 5);
        let (mut r1, mut r2) = (vec![0f32; 64], vec![0f32; 64]);
        qa.dequantize_row(1, &mut r1);
        st.dequantize_row(1, &mut r2);
        assert_eq!(r1, r2);
        qb.dequantize_row(2, &mut r1);
        st.dequantize_row(4, &mut r2);
        assert_eq!(r1, r2);
        let q4 = QMatrix::from_gguf_q4_1(&q41_bytes(1, 64, &mut s), 1, 64).unwrap();
        assert!(QMatrix::stack(vec![qa, q4]).is_err());
        assert!(QMatrix::q8_from_f32(&[0.0; 33], 1, 33).is_err());
    }
}
