//! Coordinator state that must outlive the process (migration
//! `0003_operators`, PROTOCOL.md §7f "what survives restarts"): the
//! single-use registration codes given on the command line, once used, and
//! the time of each node's last price change (the cooldown of §5.8).

use super::{Result, Store};

impl Store {
    /// Spend a command-line registration code (its hash). False when it
    /// was spent before, by this process or an earlier one. The insert is
    /// the atomic step: of concurrent registrations exactly one wins.
    pub async fn use_config_code(&self, code_hash: &str) -> Result<bool> {
        let now = self.now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO grid_used_config_codes (code_hash, used_at) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(code_hash)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Record a price change of (node, model) at `now_ms` unless the last
    /// one was less than `cooldown_ms` before. `Ok(None)`: recorded;
    /// `Ok(Some(at))`: refused, the last change was at `at`. One statement,
    /// so concurrent changes (or replicas) cannot both pass the cooldown.
    pub async fn claim_price_change(
        &self,
        node_id: &str,
        model: &str,
        now_ms: i64,
        cooldown_ms: i64,
    ) -> Result<Option<i64>> {
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO grid_price_changes (node_id, model, changed_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (node_id, model) DO UPDATE SET changed_at = excluded.changed_at \
                 WHERE grid_price_changes.changed_at <= $4",
            )
            .bind(node_id)
            .bind(model)
            .bind(now_ms)
            .bind(now_ms.saturating_sub(cooldown_ms))
            .execute(pool)
            .await?
            .rows_affected()
        });
        if n == 1 {
            return Ok(None);
        }
        let row: Option<(i64,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT changed_at FROM grid_price_changes WHERE node_id = $1 AND model = $2",
            )
            .bind(node_id)
            .bind(model)
            .fetch_optional(pool)
            .await?
        });
        // A row that vanished in between cannot happen (rows are never
        // deleted); count it as a change made now.
        Ok(Some(row.map_or(now_ms, |r| r.0)))
    }

    /// Every recorded price change, as (node id, model, unix ms).
    pub async fn price_changes(&self) -> Result<Vec<(String, String, i64)>> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT node_id, model, changed_at FROM grid_price_changes")
                .fetch_all(pool)
                .await?
        }))
    }
}
