//! The coordinator as a real process serving the Machines API
//! (`--compute-provider vultr --compute-provider digitalocean`, tokens and
//! API roots from the environment): each provider paid by the official
//! x402 Python client and by the official MPP Python client (pympp),
//! killed between the order and the provider's answer (with credits held,
//! and with per-request payments in flight), and driven by `sgl compute`.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::compute_support::server::call;
use crate::compute_support::{start_both, StandIn, DO_TOKEN, SSH_KEY, VULTR_TOKEN};
use crate::grid_support::{
    api_key, free_port, funded_api_key, python_has, run_py_with, wait_until, Proc, SGL,
};
use crate::pay_common::facilitator;
use crate::pay_common::server::PAY_TO;
use crate::pay_common::signing::{self, PayParams};
use crate::pay_common::stores::cli_databases;

pub(crate) const SECRET: &str = "4242424242424242424242424242424242424242424242424242424242424242";

/// `sgl coordinator serve` with both providers on their stand-ins.
pub(crate) fn coordinator(
    db: &str,
    port: u16,
    vultr: &StandIn,
    dig: &StandIn,
    extra: &[&str],
) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "coordinator",
        "serve",
        "--listen",
        &listen,
        "--database-url",
        db,
        "--compute-provider",
        "vultr",
        "--compute-provider",
        "digitalocean",
        "--compute-poll-interval-ms",
        "10",
        "--compute-poll-attempts",
        "50",
    ];
    args.extend_from_slice(extra);
    let child = Command::new(SGL)
        .args(&args)
        .env("VULTR_API_KEY", VULTR_TOKEN)
        .env("DIGITALOCEAN_API_TOKEN", DO_TOKEN)
        .env("SGL_VULTR_API_URL", &vultr.url)
        .env("SGL_DIGITALOCEAN_API_URL", &dig.url)
        .env("SGL_COMPUTE_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

fn vultr_order(credits: bool) -> Value {
    json!({"plan": "vc2-1c-1gb", "region": "ewr", "os_id": 2284, "label": "proc",
        "prepaid_hours": 24, "use_credits": credits})
}

/// Send `body` to `url` in the background, wait until `arrived` holds
/// (what the provider was asked), then SIGKILL the coordinator `c`: the
/// answer is never read.
async fn kill_when(
    c: &mut Proc,
    sends: Vec<tokio::task::JoinHandle<()>>,
    what: &str,
    arrived: impl FnMut() -> bool,
) {
    wait_until(what, Duration::from_secs(30), arrived);
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    for s in sends {
        let _ = s.await;
    }
}

/// The instances an API key lists.
async fn instances(base: &str, key: &str) -> Vec<Value> {
    let (st, l, _) = call(
        Method::GET,
        &format!("{base}/compute/instances"),
        Some(key),
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{l}");
    l["instances"].as_array().unwrap().clone()
}

/// Both stand-ins, a `--dev` coordinator on them, and an API key of a
/// wallet holding $1 of credits.
struct Credited {
    vultr: StandIn,
    dig: StandIn,
    key: String,
    port: u16,
    base: String,
    c: Proc,
}

async fn credited(db: &str, wallet: &str) -> Credited {
    let (vultr, dig) = start_both().await;
    let key = funded_api_key(db, wallet, "1");
    let port = free_port();
    let c = coordinator(db, port, &vultr, &dig, &["--dev"]);
    Credited {
        vultr,
        dig,
        key,
        port,
        base: format!("http://127.0.0.1:{port}"),
        c,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_order_and_provider_answer_reconciles_to_one_state() {
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_kill", dir.path()) {
        let wallet = "0x3000000000000000000000000000000000000003";
        let Credited {
            vultr,
            dig,
            key,
            port,
            base,
            mut c,
        } = credited(&db.url, wallet).await;

        // The stand-in creates the machine, then never answers; SIGKILL
        // between the written order and the provider's answer.
        vultr.state.hang_create.store(true, Ordering::SeqCst);
        let send = send_in_background(
            format!("{base}/compute/provision"),
            Some(key.clone()),
            vultr_order(true),
            vec![],
        );
        let state = vultr.state.clone();
        kill_when(&mut c, vec![send], "the provider to create", || {
            state.creates.load(Ordering::SeqCst) == 1
        })
        .await;
        let held = crate::grid_support::balance(&db.url, wallet);
        assert!(held.contains("held 0.2016 USD"), "{held}");

        vultr.state.hang_create.store(false, Ordering::SeqCst);
        let _c = coordinator(&db.url, port, &vultr, &dig, &["--dev"]);
        let list = instances(&base, &key).await;
        assert_eq!(list.len(), 1, "{list:?}");
        // Found by its tag and adopted: active and charged once.
        assert_eq!(list[0]["status"], "active", "{list:?}");
        assert!(list[0]["ip_address"].is_string());
        let balance = crate::grid_support::balance(&db.url, wallet);
        assert!(
            balance.contains("balance 0.7984 USD, held 0.00 USD"),
            "{}: {balance}",
            db.backend
        );
        let tag = format!("sgl-order-{}", list[0]["id"].as_str().unwrap());
        assert_eq!(vultr.state.creates_for(&tag), 1);
        assert_eq!(vultr.state.max_creates_per_tag(), 1);
        assert_eq!(vultr.state.machine_count(), 1);
    }
}

/// The payment headers answering the 402 that an unpaid `body` at `url`
/// gets: x402 v1 (`X-PAYMENT`) or MPP (`Authorization: Payment`), signed
/// by Anvil key #0.
async fn paid_headers(url: &str, body: &Value, mpp: bool) -> Vec<(&'static str, String)> {
    let (st, challenge, h) = call(Method::POST, url, None, Some(body), &[]).await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{challenge}");
    let k = signing::key(signing::ANVIL0);
    if mpp {
        let c = h["www-authenticate"].to_str().unwrap();
        vec![("Authorization", signing::mpp_credential(&k, c, None))]
    } else {
        let amount: u64 = challenge["accepts"][0]["maxAmountRequired"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        vec![("X-PAYMENT", PayParams::new(PAY_TO, amount).x402_v1(&k))]
    }
}

/// Send `body` to `url` with `headers` in the background (its answer
/// never comes: the coordinator is killed first).
fn send_in_background(
    url: String,
    key: Option<String>,
    body: Value,
    headers: Vec<(&'static str, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut req = reqwest::Client::new().post(url).json(&body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        for (n, v) in headers {
            req = req.header(n, v);
        }
        let _ = req.send().await;
    })
}

/// A wallet's orders, as a new API key of it lists them.
async fn orders_of(base: &str, db: &str, wallet: &str) -> Vec<Value> {
    instances(base, &api_key(db, wallet)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_provider_saw_the_order_reconciles_to_no_charge() {
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_kill_early", dir.path()) {
        let wallet = "0x3000000000000000000000000000000000000004";
        let Credited {
            vultr,
            dig,
            key,
            port,
            base,
            mut c,
        } = credited(&db.url, wallet).await;

        // The create request arrives, but the provider never books the
        // machine nor answers (lost on the way, from the provider's side).
        // SIGKILL with the order written (and its price held) and no
        // machine at the provider.
        vultr.state.hang_before_create.store(true, Ordering::SeqCst);
        let send = send_in_background(
            format!("{base}/compute/provision"),
            Some(key.clone()),
            vultr_order(true),
            vec![],
        );
        let state = vultr.state.clone();
        kill_when(&mut c, vec![send], "the create request to arrive", || {
            state.create_requests.load(Ordering::SeqCst) == 1
        })
        .await;
        let held = crate::grid_support::balance(&db.url, wallet);
        assert!(held.contains("held 0.2016 USD"), "{held}");

        vultr
            .state
            .hang_before_create
            .store(false, Ordering::SeqCst);
        let _c = coordinator(&db.url, port, &vultr, &dig, &["--dev"]);
        let list = instances(&base, &key).await;
        assert_eq!(list.len(), 1, "{list:?}");
        // Asked by its tag, the provider has no machine: void, the hold
        // released whole, nothing charged, nothing created.
        assert_eq!(list[0]["status"], "failed", "{list:?}");
        assert!(list[0]["provider_instance_id"].is_null());
        let balance = crate::grid_support::balance(&db.url, wallet);
        assert!(
            balance.contains("balance 1.00 USD, held 0.00 USD"),
            "{}: {balance}",
            db.backend
        );
        let tag = format!("sgl-order-{}", list[0]["id"].as_str().unwrap());
        assert_eq!(vultr.state.creates_for(&tag), 0);
        assert_eq!(vultr.state.creates.load(Ordering::SeqCst), 0);
        assert_eq!(vultr.state.machine_count(), 0);
        // The restarted coordinator serves new orders as usual.
        let (st, v, _) = call(
            Method::POST,
            &format!("{base}/compute/provision"),
            Some(&key),
            Some(&vultr_order(true)),
            &[],
        )
        .await;
        assert_eq!(
            (st, v["order"]["status"].as_str()),
            (StatusCode::OK, Some("active")),
            "{v}"
        );
        assert_eq!(vultr.state.max_creates_per_tag(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_per_request_payments_in_flight_reconciles_to_no_charge() {
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_kill_paid", dir.path()) {
        let (vultr, dig) = start_both().await;
        let fac = facilitator::start().await;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let pay_to = format!("{PAY_TO:#x}");
        let args = ["--pay-to", &pay_to, "--facilitator-url", &fac.url, "--mpp"];
        let mut c = coordinator(&db.url, port, &vultr, &dig, &args);

        // An x402 order on Vultr and an MPP order on DigitalOcean: each
        // payment verified (its authorization held only by this process),
        // each machine created at the provider, neither answer ever sent.
        vultr.state.hang_create.store(true, Ordering::SeqCst);
        dig.state.hang_create.store(true, Ordering::SeqCst);
        let url = format!("{base}/compute/provision");
        let do_order = json!({"plan": "do:s-1vcpu-1gb", "region": "nyc3", "os_id": 123456789u64,
            "label": "mpp", "prepaid_hours": 24, "ssh_public_key": SSH_KEY});
        let x402 = paid_headers(&url, &vultr_order(false), false).await;
        let mpp = paid_headers(&url, &do_order, true).await;
        let sends = vec![
            send_in_background(url.clone(), None, vultr_order(false), x402),
            send_in_background(url.clone(), None, do_order, mpp),
        ];
        let (vs, ds) = (vultr.state.clone(), dig.state.clone());
        kill_when(&mut c, sends, "both providers to create", || {
            vs.creates.load(Ordering::SeqCst) == 1 && ds.creates.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(vultr.state.machine_count() + dig.state.machine_count(), 2);

        vultr.state.hang_create.store(false, Ordering::SeqCst);
        dig.state.hang_create.store(false, Ordering::SeqCst);
        let _c = coordinator(&db.url, port, &vultr, &dig, &args);
        let payer = format!("{:#x}", signing::address(&signing::key(signing::ANVIL0)));
        let orders = orders_of(&base, &db.url, &payer).await;
        assert_eq!(orders.len(), 2, "{orders:?}");
        // The payments were never settled, so neither machine may live:
        // both were found by tag and destroyed, both orders void, and
        // nothing was charged or credited.
        for o in &orders {
            assert_eq!(o["status"], "failed", "{}: {o}", db.backend);
            assert!(o["tx_hash"].is_null(), "{o}");
            let tag = format!("sgl-order-{}", o["id"].as_str().unwrap());
            let stand = if o["provider"] == "vultr" {
                &vultr
            } else {
                &dig
            };
            assert_eq!(stand.state.creates_for(&tag), 1, "{o}");
        }
        let mut funding: Vec<&str> = orders
            .iter()
            .map(|o| o["payment"].as_str().unwrap())
            .collect();
        funding.sort_unstable();
        assert_eq!(funding, ["mpp", "x402-v1"]);
        assert_eq!(vultr.state.machine_count() + dig.state.machine_count(), 0);
        assert_eq!(vultr.state.max_creates_per_tag(), 1);
        assert_eq!(dig.state.max_creates_per_tag(), 1);
        assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 0);
        let balance = crate::grid_support::balance(&db.url, &payer);
        assert!(
            balance.contains("balance 0.00 USD, held 0.00 USD"),
            "{}: {balance}",
            db.backend
        );
    }
}

/// One rental per provider, each by its own payer (Anvil keys #0 and #1),
/// so that each payer's orders are those of one provider: the provider,
/// its order (seed 000's example, with an SSH key), the payer's key, and
/// the order's hourly price.
fn rentals() -> [(&'static str, Value, String, u64); 2] {
    [
        (
            "vultr",
            json!({"plan": "vc2-1c-1gb", "region": "ewr", "os_id": 2284,
                "label": "paid-vps", "prepaid_hours": 24, "ssh_public_key": SSH_KEY}),
            format!("0x{}", signing::ANVIL0),
            // vc2-1c-1gb: $0.007/h, +20 %.
            8_400,
        ),
        (
            "digitalocean",
            json!({"plan": "do:s-1vcpu-1gb", "provider": "digitalocean", "region": "sfo3",
                "os_id": 123456789u64, "label": "paid-vps", "prepaid_hours": 24,
                "ssh_public_key": SSH_KEY}),
            format!("0x{}", signing::ANVIL1),
            // s-1vcpu-1gb: $0.00893/h, +20 %.
            10_716,
        ),
    ]
}

fn payer_of(key: &str) -> String {
    let k = signing::key(key.trim_start_matches("0x"));
    format!("{:#x}", signing::address(&k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_mpp_python_client_rents_a_machine_without_an_account() {
    if !python_has("mpp, mpp.methods.evm, eth_account, httpx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_pympp", dir.path()) {
        let (vultr, dig) = start_both().await;
        let fac = facilitator::start().await;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let pay_to = format!("{PAY_TO:#x}");
        let _c = coordinator(
            &db.url,
            port,
            &vultr,
            &dig,
            &["--pay-to", &pay_to, "--facilitator-url", &fac.url, "--mpp"],
        );
        for (n, (provider, order, key, hourly)) in rentals().into_iter().enumerate() {
            let out = run_py_with(
                "mpp_machines_pay.py",
                &[&base, &order.to_string()],
                &[("SGL_TEST_PAYER_KEY", &key)],
            )
            .await;
            let field = |name: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("no {name}= in {out}"))
                    .to_owned()
            };
            let (payer, id) = (field("payer"), field("order"));
            assert_eq!(payer, payer_of(&key));
            // Provision and the keyed extension settled; the
            // unauthenticated extension and the replay did not.
            let settled = fac.state.settle_calls.load(Ordering::SeqCst);
            assert_eq!(settled, 2 * (n + 1), "{provider}");
            let stand = if provider == "vultr" { &vultr } else { &dig };
            assert_eq!(stand.state.machine_count(), 1, "{provider}");
            let orders = orders_of(&base, &db.url, &payer).await;
            assert_eq!(orders.len(), 1, "{provider}: {orders:?}");
            let o = &orders[0];
            assert_eq!(
                (
                    o["id"].as_str(),
                    o["payment"].as_str(),
                    o["provider"].as_str()
                ),
                (Some(id.as_str()), Some("mpp"), Some(provider))
            );
            assert_eq!(o["status"], "active", "{o}");
            // 24 h provisioned, 24 h extended.
            assert_eq!(o["paid_micros"], hourly * 48, "{o}");
            assert_eq!(o["prepaid_hours"], 48, "{o}");
            assert_eq!(o["ssh_key"], true, "{o}");
        }
        assert_eq!(vultr.state.max_creates_per_tag(), 1);
        assert_eq!(dig.state.max_creates_per_tag(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_x402_python_client_rents_a_machine_from_the_coordinator() {
    if !python_has("x402, x402.http.clients.httpx, eth_account, httpx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_py", dir.path()) {
        let (vultr, dig) = start_both().await;
        let fac = facilitator::start().await;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let pay_to = format!("{PAY_TO:#x}");
        let _c = coordinator(
            &db.url,
            port,
            &vultr,
            &dig,
            &["--pay-to", &pay_to, "--facilitator-url", &fac.url],
        );
        for (n, (provider, order, key, hourly)) in rentals().into_iter().enumerate() {
            let out = run_py_with(
                "x402_machines_pay.py",
                &[&base, &order.to_string()],
                &[("SGL_TEST_PAYER_KEY", &key)],
            )
            .await;
            let mut ids: Vec<&str> = out.lines().rev().take(2).collect();
            ids.sort_unstable();
            let stand = if provider == "vultr" { &vultr } else { &dig };
            assert_eq!(stand.state.machine_count(), 2, "{provider}");
            // The v2 and the v1 payment settled; the v1 replay did not.
            let settled = fac.state.settle_calls.load(Ordering::SeqCst);
            assert_eq!(settled, 2 * (n + 1), "{provider}");
            // The payer owns both, and only them: its API key lists them.
            let list = orders_of(&base, &db.url, &payer_of(&key)).await;
            let mut listed: Vec<&str> = list.iter().map(|i| i["id"].as_str().unwrap()).collect();
            listed.sort_unstable();
            assert_eq!(listed, ids, "{provider}");
            for o in &list {
                assert_eq!(o["provider"], provider, "{o}");
                assert_eq!(o["status"], "active", "{o}");
                assert_eq!(o["paid_micros"], hourly * 24, "{o}");
                assert!(o["ip_address"].is_string(), "{o}");
                assert!(o["payment"].as_str().unwrap().starts_with("x402"), "{o}");
            }
        }
        assert_eq!(vultr.state.max_creates_per_tag(), 1);
        assert_eq!(dig.state.max_creates_per_tag(), 1);
    }
}

/// `sgl compute ARGS` against `base`; stdout, or the failure's stderr.
fn sgl_compute(base: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(SGL)
        .args(["compute", "--url", base])
        .args(args)
        .env_remove("COMPUTE_API_KEY")
        .env_remove("SGL_WALLET_KEY_FILE")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn json_of(s: Result<String, String>) -> Value {
    serde_json::from_str(s.expect("sgl compute failed").trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sgl_compute_drives_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let wallet_file = dir.path().join("wallet.key");
    std::fs::write(&wallet_file, crate::pay_common::signing::ANVIL0).unwrap();
    let wallet_file = wallet_file.to_str().unwrap().to_owned();
    let ssh_file = dir.path().join("id.pub");
    std::fs::write(&ssh_file, SSH_KEY).unwrap();
    let ssh_file = ssh_file.to_str().unwrap().to_owned();
    for db in cli_databases("machines_cli", dir.path()) {
        let (vultr, dig) = start_both().await;
        let fac = facilitator::start().await;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let pay_to = format!("{PAY_TO:#x}");
        let _c = coordinator(
            &db.url,
            port,
            &vultr,
            &dig,
            &["--pay-to", &pay_to, "--facilitator-url", &fac.url],
        );
        let payer = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
        let key = api_key(&db.url, payer);
        let wk = ["--wallet-key-file", wallet_file.as_str()];

        let plans = json_of(sgl_compute(&base, &["plans", "--type", "vps", "--json"]));
        assert!(plans["plans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "vc2-1c-1gb"));
        let table = sgl_compute(&base, &["plans"]).unwrap();
        assert!(table.contains("do:s-1vcpu-1gb"), "{table}");
        assert!(sgl_compute(&base, &["regions"]).unwrap().contains("nyc3"));
        assert!(sgl_compute(&base, &["os"])
            .unwrap()
            .contains("Ubuntu 24.04"));

        // Credits bought with x402 from the wallet key (X-Auth signed).
        let t = json_of(sgl_compute(&base, &["topup", "2", "--json", wk[0], wk[1]]));
        assert_eq!(t["deposited_micros"], 2_000_000);
        let b = json_of(sgl_compute(
            &base,
            &["balance", "--json", "--api-key", &key],
        ));
        assert_eq!(b["balance_micros"], 2_000_000);

        // A Vultr machine from credits, a DigitalOcean one paid with x402.
        let v = json_of(sgl_compute(
            &base,
            &[
                "provision",
                "vc2-1c-1gb",
                "ewr",
                "--os-id",
                "2284",
                "--credits",
                "--json",
                "--api-key",
                &key,
            ],
        ));
        let id = v["order"]["id"].as_str().unwrap().to_owned();
        assert_eq!(v["order"]["status"], "active");
        let d = json_of(sgl_compute(
            &base,
            &[
                "provision",
                "do:s-1vcpu-1gb",
                "nyc3",
                "--os-id",
                "123456789",
                "--ssh-key-file",
                &ssh_file,
                "--json",
                wk[0],
                wk[1],
            ],
        ));
        assert_eq!(
            (
                d["order"]["status"].as_str(),
                d["order"]["payment"].as_str()
            ),
            (Some("active"), Some("x402-v1"))
        );
        let did = d["order"]["id"].as_str().unwrap().to_owned();

        let l = json_of(sgl_compute(&base, &["list", "--json", "--api-key", &key]));
        assert_eq!(l["count"], 2);
        assert!(sgl_compute(&base, &["list", wk[0], wk[1]])
            .unwrap()
            .contains(&did));
        let s = json_of(sgl_compute(
            &base,
            &["show", &id, "--json", "--api-key", &key],
        ));
        assert_eq!(s["instance"]["password_available"], true);
        let p = json_of(sgl_compute(
            &base,
            &["password", &id, "--json", "--api-key", &key],
        ));
        assert!(p["access"]["password"]
            .as_str()
            .unwrap()
            .starts_with("v5{Fkvb"));
        let again = sgl_compute(&base, &["password", &id, "--api-key", &key]).unwrap_err();
        assert!(again.contains("409"), "{again}");
        let e = json_of(sgl_compute(
            &base,
            &[
                "extend",
                &id,
                "--hours",
                "24",
                "--credits",
                "--json",
                "--api-key",
                &key,
            ],
        ));
        assert_eq!(e["charged_micros"], 8_400 * 24);
        let r = json_of(sgl_compute(
            &base,
            &["resize", &id, "vc2-2c-4gb", "--json", "--api-key", &key],
        ));
        assert_eq!(r["instance"]["plan"], "vc2-2c-4gb");
        let down =
            sgl_compute(&base, &["resize", &id, "vc2-1c-1gb", "--api-key", &key]).unwrap_err();
        assert!(down.contains("downgrade_not_supported"), "{down}");
        let x = json_of(sgl_compute(
            &base,
            &["destroy", &did, "--json", wk[0], wk[1]],
        ));
        assert_eq!(x["status"], "destroyed");
        sgl_compute(&base, &["destroy", &id, "--api-key", &key]).unwrap();
        assert_eq!(vultr.state.machine_count() + dig.state.machine_count(), 0);
        let b = json_of(sgl_compute(
            &base,
            &["balance", "--json", "--api-key", &key],
        ));
        assert_eq!(b["balance_micros"], 2_000_000 - 2 * 8_400 * 24);
    }
}
