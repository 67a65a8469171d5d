//! The merged catalogue: every configured provider's plans, regions and OS
//! images at our prices, cached. A provider's part is refetched when older
//! than the refresh interval; when the refetch fails, the last good copy is
//! served (a provider outage does not empty the catalogue).
//!
//! Prices: the provider's hourly (and monthly) cost plus the platform
//! markup, in basis points, rounded up to the micro-dollar. What an order
//! costs is `hourly × hours`; `our_daily` is `hourly × 24`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, RwLock};

use super::provider::{Provider, ProviderKind, ProviderOs, ProviderPlan, ProviderRegion};
use crate::clock::Clock;
use crate::money::Micros;

/// The public plan id prefix of DigitalOcean sizes.
pub const DO_PREFIX: &str = "do:";

/// A plan as offered here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Public id: Vultr's own, DigitalOcean's prefixed `do:`.
    pub id: String,
    pub provider: ProviderKind,
    pub spec: ProviderPlan,
    /// Our hourly price (markup included).
    pub hourly: Micros,
    /// Our monthly price (markup included).
    pub monthly: Micros,
}

impl Plan {
    /// `vps`, `vhp`, `vdc` or `vcg` (the `?type=` filter).
    pub fn category(&self) -> &'static str {
        let f = self.spec.family.as_str();
        match f {
            "vcg" => "vcg",
            "vdc" | "voc" => "vdc",
            "vhp" | "vhf" => "vhp",
            _ if self.spec.gpu_type.is_some() => "vcg",
            _ => "vps",
        }
    }

    /// What the seed's `type` shows.
    pub fn type_label(&self) -> &'static str {
        match self.category() {
            "vcg" => "GPU",
            "vdc" => "VDC",
            "vhp" => "VHP",
            _ => "VPS",
        }
    }

    pub fn daily(&self) -> Micros {
        Micros(self.hourly.0.saturating_mul(24))
    }
}

#[derive(Clone, Debug)]
pub struct Region {
    pub provider: ProviderKind,
    pub region: ProviderRegion,
}

#[derive(Clone, Debug)]
pub struct OsImage {
    pub provider: ProviderKind,
    pub os: ProviderOs,
}

#[derive(Clone, Debug, Default)]
struct Part {
    plans: Vec<ProviderPlan>,
    regions: Vec<ProviderRegion>,
    os: Vec<ProviderOs>,
    fetched_at_ms: i64,
}

/// A snapshot of the merged catalogue.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub plans: Vec<Plan>,
    pub regions: Vec<Region>,
    pub os: Vec<OsImage>,
}

impl Snapshot {
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    pub fn has_region(&self, provider: ProviderKind, id: &str) -> bool {
        self.regions
            .iter()
            .any(|r| r.provider == provider && r.region.id == id)
    }

    pub fn has_os(&self, provider: ProviderKind, id: u64) -> bool {
        self.os
            .iter()
            .any(|o| o.provider == provider && o.os.id == id)
    }
}

/// The cache.
#[derive(Debug)]
pub struct Catalogue {
    providers: Vec<Arc<dyn Provider>>,
    markup_bps: u64,
    refresh: Duration,
    clock: Clock,
    parts: RwLock<BTreeMap<ProviderKind, Part>>,
    /// One refresh at a time.
    refreshing: Mutex<()>,
}

/// `amount × (10000 + bps) / 10000`, rounded up.
pub fn with_markup(amount: Micros, bps: u64) -> Micros {
    let v = u128::from(amount.0) * u128::from(10_000 + bps);
    Micros(u64::try_from(v.div_ceil(10_000)).unwrap_or(u64::MAX))
}

impl Catalogue {
    pub fn new(
        providers: Vec<Arc<dyn Provider>>,
        markup_bps: u64,
        refresh: Duration,
        clock: Clock,
    ) -> Catalogue {
        Catalogue {
            providers,
            markup_bps,
            refresh,
            clock,
            parts: RwLock::new(BTreeMap::new()),
            refreshing: Mutex::new(()),
        }
    }

    /// Refetch every provider part that is missing or older than the
    /// refresh interval. A failed provider keeps its last good part.
    pub async fn refresh_stale(&self) {
        let _one = self.refreshing.lock().await;
        let now = self.clock.now_ms();
        let refresh_ms = i64::try_from(self.refresh.as_millis()).unwrap_or(i64::MAX);
        for p in &self.providers {
            let stale = match self.parts.read().await.get(&p.kind()) {
                Some(part) => now.saturating_sub(part.fetched_at_ms) >= refresh_ms,
                None => true,
            };
            if !stale {
                continue;
            }
            match fetch(p.as_ref()).await {
                Ok((plans, regions, os)) => {
                    self.parts.write().await.insert(
                        p.kind(),
                        Part {
                            plans,
                            regions,
                            os,
                            fetched_at_ms: now,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(provider = %p.kind(), error = %e,
                        "catalogue refresh failed; serving the cached copy");
                }
            }
        }
    }

    /// The merged catalogue, refreshed first where stale.
    pub async fn snapshot(&self) -> Snapshot {
        self.refresh_stale().await;
        let parts = self.parts.read().await;
        let mut s = Snapshot::default();
        for (kind, part) in parts.iter() {
            for p in &part.plans {
                let id = match kind {
                    ProviderKind::Vultr => p.id.clone(),
                    ProviderKind::DigitalOcean => format!("{DO_PREFIX}{}", p.id),
                };
                s.plans.push(Plan {
                    id,
                    provider: *kind,
                    hourly: with_markup(p.hourly_cost, self.markup_bps),
                    monthly: with_markup(p.monthly_cost, self.markup_bps),
                    spec: p.clone(),
                });
            }
            s.regions.extend(part.regions.iter().map(|r| Region {
                provider: *kind,
                region: r.clone(),
            }));
            s.os.extend(part.os.iter().map(|o| OsImage {
                provider: *kind,
                os: o.clone(),
            }));
        }
        s
    }

    /// Whether any provider part was ever fetched.
    pub async fn is_empty(&self) -> bool {
        self.parts.read().await.is_empty()
    }
}

type Fetched = (Vec<ProviderPlan>, Vec<ProviderRegion>, Vec<ProviderOs>);

async fn fetch(p: &dyn Provider) -> super::provider::Result<Fetched> {
    let plans = p.plans().await?;
    let regions = p.regions().await?;
    let os = p.os_images().await?;
    Ok((plans, regions, os))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_rounds_up_and_zero_bps_is_identity() {
        assert_eq!(with_markup(Micros(7_440), 0), Micros(7_440));
        assert_eq!(with_markup(Micros(7_440), 2_000), Micros(8_928));
        assert_eq!(with_markup(Micros(1), 1), Micros(2));
        assert_eq!(with_markup(Micros(10_000), 2_500), Micros(12_500));
    }
}
