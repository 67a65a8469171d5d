//! The store on both backends: SQLite (a temp file, WAL) and PostgreSQL
//! (127.0.0.1:5432, database `test`, a fresh schema per store). PostgreSQL is
//! skipped with a message when unreachable, unless SGL_REQUIRE_POSTGRES=1.
#![cfg(feature = "store")]

use crate::pay_common;

use std::sync::Arc;

use pay_common::stores::{each_backend, TestStore};
use sgl::money::Micros;
use sgl::store::{PaymentNonceKey, PendingPayment, StoreError, WalletId};

fn wallet(s: &str) -> WalletId {
    WalletId::new_unchecked(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_up_and_debit_are_exact_and_never_negative() {
    each_backend("topup", |t: TestStore| async move {
        let s = &t.store;
        let w = wallet("0xaaaa000000000000000000000000000000000001");
        assert_eq!(s.balance(&w).await.unwrap().balance, Micros::ZERO);
        let b = s.top_up(&w, Micros(1_500_000), "tx-1").await.unwrap();
        assert_eq!(b.balance, Micros(1_500_000));
        assert_eq!(b.total_deposited, Micros(1_500_000));
        // The same payment reference is never credited twice.
        assert!(matches!(
            s.top_up(&w, Micros(1_500_000), "tx-1").await,
            Err(StoreError::DuplicateReference)
        ));
        let b = s.debit(&w, Micros(1_234_567), "job-1").await.unwrap();
        assert_eq!(b.balance, Micros(265_433));
        assert_eq!(b.total_spent, Micros(1_234_567));
        match s.debit(&w, Micros(265_434), "job-2").await {
            Err(StoreError::InsufficientCredits { balance, needed }) => {
                assert_eq!(balance, Micros(265_433));
                assert_eq!(needed, Micros(265_434));
            }
            other => panic!("overdraw allowed: {other:?}"),
        }
        let b = s.debit(&w, Micros(265_433), "job-3").await.unwrap();
        assert_eq!(b.balance, Micros::ZERO);
        // A wallet that never had credits cannot be debited.
        assert!(matches!(
            s.debit(&wallet("nobody"), Micros(1), "x").await,
            Err(StoreError::InsufficientCredits { .. })
        ));
        let ledger = s.ledger(&w, 10).await.unwrap();
        let kinds: Vec<_> = ledger.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["debit", "debit", "topup"]);
        assert_eq!(ledger[0].balance_after, Micros::ZERO);
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_settle_at_actual_cost_or_release() {
    each_backend("holds", |t: TestStore| async move {
        let s = &t.store;
        let w = wallet("0xbbbb000000000000000000000000000000000002");
        s.top_up(&w, Micros(1_000_000), "dep").await.unwrap();
        let h1 = s.hold(&w, Micros(600_000), "job-a").await.unwrap();
        let b = s.balance(&w).await.unwrap();
        assert_eq!((b.balance, b.held), (Micros(400_000), Micros(600_000)));
        // The rest of the balance cannot be held twice.
        assert!(matches!(
            s.hold(&w, Micros(400_001), "job-b").await,
            Err(StoreError::InsufficientCredits { .. })
        ));
        assert!(matches!(
            s.settle_hold(&h1, Micros(600_001)).await,
            Err(StoreError::ChargeExceedsHold { .. })
        ));
        let b = s.settle_hold(&h1, Micros(123_456)).await.unwrap();
        assert_eq!(b.balance, Micros(876_544));
        assert_eq!(b.held, Micros::ZERO);
        assert_eq!(b.total_spent, Micros(123_456));
        assert!(matches!(
            s.release_hold(&h1).await,
            Err(StoreError::HoldClosed)
        ));
        let h2 = s.hold(&w, Micros(876_544), "job-c").await.unwrap();
        let b = s.release_hold(&h2).await.unwrap();
        assert_eq!((b.balance, b.held), (Micros(876_544), Micros::ZERO));
        assert_eq!(b.total_spent, Micros(123_456));
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_debits_never_overdraw() {
    each_backend("race", |t: TestStore| async move {
        let s = Arc::new(t.store.clone());
        let w = wallet("0xcccc000000000000000000000000000000000003");
        s.top_up(&w, Micros(1_000_000), "dep").await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..100 {
            let s = s.clone();
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    s.debit(&w, Micros(30_000), &format!("d{i}"))
                        .await
                        .map(|_| ())
                } else {
                    s.hold(&w, Micros(30_000), &format!("h{i}"))
                        .await
                        .map(|_| ())
                }
            }));
        }
        let mut ok = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::InsufficientCredits { .. }) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        // 1_000_000 / 30_000 = 33 whole debits fit, and no more.
        assert_eq!(ok, 33);
        let b = s.balance(&w).await.unwrap();
        assert_eq!(b.balance.0 + b.held.0 + b.total_spent.0, 1_000_000);
        assert_eq!(b.balance, Micros(10_000));
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn payment_nonce_is_consumed_once_under_concurrency() {
    each_backend("nonce", |t: TestStore| async move {
        let s = Arc::new(t.store.clone());
        let key = PaymentNonceKey {
            chain_id: 8453,
            asset: "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913".into(),
            payer: "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266".into(),
            nonce: format!("0x{}", "ab".repeat(32)),
        };
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let s = s.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                s.reserve_payment_nonce(&PendingPayment {
                    key: &key,
                    scheme: "x402-v2",
                    resource: "https://x/y",
                    amount: "1000000",
                })
                .await
                .unwrap()
            }));
        }
        let mut won = 0;
        for task in tasks {
            won += usize::from(task.await.unwrap());
        }
        assert_eq!(won, 1);
        // A failed settlement gives the nonce back.
        s.release_payment_nonce(&key).await.unwrap();
        assert_eq!(s.payment_nonce_state(&key).await.unwrap(), None);
        let p = PendingPayment {
            key: &key,
            scheme: "x402-v2",
            resource: "https://x/y",
            amount: "1000000",
        };
        assert!(s.reserve_payment_nonce(&p).await.unwrap());
        let w = wallet(&key.payer);
        let b = s
            .settle_payment_nonce(&key, "0xfeed", Some((&w, Micros(1_000_000))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.balance, Micros(1_000_000));
        assert_eq!(
            s.payment_nonce_state(&key).await.unwrap().as_deref(),
            Some("settled")
        );
        // Settled nonces are never released or reserved again.
        s.release_payment_nonce(&key).await.unwrap();
        assert!(!s.reserve_payment_nonce(&p).await.unwrap());
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_nonces_and_mpp_challenges_are_single_use() {
    each_backend("single", |t: TestStore| async move {
        let s = &t.store;
        let far = i64::MAX / 2;
        assert!(s
            .consume_auth_nonce("base", "0xabc", "n1", far)
            .await
            .unwrap());
        assert!(!s
            .consume_auth_nonce("base", "0xabc", "n1", far)
            .await
            .unwrap());
        assert!(s
            .consume_auth_nonce("base", "0xabd", "n1", far)
            .await
            .unwrap());
        assert!(s.reserve_mpp_challenge("id-1", far).await.unwrap());
        assert!(!s.reserve_mpp_challenge("id-1", far).await.unwrap());
        s.release_mpp_challenge("id-1").await.unwrap();
        assert!(s.reserve_mpp_challenge("id-1", far).await.unwrap());
        s.confirm_mpp_challenge("id-1").await.unwrap();
        s.release_mpp_challenge("id-1").await.unwrap();
        assert!(!s.reserve_mpp_challenge("id-1", far).await.unwrap());
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_are_stored_hashed_and_revocable() {
    each_backend("keys", |t: TestStore| async move {
        let s = &t.store;
        let w = wallet("0xdddd000000000000000000000000000000000004");
        let other = wallet("0xeeee000000000000000000000000000000000005");
        let h = [7u8; 32];
        let rec = s.insert_api_key(&w, "agent", &h, "wxyz").await.unwrap();
        assert_eq!(s.find_api_key(&h).await.unwrap().unwrap().wallet, w);
        assert_eq!(s.list_api_keys(&w).await.unwrap().len(), 1);
        assert!(s.list_api_keys(&other).await.unwrap().is_empty());
        // Another wallet cannot revoke it.
        assert!(!s.revoke_api_key(&other, &rec.id).await.unwrap());
        assert!(s.revoke_api_key(&w, &rec.id).await.unwrap());
        assert!(!s.revoke_api_key(&w, &rec.id).await.unwrap());
        assert!(s.find_api_key(&h).await.unwrap().is_none());
        let listed = s.list_api_keys(&w).await.unwrap();
        assert!(listed[0].revoked_at_ms.is_some());
        t
    })
    .await;
}

#[test]
fn usd_amounts_parse_exactly() {
    assert_eq!(Micros::parse_usd("1"), Some(Micros(1_000_000)));
    assert_eq!(Micros::parse_usd("1.5"), Some(Micros(1_500_000)));
    assert_eq!(Micros::parse_usd("0.000001"), Some(Micros(1)));
    assert_eq!(Micros::parse_usd("0.0000001"), None);
    assert_eq!(Micros::parse_usd("-1"), None);
    assert_eq!(Micros::parse_usd("1e3"), None);
    assert_eq!(Micros::parse_usd("1."), None);
    assert_eq!(Micros::parse_usd(".5"), None);
    assert_eq!(Micros(150_000_000).to_usd_string(), "150.00");
    assert_eq!(Micros(123).to_usd_string(), "0.000123");
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_file_is_private_and_reopens() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let p = path.to_str().unwrap();
    let store = sgl::store::Store::open(p).await.unwrap();
    let w = wallet("0xffff000000000000000000000000000000000006");
    store.top_up(&w, Micros(7), "r").await.unwrap();
    store.close().await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Migrations are idempotent and the data survives a reopen.
    let store = sgl::store::Store::open(&format!("sqlite://{p}"))
        .await
        .unwrap();
    assert_eq!(store.balance(&w).await.unwrap().balance, Micros(7));
    assert!(matches!(
        sgl::store::Store::open("mysql://x").await,
        Err(StoreError::UnsupportedUrl)
    ));
}

/// A usage row for `job`, as the coordinator writes it (cost set by the store
/// call that settles).
fn usage_row(job: &str, payer: &WalletId) -> sgl::store::UsageRow {
    sgl::store::UsageRow {
        job_id: job.into(),
        node_id: "node".into(),
        operator_wallet: "0xoperator".into(),
        payer_wallet: Some(payer.as_str().into()),
        api_key_id: None,
        method: "credits".into(),
        model: "m".into(),
        status: "completed".into(),
        prompt_tokens: 1,
        completion_tokens: 1,
        input_per_m: sgl::money::MicrosPerM(1),
        output_per_m: sgl::money::MicrosPerM(1),
        quoted: Micros(500),
        cost: Micros(100),
        operator_share: Micros(80),
        platform_share: Micros(5),
        stakers_share: Micros(10),
        burn_share: Micros(5),
        usage_signature: None,
        result_signature: None,
        created_at: 1,
    }
}

/// Holds always end (PROTOCOL.md §7f): a hold has a lease; renewed, it stays;
/// lapsed, it is released whole. Settling writes the job's usage row in the
/// same transaction: when the row cannot be written, nothing is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_lapse_unless_renewed_and_settle_with_their_usage_row() {
    each_backend("leases", |t: TestStore| async move {
        let clock = sgl::clock::ManualClock::starting_now();
        let s = t
            .store
            .clone()
            .with_clock(clock.clock())
            .with_hold_lease(std::time::Duration::from_secs(10));
        let w = wallet("0xcccc000000000000000000000000000000000003");
        s.top_up(&w, Micros(1_000), "dep").await.unwrap();
        let running = s.hold(&w, Micros(300), "job-running").await.unwrap();
        let crashed = s.hold(&w, Micros(200), "job-crashed").await.unwrap();
        assert_eq!(s.open_holds().await.unwrap(), (2, Micros(500)));
        // Within the lease nothing lapses.
        clock.advance(std::time::Duration::from_secs(9));
        assert_eq!(s.release_lapsed_holds(false).await.unwrap(), 0);
        // The running job's lease is renewed; the other is not.
        assert_eq!(
            s.renew_holds(std::slice::from_ref(&running)).await.unwrap(),
            1
        );
        clock.advance(std::time::Duration::from_secs(2));
        assert_eq!(s.release_lapsed_holds(false).await.unwrap(), 1);
        assert!(matches!(
            s.settle_hold(&crashed, Micros(1)).await,
            Err(StoreError::HoldClosed)
        ));
        let b = s.balance(&w).await.unwrap();
        assert_eq!((b.balance, b.held), (Micros(700), Micros(300)));

        // The usage row and the settlement are one: a row that cannot be
        // written (this job already has one) leaves the hold open.
        s.record_usage(&usage_row("job-running", &w)).await.unwrap();
        let row = sgl::payments::billing::priced(usage_row("job-running", &w), Micros(250));
        assert!(matches!(
            s.settle_hold_recording(&running, Micros(250), &row).await,
            Err(StoreError::DuplicateReference)
        ));
        let b = s.balance(&w).await.unwrap();
        assert_eq!(
            (b.balance, b.held, b.total_spent),
            (Micros(700), Micros(300), Micros::ZERO)
        );
        let row = sgl::payments::billing::priced(usage_row("job-ok", &w), Micros(250));
        let b = s
            .settle_hold_recording(&running, Micros(250), &row)
            .await
            .unwrap();
        assert_eq!(
            (b.balance, b.held, b.total_spent),
            (Micros(750), Micros::ZERO, Micros(250))
        );
        assert_eq!(
            s.usage_for_job("job-ok").await.unwrap().unwrap().cost,
            Micros(250)
        );
        assert_eq!(
            b.total_deposited,
            Micros(b.balance.0 + b.held.0 + b.total_spent.0)
        );

        // A release writes its row the same way; at start-up every open hold
        // can be released at once.
        let h = s.hold(&w, Micros(100), "job-failed").await.unwrap();
        let mut row = sgl::payments::billing::priced(usage_row("job-failed", &w), Micros::ZERO);
        row.status = "failed".into();
        s.release_hold_recording(&h, &row).await.unwrap();
        assert_eq!(
            s.usage_for_job("job-failed").await.unwrap().unwrap().status,
            "failed"
        );
        s.hold(&w, Micros(100), "job-open").await.unwrap();
        assert_eq!(s.release_lapsed_holds(false).await.unwrap(), 0);
        assert_eq!(s.release_lapsed_holds(true).await.unwrap(), 1);
        assert_eq!(s.open_holds().await.unwrap(), (0, Micros::ZERO));
        t
    })
    .await;
}

/// A settled job payment's refund (PROTOCOL.md §7f): opened with the
/// settlement record, credited once with the job's usage row; recorded as
/// owed when the credit cannot be made, and credited later at that amount;
/// a refund whose job nobody renews is credited whole once its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_refunds_are_opened_with_the_settlement_and_credited_once() {
    each_backend("refunds", |t: TestStore| async move {
        let clock = sgl::clock::ManualClock::starting_now();
        let s = t
            .store
            .clone()
            .with_clock(clock.clock())
            .with_hold_lease(std::time::Duration::from_secs(10));
        let payer = "0xdddd000000000000000000000000000000000004";
        let w = wallet(payer);
        let settle = |job: &'static str, nonce: &'static str| {
            let s = s.clone();
            let w = w.clone();
            async move {
                let key = PaymentNonceKey {
                    chain_id: 8453,
                    asset: "0xusdc".into(),
                    payer: payer.into(),
                    nonce: nonce.into(),
                };
                let p = PendingPayment {
                    key: &key,
                    scheme: "x402-v2",
                    resource: "https://x/y",
                    amount: "500",
                };
                assert!(s.reserve_payment_nonce(&p).await.unwrap());
                assert!(s.bind_payment_nonce(&key, job).await.unwrap());
                s.settle_payment_nonce_for_job(&key, "0xfeed", job, &w, Micros(500))
                    .await
                    .unwrap();
            }
        };
        settle("job-a", "0x01").await;
        settle("job-b", "0x02").await;
        settle("job-c", "0x03").await;
        let open = s.job_refund("job-a").await.unwrap().unwrap();
        assert_eq!(
            (open.state.as_str(), open.paid, open.owed),
            ("open", Micros(500), None)
        );
        assert_eq!(s.uncredited_job_refunds().await.unwrap(), 3);
        // Nothing is due while the leases run.
        assert_eq!(s.credit_due_job_refunds(false).await.unwrap(), 0);

        // Job a ends: 400 back, with its usage row, once.
        let row = sgl::payments::billing::priced(usage_row("job-a", &w), Micros(100));
        let b = s
            .settle_job_refund("job-a", &w, Micros(400), Some(&row))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.balance, Micros(400));
        assert!(s
            .settle_job_refund("job-a", &w, Micros(400), Some(&row))
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            s.usage_for_job("job-a").await.unwrap().unwrap().cost,
            Micros(100)
        );

        // Job b's credit fails (its usage row clashes): nothing changes;
        // recorded as owed instead, it is credited by the reaper at 300.
        s.record_usage(&usage_row("job-b", &w)).await.unwrap();
        let row = sgl::payments::billing::priced(usage_row("job-b", &w), Micros(200));
        assert!(matches!(
            s.settle_job_refund("job-b", &w, Micros(300), Some(&row))
                .await,
            Err(StoreError::DuplicateReference)
        ));
        assert_eq!(s.job_refund("job-b").await.unwrap().unwrap().state, "open");
        assert!(s
            .owe_job_refund("job-b", &w, Micros(300), None)
            .await
            .unwrap());
        assert!(!s
            .owe_job_refund("job-b", &w, Micros(1), None)
            .await
            .unwrap());
        assert_eq!(s.credit_due_job_refunds(false).await.unwrap(), 1);
        assert_eq!(s.balance(&w).await.unwrap().balance, Micros(700));
        // A refund above the payment is refused.
        assert!(s
            .settle_job_refund("job-c", &w, Micros(501), None)
            .await
            .is_err());

        // Job c runs on (renewed), then its coordinator dies: whole once
        // the lease lapses, and only then.
        clock.advance(std::time::Duration::from_secs(9));
        assert_eq!(s.renew_job_refunds(&["job-c".into()]).await.unwrap(), 1);
        clock.advance(std::time::Duration::from_secs(9));
        assert_eq!(s.credit_due_job_refunds(false).await.unwrap(), 0);
        clock.advance(std::time::Duration::from_secs(2));
        assert_eq!(s.credit_due_job_refunds(false).await.unwrap(), 1);
        assert_eq!(s.credit_due_job_refunds(true).await.unwrap(), 0);
        let b = s.balance(&w).await.unwrap();
        assert_eq!(
            (b.balance, b.total_deposited),
            (Micros(1_200), Micros(1_200))
        );
        assert_eq!(s.uncredited_job_refunds().await.unwrap(), 0);
        let ledger = s.ledger(&w, 10).await.unwrap();
        let mut refs: Vec<_> = ledger
            .iter()
            .map(|e| (e.kind.as_str(), e.reference.clone().unwrap(), e.amount.0))
            .collect();
        refs.sort();
        assert_eq!(
            refs,
            [
                ("refund", "refund:job-a".to_string(), 400),
                ("refund", "refund:job-b".to_string(), 300),
                ("refund", "refund:job-c".to_string(), 500),
            ]
        );
        t
    })
    .await;
}

/// Replica mode's one statement for owner rows and messages: the rows are
/// there when the messages arrive, the messages arrive in order, and one
/// too long for a NOTIFY payload comes through the mail table whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_post_commits_its_rows_and_delivers_its_messages_in_order() {
    let Some(pg) = pay_common::stores::postgres_store("replicapost").await else {
        return;
    };
    let id = format!("post{}", std::process::id());
    let db = pg
        .store
        .replica_db(&id, std::time::Duration::from_secs(3))
        .unwrap();
    db.renew().await.unwrap();
    let mut listener = db.listen().await.unwrap();
    let long = "x".repeat(20_000);
    let mail: Vec<(String, String)> = ["first", long.as_str(), "third"]
        .iter()
        .map(|m| (id.clone(), m.to_string()))
        .collect();
    let jobs = vec!["job-a".to_string(), "job-b".to_string()];
    db.post(&jobs, &mail).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("a message within 10 s")
            .unwrap();
        got.push(db.open_payload(n.payload()).await.unwrap().unwrap());
    }
    assert_eq!(got, ["first", long.as_str(), "third"]);
    for job in &jobs {
        assert_eq!(
            db.job_owner(job).await.unwrap().as_deref(),
            Some(id.as_str())
        );
    }
    // A job recorded again keeps its owner; nothing to send is no error.
    db.post(&jobs[..1], &[]).await.unwrap();
    assert_eq!(
        db.job_owner("job-a").await.unwrap().as_deref(),
        Some(id.as_str())
    );
    drop(listener);
    pay_common::stores::cleanup(pg).await;
}
