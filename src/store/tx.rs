//! The two ways a query runs on either backend: [`write_tx!`] (one write
//! transaction, rows about to change locked) and [`with_pool!`] (a single
//! statement on the pool). Each expands its body once per backend, so the
//! body is type-checked against both drivers.

/// Run `$body` inside one write transaction. `$tx` is the transaction and
/// `$lock` the row-lock suffix for `SELECT`s of rows about to change
/// (`" FOR UPDATE"` on PostgreSQL; empty on SQLite, where `BEGIN IMMEDIATE`
/// already serialises writers). An early `return`/`?` drops the transaction,
/// which rolls it back.
macro_rules! write_tx {
    ($store:expr, |$tx:ident, $lock:ident| $body:block) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let $lock = "";
                let out = $body;
                $tx.commit().await?;
                out
            }
            $crate::store::Backend::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let $lock = " FOR UPDATE";
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Run `$body` with `$pool` bound to the backend's pool (single statements
/// that need no transaction).
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:block) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($pool) => $body,
            $crate::store::Backend::Postgres($pool) => $body,
        }
    };
}

/// Insert one [`UsageRow`](super::UsageRow) `$u` with the executor `$exec`
/// (a pool, or `&mut *tx` inside [`write_tx!`]). A second row for the same
/// job trips the primary key and reads as a duplicate.
macro_rules! usage_insert {
    ($exec:expr, $u:expr) => {{
        let u: &$crate::store::UsageRow = $u;
        sqlx::query(&format!(
            "INSERT INTO grid_usage ({}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            $crate::store::grid::USAGE_COLUMNS
        ))
        .bind(&u.job_id)
        .bind(&u.node_id)
        .bind(&u.operator_wallet)
        .bind(&u.payer_wallet)
        .bind(&u.api_key_id)
        .bind(&u.method)
        .bind(&u.model)
        .bind(&u.status)
        .bind(u.prompt_tokens)
        .bind(u.completion_tokens)
        .bind(u.input_per_m)
        .bind(u.output_per_m)
        .bind(u.quoted)
        .bind(u.cost)
        .bind(u.operator_share)
        .bind(u.platform_share)
        .bind(u.stakers_share)
        .bind(u.burn_share)
        .bind(&u.usage_signature)
        .bind(&u.result_signature)
        .bind(u.created_at)
        .execute($exec)
        .await
        .map_err($crate::store::tx::duplicate_as_reference)?;
    }};
}

/// A unique-index violation as [`StoreError::DuplicateReference`](super::StoreError),
/// any other error as a database error.
pub(super) fn duplicate_as_reference(e: sqlx::Error) -> super::StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            super::StoreError::DuplicateReference
        }
        _ => super::StoreError::Database(e),
    }
}
