//! Run one test body against every reachable store backend.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sgl::store::Store;

/// The PostgreSQL the tests use (trust auth on loopback).
pub fn postgres_url() -> String {
    std::env::var("SGL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A name no other test run uses: tag, process and clock.
fn unique_name(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sgl_t_{tag}_{}_{nanos}", std::process::id())
}

/// PostgreSQL cannot be used: skip with the reason, or fail the test when
/// SGL_REQUIRE_POSTGRES=1.
fn postgres_unusable(url: &str, why: &str) {
    if std::env::var("SGL_REQUIRE_POSTGRES").as_deref() == Ok("1") {
        panic!("PostgreSQL required (SGL_REQUIRE_POSTGRES=1) but unusable at {url}: {why}");
    }
    eprintln!("skipping PostgreSQL backend: {url}: {why}");
}

/// A store under test, with whatever keeps it alive.
pub struct TestStore {
    pub store: Store,
    pub _dir: Option<tempfile::TempDir>,
    pub pg_schema: Option<String>,
}

/// A fresh SQLite store in a temp dir.
pub async fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sgl.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    TestStore {
        store,
        _dir: Some(dir),
        pg_schema: None,
    }
}

/// A fresh PostgreSQL store in its own schema, or None (with a printed
/// reason) when PostgreSQL is unreachable and not required.
pub async fn postgres_store(tag: &str) -> Option<TestStore> {
    let schema = unique_name(tag);
    let url = postgres_url();
    let opened = tokio::time::timeout(
        Duration::from_secs(10),
        Store::open_in_schema(&url, Some(&schema)),
    )
    .await;
    match opened {
        Ok(Ok(store)) => Some(TestStore {
            store,
            _dir: None,
            pg_schema: Some(schema),
        }),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
                Ok(Ok(_)) => unreachable!(),
            };
            postgres_unusable(&url, &why);
            None
        }
    }
}

/// Drop what a test store made.
pub async fn cleanup(t: TestStore) {
    t.store.close().await;
    if let Some(schema) = t.pg_schema {
        let _ = Store::drop_postgres_schema(&postgres_url(), &schema).await;
    }
}

/// Run `body` on SQLite, then on PostgreSQL when reachable.
pub async fn each_backend<F, Fut>(tag: &str, body: F)
where
    F: Fn(TestStore) -> Fut,
    Fut: Future<Output = TestStore>,
{
    let t = body(sqlite_store().await).await;
    cleanup(t).await;
    if let Some(pg) = postgres_store(tag).await {
        let t = body(pg).await;
        cleanup(t).await;
    }
}

/// A database for a coordinator process (`--database-url`): a SQLite file,
/// or a PostgreSQL database made for one test and dropped on drop.
pub struct CliDatabase {
    pub url: String,
    pub backend: &'static str,
    pg_name: Option<String>,
}

impl Drop for CliDatabase {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            let _ = std::process::Command::new("psql")
                .args([
                    &postgres_url(),
                    "-qc",
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ])
                .output();
        }
    }
}

/// The databases a process-level test runs on: SQLite in `dir`, then a
/// fresh PostgreSQL database (its own, so parallel tests never share one)
/// when PostgreSQL is reachable; with SGL_REQUIRE_POSTGRES=1 an unreachable
/// PostgreSQL fails the test instead of being skipped.
pub fn cli_databases(tag: &str, dir: &std::path::Path) -> Vec<CliDatabase> {
    let mut out = vec![CliDatabase {
        url: dir.join("coordinator.db").to_str().unwrap().to_string(),
        backend: "sqlite",
        pg_name: None,
    }];
    let name = unique_name(tag);
    let base = postgres_url();
    let made = std::process::Command::new("psql")
        .args([&base, "-qc", &format!("CREATE DATABASE {name}")])
        .output();
    match made {
        Ok(o) if o.status.success() => {
            let (prefix, _) = base
                .rsplit_once('/')
                .expect("a postgres:// URL with a database");
            out.push(CliDatabase {
                url: format!("{prefix}/{name}"),
                backend: "postgres",
                pg_name: Some(name),
            });
        }
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            postgres_unusable(&base, &why);
        }
    }
    out
}
