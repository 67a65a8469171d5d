//! DigitalOcean API v2 (`https://api.digitalocean.com/v2`): sizes,
//! regions, distribution images, account SSH keys, droplets and droplet
//! actions.
//!
//! Lists are page-numbered (`page`, `per_page`; `links.pages.next` is the
//! URL of the next page, absent on the last). Errors are `{"id": "…",
//! "message": "…"}`. `POST /droplets` answers 202 with the droplet `new`
//! and no networks; `GET /droplets/{id}` reports `active` and the public
//! IPv4 in `networks.v4`. A resize is a droplet action (`{"type":
//! "resize", "size": …, "disk": bool}`) on a powered-off droplet, so it is
//! run as `power_off`, `resize`, `power_on`, each polled until `completed`
//! (`GET /droplets/{id}/actions/{action_id}`); growing the disk is
//! irreversible.
//! The API exposes no root password: DigitalOcean machines need an SSH key.

use reqwest::Method;
use serde_json::{json, Value};

use super::provider::{
    as_string, as_u64, enc, tagged, usd_number_to_micros, Api, ApiConfig, BoxFuture, CreateSpec,
    Provider, ProviderError, ProviderInstance, ProviderKind, ProviderOs, ProviderPlan,
    ProviderRegion, Result,
};

pub const DEFAULT_BASE_URL: &str = "https://api.digitalocean.com/v2";
const MAX_PAGES: usize = 100;

#[derive(Debug, Clone)]
pub struct DigitalOcean {
    api: Api,
}

/// The plan family of a size slug: GPU, dedicated CPU, premium
/// (`-intel`/`-amd`) or basic shared CPU.
pub fn family_of(slug: &str) -> &'static str {
    if slug.starts_with("gpu-") {
        "vcg"
    } else if [
        "c-", "c2-", "g-", "gd-", "m-", "m3-", "m6-", "so-", "so1_5-",
    ]
    .iter()
    .any(|p| slug.starts_with(p))
    {
        "vdc"
    } else if slug.ends_with("-intel") || slug.ends_with("-amd") {
        "vhp"
    } else {
        "vps"
    }
}

impl DigitalOcean {
    pub fn new(cfg: ApiConfig) -> Result<DigitalOcean> {
        Ok(DigitalOcean {
            api: Api::new("digitalocean", cfg)?,
        })
    }

    async fn list(&self, path: &str, key: &str, extra: &[(&str, String)]) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut q: Vec<(&str, String)> = vec![("per_page", "200".into()), ("page", "1".into())];
        q.extend_from_slice(extra);
        let mut next: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = match &next {
                // The next-page link carries its own query.
                Some(url) => self.api.call(Method::GET, url, &[], None).await?,
                None => self.api.call(Method::GET, path, &q, None).await?,
            };
            let items = page
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| self.api.decode_err(format!("no {key} list")))?;
            out.extend(items.iter().cloned());
            next = page
                .pointer("/links/pages/next")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            match &next {
                None => return Ok(out),
                // Only follow links into the configured API, so a bad link
                // cannot send the token elsewhere.
                Some(url) if !url.starts_with(&self.api.url("/")) => {
                    return Err(self.api.decode_err("next-page link outside the API"))
                }
                Some(_) => {}
            }
        }
        Err(self.api.decode_err("too many pages"))
    }

    /// Start a droplet action and wait until DigitalOcean reports it
    /// `completed` (polling `GET /droplets/{id}/actions/{action_id}`); an
    /// `errored` action, or one still running after the configured polls,
    /// is an error.
    async fn act(&self, id: &str, body: &Value) -> Result<()> {
        let kind = as_string(&body["type"]);
        let path = format!("/droplets/{}/actions", enc(id));
        let mut action = self.api.call(Method::POST, &path, &[], Some(body)).await?;
        let action_id = as_u64(&action["action"]["id"])
            .ok_or_else(|| self.api.decode_err("action without id"))?;
        let cfg = self.api.config();
        for attempt in 0..cfg.action_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(cfg.action_poll).await;
                action = self
                    .api
                    .call(Method::GET, &format!("{path}/{action_id}"), &[], None)
                    .await?;
            }
            match action["action"]["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("errored") => {
                    return Err(ProviderError::Api {
                        provider: self.api.name(),
                        status: 500,
                        message: format!("the {kind} action errored"),
                    })
                }
                _ => {}
            }
        }
        Err(ProviderError::Api {
            provider: self.api.name(),
            status: 504,
            message: format!("the {kind} action did not complete in time"),
        })
    }

    fn droplet(&self, v: &Value) -> Result<ProviderInstance> {
        let id = as_u64(&v["id"]).ok_or_else(|| self.api.decode_err("droplet without id"))?;
        let ip = v
            .pointer("/networks/v4")
            .and_then(Value::as_array)
            .and_then(|nets| {
                nets.iter()
                    .find(|n| n.get("type").and_then(Value::as_str) == Some("public"))
            })
            .and_then(|n| n.get("ip_address"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(ProviderInstance {
            id: id.to_string(),
            status: as_string(&v["status"]),
            ip,
            default_password: None,
        })
    }

    async fn ssh_key(&self, name: &str, public_key: &str) -> Result<u64> {
        let body = json!({"name": name, "public_key": public_key});
        let v = self
            .api
            .call(Method::POST, "/account/keys", &[], Some(&body))
            .await?;
        v.pointer("/ssh_key/id")
            .and_then(as_u64)
            .ok_or_else(|| self.api.decode_err("ssh key without id"))
    }
}

fn size(v: &Value) -> Option<ProviderPlan> {
    if v.get("available").and_then(Value::as_bool) == Some(false) {
        return None;
    }
    let slug = v.get("slug")?.as_str()?.to_owned();
    let gpu = v.get("gpu_info");
    Some(ProviderPlan {
        vcpu_count: as_u64(&v["vcpus"]).unwrap_or(0),
        ram: as_u64(&v["memory"]).unwrap_or(0),
        disk: as_u64(&v["disk"]).unwrap_or(0),
        // `transfer` is TB a month.
        bandwidth: as_u64(&v["transfer"]).unwrap_or(0).saturating_mul(1024),
        monthly_cost: usd_number_to_micros(&v["price_monthly"])?,
        hourly_cost: usd_number_to_micros(&v["price_hourly"])?,
        family: family_of(&slug).to_owned(),
        gpu_vram_gb: gpu.and_then(|g| g.pointer("/vram/amount")).and_then(as_u64),
        gpu_type: gpu
            .and_then(|g| g.get("model"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        locations: v
            .get("regions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        id: slug,
    })
}

impl Provider for DigitalOcean {
    fn kind(&self) -> ProviderKind {
        ProviderKind::DigitalOcean
    }

    fn plans(&self) -> BoxFuture<'_, Result<Vec<ProviderPlan>>> {
        Box::pin(async move {
            let items = self.list("/sizes", "sizes", &[]).await?;
            Ok(items.iter().filter_map(size).collect())
        })
    }

    fn regions(&self) -> BoxFuture<'_, Result<Vec<ProviderRegion>>> {
        Box::pin(async move {
            let items = self.list("/regions", "regions", &[]).await?;
            Ok(items
                .iter()
                .filter(|r| r.get("available").and_then(Value::as_bool) != Some(false))
                .filter_map(|r| {
                    let name = as_string(&r["name"]);
                    // "New York 3" → city "New York".
                    let city = name
                        .trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ')
                        .to_owned();
                    Some(ProviderRegion {
                        id: r.get("slug")?.as_str()?.to_owned(),
                        city: if city.is_empty() { name } else { city },
                        country: String::new(),
                        continent: String::new(),
                    })
                })
                .collect())
        })
    }

    fn os_images(&self) -> BoxFuture<'_, Result<Vec<ProviderOs>>> {
        Box::pin(async move {
            let items = self
                .list("/images", "images", &[("type", "distribution".into())])
                .await?;
            Ok(items
                .iter()
                .filter_map(|i| {
                    let dist = as_string(&i["distribution"]);
                    Some(ProviderOs {
                        id: as_u64(&i["id"])?,
                        name: format!("{dist} {}", as_string(&i["name"])),
                        arch: "x64".into(),
                        family: dist.to_ascii_lowercase(),
                    })
                })
                .collect())
        })
    }

    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<ProviderInstance>> {
        Box::pin(async move {
            // Droplet names must be hostnames; the label stays ours.
            let name = format!("sgl-{}", spec.tag.trim_start_matches("sgl-order-"));
            let name: String = name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(63)
                .collect();
            let mut body = json!({
                "name": name,
                "region": spec.region,
                "size": spec.plan,
                "image": spec.os_id,
                "tags": [spec.tag],
            });
            if let Some(k) = &spec.ssh_public_key {
                let id = self.ssh_key(&spec.tag, k).await?;
                body["ssh_keys"] = json!([id]);
            }
            let v = self
                .api
                .call(Method::POST, "/droplets", &[], Some(&body))
                .await?;
            self.droplet(&v["droplet"])
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ProviderInstance>> {
        Box::pin(async move {
            let v = self
                .api
                .call(Method::GET, &format!("/droplets/{}", enc(id)), &[], None)
                .await?;
            self.droplet(&v["droplet"])
        })
    }

    fn find_by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Option<ProviderInstance>>> {
        Box::pin(async move {
            let items = self
                .list("/droplets", "droplets", &[("tag_name", tag.to_owned())])
                .await?;
            tagged(&items, tag).map(|d| self.droplet(d)).transpose()
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.api.delete(&format!("/droplets/{}", enc(id))).await })
    }

    fn resize<'a>(
        &'a self,
        id: &'a str,
        plan: &'a str,
        grow_disk: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // DigitalOcean resizes only a powered-off droplet (a running
            // one is refused with 422): power off, resize, power on, each
            // action awaited until it completed.
            let droplet = self.get(id).await?;
            if droplet.status != "off" {
                self.act(id, &json!({"type": "power_off"})).await?;
            }
            let resized = self
                .act(
                    id,
                    &json!({"type": "resize", "size": plan, "disk": grow_disk}),
                )
                .await;
            // Power on again whatever the resize answered, so a refused
            // resize does not leave the machine off.
            let powered = self.act(id, &json!({"type": "power_on"})).await;
            resized.and(powered)
        })
    }
}
