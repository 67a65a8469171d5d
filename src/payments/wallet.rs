//! A payer's wallet on the client's machine: an EVM private key read from
//! an owner-only file, with which `sgl chat` pays a coordinator's 402 per
//! request (an x402 v2 `exact` payment: an EIP-3009 authorization of the
//! USDC amount asked for) or signs its requests (`X-Auth-*`, EIP-191) so
//! that the wallet's prepaid credits pay.
//!
//! The client pays only what it can check: USDC on Base or Base Sepolia
//! (the token contracts and EIP-712 domains are the ones built in, not the
//! server's word), and never more than the caller's cap.

use std::path::Path;

use alloy_primitives::{eip191_hash_message, Address, B256, U256};
use k256::ecdsa::SigningKey;
use serde_json::{json, Value};
use thiserror::Error;
use zeroize::Zeroizing;

use super::config::EvmNetwork;
use super::evm::{self, Authorization};
use super::x402::{self, PaymentRequiredV2, RequirementsV2};
use crate::money::Micros;
use crate::private_file::{self, PrivateFileError};

/// The largest wallet key file read.
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Debug, Error)]
pub enum WalletError {
    #[error("wallet key file: {0}")]
    File(#[from] PrivateFileError),
    #[error("the wallet key is not a secp256k1 private key (64 hex digits, 0x optional)")]
    BadKey,
    #[error("the 402 carries no payment request this wallet can check: {0}")]
    NoUsableOffer(String),
    #[error("the coordinator asks {asked} USD, above the cap of {cap} USD (--max-payment)")]
    AboveCap { asked: String, cap: String },
}

/// An EVM wallet key. Its Debug output shows the address only.
pub struct WalletKey {
    key: SigningKey,
    address: Address,
}

impl std::fmt::Debug for WalletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalletKey")
            .field("address", &evm::lower(&self.address))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// What a paid request was charged, from the coordinator's receipt header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaidX402 {
    /// The authorized amount.
    pub amount: Micros,
    pub network: String,
}

impl WalletKey {
    /// A key from its hex form (64 digits, `0x` optional, surrounding
    /// whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, WalletError> {
        let t = text.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        if t.len() != 64 {
            return Err(WalletError::BadKey);
        }
        let bytes = Zeroizing::new(hex::decode(t).map_err(|_| WalletError::BadKey)?);
        let key = SigningKey::from_slice(&bytes).map_err(|_| WalletError::BadKey)?;
        let address = Address::from_public_key(key.verifying_key());
        Ok(WalletKey { key, address })
    }

    /// Read the key from an owner-only file (tightened to 0600 first).
    pub fn load(path: &Path) -> Result<Self, WalletError> {
        let bytes = private_file::read_secret(path, MAX_KEY_FILE_BYTES)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| WalletError::BadKey)?;
        Self::from_hex(text)
    }

    pub fn address(&self) -> Address {
        self.address
    }

    /// 65-byte `r ‖ s ‖ v` (v = 27/28) of a digest, low-s (RFC 6979).
    fn sign_digest(&self, digest: &B256) -> String {
        // A prehash of 32 bytes is always accepted by the signer.
        match self.key.sign_prehash_recoverable(digest.as_slice()) {
            Ok((sig, recid)) => {
                let mut out = sig.to_bytes().to_vec();
                out.push(27 + recid.to_byte());
                format!("0x{}", hex::encode(out))
            }
            Err(_) => String::new(),
        }
    }

    /// The `PAYMENT-SIGNATURE` value paying the first requirement of a
    /// `PAYMENT-REQUIRED` header that this wallet can check, and what it
    /// pays; refused above `cap`.
    pub fn pay_x402(
        &self,
        payment_required: &str,
        cap: Micros,
        now: u64,
    ) -> Result<(String, PaidX402), WalletError> {
        let required: PaymentRequiredV2 = x402::parse_payment_required(payment_required)
            .map_err(|e| WalletError::NoUsableOffer(e.to_string()))?;
        let known = [EvmNetwork::base_usdc(), EvmNetwork::base_sepolia_usdc()];
        let (req, net) = required
            .accepts
            .iter()
            .filter(|r| r.scheme == "exact")
            .find_map(|r| {
                known
                    .iter()
                    .find(|n| {
                        n.caip2() == r.network
                            && evm::parse_address(&r.asset).is_ok_and(|a| a == n.asset)
                    })
                    .map(|n| (r, n))
            })
            .ok_or_else(|| {
                WalletError::NoUsableOffer("no exact USDC payment on Base or Base Sepolia".into())
            })?;
        let amount: u64 = req
            .amount
            .parse()
            .map_err(|_| WalletError::NoUsableOffer("amount".into()))?;
        if amount > cap.0 {
            return Err(WalletError::AboveCap {
                asked: Micros(amount).to_usd_string(),
                cap: cap.to_usd_string(),
            });
        }
        let header = self.sign_exact_v2(&required, req, net, amount, now)?;
        Ok((
            header,
            PaidX402 {
                amount: Micros(amount),
                network: req.network.clone(),
            },
        ))
    }

    fn sign_exact_v2(
        &self,
        required: &PaymentRequiredV2,
        req: &RequirementsV2,
        net: &EvmNetwork,
        amount: u64,
        now: u64,
    ) -> Result<String, WalletError> {
        let pay_to = evm::parse_address(&req.pay_to)
            .map_err(|_| WalletError::NoUsableOffer("payTo".into()))?;
        let mut nonce = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        // As the x402 SDKs do: valid from a little in the past (clock skew),
        // until the server's timeout has passed.
        let valid_after = now.saturating_sub(600);
        let valid_before = now + req.max_timeout_seconds.clamp(60, 3600);
        let auth = Authorization {
            from: self.address,
            to: pay_to,
            value: U256::from(amount),
            valid_after: U256::from(valid_after),
            valid_before: U256::from(valid_before),
            nonce: B256::from(nonce),
        };
        let signature = self.sign_digest(&auth.signing_hash(&net.domain()));
        let payload = json!({
            "x402Version": 2,
            "payload": {
                "signature": signature,
                "authorization": {
                    "from": self.address.to_checksum(None),
                    "to": pay_to.to_checksum(None),
                    "value": amount.to_string(),
                    "validAfter": valid_after.to_string(),
                    "validBefore": valid_before.to_string(),
                    "nonce": format!("{:#x}", auth.nonce),
                },
            },
            "accepted": req,
            "resource": required.resource,
        });
        Ok(x402::encode_header_json(&payload))
    }

    /// An EIP-191 (`personal_sign`) signature of `message`: 65 bytes
    /// `r ‖ s ‖ v`, hex. The x402 discovery document's ownership proofs
    /// are these, over the server's origin.
    pub fn sign_personal(&self, message: &[u8]) -> String {
        self.sign_digest(&eip191_hash_message(message))
    }

    /// `X-Auth-*` headers signing a request (chain `base`, EIP-191) at
    /// `now_ms`, so that the wallet's credits pay for it.
    pub fn xauth_headers(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Vec<(&'static str, String)> {
        let addr = evm::lower(&self.address);
        let ts = now_ms.to_string();
        let mut n = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut n);
        let nonce = hex::encode(n);
        let msg = super::xauth::message("base", &addr, method, path, body, &ts, &nonce);
        let sig = self.sign_digest(&eip191_hash_message(msg.as_bytes()));
        vec![
            ("X-Auth-Address", addr),
            ("X-Auth-Chain", "base".into()),
            ("X-Auth-Signature", sig),
            ("X-Auth-Timestamp", ts),
            ("X-Auth-Nonce", nonce),
            ("X-Auth-Sig-Encoding", "hex".into()),
        ]
    }
}

/// The settlement a `PAYMENT-RESPONSE` header reports.
pub fn parse_payment_response(value: &str) -> Option<Value> {
    x402::decode_header_json(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANVIL0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    #[test]
    fn key_and_address() {
        let w = WalletKey::from_hex(&format!("  {ANVIL0}\n")).unwrap();
        assert_eq!(
            evm::lower(&w.address()),
            "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
        );
        assert!(!format!("{w:?}").contains("ac0974"));
        assert!(WalletKey::from_hex("0x1234").is_err());
        assert!(WalletKey::from_hex(&"0".repeat(64)).is_err());
    }

    #[test]
    fn pays_what_the_server_verifies_and_respects_the_cap() {
        use crate::payments::config::PaymentsConfig;
        use crate::payments::x402::{Offer, Presented};
        let w = WalletKey::from_hex(ANVIL0).unwrap();
        let pay_to: Address = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
            .parse()
            .unwrap();
        let cfg = PaymentsConfig::new(pay_to, "http://127.0.0.1:9");
        let offer = Offer {
            resource_url: "http://h/v1/chat/completions".into(),
            price: Micros(1234),
            description: "d".into(),
            mime_type: "application/json".into(),
        };
        let required =
            x402::encode_header_json(&x402::payment_required_v2(&cfg, &offer, "payment required"));
        let now = 1_800_000_000;
        let (header, paid) = w.pay_x402(&required, Micros(10_000), now).unwrap();
        assert_eq!(paid.amount, Micros(1234));
        let presented = x402::parse_payment_header(&header).unwrap();
        assert!(matches!(presented, Presented::V2(_)));
        let v = x402::verify(&cfg, &presented, &offer, now).unwrap();
        assert_eq!(v.payer, w.address());
        assert!(matches!(
            w.pay_x402(&required, Micros(1000), now),
            Err(WalletError::AboveCap { .. })
        ));
    }
}
