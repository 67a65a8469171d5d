//! MPP: the `Payment` HTTP authentication scheme, method `evm`, intent
//! `charge`, credential type `authorization` (an EIP-3009 authorization).
//!
//! A challenge (`WWW-Authenticate: Payment id=…, realm=…, method="evm",
//! intent="charge", request=…, expires=…, opaque=…`) is stateless: its id is
//! `base64url(HMAC-SHA256(secret, realm|method|intent|request|expires|digest|opaque))`,
//! so the server recognises its own challenges, and any altered field
//! changes the id. `request` is base64url (no padding) of the RFC 8785 (JCS)
//! serialisation of `{amount, currency, methodDetails{chainId,
//! credentialTypes, decimals}, recipient}`. `opaque` carries the SHA-256 of
//! the resource URL, so a challenge bought for one resource cannot pay for
//! another, and a random salt, so every challenge has its own id. Ids are
//! single use: the store records each redeemed id.
//!
//! The credential (`Authorization: Payment <base64url(JCS(credential))>`)
//! echoes the challenge and carries the authorization, whose EIP-3009 nonce
//! must bind the challenge: `keccak256(utf8(id) ‖ utf8(realm))`. The PyPI
//! client `pympp` 0.16.0 computes `keccak256(JSON.stringify([id, realm]))`
//! instead (`mpp/methods/evm/_eip3009.py`, `challenge_hash`); both bind the
//! same two values unambiguously, so both are accepted.

use alloy_primitives::{keccak256, Address, B256, U256};
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::config::{EvmNetwork, MppConfig};
use super::error::PaymentError;
use super::evm::{self, Authorization};
use super::x402::{self, Offer};
use crate::store::PaymentNonceKey;
use crate::timefmt::{format_rfc3339, parse_rfc3339};

/// The largest `Authorization: Payment` value accepted.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;

pub const METHOD: &str = "evm";
pub const INTENT: &str = "charge";
pub const CREDENTIAL_TYPE: &str = "authorization";

/// RFC 8785 (JCS) serialisation of a JSON value holding strings, integers,
/// booleans, nulls, arrays and objects: members sorted by key (UTF-16 code
/// units, which for these ASCII keys is byte order), no whitespace. Floats
/// never occur in MPP requests; an integer is written as serde_json writes it.
pub fn jcs(v: &Value) -> String {
    let mut out = String::new();
    write_jcs(v, &mut out);
    out
}

fn write_jcs(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_jcs(&map[*k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_jcs(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(s))
        .ok()
}

/// `base64url(HMAC-SHA256(secret, realm|method|intent|request|expires|digest|opaque))`.
#[allow(clippy::too_many_arguments)]
pub fn challenge_id(
    secret: &[u8],
    realm: &str,
    method: &str,
    intent: &str,
    request_b64: &str,
    expires: &str,
    digest: &str,
    opaque_b64: &str,
) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(
        [
            realm,
            method,
            intent,
            request_b64,
            expires,
            digest,
            opaque_b64,
        ]
        .join("|")
        .as_bytes(),
    );
    b64url(&mac.finalize().into_bytes())
}

/// The binding nonce: `keccak256(utf8(id) ‖ utf8(realm))`.
pub fn binding_nonce(id: &str, realm: &str) -> B256 {
    let mut buf = Vec::with_capacity(id.len() + realm.len());
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(realm.as_bytes());
    keccak256(&buf)
}

/// The form `pympp` 0.16.0 signs: `keccak256(JSON.stringify([id, realm]))`.
pub fn binding_nonce_json(id: &str, realm: &str) -> B256 {
    let json = serde_json::to_string(&[id, realm]).unwrap_or_default();
    keccak256(json.as_bytes())
}

/// An issued challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub id: String,
    pub realm: String,
    pub method: String,
    pub intent: String,
    pub request_b64: String,
    pub expires: String,
    pub opaque_b64: Option<String>,
}

impl Challenge {
    /// The `WWW-Authenticate` value.
    pub fn www_authenticate(&self) -> String {
        let mut s = format!(
            "Payment id=\"{}\", realm=\"{}\", method=\"{}\", intent=\"{}\", request=\"{}\", expires=\"{}\"",
            self.id, self.realm, self.method, self.intent, self.request_b64, self.expires
        );
        if let Some(o) = &self.opaque_b64 {
            s.push_str(&format!(", opaque=\"{o}\""));
        }
        s
    }
}

/// The `request` object of an `evm/charge` challenge.
pub fn charge_request(net: &EvmNetwork, pay_to: &Address, amount: u64) -> Value {
    serde_json::json!({
        "amount": amount.to_string(),
        "currency": net.asset.to_checksum(None),
        "methodDetails": {
            "chainId": net.chain_id,
            "credentialTypes": [CREDENTIAL_TYPE],
            "decimals": 6,
        },
        "recipient": pay_to.to_checksum(None),
    })
}

fn resource_hash(resource_url: &str) -> String {
    hex::encode(Sha256::digest(resource_url.as_bytes()))
}

/// `opaque`: the resource hash, and a random salt so that two challenges
/// for the same resource in the same second still get distinct ids.
fn resource_opaque(resource_url: &str) -> String {
    let mut salt = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
    let obj = serde_json::json!({ "resource": resource_hash(resource_url), "salt": b64url(&salt) });
    b64url(jcs(&obj).as_bytes())
}

/// Whether an echoed `opaque` names `resource_url`.
fn opaque_names(opaque_b64: Option<&str>, resource_url: &str) -> bool {
    let Some(bytes) = opaque_b64.and_then(b64url_decode) else {
        return false;
    };
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("resource").and_then(Value::as_str).map(str::to_owned))
        .is_some_and(|h| h == resource_hash(resource_url))
}

/// Issue a challenge for `offer`, valid until `now + cfg.validity`.
pub fn issue(
    cfg: &MppConfig,
    net: &EvmNetwork,
    pay_to: &Address,
    offer: &Offer,
    now: u64,
) -> Challenge {
    let request_b64 = b64url(jcs(&charge_request(net, pay_to, offer.price.0)).as_bytes());
    let expires = format_rfc3339(now.saturating_add(cfg.validity.as_secs()));
    let opaque = resource_opaque(&offer.resource_url);
    let id = challenge_id(
        &cfg.secret,
        &cfg.realm,
        METHOD,
        INTENT,
        &request_b64,
        &expires,
        "",
        &opaque,
    );
    Challenge {
        id,
        realm: cfg.realm.clone(),
        method: METHOD.into(),
        intent: INTENT.into(),
        request_b64,
        expires,
        opaque_b64: Some(opaque),
    }
}

/// The challenge as echoed in a credential.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChallengeEcho {
    pub id: String,
    pub realm: String,
    pub method: String,
    pub intent: String,
    pub request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}

/// The `authorization` payload of an `evm/charge` credential.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPayload {
    #[serde(rename = "type")]
    pub kind: String,
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
    pub signature: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credential {
    pub challenge: ChallengeEcho,
    pub payload: AuthorizationPayload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Parse an `Authorization` header value `Payment <base64url(JSON)>`.
pub fn parse_authorization(value: &str) -> Result<Credential, PaymentError> {
    if value.len() > MAX_CREDENTIAL_BYTES {
        return Err(PaymentError::MppMalformed("credential too large"));
    }
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(PaymentError::MppMalformed("no credential"))?;
    if !scheme.eq_ignore_ascii_case("payment") {
        return Err(PaymentError::MppMalformed("not the Payment scheme"));
    }
    let bytes = b64url_decode(token.trim()).ok_or(PaymentError::MppMalformed("not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| PaymentError::MppMalformed("credential JSON"))
}

/// A credential that passed offline verification; not yet settled.
#[derive(Clone, Debug)]
pub struct VerifiedCredential {
    pub challenge_id: String,
    /// Unix seconds at which the challenge expires.
    pub expires_at: u64,
    pub payer: Address,
    pub key: PaymentNonceKey,
    /// What the facilitator settles: the authorization as an x402 v2
    /// `exact` payment for the challenge's requirements.
    pub facilitator_payload: Value,
    pub facilitator_requirements: Value,
}

/// Verify a credential offline against `offer`: the echoed challenge must
/// be one this server issued for this resource and price, unexpired; the
/// authorization must bind the challenge, pay the recipient the amount, be
/// inside its time window, and be signed by `from`.
pub fn verify(
    cfg: &MppConfig,
    net: &EvmNetwork,
    pay_to: &Address,
    offer: &Offer,
    cred: &Credential,
    now: u64,
) -> Result<VerifiedCredential, PaymentError> {
    let ch = &cred.challenge;
    let expires = ch.expires.as_deref().unwrap_or("");
    let expected = challenge_id(
        &cfg.secret,
        &ch.realm,
        &ch.method,
        &ch.intent,
        &ch.request,
        expires,
        ch.digest.as_deref().unwrap_or(""),
        ch.opaque.as_deref().unwrap_or(""),
    );
    if !bool::from(expected.as_bytes().ct_eq(ch.id.as_bytes())) {
        return Err(PaymentError::MppChallengeInvalid);
    }
    // The id is ours, so every echoed field is as issued; what remains is
    // whether it was issued for this realm, resource and price.
    if ch.realm != cfg.realm || ch.method != METHOD || ch.intent != INTENT {
        return Err(PaymentError::MppChallengeInvalid);
    }
    let expires_at = parse_rfc3339(expires).ok_or(PaymentError::MppChallengeInvalid)?;
    if now >= expires_at {
        return Err(PaymentError::MppChallengeExpired);
    }
    if !opaque_names(ch.opaque.as_deref(), &offer.resource_url) {
        return Err(PaymentError::RequirementsMismatch("resource"));
    }
    let expected_request = b64url(jcs(&charge_request(net, pay_to, offer.price.0)).as_bytes());
    if ch.request != expected_request {
        return Err(PaymentError::RequirementsMismatch("request"));
    }
    let p = &cred.payload;
    if p.kind != CREDENTIAL_TYPE {
        return Err(PaymentError::MppMalformed("credential type"));
    }
    let auth = Authorization::parse(
        &p.from,
        &p.to,
        &p.value,
        &p.valid_after,
        &p.valid_before,
        &p.nonce,
    )
    .map_err(|_| PaymentError::MppMalformed("authorization"))?;
    if auth.nonce != binding_nonce(&ch.id, &ch.realm)
        && auth.nonce != binding_nonce_json(&ch.id, &ch.realm)
    {
        return Err(PaymentError::MppNonceNotBound);
    }
    if auth.value != U256::from(offer.price.0) {
        return Err(PaymentError::ValueMismatch);
    }
    x402::check_authorization(&auth, &p.signature, net, pay_to, now)?;
    if let Some(source) = &cred.source {
        let expected = format!("did:pkh:eip155:{}:{}", net.chain_id, evm::lower(&auth.from));
        if !source.eq_ignore_ascii_case(&expected) {
            return Err(PaymentError::MppMalformed("source"));
        }
    }
    let requirements =
        x402::requirements_v2(&super::config::PaymentsConfig::new(*pay_to, ""), net, offer);
    let payload = serde_json::json!({
        "x402Version": 2,
        "payload": {
            "signature": p.signature,
            "authorization": {
                "from": p.from, "to": p.to, "value": p.value,
                "validAfter": p.valid_after, "validBefore": p.valid_before, "nonce": p.nonce,
            }
        },
        "accepted": requirements,
        "resource": {"url": offer.resource_url},
    });
    Ok(VerifiedCredential {
        challenge_id: ch.id.clone(),
        expires_at,
        payer: auth.from,
        key: PaymentNonceKey {
            chain_id: net.chain_id,
            asset: evm::lower(&net.asset),
            payer: evm::lower(&auth.from),
            nonce: format!("{:#x}", auth.nonce),
        },
        facilitator_payload: payload,
        facilitator_requirements: serde_json::to_value(requirements).unwrap_or_default(),
    })
}

/// The `Payment-Receipt` value: base64url(JCS({method, reference, status,
/// timestamp})).
pub fn receipt(reference: &str, now: u64) -> String {
    let obj = serde_json::json!({
        "method": METHOD,
        "reference": reference,
        "status": "success",
        "timestamp": format_rfc3339(now),
    });
    b64url(jcs(&obj).as_bytes())
}
