//! Billing a metered job: the one path the grid's chat and the compute
//! plane's jobs take from a quote to a charge.
//!
//! 1. **Hold.** [`Payments::open_charge`] gates a request quoted at
//!    `offer.price`: a presented x402 or MPP payment is verified, reserved
//!    and bound to the job (`reference`), and must come from the
//!    authenticated wallet when the request also carries an account; an
//!    account (API key or X-Auth signature) alone gets a credit hold of the
//!    quote, keyed by the job. The result is one [`Charge`] per job, which
//!    owns that hold or pending payment.
//! 2. **Prepay** ([`Charge::prepay`], PROTOCOL.md §7f): a pending payment
//!    is settled with the facilitator now, before any of the work is
//!    released, and the charge becomes a prepaid one. The grid does this
//!    for every payment; a caller that skips it settles at the end instead.
//! 3. **Settle** ([`Charge::settle`]) when the work produced billable output,
//!    at its metered cost (from the node's signed usage): credits are
//!    charged the cost, at most the quote, and the rest returns to the
//!    balance; a prepaid payment keeps the cost and credits the rest to the
//!    payer wallet (a `refund` ledger row); a payment not yet settled is
//!    settled with the facilitator for the quote, before the result is
//!    released.
//! 4. **Release** ([`Charge::release`]) when the work failed or never
//!    started: the hold returns whole, a pending payment's authorization
//!    may be presented again, a prepaid payment is refunded whole to
//!    credits; nothing is charged.
//!
//! A charge must end in settle or release; one that is dropped instead
//! keeps its hold or reservation (fail closed: money stays reserved, never
//! spent twice) and says so in the log, except a prepaid one, whose payer
//! is refunded in full (the money has moved; the work is not delivered).
//!
//! A grid job hands its usage row to the charge: a credit charge writes it
//! in the same transaction that settles or releases the hold, so no hold is
//! settled without its row, whatever crashes when; a credit hold left by a
//! dropped charge is released once its lease lapses (see
//! [`crate::store::credits`]).
//!
//! With reservations enabled ([`Payments::enable_reservations`]), a grid
//! job's credits ([`Payments::open_charge_reserving`]) come from its
//! wallet's reservation in memory instead of a hold of its own, and its
//! settlement (cost, ledger and usage rows in one transaction, batched
//! with others) is written by the reservations' writer before `settle`
//! returns; see [`crate::payments::reservations`] for why a crash leaves
//! the ledger exact.
//!
//! [`Split`] divides what a job was charged among the operator, the
//! platform, stakers and burn.

use axum::http::HeaderMap;

use super::error::PaymentError;
use super::reservations::Ticket;
use super::service::{Payer, PaymentMethod, Payments, PendingPayment, RequestParts};
use super::x402::Offer;
use crate::money::Micros;
use crate::store::{BlockSettled, CreditBalance, HoldId, StoreError, UsageRow, WalletId};

/// What funds a job.
#[derive(Debug)]
enum Funding {
    /// Nothing is charged (development mode without credentials), or the
    /// charge already ended.
    Free,
    /// Credits held from a wallet's balance.
    Credits {
        payments: Payments,
        wallet: WalletId,
        hold: HoldId,
        api_key_id: Option<String>,
    },
    /// Credits admitted against the wallet's reservation in this process
    /// ([`crate::payments::reservations`]).
    Reserved {
        payments: Payments,
        ticket: Ticket,
        api_key_id: Option<String>,
    },
    /// A verified, reserved x402 or MPP payment for exactly the quote.
    Payment {
        payments: Payments,
        pending: Box<PendingPayment>,
    },
    /// A payment settled up front ([`Charge::prepay`]): `paid` has moved to
    /// the payee; what the job does not use goes back to `wallet` as
    /// credits.
    Prepaid {
        payments: Payments,
        method: PaymentMethod,
        wallet: WalletId,
        paid: Micros,
        transaction: String,
    },
}

/// One job's charge in progress: the quote and the hold or pending payment
/// that covers it. End it with [`Charge::settle`] or [`Charge::release`].
#[derive(Debug)]
#[must_use = "a charge must end in settle or release"]
pub struct Charge {
    quote: Micros,
    /// The job the charge pays for (ledger references).
    reference: String,
    funding: Funding,
}

/// Why a charge could not be opened.
#[derive(Debug)]
pub enum ChargeRefused {
    /// No credentials: answer the 402 challenge for the offer.
    PaymentRequired,
    /// Refused (bad payment, bad auth, insufficient credits, …).
    Refused(PaymentError),
}

/// What a settled charge took.
#[derive(Debug)]
pub struct Receipt {
    /// The actual cost (credits, at most the quote), the quote (an `exact`
    /// payment) or nothing (a free charge).
    pub charged: Micros,
    /// The settlement transaction of a payment.
    pub transaction: Option<String>,
    /// Headers for the success response (`PAYMENT-RESPONSE`, …).
    pub headers: HeaderMap,
    /// The wallet's credit position after a credit charge or a refund.
    pub balance: Option<CreditBalance>,
    /// What a prepaid payment credited back to its payer (`None` for other
    /// charges).
    pub refunded: Option<Micros>,
    /// The usage row given to [`Charge::settle_recording`], priced at
    /// `charged`, when it is still to be written (it was written with the
    /// settlement otherwise).
    pub unrecorded: Option<UsageRow>,
}

/// `row` with its cost and revenue split set for `charged`.
pub fn priced(mut row: UsageRow, charged: Micros) -> UsageRow {
    let split = Split::of(charged);
    row.cost = charged;
    row.operator_share = split.operator;
    row.platform_share = split.platform;
    row.stakers_share = split.stakers;
    row.burn_share = split.burn;
    row
}

impl Payments {
    /// Open the charge of a metered request quoted at `offer.price`, keyed
    /// by `reference` (the job id): a presented payment is verified and
    /// reserved; an account's credits are held for the quote.
    pub async fn open_charge(
        &self,
        req: &RequestParts<'_>,
        offer: &Offer,
        reference: &str,
    ) -> Result<Charge, ChargeRefused> {
        self.open_charge_with(req, offer, reference, false).await
    }

    /// [`Payments::open_charge`] for a grid job: an account's credits come
    /// from its wallet's reservation in this process when reservations are
    /// enabled ([`Payments::enable_reservations`]), with no store write per
    /// request; otherwise a hold of the quote, as `open_charge`.
    pub async fn open_charge_reserving(
        &self,
        req: &RequestParts<'_>,
        offer: &Offer,
        reference: &str,
    ) -> Result<Charge, ChargeRefused> {
        self.open_charge_with(req, offer, reference, true).await
    }

    async fn open_charge_with(
        &self,
        req: &RequestParts<'_>,
        offer: &Offer,
        reference: &str,
        reserve: bool,
    ) -> Result<Charge, ChargeRefused> {
        let quote = offer.price;
        let funding = match self.authorize(req, Some(offer)).await {
            Ok(None) => return Err(ChargeRefused::PaymentRequired),
            Err(e) => return Err(ChargeRefused::Refused(e)),
            Ok(Some(Payer::Payment(p))) => {
                if let Err(e) = self.payment_for_job(req, &p, reference).await {
                    self.release(p).await;
                    return Err(ChargeRefused::Refused(e));
                }
                Funding::Payment {
                    payments: self.clone(),
                    pending: Box::new(p),
                }
            }
            Ok(Some(account)) => {
                let api_key_id = match &account {
                    Payer::ApiKey { key_id, .. } => Some(key_id.clone()),
                    _ => None,
                };
                let wallet = account.wallet().clone();
                match self.reservations().filter(|_| reserve) {
                    Some(r) => {
                        let ticket = r
                            .admit(&wallet, quote)
                            .await
                            .map_err(|e| ChargeRefused::Refused(e.into()))?;
                        Funding::Reserved {
                            payments: self.clone(),
                            ticket,
                            api_key_id,
                        }
                    }
                    None => {
                        let hold = self
                            .hold_credits(&wallet, quote, reference)
                            .await
                            .map_err(ChargeRefused::Refused)?;
                        Funding::Credits {
                            payments: self.clone(),
                            wallet,
                            hold,
                            api_key_id,
                        }
                    }
                }
            }
        };
        Ok(Charge {
            quote,
            reference: reference.to_string(),
            funding,
        })
    }

    /// The checks between a verified payment and its job: when the request
    /// also names an account (X-Auth signature or API key of an EVM
    /// wallet), the payment must come from that wallet; then the payment is
    /// bound to the job in the store.
    async fn payment_for_job(
        &self,
        req: &RequestParts<'_>,
        p: &PendingPayment,
        job: &str,
    ) -> Result<(), PaymentError> {
        if let Some(account) = self.authenticate(req).await? {
            let w = account.wallet();
            if w.as_str().starts_with("0x") && *w != p.wallet {
                return Err(PaymentError::PayerMismatch);
            }
        }
        self.bind_to_job(p, job).await
    }
}

impl Charge {
    /// A charge that takes nothing (development mode without credentials).
    pub fn free(quote: Micros) -> Charge {
        Charge {
            quote,
            reference: String::new(),
            funding: Funding::Free,
        }
    }

    /// The most this job may cost.
    pub fn quote(&self) -> Micros {
        self.quote
    }

    /// `free`, `credits`, `x402-v1`, `x402-v2` or `mpp`.
    pub fn method(&self) -> &'static str {
        match &self.funding {
            Funding::Free => "free",
            Funding::Credits { .. } | Funding::Reserved { .. } => "credits",
            Funding::Payment { pending, .. } => pending.method.scheme(),
            Funding::Prepaid { method, .. } => method.scheme(),
        }
    }

    /// Whether the charge is a payment already settled ([`Charge::prepay`]).
    pub fn is_prepaid(&self) -> bool {
        matches!(self.funding, Funding::Prepaid { .. })
    }

    /// The wallet that pays, unless the charge is free.
    pub fn payer(&self) -> Option<&WalletId> {
        match &self.funding {
            Funding::Free => None,
            Funding::Credits { wallet, .. } => Some(wallet),
            Funding::Reserved { ticket, .. } => Some(ticket.wallet()),
            Funding::Payment { pending, .. } => Some(&pending.wallet),
            Funding::Prepaid { wallet, .. } => Some(wallet),
        }
    }

    /// The API key that authorised a credit charge.
    pub fn api_key_id(&self) -> Option<&str> {
        match &self.funding {
            Funding::Credits { api_key_id, .. } | Funding::Reserved { api_key_id, .. } => {
                api_key_id.as_deref()
            }
            _ => None,
        }
    }

    /// The credit hold this charge owns, if it is a credit charge with a
    /// hold of its own (a reserved one's block is renewed by its writer).
    pub fn hold(&self) -> Option<&HoldId> {
        match &self.funding {
            Funding::Credits { hold, .. } => Some(hold),
            _ => None,
        }
    }

    fn take(&mut self) -> Funding {
        std::mem::replace(&mut self.funding, Funding::Free)
    }

    /// The job whose refund this charge owes, while it is a prepaid one
    /// (its lease in the store is renewed while the job runs).
    pub fn refund_job(&self) -> Option<&str> {
        match &self.funding {
            Funding::Prepaid { .. } => Some(&self.reference),
            _ => None,
        }
    }

    /// Settle a pending payment now, before any of the work is released
    /// (PROTOCOL.md §7f): afterwards the charge is prepaid, and
    /// [`Charge::settle`] / [`Charge::release`] credit the unused part back
    /// to the payer. Returns the headers for the answer (`PAYMENT-RESPONSE`,
    /// `X-PAYMENT-RESPONSE` or `Payment-Receipt`); nothing for credits or a
    /// free charge, which are unchanged.
    ///
    /// On `Err` the payment was not settled and its reservation is given
    /// back: the charge is spent (free) and the work must not run.
    pub async fn prepay(&mut self) -> Result<HeaderMap, PaymentError> {
        match self.take() {
            Funding::Payment { payments, pending } => {
                let (method, wallet) = (pending.method, pending.wallet.clone());
                let s = payments.settle_for_job(*pending, &self.reference).await?;
                self.funding = Funding::Prepaid {
                    payments,
                    method,
                    wallet,
                    paid: s.amount,
                    transaction: s.transaction,
                };
                Ok(s.headers)
            }
            other => {
                self.funding = other;
                Ok(HeaderMap::new())
            }
        }
    }

    /// The work produced billable output costing `cost`: charge credits at
    /// that cost (capped at the quote; the rest returns to the balance), or
    /// settle the payment (an `exact` payment is the quote). On `Err`
    /// nothing was charged and the result must be withheld: a payment whose
    /// settlement failed is released, and a credit hold that could not be
    /// settled stays held for an operator to reconcile.
    pub async fn settle(self, cost: Micros) -> Result<Receipt, PaymentError> {
        self.settle_recording(cost, None).await
    }

    /// [`Charge::settle`], with the job's usage row: a credit charge writes
    /// the row, priced at what it charged, in the transaction that settles
    /// the hold; any other charge hands it back in [`Receipt::unrecorded`].
    pub async fn settle_recording(
        mut self,
        cost: Micros,
        usage: Option<UsageRow>,
    ) -> Result<Receipt, PaymentError> {
        match self.take() {
            Funding::Free => Ok(Receipt {
                charged: Micros::ZERO,
                transaction: None,
                headers: HeaderMap::new(),
                balance: None,
                unrecorded: usage.map(|u| priced(u, Micros::ZERO)),
                refunded: None,
            }),
            Funding::Credits { payments, hold, .. } => {
                let charged = cost.min(self.quote);
                let store = payments.store();
                let balance = match usage {
                    Some(u) => {
                        store
                            .settle_hold_recording(&hold, charged, &priced(u, charged))
                            .await?
                    }
                    None => store.settle_hold(&hold, charged).await?,
                };
                Ok(Receipt {
                    charged,
                    transaction: None,
                    headers: HeaderMap::new(),
                    balance: Some(balance),
                    unrecorded: None,
                    refunded: None,
                })
            }
            Funding::Reserved {
                payments, ticket, ..
            } => {
                let charged = cost.min(self.quote);
                let Some(r) = payments.reservations() else {
                    return Err(PaymentError::Store(StoreError::Corrupt(
                        "a reserved charge without reservations",
                    )));
                };
                let wallet = ticket.wallet().clone();
                let priced_row = usage.map(|u| priced(u, charged));
                if r.answers_first() {
                    // The answer goes now; the batch commits behind it.
                    let unpaid = priced_row.as_ref().map(|u| UsageRow {
                        status: "failed".into(),
                        ..priced(u.clone(), Micros::ZERO)
                    });
                    let queued = r.settle_queued(ticket, charged, &self.reference, priced_row)?;
                    let store = payments.store().clone();
                    tokio::spawn(settled_behind(queued, store, unpaid));
                    return Ok(Receipt {
                        charged,
                        transaction: None,
                        headers: HeaderMap::new(),
                        balance: None,
                        unrecorded: None,
                        refunded: None,
                    });
                }
                let balance = match r
                    .settle(ticket, charged, &self.reference, priced_row)
                    .await?
                {
                    BlockSettled::Charged(b) | BlockSettled::Debited(b) => Some(b),
                    BlockSettled::Recorded => None,
                    BlockSettled::Refused => {
                        // The reservation lapsed under the job and the
                        // balance cannot pay: nothing was charged.
                        let b = payments.store().balance(&wallet).await.ok();
                        return Err(PaymentError::InsufficientCredits {
                            balance: b.map_or(Micros::ZERO, |b| b.balance),
                            needed: charged,
                        });
                    }
                };
                Ok(Receipt {
                    charged,
                    transaction: None,
                    headers: HeaderMap::new(),
                    balance,
                    unrecorded: None,
                    refunded: None,
                })
            }
            Funding::Payment { payments, pending } => {
                let s = payments.settle(*pending, None).await?;
                Ok(Receipt {
                    charged: s.amount,
                    transaction: Some(s.transaction),
                    headers: s.headers,
                    balance: None,
                    unrecorded: usage.map(|u| priced(u, s.amount)),
                    refunded: None,
                })
            }
            Funding::Prepaid {
                payments,
                wallet,
                paid,
                transaction,
                ..
            } => {
                let charged = cost.min(self.quote).min(paid);
                // `charged <= paid`, so this cannot underflow.
                let refund = Micros(paid.0 - charged.0);
                // The refund and the usage row in one transaction; a refund
                // the store cannot take now stays owed (never lost).
                let balance = payments
                    .refund_job(
                        &self.reference,
                        &wallet,
                        refund,
                        usage.map(|u| priced(u, charged)),
                    )
                    .await;
                Ok(Receipt {
                    charged,
                    transaction: Some(transaction),
                    headers: HeaderMap::new(),
                    balance,
                    refunded: Some(refund),
                    unrecorded: None,
                })
            }
        }
    }

    /// The work failed or never started: return the hold or the payment;
    /// nothing is charged.
    pub async fn release(self) {
        self.release_recording(None).await;
    }

    /// [`Charge::release`], with the job's (unbilled) usage row: a credit
    /// charge writes it in the transaction that releases the hold. Returns
    /// the row when it is still to be written (any other charge, or a
    /// release that failed: the hold then lapses and is released later).
    pub async fn release_recording(mut self, usage: Option<UsageRow>) -> Option<UsageRow> {
        let usage = usage.map(|u| priced(u, Micros::ZERO));
        match self.take() {
            Funding::Free => usage,
            Funding::Credits { payments, hold, .. } => {
                let store = payments.store();
                let released = match &usage {
                    Some(u) => store.release_hold_recording(&hold, u).await,
                    None => store.release_hold(&hold).await,
                };
                match released {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(error = %e, hold = %hold.0, "could not release a credit hold; it is released when its lease lapses");
                        usage
                    }
                }
            }
            Funding::Reserved {
                payments, ticket, ..
            } => {
                let Some(r) = payments.reservations() else {
                    return usage;
                };
                match r.release(ticket, &self.reference, usage.clone()).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::error!(error = %e, job_id = %self.reference, "could not record a released job's usage");
                        usage
                    }
                }
            }
            Funding::Payment { payments, pending } => {
                payments.release(*pending).await;
                usage
            }
            Funding::Prepaid {
                payments,
                wallet,
                paid,
                ..
            } => {
                // Refunded whole, with the (unbilled) usage row in the same
                // transaction.
                payments
                    .refund_job(&self.reference, &wallet, paid, usage)
                    .await;
                None
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if !self.is_prepaid() {
            match &self.funding {
                // Its ticket gives the quote back to the reservation.
                Funding::Free | Funding::Prepaid { .. } | Funding::Reserved { .. } => {}
                Funding::Credits { hold, .. } => tracing::error!(
                    hold = %hold.0,
                    "a charge was dropped unsettled; its credit hold stays until its lease lapses"
                ),
                Funding::Payment { .. } => tracing::error!(
                    "a charge was dropped unsettled; its payment stays reserved and is never settled"
                ),
            }
            return;
        }
        if let Funding::Prepaid {
            payments,
            wallet,
            paid,
            ..
        } = self.take()
        {
            // The payer has paid and the work was never delivered (a request
            // abandoned between settlement and dispatch, say): refund it
            // whole, off the dropping thread. The task holds plain values,
            // not a charge, so dropping it unrun cannot come back here. Run
            // or not, the store holds the refund open, and the reaper
            // credits it whole once its lease lapses.
            let job = std::mem::take(&mut self.reference);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    tracing::warn!(job_id = %job, "a prepaid charge was dropped; refunding it whole");
                    rt.spawn(async move {
                        payments.refund_job(&job, &wallet, paid, None).await;
                    });
                }
                Err(_) => tracing::warn!(job_id = %job, wallet = %wallet, refund = paid.0,
                    "a prepaid charge was dropped outside a runtime; the reaper refunds it"),
            }
        }
    }
}

/// The revenue split in percent: operator, stakers, burn; the platform takes
/// the rest, so rounding never loses a micro-dollar.
pub const OPERATOR_PCT: u64 = 80;
pub const STAKERS_PCT: u64 = 10;
pub const BURN_PCT: u64 = 5;

/// What a job was charged, divided among those it pays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub operator: Micros,
    pub platform: Micros,
    pub stakers: Micros,
    pub burn: Micros,
}

impl Split {
    /// Divide `cost`: each named share rounded down, the remainder to the
    /// platform.
    pub fn of(cost: Micros) -> Split {
        let operator = cost.percent(OPERATOR_PCT);
        let stakers = cost.percent(STAKERS_PCT);
        let burn = cost.percent(BURN_PCT);
        // The three shares sum to at most 95 % of `cost`.
        let platform = Micros(cost.0 - operator.0 - stakers.0 - burn.0);
        Split {
            operator,
            platform,
            stakers,
            burn,
        }
    }
}

/// Wait for a settlement queued behind its answer
/// ([`super::reservations::SettleOrder::AfterAnswer`]). One that was
/// refused (its block lapsed and the balance could not pay) or could not be
/// written charged nothing: its job keeps a usage row saying so, as a
/// settlement that fails before the answer does.
async fn settled_behind(
    queued: super::reservations::Queued,
    store: crate::store::Store,
    unpaid: Option<UsageRow>,
) {
    let why = match queued.written().await {
        Ok(BlockSettled::Refused) => "the reservation lapsed and the balance could not pay".into(),
        Ok(_) => return,
        Err(e) => e.to_string(),
    };
    let Some(row) = unpaid else {
        tracing::error!(why = %why, "an answered request went unpaid");
        return;
    };
    tracing::error!(job_id = %row.job_id, why = %why, "an answered request went unpaid");
    if let Err(e) = store.record_usage(&row).await {
        tracing::error!(job_id = %row.job_id, error = %e, "could not record usage");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_adds_up_and_favours_nobody_by_rounding() {
        for cost in [0, 1, 7, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let s = Split::of(Micros(cost));
            let sum = u128::from(s.operator.0)
                + u128::from(s.platform.0)
                + u128::from(s.stakers.0)
                + u128::from(s.burn.0);
            assert_eq!(sum, u128::from(cost));
            assert_eq!(
                u128::from(s.operator.0),
                u128::from(cost) * 80 / 100,
                "{cost}"
            );
        }
        assert_eq!(
            Split::of(Micros(100)),
            Split {
                operator: Micros(80),
                platform: Micros(5),
                stakers: Micros(10),
                burn: Micros(5),
            }
        );
    }

    #[test]
    fn a_free_charge_settles_to_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let c = Charge::free(Micros(500));
        assert_eq!(
            (c.quote(), c.method(), c.payer()),
            (Micros(500), "free", None)
        );
        let r = rt.block_on(c.settle(Micros(100))).unwrap();
        assert_eq!(r.charged, Micros::ZERO);
        rt.block_on(Charge::free(Micros(1)).release());
    }
}
