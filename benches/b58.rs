//! base58 at the largest sizes the grid accepts (PROTOCOL.md §7f, "sizes
//! before work"): decoding a sealed `ciphertext` of
//! `MAX_CIPHERTEXT_CHARS` characters (what a node does with the largest
//! sealed prompt), and encoding the largest blob that fits in it (what the
//! coordinator does when it seals the largest plain prompt). A plain timing
//! harness (no framework):
//!
//! `cargo bench --features node --bench b58`
//! (`--profile test` reuses the test build).

use std::time::Instant;

use sgl::proto::b58;
use sgl::proto::e2e::MAX_CIPHERTEXT_CHARS;

/// Deterministic bytes with no leading zero (the worst case: every byte counts).
fn bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i == 0 {
                0xff
            } else {
                x as u8
            }
        })
        .collect()
}

fn time<T>(what: &str, size: usize, unit: &str, f: impl Fn() -> T) -> T {
    // One warm-up, then the best of three: the cost of one request.
    let mut out = f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        out = f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("{what:<44} {size:>9} {unit:<6} {:>9.1} ms", best * 1e3);
    out
}

fn main() {
    // The largest blob whose encoding fits in MAX_CIPHERTEXT_CHARS.
    let mut n = MAX_CIPHERTEXT_CHARS * 7323 / 10000;
    while b58::max_encoded_len(n) > MAX_CIPHERTEXT_CHARS {
        n -= 1;
    }
    let blob = bytes(n);
    let text = time("encode (largest sealed blob)", n, "bytes", || {
        b58::encode(&blob)
    });
    assert!(text.len() <= MAX_CIPHERTEXT_CHARS);
    let back = time(
        "decode (largest sealed ciphertext)",
        text.len(),
        "chars",
        || b58::decode_vec(&text, "bench", MAX_CIPHERTEXT_CHARS).expect("decodes"),
    );
    assert_eq!(back, blob);
    for size in [4 * 1024, 64 * 1024] {
        let blob = bytes(size);
        let text = time("encode", size, "bytes", || b58::encode(&blob));
        time("decode", text.len(), "chars", || {
            b58::decode_vec(&text, "bench", MAX_CIPHERTEXT_CHARS).expect("decodes")
        });
    }
}
