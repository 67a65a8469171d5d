//! The [`Payments`] service: the one object the compute plane and the
//! coordinator hold to gate paid and authenticated requests.
//!
//! # Gate API
//!
//! A handler for a paid resource does:
//!
//! 1. `let offer = payments.offer(&headers, &uri, price, "what")` — the
//!    price in micro-USD and the exact resource URL ([`offer`]).
//! 2. `payments.authorize(&req, Some(&offer)).await` ([`payment`]) →
//!    - `Ok(None)`: no credentials; answer `payments.challenge(&offer, …)`
//!      (402 with the x402 v1 body, the v2 `PAYMENT-REQUIRED` header and,
//!      when MPP is configured, `WWW-Authenticate: Payment`).
//!    - `Ok(Some(Payer::ApiKey{..} | Payer::Wallet{..}))`: an account;
//!      charge its credits ([`credits`]): `hold_credits` before the work,
//!      then `settle_credits(hold, actual)` or `release_credits(hold)`.
//!    - `Ok(Some(Payer::Payment(p)))`: a per-request payment, verified
//!      offline and by the facilitator, its nonce reserved; run the work,
//!      then `settle(p, None)` before releasing the result (add
//!      `Settlement::headers` to the response), or `release(p)` when the
//!      work failed: nothing is consumed and the client is not charged.
//!    - `Err(e)`: refuse with `payments.refusal(&e, Some(&offer))`.
//!
//! For metered requests (grid chat, compute jobs), [`crate::payments::billing`]
//! wraps both branches in one [`Charge`](crate::payments::billing::Charge)
//! per job: a credit hold of the quote settled at the actual cost, or a
//! payment of the quote settled when the work succeeded.
//!
//! `authenticate` ([`auth`]) is the account-only half (API key or X-Auth
//! signature), for management calls; [`keys`] mints and revokes API keys.
//! Every "now" comes from the injected [`Clock`], which the service's store
//! shares.

use std::sync::Arc;

use axum::http::{HeaderMap, Method, Uri};

use super::config::PaymentsConfig;
use super::error::PaymentError;
use super::facilitator::FacilitatorClient;
use crate::clock::Clock;
use crate::store::Store;

pub mod auth;
pub mod credits;
pub mod keys;
pub mod offer;
pub mod payment;
pub mod refunds;

pub use auth::{api_key, Payer};
pub use payment::{PaymentMethod, PendingPayment, Settlement};

/// The parts of a request the gate reads.
#[derive(Clone, Copy, Debug)]
pub struct RequestParts<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The raw body (X-Auth signs its SHA-256).
    pub body: &'a [u8],
}

struct Inner {
    cfg: PaymentsConfig,
    store: Store,
    facilitator: FacilitatorClient,
    clock: Clock,
    /// Refunds the store could not take yet ([`refunds`]).
    owed: refunds::OwedRefunds,
    /// Credit reservations for grid jobs, once enabled
    /// ([`Payments::enable_reservations`]).
    reservations: std::sync::OnceLock<crate::payments::reservations::Reservations>,
    /// Recently checked API keys ([`auth`]).
    keys: auth::KeyCache,
}

/// The payments service. Cheap to clone.
#[derive(Clone)]
pub struct Payments {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("facilitator", &self.inner.facilitator.base_url())
            .field("store", &self.inner.store.backend_name())
            .finish()
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl Payments {
    pub fn new(cfg: PaymentsConfig, store: Store) -> Result<Self, PaymentError> {
        Self::with_clock(cfg, store, Clock::system())
    }

    /// A service whose "now" (payment windows, challenge expiry, signature
    /// windows, and the store's timestamps) is read from `clock`.
    pub fn with_clock(
        cfg: PaymentsConfig,
        store: Store,
        clock: Clock,
    ) -> Result<Self, PaymentError> {
        if cfg.networks.is_empty() {
            return Err(PaymentError::BadRequest("no payment network configured"));
        }
        let facilitator =
            FacilitatorClient::with_auth(&cfg.facilitator_url, cfg.facilitator_auth.clone())?;
        Ok(Payments {
            inner: Arc::new(Inner {
                cfg,
                store: store.with_clock(clock.clone()),
                facilitator,
                clock,
                owed: Default::default(),
                reservations: Default::default(),
                keys: Default::default(),
            }),
        })
    }

    pub fn config(&self) -> &PaymentsConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Admit grid jobs paid by credits against per-wallet reservations
    /// ([`crate::payments::reservations`]) instead of a hold each. Must run
    /// inside a tokio runtime (it starts the settlement writer); a second
    /// call keeps the first configuration.
    pub fn enable_reservations(&self, cfg: crate::payments::reservations::ReserveConfig) {
        self.inner.reservations.get_or_init(|| {
            crate::payments::reservations::Reservations::start(self.inner.store.clone(), cfg)
        });
    }

    /// The credit reservations, when enabled.
    pub fn reservations(&self) -> Option<&crate::payments::reservations::Reservations> {
        self.inner.reservations.get()
    }

    pub fn facilitator(&self) -> &FacilitatorClient {
        &self.inner.facilitator
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// A startup check: the facilitator answers `GET /supported` (with the
    /// configured credentials) and settles scheme `exact` on every
    /// configured network, for x402 v1 and v2 (MPP settles as v2). The
    /// error names the facilitator's URL and what it lacks.
    pub async fn check_facilitator(&self) -> Result<(), PaymentError> {
        let url = format!("{}/supported", self.inner.facilitator.base_url());
        let sup = self.inner.facilitator.supported().await.map_err(|e| {
            let why = match e {
                PaymentError::FacilitatorUnavailable(m) => m,
                other => other.to_string(),
            };
            PaymentError::FacilitatorUnavailable(format!("GET {url}: {why}"))
        })?;
        for net in &self.inner.cfg.networks {
            for (version, name) in [(1u8, net.v1_name.clone()), (2, net.caip2())] {
                let listed = sup
                    .kinds
                    .iter()
                    .any(|k| k.x402_version == version && k.scheme == "exact" && k.network == name);
                if !listed {
                    return Err(PaymentError::FacilitatorUnavailable(format!(
                        "the facilitator at {url} does not list scheme \"exact\" on network \"{name}\" for x402 v{version}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_secs()
    }
}
