//! The coordinator's tables (migration `0002_grid`): node documents,
//! registration codes and the usage ledger of the grid.

use crate::money::{Micros, MicrosPerM};

use super::{Result, Store};

/// One finished job's bill (PROTOCOL.md §6.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub job_id: String,
    pub node_id: String,
    pub operator_wallet: String,
    pub payer_wallet: Option<String>,
    pub api_key_id: Option<String>,
    /// `credits`, `x402-v1`, `x402-v2`, `mpp` or `free` (development mode).
    pub method: String,
    pub model: String,
    /// `completed`, `aborted` (client gone: only delivered tokens billed) or `failed`.
    pub status: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub input_per_m: MicrosPerM,
    pub output_per_m: MicrosPerM,
    pub quoted: Micros,
    pub cost: Micros,
    pub operator_share: Micros,
    pub platform_share: Micros,
    pub stakers_share: Micros,
    pub burn_share: Micros,
    pub usage_signature: Option<String>,
    pub result_signature: Option<String>,
    pub created_at: i64,
}

/// Read by column name, on either backend.
impl<'r, R> sqlx::FromRow<'r, R> for UsageRow
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Micros: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    MicrosPerM: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        Ok(UsageRow {
            job_id: row.try_get("job_id")?,
            node_id: row.try_get("node_id")?,
            operator_wallet: row.try_get("operator_wallet")?,
            payer_wallet: row.try_get("payer_wallet")?,
            api_key_id: row.try_get("api_key_id")?,
            method: row.try_get("method")?,
            model: row.try_get("model")?,
            status: row.try_get("status")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            completion_tokens: row.try_get("completion_tokens")?,
            input_per_m: row.try_get("input_per_m")?,
            output_per_m: row.try_get("output_per_m")?,
            quoted: row.try_get("quoted")?,
            cost: row.try_get("cost")?,
            operator_share: row.try_get("operator_share")?,
            platform_share: row.try_get("platform_share")?,
            stakers_share: row.try_get("stakers_share")?,
            burn_share: row.try_get("burn_share")?,
            usage_signature: row.try_get("usage_signature")?,
            result_signature: row.try_get("result_signature")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

pub(super) const USAGE_COLUMNS: &str =
    "job_id, node_id, operator_wallet, payer_wallet, api_key_id, method, \
     model, status, prompt_tokens, completion_tokens, input_per_m, output_per_m, quoted, cost, \
     operator_share, platform_share, stakers_share, burn_share, usage_signature, \
     result_signature, created_at";

impl Store {
    /// Insert or replace a node's document.
    pub async fn save_node(&self, id: &str, wallet: &str, doc: &str) -> Result<()> {
        let now = self.now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO grid_nodes (id, wallet, doc, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET wallet = excluded.wallet, doc = excluded.doc, \
                 updated_at = excluded.updated_at",
            )
            .bind(id)
            .bind(wallet)
            .bind(doc)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every node document, as (id, doc).
    pub async fn load_nodes(&self) -> Result<Vec<(String, String)>> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT id, doc FROM grid_nodes ORDER BY id")
                .fetch_all(pool)
                .await?
        }))
    }

    /// Record a registration code (its hash) for `wallet`.
    pub async fn create_registration_code(&self, code_hash: &str, wallet: &str) -> Result<()> {
        let now = self.now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO grid_registration_codes (code_hash, wallet, created_at) VALUES ($1, $2, $3)",
            )
            .bind(code_hash)
            .bind(wallet)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Use a registration code once, for the wallet it was made for. False
    /// when the code is unknown, used, or for another wallet.
    pub async fn use_registration_code(
        &self,
        code_hash: &str,
        wallet: &str,
        node_id: &str,
    ) -> Result<bool> {
        let now = self.now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE grid_registration_codes SET used_at = $1, node_id = $2 \
                 WHERE code_hash = $3 AND used_at IS NULL AND lower(wallet) = lower($4)",
            )
            .bind(now)
            .bind(node_id)
            .bind(code_hash)
            .bind(wallet)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Record a job's bill. A job is billed once: a second row for the same
    /// job is refused.
    pub async fn record_usage(&self, u: &UsageRow) -> Result<()> {
        with_pool!(self, |pool| {
            usage_insert!(pool, u);
        });
        Ok(())
    }

    /// The bill of one job.
    pub async fn usage_for_job(&self, job_id: &str) -> Result<Option<UsageRow>> {
        let sql = format!("SELECT {USAGE_COLUMNS} FROM grid_usage WHERE job_id = $1");
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(job_id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// The newest bills, newest first.
    pub async fn usage_rows(&self, limit: u32) -> Result<Vec<UsageRow>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM grid_usage ORDER BY created_at DESC, job_id LIMIT $1"
        );
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        }))
    }
}
