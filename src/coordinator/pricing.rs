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

/// The prompt-token bound of a sealed input: `ceil((ciphertext bytes − 40) / 4)`
/// (§5.10; 40 bytes are the seal's overhead).
pub fn sealed_prompt_bound(ciphertext_bytes: u64) -> u64 {
    ciphertext_bytes.saturating_sub(40).div_ceil(4)
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
        assert_eq!(sealed_prompt_bound(40), 0);
        assert_eq!(sealed_prompt_bound(45), 2);
        assert_eq!(sealed_prompt_bound(4040), 1000);
        // 32 bytes of 0xff encode to 44 base58 characters.
        use crate::proto::b58::max_decoded_len;
        assert!(max_decoded_len(44) >= 32);
        assert_eq!(max_decoded_len(0), 0);
    }
}
