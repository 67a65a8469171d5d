//! Sampling: greedy, temperature and nucleus (top_p), with one RNG per request
//! so that a seeded request draws the same tokens whatever else is batched.

/// Per-request sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

/// xoshiro256** seeded through splitmix64: small, fast and fully determined by
/// the seed, which is what reproducibility needs.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Draw the next token.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature <= 1e-5 || logits.is_empty() {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
    let sum: f32 = probs.iter().sum();
    if !(sum.is_finite() && sum > 0.0) {
        return argmax(logits);
    }
    for p in probs.iter_mut() {
        *p /= sum;
    }
    let top_p = params.top_p.clamp(0.0, 1.0);
    if top_p >= 1.0 {
        return draw(probs.iter().copied().enumerate(), 1.0, rng);
    }
    // The nucleus is the smallest set of most likely tokens whose mass reaches
    // top_p. Sorting the whole vocabulary every token is slow, so sort only the
    // tokens above a small threshold; that is exact whenever they alone reach top_p.
    let mut threshold = 1e-4f32;
    loop {
        let mut cand: Vec<(usize, f32)> = probs
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, p)| p >= threshold)
            .collect();
        let mass: f32 = cand.iter().map(|c| c.1).sum();
        if mass >= top_p || threshold == 0.0 {
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0.0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
            let total: f32 = cand.iter().map(|c| c.1).sum();
            return draw(cand.into_iter(), total, rng);
        }
        threshold = if threshold < 1e-9 {
            0.0
        } else {
            threshold / 100.0
        };
    }
}

fn draw(items: impl Iterator<Item = (usize, f32)> + Clone, total: f32, rng: &mut Rng) -> u32 {
    let r = rng.next_f64() as f32 * total;
    let mut acc = 0.0f32;
    let mut last = 0usize;
    for (i, p) in items {
        if p <= 0.0 {
            continue;
        }
        acc += p;
        last = i;
        if r < acc {
            return i as u32;
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &mut Rng::new(0)), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let x: Vec<u32> = (0..50).map(|_| sample(&logits, &p, &mut a)).collect();
        let y: Vec<u32> = (0..50).map(|_| sample(&logits, &p, &mut b)).collect();
        assert_eq!(x, y);
        assert!(x.iter().any(|&t| t != x[0]), "sampling should vary");
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [1.0, 5.0, 4.9, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 3,
        };
        let mut r = Rng::new(3);
        for _ in 0..20 {
            assert_eq!(sample(&logits, &p, &mut r), 1);
        }
    }
}
