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
