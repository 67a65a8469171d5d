//! Log-probabilities of sampled tokens (OpenAI's `logprobs` and
//! `top_logprobs`), computed from one step's logits.
//!
//! The numbers are the log-softmax of the model's raw logits, before the
//! request's temperature and nucleus cut: OpenAI reports the model's own
//! distribution, so a token's logprob does not change with the sampling
//! settings that picked it, and a greedy token's logprob is the largest.

use super::tokenizer::TextTokenizer;
use crate::proto::openai::{TokenLogprob, TopLogprob};

/// The log-softmax of `logits` at `id`, and the `top` most likely tokens,
/// most likely first (ties by the lower id). Sums run in f64 so that a
/// vocabulary of 150k entries does not lose the small ones.
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (f32::NEG_INFINITY, Vec::new());
    }
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let chosen = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    // A partial selection: `top` is at most 20, the vocabulary 50k to 150k.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(_, b)| l <= b) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    (chosen, best.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

/// A token's bytes and its text for `logprobs.content`.
fn token_text(tok: &TextTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The `logprobs.content` entry of sampled token `id` at a step with these
/// logits, with `top` alternatives.
pub fn entry(tok: &TextTokenizer, logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let (logprob, best) = token_logprobs(logits, id, top);
    let (token, bytes) = token_text(tok, id);
    TokenLogprob {
        token,
        logprob,
        bytes: Some(bytes),
        top_logprobs: best
            .into_iter()
            .map(|(i, logprob)| {
                let (token, bytes) = token_text(tok, i);
                TopLogprob {
                    token,
                    logprob,
                    bytes: Some(bytes),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top_entries() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let (lp, top) = token_logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(lp) - (2.0 - z.ln())).abs() < 1e-6);
        // Descending, ties by the lower id.
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!(total <= 1.0 + 1e-6);
        let (_, none) = token_logprobs(&logits, 0, 0);
        assert!(none.is_empty());
        let (_, all) = token_logprobs(&logits, 0, 10);
        assert_eq!(all.len(), logits.len());
        let s: f32 = all.iter().map(|t| t.1.exp()).sum();
        assert!((s - 1.0).abs() < 1e-5);
    }
}
