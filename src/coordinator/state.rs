//! The live state of the grid: nodes, their sessions and tokens, open jobs and
//! reservations. One std `Mutex` guards it; no lock is held across an
//! `.await` (job events are sent after the lock is released).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::pricing::Price;
use crate::proto::api::{
    AttestationLevel, Capabilities, ChunkRequest, CompleteRequest, Evidence, PendingJob,
};
use crate::proto::b58;
use crate::proto::identity::{Ed25519Public, NodeId, Signature, X25519Public};

/// Settings of the coordinator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Development mode: open registration, no payment.
    pub dev: bool,
    /// The base URL clients reach this coordinator at (for `evidence_url`).
    pub public_url: String,
    pub heartbeat_interval: Duration,
    /// A node that misses this many heartbeats stops receiving work.
    pub missed_heartbeats: u32,
    pub reservation_ttl: Duration,
    /// A job offered but never acknowledged is re-routed or failed after this.
    pub dispatch_timeout: Duration,
    /// A job with no terminal call after this is failed (stuck engine).
    pub stuck_job_timeout: Duration,
    pub challenge_ttl: Duration,
    /// Single-use registration codes accepted outside development mode.
    pub registration_codes: Vec<String>,
    /// Reference price per model (the model catalogue's).
    pub reference_prices: HashMap<String, Price>,
    /// For models the catalogue does not know: 0.005 USD per 1M tokens.
    pub default_reference_price: Price,
    /// Between two price changes of the same (node, model) (§5.8).
    pub price_cooldown: Duration,
    /// A node token older than this is rotated on the next heartbeat.
    pub token_lifetime: Duration,
    /// The previous token stays valid this long after a rotation (§6.5).
    pub token_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dev: false,
            public_url: "http://127.0.0.1:8080".into(),
            heartbeat_interval: Duration::from_secs(5),
            missed_heartbeats: 3,
            reservation_ttl: Duration::from_secs(60),
            dispatch_timeout: Duration::from_secs(30),
            stuck_job_timeout: Duration::from_secs(600),
            challenge_ttl: Duration::from_secs(300),
            registration_codes: Vec::new(),
            reference_prices: HashMap::new(),
            default_reference_price: Price::new(5_000, 5_000),
            price_cooldown: Duration::from_secs(60),
            token_lifetime: Duration::from_secs(24 * 3600),
            token_grace: Duration::from_secs(600),
        }
    }
}

/// What a node tells a waiting client.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Chunk(ChunkRequest),
    Complete(CompleteRequest),
    Failed(String),
}

#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub wallet_address: String,
    pub tee_type: String,
    pub ed25519: Ed25519Public,
    token: String,
    token_issued: Instant,
    /// The token before the last rotation, valid until the instant given.
    previous_token: Option<(String, Instant)>,
    pub x25519: Option<X25519Public>,
    pub keybind: Option<Signature>,
    pub key_version: u32,
    pub level: AttestationLevel,
    pub models: Vec<String>,
    pub capabilities: Capabilities,
    pub max_concurrent_jobs: u32,
    pub last_seen: Instant,
    pub off_grid: bool,
    challenge: Option<(String, Instant)>,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub push: Option<mpsc::UnboundedSender<PendingJob>>,
    /// Custom prices per model and when each last changed.
    pub custom_prices: HashMap<String, Price>,
    pub price_changed: HashMap<String, Instant>,
    /// What the last successful attestation rested on (§7b).
    pub attestation: Option<AttestationRecord>,
}

/// The facts of a node's last successful attestation, served publicly.
#[derive(Debug, Clone)]
pub struct AttestationRecord {
    pub challenge: String,
    pub evidence: Option<Evidence>,
    pub verified_at: String,
    pub policy_digest: Option<String>,
    pub report_hash: String,
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub node_id: NodeId,
    pub model: String,
    pub payload: Value,
    pub stream: bool,
    pub acked: bool,
    pub offered_at: Instant,
    pub events: mpsc::Sender<JobEvent>,
    pub next_seq: u64,
    pub last_chunk: Option<ChunkRequest>,
    /// The client has gone: one settlement chunk is still accepted.
    pub closed: bool,
}

impl Job {
    pub fn pending(&self) -> PendingJob {
        PendingJob {
            id: self.id.clone(),
            job_type: "inference".into(),
            model: self.model.clone(),
            input_payload: self.payload.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Reservation {
    pub node_id: NodeId,
    pub model: String,
    pub expires: Instant,
}

#[derive(Debug, Default)]
pub struct Inner {
    pub nodes: HashMap<NodeId, Node>,
    pub jobs: HashMap<String, Job>,
    pub reservations: HashMap<String, Reservation>,
    pub used_codes: Vec<String>,
}

/// Shared handle to the state and the configuration.
#[derive(Clone)]
pub struct Grid {
    pub config: Arc<Config>,
    inner: Arc<Mutex<Inner>>,
}

/// 32 random bytes as b58: tokens and opaque ids.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b58::encode(&b)
}

impl Grid {
    pub fn new(config: Config) -> Self {
        Grid {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// Lock the state. A poisoned lock means a handler panicked mid-update;
    /// the data is still the best we have, so keep serving.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reference_price(&self, model: &str) -> Price {
        self.config
            .reference_prices
            .get(model)
            .copied()
            .unwrap_or(self.config.default_reference_price)
    }

    /// What a node bills for a model: its custom price, else the reference.
    pub fn effective_price(&self, node: &Node, model: &str) -> Price {
        node.custom_prices
            .get(model)
            .copied()
            .unwrap_or_else(|| self.reference_price(model))
    }

    /// Rotate a node's token when it is older than the configured lifetime;
    /// returns the new token. The old one stays valid for the grace period.
    pub fn maybe_rotate_token(&self, node: &mut Node, now: Instant) -> Option<String> {
        if now.duration_since(node.token_issued) < self.config.token_lifetime {
            return None;
        }
        let new = random_token();
        let old = std::mem::replace(&mut node.token, new.clone());
        node.previous_token = Some((old, now + self.config.token_grace));
        node.token_issued = now;
        Some(new)
    }

    /// Whether a node is still heard from.
    pub fn is_online(&self, node: &Node, now: Instant) -> bool {
        now.duration_since(node.last_seen)
            <= self.config.heartbeat_interval * self.config.missed_heartbeats
    }

    /// Register a node; returns its id and token.
    pub fn register(
        &self,
        ed25519: Ed25519Public,
        wallet_address: String,
        tee_type: String,
        models: Vec<String>,
        code: Option<&str>,
    ) -> Result<(NodeId, String), &'static str> {
        let mut inner = self.lock();
        if !self.config.dev {
            let code = code.ok_or("registration needs a registration code")?;
            let known = self
                .config
                .registration_codes
                .iter()
                .any(|c| bool::from(c.as_bytes().ct_eq(code.as_bytes())));
            if !known || inner.used_codes.iter().any(|c| c == code) {
                return Err("unknown or used registration code");
            }
            inner.used_codes.push(code.to_string());
        }
        let id = NodeId::new_random();
        let token = random_token();
        inner.nodes.insert(
            id,
            Node {
                id,
                wallet_address,
                tee_type,
                ed25519,
                token: token.clone(),
                token_issued: Instant::now(),
                previous_token: None,
                x25519: None,
                keybind: None,
                key_version: 0,
                level: AttestationLevel::None,
                models,
                capabilities: Capabilities::default(),
                max_concurrent_jobs: 1,
                last_seen: Instant::now(),
                off_grid: false,
                challenge: None,
                jobs_completed: 0,
                jobs_failed: 0,
                push: None,
                custom_prices: HashMap::new(),
                price_changed: HashMap::new(),
                attestation: None,
            },
        );
        Ok((id, token))
    }

    /// Check a node token in constant time.
    pub fn authenticate(&self, inner: &Inner, node_id: &NodeId, token: &str) -> bool {
        let Some(n) = inner.nodes.get(node_id) else {
            return false;
        };
        let current = bool::from(n.token.as_bytes().ct_eq(token.as_bytes()));
        let previous = n.previous_token.as_ref().is_some_and(|(old, until)| {
            Instant::now() <= *until && bool::from(old.as_bytes().ct_eq(token.as_bytes()))
        });
        current | previous
    }

    /// Issue a single-use challenge (64 hex characters, §6.3).
    pub fn issue_challenge(&self, inner: &mut Inner, node_id: &NodeId) -> Option<String> {
        let node = inner.nodes.get_mut(node_id)?;
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        let c = hex::encode(b);
        node.challenge = Some((c.clone(), Instant::now() + self.config.challenge_ttl));
        Some(c)
    }

    /// Take the live challenge (single use).
    pub fn take_challenge(inner: &mut Inner, node_id: &NodeId) -> Option<String> {
        let node = inner.nodes.get_mut(node_id)?;
        match node.challenge.take() {
            Some((c, expires)) if Instant::now() <= expires => Some(c),
            _ => None,
        }
    }

    /// Jobs running or offered on a node, plus its live reservations.
    pub fn load(inner: &Inner, node_id: &NodeId, now: Instant) -> u32 {
        let jobs = inner
            .jobs
            .values()
            .filter(|j| &j.node_id == node_id)
            .count();
        let res = inner
            .reservations
            .values()
            .filter(|r| &r.node_id == node_id && r.expires > now)
            .count();
        (jobs + res) as u32
    }

    /// End a job: remove it and tell the waiting client.
    pub fn finish_job(
        inner: &mut Inner,
        job_id: &str,
        outcome: Option<JobEvent>,
        ok: bool,
    ) -> Option<mpsc::Sender<JobEvent>> {
        let job = inner.jobs.remove(job_id)?;
        if let Some(n) = inner.nodes.get_mut(&job.node_id) {
            if ok {
                n.jobs_completed += 1;
            } else {
                n.jobs_failed += 1;
            }
        }
        let tx = job.events;
        if let Some(ev) = outcome {
            // The client may be gone; nothing to do then.
            let _ = tx.try_send(ev);
        }
        Some(tx)
    }

    /// Periodic upkeep: expire reservations, fail jobs nobody picked up or that
    /// are stuck, and fail the work of nodes that stopped heartbeating.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.reservations.retain(|_, r| r.expires > now);
        let offline: Vec<NodeId> = inner
            .nodes
            .values()
            .filter(|n| !self.is_online(n, now))
            .map(|n| n.id)
            .collect();
        let mut fail = Vec::new();
        for j in inner.jobs.values() {
            let age = now.duration_since(j.offered_at);
            if !j.acked && j.next_seq == 0 && age > self.config.dispatch_timeout {
                fail.push((j.id.clone(), "the node did not pick up the job"));
            } else if age > self.config.stuck_job_timeout {
                fail.push((j.id.clone(), "the job timed out"));
            } else if offline.contains(&j.node_id) {
                fail.push((j.id.clone(), "the node stopped heartbeating"));
            }
        }
        for (id, why) in fail {
            tracing::warn!(job_id = %id, why, "failing job");
            Self::finish_job(
                &mut inner,
                &id,
                Some(JobEvent::Failed(why.to_string())),
                false,
            );
        }
    }
}
