//! Activation quantisation: each row in blocks of 32 signed bytes with a
//! scale, and the per-block terms the kernels need (scalar, AVX2 and
//! AVX-512, to the same bits).

use super::detect::{isa, Isa};
use super::format::QFormat;
use super::{AMX_MIN_ROWS, QK, TILE_ROWS};
use crate::engine::cpu::pool::Pool;

/// Quantise one block to signed bytes; returns the scale and the sum of the
/// quantised values.
#[inline]
pub(super) fn quantize_block(x: &[f32], q: &mut [u8]) -> (f32, i32) {
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
pub(super) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == QK && q.len() == QK);
    // SAFETY: `x` holds 32 values (the caller's contract).
    let v = unsafe {
        [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ]
    };
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
        // One step away from zero: +1 or -1 with the sign of y (the sign
        // bit moved with integer operations, which AVX-512F has).
        let sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN));
        let step = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(one), sign));
        let r = _mm512_mask_add_ps(t, away, t, step);
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let i = _mm512_cvttps_epi32(r);
        sum = _mm512_add_epi32(sum, i);
        // SAFETY: `q` holds 32 bytes (the caller's contract), `h` is 0 or 1.
        unsafe {
            _mm_storeu_si128(
                q.as_mut_ptr().add(h * 16) as *mut __m128i,
                _mm512_cvtepi32_epi8(i),
            )
        };
    }
    (d, _mm512_reduce_add_epi32(sum))
}

/// [`quantize_block`] with AVX2 vectors, to the same bits, as
/// [`quantize_block_avx512`] does it.
///
/// # Safety
/// The CPU must have AVX2; `x` and `q` must hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block_avx2(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == QK && q.len() == QK);
    // SAFETY: `x` holds 32 values (the caller's contract).
    let v = unsafe {
        [
            _mm256_loadu_ps(x.as_ptr()),
            _mm256_loadu_ps(x.as_ptr().add(8)),
            _mm256_loadu_ps(x.as_ptr().add(16)),
            _mm256_loadu_ps(x.as_ptr().add(24)),
        ]
    };
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    macro_rules! abs {
        ($v:expr) => {
            _mm256_and_ps($v, abs_mask)
        };
    }
    let m = _mm256_max_ps(
        _mm256_max_ps(abs!(v[0]), abs!(v[1])),
        _mm256_max_ps(abs!(v[2]), abs!(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    // As the scalar code: a block of zeros (or of -0.0) has amax 0.
    let amax = _mm_cvtss_f32(m).max(0.0);
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let sign_bit = _mm256_set1_ps(-0.0);
    let mut sum = _mm256_setzero_si256();
    let mut ints = [_mm256_setzero_si256(); 4];
    for (v, out) in v.into_iter().zip(ints.iter_mut()) {
        let y = _mm256_mul_ps(v, inv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        // Where the dropped fraction is at least a half, one step away from
        // zero (+1 or -1 with the sign of y), as `f32::round`.
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(abs!(_mm256_sub_ps(y, t)), half);
        let step = _mm256_or_ps(one, _mm256_and_ps(y, sign_bit));
        let r = _mm256_add_ps(t, _mm256_and_ps(away, step));
        let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        let i = _mm256_cvttps_epi32(r);
        sum = _mm256_add_epi32(sum, i);
        *out = i;
    }
    // Within -127..=127, so the saturating packs are exact; they interleave
    // the 128-bit lanes, which the permutation undoes.
    let a = _mm256_packs_epi32(ints[0], ints[1]);
    let b = _mm256_packs_epi32(ints[2], ints[3]);
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(a, b),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    // SAFETY: `q` holds 32 bytes (the caller's contract).
    unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes) };
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (d, _mm_cvtsi128_si32(s))
}

/// Activations `[m, k]` quantised per block of 32 to signed bytes in their
/// own order, with what the kernels need per block.
#[derive(Debug, Default)]
pub struct ActQ {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) format: Option<QFormat>,
    /// `[rows][k]` signed bytes; from `AMX_MIN_ROWS` rows on, padded with
    /// zeros to whole AMX tiles.
    pub(super) q: Vec<u8>,
    /// Per block scale, `[rows][k / 32]`.
    pub(super) d: Vec<f32>,
    /// Per block `d * sum(q)`: Q4_1's minimum term.
    pub(super) s: Vec<f32>,
    /// Per block `-128 * sum(q)`: what Q8's offset weights add to a dot.
    pub(super) c: Vec<i32>,
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
    let set = isa();
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        #[cfg(target_arch = "x86_64")]
        let (db, sum) = match set {
            // SAFETY: the CPU has AVX-512 F/BW (the selected set runs only
            // where it does); both blocks hold 32 values.
            Isa::Avx512 => unsafe { quantize_block_avx512(xb, qb) },
            // SAFETY: as above, for AVX2.
            Isa::Avx2 | Isa::AvxVnni => unsafe { quantize_block_avx2(xb, qb) },
            Isa::Portable => quantize_block(xb, qb),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (db, sum) = {
            let _ = set;
            quantize_block(xb, qb)
        };
        d[b] = db;
        s[b] = db * sum as f32;
        c[b] = -128 * sum;
    }
}
