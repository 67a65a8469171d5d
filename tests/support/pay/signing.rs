//! Test-side signing with known keys (Anvil key #0 and others): EIP-3009
//! authorizations and EIP-191 messages, as a wallet would make them.

use alloy_primitives::{eip191_hash_message, Address, B256, U256};
use k256::ecdsa::SigningKey;
use sgl::payments::evm::{Authorization, TokenDomain};

/// Anvil / Hardhat test key #0.
pub const ANVIL0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Anvil / Hardhat test key #1.
pub const ANVIL1: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

pub fn key(hex_key: &str) -> SigningKey {
    SigningKey::from_slice(&hex::decode(hex_key).unwrap()).unwrap()
}

pub fn address(k: &SigningKey) -> Address {
    Address::from_public_key(k.verifying_key())
}

/// 65-byte r‖s‖v (v = 27/28) hex signature of a digest (low-s, RFC 6979).
pub fn sign_digest(k: &SigningKey, digest: &B256) -> String {
    let (sig, recid) = k.sign_prehash_recoverable(digest.as_slice()).unwrap();
    let mut out = sig.to_bytes().to_vec();
    out.push(27 + recid.to_byte());
    format!("0x{}", hex::encode(out))
}

/// The same signature with s replaced by n − s and v flipped (high-s).
pub fn malleate(sig_hex: &str) -> String {
    let b = hex::decode(sig_hex.trim_start_matches("0x")).unwrap();
    let n = U256::from_str_radix(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();
    let s = U256::from_be_slice(&b[32..64]);
    let hs = n - s;
    let mut out = b[..32].to_vec();
    out.extend_from_slice(&hs.to_be_bytes::<32>());
    out.push(if b[64] == 27 { 28 } else { 27 });
    format!("0x{}", hex::encode(out))
}

pub fn sign_authorization(k: &SigningKey, auth: &Authorization, domain: &TokenDomain) -> String {
    sign_digest(k, &auth.signing_hash(domain))
}

pub fn personal_sign(k: &SigningKey, message: &[u8]) -> String {
    sign_digest(k, &eip191_hash_message(message))
}

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use sgl::payments::config::EvmNetwork;

/// What a test payment looks like; defaults are a valid payment.
#[derive(Clone, Debug)]
pub struct PayParams {
    pub pay_to: Address,
    pub value: u64,
    pub valid_after: u64,
    pub valid_before: u64,
    pub nonce: B256,
    pub network: EvmNetwork,
    pub high_s: bool,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl PayParams {
    pub fn new(pay_to: Address, value: u64) -> Self {
        let mut nonce = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        PayParams {
            pay_to,
            value,
            valid_after: 0,
            valid_before: unix_now() + 300,
            nonce: B256::from(nonce),
            network: EvmNetwork::base_usdc(),
            high_s: false,
        }
    }

    fn signed(&self, k: &SigningKey) -> (Value, String) {
        let from = address(k);
        let auth = Authorization {
            from,
            to: self.pay_to,
            value: U256::from(self.value),
            valid_after: U256::from(self.valid_after),
            valid_before: U256::from(self.valid_before),
            nonce: self.nonce,
        };
        let mut sig = sign_authorization(k, &auth, &self.network.domain());
        if self.high_s {
            sig = malleate(&sig);
        }
        let wire = json!({
            "from": from.to_checksum(None),
            "to": self.pay_to.to_checksum(None),
            "value": self.value.to_string(),
            "validAfter": self.valid_after.to_string(),
            "validBefore": self.valid_before.to_string(),
            "nonce": format!("{:#x}", self.nonce),
        });
        (wire, sig)
    }

    /// An `X-PAYMENT` (v1) header value.
    pub fn x402_v1(&self, k: &SigningKey) -> String {
        let (auth, sig) = self.signed(k);
        let p = json!({"x402Version": 1, "scheme": "exact", "network": self.network.v1_name,
            "payload": {"signature": sig, "authorization": auth}});
        STANDARD.encode(serde_json::to_vec(&p).unwrap())
    }

    /// A `PAYMENT-SIGNATURE` (v2) header value for `resource_url`.
    pub fn x402_v2(&self, k: &SigningKey, resource_url: &str) -> String {
        let (auth, sig) = self.signed(k);
        let p = json!({"x402Version": 2,
            "payload": {"signature": sig, "authorization": auth},
            "accepted": {"scheme": "exact", "network": self.network.caip2(),
                "asset": self.network.asset.to_checksum(None), "amount": self.value.to_string(),
                "payTo": self.pay_to.to_checksum(None), "maxTimeoutSeconds": 300,
                "extra": {"name": self.network.asset_name, "version": self.network.asset_version}},
            "resource": {"url": resource_url, "description": "echo", "mimeType": "application/json"}});
        STANDARD.encode(serde_json::to_vec(&p).unwrap())
    }
}

/// The parameters of a `WWW-Authenticate: Payment …` challenge.
pub fn parse_challenge(header: &str) -> std::collections::BTreeMap<String, String> {
    let rest = header.strip_prefix("Payment ").expect("Payment scheme");
    let mut out = std::collections::BTreeMap::new();
    for part in rest.split(", ") {
        let (k, v) = part.split_once('=').unwrap();
        out.insert(k.to_owned(), v.trim_matches('"').to_owned());
    }
    out
}

/// An `Authorization: Payment …` credential answering `challenge`, signed
/// by `k`; `nonce` defaults to keccak256(id ‖ realm).
pub fn mpp_credential(k: &SigningKey, challenge: &str, nonce: Option<B256>) -> String {
    let c = parse_challenge(challenge);
    let req: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&c["request"]).unwrap()).unwrap();
    let expires = sgl::timefmt::parse_rfc3339(&c["expires"]).unwrap();
    let mut p = PayParams::new(
        req["recipient"].as_str().unwrap().parse().unwrap(),
        req["amount"].as_str().unwrap().parse().unwrap(),
    );
    p.valid_before = expires;
    p.nonce = nonce.unwrap_or_else(|| sgl::payments::mpp::binding_nonce(&c["id"], &c["realm"]));
    let (auth, sig) = p.signed(k);
    let mut payload = auth;
    payload["signature"] = sig.into();
    payload["type"] = "authorization".into();
    let mut challenge_echo = json!({"id": c["id"], "realm": c["realm"], "method": c["method"],
        "intent": c["intent"], "request": c["request"], "expires": c["expires"]});
    if let Some(o) = c.get("opaque") {
        challenge_echo["opaque"] = o.clone().into();
    }
    let cred = json!({"challenge": challenge_echo, "payload": payload,
        "source": format!("did:pkh:eip155:8453:{}", address(k).to_checksum(None))});
    format!(
        "Payment {}",
        URL_SAFE_NO_PAD.encode(sgl::payments::mpp::jcs(&cred))
    )
}

/// X-Auth headers for a request, signed by `k` (EIP-191, chain base).
pub fn xauth_headers(
    k: &SigningKey,
    method: &str,
    path: &str,
    body: &[u8],
    timestamp_ms: i64,
    nonce: &str,
) -> Vec<(&'static str, String)> {
    let addr = format!("{:#x}", address(k));
    let ts = timestamp_ms.to_string();
    let msg = sgl::payments::xauth::message("base", &addr, method, path, body, &ts, nonce);
    vec![
        ("X-Auth-Address", addr),
        ("X-Auth-Chain", "base".into()),
        ("X-Auth-Signature", personal_sign(k, msg.as_bytes())),
        ("X-Auth-Timestamp", ts),
        ("X-Auth-Nonce", nonce.into()),
        ("X-Auth-Sig-Encoding", "hex".into()),
    ]
}
