//! The AMX kernel: a panel against 16 activation rows at a time, one tile
//! product (`tdpbsud`, 16 x 16 outputs x 32 bytes) per block; the 16 x 16
//! integer results then get the scales as in the other kernels.

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
        // SAFETY: the CPU and the OS allow tiles (the caller's contract);
        // `cfg` is a valid 64-byte palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
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
        // SAFETY: the caller's contract, with the kernel of `w`'s format.
        unsafe {
            match w.format {
                QFormat::Q8 => self.panel_of::<false>(w, x, p, out),
                QFormat::Q4_1 => self.panel_of::<true>(w, x, p, out),
            }
        }
    }

    /// [`Tiles::panel`] for one format: `Q41` is whether `w` is Q4_1.
    ///
    /// # Safety
    /// As [`Tiles::panel`], with `Q41` true exactly when `w` is Q4_1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn panel_of<const Q41: bool>(&mut self, w: &QMatrix, x: &ActQ, p: usize, out: *mut f32) {
        // SAFETY: every pointer below stays inside `w`'s panel `p`, inside this
        // thread's buffers (`unpacked` holds a panel's blocks, `results` two rounds
        // of two tiles), inside `x`'s rows, padded to whole tiles, or inside `out`
        // (only the rows below `x.m` are stored); the CPU has the target features
        // and the tiles are configured for `w` on this thread: the caller's
        // contract.
        unsafe {
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
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: `new` configured the tiles on this thread; releasing
        // them returns the tile state to its initial (smaller) form.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}
