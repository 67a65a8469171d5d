//! The portable kernel: every output as [`super::reference`] computes it,
//! read straight from the panel's records (no block copied out of them).

use super::{ActQ, QFormat, QMatrix, SyncPtr, PANEL, QK};

#[allow(clippy::needless_range_loop)]
pub(super) fn portable_panel(w: &QMatrix, x: &ActQ, p: usize, out: SyncPtr) {
    let (n, k) = (w.n, w.k);
    let nb = k / QK;
    let cols = (n - p * PANEL).min(PANEL);
    let vl = w.format.value_lines();
    for r in 0..x.m {
        let xq = &x.q[r * k..(r + 1) * k];
        let mut acc = [0f32; PANEL];
        let mut mins = [[0f32; 2]; PANEL];
        for b in 0..nb {
            let rec = w.record(p, b);
            let xb = &xq[b * QK..(b + 1) * QK];
            let xi = r * nb + b;
            let (dx, sx) = (x.d[xi], x.s[xi]);
            let word = |line: usize, c: usize| -> [u8; 4] {
                let l = &rec[line].0;
                [l[c * 4], l[c * 4 + 1], l[c * 4 + 2], l[c * 4 + 3]]
            };
            for c in 0..cols {
                // Line `t` holds bytes `4t..4t+4` of the block for column `c`.
                let mut dot = 0i32;
                for t in 0..vl {
                    let v = word(t, c);
                    match w.format {
                        QFormat::Q8 => {
                            for (i, &u) in v.iter().enumerate() {
                                // Stored offset by 128.
                                let q = i32::from((u ^ 0x80) as i8);
                                dot += q * i32::from(xb[4 * t + i] as i8);
                            }
                        }
                        QFormat::Q4_1 => {
                            for (i, &u) in v.iter().enumerate() {
                                dot += i32::from(u & 0x0f) * i32::from(xb[4 * t + i] as i8)
                                    + i32::from(u >> 4) * i32::from(xb[4 * t + i + 16] as i8);
                            }
                        }
                    }
                }
                let d = f32::from_ne_bytes(word(vl, c));
                acc[c] = (dot as f32).mul_add(d * dx, acc[c]);
                if w.format == QFormat::Q4_1 {
                    let m = f32::from_ne_bytes(word(vl + 1, c));
                    mins[c][b % 2] = m.mul_add(sx, mins[c][b % 2]);
                }
            }
        }
        for c in 0..cols {
            let v = acc[c] + (mins[c][0] + mins[c][1]);
            // SAFETY: `out` holds `m * n` values (asserted by `matmul_with`)
            // and this panel's columns are written by this task only.
            unsafe { *out.0.add(r * n + p * PANEL + c) = v };
        }
    }
}
