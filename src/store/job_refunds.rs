//! Refunds owed on settled per-request payments (PROTOCOL.md §7f "Pay
//! before the first byte"): what a job did not use of its x402 or MPP
//! payment goes back to the payer as credits, and the store never forgets
//! that it is owed.
//!
//! - The refund is opened ([`open_refund_in_tx!`]) in the transaction that
//!   marks the payment settled: from then on the whole payment is owed back
//!   unless the job's end says otherwise. The job's coordinator renews its
//!   lease ([`Store::renew_job_refunds`]).
//! - The job's end credits the exact refund together with the job's usage
//!   row, in one transaction ([`Store::settle_job_refund`]). When that
//!   write fails, the exact refund and the usage row are recorded as owed
//!   ([`Store::owe_job_refund`]) without touching the wallet.
//! - [`Store::credit_due_job_refunds`] (at start-up and by the reaper)
//!   credits every owed refund, and the whole payment of every open refund
//!   whose lease has lapsed (its coordinator died with the job).
//!
//! Each refund is credited once: its state moves under a row lock (or in a
//! serialised write transaction on SQLite), and its ledger row's reference
//! `refund:JOB_ID` is unique.

use crate::money::Micros;

use super::sql_money::storable;
use super::{CreditBalance, Result, Store, StoreError, UsageRow, WalletId};

/// A refund as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRefund {
    pub job_id: String,
    pub wallet: WalletId,
    /// What the payment settled.
    pub paid: Micros,
    /// The exact refund, once the job's end recorded it.
    pub owed: Option<Micros>,
    /// `open`, `owed` or `credited`.
    pub state: String,
}

/// The ledger reference of a job's refund.
pub fn refund_reference(job_id: &str) -> String {
    format!("refund:{job_id}")
}

/// Open a job's refund of the whole payment `$paid` to `$wallet` inside
/// `$tx` (the transaction that records the settlement). Opening twice is a
/// no-op: the first row stands.
macro_rules! open_refund_in_tx {
    ($tx:ident, $job:expr, $wallet:expr, $paid:expr, $lease_until:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO job_refunds (job_id, wallet, paid, owed, state, lease_until, created_at) \
             VALUES ($1, $2, $3, NULL, 'open', $4, $5) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind($job)
        .bind($wallet.as_str())
        .bind($paid)
        .bind($lease_until)
        .bind($now)
        .execute(&mut *$tx)
        .await?;
    };
}

type RefundRow = (String, String, Micros, Option<Micros>, String);

impl Store {
    /// The job's exact refund: credit `amount` to `wallet` and write the
    /// job's `usage` row, in one transaction. A refund already credited is
    /// not credited again; one already recorded as owed is credited at the
    /// amount recorded then (its usage row was written with it). The payer's
    /// position when credits moved.
    pub async fn settle_job_refund(
        &self,
        job_id: &str,
        wallet: &WalletId,
        amount: Micros,
        usage: Option<&UsageRow>,
    ) -> Result<Option<CreditBalance>> {
        let (_, b) = self
            .close_job_refund(job_id, Some((wallet, storable(amount)?)), usage, 0)
            .await?;
        Ok(b)
    }

    /// Record a job's exact refund and its usage row as owed, without
    /// crediting: the reaper credits it. False when the refund is no longer
    /// open (it was credited or recorded already).
    pub async fn owe_job_refund(
        &self,
        job_id: &str,
        wallet: &WalletId,
        amount: Micros,
        usage: Option<&UsageRow>,
    ) -> Result<bool> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let lease_until = self.lease_end(now);
        Ok(write_tx!(self, |tx, lock| {
            // A refund the store never saw opened (its settlement record
            // was lost) is recorded from what the job knows.
            open_refund_in_tx!(tx, job_id, wallet, amt, lease_until, now);
            let row: Option<(String, Micros)> = sqlx::query_as(&format!(
                "SELECT state, paid FROM job_refunds WHERE job_id = $1{lock}"
            ))
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (state, paid) = row.ok_or(StoreError::Corrupt("refund row vanished"))?;
            if state != "open" {
                false
            } else {
                if amt > paid {
                    return Err(StoreError::Corrupt("refund above the payment"));
                }
                if let Some(u) = usage {
                    usage_insert!(&mut *tx, u);
                }
                sqlx::query("UPDATE job_refunds SET state = 'owed', owed = $1 WHERE job_id = $2")
                    .bind(amt)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                true
            }
        }))
    }

    /// Extend the leases of these jobs' open refunds (jobs still running
    /// here) by [`Store::hold_lease`] from now.
    pub async fn renew_job_refunds(&self, jobs: &[String]) -> Result<u64> {
        let until = self.lease_end(self.now_ms());
        let mut renewed = 0;
        for batch in jobs.chunks(200) {
            let list = (0..batch.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE job_refunds SET lease_until = $1 WHERE state = 'open' AND job_id IN ({list})"
            );
            renewed += with_pool!(self, |pool| {
                let mut q = sqlx::query(&sql).bind(until);
                for j in batch {
                    q = q.bind(j);
                }
                q.execute(pool).await?.rows_affected()
            });
        }
        Ok(renewed)
    }

    /// Credit every refund that is due: each one recorded as owed, and the
    /// whole payment of each open one whose lease has lapsed (every open one
    /// when `all`: a coordinator that owns the database alone, starting up,
    /// runs no job yet). Returns how many were credited; when any refund
    /// could not be credited, the first error (after trying the rest).
    pub async fn credit_due_job_refunds(&self, all: bool) -> Result<u64> {
        let mut credited = 0;
        loop {
            let cutoff = if all { i64::MAX } else { self.now_ms() };
            let due: Vec<(String,)> = with_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT job_id FROM job_refunds WHERE state = 'owed' \
                     OR (state = 'open' AND lease_until < $1) ORDER BY created_at LIMIT 500",
                )
                .bind(cutoff)
                .fetch_all(pool)
                .await?
            });
            let n = due.len();
            // One refund the store refuses does not hold up the others.
            let mut failed = None;
            for (job,) in due {
                match self.close_job_refund(&job, None, None, cutoff).await {
                    Ok((true, _)) => credited += 1,
                    Ok((false, _)) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if n < 500 {
                return Ok(credited);
            }
        }
    }

    /// A job's refund, if its payment was settled through the store.
    pub async fn job_refund(&self, job_id: &str) -> Result<Option<JobRefund>> {
        let row: Option<RefundRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT job_id, wallet, paid, owed, state FROM job_refunds WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|(job_id, wallet, paid, owed, state)| JobRefund {
            job_id,
            wallet: WalletId(wallet),
            paid,
            owed,
            state,
        }))
    }

    /// How many refunds are not credited yet (open or owed).
    pub async fn uncredited_job_refunds(&self) -> Result<u64> {
        let (n,): (i64,) = with_pool!(self, |pool| {
            sqlx::query_as("SELECT COUNT(*) FROM job_refunds WHERE state <> 'credited'")
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Credit a job's refund. `exact`: the job's own end (the payer and the
    /// amount, which also opens a refund the store never saw); `None`: the
    /// reaper, crediting what the row says is due, where an open refund is
    /// due only when its lease ended before `cutoff` (checked under the
    /// lock, so a job renewing meanwhile keeps its refund). Returns whether
    /// this call credited it, and the payer's position when credits moved.
    async fn close_job_refund(
        &self,
        job_id: &str,
        exact: Option<(&WalletId, Micros)>,
        usage: Option<&UsageRow>,
        cutoff: i64,
    ) -> Result<(bool, Option<CreditBalance>)> {
        let now = self.now_ms();
        let lease_until = self.lease_end(now);
        let reference = refund_reference(job_id);
        let out = write_tx!(self, |tx, lock| {
            if let Some((wallet, amt)) = exact {
                open_refund_in_tx!(tx, job_id, wallet, amt, lease_until, now);
            }
            let row: Option<(String, Micros, Option<Micros>, String, i64)> =
                sqlx::query_as(&format!(
                    "SELECT wallet, paid, owed, state, lease_until FROM job_refunds \
                     WHERE job_id = $1{lock}"
                ))
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
            let (wallet, paid, owed, state, lease) =
                row.ok_or(StoreError::Corrupt("no refund row"))?;
            let amount = match (state.as_str(), exact) {
                ("credited", _) => None,
                // The job's end recorded the exact refund and its usage row.
                ("owed", _) => Some(owed.unwrap_or(paid)),
                ("open", Some((_, amt))) => {
                    if let Some(u) = usage {
                        usage_insert!(&mut *tx, u);
                    }
                    Some(amt)
                }
                // Open with no job to end it (its coordinator died): the
                // whole payment, once the lease has lapsed.
                ("open", None) if lease < cutoff => Some(paid),
                ("open", None) => None,
                _ => return Err(StoreError::Corrupt("unknown refund state")),
            };
            match amount {
                None => (false, None),
                Some(amt) => {
                    if amt > paid {
                        return Err(StoreError::Corrupt("refund above the payment"));
                    }
                    let wallet = WalletId(wallet);
                    let b = if amt > Micros::ZERO {
                        Some(credit_in_tx!(
                            tx, lock, &wallet, amt, "refund", &reference, now
                        ))
                    } else {
                        None
                    };
                    sqlx::query(
                        "UPDATE job_refunds SET state = 'credited', owed = $1, closed_at = $2 \
                         WHERE job_id = $3",
                    )
                    .bind(amt)
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                    (true, b)
                }
            }
        });
        Ok(out)
    }
}
