//! Replica mode (`sgl coordinator serve --replica`): any number of
//! coordinators on one PostgreSQL database, behind any HTTP load balancer.
//!
//! - Each replica holds a lease in `grid_replicas`, renewed every
//!   [`TICK`]. A replica whose renewal fails stops taking work: every
//!   request is answered 503 and its node sockets close, so the nodes
//!   reconnect to another replica (see [`gate`]).
//! - A node is held by the replica its WebSocket reached (before that, the
//!   one it registered with): `grid_node_sessions`. The node's own calls
//!   (heartbeat, challenge, attestation, status) that land elsewhere are
//!   forwarded to that replica; when no live replica holds the node, the
//!   replica they reached adopts it.
//! - Every replica mirrors the nodes the others hold (their stored
//!   documents, [`crate::coordinator::state`]), so a client on any replica
//!   can be routed to any node; slots are counted across replicas through
//!   `grid_replica_load`.
//! - A job stays with the replica holding its client stream (its billing
//!   and its events), recorded in `grid_replica_jobs`. It is pushed to a
//!   node held elsewhere through that replica, and the node's chunk,
//!   result and failure calls, wherever they land, are forwarded to it.
//!   A job whose replica is gone is unknown everywhere: the node is told
//!   what it is told of a client that left.
//!
//! Replicas talk by LISTEN/NOTIFY on one channel each ([`Message`]),
//! written by one batching writer ([`mail`]); a forwarded call is answered
//! once the holder has handled it, so the node sees the holder's own
//! answer.

mod forward;
mod mail;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tower::ServiceExt;

pub use forward::{gate, route_node_call};
use mail::Mailer;

use super::state::{secret_hash, Grid, Reservation};
use crate::proto::api::PendingJob;
use crate::proto::identity::NodeId;
use crate::store::replica::{ReplicaDb, StoredReservation};

/// How often the lease is renewed and the mirrors refreshed.
pub const TICK: Duration = Duration::from_millis(500);
/// How long a replica's lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long a forwarded call waits for the holder's answer in all.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// After this long without an answer the holder is looked up again: a
/// call to a replica that died is then sent to the node's new holder, or
/// handled here once the dead replica's lease has lapsed.
const CALL_SLICE: Duration = Duration::from_secs(1);
/// The largest answer body taken from a forwarded call.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// Marks a call forwarded by another replica: handled here, never again
/// forwarded.
pub const FORWARDED: &str = "x-sgl-replica-forwarded";

/// What replicas send each other.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Message {
    /// A node's HTTP call, to be handled by the replica receiving it.
    Call {
        id: u64,
        from: String,
        method: String,
        uri: String,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// The answer to a [`Message::Call`].
    Answer { id: u64, status: u16, body: String },
    /// A job for a node whose WebSocket the receiving replica holds;
    /// `from` is the sender, which holds the job's client (absent from a
    /// replica of an earlier version).
    Push {
        node_id: String,
        job: PendingJob,
        #[serde(default)]
        from: Option<String>,
    },
    /// Jobs of the receiving replica's clients that their node's heartbeat
    /// (taken by the sender, its holder) lists as running.
    Listed {
        node_id: String,
        job_ids: Vec<String>,
    },
}

/// A node call to be handled by another replica.
#[derive(Debug, Clone)]
struct Outgoing {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// One replica's side of replica mode.
pub struct Replica {
    pub db: ReplicaDb,
    /// Owner rows and messages to the other replicas, batched.
    mail: Mailer,
    healthy: AtomicBool,
    next_call: AtomicU64,
    calls: Mutex<HashMap<u64, oneshot::Sender<(u16, String)>>>,
    /// The replicas that pushed the jobs this one relayed to its nodes
    /// lately: where a node's calls about those jobs go, without a lookup
    /// in the database.
    pushed_by: Mutex<JobOwners>,
    /// The node API, for calls forwarded here.
    app: OnceLock<Router>,
}

/// Recent jobs' owners, oldest forgotten first. Each entry has a number,
/// so that a job forgotten and pushed again is not evicted early by its
/// first place in the queue.
#[derive(Default)]
struct JobOwners {
    owner: HashMap<String, (String, u64)>,
    order: std::collections::VecDeque<(String, u64)>,
    next: u64,
}

/// The jobs whose owner a replica remembers: far more than run at once.
const REMEMBERED_OWNERS: usize = 8192;

impl JobOwners {
    fn insert(&mut self, job_id: String, owner: String) {
        if let Some(known) = self.owner.get_mut(&job_id) {
            known.0 = owner;
            return;
        }
        self.next += 1;
        self.owner.insert(job_id.clone(), (owner, self.next));
        self.order.push_back((job_id, self.next));
        while self.order.len() > REMEMBERED_OWNERS {
            if let Some((old, n)) = self.order.pop_front() {
                if self.owner.get(&old).is_some_and(|(_, m)| *m == n) {
                    self.owner.remove(&old);
                }
            }
        }
    }

    fn get(&self, job_id: &str) -> Option<&String> {
        self.owner.get(job_id).map(|(owner, _)| owner)
    }

    fn forget(&mut self, job_id: &str) {
        self.owner.remove(job_id);
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.db.id())
            .finish()
    }
}

impl Replica {
    /// Join the replicas on `db`: take the lease now, so a database that
    /// cannot be reached stops the start.
    pub async fn join(db: ReplicaDb) -> Result<Arc<Replica>, crate::store::StoreError> {
        db.renew().await?;
        tracing::info!(replica = db.id(), "joined as a coordinator replica");
        Ok(Arc::new(Replica {
            mail: Mailer::start(db.clone()),
            db,
            healthy: AtomicBool::new(true),
            next_call: AtomicU64::new(1),
            calls: Mutex::new(HashMap::new()),
            pushed_by: Mutex::default(),
            app: OnceLock::new(),
        }))
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        self.db.id()
    }

    /// Whether the lease was renewed at the last tick.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<(u16, String)>>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pushed_by(&self) -> std::sync::MutexGuard<'_, JobOwners> {
        self.pushed_by.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica that pushed `job_id` here, if this one remembers it.
    pub(super) fn pusher_of(&self, job_id: &str) -> Option<String> {
        self.pushed_by().get(job_id).cloned()
    }

    /// Forget that `job_id` came from its pusher (it did not answer).
    pub(super) fn forget_pusher(&self, job_id: &str) {
        self.pushed_by().forget(job_id);
    }

    /// Send `msg` to replica `to`; back once it is committed.
    async fn send(&self, to: &str, msg: &Message) -> Result<(), String> {
        self.mail.notify_now(to, encode(msg)).await
    }

    /// Send `msg` to replica `to` without waiting (a failure is logged).
    fn post(&self, to: &str, msg: &Message) {
        self.mail.notify(to, encode(msg));
    }

    /// Have replica `to` handle a node call; its status and body. `None`
    /// when no answer came within `wait` (the replica may be gone).
    async fn call(&self, to: &str, out: &Outgoing, wait: Duration) -> Option<(u16, String)> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.calls().insert(id, tx);
        let msg = Message::Call {
            id,
            from: self.id().to_string(),
            method: out.method.clone(),
            uri: out.uri.clone(),
            headers: out.headers.clone(),
            body: out.body.clone(),
        };
        let answer = match self.send(to, &msg).await {
            Ok(()) => tokio::time::timeout(wait, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                tracing::warn!(error = %e, "could not forward a node call");
                None
            }
        };
        self.calls().remove(&id);
        answer
    }

    /// The way to replica `to` for jobs of `node_id`: a task carrying each
    /// job over until the sender is dropped.
    fn pusher(self: &Arc<Self>, to: &str, node_id: NodeId) -> mpsc::UnboundedSender<PendingJob> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PendingJob>();
        let me = self.clone();
        let to = to.to_string();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let job_id = job.id.clone();
                let msg = Message::Push {
                    node_id: node_id.to_string(),
                    job,
                    from: Some(me.id().to_string()),
                };
                // The owner row goes with the push (see `record_job`).
                me.mail.push(&to, encode(&msg), job_id);
            }
        });
        tx
    }

    /// Take a message from another replica.
    async fn receive(self: &Arc<Self>, grid: &Grid, payload: &str) {
        let text = match self.db.open_payload(payload).await {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a replica message");
                return;
            }
        };
        let Ok(msg) = serde_json::from_str::<Message>(&text) else {
            tracing::warn!("unreadable replica message");
            return;
        };
        match msg {
            Message::Answer { id, status, body } => {
                if let Some(tx) = self.calls().remove(&id) {
                    let _ = tx.send((status, body));
                }
            }
            Message::Push { node_id, job, from } => {
                let Ok(id) = NodeId::parse(&node_id) else {
                    return;
                };
                if let Some(from) = from {
                    self.pushed_by().insert(job.id.clone(), from);
                }
                if !grid.lock().push_local(&id, job) {
                    // Offered again by its replica when the node attaches.
                    tracing::debug!(%node_id, "job for a node not attached here");
                }
            }
            Message::Listed { node_id, job_ids } => {
                if let Ok(id) = NodeId::parse(&node_id) {
                    grid.lock().listed_here(&id, &job_ids);
                }
            }
            Message::Call {
                id,
                from,
                method,
                uri,
                headers,
                body,
            } => {
                let (status, body) = self.handle(method, uri, headers, body).await;
                self.post(&from, &Message::Answer { id, status, body });
            }
        }
    }

    /// Run a forwarded node call through this replica's node API.
    async fn handle(
        &self,
        method: String,
        uri: String,
        headers: Vec<(String, String)>,
        body: String,
    ) -> (u16, String) {
        let Some(app) = self.app.get().cloned() else {
            return (503, String::new());
        };
        let mut req = Request::builder().method(method.as_str()).uri(uri.as_str());
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let Ok(req) = req.header(FORWARDED, "1").body(Body::from(body)) else {
            return (400, String::new());
        };
        let Ok(resp) = app.oneshot(req).await;
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// One tick: renew the lease, report the nodes held here, mirror the
    /// others', exchange slot counts.
    async fn tick(self: &Arc<Self>, grid: &Grid) -> Result<(), crate::store::StoreError> {
        self.db.renew().await?;
        let held = grid.lock().held_nodes(grid, std::time::Instant::now());
        self.db.update_own(&held).await?;
        let remote = self.db.remote_nodes().await?;
        let again = grid.mirror(remote, |to, node| self.pusher(to, node));
        for (push, job) in again {
            let _ = push.send(job);
        }
        let load = grid.lock().local_load();
        let others = self.db.exchange_load(&load).await?;
        grid.lock().set_remote_load(others);
        Ok(())
    }

    /// Start the replica's tasks for `grid`; `app` answers forwarded calls.
    pub fn start(self: &Arc<Self>, grid: &Grid, app: Router) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.app.set(app);
        let listen = {
            let (me, grid) = (self.clone(), grid.clone());
            tokio::spawn(async move { me.listen(grid).await })
        };
        let upkeep = {
            let (me, grid) = (self.clone(), grid.clone());
            tokio::spawn(async move { me.upkeep(grid).await })
        };
        vec![listen, upkeep]
    }

    async fn listen(self: Arc<Self>, grid: Grid) {
        loop {
            let mut listener = match self.db.listen().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "could not listen for other replicas");
                    tokio::time::sleep(TICK).await;
                    continue;
                }
            };
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        let (me, grid) = (self.clone(), grid.clone());
                        let payload = n.payload().to_string();
                        tokio::spawn(async move { me.receive(&grid, &payload).await });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "lost the replica channel; listening again");
                        break;
                    }
                }
            }
        }
    }

    async fn upkeep(self: Arc<Self>, grid: Grid) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            every.tick().await;
            n += 1;
            let done = tokio::time::timeout(LEASE / 3, self.tick(&grid)).await;
            match done {
                Ok(Ok(())) => {
                    if !self.healthy.swap(true, Ordering::SeqCst) {
                        tracing::warn!("the database is back; taking work again");
                    }
                }
                Ok(Err(e)) => self.lost(&grid, &e.to_string()),
                Err(_) => self.lost(&grid, "the database did not answer in time"),
            }
            if n.is_multiple_of(120) {
                if let Err(e) = self.db.sweep(Duration::from_secs(3600)).await {
                    tracing::warn!(error = %e, "could not sweep the replica tables");
                }
            }
        }
    }

    /// The lease could not be renewed: stop taking work.
    fn lost(&self, grid: &Grid, why: &str) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            tracing::error!(
                why,
                "lost the database; refusing work and closing node sockets"
            );
            grid.lock().drop_sockets();
        }
    }

    /// Record the job before it is pushed to a node held here, so that
    /// the node's calls about it find this replica wherever they land. A
    /// job pushed to another replica's node is recorded by its push, in
    /// the same commit.
    pub async fn record_job(&self, job_id: &str) {
        if let Err(e) = self.mail.record_now(job_id.to_string()).await {
            tracing::error!(error = %e, job_id, "could not record the job's replica");
        }
    }

    /// Tell the replicas holding the client streams of `job_ids` that
    /// their node lists them as running (they are not offered again, nor
    /// failed as never picked up).
    pub fn relay_listed(self: &Arc<Self>, node_id: NodeId, job_ids: Vec<String>) {
        let me = self.clone();
        tokio::spawn(async move {
            let owners = match me.db.job_owners(&job_ids).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look up the replicas of listed jobs");
                    return;
                }
            };
            let mut by_replica: HashMap<String, Vec<String>> = HashMap::new();
            for (job, replica) in owners {
                if replica != me.id() {
                    by_replica.entry(replica).or_default().push(job);
                }
            }
            for (to, job_ids) in by_replica {
                let msg = Message::Listed {
                    node_id: node_id.to_string(),
                    job_ids,
                };
                me.post(&to, &msg);
            }
        });
    }

    /// Record a reservation made here in the shared table; false when its
    /// client holds `per_client` live ones already.
    pub async fn put_reservation(
        &self,
        token: &str,
        r: &Reservation,
        ttl: Duration,
        per_client: usize,
    ) -> Result<bool, crate::store::StoreError> {
        let stored = StoredReservation {
            node_id: r.node_id.to_string(),
            model: r.model.clone(),
            client: r.client.clone(),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        };
        let per_client = i64::try_from(per_client).unwrap_or(i64::MAX);
        self.db
            .put_reservation(&token_hash(token), &stored, per_client)
            .await
    }

    /// Bring a reservation made on any replica here, taking it out of the
    /// shared table (single use); nothing when it is here already or
    /// unknown.
    pub async fn fetch_reservation(
        &self,
        grid: &Grid,
        token: &str,
    ) -> Result<(), crate::store::StoreError> {
        if grid.lock().reservation(token, Instant::now()).is_some() {
            return Ok(());
        }
        let Some(r) = self.db.take_reservation(&token_hash(token)).await? else {
            return Ok(());
        };
        let Ok(node_id) = NodeId::parse(&r.node_id) else {
            return Ok(());
        };
        let ttl = Duration::from_millis(u64::try_from(r.ttl_ms).unwrap_or(0));
        grid.lock().put_reservation(
            token.to_string(),
            Reservation {
                node_id,
                model: r.model,
                expires: Instant::now() + ttl,
                client: r.client,
            },
        );
        Ok(())
    }

    /// Give the lease up (a clean stop).
    pub async fn leave(&self) {
        if let Err(e) = self.db.leave().await {
            tracing::warn!(error = %e, "could not give the replica lease up");
        }
    }
}

/// A message as its payload carries it.
fn encode(msg: &Message) -> String {
    serde_json::to_string(msg).unwrap_or_default()
}

/// What the shared table keeps of a reservation token.
fn token_hash(token: &str) -> String {
    hex::encode(secret_hash(token))
}

/// The status of a forwarded answer.
fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
}

#[cfg(test)]
mod tests {
    use super::{JobOwners, Message, REMEMBERED_OWNERS};

    #[test]
    fn job_owners_forget_the_oldest_first_and_keep_a_bounded_number() {
        let mut owners = JobOwners::default();
        for i in 0..REMEMBERED_OWNERS + 10 {
            owners.insert(format!("job-{i}"), format!("replica-{}", i % 3));
        }
        assert_eq!(owners.owner.len(), REMEMBERED_OWNERS);
        assert_eq!(owners.order.len(), REMEMBERED_OWNERS);
        assert_eq!(owners.get("job-9"), None);
        assert_eq!(owners.get("job-10").unwrap(), "replica-1");
        // A job pushed again keeps one place.
        owners.insert("job-10".into(), "replica-2".into());
        assert_eq!(owners.order.len(), REMEMBERED_OWNERS);
        assert_eq!(owners.get("job-10").unwrap(), "replica-2");
    }

    #[test]
    fn a_job_forgotten_and_pushed_again_keeps_its_new_place() {
        let mut owners = JobOwners::default();
        owners.insert("again".into(), "replica-a".into());
        owners.forget("again");
        assert_eq!(owners.get("again"), None);
        owners.insert("again".into(), "replica-b".into());
        // Its first place reaches the front: only that stale place goes.
        for i in 0..REMEMBERED_OWNERS - 1 {
            owners.insert(format!("job-{i}"), "replica-c".into());
        }
        assert_eq!(owners.get("again").unwrap(), "replica-b");
        assert_eq!(owners.get("job-0").unwrap(), "replica-c");
        assert_eq!(owners.owner.len(), REMEMBERED_OWNERS);
        // And its new place goes in its turn.
        owners.insert("one-more".into(), "replica-c".into());
        assert_eq!(owners.get("again"), None);
    }

    #[test]
    fn a_push_without_its_sender_still_reads() {
        let old = r#"{"t":"push","node_id":"n","job":{"id":"j","job_type":"inference","model":"m","input_payload":{}}}"#;
        match serde_json::from_str::<Message>(old) {
            Ok(Message::Push { from, job, .. }) => {
                assert_eq!(from, None);
                assert_eq!(job.id, "j");
            }
            other => panic!("{other:?}"),
        }
    }
}
