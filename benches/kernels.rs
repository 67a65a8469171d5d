//! The CPU forward's integer matmul on SmolLM2-135M's shapes, alone: time per
//! call, weight bytes read per second, and multiply-adds per second, for one
//! activation row (a decode step), eight (a batched decode step) and 256 (a
//! prefill chunk).
//!
//! `cargo bench --features node --bench kernels` (`-- --quick` for a short
//! run). Every size runs for the same wall time, so two builds can be
//! compared side by side by running them one after the other.

use std::time::{Duration, Instant};

use sgl::engine::cpu::pool::Pool;
use sgl::engine::cpu::qmat::{matmul, ActQ, QFormat, QMatrix};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// GGUF Q4_1 blocks with random scales, minimums and nibbles.
fn q4_1(n: usize, k: usize, seed: &mut u64) -> QMatrix {
    let mut bytes = Vec::with_capacity(n * k / 32 * 20);
    for _ in 0..n * k / 32 {
        bytes.extend_from_slice(&f16_bits(0.01 + lcg(seed).abs() * 0.05));
        bytes.extend_from_slice(&f16_bits(lcg(seed) * 0.2));
        for _ in 0..16 {
            bytes.push(((lcg(seed) + 0.5) * 255.0) as u8);
        }
    }
    QMatrix::from_gguf_q4_1(&bytes, n, k).expect("valid Q4_1 matrix")
}

fn q8_0(n: usize, k: usize, seed: &mut u64) -> QMatrix {
    let w: Vec<f32> = (0..n * k).map(|_| lcg(seed)).collect();
    QMatrix::q8_from_f32(&w, n, k).expect("valid Q8_0 matrix")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 200 } else { 1000 });
    let pool = Pool::new(Pool::default_threads());
    let mut seed = 5u64;
    let shapes: Vec<(&str, QMatrix)> = vec![
        ("qkv 960x576 Q4_1", q4_1(960, 576, &mut seed)),
        ("o 576x576 Q4_1", q4_1(576, 576, &mut seed)),
        ("gate_up 3072x576 Q4_1", q4_1(3072, 576, &mut seed)),
        ("down 576x1536 Q4_1", q4_1(576, 1536, &mut seed)),
        ("head 49152x576 Q8_0", q8_0(49152, 576, &mut seed)),
        ("gate_up 3072x576 Q8_0", q8_0(3072, 576, &mut seed)),
    ];
    println!("threads {}", pool.threads());
    model_pass(&pool, budget, &mut seed);
    println!(
        "{:<24} {:>5} {:>11} {:>9} {:>9}",
        "matrix", "rows", "us/call", "GB/s", "GMAC/s"
    );
    for (name, w) in &shapes {
        for m in [1usize, 8, 16, 32, 256] {
            if w.rows() > 10_000 && m > 8 {
                continue;
            }
            let k = w.cols();
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let mut a = ActQ::default();
            let fmt: QFormat = w.format();
            a.quantize(&x, m, k, fmt);
            let mut out = vec![0f32; m * w.rows()];
            // Warm up, then as many calls as fit in the budget.
            matmul(w, &a, &mut out, &pool);
            let start = Instant::now();
            let mut calls = 0u64;
            while start.elapsed() < budget {
                matmul(w, &a, &mut out, &pool);
                calls += 1;
            }
            let per = start.elapsed().as_secs_f64() / calls as f64;
            let bytes = w.storage_bytes() as f64;
            let macs = (w.rows() * k * m) as f64;
            println!(
                "{:<24} {:>5} {:>11.1} {:>9.1} {:>9.1}",
                name,
                m,
                per * 1e6,
                bytes / per / 1e9,
                macs / per / 1e9
            );
            std::hint::black_box(&out);
        }
    }
}

/// Every matrix of a 30-layer SmolLM2-135M and its head in turn, as a decode
/// step reads them: 106 MiB, more than a core's own caches, so this is the
/// rate at which weights stream from the shared cache or memory (a server
/// CPU's last-level cache may hold them all).
fn model_pass(pool: &Pool, budget: Duration, seed: &mut u64) {
    let mut mats = Vec::new();
    for _ in 0..30 {
        mats.push(q4_1(960, 576, seed));
        mats.push(q4_1(576, 576, seed));
        mats.push(q4_1(3072, 576, seed));
        mats.push(q4_1(576, 1536, seed));
    }
    mats.push(q8_0(49152, 576, seed));
    let bytes: usize = mats.iter().map(QMatrix::storage_bytes).sum();
    println!(
        "{:<24} {:>5} {:>11} {:>9} {:>9}",
        "model pass", "rows", "ms/pass", "GB/s", "pass/s"
    );
    for m in [1usize, 8] {
        let acts: Vec<ActQ> = mats
            .iter()
            .map(|w| {
                let x: Vec<f32> = (0..m * w.cols()).map(|_| lcg(seed)).collect();
                let mut a = ActQ::default();
                a.quantize(&x, m, w.cols(), w.format());
                a
            })
            .collect();
        let mut out = vec![0f32; m * 49152];
        let pass = |out: &mut [f32]| {
            for (w, a) in mats.iter().zip(&acts) {
                matmul(w, a, out, pool);
            }
        };
        pass(&mut out);
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < budget * 2 {
            pass(&mut out);
            calls += 1;
        }
        let per = start.elapsed().as_secs_f64() / calls as f64;
        println!(
            "{:<24} {:>5} {:>11.2} {:>9.1} {:>9.1}",
            format!("{} MiB", bytes >> 20),
            m,
            per * 1e3,
            bytes as f64 / per / 1e9,
            1.0 / per
        );
        std::hint::black_box(&out);
    }
}
