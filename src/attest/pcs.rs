//! A client for Intel's Provisioning Certification Service (PCS, or a PCCS
//! that speaks the same v4 API) that assembles the TDX collateral dcap-qvl
//! verifies with:
//!
//! - `GET {base}/sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der`,
//!   issuer chain in the `SGX-PCK-CRL-Issuer-Chain` header;
//! - `GET {base}/tdx/certification/v4/tcb?fmspc={hex}`: `{"tcbInfo": …, "signature": hex}`,
//!   issuer chain in `TCB-Info-Issuer-Chain`;
//! - `GET {base}/tdx/certification/v4/qe/identity`: `{"enclaveIdentity": …, "signature": hex}`,
//!   issuer chain in `SGX-Enclave-Identity-Issuer-Chain`;
//! - the root CA CRL from its own URL (Intel publishes it apart from the PCS).
//!
//! Base URLs are configuration. Answers are cached on disk by URL for a
//! configurable time; the collateral carries its own validity window, which
//! the verifier checks against its `now`, so a stale cache fails closed.

use std::path::PathBuf;
use std::time::Duration;

use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kds::{get_capped, http_client, store, Fetched};
use super::AttestError;

pub const DEFAULT_PCS_URL: &str = "https://api.trustedservices.intel.com";
pub const DEFAULT_ROOT_CRL_URL: &str =
    "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der";
/// The largest answer accepted (a PCK CRL is the biggest, some KiB).
const MAX_DOC: usize = 512 * 1024;
const SERVICE: &str = "Intel PCS";

#[derive(Debug, Clone)]
pub struct PcsClient {
    base: String,
    root_crl_url: String,
    cache_dir: Option<PathBuf>,
    cache_ttl: Duration,
    http: reqwest::Client,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    fetched_at: u64,
    header: Option<String>,
    body_hex: String,
}

impl PcsClient {
    pub fn new(base: &str, root_crl_url: &str, cache_dir: Option<PathBuf>) -> Self {
        PcsClient {
            base: base.trim_end_matches('/').to_string(),
            root_crl_url: root_crl_url.to_string(),
            cache_dir,
            cache_ttl: Duration::from_secs(3600),
            http: http_client(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn cache_path(&self, url: &str) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| {
            d.join("pcs").join(format!(
                "{}.json",
                hex::encode(Sha256::digest(url.as_bytes()))
            ))
        })
    }

    async fn get(
        &self,
        url: &str,
        header: Option<&str>,
    ) -> Result<(Vec<u8>, Option<String>, Fetched), AttestError> {
        let wall = crate::clock::Clock::system().now_secs();
        let cache = self.cache_path(url);
        if let Some(p) = &cache {
            if let Some(e) = std::fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
            {
                let fresh = wall >= e.fetched_at && wall - e.fetched_at < self.cache_ttl.as_secs();
                if let (true, Ok(body)) = (fresh, hex::decode(&e.body_hex)) {
                    return Ok((body, e.header, Fetched::Cache));
                }
            }
        }
        let (status, body, hv) = get_capped(&self.http, SERVICE, url, MAX_DOC, header).await?;
        if status != 200 {
            return Err(AttestError::Http {
                service: SERVICE,
                url: url.to_string(),
                detail: format!("status {status}"),
            });
        }
        if header.is_some() && hv.is_none() {
            return Err(AttestError::Http {
                service: SERVICE,
                url: url.to_string(),
                detail: format!("no {} header", header.unwrap_or_default()),
            });
        }
        if let Some(p) = &cache {
            let entry = CacheEntry {
                fetched_at: wall,
                header: hv.clone(),
                body_hex: hex::encode(&body),
            };
            store(
                p,
                serde_json::to_string(&entry).unwrap_or_default().as_bytes(),
            );
        }
        Ok((body, hv, Fetched::Network))
    }

    /// The collateral for a platform (`fmspc`, PCK CA `processor` or
    /// `platform`). Returns whether every document came from the cache.
    pub async fn collateral(
        &self,
        fmspc: &[u8; 6],
        ca: &str,
    ) -> Result<(QuoteCollateralV3, Fetched), AttestError> {
        let bad = |url: &str, detail: String| AttestError::Http {
            service: SERVICE,
            url: url.to_string(),
            detail,
        };
        let mut all_cached = true;

        let url = format!(
            "{}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
            self.base
        );
        let (pck_crl, chain, f) = self.get(&url, Some("SGX-PCK-CRL-Issuer-Chain")).await?;
        all_cached &= f == Fetched::Cache;
        let pck_crl = der_or_hex(pck_crl);
        let pck_crl_issuer_chain = percent_decode(&chain.unwrap_or_default())
            .ok_or_else(|| bad(&url, "bad issuer chain header".into()))?;

        let url = format!(
            "{}/tdx/certification/v4/tcb?fmspc={}",
            self.base,
            hex::encode(fmspc)
        );
        let (body, chain, f) = self.get(&url, Some("TCB-Info-Issuer-Chain")).await?;
        all_cached &= f == Fetched::Cache;
        let (tcb_info, tcb_sig) = split_signed(&body, "tcbInfo").map_err(|e| bad(&url, e))?;
        let tcb_info_issuer_chain = percent_decode(&chain.unwrap_or_default())
            .ok_or_else(|| bad(&url, "bad issuer chain header".into()))?;

        let url = format!("{}/tdx/certification/v4/qe/identity", self.base);
        let (body, chain, f) = self
            .get(&url, Some("SGX-Enclave-Identity-Issuer-Chain"))
            .await?;
        all_cached &= f == Fetched::Cache;
        let (qe_identity, qe_sig) =
            split_signed(&body, "enclaveIdentity").map_err(|e| bad(&url, e))?;
        let qe_identity_issuer_chain = percent_decode(&chain.unwrap_or_default())
            .ok_or_else(|| bad(&url, "bad issuer chain header".into()))?;

        let (root_crl, _, f) = self.get(&self.root_crl_url.clone(), None).await?;
        all_cached &= f == Fetched::Cache;

        Ok((
            QuoteCollateralV3 {
                pck_crl_issuer_chain,
                root_ca_crl: der_or_hex(root_crl),
                pck_crl,
                tcb_info_issuer_chain,
                tcb_info,
                tcb_info_signature: tcb_sig,
                qe_identity_issuer_chain,
                qe_identity,
                qe_identity_signature: qe_sig,
                pck_certificate_chain: None,
            },
            if all_cached {
                Fetched::Cache
            } else {
                Fetched::Network
            },
        ))
    }
}

/// Some PCCS versions answer CRLs as hex text; Intel's PCS as DER.
fn der_or_hex(body: Vec<u8>) -> Vec<u8> {
    if body.first() == Some(&0x30) {
        return body;
    }
    let text = String::from_utf8_lossy(&body);
    hex::decode(text.trim()).unwrap_or(body)
}

/// Decode `%XX` escapes (the issuer chain headers are URL-encoded PEM).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Split `{"<key>": {…}, "signature": "<hex>"}` into the exact text of the
/// signed object (the signature covers those bytes, so it must not be
/// re-serialized) and the decoded signature.
pub fn split_signed(body: &[u8], key: &str) -> Result<(String, Vec<u8>), String> {
    let text = std::str::from_utf8(body).map_err(|_| "answer is not UTF-8".to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("answer is not JSON: {e}"))?;
    let sig_hex = v
        .get("signature")
        .and_then(|s| s.as_str())
        .ok_or("answer has no signature")?;
    let sig = hex::decode(sig_hex).map_err(|_| "signature is not hex".to_string())?;
    let needle = format!("\"{key}\"");
    let start_key = text.find(&needle).ok_or(format!("answer has no {key}"))?;
    let after = &text[start_key + needle.len()..];
    let colon = after.find(':').ok_or("malformed answer")?;
    let rest = after[colon + 1..].trim_start();
    let end = object_end(rest).ok_or(format!("{key} is not a complete object"))?;
    let raw = &rest[..end];
    // The raw text must be the same JSON value the parser saw.
    let reparsed: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("{key}: {e}"))?;
    if Some(&reparsed) != v.get(key) {
        return Err(format!("{key} could not be isolated"));
    }
    Ok((raw.to_string(), sig))
}

/// The length of the JSON object at the start of `s`, respecting strings.
fn object_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_signed_keeps_exact_bytes() {
        let body = br#"{"tcbInfo":{"id":"TDX","s":"a}\"{","n":[1,2]},"signature":"0a0b"}"#;
        let (raw, sig) = split_signed(body, "tcbInfo").unwrap();
        assert_eq!(raw, r#"{"id":"TDX","s":"a}\"{","n":[1,2]}"#);
        assert_eq!(sig, vec![10, 11]);
        assert!(split_signed(br#"{"tcbInfo":{}}"#, "tcbInfo").is_err());
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("a%20b%0A").unwrap(), "a b\n");
        assert!(percent_decode("%g0").is_none());
    }
}
