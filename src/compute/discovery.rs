//! `GET /.well-known/x402`: the x402 discovery document (the x402scan
//! convention) listing the paid resources this server serves:
//!
//! ```json
//! {"version": 1,
//!  "resources": ["https://grid.example.com/api/x402/compute", …],
//!  "ownershipProofs": ["0x…"],
//!  "instructions": "# …markdown…"}
//! ```
//!
//! An ownership proof is an EIP-191 (`personal_sign`) signature by the
//! pay-to wallet of the server's origin (`scheme://host[:port]`, no
//! trailing slash): whoever checks it recovers the signer and compares it
//! with the `payTo` of the resources' 402s. Proofs are made at start from
//! the pay-to key, or given ready-made; either way each is checked to
//! recover to the pay-to address before it is served, so a wrong key or a
//! stale proof stops the server at start instead of being published.

use alloy_primitives::Address;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::payments::evm;
use crate::payments::wallet::WalletKey;

/// The route.
pub const PATH: &str = "/.well-known/x402";

/// A paid resource, as the document lists and describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The absolute URL clients pay at.
    pub url: String,
    /// `POST` or `GET`.
    pub method: &'static str,
    /// One markdown paragraph: what it does, what it costs, how to call it.
    pub about: String,
}

/// The document.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// `scheme://host[:port]`, what the proofs sign.
    pub origin: String,
    pub resources: Vec<Resource>,
    pub ownership_proofs: Vec<String>,
    /// The title of the instructions.
    pub service_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0:?} is not an absolute http(s) URL")]
    BadUrl(String),
    #[error("the ownership proof {proof:?} does not recover to the pay-to address {pay_to} over {origin:?}")]
    WrongSigner {
        proof: String,
        pay_to: String,
        origin: String,
    },
}

/// The origin of a URL: `scheme://host[:port]`, lowercase scheme and host,
/// the port only when it is not the scheme's default.
pub fn origin(url: &str) -> Result<String, DiscoveryError> {
    let u = reqwest::Url::parse(url).map_err(|_| DiscoveryError::BadUrl(url.to_owned()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(DiscoveryError::BadUrl(url.to_owned()));
    }
    // `Origin::ascii_serialization` is the browser's origin string: no
    // trailing slash, default ports left out.
    Ok(u.origin().ascii_serialization())
}

/// The ownership proof of `origin` by `key`.
pub fn ownership_proof(key: &WalletKey, origin: &str) -> String {
    key.sign_personal(origin.as_bytes())
}

/// Check that `proof` is `pay_to`'s signature of `origin`.
pub fn check_proof(proof: &str, origin: &str, pay_to: &Address) -> Result<(), DiscoveryError> {
    match evm::recover_personal(origin.as_bytes(), proof) {
        Ok(a) if a == *pay_to => Ok(()),
        _ => Err(DiscoveryError::WrongSigner {
            proof: proof.to_owned(),
            pay_to: evm::lower(pay_to),
            origin: origin.to_owned(),
        }),
    }
}

impl Discovery {
    /// The markdown instructions: how x402 payment works here, then each
    /// resource.
    pub fn instructions(&self) -> String {
        let mut md = format!(
            "# {}\n\n\
             Paid HTTP resources, paid per request with x402 v2 (scheme `exact`, USDC). \
             Call a resource without payment to get `402 Payment Required` with the \
             payment requirements in the base64 `PAYMENT-REQUIRED` header; sign an \
             EIP-3009 authorization for the amount asked (an x402 client does this), \
             retry with the `PAYMENT-SIGNATURE` header, and read the settlement from \
             `PAYMENT-RESPONSE`. Each authorization pays for one request. Accounts \
             with prepaid credits may instead send `X-API-Key` or an `X-Auth-*` \
             wallet signature.\n",
            self.service_name
        );
        for r in &self.resources {
            md.push_str(&format!("\n## `{} {}`\n\n{}\n", r.method, r.url, r.about));
        }
        md
    }

    /// The JSON document.
    pub fn document(&self) -> serde_json::Value {
        json!({
            "version": 1,
            "resources": self.resources.iter().map(|r| r.url.as_str()).collect::<Vec<_>>(),
            "ownershipProofs": self.ownership_proofs,
            "instructions": self.instructions(),
        })
    }
}

/// The route above, serving `doc`.
pub fn router(doc: Discovery) -> Router {
    let body = std::sync::Arc::new(doc.document());
    Router::new().route(
        PATH,
        get(move || {
            let body = body.clone();
            async move { Json(body.as_ref().clone()).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANVIL0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://Grid.Example.com/").unwrap(),
            "https://grid.example.com"
        );
        assert_eq!(
            origin("https://g.example:443/x?y").unwrap(),
            "https://g.example"
        );
        assert_eq!(
            origin("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(origin("ftp://x").is_err());
        assert!(origin("not a url").is_err());
    }

    #[test]
    fn proofs_recover_to_the_signer() {
        let k = WalletKey::from_hex(ANVIL0).unwrap();
        let o = "https://grid.example.com";
        let p = ownership_proof(&k, o);
        assert!(check_proof(&p, o, &k.address()).is_ok());
        assert!(check_proof(&p, "https://other.example", &k.address()).is_err());
        assert!(check_proof(&p, o, &Address::ZERO).is_err());
        assert!(check_proof("0x1234", o, &k.address()).is_err());
    }

    #[test]
    fn document_lists_the_resources() {
        let d = Discovery {
            origin: "https://g.example".into(),
            resources: vec![Resource {
                url: "https://g.example/api/x402/compute".into(),
                method: "POST",
                about: "Run code.".into(),
            }],
            ownership_proofs: vec!["0xab".into()],
            service_name: "sgl".into(),
        };
        let v = d.document();
        assert_eq!(v["version"], 1);
        assert_eq!(v["resources"][0], "https://g.example/api/x402/compute");
        assert_eq!(v["ownershipProofs"][0], "0xab");
        let md = v["instructions"].as_str().unwrap();
        assert!(md.starts_with("# sgl"));
        assert!(md.contains("## `POST https://g.example/api/x402/compute`"));
    }
}
