//! Database access: one [`Store`] over SQLite (a file in WAL mode, the
//! embedded default) or PostgreSQL (a `postgres://` URL, for several
//! coordinator replicas sharing one ledger), with migrations for both
//! (`migrations/sqlite`, `migrations/postgres`, embedded in the binary).
//!
//! Owns: the credit balances and their ledger, credit holds
//! ([`credits`]), API key hashes ([`api_keys`]), the single-use records
//! that make payments and signed requests unreplayable ([`payments`]:
//! EIP-3009 authorization nonces, X-Auth nonces, MPP challenge ids), the
//! coordinator's tables ([`grid`]), operator payouts and earnings
//! ([`payouts`]) and the Machines API's orders and their audit trail
//! ([`compute`]). It knows nothing of HTTP or signatures:
//! callers hand it normalised, already-verified values.
//!
//! Money is [`Micros`] in rows and signatures alike (integer micro-USD,
//! stored as a non-negative `BIGINT`; `sql_money` converts at the
//! driver). Every balance change happens in one transaction together with
//! its ledger row. Debits run under a row lock on PostgreSQL (`SELECT … FOR
//! UPDATE`) and in a serialised write transaction on SQLite (`BEGIN
//! IMMEDIATE`), and the schema's `CHECK (balance >= 0)` backs both up: a
//! balance never goes negative. Timestamps come from the store's
//! [`Clock`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::clock::Clock;
use crate::money::Micros;

#[macro_use]
mod tx;
pub mod api_keys;
#[macro_use]
pub mod credits;
pub mod compute;
pub mod grid;
mod grid_state;
#[macro_use]
pub mod job_refunds;
pub mod job_payments;
mod migrate;
pub mod payments;
pub mod payouts;
pub mod replica;
pub mod reservations;
mod sql_money;

pub use api_keys::ApiKeyRecord;
pub use compute::{ComputeAudit, ComputeOrder, NewComputeOrder};
pub use credits::{CreditBalance, HoldId, LedgerEntry};
pub use grid::UsageRow;
pub use job_payments::JobPayment;
pub use job_refunds::JobRefund;
pub use payments::{PaymentNonceKey, PendingPayment};
pub use payouts::{EarningsRow, MarkPaidRefused, PayoutBatch, PayoutLine};
pub use reservations::{BlockCharge, BlockSettled};

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url (use a SQLite path, sqlite:… or postgres://…)")]
    UnsupportedUrl,
    #[error("coordinator replicas need a PostgreSQL database")]
    NeedsPostgres,
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

/// The database. Cheap to clone (a pool handle and a clock).
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    clock: Clock,
    /// How long a credit hold stays open without a renewal (see
    /// [`Store::renew_holds`]).
    hold_lease: Duration,
}

/// The default lease of a credit hold: long enough that a renewal every
/// third of it survives a slow database, short enough that the money of a
/// crashed coordinator's jobs comes back within minutes.
pub const DEFAULT_HOLD_LEASE: Duration = Duration::from_secs(60);

/// Create a missing SQLite file readable by its owner only (it holds the
/// ledger and API key hashes); SQLite gives its `-wal` and `-shm` files the
/// same mode. An empty file is a valid empty database.
fn create_private(path: &std::path::Path) -> Result<()> {
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" || path.exists() {
        return Ok(());
    }
    crate::private_file::create_empty(path).map_err(|e| StoreError::Io(std::io::Error::other(e)))
}

/// A schema name that can be spliced into a statement: `[a-z_][a-z0-9_]*`.
fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit()
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
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(open_postgres(url, schema).await?)
        } else {
            Backend::Sqlite(open_sqlite(url).await?)
        };
        Ok(Store {
            backend,
            clock: Clock::system(),
            hold_lease: DEFAULT_HOLD_LEASE,
        })
    }

    /// The same database, its credit holds leased for `lease` (at least one
    /// second) instead of [`DEFAULT_HOLD_LEASE`].
    pub fn with_hold_lease(self, lease: Duration) -> Store {
        Store {
            hold_lease: lease.max(Duration::from_secs(1)),
            ..self
        }
    }

    /// How long a credit hold stays open without a renewal.
    pub fn hold_lease(&self) -> Duration {
        self.hold_lease
    }

    /// The same database, its timestamps read from `clock`.
    pub fn with_clock(self, clock: Clock) -> Store {
        Store { clock, ..self }
    }

    /// The clock the store stamps rows with.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
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
}

async fn open_postgres(url: &str, schema: Option<&str>) -> Result<PgPool> {
    let mut opts = PgConnectOptions::from_str(url)?;
    if let Some(schema) = schema {
        if !valid_schema(schema) {
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
        // A transaction whose COMMIT or ROLLBACK failed (the server went
        // away, its disk filled) can leave the connection inside a
        // transaction; such a connection is closed, never reused, so the
        // store recovers by itself once the database does.
        .after_release(|conn, _| {
            Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
        })
        .connect_with(opts)
        .await?;
    Migrator::new(migrate::postgres()).await?.run(&pool).await?;
    Ok(pool)
}

async fn open_sqlite(url: &str) -> Result<SqlitePool> {
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
        // After a failed COMMIT (a full disk: SQLite may already have rolled
        // the transaction back, so the driver's ROLLBACK fails too) the
        // connection keeps a non-zero transaction depth and every later
        // `BEGIN` on it is refused. Such a connection is closed instead of
        // going back to the pool. The ping runs behind the rollback a dropped
        // transaction queued, so the depth read after it is settled.
        .after_release(|conn, _| {
            Box::pin(async move {
                sqlx::Connection::ping(conn).await?;
                Ok(!sqlx::Connection::is_in_transaction(conn))
            })
        })
        .connect_with(opts)
        .await?;
    Migrator::new(migrate::sqlite()).await?.run(&pool).await?;
    Ok(pool)
}
