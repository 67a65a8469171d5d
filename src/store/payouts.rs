//! Operator payouts and earnings (migration `0003_operators`): the
//! operator share of each usage row ([`crate::payments::billing::Split`])
//! is gathered into payout batches (operator wallet → amount), each row in
//! at most one batch, and a batch is closed with the transaction that paid
//! it. Earnings are the usage rows of one node, summed per day and model,
//! with what of them was paid.
//!
//! "At most one batch" rests on the primary key of `grid_payout_items` (the
//! usage row's job id); planners also run one at a time (`BEGIN IMMEDIATE`
//! on SQLite, a self-conflicting table lock on PostgreSQL), so a concurrent
//! plan sees the rows the other took and never fails on the key.

use std::collections::BTreeMap;

use crate::money::Micros;

use super::{Result, Store, StoreError};

/// The milliseconds of a UTC day: usage rows are grouped by
/// `created_at / DAY_MS`.
pub const DAY_MS: i64 = 86_400_000;

/// One operator's line of a payout batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutLine {
    /// The operator wallet (EVM addresses lowercase).
    pub wallet: String,
    pub amount: Micros,
    /// How many usage rows the amount sums.
    pub rows: i64,
}

/// A payout batch and its lines (largest amount first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutBatch {
    pub id: String,
    /// `planned` or `paid`.
    pub state: String,
    pub min_amount: Micros,
    pub total: Micros,
    pub tx_hash: Option<String>,
    pub created_at: i64,
    pub paid_at: Option<i64>,
    pub payouts: Vec<PayoutLine>,
}

/// Why a batch cannot be marked paid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkPaidRefused {
    #[error("no payout batch {0}")]
    UnknownBatch(String),
    #[error("payout batch {id} was already marked paid (transaction {tx_hash})")]
    AlreadyPaid { id: String, tx_hash: String },
}

/// The usage rows of one node on one UTC day for one model, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarningsRow {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub model: String,
    pub jobs: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// What the jobs cost their payers.
    pub revenue: Micros,
    /// The operator share of that.
    pub earned: Micros,
    /// The part of `earned` in batches marked paid.
    pub paid: Micros,
    /// The part of `earned` in batches planned and not yet paid.
    pub in_batch: Micros,
}

/// The wallet a payout goes to: EVM addresses compare case-insensitively,
/// so they are gathered lowercase; other addresses (Solana) as they are.
pub fn payout_wallet(w: &str) -> String {
    let w = w.trim();
    if w.starts_with("0x") || w.starts_with("0X") {
        w.to_ascii_lowercase()
    } else {
        w.to_string()
    }
}

fn money(v: i64) -> Result<Micros> {
    u64::try_from(v)
        .map(Micros)
        .map_err(|_| StoreError::Corrupt("negative amount"))
}

/// Unpaid usage rows: an operator share, and in no batch yet.
const UNBATCHED: &str = "u.operator_share > 0 AND NOT EXISTS \
     (SELECT 1 FROM grid_payout_items i WHERE i.job_id = u.job_id)";

impl Store {
    /// Gather every unbatched operator share into a new batch, for the
    /// operators whose unpaid total reaches `min_amount` (the others wait
    /// for a later batch). `None` when no operator reaches it.
    pub async fn plan_payout(&self, min_amount: Micros) -> Result<Option<PayoutBatch>> {
        let min = i64::try_from(min_amount.0).map_err(|_| StoreError::AmountOutOfRange)?;
        let now = self.now_ms();
        let id = format!("pb-{}", uuid::Uuid::new_v4());
        let batch = write_tx!(self, |tx, lock| {
            if !lock.is_empty() {
                // PostgreSQL: one planner at a time; each statement below
                // then sees the rows the previous planner committed.
                sqlx::query("LOCK TABLE grid_payout_items IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
            }
            let groups: Vec<(String, i64)> = sqlx::query_as(&format!(
                "SELECT u.operator_wallet, CAST(SUM(u.operator_share) AS BIGINT) \
                 FROM grid_usage u WHERE {UNBATCHED} GROUP BY u.operator_wallet"
            ))
            .fetch_all(&mut *tx)
            .await?;
            // The same operator may appear under several spellings.
            let mut owed: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
            for (wallet, sum) in groups {
                let e = owed.entry(payout_wallet(&wallet)).or_default();
                e.0 = e.0.saturating_add(sum);
                e.1.push(wallet);
            }
            owed.retain(|_, (sum, _)| *sum > 0 && *sum >= min);
            if owed.is_empty() {
                return Ok(None);
            }
            sqlx::query(
                "INSERT INTO grid_payout_batches (id, state, min_amount, total, created_at) \
                 VALUES ($1, 'planned', $2, 0, $3)",
            )
            .bind(&id)
            .bind(min)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (wallet, (_, spellings)) in &owed {
                for spelling in spellings {
                    sqlx::query(&format!(
                        "INSERT INTO grid_payout_items (job_id, batch_id, operator_wallet, amount) \
                         SELECT u.job_id, $1, $2, u.operator_share FROM grid_usage u \
                         WHERE u.operator_wallet = $3 AND {UNBATCHED}"
                    ))
                    .bind(&id)
                    .bind(wallet)
                    .bind(spelling)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            // The batch is what its items say (a usage row committed between
            // the two statements above is simply in it too).
            let lines: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT operator_wallet, CAST(SUM(amount) AS BIGINT), COUNT(*) \
                 FROM grid_payout_items WHERE batch_id = $1 GROUP BY operator_wallet",
            )
            .bind(&id)
            .fetch_all(&mut *tx)
            .await?;
            let total = lines
                .iter()
                .try_fold(0i64, |acc, l| acc.checked_add(l.1))
                .ok_or(StoreError::AmountOutOfRange)?;
            sqlx::query("UPDATE grid_payout_batches SET total = $1 WHERE id = $2")
                .bind(total)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            let mut payouts = lines
                .into_iter()
                .map(|(wallet, amount, rows)| {
                    Ok(PayoutLine {
                        wallet,
                        amount: money(amount)?,
                        rows,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sort_lines(&mut payouts);
            Some(PayoutBatch {
                id: id.clone(),
                state: "planned".into(),
                min_amount,
                total: money(total)?,
                tx_hash: None,
                created_at: now,
                paid_at: None,
                payouts,
            })
        });
        Ok(batch)
    }

    /// Close a planned batch with the transaction that paid it. Refused
    /// for an unknown batch and for one already paid.
    pub async fn mark_payout_paid(
        &self,
        batch_id: &str,
        tx_hash: &str,
    ) -> Result<Result<PayoutBatch, MarkPaidRefused>> {
        let now = self.now_ms();
        let refused = write_tx!(self, |tx, lock| {
            let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
                "SELECT state, tx_hash FROM grid_payout_batches WHERE id = $1{lock}"
            ))
            .bind(batch_id)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => Some(MarkPaidRefused::UnknownBatch(batch_id.to_string())),
                Some((state, paid_tx)) if state != "planned" => {
                    Some(MarkPaidRefused::AlreadyPaid {
                        id: batch_id.to_string(),
                        tx_hash: paid_tx.unwrap_or_default(),
                    })
                }
                Some(_) => {
                    sqlx::query(
                        "UPDATE grid_payout_batches SET state = 'paid', tx_hash = $1, paid_at = $2 \
                         WHERE id = $3 AND state = 'planned'",
                    )
                    .bind(tx_hash)
                    .bind(now)
                    .bind(batch_id)
                    .execute(&mut *tx)
                    .await?;
                    None
                }
            }
        });
        if let Some(r) = refused {
            return Ok(Err(r));
        }
        match self.payout_batch(batch_id).await? {
            Some(b) => Ok(Ok(b)),
            None => Err(StoreError::Corrupt("payout batch vanished")),
        }
    }

    /// A batch and its lines.
    pub async fn payout_batch(&self, batch_id: &str) -> Result<Option<PayoutBatch>> {
        type BatchRow = (String, i64, i64, Option<String>, i64, Option<i64>);
        let (row, lines): (Option<BatchRow>, Vec<(String, i64, i64)>) = with_pool!(self, |pool| {
            let row = sqlx::query_as(
                "SELECT state, min_amount, total, tx_hash, created_at, paid_at \
                 FROM grid_payout_batches WHERE id = $1",
            )
            .bind(batch_id)
            .fetch_optional(pool)
            .await?;
            let lines = sqlx::query_as(
                "SELECT operator_wallet, CAST(SUM(amount) AS BIGINT), COUNT(*) \
                 FROM grid_payout_items WHERE batch_id = $1 GROUP BY operator_wallet",
            )
            .bind(batch_id)
            .fetch_all(pool)
            .await?;
            (row, lines)
        });
        let Some((state, min_amount, total, tx_hash, created_at, paid_at)) = row else {
            return Ok(None);
        };
        let mut payouts = lines
            .into_iter()
            .map(|(wallet, amount, rows)| {
                Ok(PayoutLine {
                    wallet,
                    amount: money(amount)?,
                    rows,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sort_lines(&mut payouts);
        Ok(Some(PayoutBatch {
            id: batch_id.to_string(),
            state,
            min_amount: money(min_amount)?,
            total: money(total)?,
            tx_hash,
            created_at,
            paid_at,
            payouts,
        }))
    }

    /// The job ids a batch pays (for audits and tests).
    pub async fn payout_batch_jobs(&self, batch_id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT job_id FROM grid_payout_items WHERE batch_id = $1 ORDER BY job_id",
            )
            .bind(batch_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// A node's usage rows summed per UTC day and model, oldest first.
    pub async fn node_earnings(&self, node_id: &str) -> Result<Vec<EarningsRow>> {
        type Row = (i64, String, i64, i64, i64, i64, i64, i64, i64);
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT u.created_at / 86400000, u.model, COUNT(*), \
                 CAST(SUM(u.prompt_tokens) AS BIGINT), CAST(SUM(u.completion_tokens) AS BIGINT), \
                 CAST(SUM(u.cost) AS BIGINT), CAST(SUM(u.operator_share) AS BIGINT), \
                 CAST(SUM(CASE WHEN b.state = 'paid' THEN u.operator_share ELSE 0 END) AS BIGINT), \
                 CAST(SUM(CASE WHEN b.state = 'planned' THEN u.operator_share ELSE 0 END) AS BIGINT) \
                 FROM grid_usage u \
                 LEFT JOIN grid_payout_items i ON i.job_id = u.job_id \
                 LEFT JOIN grid_payout_batches b ON b.id = i.batch_id \
                 WHERE u.node_id = $1 \
                 GROUP BY u.created_at / 86400000, u.model ORDER BY 1, 2",
            )
            .bind(node_id)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(
                |(day, model, jobs, p, c, revenue, earned, paid, in_batch)| {
                    Ok(EarningsRow {
                        day,
                        model,
                        jobs,
                        prompt_tokens: p,
                        completion_tokens: c,
                        revenue: money(revenue)?,
                        earned: money(earned)?,
                        paid: money(paid)?,
                        in_batch: money(in_batch)?,
                    })
                },
            )
            .collect()
    }
}

/// Largest amount first, then by wallet: a stable order for files.
fn sort_lines(lines: &mut [PayoutLine]) {
    lines.sort_by(|a, b| {
        b.amount
            .cmp(&a.amount)
            .then_with(|| a.wallet.cmp(&b.wallet))
    });
}
