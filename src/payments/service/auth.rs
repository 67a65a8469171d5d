//! Authentication: the account behind a request, by API key
//! (`X-API-Key` or `Authorization: Bearer`) or wallet signature
//! (`X-Auth-*`, nonce consumed).
//!
//! A key found in the store is remembered for [`KEY_CACHE_TTL`] (by its
//! SHA-256, never the key), so a busy key does not cost a query per
//! request; a revoked key therefore stops working within that time.
//! Unknown keys are not remembered: a key just made works at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use super::{header, Payments, RequestParts};
use crate::payments::apikey;
use crate::payments::error::PaymentError;
use crate::payments::service::payment::PendingPayment;
use crate::payments::xauth::{self, AuthHeaders};
use crate::store::WalletId;

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

/// How long a key looked up in the store is taken as valid without
/// asking it again (and so how long a revoked key may still be accepted).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// The most keys remembered at once; past it the cache starts afresh.
const KEY_CACHE_MAX: usize = 16_384;

/// Keys recently found in the store: SHA-256 of the key → (wallet, key id,
/// when it was looked up).
#[derive(Debug, Default)]
pub(super) struct KeyCache(Mutex<HashMap<[u8; 32], (WalletId, String, Instant)>>);

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<(WalletId, String)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (wallet, id, at) = map.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| (wallet.clone(), id.clone()))
    }

    fn put(&self, hash: [u8; 32], wallet: WalletId, id: String) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= KEY_CACHE_MAX {
            map.retain(|_, (_, _, at)| at.elapsed() < KEY_CACHE_TTL);
            if map.len() >= KEY_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (wallet, id, Instant::now()));
    }

    /// Forget every key (one was revoked here: it stops at once on this
    /// process, within [`KEY_CACHE_TTL`] on the others).
    pub(super) fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Payments {
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
        // The map is keyed by the SHA-256 of a 256-bit secret, as the
        // store's index is: its lookup time reveals nothing useful.
        if let Some((wallet, key_id)) = self.inner.keys.get(&h) {
            return Ok(Payer::ApiKey { wallet, key_id });
        }
        let rec = self
            .inner
            .store
            .find_api_key(&h)
            .await?
            .ok_or(PaymentError::ApiKeyInvalid)?;
        if !apikey::hashes_equal(&rec.key_hash, &h) {
            return Err(PaymentError::ApiKeyInvalid);
        }
        self.inner.keys.put(h, rec.wallet.clone(), rec.id.clone());
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
