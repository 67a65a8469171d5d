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
//! Four kernels compute the same numbers, bit for bit: the AMX one for many
//! activation rows (prefill), the AVX-512 VNNI one for a few (decode), the
//! AVX2 one for CPUs without AVX-512 (every row count), and a portable one.
//! Which set runs is decided at run time ([`isa`], [`select`]). For every output they do the same sequence of floating-point
//! operations (see [`reference`]), and each output depends only on its own
//! activation row and weight row. So a sequence's results do not depend on
//! what else is in the batch, nor on which kernel ran, which the scheduler
//! relies on for seeded requests that reproduce alone and inside a batch.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod detect;
mod format;
mod portable;
mod quant;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use self::detect::{
    amx_available, avx2_active, best_isa, isa, select, simd_available, Isa, KernelChoice,
    KernelError,
};
pub use self::format::{QError, QFormat, QMatrix};
pub use self::quant::ActQ;

use self::portable::portable_panel;

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
#[cfg_attr(not(test), allow(dead_code))]
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
    Avx2,
    AvxVnni,
    Vnni,
    Amx,
}

/// From this many activation rows on, AMX tiles beat VNNI vectors (measured
/// with `benches/kernels.rs`).
const AMX_MIN_ROWS: usize = 16;

impl Kernel {
    fn choose(m: usize) -> Kernel {
        match isa() {
            Isa::Portable => Kernel::Portable,
            Isa::Avx2 => Kernel::Avx2,
            Isa::AvxVnni => Kernel::AvxVnni,
            Isa::Avx512 if m >= AMX_MIN_ROWS && amx_available() => Kernel::Amx,
            Isa::Avx512 => Kernel::Vnni,
        }
    }

    /// Whether this CPU can run this kernel (whichever set is selected).
    pub(crate) fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => Isa::Avx2.supported(),
            Kernel::AvxVnni => Isa::AvxVnni.supported(),
            Kernel::Vnni => Isa::Avx512.supported(),
            Kernel::Amx => detect::amx_supported(),
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
                    Kernel::Avx2 => unsafe { avx2::panel(w, x, p, out_ptr.0) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::AvxVnni => unsafe { avx2::panel_vnni(w, x, p, out_ptr.0) },
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
