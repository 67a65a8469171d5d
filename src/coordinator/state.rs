//! The live state of the grid: nodes, their sessions and tokens, open jobs and
//! reservations. One std `Mutex` guards it; no lock is held across an
//! `.await` (job events are sent after the lock is released).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use super::billing::{self, JobMeta, Outcome};
use super::job::{Job, JobEvent};
use crate::payments::Payments;
use crate::store::Store;

use crate::clock::Clock;
use crate::money::{MicrosPerM, TokenPrice};
use crate::proto::api::{AttestationLevel, Capabilities, Evidence, PendingJob};
use crate::proto::b58;
use crate::proto::e2e::SealChannel;
use crate::proto::identity::{Ed25519Public, NodeId, Signature, X25519Public};

mod mirror;
pub use mirror::Remote;

/// SHA-256 of a bearer secret: what is kept of node tokens and codes.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

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
    /// How long a reservation lives unless a chat call claims it (§7f: at
    /// most 10 s). It holds no slot meanwhile.
    pub reservation_ttl: Duration,
    /// Unclaimed reservations one client (API key's wallet, else address)
    /// may hold at once; over it, 429 `too_many_reservations` (§7f).
    pub max_reservations_per_client: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client
    /// ([`super::client_addr`]).
    pub trusted_proxies: super::client_addr::TrustedProxies,
    /// The most parallel slots a node's heartbeat may claim (§7f); a larger
    /// claim is clamped to it.
    pub max_node_slots: u32,
    /// Models a node may advertise besides the catalogue's (§7f).
    pub allowed_models: Vec<String>,
    /// A job offered but never acknowledged is re-routed or failed after this.
    pub dispatch_timeout: Duration,
    /// A job with no terminal call after this is failed (stuck engine).
    pub stuck_job_timeout: Duration,
    pub challenge_ttl: Duration,
    /// Single-use registration codes accepted outside development mode.
    pub registration_codes: Vec<String>,
    /// Reference price per model (the model catalogue's).
    pub reference_prices: HashMap<String, TokenPrice>,
    /// For models the catalogue does not know: 0.005 USD per 1M tokens.
    pub default_reference_price: TokenPrice,
    /// Between two price changes of the same (node, model) (§5.8).
    pub price_cooldown: Duration,
    /// A node token older than this is rotated on the next heartbeat.
    pub token_lifetime: Duration,
    /// The previous token stays valid this long after a rotation (§6.5).
    pub token_grace: Duration,
    /// The attestation policy evidence is verified against.
    pub policy: Arc<crate::attest::Policy>,
    /// Simulated-TEE keys trusted in development mode (never otherwise).
    pub simulated_tee_keys: Vec<Ed25519Public>,
    /// Fetch VCEKs and TDX collateral the evidence lacks; `None`: never fetch.
    pub vendor_services: Option<super::attestation::VendorServices>,
    /// The wall clock (attestation times, token expiry, usage rows).
    pub clock: Clock,
    /// Timeouts and the connection limit of the HTTP server.
    pub server_limits: crate::http::ServerLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dev: false,
            public_url: "http://127.0.0.1:8080".into(),
            heartbeat_interval: Duration::from_secs(5),
            missed_heartbeats: 3,
            reservation_ttl: Duration::from_secs(10),
            max_reservations_per_client: 16,
            trusted_proxies: Default::default(),
            max_node_slots: 256,
            allowed_models: Vec::new(),
            dispatch_timeout: Duration::from_secs(30),
            stuck_job_timeout: Duration::from_secs(600),
            challenge_ttl: Duration::from_secs(300),
            registration_codes: Vec::new(),
            reference_prices: HashMap::new(),
            default_reference_price: TokenPrice::new(MicrosPerM(5_000), MicrosPerM(5_000)),
            price_cooldown: Duration::from_secs(60),
            token_lifetime: Duration::from_secs(24 * 3600),
            token_grace: Duration::from_secs(600),
            policy: Arc::new(crate::attest::Policy::default_policy()),
            simulated_tee_keys: Vec::new(),
            vendor_services: None,
            clock: Clock::system(),
            server_limits: crate::http::ServerLimits::default(),
        }
    }
}

#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub wallet_address: String,
    pub tee_type: String,
    pub ed25519: Ed25519Public,
    /// Only the hash of the bearer token is kept.
    token_hash: [u8; 32],
    token_issued: Instant,
    /// The token before the last rotation (hash), valid until the instant given.
    previous_token: Option<([u8; 32], Instant)>,
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
    /// The node's live WebSockets, oldest first, each with its generation;
    /// jobs are pushed to the newest. A stray socket opened with the node's
    /// token and closed again leaves the others in place.
    sockets: Vec<(u64, mpsc::UnboundedSender<PendingJob>)>,
    /// When the node's last live WebSocket closed: taken as a sign of death
    /// (with a missed heartbeat, whichever comes first) until it connects
    /// again or heartbeats after it.
    socket_lost: Option<Instant>,
    /// Heartbeats taken from this node since it was loaded (the ghost rule
    /// counts in them, see [`Job::seen_running`]).
    pub heartbeats: u64,
    /// Custom prices per model and when each last changed.
    pub custom_prices: HashMap<String, TokenPrice>,
    pub price_changed: HashMap<String, Instant>,
    /// What the last successful attestation rested on (§7b).
    pub attestation: Option<AttestationRecord>,
    /// The document last written to the store (writes only on change).
    saved_doc: Option<String>,
    /// Job counts changed since the document was last written: they are
    /// written by the next [`Grid::reap`], not once a job (a write per job
    /// was most of what PostgreSQL did under load). A crash loses at most a
    /// second of counts, which are statistics, not money.
    counts_dirty: bool,
    /// Set while another replica holds the node (see [`super::replica`]):
    /// this copy mirrors its stored document and is never written back.
    remote: Option<mirror::Remote>,
}

/// What survives a coordinator restart of a node (its row in `grid_nodes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeDoc {
    wallet_address: String,
    tee_type: String,
    ed25519: String,
    token_hash: String,
    x25519: Option<String>,
    keybind: Option<String>,
    key_version: u32,
    level: AttestationLevel,
    models: Vec<String>,
    context_size: Option<u64>,
    max_concurrent_jobs: u32,
    off_grid: bool,
    jobs_completed: u64,
    jobs_failed: u64,
    /// model → [input, output] micro-USD per 1M tokens.
    custom_prices: HashMap<String, [MicrosPerM; 2]>,
    attestation: Option<AttestationRecord>,
}

/// The facts of a node's last successful attestation, served publicly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttestationRecord {
    pub challenge: String,
    pub evidence: Option<Evidence>,
    pub verified_at: String,
    pub policy_digest: Option<String>,
    pub report_hash: String,
    /// The verdict step by step; empty without evidence (self-reported) and
    /// in records written before the steps were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::attest::Check>,
}

#[derive(Debug)]
pub struct Reservation {
    pub node_id: NodeId,
    pub model: String,
    pub expires: Instant,
    /// Who asked for it (see [`Config::max_reservations_per_client`]).
    pub client: String,
}

/// What a closed node WebSocket leaves behind.
#[derive(Debug)]
pub enum SocketLoss {
    /// Another socket of the node is open: push these jobs to it again.
    Other(Option<mpsc::UnboundedSender<PendingJob>>, Vec<PendingJob>),
    /// It was the node's last: these jobs are to be failed.
    Dead(Vec<String>),
}

/// All unclaimed reservations together never exceed this, whatever the
/// number of clients: each is a little memory until it expires.
pub const MAX_RESERVATIONS: usize = 65_536;

/// Why a reservation was not made or not claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationRefused {
    /// The client holds too many; retry after this long.
    TooMany(Duration),
    /// The node has no free slot now.
    NoCapacity,
    /// Unknown, expired or already used.
    Invalid,
}

/// What the lock guards. Reached only through its methods, so every change
/// to a job goes through [`Job`]'s stage transitions.
#[derive(Debug, Default)]
pub struct Inner {
    nodes: HashMap<NodeId, Node>,
    jobs: HashMap<String, Job>,
    reservations: HashMap<String, Reservation>,
    used_codes: Vec<String>,
    /// The generation of the last node WebSocket accepted.
    socket_generation: u64,
    /// Slots held per node by plain requests whose payment is settling:
    /// the node is chosen first, and its slot must not be handed to
    /// another request before the paid job is dispatched.
    settling: HashMap<NodeId, u32>,
    /// Slots of each node taken by the other replicas' jobs (replica mode).
    remote_load: HashMap<NodeId, u32>,
}

impl Inner {
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn node_mut(&mut self, id: &NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.get_mut(id)
    }

    /// Add a job just offered.
    pub fn insert_job(&mut self, job: Job) {
        self.jobs.insert(job.id.clone(), job);
    }

    /// A live reservation.
    pub fn reservation(&self, token: &str, now: Instant) -> Option<&Reservation> {
        self.reservations.get(token).filter(|r| r.expires > now)
    }

    /// Record a reservation unless its client already holds `per_client`
    /// live ones (or the grid [`MAX_RESERVATIONS`]); then how long until
    /// the client's oldest one expires.
    pub fn insert_reservation(
        &mut self,
        token: String,
        reservation: Reservation,
        per_client: usize,
        now: Instant,
    ) -> Result<(), ReservationRefused> {
        let mut held = 0usize;
        let mut first_expiry: Option<Instant> = None;
        for r in self.reservations.values() {
            if r.client == reservation.client && r.expires > now {
                held += 1;
                first_expiry = Some(first_expiry.map_or(r.expires, |e| e.min(r.expires)));
            }
        }
        if held >= per_client || self.reservations.len() >= MAX_RESERVATIONS {
            let wait = first_expiry.map_or(Duration::from_secs(1), |e| e - now);
            return Err(ReservationRefused::TooMany(wait));
        }
        self.reservations.insert(token, reservation);
        Ok(())
    }

    /// Claim a reservation for a chat call (single use): the node's slot is
    /// taken now, so a node with none free refuses and the reservation is
    /// left as it was.
    pub fn take_reservation(
        &mut self,
        token: &str,
        now: Instant,
    ) -> Result<Reservation, ReservationRefused> {
        let r = self
            .reservation(token, now)
            .ok_or(ReservationRefused::Invalid)?;
        let slots = self
            .nodes
            .get(&r.node_id)
            .map_or(0, |n| n.max_concurrent_jobs);
        if self.load(&r.node_id) >= slots {
            return Err(ReservationRefused::NoCapacity);
        }
        self.reservations
            .remove(token)
            .ok_or(ReservationRefused::Invalid)
    }

    /// Jobs running or offered on a node. Reservations take no slot (§7f):
    /// a slot is taken when the chat call claims one.
    pub fn load(&self, node_id: &NodeId) -> u32 {
        let jobs = self.jobs.values().filter(|j| &j.node_id == node_id).count();
        let settling = self.settling.get(node_id).copied().unwrap_or(0);
        let remote = self.remote_load.get(node_id).copied().unwrap_or(0);
        u32::try_from(jobs)
            .unwrap_or(u32::MAX)
            .saturating_add(settling)
            .saturating_add(remote)
    }

    /// Hold a slot of `node_id` while a request's payment settles.
    pub fn hold_slot(&mut self, node_id: NodeId) {
        *self.settling.entry(node_id).or_default() += 1;
    }

    /// Give back a slot held by [`Inner::hold_slot`].
    pub fn release_slot(&mut self, node_id: &NodeId) {
        if let Some(n) = self.settling.get_mut(node_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.settling.remove(node_id);
            }
        }
    }

    /// A new WebSocket of a node becomes the one jobs are pushed to; returns
    /// its generation.
    pub fn attach_socket(
        &mut self,
        node_id: &NodeId,
        push: mpsc::UnboundedSender<PendingJob>,
    ) -> Option<u64> {
        self.socket_generation += 1;
        let generation = self.socket_generation;
        let node = self.nodes.get_mut(node_id)?;
        node.sockets.push((generation, push));
        node.socket_lost = None;
        Some(generation)
    }

    /// A node's WebSocket closed. Only that socket is forgotten; jobs keep
    /// going to the newest one still open, and the jobs still waiting for
    /// the node are offered again on it (one pushed to the closing socket
    /// may never have arrived; the node ignores an id it has seen). When no
    /// socket is left, the node is taken for dead: its jobs are to be failed
    /// at once.
    pub fn detach_socket(&mut self, node_id: &NodeId, generation: u64, now: Instant) -> SocketLoss {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return SocketLoss::Other(None, Vec::new());
        };
        let was_newest = node.sockets.last().is_some_and(|(g, _)| *g == generation);
        node.sockets.retain(|(g, _)| *g != generation);
        if node.remote.is_some() {
            // The node moved to another replica, which now pushes its jobs;
            // the jobs held here keep running there.
            let push = node.push().cloned();
            let again = self.offered_to(node_id);
            return SocketLoss::Other(push, again);
        }
        if let Some((_, push)) = node.sockets.last() {
            let push = push.clone();
            let again = if was_newest {
                self.offered_to(node_id)
            } else {
                Vec::new()
            };
            return SocketLoss::Other(Some(push), again);
        }
        node.socket_lost = Some(now);
        let jobs = self
            .jobs
            .values()
            .filter(|j| &j.node_id == node_id)
            .map(|j| j.id.clone())
            .collect();
        SocketLoss::Dead(jobs)
    }

    /// Apply a heartbeat's `active_job_ids` to the node's jobs (§6.5): listed
    /// jobs are acknowledged; returns the ghosts (known to run, then missing)
    /// and the jobs still waiting to be offered again.
    ///
    /// A job counts as lost only when missing from a heartbeat the node
    /// snapshotted after the job was known to run ([`Job::seen_running`]):
    /// a heartbeat snapshotted just before a job started may arrive after
    /// its first chunk, and must not fail it.
    pub fn sync_jobs(
        &mut self,
        node_id: &NodeId,
        active: &HashSet<&str>,
    ) -> (Vec<String>, Vec<PendingJob>) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return (Vec::new(), Vec::new());
        };
        node.heartbeats += 1;
        let heartbeat = node.heartbeats;
        let mut ghosts = Vec::new();
        let mut pending = Vec::new();
        for job in self.jobs.values_mut().filter(|j| &j.node_id == node_id) {
            if active.contains(job.id.as_str()) {
                job.stage_mut().listed();
                job.seen_running(heartbeat, true);
            } else if job.stage().is_offered() {
                pending.push(job.pending());
            } else if job.ghost_from.is_some_and(|from| heartbeat >= from) {
                ghosts.push(job.id.clone());
            }
            // Otherwise the job streams but no heartbeat has listed it yet
            // (this one was built before the node took it): neither lost
            // nor to be offered again.
        }
        (ghosts, pending)
    }

    /// A chunk of `job_id` arrived: the job runs (see [`Job::seen_running`]).
    pub fn chunk_seen(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let heartbeat = self.nodes.get(&job.node_id).map_or(0, |n| n.heartbeats);
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.seen_running(heartbeat, false);
        }
    }

    /// The credit holds of the jobs in the table: their leases are renewed
    /// while the jobs run here.
    pub fn open_holds(&self) -> Vec<crate::store::HoldId> {
        self.jobs
            .values()
            .filter_map(|j| j.billing.as_ref()?.charge.hold().cloned())
            .collect()
    }

    /// The jobs running here on a settled payment, whose refunds are open.
    pub fn open_refunds(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter_map(|j| Some(j.billing.as_ref()?.charge.refund_job()?.to_string()))
            .collect()
    }

    /// The jobs offered to a node and not yet acknowledged.
    pub fn offered_to(&self, node_id: &NodeId) -> Vec<PendingJob> {
        self.jobs
            .values()
            .filter(|j| &j.node_id == node_id && j.stage().is_offered())
            .map(Job::pending)
            .collect()
    }
}

/// Shared handle to the state, the configuration and the services.
#[derive(Clone)]
pub struct Grid {
    pub config: Arc<Config>,
    inner: Arc<Mutex<Inner>>,
    /// Billing; `None` only in development mode without a store.
    pub payments: Option<Payments>,
    store: Option<Store>,
    /// Node documents to write, in order, by one writer task.
    saver: Option<mpsc::UnboundedSender<Save>>,
    /// What `/metrics` reports.
    pub metrics: Arc<super::metrics::Metrics>,
    /// Replica mode (`--replica`): the other replicas on the database.
    pub replica: Option<Arc<super::replica::Replica>>,
    /// The keys this coordinator seals plain requests with, one channel a
    /// node key ([`Grid::seal_channel`]).
    channels: Arc<Mutex<HashMap<X25519Public, Arc<SealChannel>>>>,
}

/// What the node writer is given.
enum Save {
    /// A node's document: id, wallet, document.
    Doc(String, String, String),
    /// Told once every document sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// 32 random bytes as b58: tokens and opaque ids.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b58::encode(&b)
}

impl Grid {
    /// A grid that keeps everything in memory (development and tests).
    pub fn new(config: Config) -> Self {
        Grid {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner::default())),
            payments: None,
            store: None,
            saver: None,
            metrics: Arc::default(),
            replica: None,
            channels: Arc::default(),
        }
    }

    /// A grid over a store: nodes are restored from it and written back on
    /// change; usage rows go to it. Must run inside a tokio runtime.
    pub async fn with_store(
        config: Config,
        store: Store,
        payments: Option<Payments>,
    ) -> Result<Self, crate::store::StoreError> {
        let grid = Grid {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner::default())),
            payments,
            store: Some(store.clone()),
            saver: None,
            metrics: Arc::default(),
            replica: None,
            channels: Arc::default(),
        };
        // Holds always end (§7f): the holds of jobs that are not running are
        // released before anything is served. A SQLite database belongs to
        // this coordinator alone, so none of its holds has a running job
        // now; on PostgreSQL other replicas may run jobs, and only holds
        // whose lease has lapsed are taken (the rest lapse while the reaper
        // of [`Grid::renew_and_reap_holds`] watches).
        if let Some(p) = &grid.payments {
            let all = p.store().backend_name() == "sqlite";
            let n = p.store().release_lapsed_holds(all).await?;
            if n > 0 {
                tracing::warn!(
                    holds = n,
                    "released the credit holds of jobs that no longer run"
                );
            }
            // Refunds of settled payments likewise: each one recorded as
            // owed is credited now, and the whole payment of a job that no
            // longer runs.
            // A store that refuses them now does not stop the start: the
            // reaper retries.
            p.credit_due_refunds(all).await;
        }
        let rows = store.load_nodes().await?;
        {
            let mut inner = grid.lock();
            // Restored nodes count as silent until they heartbeat again.
            let stale = Instant::now()
                .checked_sub(grid.config.heartbeat_interval * (grid.config.missed_heartbeats + 1))
                .unwrap_or_else(Instant::now);
            for (id, doc) in rows {
                match Node::from_doc(&id, &doc, stale) {
                    Some(node) => {
                        inner.nodes.insert(node.id, node);
                    }
                    None => tracing::error!(node_id = %id, "unreadable node row; skipped"),
                }
            }
            tracing::info!(nodes = inner.nodes.len(), "nodes restored from the store");
        }
        grid.restore_price_changes(&store).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Save>();
        tokio::spawn(async move {
            while let Some(save) = rx.recv().await {
                match save {
                    Save::Doc(id, wallet, doc) => {
                        if let Err(e) = store.save_node(&id, &wallet, &doc).await {
                            tracing::error!(node_id = %id, error = %e, "could not save the node");
                        }
                    }
                    Save::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Ok(Grid {
            saver: Some(tx),
            ..grid
        })
    }

    /// Put back the price changes still inside their cooldown, so that
    /// `GET …/prices` shows it after a restart (the store also enforces it).
    async fn restore_price_changes(&self, store: &Store) -> Result<(), crate::store::StoreError> {
        let changes = store.price_changes().await?;
        let now_ms = self.config.clock.now_ms();
        let now = Instant::now();
        let mut inner = self.lock();
        for (node_id, model, at_ms) in changes {
            let Ok(id) = NodeId::parse(&node_id) else {
                continue;
            };
            let age =
                Duration::from_millis(u64::try_from(now_ms.saturating_sub(at_ms)).unwrap_or(0));
            if age >= self.config.price_cooldown {
                continue;
            }
            if let (Some(node), Some(at)) = (inner.nodes.get_mut(&id), now.checked_sub(age)) {
                node.price_changed.insert(model, at);
            }
        }
        Ok(())
    }

    /// The same grid as one of several replicas on its database.
    pub fn with_replica(self, replica: Arc<super::replica::Replica>) -> Self {
        Grid {
            replica: Some(replica),
            ..self
        }
    }

    /// The channel that seals this coordinator's plain requests to the node
    /// key `node`: kept for [`crate::proto::e2e::KEEP_FOR`], so that a request costs one
    /// AEAD seal rather than three scalar multiplications (§3.4 as the
    /// client; the node cannot tell, see `proto::e2e::kept`).
    pub fn seal_channel(
        &self,
        node: &X25519Public,
    ) -> Result<Arc<SealChannel>, crate::proto::ProtoError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(node).filter(|c| !c.is_stale()) {
            return Ok(Arc::clone(c));
        }
        // Drop the stale ones while here: nodes come and go.
        channels.retain(|_, c| !c.is_stale());
        let channel = Arc::new(SealChannel::new(node)?);
        channels.insert(*node, Arc::clone(&channel));
        Ok(channel)
    }

    /// The store, when the grid has one.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Write a node's document if it changed since the last write.
    pub fn persist(&self, inner: &mut Inner, node_id: &NodeId) {
        let Some(saver) = &self.saver else { return };
        let Some(node) = inner.nodes.get_mut(node_id) else {
            return;
        };
        node.counts_dirty = false;
        if node.remote.is_some() {
            // Another replica holds it and writes its document.
            return;
        }
        let doc = node.to_doc();
        if node.saved_doc.as_deref() == Some(doc.as_str()) {
            return;
        }
        node.saved_doc = Some(doc.clone());
        let _ = saver.send(Save::Doc(
            node.id.to_string(),
            node.wallet_address.clone(),
            doc,
        ));
    }

    /// Write the job counts not yet written (they go out once a second,
    /// [`Grid::reap`]).
    fn persist_counts(&self, inner: &mut Inner) {
        let counted: Vec<NodeId> = inner
            .nodes
            .values()
            .filter(|n| n.counts_dirty)
            .map(|n| n.id)
            .collect();
        for id in counted {
            self.persist(inner, &id);
        }
    }

    /// A clean stop: write what the node documents lack, and wait (up to
    /// `wait`) until every document sent is in the store, so that a
    /// SIGTERM loses no job counts.
    pub async fn flush_nodes(&self, wait: Duration) {
        let Some(saver) = &self.saver else { return };
        self.persist_counts(&mut self.lock());
        let (done, written) = oneshot::channel();
        if saver.send(Save::Flush(done)).is_ok()
            && tokio::time::timeout(wait, written).await.is_err()
        {
            tracing::warn!("node documents not all written before the stop");
        }
    }

    /// Lock the state. A poisoned lock means a handler panicked mid-update;
    /// the data is still the best we have, so keep serving.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reference_price(&self, model: &str) -> TokenPrice {
        self.config
            .reference_prices
            .get(model)
            .copied()
            .unwrap_or(self.config.default_reference_price)
    }

    /// What a node bills for a model: its custom price, else the reference.
    pub fn effective_price(&self, node: &Node, model: &str) -> TokenPrice {
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
        let old = std::mem::replace(&mut node.token_hash, secret_hash(&new));
        node.previous_token = Some((old, now + self.config.token_grace));
        node.token_issued = now;
        Some(new)
    }

    /// Whether a node is still heard from: no missed heartbeats, and its
    /// WebSocket, if it had one, has not closed without another open.
    pub fn is_online(&self, node: &Node, now: Instant) -> bool {
        node.socket_lost.is_none()
            && now.duration_since(node.last_seen)
                <= self.config.heartbeat_interval * self.config.missed_heartbeats
    }

    /// Whether `model` is one a node may advertise (§7f): the catalogue's,
    /// one with a configured reference price, or one allowed by configuration.
    pub fn model_allowed(&self, model: &str) -> bool {
        matches!(crate::catalogue::find(model), Ok(Some(_)))
            || self.config.reference_prices.contains_key(model)
            || self.config.allowed_models.iter().any(|m| m == model)
    }

    /// Register a node; returns its id and token. The caller has checked
    /// the registration code (or that the grid runs in development mode).
    pub fn register(
        &self,
        ed25519: Ed25519Public,
        wallet_address: String,
        tee_type: String,
        models: Vec<String>,
    ) -> (NodeId, String) {
        let mut inner = self.lock();
        let id = NodeId::new_random();
        let token = random_token();
        inner.nodes.insert(
            id,
            Node {
                id,
                wallet_address,
                tee_type,
                ed25519,
                token_hash: secret_hash(&token),
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
                sockets: Vec::new(),
                socket_lost: None,
                heartbeats: 0,
                custom_prices: HashMap::new(),
                price_changed: HashMap::new(),
                attestation: None,
                saved_doc: None,
                counts_dirty: false,
                remote: None,
            },
        );
        self.persist(&mut inner, &id);
        (id, token)
    }

    /// Whether a code is one of the configured single-use codes, unused;
    /// marks it used. With a store the use is recorded there (hashed), so
    /// a restart or a replica does not accept the code again.
    pub async fn take_configured_code(&self, code: &str) -> Result<bool, crate::store::StoreError> {
        let known = self
            .config
            .registration_codes
            .iter()
            .any(|c| bool::from(c.as_bytes().ct_eq(code.as_bytes())));
        if !known {
            return Ok(false);
        }
        if let Some(store) = &self.store {
            return store.use_config_code(&hex::encode(secret_hash(code))).await;
        }
        let mut inner = self.lock();
        if inner.used_codes.iter().any(|c| c == code) {
            return Ok(false);
        }
        inner.used_codes.push(code.to_string());
        Ok(true)
    }

    /// Check a node token in constant time.
    pub fn authenticate(&self, inner: &Inner, node_id: &NodeId, token: &str) -> bool {
        let Some(n) = inner.nodes.get(node_id) else {
            return false;
        };
        let given = secret_hash(token);
        let current = bool::from(n.token_hash.ct_eq(&given));
        let previous = n
            .previous_token
            .as_ref()
            .is_some_and(|(old, until)| Instant::now() <= *until && bool::from(old.ct_eq(&given)));
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

    /// Remove a job and count its end on the node; returns the job and
    /// what billing needs to know of it.
    pub fn take_job(&self, inner: &mut Inner, job_id: &str, ok: bool) -> Option<(Job, JobMeta)> {
        self.take_job_tallied(inner, job_id, Some(ok))
    }

    /// [`Grid::take_job`]; `tally` `None` counts the end neither way (the
    /// client's fault, §7f).
    fn take_job_tallied(
        &self,
        inner: &mut Inner,
        job_id: &str,
        tally: Option<bool>,
    ) -> Option<(Job, JobMeta)> {
        let job = inner.jobs.remove(job_id)?;
        let mut operator_wallet = String::new();
        if let Some(n) = inner.nodes.get_mut(&job.node_id) {
            match tally {
                Some(true) => n.jobs_completed += 1,
                Some(false) => n.jobs_failed += 1,
                None => {}
            }
            // Written by the next reap, when there is a store to write to.
            n.counts_dirty |= tally.is_some() && self.saver.is_some();
            operator_wallet = n.wallet_address.clone();
        }
        let meta = JobMeta {
            job_id: job.id.clone(),
            node_id: job.node_id.to_string(),
            operator_wallet,
            model: job.model.clone(),
        };
        Some((job, meta))
    }

    /// End a job: bill it, then tell the waiting client. A credit hold that
    /// cannot be settled turns the result into a failure (the output is
    /// withheld). A job that may be retried and failed before any output
    /// hands its billing back unclosed ([`JobEvent::Unstarted`]). `None`
    /// when the job had already ended; otherwise whether the client
    /// received the event.
    pub async fn end_job(
        &self,
        job_id: &str,
        event: Option<JobEvent>,
        ok: bool,
        outcome: Outcome,
    ) -> Option<bool> {
        self.end_job_tallied(job_id, event, Some(ok), outcome).await
    }

    /// [`Grid::end_job`]; `tally` `None` counts the end against nobody (a
    /// failure the client caused, §7f).
    pub async fn end_job_tallied(
        &self,
        job_id: &str,
        event: Option<JobEvent>,
        tally: Option<bool>,
        outcome: Outcome,
    ) -> Option<bool> {
        let (mut job, meta) = {
            let mut inner = self.lock();
            self.take_job_tallied(&mut inner, job_id, tally)?
        };
        if let (Outcome::Failed, Some(JobEvent::Failed(why))) = (&outcome, &event) {
            if job.retry && job.stage().nothing_relayed() {
                if let Some(billing) = job.billing.take() {
                    let back = JobEvent::Unstarted(why.clone(), billing);
                    match job.events.send(back).await {
                        Ok(()) => return Some(true),
                        // The client has gone: close the bill here.
                        Err(mpsc::error::SendError(ev)) => {
                            if let JobEvent::Unstarted(_, billing) = ev {
                                job.billing = Some(billing);
                            }
                        }
                    }
                }
            }
        }
        // A whole answer whose client has already gone delivered nothing:
        // bill it as an abort with no tokens (a payment is refunded whole).
        let outcome = match outcome {
            Outcome::Completed {
                usage_signature, ..
            } if job.events.is_closed() && matches!(event, Some(JobEvent::Complete(..))) => {
                Outcome::Aborted {
                    completion_tokens: 0,
                    usage_signature,
                }
            }
            other => other,
        };
        let billed = billing::close(self, &meta, job.billing.take(), outcome).await;
        let event = match (billed, event) {
            (Err(why), Some(_)) => Some(JobEvent::Failed(why)),
            (Ok(billed), Some(JobEvent::Complete(done, _))) => {
                Some(JobEvent::Complete(done, billed))
            }
            (Ok(billed), Some(JobEvent::Chunk(c))) if c.is_final == Some(true) => {
                Some(JobEvent::Final(c, billed))
            }
            (_, event) => event,
        };
        match event {
            Some(ev) => Some(job.events.send(ev).await.is_ok()),
            None => Some(false),
        }
    }

    /// [`Grid::end_job`] as a failure, from code that cannot wait.
    pub fn fail_job_later(&self, job_id: &str, why: String) {
        let grid = self.clone();
        let job_id = job_id.to_string();
        tokio::spawn(async move {
            grid.end_job(&job_id, Some(JobEvent::Failed(why)), false, Outcome::Failed)
                .await;
        });
    }

    /// Renew the leases of the credit holds of jobs running here, then
    /// release every hold whose lease has lapsed (its coordinator is gone).
    pub async fn renew_and_reap_holds(&self) {
        let Some(p) = &self.payments else { return };
        let (running, mut refunds) = {
            let inner = self.lock();
            (inner.open_holds(), inner.open_refunds())
        };
        if let Err(e) = p.store().renew_holds(&running).await {
            tracing::error!(error = %e, "could not renew credit hold leases");
            // Reaping now could release holds of jobs that still run.
            return;
        }
        // A refund kept in memory (the store refused it) keeps its open row
        // from lapsing into a whole refund until its exact amount is in.
        refunds.extend(p.owed_refund_jobs());
        if let Err(e) = p.store().renew_job_refunds(&refunds).await {
            tracing::error!(error = %e, "could not renew refund leases");
            return;
        }
        match p.store().release_lapsed_holds(false).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(holds = n, "released lapsed credit holds"),
            Err(e) => tracing::error!(error = %e, "could not release lapsed credit holds"),
        }
        p.credit_due_refunds(false).await;
    }

    /// Periodic upkeep: expire reservations, fail jobs nobody picked up or that
    /// are stuck, and fail the work of nodes that stopped heartbeating.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.reservations.retain(|_, r| r.expires > now);
        self.persist_counts(&mut inner);
        let offline: Vec<NodeId> = inner
            .nodes
            .values()
            .filter(|n| !self.is_online(n, now))
            .map(|n| n.id)
            .collect();
        let mut fail = Vec::new();
        for j in inner.jobs.values() {
            let age = now.duration_since(j.offered_at);
            if j.stage().is_offered() && age > self.config.dispatch_timeout {
                fail.push((j.id.clone(), "the node did not pick up the job"));
            } else if age > self.config.stuck_job_timeout {
                fail.push((j.id.clone(), "the job timed out"));
            } else if offline.contains(&j.node_id) {
                fail.push((j.id.clone(), "the node stopped heartbeating"));
            }
        }
        drop(inner);
        for (id, why) in fail {
            tracing::warn!(job_id = %id, why, "failing job");
            self.fail_job_later(&id, why.to_string());
        }
    }
}

/// A heartbeat must arrive this long after a node's WebSocket closed to
/// prove the node alive: one already on its way when the node died must not.
const SOCKET_LOSS_GRACE: Duration = Duration::from_secs(1);

impl Node {
    /// Whether another replica holds this node (this is its mirror).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The WebSocket jobs are pushed to: the newest one open; for a node
    /// another replica holds, the way to that replica.
    pub fn push(&self) -> Option<&mpsc::UnboundedSender<PendingJob>> {
        match &self.remote {
            Some(r) => r.push.as_ref(),
            None => self.sockets.last().map(|(_, push)| push),
        }
    }

    /// A heartbeat arrived at `now`.
    pub fn heard_from(&mut self, now: Instant) {
        self.last_seen = now;
        if self
            .socket_lost
            .is_some_and(|lost| now.duration_since(lost) >= SOCKET_LOSS_GRACE)
        {
            self.socket_lost = None;
        }
    }

    fn to_doc(&self) -> String {
        let doc = NodeDoc {
            wallet_address: self.wallet_address.clone(),
            tee_type: self.tee_type.clone(),
            ed25519: self.ed25519.to_b58(),
            token_hash: hex::encode(self.token_hash),
            x25519: self.x25519.map(|x| x.to_b58()),
            keybind: self.keybind.map(|k| k.to_b58()),
            key_version: self.key_version,
            level: self.level,
            models: self.models.clone(),
            context_size: self.capabilities.context_size,
            max_concurrent_jobs: self.max_concurrent_jobs,
            off_grid: self.off_grid,
            jobs_completed: self.jobs_completed,
            jobs_failed: self.jobs_failed,
            custom_prices: self
                .custom_prices
                .iter()
                .map(|(m, p)| (m.clone(), [p.input, p.output]))
                .collect(),
            attestation: self.attestation.clone(),
        };
        serde_json::to_string(&doc).unwrap_or_default()
    }

    fn from_doc(id: &str, text: &str, last_seen: Instant) -> Option<Node> {
        let d: NodeDoc = serde_json::from_str(text).ok()?;
        let mut token_hash = [0u8; 32];
        hex::decode_to_slice(&d.token_hash, &mut token_hash).ok()?;
        Some(Node {
            id: NodeId::parse(id).ok()?,
            wallet_address: d.wallet_address,
            tee_type: d.tee_type,
            ed25519: Ed25519Public::from_b58(&d.ed25519).ok()?,
            token_hash,
            token_issued: Instant::now(),
            previous_token: None,
            x25519: d.x25519.and_then(|x| X25519Public::from_b58(&x).ok()),
            keybind: d.keybind.and_then(|k| Signature::from_b58(&k).ok()),
            key_version: d.key_version,
            level: d.level,
            models: d.models,
            capabilities: Capabilities {
                streaming: true,
                context_size: d.context_size,
                signed_usage: Some(true),
                // Known again from the node's next heartbeat.
                features: Vec::new(),
            },
            max_concurrent_jobs: d.max_concurrent_jobs.max(1),
            last_seen,
            off_grid: d.off_grid,
            challenge: None,
            jobs_completed: d.jobs_completed,
            jobs_failed: d.jobs_failed,
            sockets: Vec::new(),
            socket_lost: None,
            heartbeats: 0,
            custom_prices: d
                .custom_prices
                .into_iter()
                .map(|(m, [i, o])| (m, TokenPrice::new(i, o)))
                .collect(),
            price_changed: HashMap::new(),
            attestation: d.attestation,
            saved_doc: Some(text.to_string()),
            counts_dirty: false,
            remote: None,
        })
    }
}
