//! The portable kernel: every output as [`super::reference`] computes it.

use super::{reference, ActQ, QMatrix, SyncPtr, PANEL};

pub(super) fn portable_panel(w: &QMatrix, x: &ActQ, p: usize, out: SyncPtr) {
    let n = w.n;
    for j in p * PANEL..((p + 1) * PANEL).min(n) {
        for r in 0..x.m {
            // SAFETY: `out` holds `m * n` values (asserted by `matmul_with`)
            // and this panel's columns are written by this task only.
            unsafe { *out.0.add(r * n + j) = reference(w, j, x, r) };
        }
    }
}
