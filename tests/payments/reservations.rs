//! Credit reservations (`sgl::payments::reservations`) on SQLite and on
//! PostgreSQL: a thousand concurrent grid charges of one API key race its
//! balance to zero through the coordinator's charge path and never overdraw
//! it; a reservation whose process dies lapses and the balance is whole
//! again; a revoked key stops within the key cache's second.

#![cfg(feature = "payments")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use sgl::money::{Micros, MicrosPerM};
use sgl::payments::billing::ChargeRefused;
use sgl::payments::reservations::{Reservations, ReserveConfig, SettleOrder};
use sgl::payments::{PaymentError, Payments, PaymentsConfig, RequestParts};
use sgl::store::{BlockSettled, Store, UsageRow, WalletId};

use crate::pay_common::stores::{each_backend, postgres_url, TestStore};

const QUOTE: Micros = Micros(1_000);

fn wallet(s: &str) -> WalletId {
    WalletId::new_unchecked(s)
}

fn payments(store: &Store) -> Payments {
    Payments::new(
        PaymentsConfig::new(Default::default(), "http://127.0.0.1:9"),
        store.clone(),
    )
    .unwrap()
}

/// The usage row the coordinator writes for `job` (priced by the charge).
fn usage(job: &str, payer: &WalletId) -> UsageRow {
    UsageRow {
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
        input_per_m: MicrosPerM(1),
        output_per_m: MicrosPerM(1),
        quoted: QUOTE,
        cost: Micros::ZERO,
        operator_share: Micros::ZERO,
        platform_share: Micros::ZERO,
        stakers_share: Micros::ZERO,
        burn_share: Micros::ZERO,
        usage_signature: None,
        result_signature: None,
        created_at: 1,
    }
}

/// Wait (at most 10 s) until no credit hold is open.
async fn no_open_holds(store: &Store) {
    let start = Instant::now();
    loop {
        let (n, amount) = store.open_holds().await.unwrap();
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{n} holds ({amount}) still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One thousand requests of one key at once against a balance of 250
/// quotes and a half: exactly 250 are admitted, the rest refused with
/// `insufficient_credits`; every admitted one is charged its quote with its
/// usage row; nothing is overdrawn and the ledger is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_charges_race_one_wallet_to_zero() {
    race_to_zero("rsvrace", SettleOrder::BeforeAnswer).await;
}

/// The same race with answers released before their batches commit
/// (`--credit-settle after-answer`): once the batches are written the
/// ledger is the same to the micro-unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_charges_answered_before_their_commit_race_to_zero() {
    race_to_zero("rsvracea", SettleOrder::AfterAnswer).await;
}

async fn race_to_zero(tag: &'static str, order: SettleOrder) {
    each_backend(tag, move |t: TestStore| async move {
        let store = t.store.clone();
        let payer = wallet("0x5151000000000000000000000000000000000051");
        let deposit = Micros(250 * QUOTE.0 + QUOTE.0 / 2);
        store.top_up(&payer, deposit, "grant").await.unwrap();
        let p = payments(&store);
        // Small blocks: many growths race the admissions.
        p.enable_reservations(ReserveConfig {
            block_quotes: 8,
            order,
            ..Default::default()
        });
        let (key, _) = p.create_api_key(&payer, "race").await.unwrap();
        let key = key.secret.as_str().to_string();

        let admitted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..1_000 {
            let (p, key, payer) = (p.clone(), key.clone(), payer.clone());
            let (admitted, refused) = (admitted.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let mut headers = HeaderMap::new();
                headers.insert("x-api-key", HeaderValue::from_str(&key).unwrap());
                let uri: Uri = "/v1/chat/completions".parse().unwrap();
                let parts = RequestParts {
                    method: &Method::POST,
                    uri: &uri,
                    headers: &headers,
                    body: b"{}",
                };
                let offer = p.offer(&headers, &uri, QUOTE, "race");
                let job = format!("job-{i}");
                match p.open_charge_reserving(&parts, &offer, &job).await {
                    Ok(charge) => {
                        assert_eq!(charge.method(), "credits");
                        assert!(charge.hold().is_none(), "a reserved charge has no hold");
                        admitted.fetch_add(1, Ordering::SeqCst);
                        // Some work between admission and settlement.
                        tokio::task::yield_now().await;
                        let r = charge
                            .settle_recording(QUOTE, Some(usage(&job, &payer)))
                            .await
                            .unwrap();
                        assert_eq!(r.charged, QUOTE);
                        assert!(r.unrecorded.is_none());
                    }
                    Err(ChargeRefused::Refused(PaymentError::InsufficientCredits {
                        needed,
                        ..
                    })) => {
                        assert_eq!(needed, QUOTE);
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(ChargeRefused::Refused(e)) => panic!("refused: {e}"),
                    Err(ChargeRefused::PaymentRequired) => panic!("the key was not seen"),
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 250);
        assert_eq!(refused.load(Ordering::SeqCst), 750);

        // The wallet's last block is given back once nothing is in flight.
        no_open_holds(&store).await;
        let b = store.balance(&payer).await.unwrap();
        assert_eq!(b.balance, Micros(QUOTE.0 / 2));
        assert_eq!(b.held, Micros::ZERO);
        assert_eq!(b.total_spent, Micros(250 * QUOTE.0));
        assert_eq!(b.total_deposited, deposit);
        assert_eq!(
            b.total_deposited.0,
            b.balance.0 + b.held.0 + b.total_spent.0
        );
        // Every charge has its usage row, priced at what it took.
        let rows: Vec<_> = store
            .usage_rows(10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.payer_wallet.as_deref() == Some(payer.as_str()))
            .collect();
        assert_eq!(rows.len(), 250);
        assert!(rows.iter().all(|r| r.cost == QUOTE));
        assert!(store
            .settled_holds_without_usage()
            .await
            .unwrap()
            .is_empty());
        // The ledger: one settle row per job, no debit.
        let ledger = store.ledger(&payer, 10_000).await.unwrap();
        let settles = ledger.iter().filter(|e| e.kind == "settle").count();
        assert_eq!(settles, 250);
        assert!(!ledger.iter().any(|e| e.kind == "debit"));
        if let Some(r) = p.reservations() {
            r.close().await;
        }
        t
    })
    .await;
}

/// A process admits requests against a reservation, settles one, and dies
/// with another in flight: its runtime is gone, nothing is given back. The
/// lease lapses, the reaper releases the block, and the wallet is whole but
/// for the one settled job, which has its usage row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_process_reservation_lapses_and_the_balance_is_whole() {
    each_backend("rsvlapse", |t: TestStore| async move {
        let payer = wallet("0x5252000000000000000000000000000000000052");
        t.store
            .top_up(&payer, Micros(100_000), "grant")
            .await
            .unwrap();
        // The same database, opened by the doomed process itself.
        let (url, schema) = match &t.pg_schema {
            Some(s) => (postgres_url(), Some(s.clone())),
            None => (
                t._dir
                    .as_ref()
                    .unwrap()
                    .path()
                    .join("sgl.db")
                    .to_str()
                    .unwrap()
                    .to_string(),
                None,
            ),
        };
        let w = payer.clone();
        let held_at_death = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let held = rt.block_on(async {
                let store = Store::open_in_schema(&url, schema.as_deref())
                    .await
                    .unwrap()
                    .with_hold_lease(Duration::from_secs(1));
                let r = Reservations::start(store.clone(), ReserveConfig::default());
                let done = r.admit(&w, QUOTE).await.unwrap();
                let running = r.admit(&w, QUOTE).await.unwrap();
                let s = r
                    .settle(
                        done,
                        Micros(400),
                        "job-done",
                        Some(priced(&w, "job-done", 400)),
                    )
                    .await
                    .unwrap();
                assert!(matches!(s, BlockSettled::Charged(_)), "{s:?}");
                // Still in flight when the process dies, and the
                // reservations never shut down (that would give the block
                // back).
                std::mem::forget(running);
                std::mem::forget(r);
                let b = store.balance(&w).await.unwrap();
                assert_eq!(b.total_spent, Micros(400));
                b.held
            });
            // The process is gone: no task of it runs again.
            rt.shutdown_background();
            held
        })
        .await
        .unwrap();
        // The block took 64 quotes; the settled job's cost left it.
        assert_eq!(held_at_death, Micros(64 * QUOTE.0 - 400));

        // Any coordinator's reaper releases it once its lease has lapsed.
        let store = t.store.clone();
        let start = Instant::now();
        while store.release_lapsed_holds(false).await.unwrap() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the dead process's reservation never lapsed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let b = store.balance(&payer).await.unwrap();
        assert_eq!(b.balance, Micros(100_000 - 400));
        assert_eq!((b.held, b.total_spent), (Micros::ZERO, Micros(400)));
        assert_eq!(store.open_holds().await.unwrap(), (0, Micros::ZERO));
        let row = store.usage_for_job("job-done").await.unwrap().unwrap();
        assert_eq!(row.cost, Micros(400));
        assert_eq!(store.usage_rows(100).await.unwrap().len(), 1);
        t
    })
    .await;
}

/// A usage row for `job` priced at `cost` (what the charge layer hands the
/// reservations).
fn priced(payer: &WalletId, job: &str, cost: u64) -> UsageRow {
    sgl::payments::billing::priced(usage(job, payer), Micros(cost))
}

/// An API key is remembered for a second: revoked in the store behind the
/// service's back, it still works at once and stops within the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_within_the_cache_second() {
    let t = crate::pay_common::stores::sqlite_store().await;
    let payer = wallet("0x5353000000000000000000000000000000000053");
    let p = payments(&t.store);
    let (key, rec) = p.create_api_key(&payer, "cached").await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-api-key",
        HeaderValue::from_str(key.secret.as_str()).unwrap(),
    );
    let uri: Uri = "/v1/credits".parse().unwrap();
    let parts = RequestParts {
        method: &Method::GET,
        uri: &uri,
        headers: &headers,
        body: b"",
    };
    assert!(p.authenticate(&parts).await.unwrap().is_some());
    // Revoked by another process (the CLI), not through this service.
    assert!(t.store.revoke_api_key(&payer, &rec.id).await.unwrap());
    let revoked_at = Instant::now();
    loop {
        match p.authenticate(&parts).await {
            Ok(Some(_)) => {}
            Err(PaymentError::ApiKeyInvalid) => break,
            other => panic!("{other:?}"),
        }
        assert!(
            revoked_at.elapsed() < Duration::from_millis(1_500),
            "a revoked key still works after the cache's second"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--credit-settle after-answer`, with the settlement refused after the
/// answer went out: the wallet's block was closed behind the process (its
/// lease lapsed and another coordinator's reaper released it) and another
/// process then spent the whole balance. The answer is not billed: the job
/// gets a failed usage row at cost 0 (written behind, as the settlement),
/// no ledger row, and the ledger stays exact. A second job whose block
/// closed the same way while the balance still covers it is charged from
/// the balance (a `debit` row) with its completed usage row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_settlement_is_refused_behind_it_is_recorded_unpaid() {
    each_backend("rsvbehind", |t: TestStore| async move {
        let store = t.store.clone();
        let payer = wallet("0x5454000000000000000000000000000000000054");
        let deposit = Micros(10 * QUOTE.0);
        store.top_up(&payer, deposit, "grant").await.unwrap();
        let p = payments(&store);
        p.enable_reservations(ReserveConfig {
            block_quotes: 2,
            order: SettleOrder::AfterAnswer,
            ..Default::default()
        });
        let (key, _) = p.create_api_key(&payer, "behind").await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-api-key",
            HeaderValue::from_str(key.secret.as_str()).unwrap(),
        );
        let uri: Uri = "/v1/chat/completions".parse().unwrap();
        let parts = RequestParts {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body: b"{}",
        };
        let offer = p.offer(&headers, &uri, QUOTE, "behind");
        let reference = p.reservations().unwrap().reference().to_string();
        // 1. Block closed, balance still covers: charged from the balance.
        let charge = p
            .open_charge_reserving(&parts, &offer, "job-debited")
            .await
            .unwrap();
        close_block(&store, &reference).await;
        let cost = Micros(600);
        let r = charge
            .settle_recording(cost, Some(usage("job-debited", &payer)))
            .await
            .unwrap();
        assert_eq!(r.charged, cost);
        let row = row_of(&store, "job-debited").await;
        assert_eq!((row.status.as_str(), row.cost), ("completed", cost));
        let b = store.balance(&payer).await.unwrap();
        assert_eq!(
            (b.balance, b.held, b.total_spent),
            (Micros(deposit.0 - cost.0), Micros::ZERO, cost)
        );
        // The closed block is forgotten: the next request opens another.
        let start = Instant::now();
        while !p.reservations().unwrap().holds().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the closed block is kept"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // 2. Block closed, and the balance drained by another process.
        let charge = p
            .open_charge_reserving(&parts, &offer, "job-unpaid")
            .await
            .unwrap();
        close_block(&store, &reference).await;
        let left = store.balance(&payer).await.unwrap().balance;
        store.debit(&payer, left, "elsewhere").await.unwrap();
        // The answer goes out: the charge cannot know yet.
        let r = charge
            .settle_recording(QUOTE, Some(usage("job-unpaid", &payer)))
            .await
            .unwrap();
        assert_eq!(r.charged, QUOTE);
        let row = row_of(&store, "job-unpaid").await;
        assert_eq!(row.status, "failed", "{row:?}");
        assert_eq!(row.cost, Micros::ZERO);
        assert_eq!(
            (
                row.operator_share,
                row.platform_share,
                row.stakers_share,
                row.burn_share
            ),
            (Micros::ZERO, Micros::ZERO, Micros::ZERO, Micros::ZERO)
        );

        // The ledger: exact, and nothing of the unpaid job in it.
        if let Some(r) = p.reservations() {
            r.close().await;
        }
        no_open_holds(&store).await;
        let b = store.balance(&payer).await.unwrap();
        assert_eq!(b.balance, Micros::ZERO);
        assert_eq!(b.held, Micros::ZERO);
        assert_eq!(b.total_deposited, deposit);
        assert_eq!(b.total_spent, deposit);
        assert_eq!(
            b.total_deposited.0,
            b.balance.0 + b.held.0 + b.total_spent.0
        );
        let ledger = store.ledger(&payer, 100).await.unwrap();
        assert!(
            !ledger
                .iter()
                .any(|e| e.reference.as_deref() == Some("job-unpaid")),
            "the unpaid job is in the ledger: {ledger:?}"
        );
        let debited: Vec<_> = ledger
            .iter()
            .filter(|e| e.reference.as_deref() == Some("job-debited"))
            .collect();
        assert_eq!(debited.len(), 1, "{ledger:?}");
        assert_eq!(
            (debited[0].kind.as_str(), debited[0].amount),
            ("debit", cost)
        );
        let billed: u64 = store
            .usage_rows(100)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.payer_wallet.as_deref() == Some(payer.as_str()))
            .map(|r| r.cost.0)
            .sum();
        // What grid jobs took is exactly their usage rows; the rest went
        // to the other process's debit.
        assert_eq!(billed, cost.0);
        assert!(store
            .settled_holds_without_usage()
            .await
            .unwrap()
            .is_empty());
        t
    })
    .await;
}

/// Close the one open block of `reference` behind its process's back, as
/// a reaper does with a lapsed one.
async fn close_block(store: &Store, reference: &str) {
    let blocks = store.open_blocks(reference).await.unwrap();
    assert_eq!(blocks.len(), 1, "one block: {blocks:?}");
    store.release_hold(&blocks[0].0).await.unwrap();
}

/// The usage row of `job`, once the settlement behind its answer wrote it.
async fn row_of(store: &Store, job: &str) -> UsageRow {
    let start = Instant::now();
    loop {
        if let Some(r) = store.usage_for_job(job).await.unwrap() {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no usage row for {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One settlement batch larger than a statement takes (300 jobs: 256, 32,
/// 8 and 4 rows to an `INSERT`) writes every job's ledger and usage row;
/// a batch with a job already recorded writes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_settlement_batch_writes_every_row_and_a_duplicate_writes_none() {
    each_backend("rsvbatch", |t: TestStore| async move {
        let store = &t.store;
        let payer = wallet("0x5353000000000000000000000000000000000053");
        store
            .top_up(&payer, Micros(1_000_000), "grant")
            .await
            .unwrap();
        let (hold, taken) = store
            .open_block(
                &payer,
                Micros(400_000),
                Micros(400_000),
                "reservation:batch",
            )
            .await
            .unwrap();
        assert_eq!(taken, Micros(400_000));
        let charge = |i: usize| sgl::store::BlockCharge {
            hold: hold.clone(),
            wallet: payer.clone(),
            charged: Micros(1_000),
            reference: format!("job-{i}"),
            usage: Some(priced(&payer, &format!("job-{i}"), 1_000)),
        };
        let batch: Vec<_> = (0..300).map(charge).collect();
        let done = store.settle_blocks(&batch, &[]).await.unwrap();
        assert!(done.iter().all(|d| matches!(d, BlockSettled::Charged(_))));
        assert_eq!(store.usage_rows(1_000).await.unwrap().len(), 300);
        let settles = store.ledger(&payer, 1_000).await.unwrap();
        assert_eq!(settles.iter().filter(|e| e.kind == "settle").count(), 300);
        let b = store.balance(&payer).await.unwrap();
        assert_eq!((b.balance, b.held), (Micros(600_000), Micros(100_000)));
        assert_eq!(b.total_spent, Micros(300_000));

        // job-0 again, beside a new job: the whole batch is refused.
        let again = vec![charge(300), charge(0)];
        assert!(store.settle_blocks(&again, &[]).await.is_err());
        assert_eq!(store.usage_rows(1_000).await.unwrap().len(), 300);
        let after = store.balance(&payer).await.unwrap();
        assert_eq!(after, b);
        t
    })
    .await;
}
