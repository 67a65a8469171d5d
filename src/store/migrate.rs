//! The migrations compiled into the binary, one folder per backend
//! (`migrations/sqlite`, `migrations/postgres`), as a sqlx
//! [`MigrationSource`].

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// Version, description and SQL of each migration, oldest first.
#[derive(Debug)]
pub(super) struct Embedded(&'static [(i64, &'static str, &'static str)]);

const SQLITE: &[(i64, &str, &str)] = &[
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
    (
        3,
        "operators",
        include_str!("../../migrations/sqlite/0003_operators.sql"),
    ),
    (
        4,
        "hold_leases",
        include_str!("../../migrations/sqlite/0004_hold_leases.sql"),
    ),
    (
        5,
        "compute",
        include_str!("../../migrations/sqlite/0005_compute.sql"),
    ),
    (
        6,
        "job payments",
        include_str!("../../migrations/sqlite/0006_job_payments.sql"),
    ),
    (
        7,
        "job refunds",
        include_str!("../../migrations/sqlite/0007_job_refunds.sql"),
    ),
    (
        8,
        "replicas",
        include_str!("../../migrations/sqlite/0008_replicas.sql"),
    ),
];
const POSTGRES: &[(i64, &str, &str)] = &[
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
    (
        3,
        "operators",
        include_str!("../../migrations/postgres/0003_operators.sql"),
    ),
    (
        4,
        "hold_leases",
        include_str!("../../migrations/postgres/0004_hold_leases.sql"),
    ),
    (
        5,
        "compute",
        include_str!("../../migrations/postgres/0005_compute.sql"),
    ),
    (
        6,
        "job payments",
        include_str!("../../migrations/postgres/0006_job_payments.sql"),
    ),
    (
        7,
        "job refunds",
        include_str!("../../migrations/postgres/0007_job_refunds.sql"),
    ),
    (
        8,
        "replicas",
        include_str!("../../migrations/postgres/0008_replicas.sql"),
    ),
];

pub(super) fn sqlite() -> Embedded {
    Embedded(SQLITE)
}

pub(super) fn postgres() -> Embedded {
    Embedded(POSTGRES)
}

/// `MigrationSource::resolve` returns sqlx's boxed future type; spelled out
/// here so the store needs no extra futures crate.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
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
