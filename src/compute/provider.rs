//! The provider seam: what the Machines API needs from a cloud (its
//! catalogue, and creating, reading, resizing and deleting one machine), one
//! [`Provider`] trait with a Vultr ([`super::vultr`]) and a DigitalOcean
//! ([`super::digitalocean`]) client behind it, and the HTTP plumbing both
//! share ([`Api`]): bearer auth, JSON bodies, the provider's error body, and
//! 429/503 answered by waiting (`Retry-After`, else exponential backoff).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::money::Micros;

/// A boxed, sendable future (the trait is used as `dyn Provider`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderKind {
    Vultr,
    DigitalOcean,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Vultr => "vultr",
            ProviderKind::DigitalOcean => "digitalocean",
        }
    }

    pub fn parse(s: &str) -> Option<ProviderKind> {
        match s {
            "vultr" => Some(ProviderKind::Vultr),
            "digitalocean" => Some(ProviderKind::DigitalOcean),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plan (Vultr) or size (DigitalOcean) at the provider's price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderPlan {
    /// The provider's own id (`vc2-1c-1gb`, `s-1vcpu-1gb`).
    pub id: String,
    pub vcpu_count: u64,
    /// MB.
    pub ram: u64,
    /// GB.
    pub disk: u64,
    /// GB of transfer a month.
    pub bandwidth: u64,
    pub monthly_cost: Micros,
    pub hourly_cost: Micros,
    /// The provider's plan family (`vc2`, `vhp`, `vdc`, `vcg`, or for
    /// DigitalOcean a family derived from the slug).
    pub family: String,
    pub gpu_vram_gb: Option<u64>,
    pub gpu_type: Option<String>,
    /// Region ids where it can be deployed.
    pub locations: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderRegion {
    pub id: String,
    pub city: String,
    pub country: String,
    pub continent: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderOs {
    pub id: u64,
    pub name: String,
    pub arch: String,
    pub family: String,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub plan: String,
    pub region: String,
    pub os_id: u64,
    pub label: String,
    pub ssh_public_key: Option<String>,
    /// The order's idempotency key, attached as a tag so that a restarted
    /// coordinator can find a machine whose creation it never heard back
    /// about ([`Provider::find_by_tag`]).
    pub tag: String,
}

/// A machine as the provider reports it.
#[derive(Clone, Debug)]
pub struct ProviderInstance {
    pub id: String,
    /// `pending`/`new` until it runs, then `active`.
    pub status: String,
    /// The public IPv4 address once assigned.
    pub ip: Option<String>,
    /// Vultr's initial root password (only in the create answer).
    pub default_password: Option<Zeroizing<String>>,
}

impl ProviderInstance {
    /// Running with an address.
    pub fn is_active(&self) -> bool {
        self.status == "active" && self.ip.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused (4xx/5xx) with its own message.
    #[error("{provider} answered {status}: {message}")]
    Api {
        provider: &'static str,
        status: u16,
        message: String,
    },
    #[error("{0}: still rate limited after retrying")]
    RateLimited(&'static str),
    #[error("{provider} unreachable: {detail}")]
    Transport {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} sent an unexpected body: {detail}")]
    Decode {
        provider: &'static str,
        detail: String,
    },
}

impl ProviderError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProviderError::Api { status: 404, .. })
    }

    /// A client error the provider attributes to the request (4xx other
    /// than 429): the order was refused, not lost.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ProviderError::Api { status, .. } if (400..500).contains(status))
    }
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// One cloud account.
pub trait Provider: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> ProviderKind;
    fn plans(&self) -> BoxFuture<'_, Result<Vec<ProviderPlan>>>;
    fn regions(&self) -> BoxFuture<'_, Result<Vec<ProviderRegion>>>;
    fn os_images(&self) -> BoxFuture<'_, Result<Vec<ProviderOs>>>;
    /// Create a machine; answers once the provider accepted it (usually
    /// still pending, without an address).
    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<ProviderInstance>>;
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ProviderInstance>>;
    /// The machine carrying `tag`, if one exists.
    fn find_by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Option<ProviderInstance>>>;
    /// Delete a machine; one already gone counts as deleted.
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Move a machine to `plan`; `grow_disk` also grows its disk
    /// (DigitalOcean; irreversible).
    fn resize<'a>(
        &'a self,
        id: &'a str,
        plan: &'a str,
        grow_disk: bool,
    ) -> BoxFuture<'a, Result<()>>;
}

/// How a client talks to a provider's API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The API root (`https://api.vultr.com/v2`).
    pub base_url: String,
    pub token: Zeroizing<String>,
    /// Retries of a 429 or 503 before giving up.
    pub max_retries: u32,
    /// The first backoff when the provider names no `Retry-After`; doubled
    /// each retry.
    pub backoff: Duration,
    pub timeout: Duration,
    /// Between two polls of an asynchronous provider action (a
    /// DigitalOcean power or resize action).
    pub action_poll: Duration,
    /// Polls before an action that never completed is given up.
    pub action_attempts: u32,
}

impl ApiConfig {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> ApiConfig {
        ApiConfig {
            base_url: base_url.into(),
            token: Zeroizing::new(token.into()),
            max_retries: 5,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(60),
            action_poll: Duration::from_secs(2),
            // Ten minutes: a resize that grows a disk copies it.
            action_attempts: 300,
        }
    }
}

/// The longest wait a `Retry-After` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The HTTP side of a provider client.
#[derive(Clone)]
pub struct Api {
    name: &'static str,
    http: reqwest::Client,
    cfg: ApiConfig,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("provider", &self.name)
            .field("base_url", &self.cfg.base_url)
            .finish()
    }
}

impl Api {
    pub fn new(name: &'static str, cfg: ApiConfig) -> Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .user_agent(concat!("sgl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Transport {
                provider: name,
                detail: e.to_string(),
            })?;
        Ok(Api { name, http, cfg })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn config(&self) -> &ApiConfig {
        &self.cfg
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.base_url.trim_end_matches('/'))
    }

    /// Send a request (path below the base URL, or an absolute URL the
    /// provider handed out, such as a next-page link), retrying 429 and
    /// 503; the JSON body of a success (`Null` for 204).
    pub async fn call(
        &self,
        method: Method,
        path_or_url: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            self.url(path_or_url)
        };
        let mut attempt = 0u32;
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.cfg.token.as_str())
                .header("accept", "application/json");
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| ProviderError::Transport {
                provider: self.name,
                detail: e.without_url().to_string(),
            })?;
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                if attempt >= self.cfg.max_retries {
                    return Err(if status == StatusCode::TOO_MANY_REQUESTS {
                        ProviderError::RateLimited(self.name)
                    } else {
                        api_error(self.name, status, &resp.text().await.unwrap_or_default())
                    });
                }
                let wait = retry_after(resp.headers()).unwrap_or_else(|| {
                    self.cfg
                        .backoff
                        .saturating_mul(2u32.saturating_pow(attempt))
                        .min(MAX_RETRY_AFTER)
                });
                tracing::debug!(provider = self.name, ?wait, %status, "provider asked to wait");
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            let text = resp.text().await.map_err(|e| ProviderError::Transport {
                provider: self.name,
                detail: e.without_url().to_string(),
            })?;
            if !status.is_success() {
                return Err(api_error(self.name, status, &text));
            }
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| ProviderError::Decode {
                provider: self.name,
                detail: e.to_string(),
            });
        }
    }

    /// Delete the resource at `path`; one already gone (404) counts as
    /// deleted, so a repeated destroy is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.call(Method::DELETE, path, &[], None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn decode_err(&self, detail: impl Into<String>) -> ProviderError {
        ProviderError::Decode {
            provider: self.name,
            detail: detail.into(),
        }
    }
}

/// The first of `items` whose `tags` list holds `tag`. Both providers
/// filter lists by tag themselves; the tag is checked again here, so a
/// filter the provider ignored cannot adopt someone else's machine.
pub fn tagged<'a>(items: &'a [Value], tag: &str) -> Option<&'a Value> {
    items.iter().find(|i| {
        i.get("tags")
            .and_then(Value::as_array)
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some(tag)))
    })
}

/// An id as one path segment (ids come from the provider, but a stored id
/// is never trusted to be path-safe).
pub fn enc(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `Retry-After` in seconds (the form both providers send), capped.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = h.get("retry-after")?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The provider's error body as a message: Vultr sends `{"error": "…",
/// "status": N}`, DigitalOcean `{"id": "…", "message": "…"}`.
fn api_error(name: &'static str, status: StatusCode, body: &str) -> ProviderError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let message = v
        .get("error")
        .and_then(Value::as_str)
        .or_else(|| v.get("message").and_then(Value::as_str))
        .map(|s| s.chars().take(300).collect::<String>())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    ProviderError::Api {
        provider: name,
        status: status.as_u16(),
        message,
    }
}

/// A provider's USD price (a JSON number such as `0.00744`) in micro-USD,
/// rounded up: read through the number's shortest decimal form, so no
/// float arithmetic touches the amount.
pub fn usd_number_to_micros(v: &Value) -> Option<Micros> {
    let s = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    decimal_usd_ceil(&s)
}

fn decimal_usd_ceil(s: &str) -> Option<Micros> {
    if s.contains(['e', 'E', '-', '+']) {
        // Prices are never negative; exponent forms come only from extreme
        // values, which no provider quotes.
        return None;
    }
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut micros = whole.checked_mul(1_000_000)?;
    let (head, tail) = frac.split_at(frac.len().min(6));
    let mut head_val: u64 = if head.is_empty() {
        0
    } else {
        head.parse().ok()?
    };
    for _ in head.len()..6 {
        head_val *= 10;
    }
    micros = micros.checked_add(head_val)?;
    if tail.bytes().any(|b| b != b'0') {
        micros = micros.checked_add(1)?;
    }
    Some(Micros(micros))
}

/// A JSON number or numeric string as u64 (sizes, counts).
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub fn as_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_prices_round_up_to_the_micro_dollar() {
        let m = |s: &str| decimal_usd_ceil(s);
        assert_eq!(m("0.00744"), Some(Micros(7_440)));
        assert_eq!(m("5"), Some(Micros(5_000_000)));
        assert_eq!(m("0.0714286"), Some(Micros(71_429)));
        assert_eq!(m("0.0714280"), Some(Micros(71_428)));
        assert_eq!(m("2.5"), Some(Micros(2_500_000)));
        assert_eq!(m("-1"), None);
        assert_eq!(m("1e-5"), None);
        assert_eq!(m("."), None);
        assert_eq!(
            usd_number_to_micros(&serde_json::json!(0.00893)),
            Some(Micros(8_930))
        );
    }
}
