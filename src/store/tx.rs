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

/// Bind the 21 columns of the [`UsageRow`](super::UsageRow) `$u` onto the
/// query `$q`, in [`USAGE_COLUMNS`](super::grid::USAGE_COLUMNS) order.
macro_rules! usage_bind {
    ($q:expr, $u:expr) => {{
        let u: &$crate::store::UsageRow = $u;
        $q.bind(&u.job_id)
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
    }};
}

/// Insert one [`UsageRow`](super::UsageRow) `$u` with the executor `$exec`
/// (a pool, or `&mut *tx` inside [`write_tx!`]). A second row for the same
/// job trips the primary key and reads as a duplicate.
macro_rules! usage_insert {
    ($exec:expr, $u:expr) => {{
        let sql = $crate::store::tx::values_sql(
            "grid_usage",
            $crate::store::grid::USAGE_COLUMNS,
            $crate::store::tx::USAGE_WIDTH,
            1,
        );
        usage_bind!(sqlx::query(&sql), $u)
            .execute($exec)
            .await
            .map_err($crate::store::tx::duplicate_as_reference)?;
    }};
}

/// Insert `$rows` (a slice) into `$table` inside the transaction `$tx`,
/// many to a statement ([`statement_chunks`] of at most `$max`): one round
/// trip for a batch instead of one a row. `|$q, $row| $bind` binds one row's
/// `$width` columns onto the query. A duplicate fails the whole insert, as
/// one row alone would.
macro_rules! insert_rows {
    ($tx:ident, $table:expr, $columns:expr, $width:expr, $max:expr, $rows:expr,
     |$q:ident, $row:ident| $bind:expr) => {
        for chunk in $crate::store::tx::statement_chunks($rows, $max) {
            let sql = $crate::store::tx::values_sql($table, $columns, $width, chunk.len());
            let mut $q = sqlx::query(&sql);
            for $row in chunk {
                $q = $bind;
            }
            $q.execute(&mut *$tx)
                .await
                .map_err($crate::store::tx::duplicate_as_reference)?;
        }
    };
}

/// Insert the [`UsageRow`](super::UsageRow)s `$rows` (a slice of
/// references) inside the transaction `$tx`, many to a statement.
macro_rules! usage_insert_many {
    ($tx:ident, $rows:expr) => {{
        let rows: &[&$crate::store::UsageRow] = $rows;
        insert_rows!(
            $tx,
            "grid_usage",
            $crate::store::grid::USAGE_COLUMNS,
            $crate::store::tx::USAGE_WIDTH,
            $crate::store::tx::USAGE_ROWS_PER_STATEMENT,
            rows,
            |q, u| usage_bind!(q, u)
        );
    }};
}

/// The columns of a usage row.
pub(super) const USAGE_WIDTH: usize = 21;
/// Usage rows to one `INSERT`: far below both drivers' bind limits
/// (32,766 on SQLite, 65,535 on PostgreSQL).
pub(super) const USAGE_ROWS_PER_STATEMENT: usize = 256;

/// `rows` cut into pieces of a power of two rows, at most `max` (a power of
/// two) each, largest first. A statement is prepared once per connection
/// and shape: with any count allowed, every batch size would be a new
/// statement for the server to parse and plan; with these, a connection
/// needs at most `log2(max) + 1` of them.
pub(super) fn statement_chunks<T>(rows: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(max);
        // The largest power of two not above n (n >= 1).
        let take = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (head, tail) = rest.split_at(take);
        rest = tail;
        Some(head)
    })
}

/// `INSERT INTO {table} ({columns}) VALUES ($1, …), (…)`: `rows` tuples of
/// `width` numbered parameters, which both drivers accept.
pub(super) fn values_sql(table: &str, columns: &str, width: usize, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = format!("INSERT INTO {table} ({columns}) VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            let sep = if c == 0 { "" } else { ", " };
            // Writing to a String cannot fail.
            let _ = write!(sql, "{sep}${}", r * width + c + 1);
        }
        sql.push(')');
    }
    sql
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

#[cfg(test)]
mod tests {
    use super::{statement_chunks, values_sql};

    #[test]
    fn statement_chunks_are_powers_of_two_that_cover_every_row_once() {
        let rows: Vec<u32> = (0..300).collect();
        let sizes: Vec<usize> = statement_chunks(&rows, 256).map(<[u32]>::len).collect();
        assert_eq!(sizes, [256, 32, 8, 4]);
        let again: Vec<u32> = statement_chunks(&rows, 256).flatten().copied().collect();
        assert_eq!(again, rows);
        assert_eq!(statement_chunks(&rows[..0], 256).count(), 0);
        let sizes: Vec<usize> = statement_chunks(&rows[..7], 4).map(<[u32]>::len).collect();
        assert_eq!(sizes, [4, 2, 1]);
    }

    #[test]
    fn values_sql_numbers_every_parameter_once_row_by_row() {
        assert_eq!(
            values_sql("t", "a, b", 2, 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(values_sql("t", "a", 1, 1), "INSERT INTO t (a) VALUES ($1)");
    }
}
