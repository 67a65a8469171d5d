//! Per-request payments (x402 v1/v2 and MPP `evm/charge`): verified
//! offline and by the facilitator, their nonce reserved ([`Payments::authorize`],
//! [`Payments::accept_payment`]), then settled ([`Payments::settle`]) or
//! given back ([`Payments::release`]).

use alloy_primitives::Address;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::{header, Payer, Payments, RequestParts};
use crate::money::Micros;
use crate::payments::config::EvmNetwork;
use crate::payments::error::PaymentError;
use crate::payments::evm;
use crate::payments::mpp;
use crate::payments::x402::{self, Offer, Presented};
use crate::store::{CreditBalance, PaymentNonceKey, PendingPayment as StorePending, WalletId};

/// How a presented payment was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentMethod {
    X402V1,
    X402V2,
    Mpp,
}

impl PaymentMethod {
    pub fn scheme(self) -> &'static str {
        match self {
            PaymentMethod::X402V1 => "x402-v1",
            PaymentMethod::X402V2 => "x402-v2",
            PaymentMethod::Mpp => "mpp",
        }
    }
}

/// A verified, reserved, unsettled payment. Settle it with
/// [`Payments::settle`] or give it back with [`Payments::release`]; a
/// dropped one stays reserved (fail closed: the authorization cannot be
/// used twice, and the facilitator never moved the money).
#[derive(Debug)]
pub struct PendingPayment {
    pub method: PaymentMethod,
    pub payer: Address,
    /// The payer as a credits wallet.
    pub wallet: WalletId,
    /// The authorized amount.
    pub amount: Micros,
    pub network: EvmNetwork,
    pub resource: String,
    key: PaymentNonceKey,
    payload: Value,
    requirements: Value,
    mpp_challenge: Option<String>,
}

/// A settled payment.
#[derive(Debug)]
pub struct Settlement {
    pub method: PaymentMethod,
    pub transaction: String,
    pub network: String,
    pub payer: String,
    pub amount: Micros,
    /// `X-PAYMENT-RESPONSE` (v1), `PAYMENT-RESPONSE` (v2) or
    /// `Payment-Receipt` (MPP), to add to the success response.
    pub headers: HeaderMap,
    /// The wallet's position after a credit top-up, if one was made.
    pub balance: Option<CreditBalance>,
}

impl Payments {
    /// The account or payment behind a request. With `offer`, a presented
    /// x402 or MPP payment is verified (offline, then by the facilitator)
    /// and reserved; an account is returned as is (charge its credits).
    pub async fn authorize(
        &self,
        req: &RequestParts<'_>,
        offer: Option<&Offer>,
    ) -> Result<Option<Payer>, PaymentError> {
        if let Some(offer) = offer {
            if let Some(p) = self.accept_payment(req.headers, offer).await? {
                return Ok(Some(Payer::Payment(p)));
            }
        }
        self.authenticate(req).await
    }

    /// Verify and reserve the payment a request presents for `offer`, if
    /// any. Refusals consume nothing.
    pub async fn accept_payment(
        &self,
        headers: &HeaderMap,
        offer: &Offer,
    ) -> Result<Option<PendingPayment>, PaymentError> {
        let x_payment = header(headers, x402::X_PAYMENT);
        let sig = header(headers, x402::PAYMENT_SIGNATURE);
        let mpp_cred = header(headers, "authorization").filter(|v| {
            v.get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("payment "))
        });
        let present = [x_payment.is_some(), sig.is_some(), mpp_cred.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if present > 1 {
            return Err(PaymentError::BadRequest("more than one payment presented"));
        }
        if let Some(v) = x_payment.or(sig) {
            return self.accept_x402(v, offer).await.map(Some);
        }
        if let Some(v) = mpp_cred {
            return self.accept_mpp(v, offer).await.map(Some);
        }
        Ok(None)
    }

    async fn accept_x402(
        &self,
        value: &str,
        offer: &Offer,
    ) -> Result<PendingPayment, PaymentError> {
        let cfg = &self.inner.cfg;
        let presented = x402::parse_payment_header(value)?;
        let verified = x402::verify(cfg, &presented, offer, self.now())?;
        let method = match presented {
            Presented::V1(_) => PaymentMethod::X402V1,
            Presented::V2(_) => PaymentMethod::X402V2,
        };
        let amount = verified.value_micros();
        let amount_str = verified.value.to_string();
        let reserved = self
            .inner
            .store
            .reserve_payment_nonce(&StorePending {
                key: &verified.key,
                scheme: method.scheme(),
                resource: &offer.resource_url,
                amount: &amount_str,
            })
            .await?;
        if !reserved {
            return Err(PaymentError::NonceUsed);
        }
        let pending = PendingPayment {
            method,
            payer: verified.payer,
            wallet: WalletId::new_unchecked(evm::lower(&verified.payer)),
            amount,
            network: verified.network,
            resource: offer.resource_url.clone(),
            key: verified.key,
            payload: verified.facilitator_payload,
            requirements: verified.facilitator_requirements,
            mpp_challenge: None,
        };
        self.facilitator_verify(pending, verified.version).await
    }

    async fn accept_mpp(&self, value: &str, offer: &Offer) -> Result<PendingPayment, PaymentError> {
        let cfg = &self.inner.cfg;
        let m = cfg
            .mpp
            .as_ref()
            .ok_or(PaymentError::MppMalformed("MPP is not enabled here"))?;
        let net = &cfg.networks[0];
        let cred = mpp::parse_authorization(value)?;
        let v = mpp::verify(m, net, &cfg.mpp_recipient(), offer, &cred, self.now())?;
        let store = &self.inner.store;
        if !store
            .reserve_mpp_challenge(
                &v.challenge_id,
                i64::try_from(v.expires_at)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000),
            )
            .await?
        {
            return Err(PaymentError::MppChallengeUsed);
        }
        let amount_str = offer.price.0.to_string();
        let reserved = store
            .reserve_payment_nonce(&StorePending {
                key: &v.key,
                scheme: PaymentMethod::Mpp.scheme(),
                resource: &offer.resource_url,
                amount: &amount_str,
            })
            .await;
        match reserved {
            Ok(true) => {}
            Ok(false) => {
                store.release_mpp_challenge(&v.challenge_id).await?;
                return Err(PaymentError::NonceUsed);
            }
            Err(e) => {
                store.release_mpp_challenge(&v.challenge_id).await?;
                return Err(e.into());
            }
        }
        let pending = PendingPayment {
            method: PaymentMethod::Mpp,
            payer: v.payer,
            wallet: WalletId::new_unchecked(evm::lower(&v.payer)),
            amount: offer.price,
            network: net.clone(),
            resource: offer.resource_url.clone(),
            key: v.key,
            payload: v.facilitator_payload,
            requirements: v.facilitator_requirements,
            mpp_challenge: Some(v.challenge_id),
        };
        self.facilitator_verify(pending, 2).await
    }

    fn facilitator_version(p: &PendingPayment) -> u8 {
        match p.method {
            PaymentMethod::X402V1 => 1,
            PaymentMethod::X402V2 | PaymentMethod::Mpp => 2,
        }
    }

    /// Ask the facilitator to verify; on any failure give the reservation
    /// back and refuse.
    async fn facilitator_verify(
        &self,
        pending: PendingPayment,
        version: u8,
    ) -> Result<PendingPayment, PaymentError> {
        let res = self
            .inner
            .facilitator
            .verify(version, &pending.payload, &pending.requirements)
            .await;
        match res {
            Ok(r) if r.is_valid => Ok(pending),
            Ok(r) => {
                self.release(pending).await;
                Err(PaymentError::FacilitatorRefused {
                    reason: r.invalid_reason.unwrap_or_else(|| "invalid_payload".into()),
                })
            }
            Err(e) => {
                self.release(pending).await;
                Err(e)
            }
        }
    }

    /// Settle a reserved payment through the facilitator. On success the
    /// nonce is marked settled and, when `credit` is given, the wallet is
    /// credited in the same transaction (a top-up). On failure nothing is
    /// consumed.
    pub async fn settle(
        &self,
        p: PendingPayment,
        credit: Option<(&WalletId, Micros)>,
    ) -> Result<Settlement, PaymentError> {
        self.settle_with(p, credit, None).await
    }

    /// Settle a payment bound to the job `job_id` before the job runs: the
    /// settlement record opens the job's refund of the whole payment in the
    /// same transaction ([`crate::store::job_refunds`]), so what the job
    /// does not use is owed back whatever crashes when. A settlement the
    /// store could not record is kept here as owed in full, and credited
    /// once the store takes writes again.
    pub async fn settle_for_job(
        &self,
        p: PendingPayment,
        job_id: &str,
    ) -> Result<Settlement, PaymentError> {
        self.settle_with(p, None, Some(job_id)).await
    }

    async fn settle_with(
        &self,
        p: PendingPayment,
        credit: Option<(&WalletId, Micros)>,
        job: Option<&str>,
    ) -> Result<Settlement, PaymentError> {
        let version = Self::facilitator_version(&p);
        let res = self
            .inner
            .facilitator
            .settle(version, &p.payload, &p.requirements)
            .await;
        let settled = match res {
            Ok(r) if r.success => r,
            Ok(r) => {
                let reason = r
                    .error_reason
                    .unwrap_or_else(|| "unexpected_settle_error".into());
                self.release(p).await;
                return Err(PaymentError::FacilitatorRefused { reason });
            }
            Err(e) => {
                self.release(p).await;
                return Err(e);
            }
        };
        let store = &self.inner.store;
        let recorded = match job {
            Some(job) => store
                .settle_payment_nonce_for_job(
                    &p.key,
                    &settled.transaction,
                    job,
                    &p.wallet,
                    p.amount,
                )
                .await
                .map(|()| None),
            None => {
                store
                    .settle_payment_nonce(&p.key, &settled.transaction, credit)
                    .await
            }
        };
        let balance = match recorded {
            Ok(b) => b,
            Err(e) => {
                // The money moved but the record did not: an operator must
                // reconcile this transaction by hand. A job's payment is
                // owed back whole meanwhile (the job does not run).
                tracing::error!(
                    transaction = %settled.transaction,
                    payer = %evm::lower(&p.payer),
                    error = %e,
                    "payment settled but not recorded"
                );
                if let Some(job) = job {
                    self.keep_owed_refund(job, &p.wallet, p.amount, None);
                }
                return Err(e.into());
            }
        };
        if let Some(id) = &p.mpp_challenge {
            store.confirm_mpp_challenge(id).await?;
        }
        let payer = evm::lower(&p.payer);
        let mut headers = HeaderMap::new();
        let (name, value) = match p.method {
            PaymentMethod::X402V1 | PaymentMethod::X402V2 => {
                let network = if p.method == PaymentMethod::X402V1 {
                    p.network.v1_name.clone()
                } else {
                    p.network.caip2()
                };
                let body = serde_json::json!({
                    "success": true,
                    "transaction": settled.transaction,
                    "network": network,
                    "payer": p.payer.to_checksum(None),
                });
                let name = if p.method == PaymentMethod::X402V1 {
                    x402::X_PAYMENT_RESPONSE
                } else {
                    x402::PAYMENT_RESPONSE
                };
                (name, x402::encode_header_json(&body))
            }
            PaymentMethod::Mpp => (
                "payment-receipt",
                mpp::receipt(&settled.transaction, self.now()),
            ),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
        Ok(Settlement {
            method: p.method,
            transaction: settled.transaction,
            network: if settled.network.is_empty() {
                p.network.caip2()
            } else {
                settled.network
            },
            payer,
            amount: p.amount,
            headers,
            balance,
        })
    }

    /// Bind a reserved payment to the one job it pays for (its nonce, and
    /// an MPP credential's challenge id), before the job is dispatched or
    /// the payment settled. Refused when the reservation already names a
    /// job: one payment pays for at most one job.
    pub async fn bind_to_job(&self, p: &PendingPayment, job_id: &str) -> Result<(), PaymentError> {
        let store = &self.inner.store;
        if !store.bind_payment_nonce(&p.key, job_id).await? {
            return Err(PaymentError::NonceUsed);
        }
        if let Some(id) = &p.mpp_challenge {
            if !store.bind_mpp_challenge(id, job_id).await? {
                return Err(PaymentError::MppChallengeUsed);
            }
        }
        Ok(())
    }

    /// Give back a reserved payment that will not be settled (the work
    /// failed, or the facilitator refused): the authorization and the MPP
    /// challenge may be presented again, and nothing is charged.
    pub async fn release(&self, p: PendingPayment) {
        let store = &self.inner.store;
        if let Err(e) = store.release_payment_nonce(&p.key).await {
            tracing::warn!(error = %e, "could not release a payment reservation");
        }
        if let Some(id) = &p.mpp_challenge {
            if let Err(e) = store.release_mpp_challenge(id).await {
                tracing::warn!(error = %e, "could not release an MPP challenge");
            }
        }
    }
}
