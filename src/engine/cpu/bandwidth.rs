//! The memory-bandwidth probe `sgl bench` sets its limits by: how fast this
//! machine reads a large buffer, with the widest loads the CPU has.

use std::time::Instant;

/// Sequential read bandwidth of a buffer of `bytes`, split over `threads`,
/// best of three passes, in bytes per second.
pub fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let words = bytes / 8;
    // Distinct values so the pages are really backed, not the shared zero page.
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, |a, b| a.wrapping_add(b))
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(bytes as f64 / secs);
    }
    best
}

/// The wrapping sum of `part`, read with the widest loads the CPU has: the
/// probe must be bound by memory, not by its own instructions (scalar loads
/// read about a third slower here than 64-byte ones).
fn sum_words(part: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { sum_words_avx512(part) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_words_avx2(part) };
    }
    // Four accumulators let the loads overlap.
    let mut acc = [0u64; 4];
    let chunks = part.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, b| a.wrapping_add(*b))
}

/// [`sum_words`] with 64-byte loads.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(part: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let chunks = part.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 32 words, four vectors of eight.
            let v = unsafe { _mm512_loadu_si512(c.as_ptr().add(i * 8) as *const _) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let v = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    rest.iter()
        .fold(_mm512_reduce_add_epi64(v) as u64, |a, b| a.wrapping_add(*b))
}

/// [`sum_words`] with 32-byte loads.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(part: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let chunks = part.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 16 words, four vectors of four.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().add(i * 4) as *const __m256i) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let v = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` holds four words.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
    lanes
        .iter()
        .chain(rest)
        .fold(0u64, |a, b| a.wrapping_add(*b))
}

#[cfg(test)]
mod tests {
    use super::sum_words;

    #[test]
    fn the_probe_sums_every_word_whatever_the_loads() {
        for len in [0usize, 3, 31, 32, 33, 1000, 4099] {
            let words: Vec<u64> = (0..len as u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .collect();
            let want = words.iter().fold(0u64, |a, b| a.wrapping_add(*b));
            assert_eq!(sum_words(&words), want, "{len} words");
        }
    }
}
