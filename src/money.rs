//! Money: integer USD micro-units, end to end.
//!
//! [`Micros`] is an amount (10⁻⁶ USD, which is also one USDC base unit);
//! [`MicrosPerM`] is a rate in micro-USD per 1M tokens, and [`TokenPrice`]
//! the input/output pair of rates a job is billed at. Every room (payments,
//! store rows, the coordinator, the CLI) speaks these types; floats appear
//! only where a wire format is a JSON number ([`MicrosPerM::from_usd`],
//! [`MicrosPerM::usd`]).
//!
//! # Reading decimal USD: one reader, one rounding rule
//!
//! Every decimal USD value is read by one exact decimal reader (no float
//! arithmetic). An *amount* ([`Micros::parse_usd`]: a top-up, a grant) is
//! never rounded: finer than a micro-dollar is refused. A *rate* from the
//! wire ([`MicrosPerM::from_usd`]: a node price, a `max_price`) is a JSON
//! number that clients compute in floating point (`0.005 * 3` is
//! `0.015000000000000001`), so it is read through its shortest decimal form
//! and rounded to the nearest micro-dollar per 1M tokens, halves up.
//!
//! # Costs
//!
//! A job's cost is `ceil((prompt × input + completion × output) / 10⁶)`
//! ([`TokenPrice::cost`]), computed exactly in 128 bits and rounded once,
//! up: a job that produced tokens is never free, and a cost is monotonic in
//! each price, so a node priced at or under a cap never costs more than the
//! cap would.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Micro-units in one US dollar.
const PER_USD: u64 = 1_000_000;

/// An amount of money in micro-USD (10⁻⁶ USD). USDC has 6 decimals, so one
/// micro-USD is also one USDC base unit.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(pub u64);

impl Micros {
    pub const ZERO: Micros = Micros(0);
    /// One US dollar.
    pub const USD: Micros = Micros(PER_USD);

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).map(Micros)
    }

    pub fn checked_sub(self, other: Micros) -> Option<Micros> {
        self.0.checked_sub(other.0).map(Micros)
    }

    /// `pct` percent of the amount, rounded down (a share of a split).
    pub fn percent(self, pct: u64) -> Micros {
        let share = u128::from(self.0) * u128::from(pct) / 100;
        Micros(u64::try_from(share).unwrap_or(u64::MAX))
    }

    /// Parse a decimal USD amount ("1", "1.5", "0.000001") exactly. More than
    /// six decimals, signs, exponents and empty parts are refused: an amount
    /// is never rounded.
    pub fn parse_usd(s: &str) -> Option<Micros> {
        let d = Decimal::parse(s)?;
        if d.frac_digits > 6 {
            return None;
        }
        d.micros_rounded().map(Micros)
    }

    /// The amount as a decimal USD string with two to six decimals
    /// ("150.00", "0.000123").
    pub fn to_usd_string(self) -> String {
        let whole = self.0 / PER_USD;
        let frac = self.0 % PER_USD;
        let mut f = format!("{frac:06}");
        while f.len() > 2 && f.ends_with('0') {
            f.pop();
        }
        format!("{whole}.{f}")
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} µUSD", self.0)
    }
}

/// A rate in micro-USD per 1M tokens: 0.005 USD per 1M tokens is 5,000.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicrosPerM(pub u64);

impl MicrosPerM {
    /// Rates above this (1,000 USD per 1M tokens) are refused as nonsense.
    pub const MAX: MicrosPerM = MicrosPerM(1_000 * PER_USD);

    /// From a wire value in USD per 1M tokens: its shortest decimal form,
    /// rounded to the nearest micro-USD (halves up). Negative, non-finite
    /// and absurd (above [`MicrosPerM::MAX`]) values are refused.
    pub fn from_usd(usd: f64) -> Option<MicrosPerM> {
        if !usd.is_finite() || usd < 0.0 {
            return None;
        }
        // `Display` of an f64 is its shortest round-trip decimal form and
        // never uses an exponent.
        MicrosPerM::parse_usd(&format!("{usd}"))
    }

    /// From a decimal string in USD per 1M tokens ("0.005"), rounded to
    /// the nearest micro-USD (halves up); signs, exponents and values above
    /// [`MicrosPerM::MAX`] are refused.
    pub fn parse_usd(s: &str) -> Option<MicrosPerM> {
        let rate = MicrosPerM(Decimal::parse(s)?.micros_rounded()?);
        (rate <= MicrosPerM::MAX).then_some(rate)
    }

    /// The rate in USD per 1M tokens, for the wire.
    pub fn usd(self) -> f64 {
        // Both operands are exact, so the quotient is the double nearest to
        // the decimal value and prints as its shortest form.
        self.0 as f64 / PER_USD as f64
    }
}

/// The price of a job's tokens: input (prompt) and output (completion)
/// rates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenPrice {
    pub input: MicrosPerM,
    pub output: MicrosPerM,
}

impl TokenPrice {
    pub const fn new(input: MicrosPerM, output: MicrosPerM) -> TokenPrice {
        TokenPrice { input, output }
    }

    /// `(input + output) / 2`, rounded up so that a cap is never undercut
    /// by rounding (PROTOCOL.md §5.5).
    pub fn blended(self) -> MicrosPerM {
        let sum = u128::from(self.input.0) + u128::from(self.output.0);
        MicrosPerM(u64::try_from(sum.div_ceil(2)).unwrap_or(u64::MAX))
    }

    /// The cost of `prompt_tokens` and `completion_tokens` at this price,
    /// rounded once, up, to the micro-USD. Saturates at `u64::MAX` µUSD
    /// (unreachable with rates under [`MicrosPerM::MAX`] and any real
    /// token count, and above every quote).
    pub fn cost(self, prompt_tokens: u64, completion_tokens: u64) -> Micros {
        // Each product fits in 128 bits; only their sum can overflow.
        let total = (u128::from(prompt_tokens) * u128::from(self.input.0))
            .saturating_add(u128::from(completion_tokens) * u128::from(self.output.0));
        let micros = total.div_ceil(u128::from(PER_USD));
        Micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }
}

/// A non-negative decimal read digit by digit: `int[.frac]`.
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
    frac_digits: usize,
}

impl<'a> Decimal<'a> {
    /// `1`, `1.5`, `0.000001`: ASCII digits only, at most 12 integer digits,
    /// a fraction (when a dot is present) of at least one digit.
    fn parse(s: &'a str) -> Option<Decimal<'a>> {
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) if !f.is_empty() => (i, f),
            Some(_) => return None,
            None => (s, ""),
        };
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || int.len() > 12 || !digits(int) || !digits(frac) {
            return None;
        }
        Some(Decimal {
            int,
            frac,
            frac_digits: frac.len(),
        })
    }

    /// The value in micro-units, rounded to the nearest (halves up) when
    /// the fraction has more than six digits.
    fn micros_rounded(&self) -> Option<u64> {
        let whole: u64 = self.int.parse().ok()?;
        let mut micros: u64 = 0;
        for (i, b) in self.frac.bytes().take(6).enumerate() {
            micros += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
        }
        let round_up = self.frac.as_bytes().get(6).is_some_and(|b| *b >= b'5');
        whole
            .checked_mul(PER_USD)?
            .checked_add(micros)?
            .checked_add(u64::from(round_up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly_or_not_at_all() {
        assert_eq!(Micros::parse_usd("1"), Some(Micros(1_000_000)));
        assert_eq!(Micros::parse_usd("12.5"), Some(Micros(12_500_000)));
        assert_eq!(Micros::parse_usd("0.000001"), Some(Micros(1)));
        for bad in [
            "0.0000001",
            "-1",
            "+1",
            "1e3",
            "1.",
            ".5",
            "",
            "1.2.3",
            " 1",
        ] {
            assert_eq!(Micros::parse_usd(bad), None, "{bad:?}");
        }
        assert_eq!(Micros::parse_usd("1000000000000"), None);
        assert_eq!(Micros(150_000_000).to_usd_string(), "150.00");
        assert_eq!(Micros(123).to_usd_string(), "0.000123");
    }

    #[test]
    fn wire_rates_round_to_the_nearest_micro() {
        assert_eq!(MicrosPerM::from_usd(0.005), Some(MicrosPerM(5_000)));
        assert_eq!(MicrosPerM::from_usd(0.0025), Some(MicrosPerM(2_500)));
        // Float arithmetic on the client's side does not leak in.
        assert_eq!(MicrosPerM::from_usd(0.005 * 3.0), Some(MicrosPerM(15_000)));
        assert_eq!(MicrosPerM::from_usd(0.0000005), Some(MicrosPerM(1)));
        assert_eq!(MicrosPerM::from_usd(0.0000004), Some(MicrosPerM(0)));
        assert_eq!(MicrosPerM::from_usd(1e-20), Some(MicrosPerM(0)));
        assert_eq!(MicrosPerM::from_usd(1000.0), Some(MicrosPerM::MAX));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1000.000001, 1e9, 1e300] {
            assert_eq!(MicrosPerM::from_usd(bad), None, "{bad}");
        }
        assert_eq!(
            MicrosPerM::parse_usd("0.0150000001"),
            Some(MicrosPerM(15_000))
        );
        assert_eq!(MicrosPerM::parse_usd("0.0000015"), Some(MicrosPerM(2)));
        assert_eq!(MicrosPerM::parse_usd("-0.5"), None);
        assert_eq!(MicrosPerM::parse_usd("5e-3"), None);
        assert_eq!(MicrosPerM(4_000).usd(), 0.004);
        for v in [0.004, 0.0025, 0.015, 12.345678] {
            assert_eq!(MicrosPerM::from_usd(v).unwrap().usd(), v);
        }
    }

    #[test]
    fn cost_rounds_once_up() {
        let p = TokenPrice::new(MicrosPerM(5_000), MicrosPerM(10_000));
        // 1M prompt tokens at 5,000 µUSD/1M plus 2M completion at 10,000.
        assert_eq!(p.cost(1_000_000, 2_000_000), Micros(25_000));
        let p = TokenPrice::new(MicrosPerM(5_000), MicrosPerM(5_000));
        assert_eq!(p.cost(600, 400), Micros(5));
        // 1 token × 5,000 / 10⁶ = 0.005 µUSD → 1 µUSD.
        assert_eq!(p.cost(1, 0), Micros(1));
        assert_eq!(p.cost(0, 0), Micros::ZERO);
        let max = TokenPrice::new(MicrosPerM(u64::MAX), MicrosPerM(u64::MAX));
        assert_eq!(max.cost(u64::MAX, u64::MAX), Micros(u64::MAX));
    }

    #[test]
    fn blended_rounds_up() {
        let p = |i, o| TokenPrice::new(MicrosPerM(i), MicrosPerM(o));
        assert_eq!(p(4_000, 4_000).blended(), MicrosPerM(4_000));
        assert_eq!(p(4_000, 4_001).blended(), MicrosPerM(4_001));
        assert_eq!(p(u64::MAX, u64::MAX).blended(), MicrosPerM(u64::MAX));
    }

    #[test]
    fn cost_never_exceeds_the_cap_price() {
        // Deterministic sweep: a node at or under the cap never costs more,
        // and the cost is the exact value rounded up by less than 1 µUSD.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cap = TokenPrice::new(
                MicrosPerM(x % 50_000_000),
                MicrosPerM((x >> 20) % 50_000_000),
            );
            let node = TokenPrice::new(
                MicrosPerM(cap.input.0 - (x >> 7) % (cap.input.0 + 1)),
                MicrosPerM(cap.output.0 - (x >> 9) % (cap.output.0 + 1)),
            );
            let (pt, ct) = ((x >> 3) % 200_000, (x >> 11) % 100_000);
            assert!(node.cost(pt, ct) <= cap.cost(pt, ct));
            let exact = u128::from(pt) * u128::from(cap.input.0)
                + u128::from(ct) * u128::from(cap.output.0);
            let c = u128::from(cap.cost(pt, ct).0) * 1_000_000;
            assert!(c >= exact && c < exact + 1_000_000);
        }
    }

    #[test]
    fn percent_rounds_down() {
        assert_eq!(Micros(100).percent(80), Micros(80));
        assert_eq!(Micros(99).percent(5), Micros(4));
        assert_eq!(Micros(u64::MAX).percent(100), Micros(u64::MAX));
    }
}
