//! Credits: each wallet's balance, its ledger, and holds (credits reserved
//! for a metered request, later settled at the actual cost or released).
//!
//! Every balance change is one transaction with its ledger row; amounts are
//! [`Micros`] with checked arithmetic, and the schema refuses a negative
//! balance as a last line.
//!
//! Holds always end (PROTOCOL.md §7f): each open hold has a lease
//! ([`Store::hold_lease`]) that the process running its job renews
//! ([`Store::renew_holds`]); [`Store::release_lapsed_holds`] returns the
//! holds nobody renews (their coordinator crashed) to their wallets. A hold
//! settled for a grid job is closed in the same transaction as the job's
//! usage row ([`Store::settle_hold_recording`]), so after any crash
//! `deposited = balance + held + spent` and every settled hold has its row.

use crate::money::Micros;

use super::sql_money::storable;
use super::{Result, Store, StoreError, UsageRow, WalletId};

/// The id of a credit hold (a UUID).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HoldId(pub String);

/// A wallet's credit position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreditBalance {
    /// Spendable now.
    pub balance: Micros,
    /// Reserved by open holds.
    pub held: Micros,
    pub total_deposited: Micros,
    pub total_spent: Micros,
}

/// The `wallets` columns of a position, in [`CreditBalance`] order.
pub(super) type BalanceRow = (Micros, Micros, Micros, Micros);

impl From<BalanceRow> for CreditBalance {
    fn from((balance, held, total_deposited, total_spent): BalanceRow) -> Self {
        CreditBalance {
            balance,
            held,
            total_deposited,
            total_spent,
        }
    }
}

/// One row of the credit ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub wallet: WalletId,
    /// `topup`, `debit`, `hold`, `settle`, `release` or `refund` (the unused
    /// part of a job's per-request payment, [`Store::refund`]).
    pub kind: String,
    pub amount: Micros,
    pub balance_after: Micros,
    pub reference: Option<String>,
    pub created_at_ms: i64,
}

/// The columns of a ledger row, in the order the two inserts bind them.
pub(super) const LEDGER_COLUMNS: &str =
    "wallet, kind, amount, balance_after, reference, created_at";
pub(super) const LEDGER_WIDTH: usize = 6;
/// Ledger rows to one `INSERT` of [`ledger_insert_many!`].
pub(super) const LEDGER_ROWS_PER_STATEMENT: usize = 1024;

/// Append one ledger row inside the transaction `$tx`. A second top-up with
/// the same reference trips the ledger's unique index.
macro_rules! ledger_insert {
    ($tx:ident, $wallet:expr, $kind:expr, $amount:expr, $after:expr, $reference:expr, $now:expr) => {
        sqlx::query(&$crate::store::tx::values_sql(
            "credit_ledger",
            $crate::store::credits::LEDGER_COLUMNS,
            $crate::store::credits::LEDGER_WIDTH,
            1,
        ))
        .bind($wallet.as_str())
        .bind($kind)
        .bind($amount)
        .bind($after)
        .bind($reference)
        .bind($now)
        .execute(&mut *$tx)
        .await
        .map_err($crate::store::tx::duplicate_as_reference)?;
    };
}

/// A ledger row to be written with others by [`ledger_insert_many!`].
pub(super) struct NewLedgerRow<'a> {
    pub wallet: &'a WalletId,
    pub kind: &'static str,
    pub amount: Micros,
    pub balance_after: Micros,
    pub reference: &'a str,
}

/// Append the [`NewLedgerRow`]s `$rows`, all at `$now`, inside the
/// transaction `$tx`, many to a statement; a duplicate reference fails the
/// whole insert, as one row alone would.
macro_rules! ledger_insert_many {
    ($tx:ident, $rows:expr, $now:expr) => {
        insert_rows!(
            $tx,
            "credit_ledger",
            $crate::store::credits::LEDGER_COLUMNS,
            $crate::store::credits::LEDGER_WIDTH,
            $crate::store::credits::LEDGER_ROWS_PER_STATEMENT,
            $rows,
            |q, e| q
                .bind(e.wallet.as_str())
                .bind(e.kind)
                .bind(e.amount)
                .bind(e.balance_after)
                .bind(e.reference)
                .bind($now)
        );
    };
}

/// Read (and on PostgreSQL lock) a wallet's [`CreditBalance`] inside `$tx`;
/// a wallet that never had credits reads as zeros.
macro_rules! lock_wallet {
    ($tx:ident, $lock:ident, $wallet:expr) => {{
        let row: Option<$crate::store::credits::BalanceRow> = sqlx::query_as(&format!(
            "SELECT balance, held, total_deposited, total_spent FROM wallets WHERE wallet = $1{}",
            $lock
        ))
        .bind($wallet.as_str())
        .fetch_optional(&mut *$tx)
        .await?;
        row.map($crate::store::CreditBalance::from)
            .unwrap_or_default()
    }};
}

/// The body of a debit inside `$tx`: spends `$amt` from the wallet's
/// balance (refused when it is short) and writes the ledger row; evaluates
/// to the new position. Shared by credit spending and the Machines API,
/// which debits in the same transaction as its order's change.
macro_rules! debit_in_tx {
    ($tx:ident, $lock:ident, $wallet:expr, $amt:expr, $reference:expr, $now:expr) => {{
        let mut b = lock_wallet!($tx, $lock, $wallet);
        b.balance = $crate::store::credits::take(b.balance, $amt)?;
        b.total_spent = checked_add(b.total_spent, $amt)?;
        sqlx::query(
            "UPDATE wallets SET balance = $1, total_spent = $2, updated_at = $3 WHERE wallet = $4",
        )
        .bind(b.balance)
        .bind(b.total_spent)
        .bind($now)
        .bind($wallet.as_str())
        .execute(&mut *$tx)
        .await?;
        ledger_insert!(
            $tx,
            $wallet,
            "debit",
            $amt,
            b.balance,
            Some($reference),
            $now
        );
        b
    }};
}

/// The body of a top-up inside `$tx`: creates the wallet row if needed,
/// adds `$amt`, writes the ledger row; evaluates to the new position.
macro_rules! top_up_in_tx {
    ($tx:ident, $lock:ident, $wallet:expr, $amt:expr, $reference:expr, $now:expr) => {
        credit_in_tx!($tx, $lock, $wallet, $amt, "topup", $reference, $now)
    };
}

/// The body of a credit inside `$tx`, logged as `$kind` (`topup`, or
/// `refund` for a job's unused payment): creates the wallet row if needed,
/// adds `$amt` to the balance and to what was deposited, writes the ledger
/// row; evaluates to the new position.
macro_rules! credit_in_tx {
    ($tx:ident, $lock:ident, $wallet:expr, $amt:expr, $kind:expr, $reference:expr, $now:expr) => {{
        sqlx::query(
            "INSERT INTO wallets (wallet, balance, held, total_deposited, total_spent, updated_at) \
             VALUES ($1, 0, 0, 0, 0, $2) ON CONFLICT (wallet) DO NOTHING",
        )
        .bind($wallet.as_str())
        .bind($now)
        .execute(&mut *$tx)
        .await?;
        let mut b = lock_wallet!($tx, $lock, $wallet);
        b.balance = $crate::store::credits::checked_add(b.balance, $amt)?;
        b.total_deposited = $crate::store::credits::checked_add(b.total_deposited, $amt)?;
        sqlx::query(
            "UPDATE wallets SET balance = $1, total_deposited = $2, updated_at = $3 WHERE wallet = $4",
        )
        .bind(b.balance)
        .bind(b.total_deposited)
        .bind($now)
        .bind($wallet.as_str())
        .execute(&mut *$tx)
        .await?;
        ledger_insert!($tx, $wallet, $kind, $amt, b.balance, Some($reference), $now);
        b
    }};
}

/// The body of a hold inside `$tx`: moves `$amt` from the wallet's balance
/// to its held credits (refused when the balance is short), writes the
/// hold row `$id` with its lease end and the ledger row; evaluates to the
/// new position. Shared by metered requests (leased holds) and Machines
/// orders ([`NO_LEASE`]).
macro_rules! hold_in_tx {
    ($tx:ident, $lock:ident, $wallet:expr, $amt:expr, $id:expr, $reference:expr, $lease_until:expr, $now:expr) => {{
        let mut b = lock_wallet!($tx, $lock, $wallet);
        b.balance = $crate::store::credits::take(b.balance, $amt)?;
        b.held = $crate::store::credits::checked_add(b.held, $amt)?;
        sqlx::query(
            "UPDATE wallets SET balance = $1, held = $2, updated_at = $3 WHERE wallet = $4",
        )
        .bind(b.balance)
        .bind(b.held)
        .bind($now)
        .bind($wallet.as_str())
        .execute(&mut *$tx)
        .await?;
        sqlx::query(
            "INSERT INTO credit_holds (id, wallet, amount, state, reference, created_at, lease_until) \
             VALUES ($1, $2, $3, 'held', $4, $5, $6)",
        )
        .bind($id)
        .bind($wallet.as_str())
        .bind($amt)
        .bind($reference)
        .bind($now)
        .bind($lease_until)
        .execute(&mut *$tx)
        .await?;
        ledger_insert!($tx, $wallet, "hold", $amt, b.balance, Some($reference), $now);
        b
    }};
}

/// How a hold is closed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HoldClose {
    /// Charge this much (at most the held amount); the rest returns.
    Charge(Micros),
    /// Charge the whole held amount.
    ChargeAll,
    /// Charge nothing; all of it returns.
    Release,
}

/// The body of closing hold `$hold` inside `$tx` ([`HoldClose`]): the
/// wallet's held credits drop by the hold, the uncharged part returns to
/// its balance, the hold row and a ledger row are written. Evaluates to
/// `Ok(new position)`, or `Err` for an unknown or already closed hold (or
/// a charge above the hold), having changed nothing. Shared by metered
/// requests and Machines orders.
macro_rules! close_hold_in_tx {
    ($tx:ident, $lock:ident, $hold:expr, $close:expr, $now:expr) => {{
        let row: Option<(String, $crate::money::Micros, String, Option<String>)> = sqlx::query_as(&format!(
            "SELECT wallet, amount, state, reference FROM credit_holds WHERE id = $1{}",
            $lock
        ))
        .bind($hold)
        .fetch_optional(&mut *$tx)
        .await?;
        match row {
            None => Err($crate::store::StoreError::UnknownHold),
            Some((_, _, state, _)) if state != "held" => Err($crate::store::StoreError::HoldClosed),
            Some((wallet, held, _, reference)) => {
                let charged = match $close {
                    $crate::store::credits::HoldClose::Charge(c) => Some(c),
                    $crate::store::credits::HoldClose::ChargeAll => Some(held),
                    $crate::store::credits::HoldClose::Release => None,
                };
                let charge = charged.unwrap_or($crate::money::Micros::ZERO);
                match held.checked_sub(charge) {
                    None => Err($crate::store::StoreError::ChargeExceedsHold {
                        charged: charge,
                        held,
                    }),
                    Some(refund) => {
                        let wallet = $crate::store::WalletId(wallet);
                        let mut b = lock_wallet!($tx, $lock, &wallet);
                        b.held = b
                            .held
                            .checked_sub(held)
                            .ok_or($crate::store::StoreError::Corrupt("held below zero"))?;
                        b.balance = $crate::store::credits::checked_add(b.balance, refund)?;
                        b.total_spent = $crate::store::credits::checked_add(b.total_spent, charge)?;
                        sqlx::query(
                            "UPDATE wallets SET balance = $1, held = $2, total_spent = $3, updated_at = $4 WHERE wallet = $5",
                        )
                        .bind(b.balance)
                        .bind(b.held)
                        .bind(b.total_spent)
                        .bind($now)
                        .bind(wallet.as_str())
                        .execute(&mut *$tx)
                        .await?;
                        let (state, kind, logged) = match charged {
                            Some(_) => ("settled", "settle", charge),
                            None => ("released", "release", held),
                        };
                        sqlx::query(
                            "UPDATE credit_holds SET state = $1, charged = $2, closed_at = $3 WHERE id = $4",
                        )
                        .bind(state)
                        .bind(charge)
                        .bind($now)
                        .bind($hold)
                        .execute(&mut *$tx)
                        .await?;
                        ledger_insert!($tx, &wallet, kind, logged, b.balance, reference.as_deref(), $now);
                        Ok(b)
                    }
                }
            }
        }
    }};
}

/// The lease end of a hold that no lapsed-hold sweep takes: a Machines
/// order's hold, closed by the order's own state changes (and by the
/// reconciliation of orders in flight at start), however long a machine
/// takes to come up.
pub const NO_LEASE: i64 = i64::MAX;

/// `balance - amount`, or [`StoreError::InsufficientCredits`] with both
/// figures when the balance is short.
pub(super) fn take(balance: Micros, amount: Micros) -> Result<Micros> {
    balance
        .checked_sub(amount)
        .ok_or(StoreError::InsufficientCredits {
            balance,
            needed: amount,
        })
}

/// `a + b`, or [`StoreError::AmountOutOfRange`].
pub(super) fn checked_add(a: Micros, b: Micros) -> Result<Micros> {
    a.checked_add(b).ok_or(StoreError::AmountOutOfRange)
}

impl Store {
    /// The wallet's credit position (zeros when it never had credits).
    pub async fn balance(&self, wallet: &WalletId) -> Result<CreditBalance> {
        let row: Option<BalanceRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT balance, held, total_deposited, total_spent FROM wallets WHERE wallet = $1",
            )
            .bind(wallet.as_str())
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(CreditBalance::from).unwrap_or_default())
    }

    /// Add `amount` to the wallet's balance for the payment `reference` (a
    /// settlement transaction or payment id). A reference is credited once:
    /// a second call answers [`StoreError::DuplicateReference`].
    pub async fn top_up(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            top_up_in_tx!(tx, lock, wallet, amt, reference, now)
        }))
    }

    /// Spend `amount` from the wallet's balance at once (no hold). Refused
    /// with [`StoreError::InsufficientCredits`] when the balance is short.
    pub async fn debit(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let b = write_tx!(self, |tx, lock| {
            debit_in_tx!(tx, lock, wallet, amt, reference, now)
        });
        Ok(b)
    }

    /// Reserve `amount` of the wallet's balance for a metered request. The
    /// hold is later settled at the actual cost or released.
    pub async fn hold(&self, wallet: &WalletId, amount: Micros, reference: &str) -> Result<HoldId> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let lease_until = self.lease_end(now);
        let id = HoldId(uuid::Uuid::new_v4().to_string());
        let id = write_tx!(self, |tx, lock| {
            hold_in_tx!(tx, lock, wallet, amt, &id.0, reference, lease_until, now);
            id
        });
        Ok(id)
    }

    /// Close a hold, charging `charged` (at most the held amount) and
    /// returning the rest to the balance.
    pub async fn settle_hold(&self, hold: &HoldId, charged: Micros) -> Result<CreditBalance> {
        self.close_hold(hold, Some(charged), None).await
    }

    /// [`Store::settle_hold`] and the job's usage row, in one transaction:
    /// either both are written or neither is.
    pub async fn settle_hold_recording(
        &self,
        hold: &HoldId,
        charged: Micros,
        usage: &UsageRow,
    ) -> Result<CreditBalance> {
        self.close_hold(hold, Some(charged), Some(usage)).await
    }

    /// Close a hold without charging anything (the request failed).
    pub async fn release_hold(&self, hold: &HoldId) -> Result<CreditBalance> {
        self.close_hold(hold, None, None).await
    }

    /// [`Store::release_hold`] and the job's (unbilled) usage row, in one
    /// transaction.
    pub async fn release_hold_recording(
        &self,
        hold: &HoldId,
        usage: &UsageRow,
    ) -> Result<CreditBalance> {
        self.close_hold(hold, None, Some(usage)).await
    }

    /// When a lease taken or renewed at `now_ms` ends.
    pub(super) fn lease_end(&self, now_ms: i64) -> i64 {
        let lease = i64::try_from(self.hold_lease.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(lease)
    }

    /// Extend the lease of these open holds (the jobs still running here)
    /// by [`Store::hold_lease`] from now. Closed or unknown holds are
    /// skipped. Returns how many leases were extended.
    pub async fn renew_holds(&self, holds: &[HoldId]) -> Result<u64> {
        if holds.is_empty() {
            return Ok(0);
        }
        let now = self.now_ms();
        let until = self.lease_end(now);
        let mut renewed = 0;
        // Bounded statements: a few hundred ids each.
        for batch in holds.chunks(200) {
            let list = (0..batch.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE credit_holds SET lease_until = $1 WHERE state = 'held' AND id IN ({list})"
            );
            renewed += with_pool!(self, |pool| {
                let mut q = sqlx::query(&sql).bind(until);
                for h in batch {
                    q = q.bind(&h.0);
                }
                q.execute(pool).await?.rows_affected()
            });
        }
        Ok(renewed)
    }

    /// The open holds whose lease has passed (all open holds when `all`),
    /// oldest first, at most `limit`.
    pub async fn lapsed_holds(&self, all: bool, limit: u32) -> Result<Vec<HoldId>> {
        let cutoff = if all { i64::MAX } else { self.now_ms() };
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id FROM credit_holds WHERE state = 'held' \
                 AND (lease_until IS NULL OR lease_until < $1) \
                 ORDER BY created_at LIMIT $2",
            )
            .bind(cutoff)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(id,)| HoldId(id)).collect())
    }

    /// Release every open hold whose lease has passed (every open hold when
    /// `all`: a coordinator that owns the database alone, starting up, runs
    /// no job yet). A hold closed meanwhile by its job is skipped. Returns
    /// how many were released.
    pub async fn release_lapsed_holds(&self, all: bool) -> Result<u64> {
        let mut released = 0;
        loop {
            let batch = self.lapsed_holds(all, 500).await?;
            let n = batch.len();
            for hold in batch {
                match self.close_hold(&hold, None, None).await {
                    Ok(_) => released += 1,
                    Err(StoreError::HoldClosed) | Err(StoreError::UnknownHold) => {}
                    Err(e) => return Err(e),
                }
            }
            if n < 500 {
                return Ok(released);
            }
        }
    }

    /// The number of open holds and the credits they reserve, over all wallets.
    pub async fn open_holds(&self) -> Result<(u64, Micros)> {
        let (n, total): (i64, Option<i64>) = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT COUNT(*), CAST(SUM(amount) AS BIGINT) FROM credit_holds WHERE state = 'held'",
            )
            .fetch_one(pool)
            .await?
        });
        let total =
            u64::try_from(total.unwrap_or(0)).map_err(|_| StoreError::Corrupt("negative hold"))?;
        Ok((u64::try_from(n).unwrap_or(0), Micros(total)))
    }

    /// The references (job ids) of settled holds with no usage row: what
    /// §7f forbids, for an audit of the ledger.
    pub async fn settled_holds_without_usage(&self) -> Result<Vec<String>> {
        let rows: Vec<(Option<String>,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT h.reference FROM credit_holds h WHERE h.state = 'settled' \
                 AND NOT EXISTS (SELECT 1 FROM grid_usage u WHERE u.job_id = h.reference) \
                 ORDER BY h.created_at",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(r,)| r.unwrap_or_default()).collect())
    }

    async fn close_hold(
        &self,
        hold: &HoldId,
        charged: Option<Micros>,
        usage: Option<&UsageRow>,
    ) -> Result<CreditBalance> {
        let now = self.now_ms();
        let close = charged.map_or(HoldClose::Release, HoldClose::Charge);
        let b = write_tx!(self, |tx, lock| {
            let b = close_hold_in_tx!(tx, lock, hold.0.as_str(), close, now)?;
            if let Some(u) = usage {
                usage_insert!(&mut *tx, u);
            }
            b
        });
        Ok(b)
    }

    /// The wallet's ledger, newest first.
    pub async fn ledger(&self, wallet: &WalletId, limit: u32) -> Result<Vec<LedgerEntry>> {
        type Row = (i64, String, String, Micros, Micros, Option<String>, i64);
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, kind, amount, balance_after, reference, created_at \
                 FROM credit_ledger WHERE wallet = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(wallet.as_str())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, w, kind, amount, balance_after, reference, created_at_ms)| LedgerEntry {
                    id,
                    wallet: WalletId(w),
                    kind,
                    amount,
                    balance_after,
                    reference,
                    created_at_ms,
                },
            )
            .collect())
    }
}
