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
//! kept as f32). Activations are quantised the same way per row. Each output
//! value is computed in the same order whatever the batch holds, so a row's
//! result does not depend on its neighbours.

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
        if k % BLOCK != 0 || w.len() != n * k {
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
        let kb = k / BLOCK;
        debug_assert_eq!(x.len(), m * k);
        let mut aq = vec![0i8; m * k];
        let mut ad = vec![0f32; m * kb];
        quantize_into(x, &mut aq, &mut ad);
        // Work in column tiles; each tile writes its columns for every row
        // into a transposed scratch, `[n, m]`, so tiles own disjoint slices.
        let cols_per_task = (4096 / kb.max(1)).clamp(8, 256);
        let mut t = vec![0f32; n * m];
        t.par_chunks_mut(cols_per_task * m)
            .enumerate()
            .for_each(|(ti, tile)| {
                let j0 = ti * cols_per_task;
                for (jj, outs) in tile.chunks_exact_mut(m).enumerate() {
                    let j = j0 + jj;
                    let wq = &self.q[j * k..(j + 1) * k];
                    let wd = &self.d[j * kb..(j + 1) * kb];
                    column(wq, wd, &aq, &ad, m, kb, outs);
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

/// One output column for up to every row, four rows at a time so that a
/// weight block is reused from registers.
#[inline]
fn column(wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32], m: usize, kb: usize, outs: &mut [f32]) {
    let k = kb * BLOCK;
    let mut r0 = 0;
    while r0 < m {
        let rn = (m - r0).min(4);
        let mut acc = [[0f32; 16]; 4];
        for b in 0..kb {
            let w: &[i8; BLOCK] = match wq[b * BLOCK..(b + 1) * BLOCK].try_into() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut wi = [0i16; BLOCK];
            for (o, v) in wi.iter_mut().zip(w) {
                *o = i16::from(*v);
            }
            for (r, acc_r) in acc.iter_mut().enumerate().take(rn) {
                let row = r0 + r;
                let a: &[i8; BLOCK] =
                    match aq[row * k + b * BLOCK..row * k + (b + 1) * BLOCK].try_into() {
                        Ok(a) => a,
                        Err(_) => return,
                    };
                let s = wd[b] * ad[row * kb + b];
                let mut p = [0i32; 16];
                for (t, pt) in p.iter_mut().enumerate() {
                    *pt = i32::from(wi[2 * t]) * i32::from(a[2 * t])
                        + i32::from(wi[2 * t + 1]) * i32::from(a[2 * t + 1]);
                }
                for (av, pv) in acc_r.iter_mut().zip(p.iter()) {
                    *av += *pv as f32 * s;
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rn) {
            let mut s = 0f32;
            for v in acc_r {
                s += v;
            }
            outs[r0 + r] = s;
        }
        r0 += rn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

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
