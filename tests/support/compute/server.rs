//! The Machines API in process: the payments routes and the Machines
//! routes over one store and one payments service (x402 and MPP through a
//! loopback facilitator), both provider clients pointed at their
//! stand-ins, and a manual clock.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sgl::clock::ManualClock;
use sgl::compute::provider::{ApiConfig, Provider};
use sgl::compute::seal::Sealer;
use sgl::compute::{digitalocean::DigitalOcean, vultr::Vultr, Machines, MachinesConfig};
use sgl::money::Micros;
use sgl::payments::{http, MppConfig, Payments, PaymentsConfig};
use sgl::store::WalletId;
use zeroize::Zeroizing;

use super::{StandIn, DO_TOKEN, VULTR_TOKEN};
use crate::pay_common::facilitator::{self, Facilitator};
use crate::pay_common::server::{MPP_SECRET, PAY_TO};
use crate::pay_common::stores::TestStore;

pub struct MachinesServer {
    pub base: String,
    pub machines: Machines,
    pub payments: Payments,
    pub clock: ManualClock,
    pub vultr: StandIn,
    pub digitalocean: StandIn,
    pub facilitator: Facilitator,
    pub store: TestStore,
}

/// The provider clients a test uses: fast backoff.
pub fn api(url: &str, token: &str) -> ApiConfig {
    let mut c = ApiConfig::new(url, token);
    c.backoff = Duration::from_millis(5);
    c.action_poll = Duration::from_millis(5);
    c.action_attempts = 50;
    c
}

pub async fn start_with(store: TestStore) -> MachinesServer {
    let fac = facilitator::start().await;
    let (vultr, digitalocean) = super::start_both().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = PaymentsConfig::new(PAY_TO, fac.url.clone());
    cfg.public_base_url = Some(format!("http://{addr}"));
    cfg.mpp = Some(MppConfig {
        realm: addr.to_string(),
        secret: Zeroizing::new(MPP_SECRET.as_bytes().to_vec()),
        validity: Duration::from_secs(300),
        recipient: None,
    });
    let clock = ManualClock::starting_now();
    let payments = Payments::with_clock(cfg, store.store.clone(), clock.clock()).unwrap();
    let providers: Vec<Arc<dyn Provider>> = vec![
        Arc::new(Vultr::new(api(&vultr.url, VULTR_TOKEN)).unwrap()),
        Arc::new(DigitalOcean::new(api(&digitalocean.url, DO_TOKEN)).unwrap()),
    ];
    let mut mcfg = MachinesConfig::new(Sealer::new([42; 32]));
    mcfg.poll_interval = Duration::from_millis(5);
    mcfg.poll_attempts = 20;
    let machines = Machines::new(mcfg, payments.clone(), providers);
    let app = sgl::compute::http::router(machines.clone()).merge(http::router(payments.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await });
    MachinesServer {
        base: format!("http://{addr}"),
        machines,
        payments,
        clock,
        vultr,
        digitalocean,
        facilitator: fac,
        store,
    }
}

impl MachinesServer {
    /// An API key for `wallet` holding `credits`.
    pub async fn funded_key(&self, wallet: &str, credits: Micros) -> String {
        let w = WalletId::new_unchecked(wallet.to_ascii_lowercase());
        let (key, _) = self.payments.create_api_key(&w, "test").await.unwrap();
        if credits > Micros::ZERO {
            self.payments
                .store()
                .top_up(&w, credits, &format!("grant-{}", uuid::Uuid::new_v4()))
                .await
                .unwrap();
        }
        key.secret.as_str().to_owned()
    }

    pub async fn balance(&self, wallet: &str) -> Micros {
        self.payments
            .store()
            .balance(&WalletId::new_unchecked(wallet.to_ascii_lowercase()))
            .await
            .unwrap()
            .balance
    }
}

/// A request's status and JSON body (Null when the body is not JSON).
pub async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
    headers: &[(&str, String)],
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, url);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    for (n, v) in headers {
        req = req.header(*n, v);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let h = resp.headers().clone();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, v, h)
}
