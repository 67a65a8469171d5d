//! Quantised matrices and the integer matmul the CPU forward runs on.
//!
//! Weights stay in their GGUF block formats (Q4_1 as 4-bit nibbles, Q8_0 as
//! signed bytes, each block of 32 with its scale), so a decode step reads as
//! few bytes as the file holds. Activations are quantised per block of 32 to
//! signed bytes once per layer input, and every block product is an integer
//! dot product (AVX-512 VNNI `vpdpbusd` where the CPU has it) scaled by the
//! two block scales; this is the Q8 x Q4/Q8 scheme of the fastest CPU engines.
//!
//! Each output value is computed by the same sequence of operations whatever
//! else is in the batch: rows have their own accumulators and the column loop
//! does not depend on the number of rows. The scheduler relies on that for
//! seeded requests that reproduce alone and inside a batch.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;

use super::pool::Pool;

/// Weights per block.
pub const QK: usize = 32;

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
}

/// Bytes of padding after every array, so that vector loads of the last
/// block's neighbours never leave the allocation.
const PAD: usize = 64;

/// A row-major `[n, k]` weight matrix in blocks of 32 along `k`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    n: usize,
    k: usize,
    format: QFormat,
    qs: Vec<u8>,
    d: Vec<f32>,
    /// Q4_1's per-block minimum; empty for Q8.
    m: Vec<f32>,
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

impl QMatrix {
    fn empty(n: usize, k: usize, format: QFormat) -> Result<Self, QError> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(QError::RaggedRow(k));
        }
        let nb = n * k / QK;
        let qbytes = match format {
            QFormat::Q8 => n * k,
            QFormat::Q4_1 => n * k / 2,
        };
        let mut qs = Vec::with_capacity(qbytes + PAD);
        qs.resize(qbytes, 0);
        let mut d = Vec::with_capacity(nb + PAD);
        d.resize(nb, 0.0);
        let m = match format {
            QFormat::Q8 => Vec::new(),
            QFormat::Q4_1 => {
                let mut m = Vec::with_capacity(nb + PAD);
                m.resize(nb, 0.0);
                m
            }
        };
        Ok(QMatrix {
            n,
            k,
            format,
            qs,
            d,
            m,
        })
    }

    /// Zeroed room after each array for the kernels' vector loads.
    fn pad(mut self) -> Self {
        let n = self.qs.len();
        self.qs.resize(n + PAD, 0);
        self.qs.truncate(n);
        for v in [&mut self.d, &mut self.m] {
            let n = v.len();
            v.resize(n + PAD, 0.0);
            v.truncate(n);
        }
        self
    }

    /// From GGUF Q8_0 blocks (`f16 d, i8 q[32]`, 34 bytes each).
    pub fn from_gguf_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Self::empty(n, k, QFormat::Q8)?;
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
        Ok(w.pad())
    }

    /// From GGUF Q4_1 blocks (`f16 d, f16 m, u8 qs[16]`, 20 bytes each).
    pub fn from_gguf_q4_1(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Self::empty(n, k, QFormat::Q4_1)?;
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
        Ok(w.pad())
    }

    /// Quantise a row-major f32 matrix to Q8 (round to nearest, scale amax/127).
    pub fn q8_from_f32(w: &[f32], n: usize, k: usize) -> Result<Self, QError> {
        let mut out = Self::empty(n, k, QFormat::Q8)?;
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
        Ok(out.pad())
    }

    /// Stack matrices of one format and width along `n` (q, k and v as one).
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, QError> {
        let first = parts.first().ok_or(QError::Mismatch)?;
        let (k, format) = (first.k, first.format);
        if parts.iter().any(|p| p.k != k || p.format != format) {
            return Err(QError::Mismatch);
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut out = Self::empty(n, k, format)?;
        out.qs.clear();
        out.d.clear();
        out.m.clear();
        for p in &parts {
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Ok(out.pad())
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
        self.qs.len() + self.d.len() * 4 + self.m.len() * 4
    }

    /// Row `j` back to f32 (tests, and the tied embedding).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        for b in 0..nb {
            let d = self.d[j * nb + b];
            let o = &mut out[b * QK..(b + 1) * QK];
            match self.format {
                QFormat::Q8 => {
                    let q = &self.qs[(j * nb + b) * QK..(j * nb + b + 1) * QK];
                    for (o, &v) in o.iter_mut().zip(q) {
                        *o = d * f32::from(v as i8);
                    }
                }
                QFormat::Q4_1 => {
                    let m = self.m[j * nb + b];
                    let q = &self.qs[(j * nb + b) * 16..(j * nb + b + 1) * 16];
                    for (i, &v) in q.iter().enumerate() {
                        o[i] = d * f32::from(v & 0x0f) + m;
                        o[i + 16] = d * f32::from(v >> 4) + m;
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

/// Lanes of a 16-lane vector that one block covers in each format's kernel:
/// a Q8 vector holds two blocks (8 lanes each), a Q4_1 vector four (4 lanes).
fn lanes_per_block(f: QFormat) -> usize {
    match f {
        QFormat::Q8 => 8,
        QFormat::Q4_1 => 4,
    }
}

/// Activations `[m, k]` quantised for one matrix format.
///
/// For Q8 the bytes keep their order, offset by 128 (unsigned). For Q4_1 each group of four blocks (or
/// the last two) is stored as the first halves of its blocks, then the second
/// halves, matching the low and high nibbles of the weights.
#[derive(Debug, Default)]
pub struct ActQ {
    m: usize,
    k: usize,
    format: Option<QFormat>,
    q: Vec<u8>,
    /// Per block scale, expanded to the lanes the block covers.
    dexp: Vec<f32>,
    /// Per block `d * sum(q)`: Q4_1's minimum term.
    s: Vec<f32>,
    d: Vec<f32>,
}

/// Where block `b` of a row puts its two halves, for Q4_1 activations.
#[inline]
fn q41_offsets(b: usize, nb: usize) -> (usize, usize) {
    let g = b / 4;
    let full = nb / 4;
    if g < full {
        let base = g * 128;
        let i = b % 4;
        (base + i * 16, base + 64 + i * 16)
    } else {
        let base = full * 128;
        let i = b - full * 4;
        (base + i * 16, base + 32 + i * 16)
    }
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
        let lanes = lanes_per_block(format);
        self.m = m;
        self.k = k;
        self.format = Some(format);
        self.q.clear();
        self.q.resize(m * k + PAD, 0);
        self.dexp.clear();
        self.dexp.resize(m * nb * lanes + PAD, 0.0);
        self.s.clear();
        self.s.resize(m * nb + PAD, 0.0);
        self.d.clear();
        self.d.resize(m * nb + PAD, 0.0);
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
            .zip(self.dexp[..m * nb * lanes].chunks_mut(per * nb * lanes))
            .map(|((((x, q), d), s), e)| std::sync::Mutex::new((x, q, d, s, e)))
            .collect();
        let task = |t: usize| {
            let Some(part) = parts.get(t) else { return };
            let mut g = part.lock().unwrap_or_else(|e| e.into_inner());
            let (x, q, d, s, e) = &mut *g;
            for (r, xr) in x.chunks_exact(k).enumerate() {
                quantize_row(
                    xr,
                    &mut q[r * k..(r + 1) * k],
                    &mut d[r * nb..(r + 1) * nb],
                    &mut s[r * nb..(r + 1) * nb],
                    &mut e[r * nb * lanes..(r + 1) * nb * lanes],
                    format,
                );
            }
        };
        match pool {
            Some(p) if threads > 1 => p.run(threads, &task),
            _ => task(0),
        }
    }
}

fn quantize_row(x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32], e: &mut [f32], f: QFormat) {
    let nb = x.len() / QK;
    let lanes = lanes_per_block(f);
    let mut tmp = [0u8; QK];
    for b in 0..nb {
        let (db, sum) = quantize_block(&x[b * QK..(b + 1) * QK], &mut tmp);
        match f {
            // Offset by 128 to unsigned bytes, the operand `vpdpbusd` wants
            // unsigned; the kernel takes 128 * sum(w) off again.
            QFormat::Q8 => {
                for (o, &v) in q[b * QK..(b + 1) * QK].iter_mut().zip(&tmp) {
                    *o = v ^ 0x80;
                }
            }
            QFormat::Q4_1 => {
                let (lo, hi) = q41_offsets(b, nb);
                q[lo..lo + 16].copy_from_slice(&tmp[..16]);
                q[hi..hi + 16].copy_from_slice(&tmp[16..]);
            }
        }
        d[b] = db;
        s[b] = db * sum as f32;
        e[b * lanes..(b + 1) * lanes].fill(db);
    }
}

/// `out[r * n + j] = x[r] . w[j]` for every row of `x` and column of `w`.
pub fn matmul(w: &QMatrix, x: &ActQ, out: &mut [f32], pool: &Pool) {
    let (n, k, m) = (w.n, w.k, x.m);
    assert_eq!(x.k, k, "activation width");
    assert_eq!(x.format, Some(w.format), "activation format");
    assert!(out.len() >= m * n, "output size");
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let simd = simd_available();
    // Column ranges, multiples of the column tile, claimed by the threads as
    // they come free: on a shared machine one core is often slower than the
    // other, and a fixed half each would leave the faster one waiting. One
    // activation row is bound by memory, not by the cores, and streams best
    // in one long range a thread; more rows take eight ranges a thread.
    let tasks = pool.threads();
    let split = if m == 1 { tasks } else { tasks * 8 };
    let per = n.div_ceil(split).div_ceil(COL_TILE).max(1) * COL_TILE;
    let ranges = n.div_ceil(per);
    let next = AtomicUsize::new(0);
    pool.run(tasks, &|_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= ranges {
            return;
        }
        let j0 = i * per;
        let j1 = (j0 + per).min(n);
        // SAFETY: each range is claimed by one task only, so tasks write
        // disjoint columns of `out`, which outlives `run` (it returns only
        // when every task is done). Which task computes a column does not
        // change its value.
        unsafe { columns(w, x, j0, j1, out_ptr, simd) };
    });
}

/// Weight rows (output columns) one kernel call computes.
const COL_TILE: usize = 4;
/// Activation rows one kernel call computes.
const ROW_TILE: usize = 4;

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used to write disjoint elements from pool tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Columns `j0..j1`, in tiles of up to 4 weight rows by 4 activation rows:
/// the weight rows of a tile are unpacked once for all its activation rows,
/// and the activation vectors loaded once for all its weight rows. The
/// weight tile stays in L1 while the activation rows pass over it.
///
/// Every output value gets the same sequence of operations whatever the tile
/// shape: a sequence alone, inside a batch, or inside a prefill chunk gives
/// bit-identical results.
unsafe fn columns(w: &QMatrix, x: &ActQ, j0: usize, j1: usize, out: SyncPtr, simd: bool) {
    let (n, m) = (w.n, x.m);
    #[cfg(target_arch = "x86_64")]
    if simd {
        let mut jt = j0;
        while jt < j1 {
            let cols = (j1 - jt).min(COL_TILE);
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(ROW_TILE);
                // SAFETY: `simd` is true only when the CPU has the features;
                // the tile lies inside `w`, `x` and `out`.
                avx512::tile(w, jt, cols, x, r0, rows, out.0, n);
                r0 += rows;
            }
            jt += cols;
        }
        return;
    }
    let _ = simd;
    for j in j0..j1 {
        for r in 0..m {
            *out.0.add(r * n + j) = dot_scalar(w, j, x, r);
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

/// The portable kernel: integer block dots, then the scales.
fn dot_scalar(w: &QMatrix, j: usize, x: &ActQ, r: usize) -> f32 {
    let k = w.k;
    let nb = k / QK;
    let xq = &x.q[r * k..(r + 1) * k];
    let mut sum = 0f32;
    for b in 0..nb {
        let wi = j * nb + b;
        let xi = r * nb + b;
        match w.format {
            QFormat::Q8 => {
                let wq = &w.qs[wi * QK..(wi + 1) * QK];
                let xb = &xq[b * QK..(b + 1) * QK];
                let dot: i32 = wq
                    .iter()
                    .zip(xb)
                    .map(|(&a, &c)| i32::from(a as i8) * (i32::from(c) - 128))
                    .sum();
                sum += dot as f32 * (w.d[wi] * x.d[xi]);
            }
            QFormat::Q4_1 => {
                let wq = &w.qs[wi * 16..(wi + 1) * 16];
                let (lo, hi) = q41_offsets(b, nb);
                let mut dot = 0i32;
                for (i, &v) in wq.iter().enumerate() {
                    dot += i32::from(v & 0x0f) * i32::from(xq[lo + i] as i8);
                    dot += i32::from(v >> 4) * i32::from(xq[hi + i] as i8);
                }
                sum += dot as f32 * (w.d[wi] * x.d[xi]) + w.m[wi] * x.s[xi];
            }
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ActQ, QFormat, QMatrix, COL_TILE, QK};
    use std::arch::x86_64::*;

    /// For each row and column, `(sum(a) + sum(b)) + sum(c)` over the lanes,
    /// stored for the first `cols` columns. A macro, not a function: vector
    /// arguments of a call that is not inlined go through memory, and
    /// `#[inline(always)]` cannot be combined with `#[target_feature]`.
    macro_rules! store {
        ($a:expr, $b:expr, $c:expr, $cols:expr, $r0:expr, $j:expr, $out:expr, $n:expr) => {{
            let mask: __mmask8 = (1u8 << $cols) - 1;
            for r in 0..$a.len() {
                let sa = reduce4!($a[r]);
                let sb = reduce4!($b[r]);
                let sc = reduce4!($c[r]);
                let sums = _mm_add_ps(_mm_add_ps(sa, sb), sc);
                _mm_mask_storeu_ps($out.add(($r0 + r) * $n + $j), mask, sums);
            }
        }};
    }

    /// The lane sums of four vectors, as one 4-lane vector, each added in
    /// the order of `_mm512_reduce_add_ps`: lane `i` with `i + 8`, then with
    /// `i + 4`, then `i + 2`, then `i + 1`. A macro for the reason `store` is.
    macro_rules! reduce4 {
        ($v:expr) => {{
            let [a, b, c, d] = $v;
            // 128-bit quarters: [a0+a2, a1+a3, b0+b2, b1+b3], the same for c, d.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(c, d),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(c, d),
            );
            // One quarter per vector: [a, b, c, d].
            let s = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
            );
            // Within each quarter: lanes (2,3,0,1), then (1,0,3,2).
            let s = _mm512_add_ps(s, _mm512_permute_ps::<0b01_00_11_10>(s));
            let s = _mm512_add_ps(s, _mm512_permute_ps::<0b10_11_00_01>(s));
            let first = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
            _mm512_castps512_ps128(_mm512_permutexvar_ps(first, s))
        }};
    }

    /// Output `[r0 + r, j + c]` for `r < rows`, `c < cols` (both at most 4)
    /// into `out`, a row-major matrix `n` wide.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI; the tile must lie inside `w`,
    /// `x` and `out`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        w: &QMatrix,
        j: usize,
        cols: usize,
        x: &ActQ,
        r0: usize,
        rows: usize,
        out: *mut f32,
        n: usize,
    ) {
        match (w.format, rows) {
            (QFormat::Q8, 1) => q8::<1>(w, j, cols, x, r0, out, n),
            (QFormat::Q8, 2) => q8::<2>(w, j, cols, x, r0, out, n),
            (QFormat::Q8, 3) => q8::<3>(w, j, cols, x, r0, out, n),
            (QFormat::Q8, _) => q8::<4>(w, j, cols, x, r0, out, n),
            (QFormat::Q4_1, 1) => q41::<1>(w, j, cols, x, r0, out, n),
            (QFormat::Q4_1, 2) => q41::<2>(w, j, cols, x, r0, out, n),
            (QFormat::Q4_1, 3) => q41::<3>(w, j, cols, x, r0, out, n),
            (QFormat::Q4_1, _) => q41::<4>(w, j, cols, x, r0, out, n),
        }
    }

    /// How far ahead, in weight rows, the kernels ask for weights: a matrix
    /// larger than the caches streams from memory, and the hardware
    /// prefetchers alone keep too few lines in flight for four interleaved
    /// row streams.
    const PREFETCH_ROWS: usize = 8;

    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    /// The weight row a tile column reads: a short last tile repeats its last
    /// row (never stored), so the kernel always runs four columns.
    #[inline(always)]
    fn row_of(j: usize, c: usize, cols: usize) -> usize {
        j + c.min(cols - 1)
    }

    /// Where each tile column's weight row starts: its quantised values,
    /// scales and (Q4_1) minimums.
    #[allow(clippy::type_complexity)]
    unsafe fn tile_rows(
        w: &QMatrix,
        j: usize,
        cols: usize,
    ) -> (
        [*const u8; COL_TILE],
        [*const f32; COL_TILE],
        [*const f32; COL_TILE],
    ) {
        let nb = w.k / QK;
        let row_bytes = match w.format {
            QFormat::Q8 => w.k,
            QFormat::Q4_1 => w.k / 2,
        };
        let mut wq = [std::ptr::null::<u8>(); COL_TILE];
        let mut wd = [std::ptr::null::<f32>(); COL_TILE];
        let mut wm = [std::ptr::null::<f32>(); COL_TILE];
        for c in 0..COL_TILE {
            let jr = row_of(j, c, cols);
            wq[c] = w.qs.as_ptr().add(jr * row_bytes);
            wd[c] = w.d.as_ptr().add(jr * nb);
            // Q8 has no minimums: a pointer that is never read.
            wm[c] = w.m.as_ptr().wrapping_add(jr * nb);
        }
        (wq, wd, wm)
    }

    /// Q8_0: each 64-byte step covers two blocks (8 lanes each). An odd
    /// last block is summed as an integer and scaled on its own, as the
    /// one-row kernel this replaced did, so results stay bit-identical.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn q8<const R: usize>(
        w: &QMatrix,
        j: usize,
        cols: usize,
        x: &ActQ,
        r0: usize,
        out: *mut f32,
        n: usize,
    ) {
        let k = w.k;
        let nb = k / QK;
        let zero = _mm512_setzero_si512();
        let bias = _mm512_set1_epi8(-128);
        let (wq, wd, _) = tile_rows(w, j, cols);
        let mut acc = [[_mm512_setzero_ps(); COL_TILE]; R];
        if R == 1 {
            // One activation row (a decode step): each weight row is read
            // through from start to end, the pattern memory streams best.
            for c in 0..COL_TILE {
                let mut one = [[_mm512_setzero_ps(); 1]; R];
                for p in 0..nb / 2 {
                    q8_step::<R, 1>(&mut one, &[wq[c]], &[wd[c]], x, r0, p, k, nb);
                }
                acc[0][c] = one[0][0];
            }
        } else {
            for p in 0..nb / 2 {
                q8_step::<R, COL_TILE>(&mut acc, &wq, &wd, x, r0, p, k, nb);
            }
        }
        let mut tail = [[_mm512_setzero_ps(); COL_TILE]; R];
        if nb % 2 == 1 {
            let b = nb - 1;
            let qmask: __mmask64 = (1 << 32) - 1;
            for (r, t) in tail.iter_mut().enumerate() {
                let row = r0 + r;
                let xv =
                    _mm512_maskz_loadu_epi8(qmask, x.q.as_ptr().add(row * k + b * QK) as *const i8);
                for c in 0..COL_TILE {
                    let v = _mm512_maskz_loadu_epi8(qmask, wq[c].add(b * QK) as *const i8);
                    let neg = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, v));
                    let s = _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(neg, xv, v));
                    let d = *wd[c].add(b) * x.d[row * nb + b];
                    t[c] = _mm512_castps128_ps512(_mm_set_ss(s as f32 * d));
                }
            }
        }
        let none = [[_mm512_setzero_ps(); COL_TILE]; R];
        store!(acc, tail, none, cols, r0, j, out, n);
    }

    /// Q4_1: each 64-byte step covers four blocks (4 lanes each), low
    /// nibbles against the first halves of the activation blocks, high
    /// nibbles against the second. Two last blocks (`k` = 64 mod 128) and
    /// the minimum term `sum(m * d_x * sum(q_x))` are summed apart and added
    /// at the end, in the order the one-row kernel this replaced used, so
    /// results stay bit-identical.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn q41<const R: usize>(
        w: &QMatrix,
        j: usize,
        cols: usize,
        x: &ActQ,
        r0: usize,
        out: *mut f32,
        n: usize,
    ) {
        let k = w.k;
        let nb = k / QK;
        debug_assert!(nb.is_multiple_of(2), "Q4_1 rows must be a multiple of 64");
        let (wq, wd, wm) = tile_rows(w, j, cols);
        let groups = nb / 4;
        let mut acc = [[_mm512_setzero_ps(); COL_TILE]; R];
        let mut tail = [[_mm512_setzero_ps(); COL_TILE]; R];
        let mut mins = [[_mm512_setzero_ps(); COL_TILE]; R];
        if R == 1 {
            // One activation row (a decode step): each weight row is read
            // through from start to end, scales and minimums after it, the
            // pattern memory streams best.
            for c in 0..COL_TILE {
                let (q1, d1) = ([wq[c]], [wd[c]]);
                let mut one = [[_mm512_setzero_ps(); 1]; R];
                for g in 0..groups {
                    q41_step::<R, 1, false>(&mut one, &q1, &d1, x, r0, g, k, nb);
                }
                acc[0][c] = one[0][0];
                if !nb.is_multiple_of(4) {
                    let mut one = [[_mm512_setzero_ps(); 1]; R];
                    q41_step::<R, 1, true>(&mut one, &q1, &d1, x, r0, groups, k, nb);
                    tail[0][c] = one[0][0];
                }
                mins[0][c] = q41_mins(wm[c], x.s.as_ptr().add(r0 * nb), nb);
            }
        } else {
            for g in 0..groups {
                q41_step::<R, COL_TILE, false>(&mut acc, &wq, &wd, x, r0, g, k, nb);
            }
            // Two blocks left: one half step, summed apart.
            if !nb.is_multiple_of(4) {
                q41_step::<R, COL_TILE, true>(&mut tail, &wq, &wd, x, r0, groups, k, nb);
            }
            for (r, mr) in mins.iter_mut().enumerate() {
                let xs = x.s.as_ptr().add((r0 + r) * nb);
                for c in 0..COL_TILE {
                    mr[c] = q41_mins(wm[c], xs, nb);
                }
            }
        }
        store!(acc, tail, mins, cols, r0, j, out, n);
    }

    /// Q4_1's minimum term `sum(m * d_x * sum(q_x))` of one weight row and
    /// one activation row, 16 blocks at a time, lane sums left to the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn q41_mins(wm: *const f32, xs: *const f32, nb: usize) -> __m512 {
        let mut macc = _mm512_setzero_ps();
        let mut b = 0;
        while b < nb {
            let left = (nb - b).min(16);
            let mask: __mmask16 = if left == 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            let mv = _mm512_maskz_loadu_ps(mask, wm.add(b));
            let sv = _mm512_maskz_loadu_ps(mask, xs.add(b));
            macc = _mm512_fmadd_ps(mv, sv, macc);
            b += 16;
        }
        macc
    }

    /// One step of [`q8`]: blocks `2p` and `2p + 1` of `CS` weight rows
    /// against `R` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn q8_step<const R: usize, const CS: usize>(
        acc: &mut [[__m512; CS]; R],
        wq: &[*const u8; CS],
        wd: &[*const f32; CS],
        x: &ActQ,
        r0: usize,
        p: usize,
        k: usize,
        nb: usize,
    ) {
        let zero = _mm512_setzero_si512();
        let bias = _mm512_set1_epi8(-128);
        // Lanes 0..8 take the first block's scale, 8..16 the second's.
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut v = [zero; CS];
        let mut neg = [zero; CS];
        let mut d2 = [_mm512_setzero_ps(); CS];
        for c in 0..CS {
            // Only the first rows of a tile meet the weights cold.
            if CS > 1 && r0 == 0 {
                prefetch(wq[c].wrapping_add(p * 64 + PREFETCH_ROWS * k));
                prefetch(wd[c].wrapping_add(p * 2 + PREFETCH_ROWS * nb));
            }
            v[c] = _mm512_loadu_si512(wq[c].add(p * 64) as *const _);
            // -128 * w summed per lane: the activations' offset, taken off by
            // starting each dot product from it.
            neg[c] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, v[c]));
            d2[c] =
                _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(wd[c].add(p * 2))));
        }
        for r in 0..R {
            let row = r0 + r;
            let xv = _mm512_loadu_si512(x.q.as_ptr().add(row * k + p * 64) as *const _);
            let dx = _mm512_loadu_ps(x.dexp.as_ptr().add((row * nb + p * 2) * 8));
            for c in 0..CS {
                let dot = _mm512_dpbusd_epi32(neg[c], xv, v[c]);
                acc[r][c] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d2[c], dx), acc[r][c]);
            }
        }
    }

    /// One step of [`q41`]: blocks `4g..4g+4` (`HALF`: `4g..4g+2`, under
    /// masks: 32 weight bytes, 32 activation bytes a half, 8 lanes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn q41_step<const R: usize, const CS: usize, const HALF: bool>(
        acc: &mut [[__m512; CS]; R],
        wq: &[*const u8; CS],
        wd: &[*const f32; CS],
        x: &ActQ,
        r0: usize,
        g: usize,
        k: usize,
        nb: usize,
    ) {
        let zero = _mm512_setzero_si512();
        let low = _mm512_set1_epi8(0x0f);
        let idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let (qmask, dmask, smask, half): (__mmask64, __mmask16, __mmask8, usize) = if HALF {
            ((1 << 32) - 1, 0x00ff, 0b0011, 32)
        } else {
            (!0, 0xffff, 0b1111, 64)
        };
        let mut lo = [zero; CS];
        let mut hi = [zero; CS];
        let mut d4 = [_mm512_setzero_ps(); CS];
        for c in 0..CS {
            // Only the first rows of a tile meet the weights cold.
            if CS > 1 && r0 == 0 {
                prefetch(wq[c].wrapping_add(g * 64 + PREFETCH_ROWS * k / 2));
                prefetch(wd[c].wrapping_add(g * 4 + PREFETCH_ROWS * nb));
            }
            let v = if HALF {
                _mm512_maskz_loadu_epi8(qmask, wq[c].add(g * 64) as *const i8)
            } else {
                _mm512_loadu_si512(wq[c].add(g * 64) as *const _)
            };
            lo[c] = _mm512_and_si512(v, low);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            let d = if HALF {
                _mm_maskz_loadu_ps(smask, wd[c].add(g * 4))
            } else {
                _mm_loadu_ps(wd[c].add(g * 4))
            };
            d4[c] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(d));
        }
        for r in 0..R {
            let row = r0 + r;
            let xp = x.q.as_ptr().add(row * k + g * 128);
            let (xl, xh, dx) = if HALF {
                (
                    _mm512_maskz_loadu_epi8(qmask, xp as *const i8),
                    _mm512_maskz_loadu_epi8(qmask, xp.add(half) as *const i8),
                    _mm512_maskz_loadu_ps(dmask, x.dexp.as_ptr().add((row * nb + g * 4) * 4)),
                )
            } else {
                (
                    _mm512_loadu_si512(xp as *const _),
                    _mm512_loadu_si512(xp.add(half) as *const _),
                    _mm512_loadu_ps(x.dexp.as_ptr().add((row * nb + g * 4) * 4)),
                )
            };
            for c in 0..CS {
                let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[c], xl), hi[c], xh);
                acc[r][c] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d4[c], dx), acc[r][c]);
            }
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

    fn check(w: &QMatrix, m: usize, seed: &mut u64, pool: &Pool) {
        let (n, k) = (w.rows(), w.cols());
        let x: Vec<f32> = (0..m * k).map(|_| lcg(seed)).collect();
        let mut a = ActQ::default();
        a.quantize(&x, m, k, w.format());
        let mut y = vec![0f32; m * n];
        matmul(w, &a, &mut y, pool);
        let mut wr = vec![0f32; k];
        for j in 0..n {
            w.dequantize_row(j, &mut wr);
            for r in 0..m {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wr[i]).sum();
                let scale: f32 = (0..k).map(|i| (x[r * k + i] * wr[i]).abs()).sum();
                let err = (y[r * n + j] - exact).abs();
                assert!(
                    err <= 0.02 * scale + 1e-4,
                    "{r},{j}: {} vs {exact}",
                    y[r * n + j]
                );
                let simd = simd_available();
                let s = dot_scalar(w, j, &a, r);
                assert!(
                    (s - y[r * n + j]).abs() <= 1e-3 * scale + 1e-5,
                    "scalar {simd}"
                );
            }
        }
        // Each row alone gives bit-identical output.
        for r in 0..m {
            let mut a1 = ActQ::default();
            a1.quantize(&x[r * k..(r + 1) * k], 1, k, w.format());
            let mut y1 = vec![0f32; n];
            matmul(w, &a1, &mut y1, pool);
            assert_eq!(&y1[..], &y[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn q8_matches_reference_and_is_batch_independent() {
        let pool = Pool::new(2);
        let mut s = 7u64;
        for &(n, k, m) in &[(37, 96, 6), (64, 576, 9), (5, 32, 1)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let q = QMatrix::q8_from_f32(&w, n, k).unwrap();
            check(&q, m, &mut s, &pool);
        }
    }

    #[test]
    fn q4_1_matches_reference_and_is_batch_independent() {
        let pool = Pool::new(2);
        let mut s = 11u64;
        for &(n, k, m) in &[(33, 576, 7), (16, 128, 1), (9, 64, 5), (12, 1536, 3)] {
            let bytes = q41_bytes(n, k, &mut s);
            let q = QMatrix::from_gguf_q4_1(&bytes, n, k).unwrap();
            check(&q, m, &mut s, &pool);
        }
    }

    #[test]
    fn stacking_keeps_rows_and_refuses_mixed_formats() {
        let mut s = 3u64;
        let a: Vec<f32> = (0..2 * 64).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..3 * 64).map(|_| lcg(&mut s)).collect();
        let qa = QMatrix::q8_from_f32(&a, 2, 64).unwrap();
        let qb = QMatrix::q8_from_f32(&b, 3, 64).unwrap();
        let st = QMatrix::stack(vec![qa.clone(), qb]).unwrap();
        assert_eq!(st.rows(), 5);
        let (mut r1, mut r2) = (vec![0f32; 64], vec![0f32; 64]);
        qa.dequantize_row(1, &mut r1);
        st.dequantize_row(1, &mut r2);
        assert_eq!(r1, r2);
        let q4 = QMatrix::from_gguf_q4_1(&q41_bytes(1, 64, &mut s), 1, 64).unwrap();
        assert!(QMatrix::stack(vec![qa, q4]).is_err());
        assert!(QMatrix::q8_from_f32(&[0.0; 33], 1, 33).is_err());
    }
}
