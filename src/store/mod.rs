//! Database access: one [`Store`] over SQLite (a file in WAL mode, the
//! embedded default) or PostgreSQL (a `postgres://` URL, for several
//! coordinator replicas sharing one ledger), with migrations for both
//! (`migrations/sqlite`, `migrations/postgres`, embedded in the binary).
//!
//! Owns: the credit balances and their ledger, credit holds, API key hashes,
//! and the single-use records that make payments and signed requests
//! unreplayable (EIP-3009 authorization nonces, X-Auth nonces, MPP challenge
//! ids). It knows nothing of HTTP or signatures: callers hand it normalised,
//! already-verified values.
//!
//! Money is [`Micros`] (integer micro-USD, which is also one USDC base unit).
//! Every balance change happens in one transaction together with its ledger
//! row. Debits run under a row lock on PostgreSQL (`SELECT … FOR UPDATE`) and
//! in a serialised write transaction on SQLite (`BEGIN IMMEDIATE`), and the
//! schema's `CHECK (balance >= 0)` backs both up: a balance never goes
//! negative.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// An amount of money in micro-USD (10⁻⁶ USD). USDC has 6 decimals, so one
/// micro-USD is also one USDC base unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub u64);

impl Micros {
    pub const ZERO: Micros = Micros(0);
    /// One US dollar.
    pub const USD: Micros = Micros(1_000_000);

    /// The amount as the signed integer the database stores.
    fn to_db(self) -> Result<i64, StoreError> {
        i64::try_from(self.0).map_err(|_| StoreError::AmountOutOfRange)
    }

    fn from_db(v: i64) -> Result<Micros, StoreError> {
        u64::try_from(v)
            .map(Micros)
            .map_err(|_| StoreError::Corrupt("negative amount"))
    }

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).map(Micros)
    }

    pub fn checked_sub(self, other: Micros) -> Option<Micros> {
        self.0.checked_sub(other.0).map(Micros)
    }

    /// Parse a decimal USD amount ("1", "1.5", "0.000001") exactly. More than
    /// six decimals, signs, exponents and empty parts are refused: no
    /// rounding ever happens on a money path.
    pub fn parse_usd(s: &str) -> Option<Micros> {
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        if int.is_empty()
            || int.len() > 12
            || frac.len() > 6
            || (s.contains('.') && frac.is_empty())
        {
            return None;
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let whole: u64 = int.parse().ok()?;
        let mut micros: u64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            micros += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
        }
        whole
            .checked_mul(1_000_000)?
            .checked_add(micros)
            .map(Micros)
    }

    /// The amount as a decimal USD string with two to six decimals
    /// ("150.00", "0.000123").
    pub fn to_usd_string(self) -> String {
        let whole = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        let mut f = format!("{frac:06}");
        while f.len() > 2 && f.ends_with('0') {
            f.pop();
        }
        format!("{whole}.{f}")
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} µUSD", self.0)
    }
}

/// The owner of a credit balance and of API keys: a normalised wallet
/// address (EVM: lowercase `0x…`; Solana: the base58 public key as given).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WalletId(String);

impl WalletId {
    /// Wrap an address the caller has already normalised and checked.
    pub fn new_unchecked(normalised: impl Into<String>) -> Self {
        WalletId(normalised.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WalletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a credit hold (a UUID).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HoldId(pub String);

/// The replay key of an EIP-3009 authorization: (chain id, asset, from,
/// nonce), addresses and nonce as lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PaymentNonceKey {
    pub chain_id: u64,
    pub asset: String,
    pub payer: String,
    pub nonce: String,
}

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

/// One row of the credit ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub wallet: WalletId,
    /// `topup`, `debit`, `hold`, `settle` or `release`.
    pub kind: String,
    pub amount: Micros,
    pub balance_after: Micros,
    pub reference: Option<String>,
    pub created_at_ms: i64,
}

/// A stored API key (never the key itself: only its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub wallet: WalletId,
    pub label: String,
    pub key_hash: [u8; 32],
    pub key_last4: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A payment whose nonce was reserved and is waiting for settlement.
#[derive(Clone, Debug)]
pub struct PendingPayment<'a> {
    pub key: &'a PaymentNonceKey,
    /// `x402-v1`, `x402-v2` or `mpp`.
    pub scheme: &'a str,
    pub resource: &'a str,
    /// Decimal base units (may exceed 64 bits on the wire; stored as text).
    pub amount: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url (use a SQLite path, sqlite:… or postgres://…)")]
    UnsupportedUrl,
    #[error("invalid schema name")]
    InvalidSchema,
    #[error("insufficient credits: balance {balance}, needed {needed}")]
    InsufficientCredits { balance: Micros, needed: Micros },
    #[error("amount out of range")]
    AmountOutOfRange,
    #[error("unknown credit hold")]
    UnknownHold,
    #[error("credit hold already closed")]
    HoldClosed,
    #[error("charge {charged} exceeds the hold of {held}")]
    ChargeExceedsHold { charged: Micros, held: Micros },
    #[error("this payment reference was already credited")]
    DuplicateReference,
    #[error("corrupt row: {0}")]
    Corrupt(&'static str),
    #[error("cannot create the database file: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The database. Cheap to clone (a pool handle).
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

/// Migrations compiled into the binary, one folder per backend.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "payments",
        include_str!("../../migrations/sqlite/0001_payments.sql"),
    ),
    (
        2,
        "grid",
        include_str!("../../migrations/sqlite/0002_grid.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "payments",
        include_str!("../../migrations/postgres/0001_payments.sql"),
    ),
    (
        2,
        "grid",
        include_str!("../../migrations/postgres/0002_grid.sql"),
    ),
];

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> futures_core_compat::BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(v, d, sql)| {
                    Migration::new(
                        *v,
                        Cow::Borrowed(*d),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// `MigrationSource::resolve` returns sqlx's boxed future type; spelled out
/// here so the store needs no extra futures crate.
mod futures_core_compat {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

/// Run `$body` inside one write transaction. `$tx` is the transaction and
/// `$lock` the row-lock suffix for `SELECT`s of rows about to change
/// (`" FOR UPDATE"` on PostgreSQL; empty on SQLite, where `BEGIN IMMEDIATE`
/// already serialises writers). An early `return`/`?` drops the transaction,
/// which rolls it back. The body is expanded once per backend, so it is
/// type-checked against each driver.
macro_rules! write_tx {
    ($store:expr, |$tx:ident, $lock:ident| $body:block) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let $lock = "";
                let out = $body;
                $tx.commit().await?;
                out
            }
            Backend::Postgres(pool) => {
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
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

mod grid;
pub use grid::UsageRow;

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
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::DuplicateReference,
            _ => StoreError::Database(e),
        })?;
    };
}

/// Read (and on PostgreSQL lock) a wallet row inside `$tx`; a wallet that
/// never had credits reads as zeros.
macro_rules! lock_wallet {
    ($tx:ident, $lock:ident, $wallet:expr) => {{
        let row: Option<(i64, i64, i64, i64)> = sqlx::query_as(&format!(
            "SELECT balance, held, total_deposited, total_spent FROM wallets WHERE wallet = $1{}",
            $lock
        ))
        .bind($wallet.as_str())
        .fetch_optional(&mut *$tx)
        .await?;
        row.unwrap_or((0, 0, 0, 0))
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
        let (balance, held, dep, spent) = lock_wallet!($tx, $lock, $wallet);
        let new_balance = balance.checked_add($amt).ok_or(StoreError::AmountOutOfRange)?;
        let new_dep = dep.checked_add($amt).ok_or(StoreError::AmountOutOfRange)?;
        sqlx::query(
            "UPDATE wallets SET balance = $1, total_deposited = $2, updated_at = $3 WHERE wallet = $4",
        )
        .bind(new_balance)
        .bind(new_dep)
        .bind($now)
        .bind($wallet.as_str())
        .execute(&mut *$tx)
        .await?;
        ledger_insert!($tx, $wallet, "topup", $amt, new_balance, Some($reference), $now);
        balance_from_row((new_balance, held, new_dep, spent))
    }};
}

/// Create a missing SQLite file readable by its owner only (it holds the
/// ledger and API key hashes); SQLite gives its `-wal` and `-shm` files the
/// same mode. An empty file is a valid empty database.
fn create_private(path: &std::path::Path) -> Result<()> {
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" || path.exists() {
        return Ok(());
    }
    crate::private_file::create_empty(path).map_err(|e| StoreError::Io(std::io::Error::other(e)))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open the database named by `url` and run its migrations.
    ///
    /// - `postgres://…` / `postgresql://…`: PostgreSQL.
    /// - `sqlite:…`, `sqlite://…`, or a plain file path: SQLite, created if
    ///   missing, in WAL mode.
    pub async fn open(url: &str) -> Result<Store> {
        Self::open_in_schema(url, None).await
    }

    /// Like [`Store::open`]; on PostgreSQL, use (and create) `schema` instead
    /// of the default search path, so several stores can share one database
    /// (tests, or one coordinator deployment per schema). Ignored on SQLite.
    pub async fn open_in_schema(url: &str, schema: Option<&str>) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut opts = PgConnectOptions::from_str(url)?;
            if let Some(schema) = schema {
                let valid = !schema.is_empty()
                    && schema.len() <= 63
                    && schema
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && !schema.as_bytes()[0].is_ascii_digit();
                if !valid {
                    return Err(StoreError::InvalidSchema);
                }
                // The name was checked to be [a-z_][a-z0-9_]*, so it can be
                // spliced into the statement.
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(opts.clone())
                    .await?;
                sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                opts = opts.options([("search_path", schema)]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await?;
            Migrator::new(Embedded(POSTGRES_MIGRATIONS))
                .await?
                .run(&pool)
                .await?;
            return Ok(Store {
                backend: Backend::Postgres(pool),
            });
        }
        let opts = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)?
        } else if url.contains("://") {
            return Err(StoreError::UnsupportedUrl);
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        create_private(opts.get_filename())?;
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        Migrator::new(Embedded(SQLITE_MIGRATIONS))
            .await?
            .run(&pool)
            .await?;
        Ok(Store {
            backend: Backend::Sqlite(pool),
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Close the pool, waiting for connections to finish.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(p) => p.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }

    /// Drop a PostgreSQL schema made by [`Store::open_in_schema`] (tests clean
    /// up with this). Connects afresh; the store itself must be closed first.
    pub async fn drop_postgres_schema(url: &str, schema: &str) -> Result<()> {
        if !schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(StoreError::InvalidSchema);
        }
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(PgConnectOptions::from_str(url)?)
            .await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok(())
    }

    // ---- credits ---------------------------------------------------------

    /// The wallet's credit position (zeros when it never had credits).
    pub async fn balance(&self, wallet: &WalletId) -> Result<CreditBalance> {
        let row: Option<(i64, i64, i64, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT balance, held, total_deposited, total_spent FROM wallets WHERE wallet = $1",
            )
            .bind(wallet.as_str())
            .fetch_optional(pool)
            .await?
        });
        row.map(balance_from_row)
            .transpose()
            .map(Option::unwrap_or_default)
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
        let amt = amount.to_db()?;
        let now = now_ms();
        write_tx!(self, |tx, lock| {
            top_up_in_tx!(tx, lock, wallet, amt, reference, now)
        })
    }

    /// Spend `amount` from the wallet's balance at once (no hold). Refused
    /// with [`StoreError::InsufficientCredits`] when the balance is short.
    pub async fn debit(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance> {
        let amt = amount.to_db()?;
        let now = now_ms();
        write_tx!(self, |tx, lock| {
            let (balance, held, dep, spent) = lock_wallet!(tx, lock, wallet);
            if balance < amt {
                return Err(StoreError::InsufficientCredits {
                    balance: Micros::from_db(balance)?,
                    needed: amount,
                });
            }
            let new_balance = balance - amt;
            let new_spent = spent.checked_add(amt).ok_or(StoreError::AmountOutOfRange)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, total_spent = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(new_balance)
            .bind(new_spent)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            ledger_insert!(tx, wallet, "debit", amt, new_balance, Some(reference), now);
            balance_from_row((new_balance, held, dep, new_spent))
        })
    }

    /// Reserve `amount` of the wallet's balance for a metered request. The
    /// hold is later settled at the actual cost or released.
    pub async fn hold(&self, wallet: &WalletId, amount: Micros, reference: &str) -> Result<HoldId> {
        let amt = amount.to_db()?;
        let now = now_ms();
        let id = HoldId(uuid::Uuid::new_v4().to_string());
        let id = write_tx!(self, |tx, lock| {
            let (balance, held, _dep, _spent) = lock_wallet!(tx, lock, wallet);
            if balance < amt {
                return Err(StoreError::InsufficientCredits {
                    balance: Micros::from_db(balance)?,
                    needed: amount,
                });
            }
            let new_balance = balance - amt;
            let new_held = held.checked_add(amt).ok_or(StoreError::AmountOutOfRange)?;
            sqlx::query(
                "UPDATE wallets SET balance = $1, held = $2, updated_at = $3 WHERE wallet = $4",
            )
            .bind(new_balance)
            .bind(new_held)
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
            ledger_insert!(tx, wallet, "hold", amt, new_balance, Some(reference), now);
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
        let now = now_ms();
        write_tx!(self, |tx, lock| {
            let row: Option<(String, i64, String, Option<String>)> = sqlx::query_as(&format!(
                "SELECT wallet, amount, state, reference FROM credit_holds WHERE id = $1{lock}"
            ))
            .bind(&hold.0)
            .fetch_optional(&mut *tx)
            .await?;
            let (wallet, amount, state, reference) = row.ok_or(StoreError::UnknownHold)?;
            if state != "held" {
                return Err(StoreError::HoldClosed);
            }
            let charge = match charged {
                Some(c) => {
                    let c = c.to_db()?;
                    if c > amount {
                        return Err(StoreError::ChargeExceedsHold {
                            charged: Micros::from_db(c)?,
                            held: Micros::from_db(amount)?,
                        });
                    }
                    c
                }
                None => 0,
            };
            let wallet = WalletId(wallet);
            let (balance, held, dep, spent) = lock_wallet!(tx, lock, &wallet);
            let new_held = held - amount;
            if new_held < 0 {
                return Err(StoreError::Corrupt("held below zero"));
            }
            let new_balance = balance + (amount - charge);
            let new_spent = spent + charge;
            sqlx::query(
                "UPDATE wallets SET balance = $1, held = $2, total_spent = $3, updated_at = $4 WHERE wallet = $5",
            )
            .bind(new_balance)
            .bind(new_held)
            .bind(new_spent)
            .bind(now)
            .bind(wallet.as_str())
            .execute(&mut *tx)
            .await?;
            let (state, kind) = if charged.is_some() {
                ("settled", "settle")
            } else {
                ("released", "release")
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
            let amount_logged = if charged.is_some() { charge } else { amount };
            ledger_insert!(
                tx,
                &wallet,
                kind,
                amount_logged,
                new_balance,
                reference.as_deref(),
                now
            );
            balance_from_row((new_balance, new_held, dep, new_spent))
        })
    }

    /// The wallet's ledger, newest first.
    pub async fn ledger(&self, wallet: &WalletId, limit: u32) -> Result<Vec<LedgerEntry>> {
        type Row = (i64, String, String, i64, i64, Option<String>, i64);
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
        rows.into_iter()
            .map(|(id, w, kind, amount, after, reference, at)| {
                Ok(LedgerEntry {
                    id,
                    wallet: WalletId(w),
                    kind,
                    amount: Micros::from_db(amount)?,
                    balance_after: Micros::from_db(after)?,
                    reference,
                    created_at_ms: at,
                })
            })
            .collect()
    }

    // ---- API keys -------------------------------------------------------

    /// Store a new API key's hash.
    pub async fn insert_api_key(
        &self,
        wallet: &WalletId,
        label: &str,
        key_hash: &[u8; 32],
        key_last4: &str,
    ) -> Result<ApiKeyRecord> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, wallet, label, key_hash, key_last4, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(wallet.as_str())
            .bind(label)
            .bind(&key_hash[..])
            .bind(key_last4)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(ApiKeyRecord {
            id,
            wallet: wallet.clone(),
            label: label.to_owned(),
            key_hash: *key_hash,
            key_last4: key_last4.to_owned(),
            created_at_ms: now,
            revoked_at_ms: None,
        })
    }

    /// The wallet's keys (revoked ones included), oldest first.
    pub async fn list_api_keys(&self, wallet: &WalletId) -> Result<Vec<ApiKeyRecord>> {
        let rows: Vec<KeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, label, key_hash, key_last4, created_at, revoked_at \
                 FROM api_keys WHERE wallet = $1 ORDER BY created_at, id",
            )
            .bind(wallet.as_str())
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(key_from_row).collect()
    }

    /// The active (unrevoked) key with this hash. The lookup is by an
    /// indexed hash of a 256-bit secret, so its timing reveals nothing
    /// useful; the caller still compares the hash in constant time.
    pub async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>> {
        let row: Option<KeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, label, key_hash, key_last4, created_at, revoked_at \
                 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .bind(&key_hash[..])
            .fetch_optional(pool)
            .await?
        });
        row.map(key_from_row).transpose()
    }

    /// Revoke one of the wallet's keys. False when the wallet has no such
    /// active key.
    pub async fn revoke_api_key(&self, wallet: &WalletId, id: &str) -> Result<bool> {
        let now = now_ms();
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND wallet = $3 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .bind(wallet.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    // ---- single-use records ---------------------------------------------

    /// Reserve an EIP-3009 authorization's nonce before settling it. False
    /// when the key is already pending or settled (a replay). The insert is
    /// the atomic step: of any number of concurrent presentations exactly
    /// one wins.
    pub async fn reserve_payment_nonce(&self, p: &PendingPayment<'_>) -> Result<bool> {
        let chain = i64::try_from(p.key.chain_id).map_err(|_| StoreError::AmountOutOfRange)?;
        let now = now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO payment_nonces (chain_id, asset, payer, nonce, state, scheme, resource, amount, created_at) \
                 VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(chain)
            .bind(&p.key.asset)
            .bind(&p.key.payer)
            .bind(&p.key.nonce)
            .bind(p.scheme)
            .bind(p.resource)
            .bind(p.amount)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Mark a reserved nonce settled, recording the settlement reference,
    /// and in the same transaction credit `credit` (a top-up), if given.
    pub async fn settle_payment_nonce(
        &self,
        key: &PaymentNonceKey,
        transaction: &str,
        credit: Option<(&WalletId, Micros)>,
    ) -> Result<Option<CreditBalance>> {
        let chain = i64::try_from(key.chain_id).map_err(|_| StoreError::AmountOutOfRange)?;
        let now = now_ms();
        // The top-up reference is the replay key, so a credit can never be
        // applied twice for one authorization.
        let reference = format!(
            "eip3009:{}:{}:{}:{}",
            key.chain_id, key.asset, key.payer, key.nonce
        );
        let credit = match credit {
            Some((w, a)) => Some((w, a.to_db()?)),
            None => None,
        };
        let out = write_tx!(self, |tx, lock| {
            let n = sqlx::query(
                "UPDATE payment_nonces SET state = 'settled', transaction_ref = $1, settled_at = $2 \
                 WHERE chain_id = $3 AND asset = $4 AND payer = $5 AND nonce = $6 AND state = 'pending'",
            )
            .bind(transaction)
            .bind(now)
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                return Err(StoreError::Corrupt("payment nonce not pending"));
            }
            match credit {
                Some((wallet, amt)) => Some(top_up_in_tx!(tx, lock, wallet, amt, &reference, now)?),
                None => None,
            }
        });
        Ok(out)
    }

    /// Forget a reserved, unsettled nonce (the facilitator refused or
    /// failed): the payment consumed nothing and may be presented again.
    pub async fn release_payment_nonce(&self, key: &PaymentNonceKey) -> Result<()> {
        let chain = i64::try_from(key.chain_id).map_err(|_| StoreError::AmountOutOfRange)?;
        with_pool!(self, |pool| {
            sqlx::query(
                "DELETE FROM payment_nonces WHERE chain_id = $1 AND asset = $2 AND payer = $3 \
                 AND nonce = $4 AND state = 'pending'",
            )
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The settlement state of a payment nonce: None, "pending" or "settled".
    pub async fn payment_nonce_state(&self, key: &PaymentNonceKey) -> Result<Option<String>> {
        let chain = i64::try_from(key.chain_id).map_err(|_| StoreError::AmountOutOfRange)?;
        let row: Option<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT state FROM payment_nonces WHERE chain_id = $1 AND asset = $2 AND payer = $3 AND nonce = $4",
            )
            .bind(chain)
            .bind(&key.asset)
            .bind(&key.payer)
            .bind(&key.nonce)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|r| r.0))
    }

    /// Consume an X-Auth nonce. False when it was already used. Expired
    /// nonces are pruned on the way (a nonce only has to be remembered
    /// while its timestamp is inside the acceptance window).
    pub async fn consume_auth_nonce(
        &self,
        chain: &str,
        address: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> Result<bool> {
        let now = now_ms();
        let n = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM auth_nonces WHERE expires_at < $1")
                .bind(now)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO auth_nonces (chain, address, nonce, expires_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(chain)
            .bind(address)
            .bind(nonce)
            .bind(expires_at_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Reserve an MPP challenge id for one credential. False when it is
    /// already pending or used.
    pub async fn reserve_mpp_challenge(&self, id: &str, expires_at_ms: i64) -> Result<bool> {
        let now = now_ms();
        let n = with_pool!(self, |pool| {
            // An expired challenge is refused before the store is asked, so
            // its id need not be remembered any longer.
            sqlx::query("DELETE FROM mpp_challenges WHERE expires_at < $1")
                .bind(now)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO mpp_challenges (id, state, expires_at, created_at) VALUES ($1, 'pending', $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(expires_at_ms)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Mark a reserved MPP challenge id used for good.
    pub async fn confirm_mpp_challenge(&self, id: &str) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query("UPDATE mpp_challenges SET state = 'used' WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Forget a pending MPP challenge id (settlement failed; nothing consumed).
    pub async fn release_mpp_challenge(&self, id: &str) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM mpp_challenges WHERE id = $1 AND state = 'pending'")
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}

type KeyRow = (String, String, String, Vec<u8>, String, i64, Option<i64>);

fn key_from_row(r: KeyRow) -> Result<ApiKeyRecord> {
    let (id, wallet, label, hash, last4, created, revoked) = r;
    let key_hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt("api key hash length"))?;
    Ok(ApiKeyRecord {
        id,
        wallet: WalletId(wallet),
        label,
        key_hash,
        key_last4: last4,
        created_at_ms: created,
        revoked_at_ms: revoked,
    })
}

fn balance_from_row(r: (i64, i64, i64, i64)) -> Result<CreditBalance> {
    Ok(CreditBalance {
        balance: Micros::from_db(r.0)?,
        held: Micros::from_db(r.1)?,
        total_deposited: Micros::from_db(r.2)?,
        total_spent: Micros::from_db(r.3)?,
    })
}
