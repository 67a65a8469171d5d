//! Operators paid (PROTOCOL.md §7f): `sgl coordinator payouts plan` and
//! `mark-paid` against the real store, and `GET /grid/nodes/{id}/earnings`
//! with `sgl node earnings`, on SQLite and on a fresh PostgreSQL database
//! (skipped when unreachable unless SGL_REQUIRE_POSTGRES=1).
//!
//! Usage rows are written straight into the coordinator's store, with known
//! costs, so every expected number is computed here from those rows (the
//! operator share is 80 % of the cost, rounded down), never by the code
//! under test.
#![cfg(all(feature = "coordinator", feature = "payments", unix))]

use crate::grid_support;
use crate::pay_common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use grid_support::{node_init, node_start, ok, sgl, CoordinatorProc, MODEL, OPERATOR, SGL};
use pay_common::signing::{address, key, xauth_headers, ANVIL0, ANVIL1};
use serde_json::Value;
use sgl::money::{Micros, MicrosPerM};
use sgl::store::{Store, UsageRow};

const DAY_MS: i64 = 86_400_000;
const WALLET_A: &str = "0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// The same address as WALLET_A, spelled with capitals: one payee.
const WALLET_A_CAPS: &str = "0xAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const WALLET_B: &str = "0xbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const WALLET_SOL: &str = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM";
/// Owed less than the minimum of the concurrent plans.
const WALLET_SMALL: &str = "0xcccccccccccccccccccccccccccccccccccccccc";
const MIN_AMOUNT: u64 = 100_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The operator's 80 %, rounded down: PROTOCOL.md §5.10.
fn operator_share(cost: u64) -> u64 {
    cost * 80 / 100
}

/// A usage row of a finished job costing `cost` micro-USD, split 80/5/10/5.
fn usage(job: &str, node: &str, wallet: &str, model: &str, cost: u64, at: i64) -> UsageRow {
    let operator = operator_share(cost);
    let stakers = cost * 10 / 100;
    let burn = cost * 5 / 100;
    UsageRow {
        job_id: job.into(),
        node_id: node.into(),
        operator_wallet: wallet.into(),
        payer_wallet: Some("0x2222222222222222222222222222222222222222".into()),
        api_key_id: None,
        method: "credits".into(),
        model: model.into(),
        status: if cost == 0 { "failed" } else { "completed" }.into(),
        prompt_tokens: (cost % 97) as i64,
        completion_tokens: (cost % 89) as i64,
        input_per_m: MicrosPerM(1_000_000),
        output_per_m: MicrosPerM(2_000_000),
        quoted: Micros(cost),
        cost: Micros(cost),
        operator_share: Micros(operator),
        platform_share: Micros(cost - operator - stakers - burn),
        stakers_share: Micros(stakers),
        burn_share: Micros(burn),
        usage_signature: None,
        result_signature: None,
        created_at: at,
    }
}

/// The payee a wallet's share goes to (EVM addresses in lowercase).
fn payee(w: &str) -> String {
    if w.starts_with("0x") {
        w.to_lowercase()
    } else {
        w.to_string()
    }
}

/// Insert `n` rows for the big wallets (and a few small and zero-cost ones);
/// job id → (payee, operator share).
async fn seed(store: &Store, tag: &str, n: usize) -> HashMap<String, (String, u64)> {
    let mut want = HashMap::new();
    let wallets = [WALLET_A, WALLET_A_CAPS, WALLET_B, WALLET_SOL];
    let now = now_ms();
    for i in 0..n {
        let w = wallets[i % wallets.len()];
        let cost = 1_000 + (i as u64 * 7_919) % 5_000;
        let job = format!("{tag}-{i}");
        store
            .record_usage(&usage(&job, "n1", w, MODEL, cost, now))
            .await
            .unwrap();
        want.insert(job, (payee(w), operator_share(cost)));
    }
    for i in 0..3 {
        let job = format!("{tag}-small-{i}");
        store
            .record_usage(&usage(&job, "n2", WALLET_SMALL, MODEL, 1_000, now))
            .await
            .unwrap();
        want.insert(job, (payee(WALLET_SMALL), operator_share(1_000)));
    }
    for i in 0..5 {
        // Failed jobs: nothing owed, never in a batch.
        let job = format!("{tag}-failed-{i}");
        store
            .record_usage(&usage(&job, "n1", WALLET_B, MODEL, 0, now))
            .await
            .unwrap();
    }
    want
}

/// Check the batches against the rows: no job twice, each batch's total and
/// lines equal to the shares of its jobs. Returns (jobs seen, sum of totals).
async fn check_batches(
    store: &Store,
    batches: &[Value],
    want: &HashMap<String, (String, u64)>,
) -> (HashSet<String>, u64) {
    let mut seen = HashSet::new();
    let mut sum = 0u64;
    for b in batches {
        let id = b["batch_id"].as_str().unwrap();
        let mut lines: BTreeMap<String, u64> = BTreeMap::new();
        for job in store.payout_batch_jobs(id).await.unwrap() {
            assert!(seen.insert(job.clone()), "{job} is in two batches");
            let (w, share) = want
                .get(&job)
                .unwrap_or_else(|| panic!("unknown job {job}"));
            *lines.entry(w.clone()).or_default() += share;
        }
        let total: u64 = lines.values().sum();
        assert_eq!(b["total_micro_usd"].as_u64().unwrap(), total, "{b}");
        let got: BTreeMap<String, u64> = b["payouts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["wallet"].as_str().unwrap().to_string(),
                    l["amount_micro_usd"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, lines, "{b}");
        sum += total;
    }
    (seen, sum)
}

fn plan_cmd(db: &str, min: u64) -> Command {
    let mut c = Command::new(SGL);
    c.args(["coordinator", "payouts", "plan", "--database-url", db])
        .args(["--min-amount", &min.to_string()]);
    c
}

fn failing(out: std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// 20 `payouts plan` processes at once while usage rows keep arriving; then
/// a final sweep, mark-paid in a new process, and its refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_payout_plans_never_pay_a_row_twice_on_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("payouts", dir.path()) {
        eprintln!("backend: {}", db.backend);
        payouts_on(&db.url, dir.path()).await;
    }
}

async fn payouts_on(db: &str, dir: &std::path::Path) {
    // Migrated before the planners start, as a running coordinator would have.
    let store = Store::open(db).await.unwrap();
    let mut want = seed(&store, "a", 200).await;

    let planners: Vec<_> = (0..20)
        .map(|_| {
            plan_cmd(db, MIN_AMOUNT)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Jobs keep ending while the plans run.
    for i in 0..40 {
        let job = format!("late-{i}");
        let cost = 2_000 + i * 13;
        store
            .record_usage(&usage(&job, "n1", WALLET_B, MODEL, cost, now_ms()))
            .await
            .unwrap();
        want.insert(job, (payee(WALLET_B), operator_share(cost)));
    }
    let outputs = tokio::task::spawn_blocking(move || {
        planners
            .into_iter()
            .map(|p| ok(p.wait_with_output().unwrap()))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let mut batches: Vec<Value> = outputs
        .iter()
        .map(|o| serde_json::from_str::<Value>(o).unwrap())
        .filter(|b| !b["batch_id"].is_null())
        .collect();
    assert!(!batches.is_empty(), "no plan made a batch");
    let (seen, _) = check_batches(&store, &batches, &want).await;
    // The small operator stayed below the minimum in every plan.
    assert!(seen.iter().all(|j| want[j].0 != payee(WALLET_SMALL)));
    // Every row of the big operators seeded before the plans is in a batch.
    for (job, (w, _)) in &want {
        if job.starts_with("a-") && !job.contains("small") {
            assert!(seen.contains(job), "{job} ({w}) left out");
        }
    }

    // The final sweep (any amount) takes the rest, and writes its files.
    let (json_path, csv_path) = (dir.join("batch.json"), dir.join("batch.csv"));
    let out = ok(plan_cmd(db, 1)
        .args(["--out-json", json_path.to_str().unwrap()])
        .args(["--out-csv", csv_path.to_str().unwrap()])
        .output()
        .unwrap());
    let last: Value = serde_json::from_str(&out).unwrap();
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(file, last);
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("batch_id,wallet,amount_micro_usd,amount_usd,rows")
    );
    let csv_sum: u64 = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f[0], last["batch_id"].as_str().unwrap());
            f[2].parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(csv_sum, last["total_micro_usd"].as_u64().unwrap());
    batches.push(last.clone());
    let (seen, sum) = check_batches(&store, &batches, &want).await;
    // Sum of batches = every operator share owed, to the micro-dollar.
    assert_eq!(seen.len(), want.len());
    assert_eq!(sum, want.values().map(|(_, s)| s).sum::<u64>());
    let nothing: Value = serde_json::from_str(&ok(plan_cmd(db, 1).output().unwrap())).unwrap();
    assert!(nothing["batch_id"].is_null(), "{nothing}");

    // mark-paid in a process of its own (a restart since the plan).
    let id = last["batch_id"].as_str().unwrap();
    let paid: Value = serde_json::from_str(&ok(sgl(&[
        "coordinator",
        "payouts",
        "mark-paid",
        id,
        "--tx",
        "0xfeedbeef",
        "--database-url",
        db,
    ])))
    .unwrap();
    assert_eq!(paid["state"], "paid");
    assert_eq!(paid["tx_hash"], "0xfeedbeef");
    assert_eq!(paid["total_micro_usd"], last["total_micro_usd"]);
    let again = failing(sgl(&[
        "coordinator",
        "payouts",
        "mark-paid",
        id,
        "--tx",
        "0x0123",
        "--database-url",
        db,
    ]));
    assert!(
        again.contains("already marked paid") && again.contains("0xfeedbeef"),
        "{again}"
    );
    let unknown = failing(sgl(&[
        "coordinator",
        "payouts",
        "mark-paid",
        "pb-nope",
        "--tx",
        "0x01",
        "--database-url",
        db,
    ]));
    assert!(unknown.contains("no payout batch pb-nope"), "{unknown}");
    let bad_tx = failing(sgl(&[
        "coordinator",
        "payouts",
        "mark-paid",
        batches[0]["batch_id"].as_str().unwrap(),
        "--tx",
        "has space",
        "--database-url",
        db,
    ]));
    assert!(bad_tx.contains("--tx"), "{bad_tx}");
    // The planned batches are untouched by the refusals.
    let shown: Value = serde_json::from_str(&ok(sgl(&[
        "coordinator",
        "payouts",
        "show",
        batches[0]["batch_id"].as_str().unwrap(),
        "--database-url",
        db,
    ])))
    .unwrap();
    assert_eq!(shown["state"], "planned");
    assert_eq!(shown["total_micro_usd"], batches[0]["total_micro_usd"]);
    store.close().await;
}

/// The store alone: 20 planners in one process over one pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_payout_plans_race_on_both_stores() {
    pay_common::stores::each_backend("payout_race", |t| async move {
        let want = seed(&t.store, "r", 120).await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let s = t.store.clone();
                tokio::spawn(async move { s.plan_payout(Micros(1)).await.unwrap() })
            })
            .collect();
        let mut batches = Vec::new();
        for task in tasks {
            if let Some(b) = task.await.unwrap() {
                batches.push(serde_json::json!({
                    "batch_id": b.id,
                    "total_micro_usd": b.total.0,
                    "payouts": b.payouts.iter().map(|l| serde_json::json!({
                        "wallet": l.wallet, "amount_micro_usd": l.amount.0,
                    })).collect::<Vec<_>>(),
                }));
            }
        }
        let (seen, sum) = check_batches(&t.store, &batches, &want).await;
        assert_eq!(seen.len(), want.len());
        assert_eq!(sum, want.values().map(|(_, s)| s).sum::<u64>());
        let id = batches[0]["batch_id"].as_str().unwrap().to_string();
        assert!(t.store.mark_payout_paid(&id, "0x1").await.unwrap().is_ok());
        let twice = t.store.mark_payout_paid(&id, "0x2").await.unwrap();
        assert!(
            matches!(twice, Err(sgl::store::MarkPaidRefused::AlreadyPaid { ref tx_hash, .. }) if tx_hash == "0x1"),
            "{twice:?}"
        );
        t
    })
    .await;
}

/// What the endpoint must say, from the rows alone.
fn expected_earnings(rows: &[UsageRow], paid: &HashSet<String>, days: i64) -> Value {
    let today = now_ms() / DAY_MS;
    let first = today - days + 1;
    let mut by_day: BTreeMap<i64, [u64; 5]> = BTreeMap::new();
    let mut by_model: BTreeMap<String, [u64; 5]> = BTreeMap::new();
    let mut lifetime = [0u64; 5];
    let mut window = [0u64; 5];
    for r in rows {
        let earned = r.operator_share.0;
        let p = if paid.contains(&r.job_id) { earned } else { 0 };
        let add = |t: &mut [u64; 5]| {
            t[0] += 1;
            t[1] += r.cost.0;
            t[2] += earned;
            t[3] += p;
            t[4] += r.completion_tokens as u64;
        };
        add(&mut lifetime);
        let day = r.created_at / DAY_MS;
        if day >= first {
            add(&mut window);
            add(by_day.entry(day).or_default());
            add(by_model.entry(r.model.clone()).or_default());
        }
    }
    let t = |t: &[u64; 5]| {
        serde_json::json!({"jobs": t[0], "revenue": t[1], "earned": t[2], "paid": t[3],
            "unpaid": t[2] - t[3], "completion_tokens": t[4]})
    };
    serde_json::json!({
        "lifetime": t(&lifetime),
        "window": t(&window),
        "by_day": by_day.iter().map(|(d, v)| {
            let mut o = t(v);
            o["day"] = sgl::timefmt::format_rfc3339((*d as u64) * 86_400)[..10].into();
            o
        }).collect::<Vec<_>>(),
        "by_model": by_model.iter().map(|(m, v)| {
            let mut o = t(v);
            o["model"] = m.clone().into();
            o
        }).collect::<Vec<_>>(),
    })
}

/// The endpoint's answer in the shape of [`expected_earnings`].
fn reduce(e: &Value) -> Value {
    let t = |t: &Value| {
        serde_json::json!({"jobs": t["jobs"], "revenue": t["revenue_micro_usd"],
            "earned": t["earned_micro_usd"], "paid": t["paid_micro_usd"],
            "unpaid": t["unpaid_micro_usd"], "completion_tokens": t["completion_tokens"]})
    };
    let list = |key: &str, name: &str| {
        e[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                let mut o = t(x);
                o[name] = x[name].clone();
                o
            })
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "lifetime": t(&e["lifetime"]),
        "window": t(&e["window"]),
        "by_day": list("by_day", "day"),
        "by_model": list("by_model", "model"),
    })
}

async fn get_earnings(base: &str, node: &str, headers: &[(&str, String)]) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}/grid/nodes/{node}/earnings"));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn signed(k: &str, node: &str, nonce: &str) -> Vec<(&'static str, String)> {
    let path = format!("/grid/nodes/{node}/earnings");
    xauth_headers(&key(k), "GET", &path, b"", now_ms(), nonce)
}

/// The node's id and token from its node.json, once registered.
fn registered(dir: &str) -> (String, String) {
    let f = sgl::node::identity_files::load_node_file(std::path::Path::new(dir)).unwrap();
    (f.node_id.unwrap(), f.auth_token.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earnings_match_the_usage_rows_and_refuse_strangers_on_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    for db in pay_common::stores::cli_databases("earnings", dir.path()) {
        eprintln!("backend: {}", db.backend);
        earnings_on(&db.url, dir.path()).await;
    }
}

async fn earnings_on(db: &str, dir: &std::path::Path) {
    let coord = CoordinatorProc::start(&["--database-url", db]);
    let base = coord.base.clone();
    let owner = format!("{:#x}", address(&key(ANVIL0)));
    let (a, b) = (dir.join("node-a"), dir.join("node-b"));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
    let (a, b) = (
        a.to_str().unwrap().to_string(),
        b.to_str().unwrap().to_string(),
    );
    node_init(&a, &base, &owner);
    node_init(&b, &base, OPERATOR);
    let _na = node_start(&a, &["--engine", "echo"], Stdio::null());
    let _nb = node_start(&b, &["--engine", "echo"], Stdio::null());
    grid_support::wait_node_active(&a, Duration::from_secs(60));
    grid_support::wait_node_active(&b, Duration::from_secs(60));
    let (id_a, token_a) = registered(&a);
    let (_, token_b) = registered(&b);

    // One real paid job through the grid, then known rows over several days
    // and two models (one row older than the 30-day window).
    let key_ = grid_support::funded_api_key(db, "0x2222222222222222222222222222222222222222", "1");
    ok(sgl(&[
        "chat",
        "--coordinator",
        &base,
        "--api-key",
        &key_,
        "hello",
    ]));
    let store = Store::open(db).await.unwrap();
    let now = now_ms();
    for (i, (days_ago, model, cost)) in [
        (0, MODEL, 12_345u64),
        (0, "other-model", 777),
        (1, MODEL, 50_000),
        (2, "other-model", 9),
        (5, MODEL, 1_000_001),
        (40, MODEL, 4_242),
    ]
    .into_iter()
    .enumerate()
    {
        let at = now - days_ago * DAY_MS;
        store
            .record_usage(&usage(&format!("e-{i}"), &id_a, &owner, model, cost, at))
            .await
            .unwrap();
    }
    let rows_a = |rows: Vec<UsageRow>| -> Vec<UsageRow> {
        rows.into_iter().filter(|r| r.node_id == id_a).collect()
    };
    let rows = rows_a(store.usage_rows(10_000).await.unwrap());
    assert!(rows.len() >= 6, "{rows:?}");

    let (status, by_token) = get_earnings(&base, &id_a, &[("X-Node-Auth", token_a.clone())]).await;
    assert_eq!(status, 200, "{by_token}");
    assert_eq!(by_token["node_id"], id_a);
    assert_eq!(by_token["operator_wallet"], owner);
    assert_eq!(by_token["days"], 30);
    assert_eq!(
        reduce(&by_token),
        expected_earnings(&rows, &HashSet::new(), 30)
    );
    let (status, by_owner) =
        get_earnings(&base, &id_a, &signed(ANVIL0, &id_a, "nonce-owner-1")).await;
    assert_eq!(status, 200, "{by_owner}");
    assert_eq!(by_owner, by_token);
    let cli: Value = serde_json::from_str(&ok(sgl(&[
        "node",
        "earnings",
        "--config-dir",
        &a,
        "--json",
    ])))
    .unwrap();
    assert_eq!(cli, by_token);
    let text = ok(sgl(&[
        "node",
        "earnings",
        "--config-dir",
        &a,
        "--days",
        "3",
    ]));
    assert!(text.contains("lifetime") && text.contains(MODEL), "{text}");

    // Strangers: another node's token, another wallet, nothing at all.
    let (status, body) = get_earnings(&base, &id_a, &[("X-Node-Auth", token_b)]).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get_earnings(&base, &id_a, &signed(ANVIL1, &id_a, "nonce-other-1")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "not_node_owner");
    let (status, body) = get_earnings(&base, &id_a, &[]).await;
    assert_eq!(status, 401, "{body}");
    // A replayed owner signature is refused too.
    let (status, _) = get_earnings(&base, &id_a, &signed(ANVIL0, &id_a, "nonce-owner-1")).await;
    assert_eq!(status, 401);

    // Paid vs unpaid follows the payout batches.
    let batch: Value = serde_json::from_str(&ok(plan_cmd(db, 1).output().unwrap())).unwrap();
    let id = batch["batch_id"].as_str().unwrap();
    let (_, planned) = get_earnings(&base, &id_a, &[("X-Node-Auth", token_a.clone())]).await;
    let earned = planned["lifetime"]["earned_micro_usd"].as_u64().unwrap();
    assert_eq!(planned["lifetime"]["in_payout_batch_micro_usd"], earned);
    assert_eq!(planned["lifetime"]["unpaid_micro_usd"], earned);
    ok(sgl(&[
        "coordinator",
        "payouts",
        "mark-paid",
        id,
        "--tx",
        "0xabc",
        "--database-url",
        db,
    ]));
    let paid_jobs: HashSet<String> = store
        .payout_batch_jobs(id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let (_, after) = get_earnings(&base, &id_a, &[("X-Node-Auth", token_a)]).await;
    assert_eq!(reduce(&after), expected_earnings(&rows, &paid_jobs, 30));
    assert_eq!(after["lifetime"]["unpaid_micro_usd"], 0);
    assert_eq!(after["lifetime"]["in_payout_batch_micro_usd"], 0);
    store.close().await;
}
