//! The provider clients against their stand-ins: paging, 429 with
//! backoff, error bodies, asynchronous creation, find by tag, resize and
//! delete.

use std::sync::atomic::Ordering;

use sgl::compute::digitalocean::DigitalOcean;
use sgl::compute::provider::{CreateSpec, Provider, ProviderError};
use sgl::compute::vultr::Vultr;
use sgl::money::Micros;

use crate::compute_support::server::api;
use crate::compute_support::{digitalocean, vultr, DO_TOKEN, SSH_KEY, VULTR_TOKEN};

fn spec(plan: &str, region: &str, os_id: u64, tag: &str, ssh: bool) -> CreateSpec {
    CreateSpec {
        plan: plan.into(),
        region: region.into(),
        os_id,
        label: "a label".into(),
        ssh_public_key: ssh.then(|| SSH_KEY.to_owned()),
        tag: tag.into(),
    }
}

async fn until_active(p: &dyn Provider, id: &str) -> sgl::compute::provider::ProviderInstance {
    for _ in 0..10 {
        let i = p.get(id).await.unwrap();
        if i.is_active() {
            return i;
        }
    }
    panic!("never active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vultr_client_pages_retries_creates_and_deletes() {
    let s = vultr::start().await;
    let v = Vultr::new(api(&s.url, VULTR_TOKEN)).unwrap();
    // Paging (the stand-in serves two a page) and three 429s retried.
    s.state.rate_limit_next.store(3, Ordering::SeqCst);
    let plans = v.plans().await.unwrap();
    assert_eq!(s.state.rate_limited.load(Ordering::SeqCst), 3);
    assert_eq!(plans.len(), 4);
    let vc2 = plans.iter().find(|p| p.id == "vc2-1c-1gb").unwrap();
    assert_eq!(
        (vc2.hourly_cost, vc2.monthly_cost, vc2.disk, vc2.ram),
        (Micros(7_000), Micros(5_000_000), 25, 1024)
    );
    let gpu = plans.iter().find(|p| p.family == "vcg").unwrap();
    assert_eq!(gpu.gpu_vram_gb, Some(4));
    assert_eq!(v.regions().await.unwrap().len(), 3);
    assert_eq!(v.os_images().await.unwrap().len(), 3);

    // Asynchronous creation: pending at 0.0.0.0, then active.
    let created = v
        .create(&spec("vc2-1c-1gb", "ewr", 2284, "sgl-order-t1", false))
        .await
        .unwrap();
    assert_eq!(created.status, "pending");
    assert!(created.ip.is_none() && created.default_password.is_some());
    let active = until_active(&v, &created.id).await;
    assert!(active.ip.unwrap().starts_with("192.0.2."));
    let found = v.find_by_tag("sgl-order-t1").await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    assert!(v.find_by_tag("sgl-order-none").await.unwrap().is_none());
    // An SSH key is registered first and referenced by id.
    let with_key = v
        .create(&spec("vc2-1c-1gb", "ewr", 2284, "sgl-order-t2", true))
        .await
        .unwrap();
    assert_eq!(s.state.ssh_keys.lock().unwrap().as_slice(), [SSH_KEY]);
    let m = s.state.machines.lock().unwrap()[&with_key.id].clone();
    assert_eq!(m.ssh_keys.len(), 1);

    v.resize(&created.id, "vc2-2c-4gb", false).await.unwrap();
    // The provider's own refusal comes back with its message.
    let e = v
        .resize(&created.id, "vc2-1c-1gb", false)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ProviderError::Api { status: 400, message, .. } if message == "Unable to downgrade plan."),
        "{e}"
    );
    v.delete(&created.id).await.unwrap();
    assert!(!s.state.live(&created.id));
    // Deleting what is gone is not an error; reading it is a 404.
    v.delete(&created.id).await.unwrap();
    let e = v.get(&created.id).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // A bad token, and a rate limit that never ends.
    let bad = Vultr::new(api(&s.url, "wrong")).unwrap();
    let e = bad.plans().await.unwrap_err();
    assert!(
        matches!(&e, ProviderError::Api { status: 401, message, .. } if message == "Invalid API token.")
    );
    s.state.rate_limit_next.store(100, Ordering::SeqCst);
    assert!(matches!(
        v.plans().await,
        Err(ProviderError::RateLimited(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digitalocean_client_pages_retries_creates_and_resizes() {
    let s = digitalocean::start().await;
    let d = DigitalOcean::new(api(&s.url, DO_TOKEN)).unwrap();
    s.state.rate_limit_next.store(2, Ordering::SeqCst);
    let sizes = d.plans().await.unwrap();
    assert_eq!(s.state.rate_limited.load(Ordering::SeqCst), 2);
    // Six sizes over three pages; the unavailable one is dropped.
    assert_eq!(sizes.len(), 5);
    let basic = sizes.iter().find(|p| p.id == "s-1vcpu-1gb").unwrap();
    assert_eq!(
        (basic.hourly_cost, basic.family.as_str()),
        (Micros(8_930), "vps")
    );
    let gpu = sizes.iter().find(|p| p.id == "gpu-h100x1-80gb").unwrap();
    assert_eq!((gpu.family.as_str(), gpu.gpu_vram_gb), ("vcg", Some(80)));
    assert_eq!(sizes.iter().find(|p| p.id == "c-2").unwrap().family, "vdc");
    let regions = d.regions().await.unwrap();
    assert_eq!(regions.len(), 3);
    assert_eq!(regions[0].city, "New York");
    assert_eq!(d.os_images().await.unwrap().len(), 2);

    let created = d
        .create(&spec(
            "s-1vcpu-1gb",
            "nyc3",
            123456789,
            "sgl-order-d1",
            true,
        ))
        .await
        .unwrap();
    assert_eq!(created.status, "new");
    assert!(created.ip.is_none() && created.default_password.is_none());
    let active = until_active(&d, &created.id).await;
    assert!(active.ip.unwrap().starts_with("198.51.100."));
    assert_eq!(
        d.find_by_tag("sgl-order-d1").await.unwrap().unwrap().id,
        created.id
    );
    // DigitalOcean refuses to resize a running droplet (422
    // unprocessable_entity), as a request sent straight to the stand-in
    // shows; the client powers it off first and on again after.
    let raw = reqwest::Client::new()
        .post(format!("{}/droplets/{}/actions", s.url, created.id))
        .bearer_auth(DO_TOKEN)
        .json(&serde_json::json!({"type": "resize", "size": "s-1vcpu-2gb", "disk": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 422);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["id"], "unprocessable_entity");
    assert!(s.state.resizes.lock().unwrap().is_empty());
    s.state.action_log.lock().unwrap().clear();
    s.state.actions_refused.lock().unwrap().clear();

    d.resize(&created.id, "s-1vcpu-2gb", true).await.unwrap();
    assert_eq!(
        s.state.resizes.lock().unwrap().last().unwrap(),
        &(created.id.clone(), "s-1vcpu-2gb".to_owned(), true)
    );
    let kinds =
        |log: &[(String, String)]| -> Vec<String> { log.iter().map(|(_, k)| k.clone()).collect() };
    assert_eq!(
        kinds(&s.state.action_log.lock().unwrap()),
        ["power_off", "resize", "power_on"]
    );
    // Each action was awaited: none was refused for a pending one.
    assert!(s.state.actions_refused.lock().unwrap().is_empty());
    let after = d.get(&created.id).await.unwrap();
    assert_eq!(after.status, "active", "powered on again");
    let e = d.resize(&created.id, "c-2", false).await.unwrap_err();
    assert!(matches!(&e, ProviderError::Api { status: 422, .. }), "{e}");
    // A refused resize still powers the droplet on again.
    assert_eq!(
        kinds(&s.state.action_log.lock().unwrap())[3..],
        ["power_off", "power_on"]
    );
    assert_eq!(d.get(&created.id).await.unwrap().status, "active");
    d.delete(&created.id).await.unwrap();
    d.delete(&created.id).await.unwrap();
    let e = d.get(&created.id).await.unwrap_err();
    assert!(matches!(&e, ProviderError::Api { status: 404, message, .. }
        if message == "The resource you were accessing could not be found."));
    s.state.fail_create.store(true, Ordering::SeqCst);
    let e = d
        .create(&spec(
            "s-1vcpu-1gb",
            "nyc3",
            123456789,
            "sgl-order-d2",
            true,
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, ProviderError::Api { status: 500, .. }));
}
