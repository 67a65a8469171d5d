//! Refunds of settled x402 payments that cannot be lost (PROTOCOL.md §7f),
//! on SQLite and PostgreSQL, through a real `sgl coordinator serve` with
//! payments, an echo node and the stand-in facilitator. Faults are injected
//! into the coordinator's own database by the test (a trigger that makes
//! the write fail, as a full disk or a broken constraint would), and the
//! coordinator is SIGKILLed:
//!
//! 1. The refund's ledger write fails: the answer is released, and the
//!    exact refund is recorded as owed together with the job's usage row.
//!    The coordinator is SIGKILLed, the fault removed, and the restarted
//!    coordinator credits exactly quote − cost, once.
//! 2. No refund write of any kind succeeds (the usage row cannot be
//!    written): the refund is kept in memory while the store's refund stays
//!    open (it does not lapse into a whole refund); once the fault goes,
//!    the reaper credits exactly quote − cost, with the usage row, without
//!    a restart.
//! 3. The coordinator is SIGKILLed with a paid stream mid-generation (400
//!    tokens at 50 ms each, killed at the first chunk): after the restart
//!    the payer gets the whole payment back.
//!
//! Afterwards, and after one more restart: one refund ledger row per job,
//! and what the facilitator settled = Σ usage cost + the payer's credits,
//! to the micro-dollar.
#![cfg(all(feature = "coordinator", feature = "node", unix))]

use crate::grid_support;
use crate::pay_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use grid_support::{
    free_port, node_init, node_start, wait_node_active, Proc, MODEL, OPERATOR, SGL,
};
use pay_common::facilitator::{self, Facilitator};
use pay_common::server::PAY_TO;
use pay_common::signing::{key, PayParams, ANVIL0};
use serde_json::{json, Value};
use sgl::money::Micros;
use sgl::store::{Store, WalletId};

/// Anvil key #0's address: the payer.
const PAYER: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
/// The echo node's pause before each token: a 400-token answer takes 20 s,
/// so one killed at its first chunk is certainly mid-generation.
const TOKEN_DELAY_MS: &str = "50";

/// `sgl coordinator serve` with payments on `port`, waited for until it
/// listens.
fn serve(port: u16, db: &str, fac: &str, code: &str, log: &Path) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut c = Command::new(SGL);
    c.args([
        "coordinator",
        "serve",
        "--listen",
        &listen,
        "--database-url",
        db,
        "--pay-to",
        &PAY_TO.to_checksum(None),
        "--facilitator-url",
        fac,
        "--heartbeat-interval",
        "1",
        // Short leases: the reaper runs every ~0.7 s, and a dead
        // coordinator's refunds lapse within seconds on PostgreSQL.
        "--hold-lease",
        "2",
        "--registration-code",
        code,
    ])
    .env_remove("SGL_FACILITATOR_TOKEN")
    .env_remove("SGL_FACILITATOR_CDP_KEY_SECRET")
    .stdout(Stdio::null())
    .stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    );
    let mut proc = Proc(c.spawn().unwrap());
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = proc.0.try_wait().unwrap() {
            panic!(
                "the coordinator exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

fn sigkill(p: &mut Proc) {
    p.0.kill().unwrap();
    p.0.wait().unwrap();
}

/// A fault in the coordinator's database: a trigger that makes every
/// insert into `table` (matching `when`) fail.
struct Fault {
    db: String,
    table: &'static str,
}

impl Fault {
    async fn inject(db: &str, table: &'static str, when: &str) -> Fault {
        let sql = if db.starts_with("postgres") {
            format!(
                "CREATE OR REPLACE FUNCTION sgl_test_fault() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'injected fault'; END $$; \
                 CREATE TRIGGER sgl_test_fault BEFORE INSERT ON {table} FOR EACH ROW \
                 WHEN ({when}) EXECUTE FUNCTION sgl_test_fault();"
            )
        } else {
            format!(
                "CREATE TRIGGER sgl_test_fault BEFORE INSERT ON {table} WHEN {when} \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END;"
            )
        };
        exec(db, &sql).await;
        Fault {
            db: db.to_string(),
            table,
        }
    }

    async fn remove(self) {
        let sql = if self.db.starts_with("postgres") {
            format!("DROP TRIGGER sgl_test_fault ON {}", self.table)
        } else {
            "DROP TRIGGER sgl_test_fault".to_string()
        };
        exec(&self.db, &sql).await;
    }
}

/// Run `sql` on the coordinator's database, as an operator's shell would.
async fn exec(db: &str, sql: &str) {
    if db.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(db).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(Duration::from_secs(30));
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pay for `body` with a fresh x402 v2 authorization of its quote (read
/// from the 402 challenge); the response and the amount paid.
async fn pay(base: &str, body: &Value) -> (reqwest::Response, u64) {
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let r = http.post(&url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 402);
    let h = r.headers()["payment-required"].to_str().unwrap();
    let v: Value = serde_json::from_slice(&STANDARD.decode(h).unwrap()).unwrap();
    let amount: u64 = v["accepts"][0]["amount"].as_str().unwrap().parse().unwrap();
    let resource = v["resource"]["url"].as_str().unwrap_or(&url).to_string();
    let sig = PayParams::new(PAY_TO, amount).x402_v2(&key(ANVIL0), &resource);
    let r = http
        .post(&url)
        .header("PAYMENT-SIGNATURE", sig)
        .json(body)
        .send()
        .await
        .unwrap();
    (r, amount)
}

fn job_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_string()
}

/// The cost of a usage row, computed here from its tokens and prices (one
/// rounding, up, to the µUSD), not by the code under test.
fn cost_of(row: &sgl::store::UsageRow) -> u64 {
    let prompt = u128::try_from(row.prompt_tokens).unwrap();
    let completion = u128::try_from(row.completion_tokens).unwrap();
    let total =
        prompt * u128::from(row.input_per_m.0) + completion * u128::from(row.output_per_m.0);
    u64::try_from(total.div_ceil(1_000_000)).unwrap()
}

async fn credits(store: &Store) -> u64 {
    store
        .balance(&WalletId::new_unchecked(PAYER))
        .await
        .unwrap()
        .balance
        .0
}

async fn wait_credited(store: &Store, job: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let r = store.job_refund(job).await.unwrap();
        if r.as_ref().is_some_and(|r| r.state == "credited") {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "refund of {job} not credited: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_that_fails_to_write_is_credited_exactly_once_after_recovery() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("refundfault", dir.path()) {
        eprintln!("backend: {}", db.backend);
        let work = dir.path().join(db.backend);
        std::fs::create_dir_all(&work).unwrap();
        refund_faults_on(&db.url, &work).await;
    }
}

async fn refund_faults_on(db: &str, work: &Path) {
    let fac: Facilitator = facilitator::start().await;
    let port = free_port();
    let code = format!("sglreg_refund_{port}");
    let log = work.join("coordinator.log");
    let mut coordinator = serve(port, db, &fac.url, &code, &log);
    let base = format!("http://127.0.0.1:{port}");
    let nd = work.join("node");
    let nd = nd.to_str().unwrap();
    node_init(nd, &base, OPERATOR);
    let mut node = node_start(
        nd,
        &[
            "--engine",
            "echo",
            "--evidence",
            "none",
            "--registration-code",
            &code,
            "--echo-token-delay-ms",
            TOKEN_DELAY_MS,
        ],
        Stdio::null(),
    );
    wait_node_active(nd, Duration::from_secs(60));
    grid_support::wait_online(&base, Duration::from_secs(60)).await;
    let store = Store::open(db).await.unwrap();
    let text = words(20);
    // (job, paid, kept by the job) of every paid job.
    let mut jobs: Vec<(String, u64, u64)> = Vec::new();

    // 1. The ledger refuses refund rows: the answer is released, the exact
    // refund recorded as owed beside the usage row, nothing credited.
    let fault = Fault::inject(db, "credit_ledger", "NEW.kind = 'refund'").await;
    let body = json!({"model": MODEL, "max_tokens": 64,
                      "messages": [{"role": "user", "content": text}]});
    let (r, paid) = pay(&base, &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("payment-response"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str(), "{v}");
    let job = job_of(&v);
    let row = store.usage_for_job(&job).await.unwrap().expect("usage row");
    let cost = cost_of(&row);
    assert_eq!((row.quoted.0, row.cost.0), (paid, cost), "{row:?}");
    assert_eq!(row.status, "completed");
    assert!(cost > 0 && cost < paid);
    assert_eq!(v["refunded_micros"], paid - cost, "{v}");
    let owed = store.job_refund(&job).await.unwrap().unwrap();
    assert_eq!(
        (owed.state.as_str(), owed.owed, owed.paid),
        ("owed", Some(Micros(paid - cost)), Micros(paid))
    );
    assert_eq!(credits(&store).await, 0, "nothing credited yet");
    jobs.push((job.clone(), paid, cost));

    // SIGKILL; the fault is repaired; the restarted coordinator credits
    // exactly quote − cost, once.
    sigkill(&mut coordinator);
    fault.remove().await;
    coordinator = serve(port, db, &fac.url, &code, &log);
    wait_credited(&store, &job, Duration::from_secs(20)).await;
    assert_eq!(credits(&store).await, paid - cost);
    grid_support::wait_online(&base, Duration::from_secs(60)).await;

    // 2. No write of the refund succeeds (its usage row cannot be written):
    // the stream is answered, and its refund stays open in the store,
    // renewed, while the coordinator keeps the exact amount.
    let before = credits(&store).await;
    let fault = Fault::inject(db, "grid_usage", "1 = 1").await;
    let body = json!({"model": MODEL, "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": text}]});
    let (r, paid) = pay(&base, &body).await;
    assert_eq!(r.status(), 200);
    let all = r.text().await.unwrap();
    let data: Vec<&str> = all
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{all}");
    let last: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    let refunded = last["refunded_micros"].as_u64().expect("refunded_micros");
    let job = job_of(&last);
    // Longer than a lease: the open refund must not lapse into a whole one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = store.job_refund(&job).await.unwrap().unwrap();
    assert_eq!(open.state, "open", "{open:?}");
    assert!(store.usage_for_job(&job).await.unwrap().is_none());
    assert_eq!(credits(&store).await, before);
    fault.remove().await;
    wait_credited(&store, &job, Duration::from_secs(20)).await;
    let row = store.usage_for_job(&job).await.unwrap().expect("usage row");
    let cost = cost_of(&row);
    assert_eq!((row.quoted.0, row.cost.0), (paid, cost), "{row:?}");
    assert_eq!(refunded, paid - cost);
    assert_eq!(credits(&store).await, before + paid - cost);
    jobs.push((job, paid, cost));

    // 3. SIGKILL with a paid stream mid-generation: the payer gets it all
    // back. The node is restarted to stall its job after a few tokens, so
    // the answer cannot finish before the kill however slowly its first
    // chunk travels (pacing alone raced the kill on a loaded machine).
    node.0.kill().unwrap();
    let _ = node.0.wait();
    node = node_start(
        nd,
        &[
            "--engine",
            "echo",
            "--evidence",
            "none",
            "--echo-stall-after",
            "8",
        ],
        Stdio::null(),
    );
    wait_node_active(nd, Duration::from_secs(60));
    grid_support::wait_online(&base, Duration::from_secs(60)).await;
    let body = json!({"model": MODEL, "max_tokens": 400, "stream": true,
                      "messages": [{"role": "user", "content": words(400)}]});
    let (mut r, paid) = pay(&base, &body).await;
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\"") {
        let c = tokio::time::timeout(Duration::from_secs(30), r.chunk())
            .await
            .expect("no first chunk")
            .unwrap()
            .expect("the stream ended");
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    let first = seen.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let job = job_of(&serde_json::from_str(first).unwrap());
    let before = credits(&store).await;
    sigkill(&mut coordinator);
    drop(r);
    coordinator = serve(port, db, &fac.url, &code, &log);
    wait_credited(&store, &job, Duration::from_secs(30)).await;
    assert_eq!(credits(&store).await, before + paid);
    jobs.push((job, paid, 0));

    // Once more: a restart credits nothing twice.
    let total = credits(&store).await;
    sigkill(&mut coordinator);
    coordinator = serve(port, db, &fac.url, &code, &log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(credits(&store).await, total);

    // The ledger adds up: one refund row per job, each quote − cost; the
    // facilitator settled each payment once; settled = Σ cost + credits.
    assert_eq!(store.uncredited_job_refunds().await.unwrap(), 0);
    let payer = WalletId::new_unchecked(PAYER);
    let ledger = store.ledger(&payer, 100).await.unwrap();
    assert_eq!(ledger.len(), jobs.len(), "{ledger:?}");
    for (job, paid, cost) in &jobs {
        let rows: Vec<_> = ledger
            .iter()
            .filter(|e| e.reference.as_deref() == Some(format!("refund:{job}").as_str()))
            .collect();
        assert_eq!(rows.len(), 1, "{job}: {ledger:?}");
        assert_eq!(
            (rows[0].kind.as_str(), rows[0].amount.0),
            ("refund", paid - cost)
        );
    }
    let b = store.balance(&payer).await.unwrap();
    assert_eq!(
        b.total_deposited.0,
        b.balance.0 + b.held.0 + b.total_spent.0
    );
    let settled: u64 = jobs.iter().map(|(_, p, _)| p).sum();
    let kept: u64 = jobs.iter().map(|(_, _, c)| c).sum();
    assert_eq!(settled, kept + b.balance.0);
    assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), jobs.len());
    store.close().await;
    drop(coordinator);
    drop(node);
}
