//! The AVX-512 VNNI kernel: lane `c` of every vector is column `c` of the
//! panel, so a block's 32 products for 16 columns are eight `vpdpbusd`
//! against four activation bytes broadcast to every lane.

use super::{ActQ, QFormat, QMatrix, PANEL, QK};
use std::arch::x86_64::*;

/// Panel `p` for every activation row, up to eight rows at a time (the
/// panel's records stay in L1 for the later groups).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI; `out` must hold `x.m * w.n`
/// values, and `x` must be quantised for `w`.
pub unsafe fn panel(w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
    // SAFETY: the caller's contract, and each call covers rows `r0..r0 + rows`
    // of `x` (`rows <= x.m - r0`) with the kernel of `w`'s format.
    unsafe {
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
}

/// How far ahead a thread asks for its panel's records: a decode step
/// streams them from memory.
const PREFETCH_BYTES: usize = 1024;

/// Rows `r0..r0 + R` of panel `p`; `Q41` picks the format.
///
/// # Safety
/// As [`panel`], for a panel `p` of `w`, rows `r0..r0 + R` that `x` holds,
/// and `Q41` true exactly when `w` is Q4_1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)]
unsafe fn rows_of<const R: usize, const Q41: bool>(
    w: &QMatrix,
    x: &ActQ,
    p: usize,
    r0: usize,
    out: *mut f32,
) {
    // SAFETY: every pointer below stays inside `w`'s panel `p` (its records),
    // inside rows `r0..r0 + R` of `x` or inside those rows of `out`, and the
    // CPU has the target features: the caller's contract.
    unsafe {
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
    // SAFETY: the loads stay inside panel `p`'s records and inside rows
    // `r0..r0 + N` of `x`, and the CPU has the target features: the caller's
    // contract.
    unsafe {
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
