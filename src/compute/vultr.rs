//! Vultr API v2 (`https://api.vultr.com/v2`): plans, regions, OS images,
//! SSH keys and instances.
//!
//! Lists are cursor-paged (`per_page`, `cursor`; the next cursor in
//! `meta.links.next`, empty on the last page). Errors are `{"error": "…",
//! "status": N}`. `POST /instances` answers 202 with the instance `pending`
//! at `main_ip` `0.0.0.0` and its `default_password`; `GET
//! /instances/{id}` reports `active` and the address once it runs.

use reqwest::Method;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::provider::{
    as_string, as_u64, enc, tagged, usd_number_to_micros, Api, ApiConfig, BoxFuture, CreateSpec,
    Provider, ProviderInstance, ProviderKind, ProviderOs, ProviderPlan, ProviderRegion, Result,
};

/// The public API root.
pub const DEFAULT_BASE_URL: &str = "https://api.vultr.com/v2";
/// The most pages a list is followed for (a guard against a cursor loop).
const MAX_PAGES: usize = 100;

#[derive(Debug, Clone)]
pub struct Vultr {
    api: Api,
}

impl Vultr {
    pub fn new(cfg: ApiConfig) -> Result<Vultr> {
        Ok(Vultr {
            api: Api::new("vultr", cfg)?,
        })
    }

    /// Every item of the list `key` at `path`, following cursors.
    async fn list(&self, path: &str, key: &str, extra: &[(&str, String)]) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        for _ in 0..MAX_PAGES {
            let mut q: Vec<(&str, String)> = vec![("per_page", "500".into())];
            q.extend_from_slice(extra);
            if !cursor.is_empty() {
                q.push(("cursor", cursor.clone()));
            }
            let page = self.api.call(Method::GET, path, &q, None).await?;
            let items = page
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| self.api.decode_err(format!("no {key} list")))?;
            out.extend(items.iter().cloned());
            cursor = page
                .pointer("/meta/links/next")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if cursor.is_empty() {
                return Ok(out);
            }
        }
        Err(self.api.decode_err("too many pages"))
    }

    fn instance(&self, v: &Value) -> Result<ProviderInstance> {
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| self.api.decode_err("instance without id"))?;
        let ip = v
            .get("main_ip")
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty() && *ip != "0.0.0.0")
            .map(str::to_owned);
        Ok(ProviderInstance {
            id: id.to_owned(),
            status: as_string(&v["status"]),
            ip,
            default_password: v
                .get("default_password")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .map(|p| Zeroizing::new(p.to_owned())),
        })
    }

    async fn ssh_key(&self, label: &str, public_key: &str) -> Result<String> {
        let body = json!({"name": label, "ssh_key": public_key});
        let v = self
            .api
            .call(Method::POST, "/ssh-keys", &[], Some(&body))
            .await?;
        v.pointer("/ssh_key/id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| self.api.decode_err("ssh key without id"))
    }
}

fn plan(v: &Value) -> Option<ProviderPlan> {
    Some(ProviderPlan {
        id: v.get("id")?.as_str()?.to_owned(),
        vcpu_count: as_u64(&v["vcpu_count"]).unwrap_or(0),
        ram: as_u64(&v["ram"]).unwrap_or(0),
        disk: as_u64(&v["disk"]).unwrap_or(0),
        bandwidth: as_u64(&v["bandwidth"]).unwrap_or(0),
        monthly_cost: usd_number_to_micros(&v["monthly_cost"])?,
        hourly_cost: usd_number_to_micros(&v["hourly_cost"])?,
        family: as_string(&v["type"]),
        gpu_vram_gb: as_u64(&v["gpu_vram_gb"]),
        gpu_type: v.get("gpu_type").and_then(Value::as_str).map(str::to_owned),
        locations: v
            .get("locations")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

impl Provider for Vultr {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vultr
    }

    fn plans(&self) -> BoxFuture<'_, Result<Vec<ProviderPlan>>> {
        Box::pin(async move {
            let items = self
                .list("/plans", "plans", &[("type", "all".into())])
                .await?;
            Ok(items.iter().filter_map(plan).collect())
        })
    }

    fn regions(&self) -> BoxFuture<'_, Result<Vec<ProviderRegion>>> {
        Box::pin(async move {
            let items = self.list("/regions", "regions", &[]).await?;
            Ok(items
                .iter()
                .filter_map(|r| {
                    Some(ProviderRegion {
                        id: r.get("id")?.as_str()?.to_owned(),
                        city: as_string(&r["city"]),
                        country: as_string(&r["country"]),
                        continent: as_string(&r["continent"]),
                    })
                })
                .collect())
        })
    }

    fn os_images(&self) -> BoxFuture<'_, Result<Vec<ProviderOs>>> {
        Box::pin(async move {
            let items = self.list("/os", "os", &[]).await?;
            Ok(items
                .iter()
                .filter_map(|o| {
                    Some(ProviderOs {
                        id: as_u64(&o["id"])?,
                        name: as_string(&o["name"]),
                        arch: as_string(&o["arch"]),
                        family: as_string(&o["family"]),
                    })
                })
                .collect())
        })
    }

    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<ProviderInstance>> {
        Box::pin(async move {
            let mut body = json!({
                "region": spec.region,
                "plan": spec.plan,
                "os_id": spec.os_id,
                "label": spec.label,
                "tags": [spec.tag],
            });
            if let Some(k) = &spec.ssh_public_key {
                let id = self.ssh_key(&spec.tag, k).await?;
                body["sshkey_id"] = json!([id]);
            }
            let v = self
                .api
                .call(Method::POST, "/instances", &[], Some(&body))
                .await?;
            self.instance(&v["instance"])
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ProviderInstance>> {
        Box::pin(async move {
            let v = self
                .api
                .call(Method::GET, &format!("/instances/{}", enc(id)), &[], None)
                .await?;
            self.instance(&v["instance"])
        })
    }

    fn find_by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Option<ProviderInstance>>> {
        Box::pin(async move {
            let items = self
                .list("/instances", "instances", &[("tag", tag.to_owned())])
                .await?;
            tagged(&items, tag).map(|i| self.instance(i)).transpose()
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.api.delete(&format!("/instances/{}", enc(id))).await })
    }

    fn resize<'a>(
        &'a self,
        id: &'a str,
        plan: &'a str,
        _grow_disk: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = json!({"plan": plan});
            self.api
                .call(
                    Method::PATCH,
                    &format!("/instances/{}", enc(id)),
                    &[],
                    Some(&body),
                )
                .await
                .map(|_| ())
        })
    }
}
