//! What one execution costs: per size, a base price that covers the size's
//! default timeout, plus a per-second rate for every second asked for
//! beyond it. Amounts are USDC atomic units (6 decimals), which are
//! micro-USD ([`Micros`]); the quote is made from the request alone, before
//! anything runs, and is what the client pays whatever the code then does.
//!
//! The defaults are the seed's table:
//!
//! | size | base | per second beyond the default timeout |
//! |---|---|---|
//! | small | 2000 ($0.002) | 50 ($0.00005) |
//! | med | 8000 ($0.008) | 120 ($0.00012) |
//! | large | 30000 ($0.03) | 250 ($0.00025) |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{Size, SizeLimits};
use crate::money::Micros;

/// The price of one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePrice {
    /// Covers a run up to the size's default timeout.
    pub base: Micros,
    /// Each second asked for beyond the default timeout.
    pub per_second: Micros,
}

/// The prices of every size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecPricing {
    /// Indexed small, med, large.
    prices: [SizePrice; 3],
}

impl Default for ExecPricing {
    fn default() -> Self {
        ExecPricing {
            prices: [
                SizePrice {
                    base: Micros(2_000),
                    per_second: Micros(50),
                },
                SizePrice {
                    base: Micros(8_000),
                    per_second: Micros(120),
                },
                SizePrice {
                    base: Micros(30_000),
                    per_second: Micros(250),
                },
            ],
        }
    }
}

fn index(size: Size) -> usize {
    match size {
        Size::Small => 0,
        Size::Med => 1,
        Size::Large => 2,
    }
}

impl ExecPricing {
    pub fn price(&self, size: Size) -> SizePrice {
        self.prices[index(size)]
    }

    pub fn set(&mut self, size: Size, price: SizePrice) {
        self.prices[index(size)] = price;
    }

    /// The price of a run of `size` allowed `timeout` (already clamped to
    /// the size's maximum): the base, plus the per-second rate for each
    /// whole or started second beyond the default timeout. `None` on
    /// overflow (only absurd configured prices reach it).
    pub fn quote(&self, size: Size, limits: &SizeLimits, timeout: Duration) -> Option<Micros> {
        let p = self.price(size);
        let extra = timeout.saturating_sub(limits.default_timeout);
        // Started seconds count: a timeout of 30.2 s on a 30 s default pays
        // one second.
        let secs = extra.as_secs() + u64::from(extra.subsec_nanos() > 0);
        let extra_cost = p.per_second.0.checked_mul(secs)?;
        p.base.checked_add(Micros(extra_cost))
    }
}

/// A `--code-exec-price` value: `SIZE=BASE[:PER_SECOND]`, in USDC atomic
/// units (micro-USD), e.g. `small=2000:50`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceOverride {
    pub size: Size,
    pub base: Micros,
    pub per_second: Option<Micros>,
}

impl FromStr for PriceOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "{s:?}: expected SIZE=BASE[:PER_SECOND] in USDC atomic units, e.g. small=2000:50"
            )
        };
        let (size, amounts) = s.split_once('=').ok_or_else(usage)?;
        let size = match size.trim() {
            "small" => Size::Small,
            "med" => Size::Med,
            "large" => Size::Large,
            other => return Err(format!("unknown size {other:?} (small | med | large)")),
        };
        let (base, per_second) = match amounts.split_once(':') {
            Some((b, p)) => (b, Some(p)),
            None => (amounts, None),
        };
        let parse = |v: &str| v.trim().parse::<u64>().map(Micros).map_err(|_| usage());
        Ok(PriceOverride {
            size,
            base: parse(base)?,
            per_second: per_second.map(parse).transpose()?,
        })
    }
}

impl fmt::Display for PriceOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.size.as_str(), self.base.0)?;
        if let Some(p) = self.per_second {
            write!(f, ":{}", p.0)?;
        }
        Ok(())
    }
}

impl ExecPricing {
    /// The defaults with `overrides` applied in order.
    pub fn with_overrides(overrides: &[PriceOverride]) -> ExecPricing {
        let mut p = ExecPricing::default();
        for o in overrides {
            let old = p.price(o.size);
            p.set(
                o.size,
                SizePrice {
                    base: o.base,
                    per_second: o.per_second.unwrap_or(old.per_second),
                },
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_table() {
        let p = ExecPricing::default();
        let small = Size::Small.limits();
        // The default timeout (and anything shorter) pays the base.
        assert_eq!(
            p.quote(Size::Small, &small, Duration::from_secs(30)),
            Some(Micros(2_000))
        );
        assert_eq!(
            p.quote(Size::Small, &small, Duration::from_secs(1)),
            Some(Micros(2_000))
        );
        // 60 s on small: 30 s beyond the default at $0.00005.
        assert_eq!(
            p.quote(Size::Small, &small, Duration::from_secs(60)),
            Some(Micros(2_000 + 30 * 50))
        );
        // A started second counts.
        assert_eq!(
            p.quote(Size::Small, &small, Duration::from_millis(30_001)),
            Some(Micros(2_050))
        );
        let large = Size::Large.limits();
        assert_eq!(
            p.quote(Size::Large, &large, large.max_timeout),
            Some(Micros(30_000 + (3600 - 120) * 250))
        );
        assert_eq!(
            p.quote(Size::Med, &Size::Med.limits(), Duration::from_secs(60)),
            Some(Micros(8_000))
        );
    }

    #[test]
    fn overrides() {
        let o: PriceOverride = "med=9000:100".parse().unwrap();
        assert_eq!(o.size, Size::Med);
        assert_eq!(o.to_string(), "med=9000:100");
        let only_base: PriceOverride = "large=1".parse().unwrap();
        let p = ExecPricing::with_overrides(&[o, only_base]);
        assert_eq!(
            p.price(Size::Med),
            SizePrice {
                base: Micros(9_000),
                per_second: Micros(100)
            }
        );
        assert_eq!(p.price(Size::Large).base, Micros(1));
        assert_eq!(p.price(Size::Large).per_second, Micros(250));
        for bad in ["huge=1", "small", "small=-1", "small=1:x", "small=0.5"] {
            assert!(bad.parse::<PriceOverride>().is_err(), "{bad}");
        }
        let absurd = ExecPricing::with_overrides(&[PriceOverride {
            size: Size::Small,
            base: Micros(u64::MAX),
            per_second: Some(Micros(u64::MAX)),
        }]);
        let l = Size::Small.limits();
        assert_eq!(absurd.quote(Size::Small, &l, Duration::from_secs(31)), None);
    }
}
