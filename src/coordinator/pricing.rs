//! The grid's price rules (PROTOCOL.md §5.5, §5.8, §5.10, §6.12) over the
//! money types of [`crate::money`]: the band a custom price must lie in,
//! the prompt bound a sealed request is quoted on, and prices on the wire.
//!
//! The wire speaks USD per 1M tokens as JSON numbers; inside, a price is a
//! [`TokenPrice`] of integer micro-USD per 1M tokens, so 0.005 USD/1M is
//! 5,000 ([`MicrosPerM::from_usd`] holds the one rounding rule).

use crate::money::{MicrosPerM, TokenPrice};
use crate::proto::api::PricePair;

/// The band a custom price must lie in: ×0.5 … ×5 of the reference (§5.8).
pub const BAND_FLOOR_DIV: u64 = 2;
pub const BAND_CEILING_MUL: u64 = 5;

/// The lowest custom price allowed against `reference` (halves rounded up).
pub fn floor(reference: TokenPrice) -> TokenPrice {
    let f = |p: MicrosPerM| MicrosPerM(p.0.div_ceil(BAND_FLOOR_DIV));
    TokenPrice::new(f(reference.input), f(reference.output))
}

/// The highest custom price allowed against `reference`.
pub fn ceiling(reference: TokenPrice) -> TokenPrice {
    let c = |p: MicrosPerM| MicrosPerM(p.0.saturating_mul(BAND_CEILING_MUL));
    TokenPrice::new(c(reference.input), c(reference.output))
}

/// Whether both halves of `price` lie within `[floor, ceiling]` of
/// `reference`.
pub fn within_band(price: TokenPrice, reference: TokenPrice) -> bool {
    let (lo, hi) = (floor(reference), ceiling(reference));
    (lo.input..=hi.input).contains(&price.input) && (lo.output..=hi.output).contains(&price.output)
}

/// A price as the wire shows it (USD per 1M tokens).
pub fn to_wire(price: TokenPrice) -> PricePair {
    PricePair {
        input_per_m: price.input.usd(),
        output_per_m: price.output.usd(),
    }
}

/// Tokens a chat template may add once per prompt beyond the text it wraps:
/// a default system prompt some models' templates insert, the BOS token and
/// the assistant turn's header.
pub const TEMPLATE_TOKENS: u64 = 256;

/// The prompt-token bound of a sealed input (§5.10, §7f): one token per
/// plaintext byte (the ciphertext bytes less the seal's 40 bytes of
/// overhead) plus [`TEMPLATE_TOKENS`].
///
/// It cannot under-count, whatever the tokenizer: every token of a
/// byte-level BPE or a SentencePiece vocabulary with byte fallback covers
/// at least one byte of text, so n bytes of text are at most n tokens (the
/// former `bytes / 4` assumed four bytes per token, which short words and
/// digits undercut). The sealed plaintext is the job's JSON: around each
/// message's text it carries `{"role":"…","content":"…"}`, at least 24
/// bytes plus the role, more than the tokens a template puts around a
/// message (ChatML 4 plus the role, Llama 3 5 plus the role), and JSON
/// escapes only add bytes. What the template adds once per prompt is
/// [`TEMPLATE_TOKENS`].
pub fn sealed_prompt_bound(ciphertext_bytes: u64) -> u64 {
    ciphertext_bytes
        .saturating_sub(40)
        .saturating_add(TEMPLATE_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64, o: u64) -> TokenPrice {
        TokenPrice::new(MicrosPerM(i), MicrosPerM(o))
    }

    #[test]
    fn band_is_half_to_five_times() {
        let r = p(5_000, 5_000);
        assert!(within_band(p(2_500, 25_000), r));
        assert!(!within_band(p(2_499, 5_000), r));
        assert!(!within_band(p(5_000, 25_001), r));
        assert_eq!(floor(p(5_001, 3)), p(2_501, 2));
        assert_eq!(ceiling(p(5_001, 3)), p(25_005, 15));
    }

    #[test]
    fn wire_prices_are_usd_per_million() {
        let w = to_wire(p(4_000, 2_500));
        assert_eq!((w.input_per_m, w.output_per_m), (0.004, 0.0025));
    }

    #[test]
    fn sealed_bound_is_an_upper_bound() {
        assert_eq!(sealed_prompt_bound(40), TEMPLATE_TOKENS);
        assert_eq!(sealed_prompt_bound(45), 5 + TEMPLATE_TOKENS);
        assert_eq!(sealed_prompt_bound(4040), 4000 + TEMPLATE_TOKENS);
        // Short tokens: "1 2 3 …" is one token per two bytes, which a
        // bytes / 4 bound undercounts twice over.
        let digits = (0..500)
            .map(|i| (i % 10).to_string())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(sealed_prompt_bound(digits.len() as u64 + 40) >= 500);
        // 32 bytes of 0xff encode to 44 base58 characters.
        use crate::proto::b58::max_decoded_len;
        assert!(max_decoded_len(44) >= 32);
        assert_eq!(max_decoded_len(0), 0);
    }
}
