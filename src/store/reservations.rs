//! Credit reservations: one leased hold per (process, wallet) that a
//! process spends from in memory ([`crate::payments::reservations`]), and
//! the batched settlement that charges it.
//!
//! A reservation is an ordinary row of `credit_holds` (state `held`, with a
//! lease), so everything that keeps holds honest keeps it honest too: the
//! wallet's `held` includes it, its lease is renewed by
//! [`Store::renew_holds`], and [`Store::release_lapsed_holds`] returns it
//! whole to the balance when the process that took it stops renewing it.
//! What changes is that the row's `amount` moves: [`Store::open_block`] and
//! [`Store::grow_block`] move credits from the balance into it, and
//! [`Store::settle_blocks`] moves the cost of finished jobs out of it into
//! `total_spent`, each job with its `settle` ledger row and its usage row,
//! all in one transaction. Every commit therefore leaves
//! `deposited = balance + held + spent`, and every charged job has its usage
//! row (a reservation is closed `released`, never `settled`, so the audit of
//! settled holds without a usage row still applies to per-request holds).

use crate::money::Micros;

use super::credits::{checked_add, BalanceRow, HoldClose, NewLedgerRow};
use super::sql_money::storable;
use super::{CreditBalance, HoldId, Result, Store, StoreError, UsageRow, WalletId};

/// The most a reservation request may ask for in one go. Amounts are
/// bounded by `i64` in the database; this keeps the arithmetic far from it.
const MAX_BLOCK: Micros = Micros(1 << 60);

/// One finished job's charge against a reservation, for
/// [`Store::settle_blocks`].
#[derive(Clone, Debug)]
pub struct BlockCharge {
    /// The reservation the job was admitted against.
    pub hold: HoldId,
    pub wallet: WalletId,
    /// What the job costs (zero: only its usage row is written).
    pub charged: Micros,
    /// The job (its ledger rows' reference).
    pub reference: String,
    /// The job's usage row, priced at `charged`.
    pub usage: Option<UsageRow>,
}

/// What [`Store::settle_blocks`] did with one [`BlockCharge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockSettled {
    /// Charged from the reservation; the wallet's position after.
    Charged(CreditBalance),
    /// The reservation had been closed meanwhile (its lease lapsed):
    /// charged from the balance instead; the wallet's position after.
    Debited(CreditBalance),
    /// Nothing to charge: only the usage row was written.
    Recorded,
    /// The reservation was gone and the balance could not pay: nothing was
    /// written for this job.
    Refused,
}

impl Store {
    /// Open a reservation of `wallet`: move up to `want` (at least `need`)
    /// from its balance into a new leased hold whose reference is
    /// `reference`. Returns the hold and what it took; a balance below
    /// `need` is [`StoreError::InsufficientCredits`] and changes nothing.
    pub async fn open_block(
        &self,
        wallet: &WalletId,
        want: Micros,
        need: Micros,
        reference: &str,
    ) -> Result<(HoldId, Micros)> {
        let (want, need) = block_bounds(want, need)?;
        let now = self.now_ms();
        let lease_until = self.lease_end(now);
        let id = HoldId(uuid::Uuid::new_v4().to_string());
        let taken = write_tx!(self, |tx, lock| {
            let b = lock_wallet!(tx, lock, wallet);
            let taken = want.min(b.balance);
            if taken < need {
                return Err(StoreError::InsufficientCredits {
                    balance: b.balance,
                    needed: need,
                });
            }
            hold_in_tx!(tx, lock, wallet, taken, &id.0, reference, lease_until, now);
            taken
        });
        Ok((id, taken))
    }

    /// Move up to `want` (at least `need`) more of the wallet's balance into
    /// its open reservation `hold`. Returns what it took.
    /// [`StoreError::HoldClosed`] or [`StoreError::UnknownHold`] when the
    /// reservation is no longer open (its lease lapsed), and
    /// [`StoreError::InsufficientCredits`] when the balance is short; both
    /// change nothing.
    pub async fn grow_block(
        &self,
        hold: &HoldId,
        wallet: &WalletId,
        want: Micros,
        need: Micros,
    ) -> Result<Micros> {
        let (want, need) = block_bounds(want, need)?;
        let now = self.now_ms();
        let taken = write_tx!(self, |tx, lock| {
            // The hold first, then the wallet: the order every hold close
            // takes, so two of them never wait on each other.
            let row: Option<(String, String, Option<String>)> = sqlx::query_as(&format!(
                "SELECT wallet, state, reference FROM credit_holds WHERE id = $1{lock}"
            ))
            .bind(&hold.0)
            .fetch_optional(&mut *tx)
            .await?;
            let reference = match row {
                None => return Err(StoreError::UnknownHold),
                Some((w, _, _)) if w != wallet.as_str() => return Err(StoreError::UnknownHold),
                Some((_, state, _)) if state != "held" => return Err(StoreError::HoldClosed),
                Some((_, _, reference)) => reference,
            };
            let mut b = lock_wallet!(tx, lock, wallet);
            let taken = want.min(b.balance);
            if taken < need {
                return Err(StoreError::InsufficientCredits {
                    balance: b.balance,
                    needed: need,
                });
            }
            b.balance = Micros(b.balance.0 - taken.0);
            b.held = checked_add(b.held, taken)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, held = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(b.balance)
            .bind(b.held)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE credit_holds SET amount = amount + $1 WHERE id = $2")
                .bind(taken)
                .bind(&hold.0)
                .execute(&mut *tx)
                .await?;
            ledger_insert!(
                tx,
                wallet,
                "hold",
                taken,
                b.balance,
                reference.as_deref(),
                now
            );
            taken
        });
        Ok(taken)
    }

    /// Charge finished jobs against their reservations and give back the
    /// reservations in `give_back`, in one transaction. Per reservation,
    /// the sum of its jobs' costs leaves the hold and the wallet's `held`
    /// for its `total_spent`, and each job gets its `settle` ledger row and
    /// its usage row. A job whose reservation is no longer open (it lapsed
    /// and was released) is charged from the balance instead (a `debit`
    /// row), or, when the balance is short, [`BlockSettled::Refused`] with
    /// nothing written: a job is never charged more than the wallet has.
    /// A reservation given back returns what is left of it to the balance
    /// (a `release` row) and closes; one already closed is skipped.
    ///
    /// `Err` (a database failure, or a usage row already written) rolls the
    /// whole batch back: nothing of it was written.
    pub async fn settle_blocks(
        &self,
        items: &[BlockCharge],
        give_back: &[HoldId],
    ) -> Result<Vec<BlockSettled>> {
        for it in items {
            storable(it.charged)?;
        }
        let now = self.now_ms();
        // Reservations in wallet order, so that two processes settling the
        // same wallets lock them in the same order.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| {
            (items[a].wallet.as_str(), items[a].hold.0.as_str())
                .cmp(&(items[b].wallet.as_str(), items[b].hold.0.as_str()))
        });
        let mut groups: Vec<&[usize]> = Vec::new();
        let mut rest = order.as_slice();
        while let Some(&first) = rest.first() {
            let n = rest
                .iter()
                .take_while(|&&i| {
                    items[i].wallet == items[first].wallet && items[i].hold == items[first].hold
                })
                .count();
            groups.push(&rest[..n]);
            rest = &rest[n..];
        }
        let out = write_tx!(self, |tx, lock| {
            let mut out = vec![BlockSettled::Refused; items.len()];
            // The batch's rows, written together after the balance moves:
            // two statements for the batch rather than two a job.
            let mut ledger: Vec<NewLedgerRow<'_>> = Vec::with_capacity(items.len());
            let mut usage: Vec<&UsageRow> = Vec::with_capacity(items.len());
            for group in &groups {
                let first = &items[group[0]];
                let mut total = Micros::ZERO;
                for &i in group.iter() {
                    total = checked_add(total, items[i].charged)?;
                }
                // The whole group from its reservation, when it is open and
                // covers it (it always does while its process is alive: the
                // process never admits more than the hold it took).
                let mut from_hold: Option<CreditBalance> = None;
                if total > Micros::ZERO {
                    let n = sqlx::query(
                        "UPDATE credit_holds SET amount = amount - $1 \
                         WHERE id = $2 AND state = 'held' AND amount >= $1",
                    )
                    .bind(total)
                    .bind(&first.hold.0)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 1 {
                        let row: Option<BalanceRow> = sqlx::query_as(
                            "UPDATE wallets SET held = held - $1, total_spent = total_spent + $1, \
                             updated_at = $2 WHERE wallet = $3 AND held >= $1 \
                             RETURNING balance, held, total_deposited, total_spent",
                        )
                        .bind(total)
                        .bind(now)
                        .bind(first.wallet.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                        let b = row.ok_or(StoreError::Corrupt(
                            "a reservation above its wallet's held credits",
                        ))?;
                        from_hold = Some(CreditBalance::from(b));
                    }
                }
                for &i in group.iter() {
                    let it = &items[i];
                    let settled = if it.charged == Micros::ZERO {
                        BlockSettled::Recorded
                    } else if let Some(b) = from_hold {
                        ledger.push(NewLedgerRow {
                            wallet: &it.wallet,
                            kind: "settle",
                            amount: it.charged,
                            balance_after: b.balance,
                            reference: &it.reference,
                        });
                        BlockSettled::Charged(b)
                    } else {
                        let row: Option<BalanceRow> = sqlx::query_as(
                            "UPDATE wallets SET balance = balance - $1, \
                             total_spent = total_spent + $1, updated_at = $2 \
                             WHERE wallet = $3 AND balance >= $1 \
                             RETURNING balance, held, total_deposited, total_spent",
                        )
                        .bind(it.charged)
                        .bind(now)
                        .bind(it.wallet.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                        match row.map(CreditBalance::from) {
                            Some(b) => {
                                ledger.push(NewLedgerRow {
                                    wallet: &it.wallet,
                                    kind: "debit",
                                    amount: it.charged,
                                    balance_after: b.balance,
                                    reference: &it.reference,
                                });
                                BlockSettled::Debited(b)
                            }
                            None => BlockSettled::Refused,
                        }
                    };
                    if settled != BlockSettled::Refused {
                        if let Some(u) = &it.usage {
                            usage.push(u);
                        }
                    }
                    out[i] = settled;
                }
            }
            ledger_insert_many!(tx, &ledger, now);
            usage_insert_many!(tx, &usage);
            for hold in give_back {
                let closed: Result<CreditBalance> =
                    close_hold_in_tx!(tx, lock, hold.0.as_str(), HoldClose::Release, now);
                match closed {
                    Ok(_) | Err(StoreError::HoldClosed) | Err(StoreError::UnknownHold) => {}
                    Err(e) => return Err(e),
                }
            }
            out
        });
        Ok(out)
    }

    /// The open reservations whose reference starts with `prefix`, with
    /// their wallet and amount (tests and audits).
    pub async fn open_blocks(&self, prefix: &str) -> Result<Vec<(HoldId, WalletId, Micros)>> {
        let pattern = format!("{}%", prefix.replace(['%', '_'], ""));
        let rows: Vec<(String, String, Micros)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, amount FROM credit_holds \
                 WHERE state = 'held' AND reference LIKE $1 ORDER BY created_at",
            )
            .bind(&pattern)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, w, a)| (HoldId(id), WalletId(w), a))
            .collect())
    }
}

/// `want` raised to at least `need`, both within [`MAX_BLOCK`].
fn block_bounds(want: Micros, need: Micros) -> Result<(Micros, Micros)> {
    if need > MAX_BLOCK {
        return Err(StoreError::AmountOutOfRange);
    }
    Ok((want.min(MAX_BLOCK).max(need), need))
}
