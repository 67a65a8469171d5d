//! The Machines HTTP API in process, over SQLite and PostgreSQL: the
//! catalogue, the lifecycle per provider (credits, x402, MPP), exact money
//! on provider failure and under concurrency, ownership, bad input.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sgl::money::Micros;

use crate::compute_support::server::{call, start_with, MachinesServer};
use crate::compute_support::SSH_KEY;
use crate::pay_common::server::PAY_TO;
use crate::pay_common::signing::{self, PayParams};
use crate::pay_common::stores::{each_backend, sqlite_store, TestStore};

const A: &str = "0x1000000000000000000000000000000000000001";
const B: &str = "0x2000000000000000000000000000000000000002";
/// vc2-1c-1gb: $0.007/h at the provider, +20 % markup.
const VC2_HOURLY: u64 = 8_400;
/// vc2-2c-4gb: $0.03/h, +20 %.
const VC2_4GB_HOURLY: u64 = 36_000;
/// s-1vcpu-1gb: $0.00893/h, +20 %.
const DO_HOURLY: u64 = 10_716;

fn vultr_order(hours: u64, credits: bool) -> Value {
    json!({"plan": "vc2-1c-1gb", "region": "ewr", "os_id": 2284, "label": "my vps",
        "prepaid_hours": hours, "use_credits": credits})
}

fn do_order(hours: u64) -> Value {
    json!({"plan": "do:s-1vcpu-1gb", "provider": "digitalocean", "region": "nyc3",
        "os_id": 123456789u64, "label": "do-vps", "prepaid_hours": hours,
        "ssh_public_key": SSH_KEY, "use_credits": true})
}

async fn provision(s: &MachinesServer, key: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let (st, v, _) = call(
        Method::POST,
        &format!("{}/compute/provision", s.base),
        key,
        Some(body),
        &[],
    )
    .await;
    (st, v)
}

async fn inst(
    s: &MachinesServer,
    key: &str,
    id: &str,
    verb: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let (m, path) = match verb {
        "show" => (Method::GET, format!("/compute/instances/{id}")),
        "destroy" => (Method::DELETE, format!("/compute/instances/{id}")),
        v => (Method::POST, format!("/compute/instances/{id}/{v}")),
    };
    let (st, v, _) = call(m, &format!("{}{path}", s.base), Some(key), body, &[]).await;
    (st, v)
}

fn is_json_error(v: &Value) -> bool {
    v["error"]["code"].is_string() && v["error"]["message"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_merges_providers_at_our_prices_and_survives_an_outage() {
    let s = start_with(sqlite_store().await).await;
    let (st, v, _) = call(
        Method::GET,
        &format!("{}/compute/plans", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let plans = v["plans"].as_array().unwrap();
    assert_eq!(v["count"], 9);
    assert_eq!(plans.len(), 9);
    let vc2 = plans.iter().find(|p| p["id"] == "vc2-1c-1gb").unwrap();
    assert_eq!(vc2["hourly_cost_micros"], VC2_HOURLY);
    assert_eq!(vc2["daily_cost_micros"], VC2_HOURLY * 24);
    assert_eq!(vc2["our_daily"], json!(0.2016));
    assert_eq!(vc2["monthly_cost"], json!(6.0));
    assert_eq!(vc2["provider"], "vultr");
    let d = plans.iter().find(|p| p["id"] == "do:s-1vcpu-1gb").unwrap();
    assert_eq!(
        (d["provider"].as_str(), d["hourly_cost_micros"].as_u64()),
        (Some("digitalocean"), Some(DO_HOURLY))
    );
    assert!(plans
        .iter()
        .all(|p| p["provider"] == "vultr" || p["id"].as_str().unwrap().starts_with("do:")));

    let (_, gpu, _) = call(
        Method::GET,
        &format!("{}/compute/plans?type=vcg", s.base),
        None,
        None,
        &[],
    )
    .await;
    let ids: Vec<&str> = gpu["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["vcg-a100-1c-6g-4vram", "do:gpu-h100x1-80gb"]);
    assert!(gpu["plans"][0]["type"] == "GPU" && gpu["plans"][0]["gpu_vram_gb"] == 4);
    let (st, bad, _) = call(
        Method::GET,
        &format!("{}/compute/plans?type=xl", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert!(st == StatusCode::BAD_REQUEST && is_json_error(&bad));

    let (_, r, _) = call(
        Method::GET,
        &format!("{}/compute/regions", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(r["regions"].as_array().unwrap().len(), 6);
    let (_, o, _) = call(
        Method::GET,
        &format!("{}/compute/os", s.base),
        None,
        None,
        &[],
    )
    .await;
    let os = o["os_options"].as_array().unwrap();
    assert_eq!(os.len(), 5);
    assert!(os
        .iter()
        .any(|o| o["id"] == 2284 && o["name"] == "Ubuntu 24.04 LTS x64"));

    // Cached: no refetch within the refresh interval.
    let calls = s.vultr.state.catalogue_calls.load(Ordering::SeqCst);
    call(
        Method::GET,
        &format!("{}/compute/plans", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(s.vultr.state.catalogue_calls.load(Ordering::SeqCst), calls);
    // Both providers down and the cache stale: the cached copy is served.
    s.vultr.state.down.store(true, Ordering::SeqCst);
    s.digitalocean.state.down.store(true, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(601));
    let (st, v, _) = call(
        Method::GET,
        &format!("{}/compute/plans", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert_eq!((st, v["count"].as_u64()), (StatusCode::OK, Some(9)));
    // Back up: the next stale read refetches.
    s.vultr.state.down.store(false, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(601));
    call(
        Method::GET,
        &format!("{}/compute/plans", s.base),
        None,
        None,
        &[],
    )
    .await;
    assert!(s.vultr.state.catalogue_calls.load(Ordering::SeqCst) > calls);
}

/// Pay a 402 answer with an x402 v1 payment from Anvil key #0.
async fn pay_x402(
    s: &MachinesServer,
    url: &str,
    body: &Value,
    key: Option<&str>,
) -> (StatusCode, Value) {
    pay_x402_from(s, signing::ANVIL0, url, body, key).await
}

/// Pay a 402 answer with an x402 v1 payment from wallet key `payer`.
async fn pay_x402_from(
    s: &MachinesServer,
    payer: &str,
    url: &str,
    body: &Value,
    key: Option<&str>,
) -> (StatusCode, Value) {
    let (st, challenge, h) = call(Method::POST, url, key, Some(body), &[]).await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{challenge}");
    assert_eq!(challenge["x402Version"], 1);
    assert!(h.contains_key("payment-required") && h.contains_key("www-authenticate"));
    let amount: u64 = challenge["accepts"][0]["maxAmountRequired"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let k = signing::key(payer);
    let mut params = PayParams::new(PAY_TO, amount);
    // The server's clock may have been moved forward; the payment must be
    // valid at its time.
    params.valid_before = u64::try_from(s.clock.now_ms() / 1000).unwrap() + 300;
    let payment = params.x402_v1(&k);
    let (st, v, _) = call(
        Method::POST,
        url,
        key,
        Some(body),
        &[("X-PAYMENT", payment)],
    )
    .await;
    (st, v)
}

fn anvil0() -> String {
    format!("{:#x}", signing::address(&signing::key(signing::ANVIL0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vultr_lifecycle_credits_x402_password_extend_resize_destroy_reap() {
    each_backend("machines_vultr", |t: TestStore| async move {
        let s = start_with(t).await;
        let key = s.funded_key(A, Micros(10_000_000)).await;
        let price = VC2_HOURLY * 24;

        let (st, v) = provision(&s, Some(&key), &vultr_order(24, true)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let o = &v["order"];
        let id = o["id"].as_str().unwrap().to_owned();
        assert_eq!(
            (
                o["status"].as_str(),
                o["plan"].as_str(),
                o["provider"].as_str()
            ),
            (Some("active"), Some("vc2-1c-1gb"), Some("vultr"))
        );
        assert!(o["ip_address"].as_str().unwrap().starts_with("192.0.2."));
        assert_eq!(o["vultr_instance_id"], o["provider_instance_id"]);
        assert_eq!(v["charged_micros"], price);
        assert!(
            !v.to_string().contains("Fkvb"),
            "no password in the provision answer"
        );
        assert_eq!(s.balance(A).await, Micros(10_000_000 - price));

        let (st, l, _) = call(
            Method::GET,
            &format!("{}/compute/instances", s.base),
            Some(&key),
            None,
            &[],
        )
        .await;
        assert_eq!((st, l["count"].as_u64()), (StatusCode::OK, Some(1)));
        assert!(!l.to_string().contains("Fkvb"));
        let (st, d) = inst(&s, &key, &id, "show", None).await;
        assert_eq!(
            (st, d["instance"]["password_available"].as_bool()),
            (StatusCode::OK, Some(true))
        );

        // The password once, then 409.
        let machine_id = o["provider_instance_id"].as_str().unwrap().to_owned();
        let expected_pw = s.vultr.state.machines.lock().unwrap()[&machine_id]
            .password
            .clone();
        let (st, p) = inst(&s, &key, &id, "password", None).await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(p["access"]["password"], expected_pw.as_str());
        assert_eq!(p["access"]["username"], "root");
        let (st, p2) = inst(&s, &key, &id, "password", None).await;
        assert!(st == StatusCode::CONFLICT && is_json_error(&p2));
        let (_, d) = inst(&s, &key, &id, "show", None).await;
        assert_eq!(d["instance"]["password_available"], false);

        // Extend with credits.
        let before = d["instance"]["expires_at_ms"].as_i64().unwrap();
        let (st, e) = inst(
            &s,
            &key,
            &id,
            "extend",
            Some(&json!({"extend_hours": 24, "use_credits": true})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{e}");
        assert_eq!(
            e["instance"]["expires_at_ms"].as_i64().unwrap(),
            before + 24 * 3_600_000
        );
        assert_eq!(s.balance(A).await, Micros(10_000_000 - 2 * price));

        // Resize up: the remaining prepaid value is kept to the micro-dollar.
        s.clock.advance(Duration::from_secs(3 * 3600 + 17));
        let (st, r) = inst(
            &s,
            &key,
            &id,
            "resize",
            Some(&json!({"plan": "vc2-2c-4gb"})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        let at = r["resize"]["resized_at_ms"].as_i64().unwrap();
        let old_exp = r["resize"]["previous_expires_at_ms"].as_i64().unwrap();
        assert_eq!(old_exp, before + 24 * 3_600_000);
        let value = (VC2_HOURLY as i128 * (old_exp - at) as i128 / 3_600_000) as u64;
        assert_eq!(r["resize"]["remaining_value_micros"], value);
        let new_exp = at + (value as i128 * 3_600_000 / VC2_4GB_HOURLY as i128) as i64;
        assert_eq!(r["instance"]["expires_at_ms"], new_exp);
        assert_eq!(r["instance"]["plan"], "vc2-2c-4gb");
        assert_eq!(
            s.vultr.state.machines.lock().unwrap()[&machine_id].plan,
            "vc2-2c-4gb"
        );
        assert_eq!(
            s.balance(A).await,
            Micros(10_000_000 - 2 * price),
            "a resize charges nothing"
        );
        // Down is refused (Vultr is upgrade-only), and nothing changes.
        let (st, r) = inst(
            &s,
            &key,
            &id,
            "resize",
            Some(&json!({"plan": "vc2-1c-1gb"})),
        )
        .await;
        assert_eq!(
            (st, r["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("downgrade_not_supported"))
        );
        let (_, d) = inst(&s, &key, &id, "show", None).await;
        assert_eq!(d["instance"]["plan"], "vc2-2c-4gb");

        // x402 without auth: the payer owns the machine.
        let (st, v) = pay_x402(
            &s,
            &format!("{}/compute/provision", s.base),
            &vultr_order(48, false),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["charged_micros"], VC2_HOURLY * 48);
        assert!(v["tx_hash"].as_str().unwrap().starts_with("0x"));
        assert_eq!(v["order"]["payment"], "x402-v1");
        let paid_id = v["order"]["id"].as_str().unwrap().to_owned();
        let owner = s
            .store
            .store
            .compute_order(&paid_id)
            .await
            .unwrap()
            .unwrap()
            .owner;
        assert_eq!(owner.as_str(), anvil0());
        assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 1);

        // Destroy.
        let (st, _) = inst(&s, &key, &id, "destroy", None).await;
        assert_eq!(st, StatusCode::OK);
        assert!(!s.vultr.state.live(&machine_id));
        let (_, d) = inst(&s, &key, &id, "show", None).await;
        assert_eq!(d["instance"]["status"], "destroyed");
        let (st, _) = inst(&s, &key, &id, "destroy", None).await;
        assert_eq!(st, StatusCode::CONFLICT);

        // The reaper: the paid machine expires after 48 h plus the grace.
        let paid_machine = s
            .store
            .store
            .compute_order(&paid_id)
            .await
            .unwrap()
            .unwrap()
            .provider_instance_id
            .unwrap();
        s.clock.advance(Duration::from_secs(48 * 3600 + 1800));
        assert_eq!(
            s.machines.reap_once().await,
            0,
            "expired, but within the grace"
        );
        s.clock.advance(Duration::from_secs(1860));
        assert_eq!(s.machines.reap_once().await, 1);
        assert!(!s.vultr.state.live(&paid_machine));
        let o = s
            .store
            .store
            .compute_order(&paid_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.state, "expired");

        // Every state change is an audit row.
        let events: Vec<String> = s
            .store
            .store
            .compute_audit(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.event)
            .collect();
        assert_eq!(
            events,
            [
                "ordered",
                "accepted",
                "active",
                "password_read",
                "extended",
                "resized",
                "destroyed"
            ]
        );
        let events: Vec<String> = s
            .store
            .store
            .compute_audit(&paid_id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.event)
            .collect();
        assert_eq!(events, ["ordered", "accepted", "paid", "active", "expired"]);
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digitalocean_lifecycle_ssh_key_disk_confirmation_destroy() {
    each_backend("machines_do", |t: TestStore| async move {
        let s = start_with(t).await;
        let key = s.funded_key(A, Micros(5_000_000)).await;
        let mut no_key = do_order(24);
        no_key.as_object_mut().unwrap().remove("ssh_public_key");
        let (st, v) = provision(&s, Some(&key), &no_key).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("ssh_key_required"))
        );

        let (st, v) = provision(&s, Some(&key), &do_order(24)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let id = v["order"]["id"].as_str().unwrap().to_owned();
        let droplet = v["order"]["provider_instance_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(v["order"]["plan"], "do:s-1vcpu-1gb");
        assert!(v["order"]["ip_address"]
            .as_str()
            .unwrap()
            .starts_with("198.51.100."));
        assert_eq!(s.balance(A).await, Micros(5_000_000 - DO_HOURLY * 24));
        assert_eq!(
            s.digitalocean.state.ssh_keys.lock().unwrap().as_slice(),
            [SSH_KEY]
        );
        let (st, p) = inst(&s, &key, &id, "password", None).await;
        assert_eq!(
            (st, p["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("no_password"))
        );

        // Disk growth needs the confirmation; a smaller disk is refused.
        let (st, r) = inst(
            &s,
            &key,
            &id,
            "resize",
            Some(&json!({"plan": "do:s-1vcpu-2gb"})),
        )
        .await;
        assert_eq!(
            (st, r["error"]["code"].as_str()),
            (
                StatusCode::BAD_REQUEST,
                Some("confirm_disk_resize_required")
            )
        );
        assert!(s.digitalocean.state.resizes.lock().unwrap().is_empty());
        let (st, r) = inst(
            &s,
            &key,
            &id,
            "resize",
            Some(&json!({"plan": "do:s-1vcpu-2gb", "confirm_disk_resize": true})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        assert_eq!(r["resize"]["disk_resized"], true);
        assert_eq!(
            s.digitalocean.state.resizes.lock().unwrap().as_slice(),
            [(droplet.clone(), "s-1vcpu-2gb".to_owned(), true)]
        );
        // Powered off, resized and powered on, in that order (the stand-in
        // refuses to resize a running droplet, as DigitalOcean does).
        let actions: Vec<String> = s
            .digitalocean
            .state
            .action_log
            .lock()
            .unwrap()
            .iter()
            .map(|(d, k)| format!("{d}:{k}"))
            .collect();
        assert_eq!(
            actions,
            ["power_off", "resize", "power_on"].map(|k| format!("{droplet}:{k}"))
        );
        let (st, r) = inst(&s, &key, &id, "resize", Some(&json!({"plan": "do:c-2"}))).await;
        assert_eq!(
            (st, r["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("disk_shrink_not_supported"))
        );
        let (st, r) = inst(
            &s,
            &key,
            &id,
            "resize",
            Some(&json!({"plan": "vc2-2c-4gb"})),
        )
        .await;
        assert_eq!(
            (st, r["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("provider_mismatch"))
        );

        let (st, e) = inst(
            &s,
            &key,
            &id,
            "extend",
            Some(&json!({"extend_hours": 5, "use_credits": true})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{e}");
        let (st, _) = inst(&s, &key, &id, "destroy", None).await;
        assert_eq!(st, StatusCode::OK);
        assert!(!s.digitalocean.state.live(&droplet));
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_return_exactly_what_was_paid() {
    each_backend("machines_refund", |t: TestStore| async move {
        let s = start_with(t).await;
        // Credits, and the provider refuses the create: the hold returns whole.
        let key = s.funded_key(A, Micros(1_000_000)).await;
        s.vultr.state.fail_create.store(true, Ordering::SeqCst);
        let (st, v) = provision(&s, Some(&key), &vultr_order(24, true)).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("provider_error")),
            "{v}"
        );
        assert_eq!(s.balance(A).await, Micros(1_000_000));
        let b = s
            .payments
            .store()
            .balance(&sgl::store::WalletId::new_unchecked(A))
            .await
            .unwrap();
        assert_eq!((b.held, b.total_spent), (Micros::ZERO, Micros::ZERO));
        s.vultr.state.fail_create.store(false, Ordering::SeqCst);

        // x402, and the provider refuses the create outright, with a 500 or
        // with a 4xx and its reason: the payment settles only after the
        // provider accepted, so nothing settles and nothing is owed; the
        // answer is a JSON error carrying the provider's reason.
        let url = format!("{}/compute/provision", s.base);
        for (switch, status) in [
            (&s.vultr.state.fail_create, 500),
            (&s.vultr.state.refuse_create, 400),
        ] {
            switch.store(true, Ordering::SeqCst);
            let (st, v) = pay_x402(&s, &url, &vultr_order(24, false), None).await;
            switch.store(false, Ordering::SeqCst);
            assert_eq!(
                (st, v["error"]["code"].as_str()),
                (StatusCode::BAD_GATEWAY, Some("provider_error")),
                "{v}"
            );
            let reason = if status == 500 {
                crate::compute_support::FAILURE
            } else {
                crate::compute_support::REFUSAL
            };
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(reason) && message.contains(&status.to_string()),
                "{message}"
            );
            assert!(v.get("refunded_micros").is_none(), "{v}");
        }
        assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 0);
        assert_eq!(s.balance(&anvil0()).await, Micros::ZERO);
        let refused = s
            .store
            .store
            .compute_orders_of(&sgl::store::WalletId::new_unchecked(anvil0()))
            .await
            .unwrap();
        assert_eq!(refused.len(), 2);
        assert!(refused
            .iter()
            .all(|o| o.state == "failed" && o.tx_hash.is_none()));
        assert_eq!(s.vultr.state.machine_count(), 0);

        // x402: the provider accepted, the payment settled, then the
        // machine never came up (500s): destroyed, and exactly the price
        // refunded to the payer's credits.
        s.vultr.state.fail_get.store(true, Ordering::SeqCst);
        let (st, v) = pay_x402(
            &s,
            &format!("{}/compute/provision", s.base),
            &vultr_order(30, false),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::BAD_GATEWAY, "{v}");
        let price = VC2_HOURLY * 30;
        assert_eq!(v["refunded_micros"], price);
        assert_eq!(s.facilitator.state.settle_calls.load(Ordering::SeqCst), 1);
        assert_eq!(s.balance(&anvil0()).await, Micros(price));
        assert_eq!(
            s.vultr.state.machine_count(),
            0,
            "the machine was destroyed"
        );
        let orders = s
            .store
            .store
            .compute_orders_of(&sgl::store::WalletId::new_unchecked(anvil0()))
            .await
            .unwrap();
        // The order whose machine never came up is the one that was paid.
        assert_eq!(orders.len(), 3);
        let paid: Vec<_> = orders.iter().filter(|o| o.tx_hash.is_some()).collect();
        assert_eq!(paid.len(), 1);
        assert_eq!(paid[0].state, "failed");
        let audit = s.store.store.compute_audit(&paid[0].id).await.unwrap();
        let refund = audit.iter().find(|a| a.event == "refunded").unwrap();
        assert_eq!(refund.amount, Some(Micros(price)));
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_credit_provisions_never_overdraw() {
    each_backend("machines_race", |t: TestStore| async move {
        let s = start_with(t).await;
        let price = VC2_HOURLY * 24;
        // Enough for 20 and a bit.
        let key = s.funded_key(A, Micros(price * 20 + 100_000)).await;
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (base, key) = (s.base.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let (st, v, _) = call(
                    Method::POST,
                    &format!("{base}/compute/provision"),
                    Some(&key),
                    Some(&vultr_order(24, true)),
                    &[],
                )
                .await;
                (st, v)
            }));
        }
        let mut ok = 0;
        let mut short = 0;
        for t in tasks {
            let (st, v) = t.await.unwrap();
            match st {
                StatusCode::OK => ok += 1,
                StatusCode::PAYMENT_REQUIRED => {
                    assert_eq!(v["error"]["code"], "insufficient_credits");
                    assert!(v["shortfall_micros"].as_u64().unwrap() > 0);
                    short += 1
                }
                other => panic!("unexpected {other}: {v}"),
            }
        }
        assert_eq!((ok, short), (20, 30));
        let b = s
            .payments
            .store()
            .balance(&sgl::store::WalletId::new_unchecked(A))
            .await
            .unwrap();
        assert_eq!(
            (b.balance, b.held, b.total_spent),
            (Micros(100_000), Micros::ZERO, Micros(price * 20))
        );
        let orders = s
            .store
            .store
            .compute_orders_of(&sgl::store::WalletId::new_unchecked(A))
            .await
            .unwrap();
        assert_eq!(orders.len(), 20);
        assert!(orders
            .iter()
            .all(|o| o.state == "active" && o.paid == Micros(price)));
        assert_eq!(s.vultr.state.machine_count(), 20);
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_b_cannot_touch_wallet_a_instances() {
    each_backend("machines_owner", |t: TestStore| async move {
        let s = start_with(t).await;
        let a = s.funded_key(A, Micros(2_000_000)).await;
        let b = s.funded_key(B, Micros(2_000_000)).await;
        let (st, v) = provision(&s, Some(&a), &vultr_order(24, true)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let id = v["order"]["id"].as_str().unwrap().to_owned();
        let machine = v["order"]["provider_instance_id"]
            .as_str()
            .unwrap()
            .to_owned();

        let (st, l, _) = call(
            Method::GET,
            &format!("{}/compute/instances", s.base),
            Some(&b),
            None,
            &[],
        )
        .await;
        assert_eq!((st, l["count"].as_u64()), (StatusCode::OK, Some(0)));
        for (verb, body) in [
            ("show", None),
            ("password", None),
            (
                "extend",
                Some(json!({"extend_hours": 24, "use_credits": true})),
            ),
            ("extend", Some(json!({"extend_hours": 24}))),
            ("resize", Some(json!({"plan": "vc2-2c-4gb"}))),
            ("destroy", None),
        ] {
            let (st, v) = inst(&s, &b, &id, verb, body.as_ref()).await;
            assert_eq!(
                (st, v["error"]["code"].as_str()),
                (StatusCode::NOT_FOUND, Some("instance_not_found")),
                "{verb}"
            );
        }
        // Without any credentials: 401.
        let (st, _, _) = call(
            Method::GET,
            &format!("{}/compute/instances/{id}", s.base),
            None,
            None,
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // Nothing moved.
        assert_eq!(s.balance(B).await, Micros(2_000_000));
        assert!(s.vultr.state.live(&machine));
        let o = s.store.store.compute_order(&id).await.unwrap().unwrap();
        assert!(o.state == "active" && o.password_waiting && o.plan == "vc2-1c-1gb");
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx_and_changes_nothing() {
    each_backend("machines_bad", |t: TestStore| async move {
        let s = start_with(t).await;
        let key = s.funded_key(A, Micros(3_000_000)).await;
        let (st, v) = provision(&s, Some(&key), &vultr_order(24, true)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let id = v["order"]["id"].as_str().unwrap().to_owned();
        let balance = s.balance(A).await;
        let creates = s.vultr.state.creates.load(Ordering::SeqCst);

        let with = |k: &str, val: Value| {
            let mut o = vultr_order(24, true);
            o[k] = val;
            o
        };
        let bad_bodies = [
            with("plan", json!(5)),
            with("plan", json!("vc9-nope")),
            with("region", json!("mars")),
            with("region", json!(["ewr"])),
            with("os_id", json!("2284")),
            with("os_id", json!(9999)),
            with("os_id", json!(-1)),
            with("prepaid_hours", json!(0)),
            with("prepaid_hours", json!(23)),
            with("prepaid_hours", json!(1_000_000_000u64)),
            with("prepaid_hours", json!("24")),
            with("prepaid_hours", json!(24.5)),
            with("label", json!("x".repeat(65))),
            with("label", json!("bad\nlabel")),
            with("ssh_public_key", json!("ssh-ed25519 not-base64!")),
            with(
                "ssh_public_key",
                json!(
                    "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGnW0fK6rdEoYzJZ6qFdU8e6uJ3cJHFH3s3ZZqj1fR3R"
                ),
            ),
            with("use_credits", json!("yes")),
            with("provider", json!("aws")),
            with("provider", json!("digitalocean")),
            with("network", json!("solana-devnet")),
            json!([1, 2]),
        ];
        for body in &bad_bodies {
            let (st, v) = provision(&s, Some(&key), body).await;
            assert!(
                st.is_client_error() && st != StatusCode::PAYMENT_REQUIRED && is_json_error(&v),
                "{body}: {st} {v}"
            );
        }
        // A 1 MB label and a body that is not JSON.
        let huge = with("label", json!("x".repeat(1 << 20)));
        let (st, v) = provision(&s, Some(&key), &huge).await;
        assert!(
            st == StatusCode::PAYLOAD_TOO_LARGE && is_json_error(&v),
            "{st} {v}"
        );
        let r = reqwest::Client::new()
            .post(format!("{}/compute/provision", s.base))
            .header("x-api-key", &key)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(is_json_error(&r.json::<Value>().await.unwrap()));

        for (verb, body) in [
            ("extend", json!({"extend_hours": 0, "use_credits": true})),
            ("extend", json!({"extend_hours": "24", "use_credits": true})),
            (
                "extend",
                json!({"extend_hours": 1_000_000_000u64, "use_credits": true}),
            ),
            ("extend", json!({"extend_hours": 24, "use_credits": 1})),
            ("resize", json!({"plan": 5})),
            ("resize", json!({"plan": "nope"})),
            (
                "resize",
                json!({"plan": "vc2-2c-4gb", "confirm_disk_resize": "yes"}),
            ),
            ("resize", json!({})),
        ] {
            let (st, v) = inst(&s, &key, &id, verb, Some(&body)).await;
            assert!(
                st.is_client_error() && is_json_error(&v),
                "{verb} {body}: {st} {v}"
            );
        }
        let long_id = "a".repeat(100);
        for verb in ["show", "password", "destroy"] {
            let (st, v) = inst(&s, &key, &long_id, verb, None).await;
            assert!(st == StatusCode::NOT_FOUND && is_json_error(&v), "{verb}");
        }
        // Nothing changed.
        assert_eq!(s.balance(A).await, balance);
        assert_eq!(s.vultr.state.creates.load(Ordering::SeqCst), creates);
        let orders = s
            .store
            .store
            .compute_orders_of(&sgl::store::WalletId::new_unchecked(A))
            .await
            .unwrap();
        assert_eq!(orders.len(), 1);
        assert!(orders[0].plan == "vc2-1c-1gb" && orders[0].password_waiting);
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpp_without_auth_returns_a_management_key_and_only_the_owner_extends_without_auth() {
    each_backend("machines_mpp", |t: TestStore| async move {
        let s = start_with(t).await;
        let url = format!("{}/compute/provision", s.base);
        let body = vultr_order(24, false);
        let (st, _, h) = call(Method::POST, &url, None, Some(&body), &[]).await;
        assert_eq!(st, StatusCode::PAYMENT_REQUIRED);
        let challenge = h["www-authenticate"].to_str().unwrap().to_owned();
        let k = signing::key(signing::ANVIL0);
        let cred = signing::mpp_credential(&k, &challenge, None);
        let (st, v, h) = call(
            Method::POST,
            &url,
            None,
            Some(&body),
            &[("Authorization", cred)],
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert!(h.contains_key("payment-receipt"));
        // The one-time management key fields of seed 000.
        let mkey = v["management_api_key"].as_str().unwrap().to_owned();
        assert!(mkey.starts_with("x402c_") && v["management_api_key_id"].is_string());
        assert_eq!(v["management_api_key_last4"], mkey[mkey.len() - 4..]);
        assert!(v["management_note"]
            .as_str()
            .unwrap()
            .contains("shown once"));
        let id = v["order"]["id"].as_str().unwrap().to_owned();
        let (st, d) = inst(&s, &mkey, &id, "show", None).await;
        assert_eq!(
            (st, d["instance"]["payment"].as_str()),
            (StatusCode::OK, Some("mpp"))
        );
        let settled = || s.facilitator.state.settle_calls.load(Ordering::SeqCst);
        assert_eq!(settled(), 1);

        // Extend paid by x402 with the management key: the payer is the owner.
        let ext = format!("{}/compute/instances/{id}/extend", s.base);
        let (st, v) = pay_x402(&s, &ext, &json!({"extend_hours": 24}), Some(&mkey)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["charged_micros"], VC2_HOURLY * 24);
        assert_eq!(v["instance"]["paid_micros"], VC2_HOURLY * 48);
        assert_eq!(settled(), 2);
        let expires = v["instance"]["expires_at_ms"].as_i64().unwrap();

        // Without auth, an x402 payment from the owner's wallet extends…
        let (st, v) = pay_x402(&s, &ext, &json!({"extend_hours": 24}), None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["instance"]["paid_micros"], VC2_HOURLY * 72);
        assert_eq!(
            v["instance"]["expires_at_ms"].as_i64().unwrap(),
            expires + 24 * 3_600_000
        );
        assert_eq!(settled(), 3);
        // …and one from wallet B gets the 404 of a missing instance, its
        // payment unsettled and the instance unchanged.
        let (st, v) = pay_x402_from(
            &s,
            signing::ANVIL1,
            &ext,
            &json!({"extend_hours": 24}),
            None,
        )
        .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("instance_not_found")),
            "{v}"
        );
        assert_eq!(settled(), 3);
        let (_, d) = inst(&s, &mkey, &id, "show", None).await;
        assert_eq!(d["instance"]["paid_micros"], VC2_HOURLY * 72);
        // A missing instance is a 404 before any challenge.
        let (st, v, _) = call(
            Method::POST,
            &format!("{}/compute/instances/no-such-id/extend", s.base),
            None,
            Some(&json!({"extend_hours": 24})),
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{v}");

        // MPP without auth cannot extend: refused before it settles.
        let (st, _, h) = call(
            Method::POST,
            &ext,
            None,
            Some(&json!({"extend_hours": 24})),
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::PAYMENT_REQUIRED);
        let challenge = h["www-authenticate"].to_str().unwrap().to_owned();
        let cred = signing::mpp_credential(&k, &challenge, None);
        let (st, v, _) = call(
            Method::POST,
            &ext,
            None,
            Some(&json!({"extend_hours": 24})),
            &[("Authorization", cred)],
        )
        .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("auth_required")),
            "{v}"
        );
        assert_eq!(settled(), 3);
        // Credits need auth too.
        let (st, v, _) = call(
            Method::POST,
            &ext,
            None,
            Some(&json!({"extend_hours": 24, "use_credits": true})),
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        let (_, d) = inst(&s, &mkey, &id, "show", None).await;
        assert_eq!(d["instance"]["paid_micros"], VC2_HOURLY * 72);
        s.store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_hold_is_closed_only_by_its_order_never_by_the_lease_sweep() {
    each_backend("machines_hold", |t: TestStore| async move {
        let store = &t.store;
        let w = sgl::store::WalletId::new_unchecked(A);
        store
            .top_up(&w, Micros(1_000_000), "grant-hold")
            .await
            .unwrap();
        let price = Micros(VC2_HOURLY * 24);
        let order = |id: &'static str| sgl::store::NewComputeOrder {
            id,
            owner: &w,
            provider: "vultr",
            plan: "vc2-1c-1gb",
            region: "ewr",
            os_id: 2284,
            label: "held",
            hourly: Micros(VC2_HOURLY),
            price,
            prepaid_hours: 24,
            disk_gb: 25,
            expires_at_ms: 0,
            funding: "credits",
            ssh_key: false,
        };
        for id in ["hold-a", "hold-b"] {
            store
                .compute_create_order(&order(id), Some(&w), "test")
                .await
                .unwrap();
        }
        // The grid's sweeps of lapsed holds (a replica's, and a SQLite
        // coordinator's at start, which takes every leased hold) leave an
        // order's hold alone, however long its machine takes.
        assert_eq!(store.release_lapsed_holds(false).await.unwrap(), 0);
        assert_eq!(store.release_lapsed_holds(true).await.unwrap(), 0);
        let b = store.balance(&w).await.unwrap();
        assert_eq!(
            (b.balance, b.held),
            (Micros(1_000_000 - 2 * price.0), Micros(2 * price.0))
        );
        // Only the order's own changes close it: charged whole when it runs,
        // returned whole when it fails, each once.
        assert!(store
            .compute_mark_provisioning("hold-a", "m-a", None, "test")
            .await
            .unwrap());
        assert!(store
            .compute_activate("hold-a", "192.0.2.9", "test")
            .await
            .unwrap());
        assert_eq!(
            store
                .compute_fail("hold-b", false, "test", "gave up")
                .await
                .unwrap(),
            Some(price)
        );
        assert_eq!(
            store
                .compute_fail("hold-b", false, "test", "again")
                .await
                .unwrap(),
            None
        );
        let b = store.balance(&w).await.unwrap();
        assert_eq!(
            (b.balance, b.held, b.total_spent),
            (Micros(1_000_000 - price.0), Micros::ZERO, price)
        );
        t
    })
    .await;
}
