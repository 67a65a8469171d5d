//! [`Machines`]: the lifecycle of a rented machine.
//!
//! An order is written to the store (`creating`, with the price held from
//! credits when credits pay) before the provider is called; the order id is
//! the idempotency key and travels to the provider as a tag. The provider's
//! acceptance moves it to `provisioning`; polling until the machine runs
//! with an address moves it to `active` (and charges the credit hold in
//! the same transaction). A failure after the provider accepted destroys
//! the machine and returns the money (hold released, or a settled payment
//! refunded to credits) in the transaction that marks the order `failed`.
//!
//! [`Machines::reconcile`] runs at startup for orders a stopped coordinator
//! left in flight: the provider is asked for the machine by tag, so an
//! order ends in exactly one state and no machine is left unpaid or
//! unowned. [`Machines::reap_once`] destroys machines whose prepaid time
//! ended more than the grace period ago.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::catalogue::Catalogue;
use super::provider::{Provider, ProviderError, ProviderInstance, ProviderKind};
use super::seal::Sealer;
use crate::clock::Clock;
use crate::payments::Payments;
use crate::store::{ComputeOrder, Store};

/// Settings of the Machines API.
#[derive(Clone, Debug)]
pub struct MachinesConfig {
    /// Platform markup on provider prices, in basis points (2000 = 20 %).
    pub markup_bps: u64,
    /// How long a fetched catalogue is served before it is refetched.
    pub catalogue_refresh: Duration,
    /// How long after its prepaid time an instance is destroyed.
    pub grace: Duration,
    /// How often the reaper looks for expired instances.
    pub reap_interval: Duration,
    /// Between two status polls of a machine being created.
    pub poll_interval: Duration,
    /// Polls before a machine that never became active is given up.
    pub poll_attempts: u32,
    /// Bounds of `prepaid_hours` and `extend_hours`.
    pub min_hours: u64,
    pub max_hours: u64,
    /// Seals root passwords at rest.
    pub sealer: Sealer,
}

impl MachinesConfig {
    pub fn new(sealer: Sealer) -> MachinesConfig {
        MachinesConfig {
            markup_bps: 2_000,
            catalogue_refresh: Duration::from_secs(600),
            grace: Duration::from_secs(3_600),
            reap_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(5),
            poll_attempts: 120,
            min_hours: 24,
            // Five years.
            max_hours: 43_800,
            sealer,
        }
    }
}

struct Inner {
    cfg: MachinesConfig,
    payments: Payments,
    providers: BTreeMap<ProviderKind, Arc<dyn Provider>>,
    catalogue: Catalogue,
}

/// The Machines service. Cheap to clone.
#[derive(Clone)]
pub struct Machines {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Machines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machines")
            .field(
                "providers",
                &self.inner.providers.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The actor name audit rows carry for the service's own work.
pub const SYSTEM: &str = "system";

impl Machines {
    /// Over `payments` (and its store and clock) and at least one provider.
    pub fn new(
        cfg: MachinesConfig,
        payments: Payments,
        providers: Vec<Arc<dyn Provider>>,
    ) -> Machines {
        let clock = payments.clock().clone();
        let catalogue = Catalogue::new(
            providers.clone(),
            cfg.markup_bps,
            cfg.catalogue_refresh,
            clock,
        );
        Machines {
            inner: Arc::new(Inner {
                providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
                cfg,
                payments,
                catalogue,
            }),
        }
    }

    pub fn config(&self) -> &MachinesConfig {
        &self.inner.cfg
    }

    pub fn payments(&self) -> &Payments {
        &self.inner.payments
    }

    pub fn store(&self) -> &Store {
        self.inner.payments.store()
    }

    pub fn clock(&self) -> &Clock {
        self.inner.payments.clock()
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.inner.catalogue
    }

    pub fn provider(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        self.inner.providers.get(&kind)
    }

    fn provider_of(&self, o: &ComputeOrder) -> Option<&Arc<dyn Provider>> {
        ProviderKind::parse(&o.provider).and_then(|k| self.provider(k))
    }

    /// The provider tag of an order (its idempotency key).
    pub fn tag(order_id: &str) -> String {
        format!("sgl-order-{order_id}")
    }

    /// Poll a machine until it runs with an address.
    pub async fn wait_active(
        &self,
        provider: &dyn Provider,
        id: &str,
    ) -> Result<ProviderInstance, ProviderError> {
        let mut last_err = None;
        for attempt in 0..self.inner.cfg.poll_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.inner.cfg.poll_interval).await;
            }
            match provider.get(id).await {
                Ok(i) if i.is_active() => return Ok(i),
                Ok(i) if i.status == "error" || i.status == "archive" => {
                    return Err(ProviderError::Api {
                        provider: provider.kind().as_str(),
                        status: 500,
                        message: format!("machine entered state {}", i.status),
                    })
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "polling a machine being created");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(ProviderError::Api {
            provider: provider.kind().as_str(),
            status: 504,
            message: "the machine did not become active in time".into(),
        }))
    }

    /// Bring an order the provider accepted to `active`, or destroy the
    /// machine and fail the order (returning its money; a settled payment
    /// is refunded to credits when `payment_settled`). The order as stored
    /// afterwards.
    pub async fn finish_provisioning(
        &self,
        order_id: &str,
        provider: &dyn Provider,
        machine_id: &str,
        payment_settled: bool,
    ) -> Result<ComputeOrder, FinishError> {
        match self.wait_active(provider, machine_id).await {
            Ok(inst) => {
                let ip = inst.ip.unwrap_or_default();
                self.store()
                    .compute_activate(order_id, &ip, SYSTEM)
                    .await
                    .map_err(|e| FinishError::Store(e.to_string()))?;
            }
            Err(e) => {
                if let Err(de) = provider.delete(machine_id).await {
                    // The order still fails and is refunded; the machine is
                    // named in the log and the audit for an operator.
                    tracing::error!(error = %de, machine = machine_id,
                        "could not destroy a machine that never became active");
                    let _ = self
                        .store()
                        .compute_note(
                            order_id,
                            "orphan",
                            SYSTEM,
                            &format!("destroying machine {machine_id} failed: {de}"),
                        )
                        .await;
                }
                let refunded = self
                    .store()
                    .compute_fail(
                        order_id,
                        payment_settled,
                        SYSTEM,
                        &format!("the machine never became active: {e}"),
                    )
                    .await
                    .map_err(|e| FinishError::Store(e.to_string()))?;
                return Err(FinishError::Provider {
                    error: e,
                    refunded: refunded.unwrap_or_default(),
                });
            }
        }
        self.store()
            .compute_order(order_id)
            .await
            .map_err(|e| FinishError::Store(e.to_string()))?
            .ok_or_else(|| FinishError::Store("order vanished".into()))
    }

    /// Settle every order a previous run left in flight (`creating` or
    /// `provisioning`). Run before serving. Returns how many were settled.
    pub async fn reconcile(&self) -> usize {
        let orders = match self.store().compute_in_flight().await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "reconciliation: cannot read orders");
                return 0;
            }
        };
        let mut done = 0;
        for o in orders {
            match self.reconcile_one(&o).await {
                Ok(()) => done += 1,
                Err(e) => {
                    tracing::warn!(order = %o.id, error = %e, "reconciliation deferred")
                }
            }
        }
        done
    }

    async fn reconcile_one(&self, o: &ComputeOrder) -> Result<(), String> {
        let Some(provider) = self.provider_of(o) else {
            return Err(format!("provider {} is not configured", o.provider));
        };
        let provider = provider.as_ref();
        let credits = o.funding == "credits";
        let machine_id = match (&o.state[..], &o.provider_instance_id) {
            ("provisioning", Some(id)) => id.clone(),
            _ => {
                // Never heard back: ask the provider for the tag.
                let found = provider
                    .find_by_tag(&Self::tag(&o.id))
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(inst) = found else {
                    self.store()
                        .compute_fail(
                            &o.id,
                            false,
                            SYSTEM,
                            "reconciled after a restart: the provider has no such machine; nothing charged",
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(());
                };
                if !credits {
                    // The per-request payment was never settled (its
                    // authorization lived only in the stopped process), so
                    // the machine cannot be paid for: destroy it.
                    provider.delete(&inst.id).await.map_err(|e| e.to_string())?;
                    self.store()
                        .compute_fail(
                            &o.id,
                            false,
                            SYSTEM,
                            &format!(
                                "reconciled after a restart: payment never settled; machine {} destroyed, nothing charged",
                                inst.id
                            ),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(());
                }
                self.store()
                    .compute_mark_provisioning(&o.id, &inst.id, None, SYSTEM)
                    .await
                    .map_err(|e| e.to_string())?;
                inst.id
            }
        };
        if !credits && o.tx_hash.is_none() && o.state == "provisioning" {
            let _ = self
                .store()
                .compute_note(
                    &o.id,
                    "payment_unconfirmed",
                    SYSTEM,
                    "reconciled after a restart between acceptance and settlement: check the facilitator for this payment",
                )
                .await;
        }
        let settled = !credits && o.tx_hash.is_some();
        match self
            .finish_provisioning(&o.id, provider, &machine_id, settled)
            .await
        {
            Ok(_) | Err(FinishError::Provider { .. }) => Ok(()),
            Err(FinishError::Store(e)) => Err(e),
        }
    }

    /// Destroy every active machine whose prepaid time ended more than the
    /// grace period ago. Returns how many were destroyed.
    pub async fn reap_once(&self) -> usize {
        let grace = i64::try_from(self.inner.cfg.grace.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.clock().now_ms().saturating_sub(grace);
        let expired = match self.store().compute_expired(cutoff).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reaper: cannot read orders");
                return 0;
            }
        };
        let mut n = 0;
        for o in expired {
            let (Some(p), Some(mid)) = (self.provider_of(&o), &o.provider_instance_id) else {
                continue;
            };
            if let Err(e) = p.delete(mid).await {
                tracing::warn!(order = %o.id, error = %e, "reaper: destroy failed; retrying later");
                continue;
            }
            match self
                .store()
                .compute_end(&o.id, "expired", "reaper", "prepaid time and grace ended")
                .await
            {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(order = %o.id, error = %e, "reaper: cannot record"),
            }
        }
        n
    }

    /// The reaper loop (never returns).
    pub async fn run_reaper(self) {
        let mut tick = tokio::time::interval(self.inner.cfg.reap_interval);
        loop {
            tick.tick().await;
            self.reap_once().await;
        }
    }
}

/// Why an accepted order did not become active.
#[derive(Debug)]
pub enum FinishError {
    /// The provider failed; the machine was destroyed and `refunded`
    /// returned to the payer.
    Provider {
        error: ProviderError,
        refunded: crate::money::Micros,
    },
    Store(String),
}
