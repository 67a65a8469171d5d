//! Billing a grid job (PROTOCOL.md §5.10, §6.12): the coordinator's side of
//! the one billing path of [`crate::payments::billing`].
//!
//! - At request time, once the node is reserved, [`authorize`] opens the
//!   job's [`Charge`] for its quote (`max_tokens` and the prompt bound at
//!   the node's price): an API key or a wallet signature holds credits
//!   (from its wallet's reservation in this process when reservations are
//!   on, [`crate::payments::reservations`]: no store write per request); an
//!   x402 or MPP payment is verified, bound to the job and **settled before
//!   the job is dispatched** (PROTOCOL.md §7f), so no byte of an answer
//!   leaves unpaid; a settlement failure is a 402 and no node ever sees the
//!   job. With neither, a 402 challenge. In development mode a request
//!   without credentials runs free.
//! - When the job ends, [`close`] settles the charge at the job's cost: a
//!   completed job its signed usage at the node's price (never above the
//!   quote); a client abort only the completion tokens delivered; a failure
//!   nothing (the hold is released, a prepaid payment refunded whole). A
//!   prepaid payment keeps the cost and credits quote − cost back to the
//!   payer wallet. Every job leaves one usage row with the revenue split
//!   ([`crate::payments::billing::Split`]), written with the hold's
//!   settlement or release in one transaction for a credit charge (with
//!   the reservation's batch, for a reserved one), and with
//!   the refund (credited, or recorded as owed) for a prepaid payment.

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::state::Grid;
use crate::money::{Micros, TokenPrice};
use crate::payments::billing::{Charge, ChargeRefused};
use crate::payments::{http as pay_http, PaymentError, RequestParts};
use crate::proto::openai::Usage;
use crate::store::UsageRow;

/// A job's bill in the making: the node's price and the charge that covers
/// the quote.
#[derive(Debug)]
pub struct JobBilling {
    pub price: TokenPrice,
    pub charge: Charge,
    /// The settlement receipt of a payment (`PAYMENT-RESPONSE`,
    /// `X-PAYMENT-RESPONSE` or `Payment-Receipt`), for the answer's headers.
    pub receipt: HeaderMap,
}

impl JobBilling {
    /// Give back what a request reserved when it never became a job (a
    /// settled payment is refunded whole to credits).
    pub async fn release(self) {
        self.charge.release().await;
    }
}

/// What closing a job's bill gives its answer.
#[derive(Debug, Clone, Default)]
pub struct Billed {
    /// Headers to add to the answer.
    pub headers: HeaderMap,
    /// What a settled payment credited back to its payer (quote − cost).
    pub refunded: Option<Micros>,
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

/// Who pays for a request and how; `Err` is the response to send instead
/// (402 challenge, 401, 402 insufficient credits with the shortfall).
pub async fn authorize(
    grid: &Grid,
    parts: &RequestParts<'_>,
    price: TokenPrice,
    quote: Micros,
    reference: &str,
) -> Result<JobBilling, Response> {
    let bill = |charge| JobBilling {
        price,
        charge,
        receipt: HeaderMap::new(),
    };
    let Some(p) = grid.payments.as_ref() else {
        if grid.config.dev {
            return Ok(bill(Charge::free(quote)));
        }
        // `--no-billing`: nothing can be paid for, so nothing is served.
        return Err(super::error::ClientError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "billing_not_configured",
            "this coordinator does not take payments yet (started with --no-billing)",
        )
        .into_response());
    };
    let offer = p.offer(parts.headers, parts.uri, quote, "sgl grid chat completion");
    let opened = p.open_charge_reserving(parts, &offer, reference).await;
    grid.metrics.payment_verified(match &opened {
        Ok(_) => "accepted",
        Err(ChargeRefused::PaymentRequired) => "payment_required",
        Err(ChargeRefused::Refused(_)) => "refused",
    });
    match opened {
        Ok(charge) => {
            let method = charge.method();
            let paid = prepay(p, charge, &offer, reference).await;
            if !matches!(method, "free" | "credits") {
                grid.metrics.payment_settled(method, paid.is_ok());
            }
            paid.map(|(charge, receipt)| JobBilling {
                price,
                charge,
                receipt,
            })
        }
        Err(ChargeRefused::PaymentRequired) if grid.config.dev => Ok(bill(Charge::free(quote))),
        Err(ChargeRefused::PaymentRequired) => Err(pay_http::challenge(
            p,
            &offer,
            "payment required: pass an API key or a payment",
        )),
        Err(ChargeRefused::Refused(e)) => Err(pay_http::refusal(p, &e, Some(&offer))),
    }
}

/// Settle a payment before the job is dispatched. The settlement runs in
/// its own task, so a client that leaves meanwhile cannot cut it short: the
/// charge then comes back to a dropped handler and refunds itself.
async fn prepay(
    p: &crate::payments::Payments,
    mut charge: Charge,
    offer: &crate::payments::x402::Offer,
    job_id: &str,
) -> Result<(Charge, HeaderMap), Response> {
    let settled = tokio::spawn(async move {
        let r = charge.prepay().await;
        (charge, r)
    })
    .await;
    match settled {
        Ok((charge, Ok(receipt))) => Ok((charge, receipt)),
        Ok((_, Err(e))) => {
            tracing::warn!(%job_id, error = %e, "settlement failed; the job does not run");
            Err(match e {
                // The facilitator failing to settle is the payment's
                // failure, answered like a refusal: a 402 with the reason.
                PaymentError::FacilitatorUnavailable(_) => pay_http::challenge(p, offer, e.code()),
                e => pay_http::refusal(p, &e, Some(offer)),
            })
        }
        Err(e) => {
            tracing::error!(%job_id, error = %e, "the settlement task failed");
            Err(super::error::ClientError::internal("settlement failed").into_response())
        }
    }
}

/// Close a job's bill. Returns the headers to add to the client's answer
/// and the refund of a payment; `Err` when a credit hold could not be
/// settled, in which case the result must not be released. A settled
/// payment never withholds the result: the payer has paid.
pub async fn close(
    grid: &Grid,
    meta: &JobMeta,
    billing: Option<JobBilling>,
    outcome: Outcome,
) -> Result<Billed, String> {
    let Some(JobBilling { price, charge, .. }) = billing else {
        return Ok(Billed::default());
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
    let quote = charge.quote();
    let method = charge.method();
    let prepaid = charge.is_prepaid();
    let row = UsageRow {
        job_id: meta.job_id.clone(),
        node_id: meta.node_id.clone(),
        operator_wallet: meta.operator_wallet.clone(),
        payer_wallet: charge.payer().map(|w| w.as_str().to_string()),
        api_key_id: charge.api_key_id().map(str::to_string),
        method: method.to_string(),
        model: meta.model.clone(),
        status: status.to_string(),
        prompt_tokens: i64::try_from(prompt).unwrap_or(i64::MAX),
        completion_tokens: i64::try_from(completion).unwrap_or(i64::MAX),
        input_per_m: price.input,
        output_per_m: price.output,
        quoted: quote,
        cost: Micros::ZERO,
        operator_share: Micros::ZERO,
        platform_share: Micros::ZERO,
        stakers_share: Micros::ZERO,
        burn_share: Micros::ZERO,
        usage_signature: usage_sig,
        result_signature: result_sig,
        created_at: grid.config.clock.now_ms(),
    };
    // A credit charge writes the row in the transaction that settles or
    // releases its hold, a prepaid one in the transaction that credits its
    // refund (or records it as owed); what comes back here is still to be
    // written. A prepaid charge never fails to settle: the payment stands
    // and what it did not use stays owed until the store takes it.
    let (cost, billed, result, unrecorded) = if matches!(outcome, Outcome::Failed) {
        let left = charge.release_recording(Some(row)).await;
        let billed = Billed {
            headers: HeaderMap::new(),
            refunded: prepaid.then_some(quote),
        };
        (Micros::ZERO, billed, Ok(()), left)
    } else {
        let fallback = row.clone();
        let cost = price.cost(prompt, completion).min(quote);
        match charge.settle_recording(cost, Some(row)).await {
            Ok(r) => (
                r.charged,
                Billed {
                    headers: r.headers,
                    refunded: r.refunded,
                },
                Ok(()),
                r.unrecorded,
            ),
            Err(e) => {
                tracing::warn!(job_id = %meta.job_id, error = %e, "settlement failed; withholding the result");
                // Nothing was charged: the row says so. A credit hold that
                // could not be settled lapses and is released.
                let failed = UsageRow {
                    status: "failed".into(),
                    ..crate::payments::billing::priced(fallback, Micros::ZERO)
                };
                (
                    Micros::ZERO,
                    Billed::default(),
                    Err(format!("payment settlement failed: {}", e.code())),
                    Some(failed),
                )
            }
        }
    };
    let status = if result.is_err() { "failed" } else { status };
    grid.metrics
        .job_closed(status, method, (prompt, completion), cost.0, result.is_ok());
    if let (Some(store), Some(row)) = (grid.store(), unrecorded) {
        if let Err(e) = store.record_usage(&row).await {
            tracing::error!(job_id = %meta.job_id, error = %e, "could not record usage");
        }
    }
    tracing::info!(job_id = %meta.job_id, status, method, cost = cost.0, "job billed");
    result.map(|()| billed)
}

/// Close the bill of a job that failed before any output and will not be
/// tried again (no other node, or a second failure): nothing is charged, a
/// payment is refunded whole, and the job leaves its one usage row.
pub async fn close_unstarted(
    grid: &Grid,
    job_id: &str,
    node_id: crate::proto::identity::NodeId,
    model: &str,
    billing: JobBilling,
) {
    let operator_wallet = grid
        .lock()
        .node(&node_id)
        .map(|n| n.wallet_address.clone())
        .unwrap_or_default();
    let meta = JobMeta {
        job_id: job_id.to_string(),
        node_id: node_id.to_string(),
        operator_wallet,
        model: model.to_string(),
    };
    // A failure closes without settling anything, so it cannot fail.
    let _ = close(grid, &meta, Some(billing), Outcome::Failed).await;
}
