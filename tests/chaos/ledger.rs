//! The money checks every chaos test ends with (PROTOCOL.md §7f "Holds
//! always end"): no hold left `held`, every settled hold has its usage row,
//! `deposited = balance + held + spent`, and what the payer's balance lost
//! is exactly the sum of its usage rows.
#![cfg(feature = "coordinator")]

use std::time::{Duration, Instant};

use sgl::money::Micros;
use sgl::store::{Store, WalletId};

/// Open the coordinator's database from the test.
pub async fn open(db: &str) -> Store {
    Store::open(db).await.unwrap()
}

/// Wait (at most `limit`) until no credit hold is open: the coordinator
/// releases them at start-up (SQLite) or once their lease lapses.
pub async fn wait_no_open_holds(store: &Store, limit: Duration) {
    let start = Instant::now();
    loop {
        let (n, amount) = store.open_holds().await.unwrap();
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{n} credit holds ({amount}) still held after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The checks, for a payer whose balance was `deposited` before any job and
/// who spent nothing but grid jobs. Returns the number of billed jobs.
pub async fn audit(store: &Store, payer: &str, deposited: Micros) -> usize {
    let (open, held) = store.open_holds().await.unwrap();
    assert_eq!((open, held), (0, Micros::ZERO), "holds left held");
    let orphans = store.settled_holds_without_usage().await.unwrap();
    assert!(
        orphans.is_empty(),
        "settled holds without a usage row: {orphans:?}"
    );
    let b = store
        .balance(&WalletId::new_unchecked(payer))
        .await
        .unwrap();
    assert_eq!(b.total_deposited, deposited);
    assert_eq!(
        b.total_deposited.0,
        b.balance.0 + b.held.0 + b.total_spent.0,
        "deposited != balance + held + spent: {b:?}"
    );
    let rows = store.usage_rows(100_000).await.unwrap();
    let billed: Vec<_> = rows
        .iter()
        .filter(|r| r.payer_wallet.as_deref() == Some(payer))
        .collect();
    let sum: u64 = billed.iter().map(|r| r.cost.0).sum();
    assert_eq!(
        deposited.0 - b.balance.0,
        sum,
        "the balance fell by other than the sum of the usage rows"
    );
    assert_eq!(b.total_spent.0, sum);
    billed.iter().filter(|r| r.cost > Micros::ZERO).count()
}
