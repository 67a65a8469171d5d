//! Machines: one row per order (`compute_instances`) and an audit row per
//! state change (`compute_audit`).
//!
//! An order is written (`creating`) before the provider is called; its id
//! is the idempotency key. A credit-paid order holds the price in the same
//! transaction that writes it, and the hold is settled in the transaction
//! that makes the order `active`, or released in the one that makes it
//! `failed`, so the money and the order state never disagree, across a
//! crash included. Every transition is conditional on the state it leaves,
//! so two workers cannot both move one order.

use crate::money::Micros;

use super::credits::{checked_add, HoldClose, NO_LEASE};
use super::sql_money::storable;
use super::{Result, Store, StoreError, WalletId};

/// An order and the machine it became.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeOrder {
    pub id: String,
    pub owner: WalletId,
    pub provider: String,
    pub provider_instance_id: Option<String>,
    /// Public plan id (`do:`-prefixed on DigitalOcean).
    pub plan: String,
    pub region: String,
    pub os_id: u64,
    pub label: String,
    pub state: String,
    pub ip_address: Option<String>,
    /// Our hourly price of the current plan.
    pub hourly: Micros,
    /// Everything paid for this machine so far.
    pub paid: Micros,
    pub prepaid_hours: u64,
    pub disk_gb: u64,
    pub expires_at_ms: i64,
    /// `credits`, `x402-v1`, `x402-v2` or `mpp`.
    pub funding: String,
    pub hold_id: Option<String>,
    pub tx_hash: Option<String>,
    pub ssh_key: bool,
    /// A sealed root password is waiting to be read once.
    pub password_waiting: bool,
    pub password_read_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a new order records.
#[derive(Clone, Debug)]
pub struct NewComputeOrder<'a> {
    pub id: &'a str,
    pub owner: &'a WalletId,
    pub provider: &'a str,
    pub plan: &'a str,
    pub region: &'a str,
    pub os_id: u64,
    pub label: &'a str,
    pub hourly: Micros,
    pub price: Micros,
    pub prepaid_hours: u64,
    pub disk_gb: u64,
    pub expires_at_ms: i64,
    pub funding: &'a str,
    pub ssh_key: bool,
}

/// One audit row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeAudit {
    pub id: i64,
    pub instance_id: String,
    pub event: String,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub actor: String,
    pub amount: Option<Micros>,
    pub detail: String,
    pub created_at_ms: i64,
}

const COLUMNS: &str = "id, owner, provider, provider_instance_id, plan, region, os_id, label, \
    state, ip_address, hourly, paid, prepaid_hours, disk_gb, expires_at, funding, hold_id, \
    tx_hash, ssh_key, password_sealed IS NOT NULL AS pw, password_read_at, created_at, updated_at";

/// Decode a `COLUMNS` row (expanded once per backend).
macro_rules! order_from_row {
    ($row:expr) => {{
        use sqlx::Row as _;
        let r = &$row;
        let u = |v: i64| u64::try_from(v).map_err(|_| StoreError::Corrupt("negative count"));
        let pw: bool = r
            .try_get::<bool, _>("pw")
            .or_else(|_| r.try_get::<i64, _>("pw").map(|v| v != 0))?;
        ComputeOrder {
            id: r.try_get("id")?,
            owner: WalletId(r.try_get("owner")?),
            provider: r.try_get("provider")?,
            provider_instance_id: r.try_get("provider_instance_id")?,
            plan: r.try_get("plan")?,
            region: r.try_get("region")?,
            os_id: u(r.try_get("os_id")?)?,
            label: r.try_get("label")?,
            state: r.try_get("state")?,
            ip_address: r.try_get("ip_address")?,
            hourly: r.try_get("hourly")?,
            paid: r.try_get("paid")?,
            prepaid_hours: u(r.try_get("prepaid_hours")?)?,
            disk_gb: u(r.try_get("disk_gb")?)?,
            expires_at_ms: r.try_get("expires_at")?,
            funding: r.try_get("funding")?,
            hold_id: r.try_get("hold_id")?,
            tx_hash: r.try_get("tx_hash")?,
            ssh_key: r.try_get::<i64, _>("ssh_key")? != 0,
            password_waiting: pw,
            password_read_at_ms: r.try_get("password_read_at")?,
            created_at_ms: r.try_get("created_at")?,
            updated_at_ms: r.try_get("updated_at")?,
        }
    }};
}

/// Append an audit row inside `$tx`.
macro_rules! audit_insert {
    ($tx:ident, $id:expr, $event:expr, $from:expr, $to:expr, $actor:expr, $amount:expr, $detail:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO compute_audit (instance_id, event, from_state, to_state, actor, amount, detail, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($id)
        .bind($event)
        .bind($from)
        .bind($to)
        .bind($actor)
        .bind($amount)
        .bind($detail)
        .bind($now)
        .execute(&mut *$tx)
        .await?;
    };
}

/// Read (and on PostgreSQL lock) an order inside `$tx`.
macro_rules! lock_order {
    ($tx:ident, $lock:ident, $id:expr) => {{
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM compute_instances WHERE id = $1{}",
            $lock
        ))
        .bind($id)
        .fetch_optional(&mut *$tx)
        .await?;
        match row {
            Some(r) => Some(order_from_row!(r)),
            None => None,
        }
    }};
}

/// Push an order's expiry by `hours` and add `amount` to what it was paid,
/// with its audit row, inside `$tx`.
macro_rules! extend_in_tx {
    ($tx:ident, $o:expr, $hours:expr, $amount:expr, $tx_hash:expr, $actor:expr, $now:expr) => {{
        let o: &ComputeOrder = $o;
        let hours: u64 = $hours;
        let amount: Micros = $amount;
        let tx_hash: Option<&str> = $tx_hash;
        let add_ms = i64::try_from(hours)
            .ok()
            .and_then(|h| h.checked_mul(3_600_000))
            .ok_or(StoreError::AmountOutOfRange)?;
        // Extending an expired-but-not-yet-reaped machine starts from now.
        let base = o.expires_at_ms.max($now);
        let expires = base
            .checked_add(add_ms)
            .ok_or(StoreError::AmountOutOfRange)?;
        let paid = checked_add(o.paid, amount)?;
        let prepaid = i64::try_from(o.prepaid_hours.saturating_add(hours))
            .map_err(|_| StoreError::AmountOutOfRange)?;
        sqlx::query(
            "UPDATE compute_instances SET expires_at = $1, paid = $2, prepaid_hours = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(expires)
        .bind(paid)
        .bind(prepaid)
        .bind($now)
        .bind(o.id.as_str())
        .execute(&mut *$tx)
        .await?;
        let detail = match tx_hash {
            Some(t) => format!("extended by {hours} h, payment {t}"),
            None => format!("extended by {hours} h with credits"),
        };
        audit_insert!($tx, o.id.as_str(), "extended", Some(o.state.as_str()), Some(o.state.as_str()), $actor, Some(amount), detail, $now);
    }};
}

/// The hold id of an order paid with credits.
pub fn hold_id_of(order_id: &str) -> String {
    format!("compute:{order_id}")
}

impl Store {
    /// Write a new order (`creating`). With `hold_from`, the price is held
    /// from that wallet's credits in the same transaction; a short balance
    /// is [`StoreError::InsufficientCredits`] and writes nothing.
    pub async fn compute_create_order(
        &self,
        o: &NewComputeOrder<'_>,
        hold_from: Option<&WalletId>,
        actor: &str,
    ) -> Result<()> {
        let price = storable(o.price)?;
        let hourly = storable(o.hourly)?;
        let hours = i64::try_from(o.prepaid_hours).map_err(|_| StoreError::AmountOutOfRange)?;
        let os_id = i64::try_from(o.os_id).map_err(|_| StoreError::AmountOutOfRange)?;
        let disk = i64::try_from(o.disk_gb).map_err(|_| StoreError::AmountOutOfRange)?;
        let now = self.now_ms();
        let hold_id = hold_from.map(|_| hold_id_of(o.id));
        write_tx!(self, |tx, lock| {
            if let (Some(wallet), Some(hold)) = (hold_from, &hold_id) {
                // The credits hold path, with no lease: only this order's
                // state changes close it.
                hold_in_tx!(
                    tx,
                    lock,
                    wallet,
                    price,
                    hold.as_str(),
                    hold.as_str(),
                    NO_LEASE,
                    now
                );
            }
            sqlx::query(
                "INSERT INTO compute_instances (id, owner, provider, plan, region, os_id, label, state, \
                 hourly, paid, prepaid_hours, disk_gb, expires_at, funding, hold_id, ssh_key, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'creating', $8, $9, $10, $11, $12, $13, $14, $15, $16, $16)",
            )
            .bind(o.id)
            .bind(o.owner.as_str())
            .bind(o.provider)
            .bind(o.plan)
            .bind(o.region)
            .bind(os_id)
            .bind(o.label)
            .bind(hourly)
            .bind(price)
            .bind(hours)
            .bind(disk)
            .bind(o.expires_at_ms)
            .bind(o.funding)
            .bind(hold_id.as_deref())
            .bind(i64::from(o.ssh_key))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let detail = format!(
                "{} {} in {}, {} h prepaid by {}",
                o.provider, o.plan, o.region, o.prepaid_hours, o.funding
            );
            audit_insert!(
                tx,
                o.id,
                "ordered",
                None::<&str>,
                Some("creating"),
                actor,
                Some(price),
                detail,
                now
            );
        });
        Ok(())
    }

    /// The provider accepted the order: `creating` → `provisioning`, with
    /// its machine id and the sealed root password, if any. False when the
    /// order was not `creating`.
    pub async fn compute_mark_provisioning(
        &self,
        id: &str,
        provider_instance_id: &str,
        password_sealed: Option<&str>,
        actor: &str,
    ) -> Result<bool> {
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let _ = lock;
            let n = sqlx::query(
                "UPDATE compute_instances SET state = 'provisioning', provider_instance_id = $1, \
                 password_sealed = $2, updated_at = $3 WHERE id = $4 AND state = 'creating'",
            )
            .bind(provider_instance_id)
            .bind(password_sealed)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                let detail = format!("provider accepted: machine {provider_instance_id}");
                audit_insert!(
                    tx,
                    id,
                    "accepted",
                    Some("creating"),
                    Some("provisioning"),
                    actor,
                    None::<Micros>,
                    detail,
                    now
                );
            }
            n == 1
        }))
    }

    /// A per-request payment for the order settled.
    pub async fn compute_record_payment(
        &self,
        id: &str,
        tx_hash: &str,
        amount: Micros,
        actor: &str,
    ) -> Result<()> {
        let now = self.now_ms();
        write_tx!(self, |tx, lock| {
            let _ = lock;
            sqlx::query("UPDATE compute_instances SET tx_hash = $1, updated_at = $2 WHERE id = $3")
                .bind(tx_hash)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let detail = format!("payment settled: {tx_hash}");
            audit_insert!(
                tx,
                id,
                "paid",
                None::<&str>,
                None::<&str>,
                actor,
                Some(amount),
                detail,
                now
            );
        });
        Ok(())
    }

    /// The machine runs: `provisioning` → `active` at `ip`, charging the
    /// order's credit hold in the same transaction. False when the order
    /// was not `provisioning`.
    pub async fn compute_activate(&self, id: &str, ip: &str, actor: &str) -> Result<bool> {
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let Some(o) = lock_order!(tx, lock, id) else {
                return Ok(false);
            };
            if o.state != "provisioning" {
                return Ok(false);
            }
            if let Some(hold) = &o.hold_id {
                // A hold already closed (by an earlier attempt) charges
                // nothing again.
                let _ = close_hold_in_tx!(tx, lock, hold.as_str(), HoldClose::ChargeAll, now);
            }
            sqlx::query(
                "UPDATE compute_instances SET state = 'active', ip_address = $1, updated_at = $2 WHERE id = $3",
            )
            .bind(ip)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let charged = o.hold_id.as_ref().map(|_| o.paid);
            let detail = format!("active at {ip}");
            audit_insert!(
                tx,
                id,
                "active",
                Some("provisioning"),
                Some("active"),
                actor,
                charged,
                detail,
                now
            );
            true
        }))
    }

    /// The order failed before it became active: `creating`/`provisioning`
    /// → `failed`. A credit hold is released whole; a settled payment
    /// (`refund_payment`) is refunded whole to the owner's credits. Both in
    /// the same transaction as the state change. The amount returned, or
    /// None when the order was not in flight.
    pub async fn compute_fail(
        &self,
        id: &str,
        refund_payment: bool,
        actor: &str,
        detail: &str,
    ) -> Result<Option<Micros>> {
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let Some(o) = lock_order!(tx, lock, id) else {
                return Ok(None);
            };
            if o.state != "creating" && o.state != "provisioning" {
                return Ok(None);
            }
            let mut returned = Micros::ZERO;
            if let Some(hold) = &o.hold_id {
                if close_hold_in_tx!(tx, lock, hold.as_str(), HoldClose::Release, now).is_ok() {
                    returned = o.paid;
                }
            } else if refund_payment {
                let reference = format!("compute-refund:{id}");
                let amt = o.paid;
                let wallet = o.owner.clone();
                top_up_in_tx!(tx, lock, &wallet, amt, reference.as_str(), now);
                returned = o.paid;
            }
            sqlx::query(
                "UPDATE compute_instances SET state = 'failed', password_sealed = NULL, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let event = if returned > Micros::ZERO {
                "refunded"
            } else {
                "failed"
            };
            audit_insert!(
                tx,
                id,
                event,
                Some(o.state.as_str()),
                Some("failed"),
                actor,
                Some(returned),
                detail,
                now
            );
            Some(returned)
        }))
    }

    pub async fn compute_order(&self, id: &str) -> Result<Option<ComputeOrder>> {
        let q = format!("SELECT {COLUMNS} FROM compute_instances WHERE id = $1");
        Ok(with_pool!(self, |pool| {
            match sqlx::query(&q).bind(id).fetch_optional(pool).await? {
                Some(r) => Some(order_from_row!(r)),
                None => None,
            }
        }))
    }

    /// A wallet's orders, newest first.
    pub async fn compute_orders_of(&self, owner: &WalletId) -> Result<Vec<ComputeOrder>> {
        let q = format!(
            "SELECT {COLUMNS} FROM compute_instances WHERE owner = $1 ORDER BY created_at DESC, id"
        );
        Ok(with_pool!(self, |pool| {
            let rows = sqlx::query(&q).bind(owner.as_str()).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(order_from_row!(r));
            }
            out
        }))
    }

    /// Orders in flight (`creating` or `provisioning`), oldest first.
    pub async fn compute_in_flight(&self) -> Result<Vec<ComputeOrder>> {
        let q = format!(
            "SELECT {COLUMNS} FROM compute_instances WHERE state IN ('creating', 'provisioning') \
             ORDER BY created_at, id"
        );
        Ok(with_pool!(self, |pool| {
            let rows = sqlx::query(&q).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(order_from_row!(r));
            }
            out
        }))
    }

    /// Active orders whose prepaid time ended before `cutoff_ms`.
    pub async fn compute_expired(&self, cutoff_ms: i64) -> Result<Vec<ComputeOrder>> {
        let q = format!(
            "SELECT {COLUMNS} FROM compute_instances WHERE state = 'active' AND expires_at < $1 \
             ORDER BY expires_at, id"
        );
        Ok(with_pool!(self, |pool| {
            let rows = sqlx::query(&q).bind(cutoff_ms).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(order_from_row!(r));
            }
            out
        }))
    }

    /// Take the sealed root password (once): it is erased in the same
    /// transaction. None when there is none waiting.
    pub async fn compute_take_password(&self, id: &str, actor: &str) -> Result<Option<String>> {
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let row: Option<(Option<String>, String)> = sqlx::query_as(&format!(
                "SELECT password_sealed, state FROM compute_instances WHERE id = $1{lock}"
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some((Some(sealed), state)) => {
                    sqlx::query(
                        "UPDATE compute_instances SET password_sealed = NULL, password_read_at = $1, \
                         updated_at = $1 WHERE id = $2",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    audit_insert!(
                        tx,
                        id,
                        "password_read",
                        Some(state.as_str()),
                        Some(state.as_str()),
                        actor,
                        None::<Micros>,
                        "root password read once and erased",
                        now
                    );
                    Some(sealed)
                }
                _ => None,
            }
        }))
    }

    /// Extend an active order by `hours`, paid with the owner's credits
    /// (debited in the same transaction). Refused with
    /// [`StoreError::InsufficientCredits`] when short; None when the
    /// order is not active.
    pub async fn compute_extend_with_credits(
        &self,
        id: &str,
        wallet: &WalletId,
        hours: u64,
        amount: Micros,
        actor: &str,
    ) -> Result<Option<ComputeOrder>> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let updated = write_tx!(self, |tx, lock| {
            let Some(o) = lock_order!(tx, lock, id) else {
                return Ok(None);
            };
            if o.state != "active" {
                return Ok(None);
            }
            let reference = format!("compute-extend:{id}");
            debit_in_tx!(tx, lock, wallet, amt, reference.as_str(), now);
            extend_in_tx!(tx, &o, hours, amt, None, actor, now);
            true
        });
        if updated {
            self.compute_order(id).await
        } else {
            Ok(None)
        }
    }

    /// Extend an order by `hours` after a per-request payment settled.
    pub async fn compute_extend_paid(
        &self,
        id: &str,
        hours: u64,
        amount: Micros,
        tx_hash: &str,
        actor: &str,
    ) -> Result<Option<ComputeOrder>> {
        let amt = storable(amount)?;
        let now = self.now_ms();
        let found = write_tx!(self, |tx, lock| {
            let Some(o) = lock_order!(tx, lock, id) else {
                return Ok(None);
            };
            extend_in_tx!(tx, &o, hours, amt, Some(tx_hash), actor, now);
            true
        });
        if found {
            self.compute_order(id).await
        } else {
            Ok(None)
        }
    }

    /// Record a resize: the new plan, its hourly price and disk, and the
    /// recomputed expiry. False when the order is not active.
    #[allow(clippy::too_many_arguments)]
    pub async fn compute_resize(
        &self,
        id: &str,
        plan: &str,
        hourly: Micros,
        disk_gb: u64,
        expires_at_ms: i64,
        actor: &str,
        detail: &str,
    ) -> Result<bool> {
        let hourly = storable(hourly)?;
        let disk = i64::try_from(disk_gb).map_err(|_| StoreError::AmountOutOfRange)?;
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let _ = lock;
            let n = sqlx::query(
                "UPDATE compute_instances SET plan = $1, hourly = $2, disk_gb = $3, expires_at = $4, \
                 updated_at = $5 WHERE id = $6 AND state = 'active'",
            )
            .bind(plan)
            .bind(hourly)
            .bind(disk)
            .bind(expires_at_ms)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                audit_insert!(
                    tx,
                    id,
                    "resized",
                    Some("active"),
                    Some("active"),
                    actor,
                    None::<Micros>,
                    detail,
                    now
                );
            }
            n == 1
        }))
    }

    /// The machine is gone: `active`/`provisioning` → `to_state`
    /// (`destroyed` or `expired`); an unread password is erased. False when
    /// it was not running.
    pub async fn compute_end(
        &self,
        id: &str,
        to_state: &str,
        actor: &str,
        detail: &str,
    ) -> Result<bool> {
        let now = self.now_ms();
        Ok(write_tx!(self, |tx, lock| {
            let Some(o) = lock_order!(tx, lock, id) else {
                return Ok(false);
            };
            if o.state != "active" && o.state != "provisioning" {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE compute_instances SET state = $1, password_sealed = NULL, updated_at = $2 WHERE id = $3",
            )
            .bind(to_state)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            audit_insert!(
                tx,
                id,
                to_state,
                Some(o.state.as_str()),
                Some(to_state),
                actor,
                None::<Micros>,
                detail,
                now
            );
            true
        }))
    }

    /// Add an audit row outside a state change (an operator note, a
    /// reconciliation finding).
    pub async fn compute_note(
        &self,
        id: &str,
        event: &str,
        actor: &str,
        detail: &str,
    ) -> Result<()> {
        let now = self.now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO compute_audit (instance_id, event, from_state, to_state, actor, amount, detail, created_at) \
                 VALUES ($1, $2, NULL, NULL, $3, NULL, $4, $5)",
            )
            .bind(id)
            .bind(event)
            .bind(actor)
            .bind(detail)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// An order's audit trail, oldest first.
    pub async fn compute_audit(&self, id: &str) -> Result<Vec<ComputeAudit>> {
        type Row = (
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            Option<Micros>,
            String,
            i64,
        );
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, instance_id, event, from_state, to_state, actor, amount, detail, created_at \
                 FROM compute_audit WHERE instance_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, instance_id, event, from_state, to_state, actor, amount, detail, at)| {
                    ComputeAudit {
                        id,
                        instance_id,
                        event,
                        from_state,
                        to_state,
                        actor,
                        amount,
                        detail,
                        created_at_ms: at,
                    }
                },
            )
            .collect())
    }
}
