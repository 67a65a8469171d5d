//! Grid pricing: what a `/v1/chat/completions` request is quoted and what
//! it is charged, in integer micro-USD, and how the coordinator gates it.
//!
//! # Prices and the one rounding rule
//!
//! Node prices are USD per 1M tokens on the wire (`0.005`). They become a
//! [`TokenPrice`] in micro-USD per 1M tokens through their shortest decimal
//! form (no float arithmetic): `0.005` → 5 000 µUSD/M. A cost is
//!
//! `ceil((prompt_tokens × input_per_m + completion_tokens × output_per_m) / 10⁶)`
//!
//! computed exactly in 128 bits and rounded once, up, to the micro-dollar.
//! Cost is monotonic in each price, so a node priced at or under a request's
//! `max_price` never costs more than `max_price` would.
//!
//! # Wiring in the coordinator (PROTOCOL.md §5.10, §6.12)
//!
//! In `chat` (sealed and plain), after the reservation is resolved and
//! before the job is pushed:
//!
//! ```text
//! let price = TokenPrice::from_wire(node.effective_in, node.effective_out)?;
//! let quote = quote_sealed(price, ciphertext_len, max_tokens);   // or quote_plain
//! let offer = payments.offer(&headers, &uri, quote, "SGL grid chat completion");
//! let charge = match payments.begin_charge(&RequestParts{..}, &offer, &job_id).await {
//!     Ok(c) => c,
//!     Err(ChargeRefused::PaymentRequired) => return http::challenge(&payments, &offer, "payment required"),
//!     Err(ChargeRefused::Refused(e)) => return http::refusal(&payments, &e, Some(&offer)),
//! };
//! // … push the job; on billable output:
//! let charged = payments.finish_charge(charge, cost(price, usage.prompt, usage.completion)).await?;
//! //   add charged.headers to the response; record charged.amount with the job
//! // … on failure (fail, ghost, timeout, bad signature):
//! payments.abort_charge(charge).await;
//! ```
//!
//! `begin_charge` returns either branch below; `finish_charge` and
//! `abort_charge` do the right thing for each.
//!
//! - **Credits** (API key): `hold_credits(wallet, quote, job_id)` before
//!   dispatch (402 `insufficient_credits` via `refusal` when short); on
//!   `/complete` `settle_credits(hold, cost(price, usage…))`, which records
//!   the actual price in the ledger (`settle` row, reference = job id); on
//!   failure `release_credits(hold)`.
//! - **x402 / MPP** (`exact` is a fixed amount): the payment is verified
//!   and reserved by `authorize`; the job runs; `settle(p, None)` runs when
//!   the job produced billable output, before the result is released, and
//!   its `Settlement::headers` go on the response; on failure `release(p)`
//!   and nothing is charged. For a stream, the coordinator settles when the
//!   node's first chunk arrives and before the SSE response starts (its
//!   headers carry `PAYMENT-RESPONSE`); a node failing before its first
//!   chunk releases the payment. The quote paid is recorded with the
//!   payment (`payment_nonces.amount`, `resource`).
//! - `/v1/reserve` stays free; a 402 does not consume the reservation.

use crate::store::Micros;

/// A price in micro-USD per 1M tokens, input and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPrice {
    pub input_per_m: Micros,
    pub output_per_m: Micros,
}

impl TokenPrice {
    /// From wire prices in USD per 1M tokens, read through their shortest
    /// decimal form. None for negative, non-finite, or sub-micro-dollar
    /// precision values.
    pub fn from_wire(input_usd_per_m: f64, output_usd_per_m: f64) -> Option<TokenPrice> {
        let read = |v: f64| {
            if !v.is_finite() || v < 0.0 {
                return None;
            }
            Micros::parse_usd(&format!("{v}"))
        };
        Some(TokenPrice {
            input_per_m: read(input_usd_per_m)?,
            output_per_m: read(output_usd_per_m)?,
        })
    }
}

/// The cost of `prompt` and `completion` tokens at `price` (the one
/// rounding rule above). Saturates at `u64::MAX` micro-USD.
pub fn cost(price: TokenPrice, prompt_tokens: u64, completion_tokens: u64) -> Micros {
    let total = u128::from(prompt_tokens) * u128::from(price.input_per_m.0)
        + u128::from(completion_tokens) * u128::from(price.output_per_m.0);
    let micros = total.div_ceil(1_000_000);
    Micros(u64::try_from(micros).unwrap_or(u64::MAX))
}

/// The prompt-token bound of a sealed input: `ceil((ciphertext bytes − 40) / 4)`
/// (PROTOCOL.md §5.10; 40 bytes are the seal's overhead).
pub fn sealed_prompt_bound(ciphertext_bytes: u64) -> u64 {
    ciphertext_bytes.saturating_sub(40).div_ceil(4)
}

/// The quote (and credit hold) of a sealed request.
pub fn quote_sealed(price: TokenPrice, ciphertext_bytes: u64, max_tokens: u64) -> Micros {
    cost(price, sealed_prompt_bound(ciphertext_bytes), max_tokens)
}

/// The quote of a plain request whose prompt is bounded by
/// `prompt_tokens_bound`.
pub fn quote_plain(price: TokenPrice, prompt_tokens_bound: u64, max_tokens: u64) -> Micros {
    cost(price, prompt_tokens_bound, max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_prices_convert_exactly() {
        let p = TokenPrice::from_wire(0.005, 0.025).unwrap();
        assert_eq!(p.input_per_m, Micros(5_000));
        assert_eq!(p.output_per_m, Micros(25_000));
        assert!(TokenPrice::from_wire(-1.0, 0.0).is_none());
        assert!(TokenPrice::from_wire(f64::NAN, 0.0).is_none());
        assert!(TokenPrice::from_wire(0.0000001, 0.0).is_none());
    }

    #[test]
    fn cost_rounds_once_up() {
        let p = TokenPrice::from_wire(0.005, 0.005).unwrap();
        // 1000 tokens × 5000 µUSD/M = 5 µUSD exactly.
        assert_eq!(cost(p, 600, 400), Micros(5));
        // 1 token × 5000 / 1e6 = 0.005 µUSD → 1 µUSD.
        assert_eq!(cost(p, 1, 0), Micros(1));
        assert_eq!(cost(p, 0, 0), Micros(0));
        assert_eq!(sealed_prompt_bound(40), 0);
        assert_eq!(sealed_prompt_bound(45), 2);
        assert_eq!(quote_sealed(p, 4040, 1000), cost(p, 1000, 1000));
    }

    #[test]
    fn cost_never_exceeds_the_cap_price() {
        // Deterministic sweep: a node at or under the cap never costs more.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cap = TokenPrice {
                input_per_m: Micros(x % 50_000_000),
                output_per_m: Micros((x >> 20) % 50_000_000),
            };
            let node = TokenPrice {
                input_per_m: Micros(cap.input_per_m.0 - (x >> 7) % (cap.input_per_m.0 + 1)),
                output_per_m: Micros(cap.output_per_m.0 - (x >> 9) % (cap.output_per_m.0 + 1)),
            };
            let (pt, ct) = ((x >> 3) % 200_000, (x >> 11) % 100_000);
            assert!(cost(node, pt, ct) <= cost(cap, pt, ct));
            let exact = u128::from(pt) * u128::from(cap.input_per_m.0)
                + u128::from(ct) * u128::from(cap.output_per_m.0);
            let c = u128::from(cost(cap, pt, ct).0) * 1_000_000;
            assert!(c >= exact && c < exact + 1_000_000);
        }
    }
}
