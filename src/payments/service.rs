//! The [`Payments`] service: the one object the compute plane and the
//! coordinator hold to gate paid and authenticated requests.
//!
//! # Gate API
//!
//! A handler for a paid resource does:
//!
//! 1. `let offer = payments.offer(&headers, &uri, price, "what")` — the
//!    price in micro-USD and the exact resource URL.
//! 2. `payments.authorize(&req, Some(&offer)).await` →
//!    - `Ok(None)`: no credentials; answer `payments.challenge(&offer, …)`
//!      (402 with the x402 v1 body, the v2 `PAYMENT-REQUIRED` header and,
//!      when MPP is configured, `WWW-Authenticate: Payment`).
//!    - `Ok(Some(Payer::ApiKey{..} | Payer::Wallet{..}))`: an account;
//!      charge its credits: `hold_credits` before the work, then
//!      `settle_credits(hold, actual)` or `release_credits(hold)`.
//!    - `Ok(Some(Payer::Payment(p)))`: a per-request payment, verified
//!      offline and by the facilitator, its nonce reserved; run the work,
//!      then `settle(p, None)` before releasing the result (add
//!      `Settlement::headers` to the response), or `release(p)` when the
//!      work failed: nothing is consumed and the client is not charged.
//!    - `Err(e)`: refuse with `payments.refusal(&e, Some(&offer))`.
//!
//! For metered requests (grid chat), [`Payments::begin_charge`],
//! [`Payments::finish_charge`] and [`Payments::abort_charge`] wrap both
//! branches: a credit hold of the quote settled at the actual cost, or a
//! payment of the quote settled when the work succeeded.
//!
//! `authenticate` is the account-only half (API key or X-Auth signature),
//! for management calls. All clocks come from the injected [`Clock`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use alloy_primitives::Address;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde_json::Value;

use super::apikey;
use super::config::{EvmNetwork, PaymentsConfig};
use super::error::PaymentError;
use super::evm;
use super::facilitator::FacilitatorClient;
use super::mpp;
use super::x402::{self, Offer, Presented};
use super::xauth::{self, AuthHeaders};
use crate::store::{
    ApiKeyRecord, CreditBalance, HoldId, Micros, PaymentNonceKey, PendingPayment as StorePending,
    Store, WalletId,
};

/// Unix time in milliseconds.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// The parts of a request the gate reads.
#[derive(Clone, Copy, Debug)]
pub struct RequestParts<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The raw body (X-Auth signs its SHA-256).
    pub body: &'a [u8],
}

/// How a presented payment was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentMethod {
    X402V1,
    X402V2,
    Mpp,
}

impl PaymentMethod {
    pub fn scheme(self) -> &'static str {
        match self {
            PaymentMethod::X402V1 => "x402-v1",
            PaymentMethod::X402V2 => "x402-v2",
            PaymentMethod::Mpp => "mpp",
        }
    }
}

/// A verified, reserved, unsettled payment. Settle it with
/// [`Payments::settle`] or give it back with [`Payments::release`]; a
/// dropped one stays reserved (fail closed: the authorization cannot be
/// used twice, and the facilitator never moved the money).
#[derive(Debug)]
pub struct PendingPayment {
    pub method: PaymentMethod,
    pub payer: Address,
    /// The payer as a credits wallet.
    pub wallet: WalletId,
    /// The authorized amount.
    pub amount: Micros,
    pub network: EvmNetwork,
    pub resource: String,
    key: PaymentNonceKey,
    payload: Value,
    requirements: Value,
    mpp_challenge: Option<String>,
}

/// A settled payment.
#[derive(Debug)]
pub struct Settlement {
    pub method: PaymentMethod,
    pub transaction: String,
    pub network: String,
    pub payer: String,
    pub amount: Micros,
    /// `X-PAYMENT-RESPONSE` (v1), `PAYMENT-RESPONSE` (v2) or
    /// `Payment-Receipt` (MPP), to add to the success response.
    pub headers: HeaderMap,
    /// The wallet's position after a credit top-up, if one was made.
    pub balance: Option<CreditBalance>,
}

/// Who is making a request.
// One short-lived value per request, moved a couple of times: boxing the
// payment variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Payer {
    /// An API key (`X-API-Key` or `Authorization: Bearer`).
    ApiKey { wallet: WalletId, key_id: String },
    /// A wallet-signed request (`X-Auth-*`).
    Wallet {
        wallet: WalletId,
        chain: &'static str,
    },
    /// A per-request payment (x402 or MPP).
    Payment(PendingPayment),
}

impl Payer {
    pub fn wallet(&self) -> &WalletId {
        match self {
            Payer::ApiKey { wallet, .. } | Payer::Wallet { wallet, .. } => wallet,
            Payer::Payment(p) => &p.wallet,
        }
    }
}

struct Inner {
    cfg: PaymentsConfig,
    store: Store,
    facilitator: FacilitatorClient,
    clock: Clock,
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
        Self::with_clock(cfg, store, system_clock())
    }

    pub fn with_clock(
        cfg: PaymentsConfig,
        store: Store,
        clock: Clock,
    ) -> Result<Self, PaymentError> {
        if cfg.networks.is_empty() {
            return Err(PaymentError::BadRequest("no payment network configured"));
        }
        let facilitator = FacilitatorClient::new(&cfg.facilitator_url)?;
        Ok(Payments {
            inner: Arc::new(Inner {
                cfg,
                store,
                facilitator,
                clock,
            }),
        })
    }

    pub fn config(&self) -> &PaymentsConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn facilitator(&self) -> &FacilitatorClient {
        &self.inner.facilitator
    }

    /// A startup check: the facilitator (`GET /supported`) settles `exact`
    /// on every configured network, for x402 v1 and v2.
    pub async fn check_facilitator(&self) -> Result<(), PaymentError> {
        let sup = self.inner.facilitator.supported().await?;
        for net in &self.inner.cfg.networks {
            for (version, name) in [(1u8, net.v1_name.clone()), (2, net.caip2())] {
                let listed = sup
                    .kinds
                    .iter()
                    .any(|k| k.x402_version == version && k.scheme == "exact" && k.network == name);
                if !listed {
                    return Err(PaymentError::FacilitatorUnavailable(format!(
                        "the facilitator does not settle exact on {name} (x402 v{version})"
                    )));
                }
            }
        }
        Ok(())
    }

    fn now_ms(&self) -> i64 {
        (self.inner.clock)()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.now_ms() / 1000).unwrap_or(0)
    }

    /// The resource URL of a request: the configured public base URL (or
    /// `http://` + Host) followed by the path and query.
    pub fn resource_url(&self, headers: &HeaderMap, uri: &Uri) -> String {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match &self.inner.cfg.public_base_url {
            Some(base) => format!("{}{pq}", base.trim_end_matches('/')),
            None => {
                let host = header(headers, "host").unwrap_or("localhost");
                format!("http://{host}{pq}")
            }
        }
    }

    /// An offer for the request at `uri`.
    pub fn offer(&self, headers: &HeaderMap, uri: &Uri, price: Micros, description: &str) -> Offer {
        Offer {
            resource_url: self.resource_url(headers, uri),
            price,
            description: description.to_owned(),
            mime_type: "application/json".to_owned(),
        }
    }

    /// The challenge headers: `PAYMENT-REQUIRED` (x402 v2) and, with MPP,
    /// `WWW-Authenticate: Payment`.
    pub fn challenge_headers(&self, offer: &Offer, reason: &str) -> HeaderMap {
        let cfg = &self.inner.cfg;
        let mut h = HeaderMap::new();
        let v2 = x402::payment_required_v2(cfg, offer, reason);
        if let Ok(v) = HeaderValue::from_str(&x402::encode_header_json(&v2)) {
            h.insert(HeaderName::from_static(x402::PAYMENT_REQUIRED), v);
        }
        if let Some(m) = &cfg.mpp {
            let ch = mpp::issue(m, &cfg.networks[0], &cfg.pay_to, offer, self.now());
            if let Ok(v) = HeaderValue::from_str(&ch.www_authenticate()) {
                h.insert(axum::http::header::WWW_AUTHENTICATE, v);
            }
        }
        h
    }

    /// The x402 v1 body of a 402 for `offer`.
    pub fn challenge_body(&self, offer: &Offer, reason: &str) -> Value {
        x402::payment_required_v1(&self.inner.cfg, offer, reason)
    }

    // ---- identity ---------------------------------------------------------

    /// The account behind a request: an API key, or a wallet signature.
    /// `Ok(None)` when the request carries neither.
    pub async fn authenticate(
        &self,
        req: &RequestParts<'_>,
    ) -> Result<Option<Payer>, PaymentError> {
        if let Some(key) = api_key(req.headers)? {
            return self.check_api_key(&key).await.map(Some);
        }
        if req.headers.contains_key("x-auth-signature")
            || req.headers.contains_key("x-auth-address")
        {
            return self.check_signature(req).await.map(Some);
        }
        Ok(None)
    }

    async fn check_api_key(&self, key: &str) -> Result<Payer, PaymentError> {
        if !apikey::well_formed(key) {
            return Err(PaymentError::ApiKeyInvalid);
        }
        let h = apikey::hash(key);
        let rec = self
            .inner
            .store
            .find_api_key(&h)
            .await?
            .ok_or(PaymentError::ApiKeyInvalid)?;
        if !apikey::hashes_equal(&rec.key_hash, &h) {
            return Err(PaymentError::ApiKeyInvalid);
        }
        Ok(Payer::ApiKey {
            wallet: rec.wallet,
            key_id: rec.id,
        })
    }

    /// The wallet that signed a request with `X-Auth-*` headers (§5.8
    /// owner price changes): signature, time window and nonce checked, the
    /// nonce consumed. API keys are not looked at.
    pub async fn signed_wallet(&self, req: &RequestParts<'_>) -> Result<WalletId, PaymentError> {
        self.check_signature(req).await.map(|p| p.wallet().clone())
    }

    async fn check_signature(&self, req: &RequestParts<'_>) -> Result<Payer, PaymentError> {
        let h = req.headers;
        let get = |n: &str| header(h, n).ok_or(PaymentError::AuthInvalid("missing X-Auth header"));
        let ah = AuthHeaders {
            address: get("x-auth-address")?,
            chain: get("x-auth-chain")?,
            signature: get("x-auth-signature")?,
            timestamp: get("x-auth-timestamp")?,
            nonce: get("x-auth-nonce")?,
            sig_encoding: header(h, "x-auth-sig-encoding"),
        };
        let path = req.uri.path();
        let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or(path);
        let paths: Vec<&str> = if pq == path {
            vec![path]
        } else {
            vec![path, pq]
        };
        let window_ms = self.inner.cfg.auth_window.as_millis() as i64;
        let signed = xauth::verify(
            &ah,
            req.method.as_str(),
            &paths,
            req.body,
            self.now_ms(),
            window_ms,
        )?;
        let fresh = self
            .inner
            .store
            .consume_auth_nonce(
                signed.chain,
                signed.wallet.as_str(),
                &signed.nonce,
                signed.timestamp_ms.saturating_add(window_ms),
            )
            .await?;
        if !fresh {
            return Err(PaymentError::AuthNonceUsed);
        }
        Ok(Payer::Wallet {
            wallet: signed.wallet,
            chain: signed.chain,
        })
    }

    // ---- payments -----------------------------------------------------------

    /// The account or payment behind a request. With `offer`, a presented
    /// x402 or MPP payment is verified (offline, then by the facilitator)
    /// and reserved; an account is returned as is (charge its credits).
    pub async fn authorize(
        &self,
        req: &RequestParts<'_>,
        offer: Option<&Offer>,
    ) -> Result<Option<Payer>, PaymentError> {
        if let Some(offer) = offer {
            if let Some(p) = self.accept_payment(req.headers, offer).await? {
                return Ok(Some(Payer::Payment(p)));
            }
        }
        self.authenticate(req).await
    }

    /// Verify and reserve the payment a request presents for `offer`, if
    /// any. Refusals consume nothing.
    pub async fn accept_payment(
        &self,
        headers: &HeaderMap,
        offer: &Offer,
    ) -> Result<Option<PendingPayment>, PaymentError> {
        let x_payment = header(headers, x402::X_PAYMENT);
        let sig = header(headers, x402::PAYMENT_SIGNATURE);
        let mpp_cred = header(headers, "authorization").filter(|v| {
            v.get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("payment "))
        });
        let present = [x_payment.is_some(), sig.is_some(), mpp_cred.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if present > 1 {
            return Err(PaymentError::BadRequest("more than one payment presented"));
        }
        if let Some(v) = x_payment.or(sig) {
            return self.accept_x402(v, offer).await.map(Some);
        }
        if let Some(v) = mpp_cred {
            return self.accept_mpp(v, offer).await.map(Some);
        }
        Ok(None)
    }

    async fn accept_x402(
        &self,
        value: &str,
        offer: &Offer,
    ) -> Result<PendingPayment, PaymentError> {
        let cfg = &self.inner.cfg;
        let presented = x402::parse_payment_header(value)?;
        let verified = x402::verify(cfg, &presented, offer, self.now())?;
        let method = match presented {
            Presented::V1(_) => PaymentMethod::X402V1,
            Presented::V2(_) => PaymentMethod::X402V2,
        };
        let amount = verified.value_micros();
        let amount_str = verified.value.to_string();
        let reserved = self
            .inner
            .store
            .reserve_payment_nonce(&StorePending {
                key: &verified.key,
                scheme: method.scheme(),
                resource: &offer.resource_url,
                amount: &amount_str,
            })
            .await?;
        if !reserved {
            return Err(PaymentError::NonceUsed);
        }
        let pending = PendingPayment {
            method,
            payer: verified.payer,
            wallet: WalletId::new_unchecked(evm::lower(&verified.payer)),
            amount,
            network: verified.network,
            resource: offer.resource_url.clone(),
            key: verified.key,
            payload: verified.facilitator_payload,
            requirements: verified.facilitator_requirements,
            mpp_challenge: None,
        };
        self.facilitator_verify(pending, verified.version).await
    }

    async fn accept_mpp(&self, value: &str, offer: &Offer) -> Result<PendingPayment, PaymentError> {
        let cfg = &self.inner.cfg;
        let m = cfg
            .mpp
            .as_ref()
            .ok_or(PaymentError::MppMalformed("MPP is not enabled here"))?;
        let net = &cfg.networks[0];
        let cred = mpp::parse_authorization(value)?;
        let v = mpp::verify(m, net, &cfg.pay_to, offer, &cred, self.now())?;
        let store = &self.inner.store;
        if !store
            .reserve_mpp_challenge(&v.challenge_id, (v.expires_at as i64).saturating_mul(1000))
            .await?
        {
            return Err(PaymentError::MppChallengeUsed);
        }
        let amount_str = offer.price.0.to_string();
        let reserved = store
            .reserve_payment_nonce(&StorePending {
                key: &v.key,
                scheme: PaymentMethod::Mpp.scheme(),
                resource: &offer.resource_url,
                amount: &amount_str,
            })
            .await;
        match reserved {
            Ok(true) => {}
            Ok(false) => {
                store.release_mpp_challenge(&v.challenge_id).await?;
                return Err(PaymentError::NonceUsed);
            }
            Err(e) => {
                store.release_mpp_challenge(&v.challenge_id).await?;
                return Err(e.into());
            }
        }
        let pending = PendingPayment {
            method: PaymentMethod::Mpp,
            payer: v.payer,
            wallet: WalletId::new_unchecked(evm::lower(&v.payer)),
            amount: offer.price,
            network: net.clone(),
            resource: offer.resource_url.clone(),
            key: v.key,
            payload: v.facilitator_payload,
            requirements: v.facilitator_requirements,
            mpp_challenge: Some(v.challenge_id),
        };
        self.facilitator_verify(pending, 2).await
    }

    fn facilitator_version(p: &PendingPayment) -> u8 {
        match p.method {
            PaymentMethod::X402V1 => 1,
            PaymentMethod::X402V2 | PaymentMethod::Mpp => 2,
        }
    }

    /// Ask the facilitator to verify; on any failure give the reservation
    /// back and refuse.
    async fn facilitator_verify(
        &self,
        pending: PendingPayment,
        version: u8,
    ) -> Result<PendingPayment, PaymentError> {
        let res = self
            .inner
            .facilitator
            .verify(version, &pending.payload, &pending.requirements)
            .await;
        match res {
            Ok(r) if r.is_valid => Ok(pending),
            Ok(r) => {
                self.release(pending).await;
                Err(PaymentError::FacilitatorRefused {
                    reason: r.invalid_reason.unwrap_or_else(|| "invalid_payload".into()),
                })
            }
            Err(e) => {
                self.release(pending).await;
                Err(e)
            }
        }
    }

    /// Settle a reserved payment through the facilitator. On success the
    /// nonce is marked settled and, when `credit` is given, the wallet is
    /// credited in the same transaction (a top-up). On failure nothing is
    /// consumed.
    pub async fn settle(
        &self,
        p: PendingPayment,
        credit: Option<(&WalletId, Micros)>,
    ) -> Result<Settlement, PaymentError> {
        let version = Self::facilitator_version(&p);
        let res = self
            .inner
            .facilitator
            .settle(version, &p.payload, &p.requirements)
            .await;
        let settled = match res {
            Ok(r) if r.success => r,
            Ok(r) => {
                let reason = r
                    .error_reason
                    .unwrap_or_else(|| "unexpected_settle_error".into());
                self.release(p).await;
                return Err(PaymentError::FacilitatorRefused { reason });
            }
            Err(e) => {
                self.release(p).await;
                return Err(e);
            }
        };
        let store = &self.inner.store;
        let balance = match store
            .settle_payment_nonce(&p.key, &settled.transaction, credit)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                // The money moved but the record did not: an operator must
                // reconcile this transaction by hand.
                tracing::error!(
                    transaction = %settled.transaction,
                    payer = %evm::lower(&p.payer),
                    error = %e,
                    "payment settled but not recorded"
                );
                return Err(e.into());
            }
        };
        if let Some(id) = &p.mpp_challenge {
            store.confirm_mpp_challenge(id).await?;
        }
        let payer = evm::lower(&p.payer);
        let mut headers = HeaderMap::new();
        let (name, value) = match p.method {
            PaymentMethod::X402V1 | PaymentMethod::X402V2 => {
                let network = if p.method == PaymentMethod::X402V1 {
                    p.network.v1_name.clone()
                } else {
                    p.network.caip2()
                };
                let body = serde_json::json!({
                    "success": true,
                    "transaction": settled.transaction,
                    "network": network,
                    "payer": p.payer.to_checksum(None),
                });
                let name = if p.method == PaymentMethod::X402V1 {
                    x402::X_PAYMENT_RESPONSE
                } else {
                    x402::PAYMENT_RESPONSE
                };
                (name, x402::encode_header_json(&body))
            }
            PaymentMethod::Mpp => (
                "payment-receipt",
                mpp::receipt(&settled.transaction, self.now()),
            ),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
        Ok(Settlement {
            method: p.method,
            transaction: settled.transaction,
            network: if settled.network.is_empty() {
                p.network.caip2()
            } else {
                settled.network
            },
            payer,
            amount: p.amount,
            headers,
            balance,
        })
    }

    /// Give back a reserved payment that will not be settled (the work
    /// failed, or the facilitator refused): the authorization and the MPP
    /// challenge may be presented again, and nothing is charged.
    pub async fn release(&self, p: PendingPayment) {
        let store = &self.inner.store;
        if let Err(e) = store.release_payment_nonce(&p.key).await {
            tracing::warn!(error = %e, "could not release a payment reservation");
        }
        if let Some(id) = &p.mpp_challenge {
            if let Err(e) = store.release_mpp_challenge(id).await {
                tracing::warn!(error = %e, "could not release an MPP challenge");
            }
        }
    }

    // ---- credits ------------------------------------------------------------

    pub async fn balance(&self, wallet: &WalletId) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.balance(wallet).await?)
    }

    /// Reserve credits for a metered request (the quote).
    pub async fn hold_credits(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<HoldId, PaymentError> {
        Ok(self.inner.store.hold(wallet, amount, reference).await?)
    }

    /// Charge the actual cost (at most the hold) and return the rest.
    pub async fn settle_credits(
        &self,
        hold: &HoldId,
        actual: Micros,
    ) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.settle_hold(hold, actual).await?)
    }

    /// Return a whole hold (the request failed: no charge).
    pub async fn release_credits(&self, hold: &HoldId) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.release_hold(hold).await?)
    }

    /// Spend credits at once (a fixed-price call).
    pub async fn debit_credits(
        &self,
        wallet: &WalletId,
        amount: Micros,
        reference: &str,
    ) -> Result<CreditBalance, PaymentError> {
        Ok(self.inner.store.debit(wallet, amount, reference).await?)
    }

    // ---- API keys -----------------------------------------------------------

    /// Mint a key for `wallet`; the secret is returned once and only its
    /// hash is stored.
    pub async fn create_api_key(
        &self,
        wallet: &WalletId,
        label: &str,
    ) -> Result<(apikey::NewKey, ApiKeyRecord), PaymentError> {
        let key = apikey::generate();
        let rec = self
            .inner
            .store
            .insert_api_key(wallet, label, &key.hash, &key.last4)
            .await?;
        Ok((key, rec))
    }

    pub async fn list_api_keys(
        &self,
        wallet: &WalletId,
    ) -> Result<Vec<ApiKeyRecord>, PaymentError> {
        Ok(self.inner.store.list_api_keys(wallet).await?)
    }

    pub async fn revoke_api_key(&self, wallet: &WalletId, id: &str) -> Result<bool, PaymentError> {
        Ok(self.inner.store.revoke_api_key(wallet, id).await?)
    }
}

/// A metered request's charge in progress: credits held for the quote, or
/// a reserved per-request payment of the quote. Made by
/// [`Payments::begin_charge`]; finished with [`Payments::finish_charge`]
/// (the work produced billable output) or [`Payments::abort_charge`] (it
/// failed: nothing is charged).
#[derive(Debug)]
pub enum Charge {
    Credits {
        wallet: WalletId,
        hold: HoldId,
        quote: Micros,
    },
    /// Boxed: a charge is held for the whole job.
    Payment(Box<PendingPayment>),
}

impl Charge {
    pub fn wallet(&self) -> &WalletId {
        match self {
            Charge::Credits { wallet, .. } => wallet,
            Charge::Payment(p) => &p.wallet,
        }
    }
}

/// What a finished charge took.
#[derive(Debug)]
pub struct Charged {
    pub wallet: WalletId,
    /// The amount charged: the actual cost (credits, at most the quote) or
    /// the quote (an `exact` payment).
    pub amount: Micros,
    /// `credits`, `x402-v1`, `x402-v2` or `mpp`.
    pub method: &'static str,
    /// The settlement transaction of a payment.
    pub transaction: Option<String>,
    /// Headers for the success response (`PAYMENT-RESPONSE`, …).
    pub headers: HeaderMap,
}

/// Why a charge could not begin.
#[derive(Debug)]
pub enum ChargeRefused {
    /// No credentials: answer the 402 challenge for the offer.
    PaymentRequired,
    /// Refused (bad payment, bad auth, insufficient credits, …).
    Refused(PaymentError),
}

impl Payments {
    /// Gate a metered request quoted at `offer.price`: a presented payment
    /// is verified and reserved; an account (API key or X-Auth) gets a
    /// credit hold of the quote, keyed by `reference` (a job id).
    pub async fn begin_charge(
        &self,
        req: &RequestParts<'_>,
        offer: &Offer,
        reference: &str,
    ) -> Result<Charge, ChargeRefused> {
        match self.authorize(req, Some(offer)).await {
            Ok(None) => Err(ChargeRefused::PaymentRequired),
            Err(e) => Err(ChargeRefused::Refused(e)),
            Ok(Some(Payer::Payment(p))) => Ok(Charge::Payment(Box::new(p))),
            Ok(Some(account)) => {
                let wallet = account.wallet().clone();
                match self.hold_credits(&wallet, offer.price, reference).await {
                    Ok(hold) => Ok(Charge::Credits {
                        wallet,
                        hold,
                        quote: offer.price,
                    }),
                    Err(e) => Err(ChargeRefused::Refused(e)),
                }
            }
        }
    }

    /// The work produced billable output costing `actual`: charge credits
    /// at the actual cost (capped at the quote; the rest returns to the
    /// balance), or settle the payment (an `exact` payment is the quote).
    pub async fn finish_charge(
        &self,
        charge: Charge,
        actual: Micros,
    ) -> Result<Charged, PaymentError> {
        match charge {
            Charge::Credits {
                wallet,
                hold,
                quote,
            } => {
                let amount = actual.min(quote);
                self.settle_credits(&hold, amount).await?;
                Ok(Charged {
                    wallet,
                    amount,
                    method: "credits",
                    transaction: None,
                    headers: HeaderMap::new(),
                })
            }
            Charge::Payment(p) => {
                let wallet = p.wallet.clone();
                let method = p.method.scheme();
                let s = self.settle(*p, None).await?;
                Ok(Charged {
                    wallet,
                    amount: s.amount,
                    method,
                    transaction: Some(s.transaction),
                    headers: s.headers,
                })
            }
        }
    }

    /// The work failed: release the hold or the payment; nothing is charged.
    pub async fn abort_charge(&self, charge: Charge) {
        match charge {
            Charge::Credits { hold, .. } => {
                if let Err(e) = self.release_credits(&hold).await {
                    tracing::warn!(error = %e, "could not release a credit hold");
                }
            }
            Charge::Payment(p) => self.release(*p).await,
        }
    }
}

/// The API key a request carries (`X-API-Key` or `Authorization: Bearer`).
/// Both present and different is refused (PROTOCOL.md §1.3); the SDK's
/// placeholder `sgl-anonymous` counts as no key.
pub fn api_key(headers: &HeaderMap) -> Result<Option<String>, PaymentError> {
    let x = header(headers, "x-api-key").map(str::trim);
    let bearer = header(headers, "authorization").and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let key = match (x, bearer) {
        (Some(a), Some(b)) if a != b => return Err(PaymentError::ApiKeyConflict),
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => return Ok(None),
    };
    if key.is_empty() || key == "sgl-anonymous" {
        return Ok(None);
    }
    Ok(Some(key.to_owned()))
}
