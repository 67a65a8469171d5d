//! A batched 8-bit linear layer for the CPU.
//!
//! candle's quantised matmul walks the rows of the input one after another,
//! reading the whole weight matrix once per row: a batch of eight sequences
//! reads the weights eight times. Here each weight block is loaded once and
//! multiplied into every row of the batch while it sits in registers, so a
//! decode step costs about one pass over the weights however many sequences
//! it carries.
//!
//! Format: Q8_0 semantics (blocks of 32 signed bytes with one scale, the scale
//! kept as f32); activations stay f32. Each output value is computed in the
//! same order whatever the batch holds, so a row's result does not depend on
//! its neighbours.

use rayon::prelude::*;

pub const BLOCK: usize = 32;

/// Weights `[n, k]` as blocks of 32 i8 with an f32 scale each.
#[derive(Debug, Clone)]
pub struct Q8Linear {
    n: usize,
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
}

/// Quantise `x` (a multiple of 32 long) into `q` and per-block scales `d`.
fn quantize_into(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        *db = scale;
    }
}

impl Q8Linear {
    /// Quantise a row-major `[n, k]` f32 matrix; `k` must be a multiple of 32.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || w.len() != n * k {
            return None;
        }
        let mut q = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        quantize_into(w, &mut q, &mut d);
        Some(Q8Linear { n, k, q, d })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Bytes of weights one forward reads.
    pub fn storage_bytes(&self) -> usize {
        self.q.len() + self.d.len() * 4
    }

    /// `x` is `[m, k]` row-major; returns `[m, n]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), m * k);
        // Tiles of output columns run in parallel. A tile's weights are
        // widened to f32 once (they stay in L2), then every group of four
        // input rows is multiplied against them while that group sits in L1.
        // Results go to a transposed scratch `[n, m]` so tiles own disjoint
        // slices.
        const COLS: usize = 16;
        // A few tasks per thread: enough to balance, few enough that the
        // pool's wake-ups do not dominate a single-row product.
        let threads = rayon::current_num_threads().max(1);
        let task_cols = n.div_ceil(threads * 4).div_ceil(COLS).max(1) * COLS;
        let mut t = vec![0f32; n * m];
        t.par_chunks_mut(task_cols * m)
            .enumerate()
            .for_each(|(ti, task)| {
                let mut wf = vec![0f32; COLS * k];
                for (si, tile) in task.chunks_mut(COLS * m).enumerate() {
                    let j0 = ti * task_cols + si * COLS;
                    let nc = tile.len() / m;
                    for c in 0..nc {
                        let j = j0 + c;
                        widen(
                            &self.q[j * k..(j + 1) * k],
                            &self.d[j * k / BLOCK..(j + 1) * k / BLOCK],
                            &mut wf[c * k..(c + 1) * k],
                        );
                    }
                    let mut r0 = 0;
                    while r0 < m {
                        let rn = (m - r0).min(4);
                        let xs = &x[r0 * k..(r0 + rn) * k];
                        for c in 0..nc {
                            let mut out = [0f32; 4];
                            dot_rows(&wf[c * k..(c + 1) * k], xs, rn, &mut out);
                            tile[c * m + r0..c * m + r0 + rn].copy_from_slice(&out[..rn]);
                        }
                        r0 += rn;
                    }
                }
            });
        if m == 1 {
            return t;
        }
        let mut out = vec![0f32; m * n];
        for (j, col) in t.chunks_exact(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * n + j] = *v;
            }
        }
        out
    }
}

/// Dequantise one weight row.
#[inline]
fn widen(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((qb, db), ob) in q
        .chunks_exact(BLOCK)
        .zip(d)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        for (o, v) in ob.iter_mut().zip(qb) {
            *o = f32::from(*v) * db;
        }
    }
}

#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is one instruction with FMA and a slow libm call without it.
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot products of one weight row with up to four input rows, 16 lanes each;
/// the lanes are summed in a fixed order, so a row's result does not depend
/// on which rows share the group.
#[inline]
fn dot_rows(w: &[f32], xs: &[f32], rn: usize, out: &mut [f32; 4]) {
    let k = w.len();
    let mut acc = [[0f32; 16]; 4];
    for (b, wv) in w.chunks_exact(16).enumerate() {
        let wv: &[f32; 16] = match wv.try_into() {
            Ok(v) => v,
            Err(_) => return,
        };
        for (r, acc_r) in acc.iter_mut().enumerate().take(rn) {
            let xv: &[f32; 16] = match xs[r * k + b * 16..r * k + b * 16 + 16].try_into() {
                Ok(v) => v,
                Err(_) => return,
            };
            for i in 0..16 {
                acc_r[i] = fma(wv[i], xv[i], acc_r[i]);
            }
        }
    }
    for (o, acc_r) in out.iter_mut().zip(acc.iter()).take(rn) {
        let mut s = 0f32;
        for v in acc_r {
            s += v;
        }
        *o = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::qmat::tests::lcg;

    #[test]
    fn matches_f32_matmul_and_is_batch_independent() {
        let (n, k, m) = (70, 96, 6);
        let mut s = 1u64;
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let lin = Q8Linear::from_f32(&w, n, k).unwrap();
        let y = lin.forward(&x, m);
        for r in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
                assert!(
                    (y[r * n + j] - exact).abs() < 0.05,
                    "{r},{j}: {} vs {exact}",
                    y[r * n + j]
                );
            }
            // The same row alone gives bit-identical output.
            let alone = lin.forward(&x[r * k..(r + 1) * k], 1);
            assert_eq!(&alone[..], &y[r * n..(r + 1) * n]);
        }
    }

    #[test]
    fn rejects_ragged_rows() {
        assert!(Q8Linear::from_f32(&[0.0; 33], 1, 33).is_none());
    }
}
