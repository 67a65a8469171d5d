//! Database access: SQLite (embedded default) and PostgreSQL (several
//! coordinator replicas sharing one ledger), with migrations for both.
