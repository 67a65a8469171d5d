//! x402, scheme `exact` on EVM (EIP-3009), versions 1 and 2: the wire types,
//! the 402 challenge, header codecs, and offline verification of a presented
//! payment against what this server asked for.
//!
//! v1: the challenge is the 402 JSON body; the payment arrives in
//! `X-PAYMENT`; the settlement in `X-PAYMENT-RESPONSE`. v2: the challenge is
//! the `PAYMENT-REQUIRED` header; the payment arrives in `PAYMENT-SIGNATURE`
//! (it echoes the accepted requirements and the resource); the settlement in
//! `PAYMENT-RESPONSE`. Header values are standard base64 of JSON.
//!
//! Verification is exact: the signer must be `from`, `to` the payee, the
//! amount the price (v2) or at least the price (v1, whose `maxAmountRequired`
//! is a ceiling the client may meet), `validAfter ≤ now` and
//! `validBefore ≥ now + 6 s` (the facilitators' rule, leaving time to
//! settle), and network, asset and EIP-712 domain those configured. A v2
//! payment must name this resource's URL; v1 payloads carry no resource, so
//! a v1 payment is bound by payee, amount and network only.

use alloy_primitives::{Address, U256};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{EvmNetwork, PaymentsConfig};
use super::error::PaymentError;
use super::evm::{self, Authorization};
use crate::money::Micros;
use crate::store::PaymentNonceKey;

/// Header names.
pub const X_PAYMENT: &str = "x-payment";
pub const X_PAYMENT_RESPONSE: &str = "x-payment-response";
pub const PAYMENT_REQUIRED: &str = "payment-required";
pub const PAYMENT_SIGNATURE: &str = "payment-signature";
pub const PAYMENT_RESPONSE: &str = "payment-response";

/// The largest payment header accepted (decoded JSON is far smaller).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Seconds of validity an authorization must have left (x402 facilitators
/// require `now + 6 ≤ validBefore`).
pub const SETTLE_MARGIN_SECS: u64 = 6;

/// What a paid resource costs, and how it is described in challenges.
#[derive(Clone, Debug)]
pub struct Offer {
    /// The exact URL of the request being paid for.
    pub resource_url: String,
    pub price: Micros,
    pub description: String,
    pub mime_type: String,
}

/// x402 v1 `PaymentRequirements`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1 {
    pub scheme: String,
    pub network: String,
    pub max_amount_required: String,
    pub resource: String,
    pub description: String,
    pub mime_type: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub asset: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// x402 v2 `PaymentRequirements`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV2 {
    pub scheme: String,
    pub network: String,
    pub asset: String,
    pub amount: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// x402 v2 `ResourceInfo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// x402 v2 `PaymentRequired` (the `PAYMENT-REQUIRED` header's JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV2 {
    pub x402_version: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resource: ResourceInfo,
    pub accepts: Vec<RequirementsV2>,
}

/// The EIP-3009 authorization as x402 sends it (all strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireAuthorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

/// The `exact` EVM payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExactPayload {
    pub signature: String,
    pub authorization: WireAuthorization,
}

/// x402 v1 `PaymentPayload` (the `X-PAYMENT` header's JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
    pub payload: ExactPayload,
}

/// x402 v2 `PaymentPayload` (the `PAYMENT-SIGNATURE` header's JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV2 {
    pub x402_version: u8,
    pub payload: ExactPayload,
    pub accepted: RequirementsV2,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Value>,
}

/// A presented x402 payment, by version.
// Parsed once per request and dropped after verification.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Presented {
    V1(PaymentPayloadV1),
    V2(PaymentPayloadV2),
}

/// A payment that passed offline verification; not yet settled.
#[derive(Clone, Debug)]
pub struct VerifiedPayment {
    pub version: u8,
    pub network: EvmNetwork,
    pub payer: Address,
    /// The authorized amount in token base units.
    pub value: U256,
    /// The replay key, for the store.
    pub key: PaymentNonceKey,
    /// The bodies the facilitator's /verify and /settle take.
    pub facilitator_payload: Value,
    pub facilitator_requirements: Value,
}

impl VerifiedPayment {
    /// The authorized amount as micro-USD (6-decimal tokens), saturating at
    /// `u64::MAX` (an amount that large is refused by the caller anyway).
    pub fn value_micros(&self) -> Micros {
        Micros(u64::try_from(self.value).unwrap_or(u64::MAX))
    }
}

/// Decode a base64 JSON header value (standard alphabet, padding optional).
pub fn decode_header_json(value: &str) -> Result<Value, PaymentError> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(PaymentError::InvalidPayload("header too large"));
    }
    let trimmed = value.trim();
    let bytes = STANDARD
        .decode(trimmed)
        .or_else(|_| STANDARD_NO_PAD.decode(trimmed.trim_end_matches('=')))
        .map_err(|_| PaymentError::InvalidPayload("header is not base64"))?;
    serde_json::from_slice(&bytes).map_err(|_| PaymentError::InvalidPayload("header is not JSON"))
}

/// Standard base64 (with padding) of compact JSON, as the x402 SDKs write.
pub fn encode_header_json<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs cannot fail.
    STANDARD.encode(serde_json::to_vec(value).unwrap_or_default())
}

/// Parse a `PAYMENT-REQUIRED` (v2 challenge) header value.
pub fn parse_payment_required(value: &str) -> Result<PaymentRequiredV2, PaymentError> {
    let json = decode_header_json(value)?;
    if json.get("x402Version").and_then(Value::as_u64) != Some(2) {
        return Err(PaymentError::InvalidVersion);
    }
    serde_json::from_value(json).map_err(|_| PaymentError::InvalidPayload("v2 payment required"))
}

/// Parse an `X-PAYMENT` (v1) or `PAYMENT-SIGNATURE` (v2) header value.
pub fn parse_payment_header(value: &str) -> Result<Presented, PaymentError> {
    let json = decode_header_json(value)?;
    match json.get("x402Version").and_then(Value::as_u64) {
        Some(1) => serde_json::from_value(json)
            .map(Presented::V1)
            .map_err(|_| PaymentError::InvalidPayload("v1 payment payload")),
        Some(2) => serde_json::from_value(json)
            .map(Presented::V2)
            .map_err(|_| PaymentError::InvalidPayload("v2 payment payload")),
        _ => Err(PaymentError::InvalidVersion),
    }
}

fn extra(net: &EvmNetwork) -> Value {
    serde_json::json!({"name": net.asset_name, "version": net.asset_version})
}

/// The v1 requirements this server offers on `net` for `offer`.
fn requirements_v1(cfg: &PaymentsConfig, net: &EvmNetwork, offer: &Offer) -> RequirementsV1 {
    RequirementsV1 {
        scheme: "exact".into(),
        network: net.v1_name.clone(),
        max_amount_required: offer.price.0.to_string(),
        resource: offer.resource_url.clone(),
        description: offer.description.clone(),
        mime_type: offer.mime_type.clone(),
        pay_to: cfg.pay_to.to_checksum(None),
        max_timeout_seconds: cfg.max_timeout_seconds,
        asset: net.asset.to_checksum(None),
        extra: Some(extra(net)),
    }
}

/// The v2 requirements this server offers on `net` for `offer`.
pub fn requirements_v2(cfg: &PaymentsConfig, net: &EvmNetwork, offer: &Offer) -> RequirementsV2 {
    RequirementsV2 {
        scheme: "exact".into(),
        network: net.caip2(),
        asset: net.asset.to_checksum(None),
        amount: offer.price.0.to_string(),
        pay_to: cfg.pay_to.to_checksum(None),
        max_timeout_seconds: cfg.max_timeout_seconds,
        extra: Some(extra(net)),
    }
}

/// The v1 402 body: `{"x402Version": 1, "error", "accepts": [...]}`.
pub fn payment_required_v1(cfg: &PaymentsConfig, offer: &Offer, error: &str) -> Value {
    let accepts: Vec<RequirementsV1> = cfg
        .networks
        .iter()
        .map(|n| requirements_v1(cfg, n, offer))
        .collect();
    serde_json::json!({"x402Version": 1, "error": error, "accepts": accepts})
}

/// The v2 `PaymentRequired` object.
pub fn payment_required_v2(cfg: &PaymentsConfig, offer: &Offer, error: &str) -> PaymentRequiredV2 {
    PaymentRequiredV2 {
        x402_version: 2,
        error: Some(error.to_owned()),
        resource: ResourceInfo {
            url: offer.resource_url.clone(),
            description: Some(offer.description.clone()),
            mime_type: Some(offer.mime_type.clone()),
        },
        accepts: cfg
            .networks
            .iter()
            .map(|n| requirements_v2(cfg, n, offer))
            .collect(),
    }
}

fn same_address(wire: &str, expected: &Address) -> bool {
    evm::parse_address(wire).is_ok_and(|a| a == *expected)
}

/// Check the authorization's time window, payee and signature, shared by
/// both versions (and by MPP).
pub fn check_authorization(
    auth: &Authorization,
    signature: &str,
    net: &EvmNetwork,
    pay_to: &Address,
    now: u64,
) -> Result<(), PaymentError> {
    if auth.to != *pay_to {
        return Err(PaymentError::RecipientMismatch);
    }
    if auth.valid_after > U256::from(now) {
        return Err(PaymentError::NotYetValid);
    }
    if auth.valid_before < U256::from(now.saturating_add(SETTLE_MARGIN_SECS)) {
        return Err(PaymentError::Expired);
    }
    auth.verify(&net.domain(), signature)
}

fn parse_wire(a: &WireAuthorization) -> Result<Authorization, PaymentError> {
    Authorization::parse(
        &a.from,
        &a.to,
        &a.value,
        &a.valid_after,
        &a.valid_before,
        &a.nonce,
    )
}

fn nonce_key(net: &EvmNetwork, auth: &Authorization) -> PaymentNonceKey {
    PaymentNonceKey {
        chain_id: net.chain_id,
        asset: evm::lower(&net.asset),
        payer: evm::lower(&auth.from),
        nonce: format!("{:#x}", auth.nonce),
    }
}

/// Verify a presented payment offline against `offer`, at unix time `now`.
pub fn verify(
    cfg: &PaymentsConfig,
    presented: &Presented,
    offer: &Offer,
    now: u64,
) -> Result<VerifiedPayment, PaymentError> {
    match presented {
        Presented::V1(p) => {
            if p.x402_version != 1 {
                return Err(PaymentError::InvalidVersion);
            }
            if p.scheme != "exact" {
                return Err(PaymentError::UnsupportedScheme);
            }
            let net = cfg
                .networks
                .iter()
                .find(|n| n.v1_name == p.network)
                .ok_or(PaymentError::NetworkMismatch)?;
            let auth = parse_wire(&p.payload.authorization)?;
            if auth.value < U256::from(offer.price.0) {
                return Err(PaymentError::ValueTooLow);
            }
            check_authorization(&auth, &p.payload.signature, net, &cfg.pay_to, now)?;
            let requirements = requirements_v1(cfg, net, offer);
            Ok(VerifiedPayment {
                version: 1,
                network: net.clone(),
                payer: auth.from,
                value: auth.value,
                key: nonce_key(net, &auth),
                facilitator_payload: serde_json::to_value(p).unwrap_or_default(),
                facilitator_requirements: serde_json::to_value(requirements).unwrap_or_default(),
            })
        }
        Presented::V2(p) => {
            if p.x402_version != 2 {
                return Err(PaymentError::InvalidVersion);
            }
            let acc = &p.accepted;
            if acc.scheme != "exact" {
                return Err(PaymentError::UnsupportedScheme);
            }
            let net = cfg
                .networks
                .iter()
                .find(|n| n.caip2() == acc.network)
                .ok_or(PaymentError::NetworkMismatch)?;
            if !same_address(&acc.asset, &net.asset) {
                return Err(PaymentError::NetworkMismatch);
            }
            // The authorized amount first: it is what the facilitator
            // compares, so the reason matches theirs.
            let auth = parse_wire(&p.payload.authorization)?;
            if auth.value != U256::from(offer.price.0) {
                return Err(PaymentError::ValueMismatch);
            }
            if !same_address(&acc.pay_to, &cfg.pay_to) {
                return Err(PaymentError::RequirementsMismatch("payTo"));
            }
            if acc.amount != offer.price.0.to_string() {
                return Err(PaymentError::RequirementsMismatch("amount"));
            }
            if let Some(extra) = &acc.extra {
                let name = extra.get("name").and_then(Value::as_str);
                let version = extra.get("version").and_then(Value::as_str);
                if name.is_some_and(|n| n != net.asset_name)
                    || version.is_some_and(|v| v != net.asset_version)
                {
                    return Err(PaymentError::RequirementsMismatch("extra"));
                }
            }
            match &p.resource {
                Some(r) if r.url == offer.resource_url => {}
                _ => return Err(PaymentError::RequirementsMismatch("resource")),
            }
            check_authorization(&auth, &p.payload.signature, net, &cfg.pay_to, now)?;
            let requirements = requirements_v2(cfg, net, offer);
            Ok(VerifiedPayment {
                version: 2,
                network: net.clone(),
                payer: auth.from,
                value: auth.value,
                key: nonce_key(net, &auth),
                facilitator_payload: serde_json::to_value(p).unwrap_or_default(),
                facilitator_requirements: serde_json::to_value(requirements).unwrap_or_default(),
            })
        }
    }
}
