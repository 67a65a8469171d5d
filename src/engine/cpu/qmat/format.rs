//! The weight matrices: their block formats, their panel layout (see the
//! [`qmat`](super) docs), and the constructors from GGUF blocks and from f32.

use half::f16;

use super::quant::quantize_block;
use super::{Line, PANEL, QK, ZERO_LINE};

/// The block format of a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 32 signed bytes and one scale: `w = d * q`.
    Q8,
    /// 32 nibbles, a scale and a minimum: `w = d * q + m`. Byte `j` of a block
    /// holds element `j` in its low nibble and element `j + 16` in its high one.
    Q4_1,
}

impl QFormat {
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8 => "Q8_0",
            QFormat::Q4_1 => "Q4_1",
        }
    }

    /// Bytes of one block's values in GGUF order.
    pub(super) fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8 => QK,
            QFormat::Q4_1 => QK / 2,
        }
    }

    /// Lines of a panel's record for one block: the values (line `t` holds
    /// bytes `4t..4t+4` of each of the 16 rows), the scales, the minimums.
    pub(super) fn record_lines(self) -> usize {
        match self {
            QFormat::Q8 => self.value_lines() + 1,
            QFormat::Q4_1 => self.value_lines() + 2,
        }
    }

    /// Lines of values in a record (four bytes of each row a line); the
    /// scales follow them.
    pub(super) fn value_lines(self) -> usize {
        self.block_bytes() / 4
    }
}

/// A `[n, k]` weight matrix (row `j` is output column `j`) in blocks of 32
/// along `k`, stored as panels of 16 rows (see the [`qmat`](super) docs).
///
/// In a record, Q8 values are stored offset by 128 (`w + 128` as an unsigned
/// byte), the operand the unsigned-by-signed dot product instructions take;
/// the kernels take `128 * sum(x)` off again. Q4_1 values are the GGUF bytes.
#[derive(Clone)]
pub struct QMatrix {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) format: QFormat,
    pub(super) data: Vec<Line>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("format", &self.format)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QError {
    #[error("a row of {0} weights is not a whole number of blocks")]
    RaggedRow(usize),
    #[error("{what}: expected {expected} bytes, got {got}")]
    Size {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("matrices of different formats or widths cannot be stacked")]
    Mismatch,
}

pub(super) fn f16_le(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// A matrix row by row, blocks in GGUF byte order: what the constructors
/// gather before packing the panels.
struct Rows {
    n: usize,
    k: usize,
    format: QFormat,
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl Rows {
    fn new(n: usize, k: usize, format: QFormat) -> Result<Self, QError> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(QError::RaggedRow(k));
        }
        let nb = n * k / QK;
        Ok(Rows {
            n,
            k,
            format,
            qs: vec![0; nb * format.block_bytes()],
            d: vec![0.0; nb],
            m: match format {
                QFormat::Q8 => Vec::new(),
                QFormat::Q4_1 => vec![0.0; nb],
            },
        })
    }

    fn pack(self) -> QMatrix {
        let nb = self.k / QK;
        let (bb, rl, vl) = (
            self.format.block_bytes(),
            self.format.record_lines(),
            self.format.value_lines(),
        );
        let mut data = vec![ZERO_LINE; self.n.div_ceil(PANEL) * nb * rl];
        for j in 0..self.n {
            let (p, c) = (j / PANEL, j % PANEL);
            for b in 0..nb {
                let rec = &mut data[(p * nb + b) * rl..(p * nb + b + 1) * rl];
                let src = &self.qs[(j * nb + b) * bb..(j * nb + b + 1) * bb];
                for (t, four) in src.chunks_exact(4).enumerate() {
                    let dst = &mut rec[t].0[c * 4..c * 4 + 4];
                    for (o, &v) in dst.iter_mut().zip(four) {
                        *o = match self.format {
                            QFormat::Q8 => v ^ 0x80,
                            QFormat::Q4_1 => v,
                        };
                    }
                }
                rec[vl].0[c * 4..c * 4 + 4].copy_from_slice(&self.d[j * nb + b].to_ne_bytes());
                if self.format == QFormat::Q4_1 {
                    rec[vl + 1].0[c * 4..c * 4 + 4]
                        .copy_from_slice(&self.m[j * nb + b].to_ne_bytes());
                }
            }
        }
        QMatrix {
            n: self.n,
            k: self.k,
            format: self.format,
            data,
        }
    }
}

/// Block `b` of row `j`: its values in GGUF order (the first
/// `block_bytes` of the array), its scale and its minimum (0 for Q8).
pub(super) struct Block {
    pub(super) q: [u8; QK],
    pub(super) d: f32,
    pub(super) m: f32,
}

impl QMatrix {
    /// From GGUF Q8_0 blocks (`f16 d, i8 q[32]`, 34 bytes each).
    pub fn from_gguf_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Rows::new(n, k, QFormat::Q8)?;
        let expected = n * k / QK * 34;
        if bytes.len() != expected {
            return Err(QError::Size {
                what: "Q8_0 tensor",
                expected,
                got: bytes.len(),
            });
        }
        for ((blk, q), d) in bytes
            .chunks_exact(34)
            .zip(w.qs.chunks_exact_mut(QK))
            .zip(w.d.iter_mut())
        {
            *d = f16_le(&blk[0..2]);
            q.copy_from_slice(&blk[2..34]);
        }
        Ok(w.pack())
    }

    /// From GGUF Q4_1 blocks (`f16 d, f16 m, u8 qs[16]`, 20 bytes each).
    pub fn from_gguf_q4_1(bytes: &[u8], n: usize, k: usize) -> Result<Self, QError> {
        let mut w = Rows::new(n, k, QFormat::Q4_1)?;
        let expected = n * k / QK * 20;
        if bytes.len() != expected {
            return Err(QError::Size {
                what: "Q4_1 tensor",
                expected,
                got: bytes.len(),
            });
        }
        for (((blk, q), d), m) in bytes
            .chunks_exact(20)
            .zip(w.qs.chunks_exact_mut(QK / 2))
            .zip(w.d.iter_mut())
            .zip(w.m.iter_mut())
        {
            *d = f16_le(&blk[0..2]);
            *m = f16_le(&blk[2..4]);
            q.copy_from_slice(&blk[4..20]);
        }
        Ok(w.pack())
    }

    /// Quantise a row-major f32 matrix to Q8 (round to nearest, scale amax/127).
    pub fn q8_from_f32(w: &[f32], n: usize, k: usize) -> Result<Self, QError> {
        let mut out = Rows::new(n, k, QFormat::Q8)?;
        if w.len() != n * k {
            return Err(QError::Size {
                what: "f32 matrix",
                expected: n * k,
                got: w.len(),
            });
        }
        for ((xb, qb), db) in w
            .chunks_exact(QK)
            .zip(out.qs.chunks_exact_mut(QK))
            .zip(out.d.iter_mut())
        {
            let (d, _) = quantize_block(xb, qb);
            *db = d;
        }
        Ok(out.pack())
    }

    /// Stack matrices of one format and width along `n` (q, k and v as one).
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, QError> {
        let first = parts.first().ok_or(QError::Mismatch)?;
        let (k, format) = (first.k, first.format);
        if parts.iter().any(|p| p.k != k || p.format != format) {
            return Err(QError::Mismatch);
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut out = Rows::new(n, k, format)?;
        let (nb, bb) = (k / QK, format.block_bytes());
        let mut j = 0;
        for p in &parts {
            for pj in 0..p.n {
                for b in 0..nb {
                    let blk = p.block(pj, b);
                    let i = j * nb + b;
                    out.qs[i * bb..(i + 1) * bb].copy_from_slice(&blk.q[..bb]);
                    out.d[i] = blk.d;
                    if format == QFormat::Q4_1 {
                        out.m[i] = blk.m;
                    }
                }
                j += 1;
            }
        }
        Ok(out.pack())
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Bytes one pass over the matrix reads (the kernel's working format).
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Line>()
    }

    /// The record of block `b` of panel `p`.
    pub(super) fn record(&self, p: usize, b: usize) -> &[Line] {
        let (nb, rl) = (self.k / QK, self.format.record_lines());
        &self.data[(p * nb + b) * rl..(p * nb + b + 1) * rl]
    }

    pub(super) fn block(&self, j: usize, b: usize) -> Block {
        let (p, c) = (j / PANEL, j % PANEL);
        let rec = self.record(p, b);
        let vl = self.format.value_lines();
        let word = |line: &Line| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&line.0[c * 4..c * 4 + 4]);
            v
        };
        let mut q = [0u8; QK];
        for (t, four) in q[..self.format.block_bytes()]
            .chunks_exact_mut(4)
            .enumerate()
        {
            four.copy_from_slice(&word(&rec[t]));
            if self.format == QFormat::Q8 {
                for v in four {
                    *v ^= 0x80;
                }
            }
        }
        Block {
            q,
            d: f32::from_ne_bytes(word(&rec[vl])),
            m: match self.format {
                QFormat::Q8 => 0.0,
                QFormat::Q4_1 => f32::from_ne_bytes(word(&rec[vl + 1])),
            },
        }
    }

    /// Row `j` back to f32 (tests, and the tied embedding).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        for b in 0..nb {
            let blk = self.block(j, b);
            let o = &mut out[b * QK..(b + 1) * QK];
            match self.format {
                QFormat::Q8 => {
                    for (o, &v) in o.iter_mut().zip(&blk.q) {
                        *o = blk.d * f32::from(v as i8);
                    }
                }
                QFormat::Q4_1 => {
                    for (i, &v) in blk.q[..16].iter().enumerate() {
                        o[i] = blk.d * f32::from(v & 0x0f) + blk.m;
                        o[i + 16] = blk.d * f32::from(v >> 4) + blk.m;
                    }
                }
            }
        }
    }
}
