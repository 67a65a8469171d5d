//! Per-request payments bound to jobs (PROTOCOL.md §7f "Pay before the
//! first byte"): a reserved payment nonce (and an MPP challenge id) names
//! the one job it pays for before that job is dispatched, and what the job
//! did not use is credited back to the payer once, as a `refund` ledger row.

use crate::money::Micros;

use super::sql_money::storable;
use super::{CreditBalance, PaymentNonceKey, Result, Store, StoreError, WalletId};

/// A payment as recorded against a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobPayment {
    /// `x402-v1`, `x402-v2` or `mpp`.
    pub scheme: String,
    /// `pending` or `settled`.
    pub state: String,
    /// Decimal base units, as authorized.
    pub amount: String,
    pub transaction_ref: Option<String>,
}

impl Store {
    /// Bind a reserved (pending, unbound) payment nonce to `job_id`. False
    /// when the nonce is not pending or already names a job: a payment pays
    /// for at most one job.
    pub async fn bind_payment_nonce(&self, key: &PaymentNonceKey, job_id: &str) -> Result<bool> {
        let chain = i64::try_from(key.chain_id).map_err(|_| StoreError::AmountOutOfRange)?;
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE payment_nonces SET job_id = $1 WHERE chain_id = $2 AND asset = $3 \
                 AND payer = $4 AND nonce = $5 AND state = 'pending' AND job_id IS NULL",
            )
            .bind(job_id)
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Bind a reserved (pending, unbound) MPP challenge id to `job_id`.
    pub async fn bind_mpp_challenge(&self, id: &str, job_id: &str) -> Result<bool> {
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE mpp_challenges SET job_id = $1 WHERE id = $2 AND state = 'pending' \
                 AND job_id IS NULL",
            )
            .bind(job_id)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// The payments bound to a job (at most one while the store is sound).
    pub async fn job_payments(&self, job_id: &str) -> Result<Vec<JobPayment>> {
        let rows: Vec<(String, String, String, Option<String>)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT scheme, state, amount, transaction_ref FROM payment_nonces \
                 WHERE job_id = $1 ORDER BY created_at",
            )
            .bind(job_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(scheme, state, amount, transaction_ref)| JobPayment {
                scheme,
                state,
                amount,
                transaction_ref,
            })
            .collect())
    }

    /// Credit `amount` back to the wallet that paid for a job, as one
    /// `refund` ledger row under `reference`. A reference is refunded once:
    /// a second call answers [`StoreError::DuplicateReference`]. Refunded
    /// credits count as deposited, so `total_deposited = balance + held +
    /// total_spent` still holds.
    pub async fn refund(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            sqlx::query(
                "INSERT INTO wallets (wallet, balance, held, total_deposited, total_spent, updated_at) \
                 VALUES ($1, 0, 0, 0, 0, $2) ON CONFLICT (wallet) DO NOTHING",
            )
            .bind(wallet.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let mut b = lock_wallet!(tx, lock, wallet);
            b.balance = super::credits::checked_add(b.balance, amt)?;
            b.total_deposited = super::credits::checked_add(b.total_deposited, amt)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, total_deposited = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(b.balance)
            .bind(b.total_deposited)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            ledger_insert!(tx, wallet, "refund", amt, b.balance, Some(reference), now);
            b
        }))
    }
}
