//! Credits: a wallet's balance, and holds for metered requests (reserved
//! before the work, settled at the actual cost or released).

use super::Payments;
use crate::money::Micros;
use crate::payments::error::PaymentError;
use crate::store::{CreditBalance, HoldId, WalletId};

impl Payments {
    pub async fn balance(&self, wallet: &WalletId) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.balance(wallet).await?)
    }

    /// Reserve credits for a metered request (the quote).
    pub async fn hold_credits(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<HoldId, PaymentError> {
        Ok(self.inner.store.hold(wallet, amount, reference).await?)
    }

    /// Charge the actual cost (at most the hold) and return the rest.
    pub async fn settle_credits(
        &self,
        hold: &HoldId,
        actual: Micros,
    ) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.settle_hold(hold, actual).await?)
    }

    /// Return a whole hold (the request failed: no charge).
    pub async fn release_credits(&self, hold: &HoldId) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.release_hold(hold).await?)
    }

    /// Credit back the unused part of a job's per-request payment, once per
    /// `reference` (a repeat is refused, never credited twice).
    pub async fn refund_credits(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.refund(wallet, amount, reference).await?)
    }
}
