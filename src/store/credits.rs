//! Credits: each wallet's balance, its ledger, and holds (credits reserved
//! for a metered request, later settled at the actual cost or released).
//!
//! Every balance change is one transaction with its ledger row; amounts are
//! [`Micros`] with checked arithmetic, and the schema refuses a negative
//! balance as a last line.

use crate::money::Micros;

use super::sql_money::storable;
use super::{Result, Store, StoreError, WalletId};

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

/// Append one ledger row inside the transaction `$tx`. A second top-up with
/// the same reference trips the ledger's unique index.
macro_rules! ledger_insert {
    ($tx:ident, $wallet:expr, $kind:expr, $amount:expr, $after:expr, $reference:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO credit_ledger (wallet, kind, amount, balance_after, reference, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
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

/// The body of a top-up inside `$tx`: creates the wallet row if needed,
/// adds `$amt`, writes the ledger row; evaluates to the new position.
macro_rules! top_up_in_tx {
    ($tx:ident, $lock:ident, $wallet:expr, $amt:expr, $reference:expr, $now:expr) => {{
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
        ledger_insert!($tx, $wallet, "topup", $amt, b.balance, Some($reference), $now);
        b
    }};
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
            let mut b = lock_wallet!(tx, lock, wallet);
            b.balance = b
                .balance
                .checked_sub(amt)
                .ok_or(StoreError::InsufficientCredits {
                    balance: b.balance,
                    needed: amount,
                })?;
            b.total_spent = checked_add(b.total_spent, amt)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, total_spent = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(b.balance)
            .bind(b.total_spent)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            ledger_insert!(tx, wallet, "debit", amt, b.balance, Some(reference), now);
            b
        });
        Ok(b)
    }

    /// Reserve `amount` of the wallet's balance for a metered request. The
    /// hold is later settled at the actual cost or released.
    pub async fn hold(&self, wallet: &WalletId, amount: Micros, reference: &str) -> Result<HoldId> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let id = HoldId(uuid::Uuid::new_v4().to_string());
        let id = write_tx!(self, |tx, lock| {
            let mut b = lock_wallet!(tx, lock, wallet);
            b.balance = b
                .balance
                .checked_sub(amt)
                .ok_or(StoreError::InsufficientCredits {
                    balance: b.balance,
                    needed: amount,
                })?;
            b.held = checked_add(b.held, amt)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, held = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(b.balance)
            .bind(b.held)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO credit_holds (id, wallet, amount, state, reference, created_at) \
                 VALUES ($1, $2, $3, 'held', $4, $5)",
            )
            .bind(&id.0)
            .bind(wallet.as_str())
            .bind(amt)
            .bind(reference)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            ledger_insert!(tx, wallet, "hold", amt, b.balance, Some(reference), now);
            id
        });
        Ok(id)
    }

    /// Close a hold, charging `charged` (at most the held amount) and
    /// returning the rest to the balance.
    pub async fn settle_hold(&self, hold: &HoldId, charged: Micros) -> Result<CreditBalance> {
        self.close_hold(hold, Some(charged)).await
    }

    /// Close a hold without charging anything (the request failed).
    pub async fn release_hold(&self, hold: &HoldId) -> Result<CreditBalance> {
        self.close_hold(hold, None).await
    }

    async fn close_hold(&self, hold: &HoldId, charged: Option<Micros>) -> Result<CreditBalance> {
        let now = self.now_ms();
        let b = write_tx!(self, |tx, lock| {
            let row: Option<(String, Micros, String, Option<String>)> = sqlx::query_as(&format!(
                "SELECT wallet, amount, state, reference FROM credit_holds WHERE id = $1{lock}"
            ))
            .bind(&hold.0)
            .fetch_optional(&mut *tx)
            .await?;
            let (wallet, held, state, reference) = row.ok_or(StoreError::UnknownHold)?;
            if state != "held" {
                return Err(StoreError::HoldClosed);
            }
            let charge = charged.unwrap_or(Micros::ZERO);
            let refund = held
                .checked_sub(charge)
                .ok_or(StoreError::ChargeExceedsHold {
                    charged: charge,
                    held,
                })?;
            let wallet = WalletId(wallet);
            let mut b = lock_wallet!(tx, lock, &wallet);
            b.held = b
                .held
                .checked_sub(held)
                .ok_or(StoreError::Corrupt("held below zero"))?;
            b.balance = checked_add(b.balance, refund)?;
            b.total_spent = checked_add(b.total_spent, charge)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, held = $2, total_spent = $3, updated_at = $4 WHERE wallet = $5",
            )
            .bind(b.balance)
            .bind(b.held)
            .bind(b.total_spent)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
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
            .bind(now)
            .bind(&hold.0)
            .execute(&mut *tx)
            .await?;
            ledger_insert!(
                tx,
                &wallet,
                kind,
                logged,
                b.balance,
                reference.as_deref(),
                now
            );
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
