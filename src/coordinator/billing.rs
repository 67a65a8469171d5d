//! Billing a grid job (PROTOCOL.md §5.10, §6.12): who pays, what is held at
//! request time, and what is charged when the job ends.
//!
//! - At request time, [`authorize`] turns the request's credentials into a
//!   [`JobBilling`]: an API key or a wallet signature holds credits sized
//!   from the quote (`max_tokens` and the prompt bound); an x402 or MPP
//!   payment is verified and reserved; with neither, a 402 challenge. In
//!   development mode a request without credentials runs free.
//! - When the job ends, [`close`] settles: a completed job is charged its
//!   signed usage at the node's price (never above the quote); a client
//!   abort only the completion tokens delivered; a failure nothing. A
//!   per-request payment is settled with the facilitator before the result
//!   is released. Every job leaves one usage row with the revenue split.

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::pricing::Price;
use super::state::Grid;
use crate::payments::{http as pay_http, Payer, Payments, PendingPayment, RequestParts};
use crate::proto::openai::Usage;
use crate::store::{HoldId, Micros, UsageRow, WalletId};

/// The revenue split in percent: operator, stakers, burn; the platform takes
/// the rest, so rounding never loses a micro-dollar.
pub const OPERATOR_PCT: u64 = 80;
pub const STAKERS_PCT: u64 = 10;
pub const BURN_PCT: u64 = 5;

/// How a job is paid for.
#[derive(Debug)]
pub enum Funding {
    /// Development mode without credentials: nothing is charged.
    Free,
    /// Credits held from a wallet's balance.
    Credits {
        wallet: WalletId,
        hold: HoldId,
        api_key_id: Option<String>,
    },
    /// A verified, reserved x402 or MPP payment for exactly the quote.
    Payment(Box<PendingPayment>),
}

/// A job's bill in the making.
#[derive(Debug)]
pub struct JobBilling {
    pub price: Price,
    /// The quote: the most this job may cost (micro-USD).
    pub quote: u64,
    pub funding: Funding,
}

/// How a job ended, for billing.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed {
        usage: Usage,
        usage_signature: Option<String>,
        result_signature: Option<String>,
    },
    /// The client left; only delivered completion tokens are billed.
    Aborted {
        completion_tokens: u64,
        usage_signature: Option<String>,
    },
    Failed,
}

/// What the coordinator knows of the job when it bills it.
#[derive(Debug, Clone)]
pub struct JobMeta {
    pub job_id: String,
    pub node_id: String,
    pub operator_wallet: String,
    pub model: String,
}

/// The split of a cost: (operator, platform, stakers, burn).
pub fn split(cost: u64) -> (u64, u64, u64, u64) {
    let operator = cost * OPERATOR_PCT / 100;
    let stakers = cost * STAKERS_PCT / 100;
    let burn = cost * BURN_PCT / 100;
    (operator, cost - operator - stakers - burn, stakers, burn)
}

fn payments(grid: &Grid) -> Option<&Payments> {
    grid.payments.as_ref()
}

/// Who pays for a request and how; `Err` is the response to send instead
/// (402 challenge, 401, 402 insufficient credits with the shortfall).
pub async fn authorize(
    grid: &Grid,
    parts: &RequestParts<'_>,
    price: Price,
    quote: u64,
    reference: &str,
) -> Result<JobBilling, Response> {
    let bill = |funding| JobBilling {
        price,
        quote,
        funding,
    };
    let Some(p) = payments(grid) else {
        if grid.config.dev {
            return Ok(bill(Funding::Free));
        }
        return Err(
            super::error::ClientError::internal("billing is not configured").into_response(),
        );
    };
    let offer = p.offer(
        parts.headers,
        parts.uri,
        Micros(quote),
        "sgl grid chat completion",
    );
    match p.authorize(parts, Some(&offer)).await {
        Ok(None) if grid.config.dev => Ok(bill(Funding::Free)),
        Ok(None) => Err(pay_http::challenge(
            p,
            &offer,
            "payment required: pass an API key or a payment",
        )),
        Err(e) => Err(pay_http::refusal(p, &e, Some(&offer))),
        Ok(Some(Payer::Payment(pending))) => Ok(bill(Funding::Payment(Box::new(pending)))),
        Ok(Some(payer)) => {
            let api_key_id = match &payer {
                Payer::ApiKey { key_id, .. } => Some(key_id.clone()),
                _ => None,
            };
            let wallet = payer.wallet().clone();
            match p.hold_credits(&wallet, Micros(quote), reference).await {
                Ok(hold) => Ok(bill(Funding::Credits {
                    wallet,
                    hold,
                    api_key_id,
                })),
                Err(e) => Err(pay_http::refusal(p, &e, Some(&offer))),
            }
        }
    }
}

/// Give back what a request reserved when it never became a job.
pub async fn release(grid: &Grid, billing: JobBilling) {
    let Some(p) = payments(grid) else { return };
    match billing.funding {
        Funding::Free => {}
        Funding::Credits { hold, .. } => {
            if let Err(e) = p.release_credits(&hold).await {
                tracing::error!(error = %e, "could not release a credit hold");
            }
        }
        Funding::Payment(pending) => p.release(*pending).await,
    }
}

/// Close a job's bill. Returns the headers to add to the client's answer
/// (payment receipts); `Err` when a per-request payment could not be
/// settled, in which case the result must not be released.
pub async fn close(
    grid: &Grid,
    meta: &JobMeta,
    billing: Option<JobBilling>,
    outcome: Outcome,
) -> Result<HeaderMap, String> {
    let Some(billing) = billing else {
        return Ok(HeaderMap::new());
    };
    let (status, prompt, completion, usage_sig, result_sig) = match &outcome {
        Outcome::Completed {
            usage,
            usage_signature,
            result_signature,
        } => (
            "completed",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage_signature.clone(),
            result_signature.clone(),
        ),
        Outcome::Aborted {
            completion_tokens,
            usage_signature,
        } => (
            "aborted",
            0,
            *completion_tokens,
            usage_signature.clone(),
            None,
        ),
        Outcome::Failed => ("failed", 0, 0, None, None),
    };
    let billable = !matches!(outcome, Outcome::Failed);
    let metered = billing.price.cost(prompt, completion).min(billing.quote);
    let mut headers = HeaderMap::new();
    let mut result = Ok(());
    let (method, payer_wallet, api_key_id, cost) = match billing.funding {
        Funding::Free => ("free", None, None, 0),
        Funding::Credits {
            wallet,
            hold,
            api_key_id,
        } => {
            let charged = if billable { metered } else { 0 };
            if let Some(p) = payments(grid) {
                let r = if billable {
                    p.settle_credits(&hold, Micros(charged)).await
                } else {
                    p.release_credits(&hold).await
                };
                if let Err(e) = r {
                    tracing::error!(job_id = %meta.job_id, error = %e, "settling credits failed");
                }
            }
            ("credits", Some(wallet), api_key_id, charged)
        }
        Funding::Payment(pending) => {
            let method = pending.method.scheme();
            let wallet = pending.wallet.clone();
            let amount = pending.amount.0;
            match payments(grid) {
                Some(p) if billable => match p.settle(*pending, None).await {
                    Ok(s) => {
                        headers = s.headers;
                        (method, Some(wallet), None, amount)
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %meta.job_id, error = %e, "payment settlement failed; withholding the result");
                        result = Err(format!("payment settlement failed: {}", e.code()));
                        (method, Some(wallet), None, 0)
                    }
                },
                Some(p) => {
                    p.release(*pending).await;
                    (method, Some(wallet), None, 0)
                }
                None => (method, Some(wallet), None, 0),
            }
        }
    };
    let status = if result.is_err() { "failed" } else { status };
    let (operator, platform, stakers, burn) = split(cost);
    let row = UsageRow {
        job_id: meta.job_id.clone(),
        node_id: meta.node_id.clone(),
        operator_wallet: meta.operator_wallet.clone(),
        payer_wallet: payer_wallet.map(|w| w.as_str().to_string()),
        api_key_id,
        method: method.to_string(),
        model: meta.model.clone(),
        status: status.to_string(),
        prompt_tokens: prompt as i64,
        completion_tokens: completion as i64,
        input_per_m: billing.price.input.0 as i64,
        output_per_m: billing.price.output.0 as i64,
        quoted: billing.quote as i64,
        cost: cost as i64,
        operator_share: operator as i64,
        platform_share: platform as i64,
        stakers_share: stakers as i64,
        burn_share: burn as i64,
        usage_signature: usage_sig,
        result_signature: result_sig,
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    if let Some(store) = grid.store() {
        if let Err(e) = store.record_usage(&row).await {
            tracing::error!(job_id = %meta.job_id, error = %e, "could not record usage");
        }
    }
    tracing::info!(job_id = %meta.job_id, status, method, cost, "job billed");
    result.map(|()| headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_adds_up_and_favours_nobody_by_rounding() {
        for cost in [0, 1, 7, 99, 100, 12_345, u32::MAX as u64] {
            let (o, p, s, b) = split(cost);
            assert_eq!(o + p + s + b, cost);
            assert_eq!(o, cost * 80 / 100);
        }
        assert_eq!(split(100), (80, 5, 10, 5));
    }

    #[test]
    fn sealed_bound_is_an_upper_bound() {
        // 32 bytes of 0xff encode to 44 base58 characters.
        use crate::proto::b58::max_decoded_len;
        assert!(max_decoded_len(44) >= 32);
        assert_eq!(max_decoded_len(0), 0);
    }
}
