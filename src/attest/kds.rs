//! A client for AMD's Key Distribution Service (KDS): the VCEK of a chip at a
//! TCB, `GET {base}/vcek/v1/{product}/{hwid}?blSPL=…&teeSPL=…&snpSPL=…&ucodeSPL=…`
//! (Turin adds `fmcSPL` and uses an 8-byte hwid). The base URL is
//! configuration; answers are cached on disk by product, chip id and TCB,
//! which never change what they name. The AMD roots are never fetched.

use std::path::PathBuf;
use std::time::Duration;

use super::snp::Tcb;
use super::AttestError;

pub const DEFAULT_KDS_URL: &str = "https://kdsintf.amd.com";
/// The largest VCEK accepted from the service.
const MAX_VCEK: usize = super::evidence::MAX_CERT;

/// Where a fetched document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    Network,
    Cache,
}

#[derive(Debug, Clone)]
pub struct KdsClient {
    base: String,
    cache_dir: Option<PathBuf>,
    http: reqwest::Client,
}

impl KdsClient {
    /// `base` without a trailing slash, e.g. [`DEFAULT_KDS_URL`];
    /// `cache_dir` holds fetched VCEKs.
    pub fn new(base: &str, cache_dir: Option<PathBuf>) -> Self {
        KdsClient {
            base: base.trim_end_matches('/').to_string(),
            cache_dir,
            http: http_client(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The VCEK URL for a chip and TCB.
    pub fn vcek_url(&self, product: &str, chip_id: &[u8; 64], tcb: &Tcb) -> String {
        let turin = product == "Turin";
        let hwid = if turin {
            hex::encode(&chip_id[..8])
        } else {
            hex::encode(chip_id)
        };
        let mut url = format!(
            "{}/vcek/v1/{product}/{hwid}?blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
            self.base, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
        );
        if let (true, Some(fmc)) = (turin, tcb.fmc) {
            url.push_str(&format!("&fmcSPL={fmc}"));
        }
        url
    }

    fn cache_path(&self, product: &str, chip_id: &[u8; 64], tcb: &Tcb) -> Option<PathBuf> {
        let tcb_key = format!(
            "{}-{}-{}-{}-{}",
            tcb.fmc.map_or("x".into(), |f| f.to_string()),
            tcb.bootloader,
            tcb.tee,
            tcb.snp,
            tcb.microcode
        );
        self.cache_dir.as_ref().map(|d| {
            d.join("kds").join(format!(
                "vcek-{product}-{}-{tcb_key}.der",
                hex::encode(chip_id)
            ))
        })
    }

    /// The VCEK for `chip_id` at `tcb`: from the cache, else from KDS (and
    /// then cached). `Ok(None)` when KDS has none for this product (404), so
    /// the caller can try the next product.
    pub async fn vcek(
        &self,
        product: &str,
        chip_id: &[u8; 64],
        tcb: &Tcb,
    ) -> Result<Option<(Vec<u8>, Fetched)>, AttestError> {
        let cache = self.cache_path(product, chip_id, tcb);
        if let Some(p) = &cache {
            if let Ok(bytes) = std::fs::read(p) {
                if !bytes.is_empty() && bytes.len() <= MAX_VCEK {
                    return Ok(Some((bytes, Fetched::Cache)));
                }
            }
        }
        let url = self.vcek_url(product, chip_id, tcb);
        let (status, body, _) = get_capped(&self.http, "AMD KDS", &url, MAX_VCEK, None).await?;
        if status == 404 {
            return Ok(None);
        }
        if status != 200 {
            return Err(AttestError::Http {
                service: "AMD KDS",
                url,
                detail: format!("status {status}"),
            });
        }
        if let Some(p) = &cache {
            store(p, &body);
        }
        Ok(Some((body, Fetched::Network)))
    }
}

/// Write a cache file; a cache that cannot be written only costs a refetch.
pub(crate) fn store(path: &std::path::Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// GET `url`, reading at most `cap` bytes of body; returns the status, the
/// body and the value of `header` if asked for.
pub(crate) async fn get_capped(
    http: &reqwest::Client,
    service: &'static str,
    url: &str,
    cap: usize,
    header: Option<&str>,
) -> Result<(u16, Vec<u8>, Option<String>), AttestError> {
    let err = |detail: String| AttestError::Http {
        service,
        url: url.to_string(),
        detail,
    };
    let mut resp = http.get(url).send().await.map_err(|e| err(e.to_string()))?;
    let status = resp.status().as_u16();
    let hv = header.and_then(|h| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Err(err(format!("answer is larger than {cap} bytes")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| err(e.to_string()))? {
        if body.len() + chunk.len() > cap {
            return Err(err(format!("answer is larger than {cap} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body, hv))
}
