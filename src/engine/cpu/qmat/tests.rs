//! The kernels against the reference, bit for bit, and the packing.

use half::f16;

use super::format::f16_le;
use super::quant::quantize_block;
#[cfg(target_arch = "x86_64")]
use super::quant::{quantize_block_avx2, quantize_block_avx512};
use super::*;

/// A small deterministic generator for test data in `[-0.5, 0.5)`.
pub(crate) fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}

/// GGUF Q4_1 bytes for a random matrix.
fn q41_bytes(n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n * k / QK {
        let d = f16::from_f32(0.01 + lcg(seed).abs() * 0.05);
        let m = f16::from_f32(lcg(seed) * 0.2);
        out.extend_from_slice(&d.to_bits().to_le_bytes());
        out.extend_from_slice(&m.to_bits().to_le_bytes());
        for _ in 0..16 {
            out.push(((lcg(seed) + 0.5) * 255.0) as u8);
        }
    }
    out
}

/// Every kernel that runs here gives the reference's bits for every
/// output; the reference is close to the f32 product.
fn check(w: &QMatrix, m: usize, seed: &mut u64, pool: &Pool) {
    let (n, k) = (w.rows(), w.cols());
    let x: Vec<f32> = (0..m * k).map(|_| lcg(seed)).collect();
    let mut a = ActQ::default();
    a.quantize(&x, m, k, w.format());
    let mut wr = vec![0f32; k];
    let mut want = vec![0f32; m * n];
    for j in 0..n {
        w.dequantize_row(j, &mut wr);
        for r in 0..m {
            let exact: f32 = (0..k).map(|i| x[r * k + i] * wr[i]).sum();
            let scale: f32 = (0..k).map(|i| (x[r * k + i] * wr[i]).abs()).sum();
            let got = reference(w, j, &a, r);
            assert!(
                (got - exact).abs() <= 0.02 * scale + 1e-4,
                "{r},{j}: {got} vs {exact}"
            );
            want[r * n + j] = got;
        }
    }
    for kernel in [
        Kernel::Portable,
        Kernel::Avx2,
        Kernel::AvxVnni,
        Kernel::Vnni,
        Kernel::Amx,
    ] {
        if !kernel.available() {
            eprintln!("this CPU cannot run the {kernel:?} kernel; not checked");
            continue;
        }
        if kernel == Kernel::Amx && m < AMX_MIN_ROWS {
            continue;
        }
        let mut y = vec![f32::NAN; m * n];
        matmul_with(w, &a, &mut y, pool, kernel);
        for (i, (g, e)) in y.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{kernel:?} {n}x{k}, m {m}: output {i}"
            );
        }
    }
    // The kernel chosen for one row alone gives the same bits.
    let mut a1 = ActQ::default();
    a1.quantize(&x[(m - 1) * k..], 1, k, w.format());
    let mut y1 = vec![0f32; n];
    matmul(w, &a1, &mut y1, pool);
    assert_eq!(&y1[..], &want[(m - 1) * n..], "last row alone");
}

#[test]
fn q8_kernels_match_the_reference_bit_for_bit() {
    let pool = Pool::new(2);
    let mut s = 7u64;
    for &(n, k, m) in &[
        (37, 96, 6),
        (64, 576, 9),
        (5, 32, 1),
        (48, 160, 37),
        (16, 64, 16),
    ] {
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let q = QMatrix::q8_from_f32(&w, n, k).unwrap();
        check(&q, m, &mut s, &pool);
    }
}

#[test]
fn q4_1_kernels_match_the_reference_bit_for_bit() {
    let pool = Pool::new(2);
    let mut s = 11u64;
    for &(n, k, m) in &[
        (33, 576, 7),
        (16, 128, 1),
        (9, 64, 5),
        (12, 1536, 3),
        (40, 96, 33),
        (16, 576, 20),
    ] {
        let bytes = q41_bytes(n, k, &mut s);
        let q = QMatrix::from_gguf_q4_1(&bytes, n, k).unwrap();
        check(&q, m, &mut s, &pool);
    }
}

#[test]
fn vector_quantisation_gives_the_scalar_bits() {
    let mut s = 13u64;
    let mut blocks: Vec<Vec<f32>> = (0..2000)
        .map(|i| (0..QK).map(|_| lcg(&mut s) * (1 + i % 7) as f32).collect())
        .collect();
    // Halves exactly: amax 127 makes the scale 1, so x * inv = x.
    let mut halves: Vec<f32> = (0..QK).map(|i| i as f32 - 15.5).collect();
    halves[0] = 127.0;
    halves[1] = -0.5;
    halves[2] = 0.5;
    blocks.push(halves);
    blocks.push(vec![0.0; QK]);
    blocks.push(vec![-0.0; QK]);
    blocks.push((0..QK).map(|i| if i == 3 { -1e-30 } else { 0.0 }).collect());
    // The largest magnitude in each of the four AVX2 vectors in turn.
    for at in [0usize, 9, 18, 31] {
        blocks.push((0..QK).map(|i| if i == at { -3.0 } else { 0.25 }).collect());
    }
    let mut checked = 0;
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !isa.supported() {
            eprintln!("this CPU cannot run the {isa:?} quantisation; not checked");
            continue;
        }
        checked += 1;
        for x in &blocks {
            let (mut a, mut b) = ([0u8; QK], [0u8; QK]);
            let want = quantize_block(x, &mut a);
            // SAFETY: checked above that the CPU has the instruction set.
            let got = unsafe {
                match isa {
                    Isa::Avx2 => quantize_block_avx2(x, &mut b),
                    _ => quantize_block_avx512(x, &mut b),
                }
            };
            assert_eq!(
                (got.0.to_bits(), got.1),
                (want.0.to_bits(), want.1),
                "{isa:?} {x:?}"
            );
            assert_eq!(a, b, "{isa:?} {x:?}");
        }
    }
    eprintln!("{checked} vector quantisations checked");
}

/// The selected set follows `select`, and a set the CPU lacks is refused
/// with its name.
#[test]
fn a_kernel_set_is_selected_only_where_the_cpu_runs_it() {
    let before = isa();
    for set in [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512] {
        let r = select(KernelChoice::Only(set));
        if set.supported() {
            assert_eq!(r.ok(), Some(set));
            assert_eq!(isa(), set);
        } else {
            let e = r.expect_err("an unsupported set is refused").to_string();
            assert!(e.contains(set.name()), "{e}");
        }
    }
    assert_eq!(select(KernelChoice::Auto).ok(), Some(best_isa()));
    assert!("avx3".parse::<KernelChoice>().is_err());
    assert_eq!(
        "AVX2".parse::<KernelChoice>().ok(),
        Some(KernelChoice::Only(Isa::Avx2))
    );
    assert_eq!(
        "avx-vnni".parse::<KernelChoice>().ok(),
        Some(KernelChoice::Only(Isa::AvxVnni))
    );
    // Every set gives the same bits, so the other tests do not mind which
    // ran meanwhile; leave the process as it was.
    select(KernelChoice::Only(before)).expect("it ran before");
}

#[test]
fn packing_keeps_the_gguf_values() {
    let mut s = 5u64;
    let (n, k) = (19, 96);
    let bytes = q41_bytes(n, k, &mut s);
    let q = QMatrix::from_gguf_q4_1(&bytes, n, k).unwrap();
    let mut row = vec![0f32; k];
    for j in [0, 15, 16, 18] {
        q.dequantize_row(j, &mut row);
        for (b, blk) in bytes[j * 3 * 20..(j + 1) * 3 * 20].chunks(20).enumerate() {
            let (d, m) = (f16_le(&blk[0..2]), f16_le(&blk[2..4]));
            for i in 0..16 {
                assert_eq!(row[b * QK + i], d * f32::from(blk[4 + i] & 0x0f) + m);
                assert_eq!(row[b * QK + i + 16], d * f32::from(blk[4 + i] >> 4) + m);
            }
        }
    }
    let mut q8 = Vec::new();
    for _ in 0..n * k / QK {
        q8.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        q8.extend((0..QK).map(|i| (i as i8 - 16) as u8));
    }
    let q = QMatrix::from_gguf_q8_0(&q8, n, k).unwrap();
    q.dequantize_row(17, &mut row);
    assert_eq!(row[0], -8.0);
    assert_eq!(row[31], 7.5);
    assert_eq!(q.storage_bytes(), 2 * 3 * 9 * 64);
}

#[test]
fn stacking_keeps_rows_and_refuses_mixed_formats() {
    let mut s = 3u64;
    let a: Vec<f32> = (0..2 * 64).map(|_| lcg(&mut s)).collect();
    let b: Vec<f32> = (0..3 * 64).map(|_| lcg(&mut s)).collect();
    let qa = QMatrix::q8_from_f32(&a, 2, 64).unwrap();
    let qb = QMatrix::q8_from_f32(&b, 3, 64).unwrap();
    let st = QMatrix::stack(vec![qa.clone(), qb.clone()]).unwrap();
    assert_eq!(st.rows(), 5);
    let (mut r1, mut r2) = (vec![0f32; 64], vec![0f32; 64]);
    qa.dequantize_row(1, &mut r1);
    st.dequantize_row(1, &mut r2);
    assert_eq!(r1, r2);
    qb.dequantize_row(2, &mut r1);
    st.dequantize_row(4, &mut r2);
    assert_eq!(r1, r2);
    let q4 = QMatrix::from_gguf_q4_1(&q41_bytes(1, 64, &mut s), 1, 64).unwrap();
    assert!(QMatrix::stack(vec![qa, q4]).is_err());
    assert!(QMatrix::q8_from_f32(&[0.0; 33], 1, 33).is_err());
}
