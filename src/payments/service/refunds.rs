//! Refunds of settled per-request payments that cannot be lost
//! (PROTOCOL.md §7f): a job's exact refund is credited with its usage row in
//! one transaction; failing that, it is recorded as owed for the reaper;
//! failing that too (the store takes no writes at all), it is kept here and
//! retried by the reaper until the store takes it. Meanwhile the store
//! still holds the job's refund open (written with the settlement), so if
//! this process dies first, the payer gets the whole payment back.

use std::collections::HashMap;

use super::Payments;
use crate::money::Micros;
use crate::store::{CreditBalance, UsageRow, WalletId};

/// A refund the store could not take yet, kept in memory.
#[derive(Debug, Clone)]
pub(super) struct OwedRefund {
    wallet: WalletId,
    amount: Micros,
    usage: Option<UsageRow>,
}

/// The refunds kept in memory, by job id.
pub(super) type OwedRefunds = std::sync::Mutex<HashMap<String, OwedRefund>>;

impl Payments {
    /// Credit `refund` to the payer of the job `job_id`, with the job's
    /// usage row, in one transaction; when that fails, record both as owed;
    /// when that fails too, keep them for [`Payments::credit_due_refunds`].
    /// Never fails: the payment stands and the refund is owed whatever
    /// happens. The payer's position when credits moved now.
    pub async fn refund_job(
        &self,
        job_id: &str,
        wallet: &WalletId,
        refund: Micros,
        usage: Option<UsageRow>,
    ) -> Option<CreditBalance> {
        let store = self.store();
        let err = match store
            .settle_job_refund(job_id, wallet, refund, usage.as_ref())
            .await
        {
            Ok(b) => return b,
            Err(e) => e,
        };
        tracing::warn!(%job_id, error = %err, refund = refund.0, "could not credit a refund; recording it as owed");
        match store
            .owe_job_refund(job_id, wallet, refund, usage.as_ref())
            .await
        {
            Ok(_) => {
                tracing::warn!(%job_id, refund = refund.0, "refund recorded as owed; the reaper credits it");
                return None;
            }
            Err(e) => {
                tracing::error!(%job_id, error = %e, refund = refund.0,
                    "could not record an owed refund; retrying until the store takes it");
            }
        }
        self.keep_owed_refund(job_id, wallet, refund, usage);
        None
    }

    /// Keep a refund the store could not take, to retry.
    pub(super) fn keep_owed_refund(
        &self,
        job_id: &str,
        wallet: &WalletId,
        amount: Micros,
        usage: Option<UsageRow>,
    ) {
        let owed = OwedRefund {
            wallet: wallet.clone(),
            amount,
            usage,
        };
        self.owed_refunds().insert(job_id.to_string(), owed);
    }

    fn owed_refunds(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwedRefund>> {
        // A poisoned lock still holds valid entries (they are plain values).
        self.inner
            .owed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The jobs whose refunds are kept in memory: their open refunds in the
    /// store must not lapse into a whole refund meanwhile.
    pub fn owed_refund_jobs(&self) -> Vec<String> {
        self.owed_refunds().keys().cloned().collect()
    }

    /// Credit what is owed: first the refunds kept in memory (exact, with
    /// their usage rows), then every refund the store says is due (owed, or
    /// open past its lease; every open one when `all`, see
    /// [`crate::store::Store::credit_due_job_refunds`]). Returns how many
    /// were credited.
    pub async fn credit_due_refunds(&self, all: bool) -> u64 {
        let mut credited = 0;
        let kept: Vec<(String, OwedRefund)> = self
            .owed_refunds()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (job, o) in kept {
            match self
                .store()
                .settle_job_refund(&job, &o.wallet, o.amount, o.usage.as_ref())
                .await
            {
                Ok(_) => {
                    self.owed_refunds().remove(&job);
                    credited += 1;
                    tracing::info!(job_id = %job, refund = o.amount.0, "credited an owed refund");
                }
                Err(e) => {
                    tracing::warn!(job_id = %job, error = %e, "an owed refund is still not credited");
                    // The store is still failing: the rest waits too, and
                    // nothing lapses into a whole refund meanwhile.
                    return credited;
                }
            }
        }
        match self.store().credit_due_job_refunds(all).await {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(refunds = n, "credited refunds owed on settled payments");
                }
                credited + n
            }
            Err(e) => {
                tracing::error!(error = %e, "could not credit the refunds due");
                credited
            }
        }
    }
}
