//! Wallet request signatures (`X-Auth-*` headers) over the
//! `X402-COMPUTE-AUTH` v1 message (PROTOCOL.md §5.8):
//!
//! ```text
//! X402-COMPUTE-AUTH\nv1\n<chain>\n<address>\n<METHOD>\n<path>\n<sha256 hex of body>\n<timestamp ms>\n<nonce>
//! ```
//!
//! - `base`: the address is the lowercase `0x…` form; the signature is
//!   EIP-191 `personal_sign`, 65 bytes hex (`X-Auth-Sig-Encoding: hex`).
//! - `solana`: the address is the base58 public key as given; the signature
//!   is raw ed25519 over the message bytes, base64 (`base64`; `base58` and
//!   `hex` are also read).
//!
//! The timestamp must be within ± the configured window (300 s) of now, and
//! a nonce is accepted once per (chain, address): the store remembers it
//! until the window has passed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::error::PaymentError;
use super::evm;
use crate::store::WalletId;

pub const MESSAGE_TAG: &str = "X402-COMPUTE-AUTH";
pub const MESSAGE_VERSION: &str = "v1";

/// The headers, as received.
#[derive(Clone, Debug, Default)]
pub struct AuthHeaders<'a> {
    pub address: &'a str,
    pub chain: &'a str,
    pub signature: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub sig_encoding: Option<&'a str>,
}

/// A signed request's wallet, after the signature and window checks but
/// before the nonce is consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedBy {
    /// `base` or `solana`.
    pub chain: &'static str,
    pub wallet: WalletId,
    pub timestamp_ms: i64,
    pub nonce: String,
}

/// Build the canonical message.
pub fn message(
    chain: &str,
    address: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timestamp_ms: &str,
    nonce: &str,
) -> String {
    let body_hash = hex::encode(Sha256::digest(body));
    [
        MESSAGE_TAG,
        MESSAGE_VERSION,
        chain,
        address,
        &method.to_ascii_uppercase(),
        path,
        &body_hash,
        timestamp_ms,
        nonce,
    ]
    .join("\n")
}

fn valid_nonce(n: &str) -> bool {
    (8..=128).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Verify the signature over (method, each candidate path, body) and the
/// timestamp window. `paths` lists the forms the client may have signed
/// (the path, then the path with its query). Consuming the nonce is the
/// caller's next step.
pub fn verify(
    h: &AuthHeaders<'_>,
    method: &str,
    paths: &[&str],
    body: &[u8],
    now_ms: i64,
    window_ms: i64,
) -> Result<SignedBy, PaymentError> {
    if !valid_nonce(h.nonce) {
        return Err(PaymentError::AuthInvalid("nonce"));
    }
    if h.timestamp.is_empty()
        || h.timestamp.len() > 16
        || !h.timestamp.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(PaymentError::AuthInvalid("timestamp"));
    }
    let ts: i64 = h
        .timestamp
        .parse()
        .map_err(|_| PaymentError::AuthInvalid("timestamp"))?;
    if (now_ms - ts).abs() > window_ms {
        return Err(PaymentError::AuthExpired);
    }
    match h.chain {
        "base" => {
            let addr =
                evm::parse_address(h.address).map_err(|_| PaymentError::AuthInvalid("address"))?;
            let lower = evm::lower(&addr);
            match h.sig_encoding {
                None | Some("hex") => {}
                Some(_) => return Err(PaymentError::AuthInvalid("signature encoding")),
            }
            for path in paths {
                let msg = message("base", &lower, method, path, body, h.timestamp, h.nonce);
                match evm::recover_personal(msg.as_bytes(), h.signature) {
                    Ok(a) if a == addr => {
                        return Ok(SignedBy {
                            chain: "base",
                            wallet: WalletId::new_unchecked(lower),
                            timestamp_ms: ts,
                            nonce: h.nonce.to_owned(),
                        })
                    }
                    Ok(_) => {}
                    Err(PaymentError::HighS) => {
                        return Err(PaymentError::AuthInvalid("high-s signature"))
                    }
                    Err(_) => return Err(PaymentError::AuthInvalid("signature")),
                }
            }
            Err(PaymentError::AuthInvalid("signature"))
        }
        "solana" => {
            let pk: [u8; 32] = crate::proto::b58::decode_array(h.address, "address")
                .map_err(|_| PaymentError::AuthInvalid("address"))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&pk)
                .map_err(|_| PaymentError::AuthInvalid("address"))?;
            let sig_bytes = match h.sig_encoding.unwrap_or("base64") {
                "base64" => STANDARD.decode(h.signature).ok(),
                "base58" => crate::proto::b58::decode_array::<64>(h.signature, "signature")
                    .ok()
                    .map(|a| a.to_vec()),
                "hex" => hex::decode(h.signature.strip_prefix("0x").unwrap_or(h.signature)).ok(),
                _ => None,
            }
            .ok_or(PaymentError::AuthInvalid("signature encoding"))?;
            let sig_arr: [u8; 64] = sig_bytes
                .as_slice()
                .try_into()
                .map_err(|_| PaymentError::AuthInvalid("signature"))?;
            let sig = ed25519_dalek::Signature::from_bytes(&sig_arr);
            for path in paths {
                let msg = message(
                    "solana",
                    h.address,
                    method,
                    path,
                    body,
                    h.timestamp,
                    h.nonce,
                );
                if key.verify_strict(msg.as_bytes(), &sig).is_ok() {
                    return Ok(SignedBy {
                        chain: "solana",
                        wallet: WalletId::new_unchecked(h.address),
                        timestamp_ms: ts,
                        nonce: h.nonce.to_owned(),
                    });
                }
            }
            Err(PaymentError::AuthInvalid("signature"))
        }
        _ => Err(PaymentError::AuthInvalid("chain")),
    }
}
