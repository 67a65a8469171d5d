//! The coordinator as a real process serving the Machines API
//! (`--compute-provider vultr --compute-provider digitalocean`, tokens and
//! API roots from the environment): paid by the official x402 Python
//! client, killed between the order and the provider's answer, and driven
//! by `sgl compute`.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::compute_support::server::call;
use crate::compute_support::{start_both, StandIn, DO_TOKEN, SSH_KEY, VULTR_TOKEN};
use crate::grid_support::{
    free_port, funded_api_key, python_has, run_py, sgl_ok, wait_until, Proc, SGL,
};
use crate::pay_common::facilitator;
use crate::pay_common::server::PAY_TO;
use crate::pay_common::stores::cli_databases;

const SECRET: &str = "4242424242424242424242424242424242424242424242424242424242424242";

/// `sgl coordinator serve` with both providers on their stand-ins.
fn coordinator(db: &str, port: u16, vultr: &StandIn, dig: &StandIn, extra: &[&str]) -> Proc {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_order_and_provider_answer_reconciles_to_one_state() {
    let dir = tempfile::tempdir().unwrap();
    for db in cli_databases("machines_kill", dir.path()) {
        let (vultr, dig) = start_both().await;
        let wallet = "0x3000000000000000000000000000000000000003";
        let key = funded_api_key(&db.url, wallet, "1");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut c = coordinator(&db.url, port, &vultr, &dig, &["--dev"]);

        // The stand-in creates the machine, then never answers.
        vultr.state.hang_create.store(true, Ordering::SeqCst);
        let (b, k) = (base.clone(), key.clone());
        let pending = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{b}/compute/provision"))
                .header("x-api-key", k)
                .json(&vultr_order(true))
                .send()
                .await
        });
        let state = vultr.state.clone();
        wait_until(
            "the provider to receive the create",
            Duration::from_secs(30),
            || state.creates.load(Ordering::SeqCst) == 1,
        );
        // SIGKILL between the written order and the provider's answer.
        c.0.kill().unwrap();
        c.0.wait().unwrap();
        let _ = pending.await;
        let held = crate::grid_support::balance(&db.url, wallet);
        assert!(held.contains("held 0.2016 USD"), "{held}");

        vultr.state.hang_create.store(false, Ordering::SeqCst);
        let _c = coordinator(&db.url, port, &vultr, &dig, &["--dev"]);
        let (st, l, _) = call(
            Method::GET,
            &format!("{base}/compute/instances"),
            Some(&key),
            None,
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{l}");
        let list = l["instances"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{l}");
        // Found by its tag and adopted: active and charged once.
        assert_eq!(list[0]["status"], "active", "{l}");
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
        let order = json!({"plan": "do:s-1vcpu-1gb", "provider": "digitalocean", "region": "sfo3",
            "os_id": 123456789u64, "label": "py", "prepaid_hours": 24, "ssh_public_key": SSH_KEY});
        let out = run_py("x402_machines_pay.py", &[&base, &order.to_string()]).await;
        let ids: Vec<&str> = out.lines().rev().take(2).collect();
        assert_eq!(dig.state.machine_count(), 2);
        // The payer owns them: its API key lists both.
        let payer = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
        let key = sgl_ok(&[
            "coordinator",
            "keys",
            "create",
            "--wallet",
            payer,
            "--database-url",
            &db.url,
        ]);
        let (st, l, _) = call(
            Method::GET,
            &format!("{base}/compute/instances"),
            Some(key.trim()),
            None,
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let listed: Vec<&str> = l["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        for id in ids {
            assert!(listed.contains(&id), "{id} not in {listed:?}");
        }
        assert_eq!(fac.state.settle_calls.load(Ordering::SeqCst), 2);
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
        let key = sgl_ok(&[
            "coordinator",
            "keys",
            "create",
            "--wallet",
            payer,
            "--database-url",
            &db.url,
        ]);
        let key = key.trim().to_owned();
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
