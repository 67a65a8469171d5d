//! Attention's two inner loops: the scores of one query against a run of
//! cached keys, and the score-weighted sum of the cached values.
//!
//! Written as plain loops, the scores loop is a dot product per key whose
//! sixteen lanes are summed one key at a time; the AVX-512 version takes
//! sixteen keys at once and sums their lanes together in one transposing
//! tree. Both versions perform exactly the same additions in the same order
//! (lane `i` with `i + 8`, then `i + 4`, `i + 2`, `i + 1`, as [`super::dot`]),
//! so the logits do not depend on which one ran. The AVX2 version holds a
//! key's sixteen lanes in two vectors and sums eight keys' lanes together
//! by the same tree.

use super::dot;
use super::qmat::{isa, Isa};

/// `out[j] = dot(q, k_j) * scale` for `j < out.len()`, where key `j` is
/// `keys[j * stride + off..][..q.len()]`.
pub fn scores(q: &[f32], keys: &[f32], stride: usize, off: usize, scale: f32, out: &mut [f32]) {
    scores_with(isa(), q, keys, stride, off, scale, out)
}

/// [`scores`] with the loops of `set`, which the CPU must run.
fn scores_with(
    set: Isa,
    q: &[f32],
    keys: &[f32],
    stride: usize,
    off: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let len = out.len();
    assert!(
        len == 0 || (len - 1) * stride + off + hd <= keys.len(),
        "keys"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if set == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 (the set runs only where it does);
        // every key read lies inside `keys` (asserted above).
        done = unsafe {
            match hd {
                64 => avx512::scores::<4>(q, keys, stride, off, scale, out),
                128 => avx512::scores::<8>(q, keys, stride, off, scale, out),
                _ => 0,
            }
        };
    } else if set.avx2_family() {
        // SAFETY: as above, for AVX2 and FMA.
        done = unsafe {
            match hd {
                64 => avx2::scores::<4>(q, keys, stride, off, scale, out),
                128 => avx2::scores::<8>(q, keys, stride, off, scale, out),
                _ => 0,
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = set;
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        let at = j * stride + off;
        *o = dot(q, &keys[at..at + hd]) * scale;
    }
}

/// `acc[d] += w[j] * v_j[d]` for every `j` in order, where value `j` is
/// `values[j * stride + off..][..acc.len()]`.
pub fn weighted_sum(w: &[f32], values: &[f32], stride: usize, off: usize, acc: &mut [f32]) {
    weighted_sum_with(isa(), w, values, stride, off, acc)
}

/// [`weighted_sum`] with the loops of `set`, which the CPU must run.
fn weighted_sum_with(
    set: Isa,
    w: &[f32],
    values: &[f32],
    stride: usize,
    off: usize,
    acc: &mut [f32],
) {
    let hd = acc.len();
    assert!(
        w.is_empty() || (w.len() - 1) * stride + off + hd <= values.len(),
        "values"
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = set;
    #[cfg(target_arch = "x86_64")]
    if set == Isa::Avx512 && (hd == 64 || hd == 128) {
        // SAFETY: as in `scores`.
        unsafe {
            if hd == 64 {
                avx512::weighted_sum::<4>(w, values, stride, off, acc)
            } else {
                avx512::weighted_sum::<8>(w, values, stride, off, acc)
            }
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if set.avx2_family() && (hd == 64 || hd == 128) {
        // SAFETY: as in `scores`.
        unsafe {
            if hd == 64 {
                avx2::weighted_sum::<4>(w, values, stride, off, acc)
            } else {
                avx2::weighted_sum::<8>(w, values, stride, off, acc)
            }
        };
        return;
    }
    for (j, &wj) in w.iter().enumerate() {
        let v = &values[j * stride + off..j * stride + off + hd];
        for (a, x) in acc.iter_mut().zip(v) {
            *a += wj * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Scores of every key: lanes `0..8` and `8..16` of the plain loop's
    /// sixteen in two vectors, then the same tree, eight keys at a time
    /// with their lanes summed together (a whole horizontal sum per key
    /// costs more shuffles than the products), the rest one at a time.
    /// Returns how many keys it did. `C` is the head size in vectors of
    /// sixteen.
    ///
    /// # Safety
    /// As [`super::avx512::scores`], for AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores<const C: usize>(
        q: &[f32],
        keys: &[f32],
        stride: usize,
        off: usize,
        scale: f32,
        out: &mut [f32],
    ) -> usize {
        let zero = _mm256_setzero_ps();
        let mut qv = [[zero; 2]; C];
        for (c, v) in qv.iter_mut().enumerate() {
            // SAFETY: `q` holds `16 * C` values (the caller's contract).
            unsafe {
                v[0] = _mm256_loadu_ps(q.as_ptr().add(16 * c));
                v[1] = _mm256_loadu_ps(q.as_ptr().add(16 * c + 8));
            }
        }
        // Key `j`'s lanes `i` plus `i + 8` (the first step of the tree). A
        // macro, not a closure: a closure need not inherit the function's
        // target features.
        macro_rules! half_sums {
            ($j:expr) => {{
                let key = $j * stride + off;
                let (mut lo, mut hi) = (zero, zero);
                for (c, v) in qv.iter().enumerate() {
                    // SAFETY: the key's `16 * C` values lie inside `keys`
                    // (the caller's contract), as `j < out.len()`.
                    let (a, b) = unsafe {
                        (
                            _mm256_loadu_ps(keys.as_ptr().add(key + 16 * c)),
                            _mm256_loadu_ps(keys.as_ptr().add(key + 16 * c + 8)),
                        )
                    };
                    lo = _mm256_fmadd_ps(v[0], a, lo);
                    hi = _mm256_fmadd_ps(v[1], b, hi);
                }
                _mm256_add_ps(lo, hi)
            }};
        }
        let scale_v = _mm256_set1_ps(scale);
        // After the tree below, lane 4h + t holds key 2t + h.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let blocks = out.len() / 8;
        for b in 0..blocks {
            let mut s8 = [zero; 8];
            for (t, st) in s8.iter_mut().enumerate() {
                *st = half_sums!(8 * b + t);
            }
            // With i + 4: two keys a vector, one per 128-bit half.
            let mut t4 = [zero; 4];
            for (a, ta) in t4.iter_mut().enumerate() {
                let (x, y) = (s8[2 * a], s8[2 * a + 1]);
                *ta = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(x, y),
                    _mm256_permute2f128_ps::<0x31>(x, y),
                );
            }
            // With i + 2, then i + 1, within the halves.
            let mut u2 = [zero; 2];
            for (a, ua) in u2.iter_mut().enumerate() {
                let (x, y) = (t4[2 * a], t4[2 * a + 1]);
                *ua = _mm256_add_ps(
                    _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
                    _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
                );
            }
            let f = _mm256_add_ps(
                _mm256_shuffle_ps::<0b10_00_10_00>(u2[0], u2[1]),
                _mm256_shuffle_ps::<0b11_01_11_01>(u2[0], u2[1]),
            );
            let s = _mm256_mul_ps(_mm256_permutevar8x32_ps(f, order), scale_v);
            // SAFETY: `8 * b + 8 <= out.len()`, as `b < out.len() / 8`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * b), s) };
        }
        for (j, o) in out.iter_mut().enumerate().skip(blocks * 8) {
            // Lane i with i + 8, i + 4, i + 2, i + 1.
            let s8 = half_sums!(j);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
            *o = _mm_cvtss_f32(s1) * scale;
        }
        out.len()
    }

    /// [`super::weighted_sum`] for a head of `16 * C` values.
    ///
    /// # Safety
    /// As [`super::avx512::weighted_sum`], for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum<const C: usize>(
        w: &[f32],
        values: &[f32],
        stride: usize,
        off: usize,
        acc: &mut [f32],
    ) {
        let mut a = [[_mm256_setzero_ps(); 2]; C];
        for (c, v) in a.iter_mut().enumerate() {
            for (h, v) in v.iter_mut().enumerate() {
                // SAFETY: `acc` holds `16 * C` values (the caller's contract).
                *v = unsafe { _mm256_loadu_ps(acc.as_ptr().add(16 * c + 8 * h)) };
            }
        }
        for (j, &wj) in w.iter().enumerate() {
            let at = j * stride + off;
            let wb = _mm256_set1_ps(wj);
            for (c, v) in a.iter_mut().enumerate() {
                for (h, v) in v.iter_mut().enumerate() {
                    // SAFETY: value `j`'s `16 * C` values lie inside
                    // `values` (the caller's contract).
                    let x = unsafe { _mm256_loadu_ps(values.as_ptr().add(at + 16 * c + 8 * h)) };
                    // A product, then a sum: the rounding of `*a += w * x`.
                    *v = _mm256_add_ps(*v, _mm256_mul_ps(wb, x));
                }
            }
        }
        for (c, v) in a.iter().enumerate() {
            for (h, v) in v.iter().enumerate() {
                // SAFETY: as for the loads from `acc`.
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(16 * c + 8 * h), *v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Scores for the whole runs of sixteen keys; returns how many keys it
    /// did. `C` is the head size in vectors of sixteen.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `q` must hold `16 * C` values, and key
    /// `j` (`keys[j * stride + off..][..16 * C]`) must lie inside `keys` for
    /// every `j < out.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores<const C: usize>(
        q: &[f32],
        keys: &[f32],
        stride: usize,
        off: usize,
        scale: f32,
        out: &mut [f32],
    ) -> usize {
        let zero = _mm512_setzero_ps();
        let mut qv = [zero; C];
        for (c, v) in qv.iter_mut().enumerate() {
            // SAFETY: `q` holds `16 * C` values (the caller's contract).
            *v = unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * c)) };
        }
        // After the tree below, lane 4n + t holds key 4t + n.
        let order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
        let scale = _mm512_set1_ps(scale);
        let blocks = out.len() / 16;
        for b in 0..blocks {
            let mut p = [zero; 16];
            for (t, pt) in p.iter_mut().enumerate() {
                // Key `16 * b + t`, below `out.len()`.
                let key = (16 * b + t) * stride + off;
                let mut s = zero;
                for (c, v) in qv.iter().enumerate() {
                    // SAFETY: the key's `16 * C` values lie inside `keys`
                    // (the caller's contract).
                    let k = unsafe { _mm512_loadu_ps(keys.as_ptr().add(key + 16 * c)) };
                    s = _mm512_fmadd_ps(*v, k, s);
                }
                *pt = s;
            }
            // Lane i with i + 8: two keys a vector, eight lanes each.
            let mut t = [zero; 8];
            for (a, ta) in t.iter_mut().enumerate() {
                let (x, y) = (p[2 * a], p[2 * a + 1]);
                *ta = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                    _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
                );
            }
            // With i + 4: four keys a vector, one per 128-bit quarter.
            let mut u = [zero; 4];
            for (a, ua) in u.iter_mut().enumerate() {
                let (x, y) = (t[2 * a], t[2 * a + 1]);
                *ua = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
                );
            }
            // With i + 2, then i + 1, within the quarters.
            let mut w = [zero; 2];
            for (a, wa) in w.iter_mut().enumerate() {
                let (x, y) = (u[2 * a], u[2 * a + 1]);
                *wa = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                    _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
                );
            }
            let f = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(w[0], w[1]),
                _mm512_shuffle_ps::<0b11_01_11_01>(w[0], w[1]),
            );
            let s = _mm512_mul_ps(_mm512_permutexvar_ps(order, f), scale);
            // SAFETY: `16 * b + 16 <= out.len()`, as `b < out.len() / 16`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * b), s) };
        }
        blocks * 16
    }

    /// [`super::weighted_sum`] for a head of `16 * C` values.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `acc` must hold `16 * C` values, and value
    /// `j` (`values[j * stride + off..][..16 * C]`) must lie inside `values`
    /// for every `j < w.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_sum<const C: usize>(
        w: &[f32],
        values: &[f32],
        stride: usize,
        off: usize,
        acc: &mut [f32],
    ) {
        let mut a = [_mm512_setzero_ps(); C];
        for (c, v) in a.iter_mut().enumerate() {
            // SAFETY: `acc` holds `16 * C` values (the caller's contract).
            *v = unsafe { _mm512_loadu_ps(acc.as_ptr().add(16 * c)) };
        }
        for (j, &wj) in w.iter().enumerate() {
            let at = j * stride + off;
            let wb = _mm512_set1_ps(wj);
            for (c, v) in a.iter_mut().enumerate() {
                // SAFETY: value `j`'s `16 * C` values lie inside `values`
                // (the caller's contract).
                let x = unsafe { _mm512_loadu_ps(values.as_ptr().add(at + 16 * c)) };
                // A product, then a sum: the rounding of `*a += w * x`.
                *v = _mm512_add_ps(*v, _mm512_mul_ps(wb, x));
            }
        }
        for (c, v) in a.iter().enumerate() {
            // SAFETY: as for the loads from `acc`.
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(16 * c), *v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::qmat::tests::lcg;

    /// Bit-identical to the plain loops, for every set of loops this CPU
    /// runs, both head sizes, and runs of keys that are and are not whole
    /// blocks of sixteen.
    #[test]
    fn vector_loops_match_the_plain_ones_bit_for_bit() {
        for set in [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512] {
            if !set.supported() {
                eprintln!("this CPU cannot run the {set:?} loops; not checked");
                continue;
            }
            check(set);
        }
    }

    fn check(set: Isa) {
        let mut s = 9u64;
        for hd in [64usize, 128, 48] {
            let stride = 3 * hd;
            for len in [1usize, 15, 16, 17, 40, 213] {
                let keys: Vec<f32> = (0..len * stride).map(|_| lcg(&mut s) * 4.0).collect();
                let q: Vec<f32> = (0..hd).map(|_| lcg(&mut s) * 4.0).collect();
                let mut got = vec![0f32; len];
                scores_with(set, &q, &keys, stride, hd, 0.125, &mut got);
                for (j, g) in got.iter().enumerate() {
                    let at = j * stride + hd;
                    let want = dot(&q, &keys[at..at + hd]) * 0.125;
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{set:?} hd {hd} len {len} key {j}"
                    );
                }
                let w: Vec<f32> = (0..len).map(|_| lcg(&mut s)).collect();
                let mut acc = vec![0f32; hd];
                weighted_sum_with(set, &w, &keys, stride, 2 * hd - hd, &mut acc);
                let mut want = vec![0f32; hd];
                for (j, &wj) in w.iter().enumerate() {
                    for (d, a) in want.iter_mut().enumerate() {
                        *a += wj * keys[j * stride + hd + d];
                    }
                }
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    acc.iter().map(|v| v.to_bits()).collect(),
                    want.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(a, b, "{set:?} hd {hd} len {len}");
            }
        }
    }
}
