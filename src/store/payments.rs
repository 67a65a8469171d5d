//! The single-use records that make payments and signed requests
//! unreplayable: EIP-3009 authorization nonces (x402 and MPP), X-Auth
//! request nonces and MPP challenge ids. Each is reserved by an insert (of
//! any number of concurrent presentations exactly one wins), then confirmed
//! or released.

use crate::money::Micros;

use super::sql_money::storable;
use super::{CreditBalance, Result, Store, StoreError, WalletId};

/// The replay key of an EIP-3009 authorization: (chain id, asset, from,
/// nonce), addresses and nonce as lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PaymentNonceKey {
    pub chain_id: u64,
    pub asset: String,
    pub payer: String,
    pub nonce: String,
}

/// A payment whose nonce was reserved and is waiting for settlement.
#[derive(Clone, Debug)]
pub struct PendingPayment<'a> {
    pub key: &'a PaymentNonceKey,
    /// `x402-v1`, `x402-v2` or `mpp`.
    pub scheme: &'a str,
    pub resource: &'a str,
    /// Decimal base units (may exceed 64 bits on the wire; stored as text).
    pub amount: &'a str,
}

impl PaymentNonceKey {
    /// The chain id as the database stores it.
    fn chain(&self) -> Result<i64> {
        i64::try_from(self.chain_id).map_err(|_| StoreError::AmountOutOfRange)
    }
}

impl Store {
    /// Reserve an EIP-3009 authorization's nonce before settling it. False
    /// when the key is already pending or settled (a replay). The insert is
    /// the atomic step: of any number of concurrent presentations exactly
    /// one wins.
    pub async fn reserve_payment_nonce(&self, p: &PendingPayment<'_>) -> Result<bool> {
        let chain = p.key.chain()?;
        let now = self.now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO payment_nonces (chain_id, asset, payer, nonce, state, scheme, resource, amount, created_at) \
                 VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(chain)
            .bind(&p.key.asset)
            .bind(&p.key.payer)
            .bind(&p.key.nonce)
            .bind(p.scheme)
            .bind(p.resource)
            .bind(p.amount)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Mark a reserved nonce settled, recording the settlement reference,
    /// and in the same transaction credit `credit` (a top-up), if given.
    pub async fn settle_payment_nonce(
        &self,
        key: &PaymentNonceKey,
        transaction: &str,
        credit: Option<(&WalletId, Micros)>,
    ) -> Result<Option<CreditBalance>> {
        self.settle_nonce(key, transaction, credit, None).await
    }

    /// Mark a reserved nonce settled for the job `job_id` and, in the same
    /// transaction, open that job's refund of the whole payment `paid` to
    /// `payer` ([`crate::store::job_refunds`]): from the moment the store
    /// knows the money moved, it knows what is owed back.
    pub async fn settle_payment_nonce_for_job(
        &self,
        key: &PaymentNonceKey,
        transaction: &str,
        job_id: &str,
        payer: &WalletId,
        paid: Micros,
    ) -> Result<()> {
        self.settle_nonce(
            key,
            transaction,
            None,
            Some((job_id, payer, storable(paid)?)),
        )
        .await
        .map(|_| ())
    }

    async fn settle_nonce(
        &self,
        key: &PaymentNonceKey,
        transaction: &str,
        credit: Option<(&WalletId, Micros)>,
        refund: Option<(&str, &WalletId, Micros)>,
    ) -> Result<Option<CreditBalance>> {
        let chain = key.chain()?;
        let now = self.now_ms();
        let lease_until = self.lease_end(now);
        // The top-up reference is the replay key, so a credit can never be
        // applied twice for one authorization.
        let reference = format!(
            "eip3009:{}:{}:{}:{}",
            key.chain_id, key.asset, key.payer, key.nonce
        );
        let credit = match credit {
            Some((w, a)) => Some((w, storable(a)?)),
            None => None,
        };
        let out = write_tx!(self, |tx, lock| {
            let n = sqlx::query(
                "UPDATE payment_nonces SET state = 'settled', transaction_ref = $1, settled_at = $2 \
                 WHERE chain_id = $3 AND asset = $4 AND payer = $5 AND nonce = $6 AND state = 'pending'",
            )
            .bind(transaction)
            .bind(now)
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                return Err(StoreError::Corrupt("payment nonce not pending"));
            }
            if let Some((job, payer, paid)) = refund {
                open_refund_in_tx!(tx, job, payer, paid, lease_until, now);
            }
            match credit {
                Some((wallet, amt)) => Some(top_up_in_tx!(tx, lock, wallet, amt, &reference, now)),
                None => None,
            }
        });
        Ok(out)
    }

    /// Forget a reserved, unsettled nonce (the facilitator refused or
    /// failed): the payment consumed nothing and may be presented again.
    pub async fn release_payment_nonce(&self, key: &PaymentNonceKey) -> Result<()> {
        let chain = key.chain()?;
        with_pool!(self, |pool| {
            sqlx::query(
                "DELETE FROM payment_nonces WHERE chain_id = $1 AND asset = $2 AND payer = $3 \
                 AND nonce = $4 AND state = 'pending'",
            )
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The settlement state of a payment nonce: None, "pending" or "settled".
    pub async fn payment_nonce_state(&self, key: &PaymentNonceKey) -> Result<Option<String>> {
        let chain = key.chain()?;
        let row: Option<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT state FROM payment_nonces WHERE chain_id = $1 AND asset = $2 AND payer = $3 AND nonce = $4",
            )
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|r| r.0))
    }

    /// Consume an X-Auth nonce. False when it was already used. Expired
    /// nonces are pruned on the way (a nonce only has to be remembered
    /// while its timestamp is inside the acceptance window).
    pub async fn consume_auth_nonce(
        &self,
        chain: &str,
        address: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> Result<bool> {
        let now = self.now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM auth_nonces WHERE expires_at < $1")
                .bind(now)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO auth_nonces (chain, address, nonce, expires_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(chain)
            .bind(address)
            .bind(nonce)
            .bind(expires_at_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Reserve an MPP challenge id for one credential. False when it is
    /// already pending or used.
    pub async fn reserve_mpp_challenge(&self, id: &str, expires_at_ms: i64) -> Result<bool> {
        let now = self.now_ms();
        let n = with_pool!(self, |pool| {
            // An expired challenge is refused before the store is asked, so
            // its id need not be remembered any longer.
            sqlx::query("DELETE FROM mpp_challenges WHERE expires_at < $1")
                .bind(now)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO mpp_challenges (id, state, expires_at, created_at) VALUES ($1, 'pending', $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(expires_at_ms)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Mark a reserved MPP challenge id used for good.
    pub async fn confirm_mpp_challenge(&self, id: &str) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query("UPDATE mpp_challenges SET state = 'used' WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Forget a pending MPP challenge id (settlement failed; nothing consumed).
    pub async fn release_mpp_challenge(&self, id: &str) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM mpp_challenges WHERE id = $1 AND state = 'pending'")
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
