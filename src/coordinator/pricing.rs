//! Prices in integer micro-USD (PROTOCOL.md §5.5, §5.8, §6.12).
//!
//! The wire speaks USD per 1M tokens as JSON numbers; inside, a price is an
//! integer count of micro-USD per 1M tokens, so 0.005 USD/1M is 5,000. Floats
//! appear only at the edge, in [`PerM::from_usd`] and [`PerM::usd`].

use serde::Serialize;

use crate::proto::api::PricePair;

/// Micro-USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct PerM(pub u64);

/// Prices above this (1,000 USD per 1M tokens) are refused as nonsense.
const MAX_PER_M: u64 = 1_000_000_000;

impl PerM {
    /// From a wire value in USD per 1M tokens, rounded to the micro-USD.
    /// Negative, non-finite or absurd values are refused.
    pub fn from_usd(usd: f64) -> Option<PerM> {
        if !usd.is_finite() || usd < 0.0 {
            return None;
        }
        let micros = (usd * 1e6).round();
        if micros > MAX_PER_M as f64 {
            return None;
        }
        Some(PerM(micros as u64))
    }

    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

/// An input and output price pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Price {
    pub input: PerM,
    pub output: PerM,
}

/// The band a custom price must lie in: ×0.5 … ×5 of the reference (§5.8).
pub const BAND_FLOOR_DIV: u64 = 2;
pub const BAND_CEILING_MUL: u64 = 5;

impl Price {
    pub const fn new(input: u64, output: u64) -> Price {
        Price {
            input: PerM(input),
            output: PerM(output),
        }
    }

    /// `blended_per_m = (input + output) / 2`, rounded up so that a cap is
    /// never undercut by rounding (§5.5).
    pub fn blended(self) -> PerM {
        PerM((self.input.0 + self.output.0).div_ceil(2))
    }

    pub fn floor(self) -> Price {
        Price {
            input: PerM(self.input.0.div_ceil(BAND_FLOOR_DIV)),
            output: PerM(self.output.0.div_ceil(BAND_FLOOR_DIV)),
        }
    }

    pub fn ceiling(self) -> Price {
        Price {
            input: PerM(self.input.0 * BAND_CEILING_MUL),
            output: PerM(self.output.0 * BAND_CEILING_MUL),
        }
    }

    /// Whether both halves lie within `[floor, ceiling]` of `reference`.
    pub fn within_band(self, reference: Price) -> bool {
        let (lo, hi) = (reference.floor(), reference.ceiling());
        (lo.input..=hi.input).contains(&self.input)
            && (lo.output..=hi.output).contains(&self.output)
    }

    /// The cost of a job in micro-USD (§6.12), rounded up to the micro-USD:
    /// the ledger is integer, and a job that produced tokens is never free.
    pub fn cost(self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        let price = crate::payments::grid::TokenPrice {
            input_per_m: crate::store::Micros(self.input.0),
            output_per_m: crate::store::Micros(self.output.0),
        };
        crate::payments::grid::cost(price, prompt_tokens, completion_tokens).0
    }

    pub fn to_wire(self) -> PricePair {
        PricePair {
            input_per_m: self.input.usd(),
            output_per_m: self.output.usd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_round_trips_to_micro_units() {
        assert_eq!(PerM::from_usd(0.005), Some(PerM(5_000)));
        assert_eq!(PerM::from_usd(0.0025), Some(PerM(2_500)));
        assert_eq!(PerM::from_usd(-1.0), None);
        assert_eq!(PerM::from_usd(f64::NAN), None);
        assert_eq!(PerM::from_usd(1e9), None);
        assert_eq!(PerM(4_000).usd(), 0.004);
    }

    #[test]
    fn band_is_half_to_five_times() {
        let r = Price::new(5_000, 5_000);
        assert!(Price::new(2_500, 25_000).within_band(r));
        assert!(!Price::new(2_499, 5_000).within_band(r));
        assert!(!Price::new(5_000, 25_001).within_band(r));
    }

    #[test]
    fn cost_is_exact_and_rounds_up() {
        // 1M prompt tokens at 5,000 µUSD/1M plus 2M completion at 10,000.
        assert_eq!(Price::new(5_000, 10_000).cost(1_000_000, 2_000_000), 25_000);
        // 100 tokens at 5,000 µUSD/1M = 0.5 µUSD → 1.
        assert_eq!(Price::new(5_000, 5_000).cost(100, 0), 1);
        assert_eq!(Price::new(5_000, 5_000).cost(0, 0), 0);
        assert_eq!(Price::new(4_000, 4_000).blended(), PerM(4_000));
        assert_eq!(Price::new(4_000, 4_001).blended(), PerM(4_001));
    }
}
