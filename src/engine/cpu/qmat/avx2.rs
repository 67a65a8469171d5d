//! The AVX2 kernel: the panel layout of the AVX-512 one, half a panel (eight
//! columns, one per 32-bit lane) a vector. AVX2 has no byte dot product into
//! 32-bit lanes, so a block's products are `vpmaddubsw` (pairs of unsigned
//! by signed bytes into 16-bit lanes) summed in 16 bits where that cannot
//! overflow, then widened by `vpmaddwd` against ones. The integer sums are
//! exact, so every output gets [`super::reference`]'s bits.
//!
//! Where the CPU has AVX-VNNI (the VEX-encoded `vpdpbusd` of AMD Zen 5 and
//! Intel's cores since Alder Lake, AVX-512 or not), the same loops take a
//! block's products straight into 32-bit lanes, as the AVX-512 VNNI
//! kernel does, four bytes a lane an instruction ([`panel_vnni`]).

use super::{ActQ, QFormat, QMatrix, PANEL, QK};
use std::arch::x86_64::*;

/// Activation rows that share one pass over a half panel's weights: the
/// eight weight vectors of a block stay in registers while each row's
/// products are taken against them.
const ROWS: usize = 4;

/// Panel `p` for every activation row, [`ROWS`] rows at a time (the
/// panel's records stay in L1 for the later groups).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out` must hold `x.m * w.n` values, and
/// `x` must be quantised for `w`.
pub unsafe fn panel(w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
    // SAFETY: the caller's contract, passed on to every group of rows.
    unsafe { by_rows!(rows_of, w, x, p, out) }
}

/// [`panel`] with AVX-VNNI's byte dot products.
///
/// # Safety
/// As [`panel`], and the CPU must have AVX-VNNI.
pub unsafe fn panel_vnni(w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
    // SAFETY: the caller's contract, passed on to every group of rows.
    unsafe { by_rows!(rows_vnni, w, x, p, out) }
}

/// Every activation row of panel `p` through `$rows`, [`ROWS`] at a time:
/// each call covers rows `r0..r0 + rows` of `x` (`rows <= x.m - r0`) with
/// the kernel of `w`'s format.
macro_rules! by_rows {
    ($rows:ident, $w:expr, $x:expr, $p:expr, $out:expr) => {{
        let (w, x, p, out) = ($w, $x, $p, $out);
        let mut r0 = 0;
        while r0 < x.m {
            let rows = (x.m - r0).min(ROWS);
            macro_rules! go {
                ($q41:expr) => {
                    match rows {
                        1 => $rows::<1, $q41>(w, x, p, r0, out),
                        2 => $rows::<2, $q41>(w, x, p, r0, out),
                        3 => $rows::<3, $q41>(w, x, p, r0, out),
                        _ => $rows::<ROWS, $q41>(w, x, p, r0, out),
                    }
                };
            }
            match w.format {
                QFormat::Q8 => go!(false),
                QFormat::Q4_1 => go!(true),
            }
            r0 += rows;
        }
    }};
}
use by_rows;

/// How far ahead the first pass over a panel asks for its records: a decode
/// step streams them from memory.
const PREFETCH_BYTES: usize = 1024;

/// Defines `$name`, the kernel for rows `r0..r0 + R` of panel `p` (`Q41`
/// picks the format), built for `$features`; `$vnni` says whether a
/// block's products are AVX-VNNI dot products. One half panel at a time,
/// over every block: `R` accumulators and a block's eight weight vectors
/// fit the sixteen registers.
///
/// One body for both, compiled twice: each function must carry its own
/// target features for the intrinsics to be inlined into it.
macro_rules! rows_kernel {
    ($name:ident, $features:literal, $vnni:literal) => {
        /// # Safety
        /// As [`panel`] (and [`panel_vnni`] for the AVX-VNNI one), for a
        /// panel `p` of `w`, rows `r0..r0 + R` that `x` holds, and `Q41`
        /// true exactly when `w` is Q4_1.
        #[target_feature(enable = $features)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn $name<const R: usize, const Q41: bool>(
            w: &QMatrix,
            x: &ActQ,
            p: usize,
            r0: usize,
            out: *mut f32,
        ) {
            // SAFETY: every pointer below stays inside `w`'s panel `p` (its
            // records), inside rows `r0..r0 + R` of `x` or inside those rows
            // of `out`, and the CPU has the target features: the caller's
            // contract.
            unsafe {
                let (n, k) = (w.n, w.k);
                let nb = k / QK;
                let (rl, vl) = (w.format.record_lines(), w.format.value_lines());
                let base = w.data.as_ptr().add(p * nb * rl) as *const u8;
                let low = _mm256_set1_epi8(0x0f);
                let ones = _mm256_set1_epi16(1);
                let cols = (n - p * PANEL).min(PANEL);
                for h in 0..2 {
                    if h * 8 >= cols {
                        break;
                    }
                    let half = base.add(h * 32);
                    let mut acc = [_mm256_setzero_ps(); R];
                    for b in 0..nb {
                        let rec = half.add(b * rl * 64);
                        if h == 0 && r0 == 0 {
                            for l in (0..rl * 64).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    rec.wrapping_add(PREFETCH_BYTES + l) as *const i8
                                );
                            }
                        }
                        // Vector `t`: the bytes of the block that meet
                        // activation word `t` (bytes `4t..4t+4`), for each
                        // of the eight columns.
                        let mut wv = [_mm256_setzero_si256(); 8];
                        if Q41 {
                            for t in 0..4 {
                                let v = _mm256_load_si256(rec.add(t * 64) as *const __m256i);
                                wv[t] = _mm256_and_si256(v, low);
                                wv[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            }
                        } else if $vnni {
                            // Stored offset by 128: the unsigned operand as
                            // it is, the offset taken out by the row's
                            // correction (`ActQ::c`).
                            for t in 0..8 {
                                wv[t] = _mm256_load_si256(rec.add(t * 64) as *const __m256i);
                            }
                        } else {
                            // Stored offset by 128: back to signed, then |w|
                            // as the unsigned operand (the activation takes
                            // w's sign).
                            let flip = _mm256_set1_epi8(i8::MIN);
                            for t in 0..8 {
                                let v = _mm256_load_si256(rec.add(t * 64) as *const __m256i);
                                wv[t] = _mm256_xor_si256(v, flip);
                            }
                        }
                        let dw = _mm256_load_ps(rec.add(vl * 64) as *const f32);
                        for r in 0..R {
                            let xi = (r0 + r) * nb + b;
                            let xp = x.q.as_ptr().add((r0 + r) * k + b * QK) as *const i32;
                            // Macros, not closures: a closure need not
                            // inherit the function's target features.
                            macro_rules! xw {
                                ($t:expr) => {
                                    _mm256_set1_epi32(xp.add($t).read_unaligned())
                                };
                            }
                            let dot = if $vnni {
                                // Two chains halve the dependency on
                                // `vpdpbusd`'s latency; integer sums are
                                // exact in any order.
                                let mut s0 = if Q41 {
                                    _mm256_setzero_si256()
                                } else {
                                    _mm256_set1_epi32(*x.c.get_unchecked(xi))
                                };
                                let mut s1 = _mm256_setzero_si256();
                                for t in (0..8).step_by(2) {
                                    s0 = _mm256_dpbusd_avx_epi32(s0, wv[t], xw!(t));
                                    s1 = _mm256_dpbusd_avx_epi32(s1, wv[t + 1], xw!(t + 1));
                                }
                                _mm256_add_epi32(s0, s1)
                            } else if Q41 {
                                // Nibbles by bytes: a 16-bit lane holds two
                                // products of at most 15 * 127, so eight
                                // such lanes summed stay below 2^15. Two
                                // chains for the adds' latency.
                                let mut s0 = _mm256_maddubs_epi16(wv[0], xw!(0));
                                let mut s1 = _mm256_maddubs_epi16(wv[1], xw!(1));
                                for t in (2..8).step_by(2) {
                                    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(wv[t], xw!(t)));
                                    s1 = _mm256_add_epi16(
                                        s1,
                                        _mm256_maddubs_epi16(wv[t + 1], xw!(t + 1)),
                                    );
                                }
                                _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones)
                            } else {
                                // |w| by x with w's sign: two products of at
                                // most 128 * 127 a lane, which fits 16 bits
                                // but no sum of two lanes does; each is
                                // widened.
                                macro_rules! prod {
                                    ($t:expr) => {{
                                        let a = _mm256_abs_epi8(wv[$t]);
                                        let s = _mm256_sign_epi8(xw!($t), wv[$t]);
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(a, s), ones)
                                    }};
                                }
                                let mut s0 = prod!(0);
                                let mut s1 = prod!(1);
                                for t in (2..8).step_by(2) {
                                    s0 = _mm256_add_epi32(s0, prod!(t));
                                    s1 = _mm256_add_epi32(s1, prod!(t + 1));
                                }
                                _mm256_add_epi32(s0, s1)
                            };
                            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xi)));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                        }
                    }
                    if Q41 {
                        let terms = mins::<R>(w, p, h, x, r0);
                        for r in 0..R {
                            acc[r] = _mm256_add_ps(acc[r], terms[r]);
                        }
                    }
                    let valid = (cols - h * 8).min(8);
                    for r in 0..R {
                        let o = out.add((r0 + r) * n + p * PANEL + h * 8);
                        if valid == 8 {
                            _mm256_storeu_ps(o, acc[r]);
                        } else {
                            let mut tmp = [0f32; 8];
                            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r]);
                            std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, valid);
                        }
                    }
                }
            }
        }
    };
}

rows_kernel!(rows_of, "avx2,fma", false);
rows_kernel!(rows_vnni, "avx2,fma,avxvnni", true);

/// Q4_1's minimum terms of half `h` of panel `p` for activation rows
/// `r0..r0 + N`, each summed as [`super::reference`] does: even and odd
/// blocks apart, then added. A pass of its own after the dot products,
/// which then need fewer registers; the panel's records are still in L1.
///
/// # Safety
/// As [`panel`], for a Q4_1 matrix and rows that `x` holds.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn mins<const N: usize>(
    w: &QMatrix,
    p: usize,
    h: usize,
    x: &ActQ,
    r0: usize,
) -> [__m256; N] {
    // SAFETY: the loads stay inside panel `p`'s records and inside rows
    // `r0..r0 + N` of `x`, and the CPU has the target features: the caller's
    // contract.
    unsafe {
        let nb = w.k / QK;
        let rl = w.format.record_lines();
        let first = (w
            .data
            .as_ptr()
            .add(p * nb * rl + w.format.value_lines() + 1) as *const f32)
            .add(h * 8);
        let xs = x.s.as_ptr().add(r0 * nb);
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let mut b = 0;
        while b + 1 < nb {
            let m0 = _mm256_load_ps(first.add(b * rl * 16));
            let m1 = _mm256_load_ps(first.add((b + 1) * rl * 16));
            for i in 0..N {
                even[i] = _mm256_fmadd_ps(m0, _mm256_set1_ps(*xs.add(i * nb + b)), even[i]);
                odd[i] = _mm256_fmadd_ps(m1, _mm256_set1_ps(*xs.add(i * nb + b + 1)), odd[i]);
            }
            b += 2;
        }
        if b < nb {
            let m0 = _mm256_load_ps(first.add(b * rl * 16));
            for i in 0..N {
                even[i] = _mm256_fmadd_ps(m0, _mm256_set1_ps(*xs.add(i * nb + b)), even[i]);
            }
        }
        let mut out = [_mm256_setzero_ps(); N];
        for i in 0..N {
            out[i] = _mm256_add_ps(even[i], odd[i]);
        }
        out
    }
}
