//! The node agent (`sgl node start`): attach to a coordinator, attest, then
//! heartbeat, hold the WebSocket and run the jobs it is offered.
//!
//! The order of things (PROTOCOL.md §6):
//! 1. register, or re-attach with the node id and token in `node.json`;
//! 2. challenge → verify-attestation, with hardware evidence when a source
//!    gives one (§7a) — a rejected evidence is an error, never a downgrade;
//! 3. heartbeat every interval (the job list and token rotation ride on it)
//!    and, beside it, the WebSocket push with reconnect back-off (§6.6);
//! 4. each job: parse and unseal (fail closed), run on the executor, seal and
//!    sign every chunk and the usage receipt, post, and report it in
//!    `active_job_ids` while it runs;
//! 5. on shutdown: go off-grid, finish in-flight jobs (bounded), leave.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::sync::mpsc;

use super::executor::{ExecError, ExecEvent, Executor};
use super::identity_files::{self, IdentityError, NodeFile};
use super::jobs::{self, ChatJob, JobError, Reply, StreamChunks};
use crate::proto::api::{
    Capabilities, ChallengeResponse, ChunkRequest, ChunkResponse, Evidence, FailRequest,
    HardwareReport, HeartbeatRequest, HeartbeatResponse, PendingJob, RegisterRequest,
    RegisterResponse, StatusRequest, VerifyAttestationRequest, VerifyAttestationResponse,
    WsMessage,
};
use crate::proto::headers;
use crate::proto::identity::{attestation_report_data, NodeId, NodeIdentity, KEY_VERSION};
use crate::proto::limits::{MAX_RESPONSE_BYTES, SEEN_JOBS};
use crate::proto::openai::{choices, Usage};
use crate::proto::routes;

/// Produces hardware evidence for 64 bytes of report data, or `None` when
/// this machine has no evidence source (the node then self-reports).
pub type EvidenceFn = dyn Fn(&[u8; 64]) -> Result<Option<Evidence>, String> + Send + Sync;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Holds keypair.json and node.json.
    pub config_dir: PathBuf,
    /// Coordinator base URL; when `None`, the `orchestrator_url` of node.json.
    pub coordinator: Option<String>,
    /// Single-use code from `sgl coordinator nodes invite` (not needed by a
    /// coordinator in development mode).
    pub registration_code: Option<String>,
    pub heartbeat_interval: Duration,
    /// On shutdown, in-flight jobs get this long to finish.
    pub drain_timeout: Duration,
    /// Hold the WebSocket for pushed jobs (the heartbeat stays the fallback).
    pub websocket: bool,
}

impl AgentConfig {
    pub fn new(config_dir: PathBuf) -> Self {
        AgentConfig {
            config_dir,
            coordinator: None,
            registration_code: None,
            heartbeat_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(60),
            websocket: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot reach the coordinator: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the coordinator answered {status} to {what}: {body}")]
    Refused {
        what: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("the coordinator sent an unreadable answer to {what}: {why}")]
    BadAnswer { what: &'static str, why: String },
    #[error("no evidence could be produced: {0}")]
    Evidence(String),
    #[error("node.json has no wallet address; run `sgl node init --wallet ADDRESS --force` or edit node.json")]
    NoWallet,
}

/// The live state shared by the agent's tasks.
struct Shared {
    http: reqwest::Client,
    base: String,
    dir: PathBuf,
    identity: NodeIdentity,
    node_id: NodeId,
    token: RwLock<String>,
    executor: Arc<dyn Executor>,
    running: Mutex<HashSet<String>>,
    /// Jobs taken and waiting for a slot: not yet running, so not listed
    /// as active, but not taken twice either.
    waiting: Mutex<HashSet<String>>,
    /// One permit a slot.
    slots: Arc<tokio::sync::Semaphore>,
    /// How long a job offered at capacity waits for a slot: the interval
    /// after which the coordinator would offer it again anyway.
    slot_wait: Duration,
    seen: Mutex<VecDeque<String>>,
    draining: AtomicBool,
}

impl Shared {
    fn token(&self) -> String {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Save a rotated token to node.json, then switch to it (§6.5): a token
    /// that could not be saved would be lost on restart.
    fn rotate_token(&self, new: &str) {
        let saved = identity_files::load_node_file(&self.dir).and_then(|mut f| {
            f.auth_token = Some(new.to_string());
            identity_files::save_node_file(&self.dir, &f)
        });
        match saved {
            Ok(()) => {
                *self.token.write().unwrap_or_else(|e| e.into_inner()) = new.to_string();
                tracing::info!("auth token rotated");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot save the rotated token; keeping the old one")
            }
        }
    }

    fn running_ids(&self) -> Vec<String> {
        let r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> = r.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// POST `body` to the route `template`, its `{id}` filled with `id` (a
    /// template without one ignores `id`).
    async fn post<B: serde::Serialize>(
        &self,
        template: &str,
        id: &str,
        body: &B,
    ) -> Result<reqwest::Response, reqwest::Error> {
        match self.request(template, id).json(body).send().await {
            // A kept-alive connection the coordinator closed as this request
            // went out fails before any answer: send it once more on a new
            // one. Every node call may be repeated (a repeated chunk is
            // answered again, a repeated result or failure is refused as
            // already ended), so a retry never bills or relays twice.
            Err(e) if e.is_connect() || (e.is_request() && !e.is_timeout()) => {
                tracing::debug!(error = %e, route = template, "request failed before an answer; retrying once");
                self.request(template, id).json(body).send().await
            }
            other => other,
        }
    }

    /// An authenticated POST to the route `template` (`{id}` filled with
    /// `id`), without a body yet.
    fn request(&self, template: &str, id: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{}", self.base, routes::path(template, id)))
            .header(headers::NODE_AUTH, self.token())
            .header(headers::NODE_ID, self.node_id.to_string())
    }

    /// Go on or off the grid (§6.11).
    async fn set_off_grid(&self, off_grid: bool) -> Result<reqwest::Response, reqwest::Error> {
        let id = self.node_id.to_string();
        self.post(routes::NODE_STATUS, &id, &StatusRequest { off_grid })
            .await
    }
}

async fn read_json<T: DeserializeOwned>(
    what: &'static str,
    resp: reqwest::Response,
) -> Result<T, AgentError> {
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(AgentError::BadAnswer {
            what,
            why: "answer too large".into(),
        });
    }
    if !status.is_success() {
        return Err(AgentError::Refused {
            what,
            status,
            body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| AgentError::BadAnswer {
        what,
        why: e.to_string(),
    })
}

/// The self-reported facts (§6.4); hardware evidence, when there is some,
/// travels beside them.
fn hardware_report(tee_type: &str) -> HardwareReport {
    let mut r = HardwareReport {
        tee_type: tee_type.to_string(),
        chip_model: std::env::consts::ARCH.to_string(),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        os_version: std::env::consts::OS.to_string(),
        kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        binary_hash: binary_hash().unwrap_or_default(),
        ..Default::default()
    };
    r.report_hash = r.compute_report_hash();
    r
}

/// Hex SHA-256 of the running binary (§6.5 `binary_hash`), computed once:
/// the binary does not change under a running process, and hashing it on
/// every heartbeat would stall the heartbeat itself.
pub fn binary_hash() -> Option<String> {
    static HASH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let exe = std::env::current_exe().ok()?;
        let mut f = std::fs::File::open(exe).ok()?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).ok()?;
        Some(hex::encode(h.finalize()))
    })
    .clone()
}

/// Run the agent until `shutdown` resolves, then drain and return.
pub async fn run(
    config: AgentConfig,
    executor: Arc<dyn Executor>,
    evidence: Option<Arc<EvidenceFn>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let identity = identity_files::load_identity(&config.config_dir)?;
    let file = identity_files::load_node_file(&config.config_dir)?;
    let base = config
        .coordinator
        .clone()
        .unwrap_or_else(|| file.orchestrator_url.clone());
    identity_files::check_coordinator_url(&base)?;
    let base = base.trim_end_matches('/').to_string();
    // Hash the binary off the async threads, before the first heartbeat.
    let _ = tokio::task::spawn_blocking(binary_hash).await;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        // Below the coordinator's 10 s idle timeout (src/http.rs): a pooled
        // connection is dropped here before the server may close it, so a
        // request seldom races the server's close.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;

    let (node_id, token) = attach(&http, &base, &config, &identity, &file, &*executor).await?;
    let shared = Arc::new(Shared {
        http,
        base,
        dir: config.config_dir.clone(),
        identity,
        node_id,
        token: RwLock::new(token),
        slots: Arc::new(tokio::sync::Semaphore::new(executor.slots().max(1) as usize)),
        executor,
        running: Mutex::new(HashSet::new()),
        waiting: Mutex::new(HashSet::new()),
        slot_wait: config.heartbeat_interval,
        seen: Mutex::new(VecDeque::new()),
        draining: AtomicBool::new(false),
    });
    attest(&shared, &file.tee_type, evidence.as_deref()).await?;
    // A start means "take work": undo the off-grid of the last shutdown.
    let on = shared.set_off_grid(false).await?;
    if !on.status().is_success() {
        return Err(AgentError::Refused {
            what: "on-grid",
            status: on.status(),
            body: on.text().await.unwrap_or_default(),
        });
    }
    tracing::info!(node_id = %shared.node_id, coordinator = %shared.base, "attested; taking jobs");

    let (jobs_tx, jobs_rx) = mpsc::channel::<PendingJob>(256);
    let dispatcher = tokio::spawn(dispatch(shared.clone(), jobs_rx));
    let beat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        jobs_tx.clone(),
        config.heartbeat_interval,
        file.tee_type.clone(),
        evidence.clone(),
    ));
    let ws = config
        .websocket
        .then(|| tokio::spawn(ws_loop(shared.clone(), jobs_tx.clone())));
    drop(jobs_tx);

    shutdown.await;
    tracing::info!("shutting down: going off-grid and finishing in-flight jobs");
    shared.draining.store(true, Ordering::SeqCst);
    let off = shared.set_off_grid(true).await;
    if let Err(e) = off {
        tracing::warn!(error = %e, "could not tell the coordinator the node is leaving");
    }
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    while !shared.running_ids().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = shared.running_ids();
    if !left.is_empty() {
        tracing::warn!(jobs = ?left, "drain timeout: leaving with jobs unfinished");
    }
    // The WebSocket closes last: the coordinator takes a closed socket for
    // the node's death and fails its jobs, so it stays open while they finish.
    if let Some(ws) = ws {
        ws.abort();
    }
    beat.abort();
    dispatcher.abort();
    Ok(())
}

/// Re-attach with the saved id and token, or register.
async fn attach(
    http: &reqwest::Client,
    base: &str,
    config: &AgentConfig,
    identity: &NodeIdentity,
    file: &NodeFile,
    executor: &dyn Executor,
) -> Result<(NodeId, String), AgentError> {
    if let (Some(id), Some(token)) = (&file.node_id, &file.auth_token) {
        if let Ok(node_id) = NodeId::parse(id) {
            let resp = http
                .get(format!(
                    "{base}{}",
                    routes::path(routes::NODE, &node_id.to_string())
                ))
                .header(headers::NODE_AUTH, token)
                .header(headers::NODE_ID, node_id.to_string())
                .send()
                .await?;
            match resp.status() {
                s if s.is_success() => {
                    tracing::info!(%node_id, "re-attached with the saved node id");
                    return Ok((node_id, token.clone()));
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                    tracing::warn!(%node_id, "the coordinator does not know this node any more; registering again")
                }
                status => {
                    return Err(AgentError::Refused {
                        what: "node info",
                        status,
                        body: resp.text().await.unwrap_or_default(),
                    })
                }
            }
        }
    }
    let wallet = file.wallet_address.clone().ok_or(AgentError::NoWallet)?;
    let report = hardware_report(&file.tee_type);
    let req = RegisterRequest {
        wallet_address: wallet,
        registration_code: config.registration_code.clone(),
        tee_type: file.tee_type.clone(),
        available_models: executor.models().into_iter().map(|m| m.name).collect(),
        public_key: identity.ed25519_public().to_b58(),
        cpu_cores: report.cpu_cores,
        ram_gb: 0.0,
        gpu_model: String::new(),
        supported_runtimes: vec!["candle".into()],
    };
    let resp = http
        .post(format!("{base}{}", routes::REGISTER))
        .json(&req)
        .send()
        .await?;
    let reg: RegisterResponse = read_json("register", resp).await?;
    let node_id = NodeId::parse(&reg.node_id).map_err(|e| AgentError::BadAnswer {
        what: "register",
        why: e.to_string(),
    })?;
    let mut saved = file.clone();
    saved.node_id = Some(reg.node_id.clone());
    saved.auth_token = Some(reg.auth_token.clone());
    identity_files::save_node_file(&config.config_dir, &saved)?;
    tracing::info!(%node_id, "registered");
    Ok((node_id, reg.auth_token))
}

/// Challenge → verify-attestation (§6.3, §6.4, §7a).
async fn attest(
    shared: &Shared,
    tee_type: &str,
    evidence: Option<&EvidenceFn>,
) -> Result<(), AgentError> {
    let id = shared.node_id;
    // No body (§6.3).
    let resp = shared
        .request(routes::CHALLENGE, &id.to_string())
        .send()
        .await?;
    let ch: ChallengeResponse = read_json("challenge", resp).await?;
    let x25519 = shared.identity.x25519_public();
    let ev = match evidence {
        Some(f) => {
            let rd = attestation_report_data(
                &id,
                &shared.identity.ed25519_public(),
                &x25519,
                KEY_VERSION,
                &ch.challenge,
            );
            f(&rd).map_err(AgentError::Evidence)?
        }
        None => None,
    };
    let body = VerifyAttestationRequest {
        signature: shared.identity.sign(ch.challenge.as_bytes()).to_b58(),
        encryption_public_key: x25519.to_b58(),
        hardware_report: hardware_report(tee_type),
        evidence: ev,
        key_version: Some(KEY_VERSION),
        encryption_public_key_signature: Some(
            shared.identity.sign_keybind(&id, KEY_VERSION).to_b58(),
        ),
    };
    let resp = shared
        .post(routes::VERIFY_ATTESTATION, &id.to_string(), &body)
        .await?;
    let v: VerifyAttestationResponse = read_json("verify-attestation", resp).await?;
    if !v.verified {
        return Err(AgentError::BadAnswer {
            what: "verify-attestation",
            why: format!("not verified (status {})", v.status),
        });
    }
    tracing::info!(level = ?v.attestation_level, "attestation accepted");
    Ok(())
}

fn heartbeat_body(shared: &Shared) -> HeartbeatRequest {
    let models = shared.executor.models();
    let slots = shared.executor.slots().max(1);
    let running = shared.running_ids();
    HeartbeatRequest {
        current_load: running.len() as f64 / slots as f64,
        available_models: if shared.draining.load(Ordering::SeqCst) {
            Vec::new()
        } else {
            models.iter().map(|m| m.name.clone()).collect()
        },
        encryption_public_key: Some(shared.identity.x25519_public().to_b58()),
        encryption_public_key_signature: Some(
            shared
                .identity
                .sign_keybind(&shared.node_id, KEY_VERSION)
                .to_b58(),
        ),
        key_version: Some(KEY_VERSION),
        capabilities: Capabilities {
            streaming: true,
            context_size: models.iter().map(|m| m.context_size).max(),
            signed_usage: Some(true),
            features: shared
                .executor
                .features()
                .into_iter()
                .map(String::from)
                .collect(),
        },
        active_job_ids: running,
        binary_hash: binary_hash(),
        max_concurrent_jobs: slots,
    }
}

async fn heartbeat_loop(
    shared: Arc<Shared>,
    jobs: mpsc::Sender<PendingJob>,
    interval: Duration,
    tee_type: String,
    evidence: Option<Arc<EvidenceFn>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let resp = match shared
            .post(routes::HEARTBEAT, "", &heartbeat_body(&shared))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                continue;
            }
        };
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            // The coordinator lost or revoked our standing: attest again.
            tracing::warn!("heartbeat refused; attesting again");
            if let Err(e) = attest(&shared, &tee_type, evidence.as_deref()).await {
                tracing::error!(error = %e, "re-attestation failed");
            }
            continue;
        }
        match read_json::<HeartbeatResponse>("heartbeat", resp).await {
            Ok(hb) => {
                if let Some(t) = hb.new_auth_token.as_deref() {
                    shared.rotate_token(t);
                }
                for job in hb.pending_jobs {
                    if jobs.send(job).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// The WebSocket push with back-off from 1 s doubling to 30 s (§6.6).
async fn ws_loop(shared: Arc<Shared>, jobs: mpsc::Sender<PendingJob>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let url = format!(
            "{}{}?{}={}",
            shared
                .base
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1),
            routes::path(routes::NODE_WS, &shared.node_id.to_string()),
            routes::WS_AUTH_QUERY,
            routes::encode_segment(&shared.token())
        );
        // Nagle off (the `true`): the node's frames on this socket are small
        // and latency-bound, like the coordinator's pushes to it.
        match tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await {
            Ok((socket, _)) => {
                backoff = Duration::from_secs(1);
                tracing::info!("WebSocket connected");
                let (mut sink, mut stream) = socket.split();
                use tokio_tungstenite::tungstenite::Message;
                while let Some(frame) = stream.next().await {
                    let text = match frame {
                        Ok(Message::Text(t)) => t,
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => continue,
                    };
                    match serde_json::from_str::<WsMessage>(&text) {
                        Ok(WsMessage::Job { job }) => {
                            let taken = jobs.send(job).await;
                            if taken.is_err() {
                                return;
                            }
                        }
                        Ok(WsMessage::Ping) => {
                            // §6.6 fixes these bytes: `{"type":"pong"}`.
                            let pong = match serde_json::to_string(&WsMessage::Pong) {
                                Ok(text) => Message::Text(text.into()),
                                Err(_) => continue,
                            };
                            if sink.send(pong).await.is_err() {
                                break;
                            }
                        }
                        Ok(WsMessage::TokenRotated { new_auth_token, .. }) => {
                            shared.rotate_token(&new_auth_token)
                        }
                        // Hello, acks, unknown and malformed frames are ignored.
                        _ => {}
                    }
                }
                tracing::warn!("WebSocket closed; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket connect failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Take offered jobs: each id once (over the last 1,024). A job offered
/// while every slot is busy waits for one, up to a heartbeat interval, and
/// starts the moment a slot frees: the coordinator frees its count of the
/// node's slot when the last chunk of a job arrives, a moment before this
/// side's job task ends, so at full load the next job often lands in that
/// gap. Left unstarted it would wait for the next heartbeat's re-offer
/// (seconds). A job still waiting after that is given up and offered again
/// (§6.5).
async fn dispatch(shared: Arc<Shared>, mut jobs: mpsc::Receiver<PendingJob>) {
    while let Some(job) = jobs.recv().await {
        if shared.draining.load(Ordering::SeqCst) {
            continue;
        }
        {
            let seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(&job.id) {
                continue;
            }
        }
        if !shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone())
        {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let id = job.id.clone();
            let slot = tokio::time::timeout(shared.slot_wait, shared.slots.clone().acquire_owned());
            let permit = slot.await;
            let started = match permit {
                Ok(Ok(permit)) if !shared.draining.load(Ordering::SeqCst) => {
                    shared
                        .running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone());
                    let mut seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.push_back(id.clone());
                    while seen.len() > SEEN_JOBS {
                        seen.pop_front();
                    }
                    Some(permit)
                }
                _ => None,
            };
            shared
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let Some(permit) = started else {
                tracing::debug!(job_id = %id, "no slot freed in time; left for the next offer");
                return;
            };
            run_job(&shared, job).await;
            shared
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            drop(permit);
        });
    }
}

async fn fail(shared: &Shared, job_id: &str, reason: &str) {
    fail_coded(shared, job_id, reason, None).await
}

/// Report a failure with its code (§7f: `bad_sealed_input` when the client's
/// sealed input is at fault).
async fn fail_coded(shared: &Shared, job_id: &str, reason: &str, code: Option<&str>) {
    tracing::warn!(job_id, reason, code, "job failed");
    let body = FailRequest {
        reason: reason.to_string(),
        code: code.map(str::to_string),
    };
    let r = shared.post(routes::JOB_FAIL, job_id, &body).await;
    if let Err(e) = r {
        tracing::warn!(job_id, error = %e, "could not report the failure");
    }
}

async fn run_job(shared: &Arc<Shared>, job: PendingJob) {
    // Opening the sealed input decodes base58, whose cost grows with the
    // square of its length: a long one off the async threads, which keep
    // the heartbeat, the WebSocket and the other jobs going.
    let parsed = {
        let shared = Arc::clone(shared);
        let job = job.clone();
        let size = job
            .input_payload
            .pointer("/enc/ciphertext")
            .and_then(serde_json::Value::as_str)
            .map_or(0, str::len);
        crate::cpu::run(size, move || jobs::parse_job(&shared.identity, &job, true)).await
    };
    let chat = match parsed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return fail_coded(shared, &job.id, &e.to_string(), e.fail_code()).await,
        Err(e) => {
            return fail(
                shared,
                &job.id,
                &format!("the job could not be opened: {e}"),
            )
            .await
        }
    };
    let events = match shared.executor.start(&chat) {
        Ok(rx) => rx,
        Err(ExecError::Busy) => {
            // Forget the id so the next offer is taken.
            shared
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|id| id != &job.id);
            return;
        }
        Err(e) => return fail(shared, &job.id, &e.to_string()).await,
    };
    tracing::info!(job_id = %job.id, model = %chat.model, "job started");
    let outcome = match chat.reply {
        Reply::Stream { .. } => run_stream(shared, &chat, events).await,
        _ => run_whole(shared, &chat, events).await,
    };
    match outcome {
        Ok(()) => tracing::info!(job_id = %job.id, "job done"),
        Err(reason) => fail(shared, &job.id, &reason).await,
    }
}

/// A job's usage as the node reports it. The cached prompt tokens ride as
/// OpenAI's `prompt_tokens_details.cached_tokens` (sgl extension on the
/// grid), only when the cache supplied some, so that a usage without them
/// keeps the shape the public SDKs know; the signature and the bill cover
/// the prompt and completion counts alone.
fn usage(prompt_tokens: u64, completion_tokens: u64, cached_tokens: u64) -> Usage {
    let u = Usage::new(prompt_tokens, completion_tokens);
    if cached_tokens == 0 {
        return u;
    }
    u.with_cached_tokens(cached_tokens.min(prompt_tokens))
}

/// A non-stream job: collect the text, then one signed `/complete`.
async fn run_whole(
    shared: &Shared,
    chat: &ChatJob,
    mut events: mpsc::Receiver<ExecEvent>,
) -> Result<(), String> {
    let mut text = String::new();
    let mut answers =
        choices::Answers::new(chat.choices.logprobs.is_some()).with_tools(chat.tools.clone());
    let (finish, usage) = loop {
        match events.recv().await {
            Some(ExecEvent::Token(t)) => text.push_str(&t),
            Some(ExecEvent::Piece {
                index,
                text: t,
                logprobs,
            }) => {
                if index == 0 {
                    text.push_str(&t);
                }
                answers.push(index, &t, logprobs);
            }
            Some(ExecEvent::ChoiceDone {
                index,
                finish,
                completion_tokens,
            }) => answers.done(
                index,
                finish,
                0,
                u32::try_from(completion_tokens).unwrap_or(u32::MAX),
                0,
            ),
            Some(ExecEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                break (
                    finish,
                    usage(prompt_tokens, completion_tokens, cached_tokens),
                )
            }
            Some(ExecEvent::Failed(why)) => return Err(format!("engine: {why}")),
            None => return Err("engine: the generation ended without a result".into()),
        }
    };
    // Every choice, for a job that asked for `n`, `logprobs` or tools.
    let all = if chat.is_structured() {
        answers.finish().map(|(c, _)| c)
    } else {
        None
    };
    // A first choice that called tools says so at the top too.
    let finish = all
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| c.finish_reason)
        .unwrap_or(finish);
    let body = jobs::complete_choices_body(&shared.identity, chat, &text, usage, finish, all)
        .map_err(|e| e.to_string())?;
    let resp = shared
        .post(routes::JOB_COMPLETE, &chat.job_id, &body)
        .await
        .map_err(|e| format!("posting the result: {e}"))?;
    if !resp.status().is_success() {
        // The coordinator already ended the job (timeout, client gone): not ours to fail.
        tracing::warn!(job_id = %chat.job_id, status = %resp.status(), "result refused");
    }
    Ok(())
}

/// Post one chunk; `Ok(true)` when the client is still there.
async fn post_chunk(shared: &Shared, job_id: &str, chunk: &ChunkRequest) -> bool {
    let resp = match shared.post(routes::JOB_CHUNK, job_id, chunk).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(job_id, error = %e, "posting a chunk failed");
            return false;
        }
    };
    if !resp.status().is_success() {
        tracing::warn!(job_id, status = %resp.status(), "chunk refused");
        return false;
    }
    match read_json::<ChunkResponse>("chunk", resp).await {
        Ok(r) => !r.closed,
        Err(_) => false,
    }
}

/// A sealed stream job: a signed chunk about every 6 tokens, then the final
/// chunk with the signed usage. When the client goes, stop and settle with
/// only the completion tokens delivered (§6.12).
async fn run_stream(
    shared: &Shared,
    chat: &ChatJob,
    mut events: mpsc::Receiver<ExecEvent>,
) -> Result<(), String> {
    let job_id = chat.job_id.as_str();
    let mut chunks = StreamChunks::new(&shared.identity, chat).map_err(|e| e.to_string())?;
    let seal_err = |e: JobError| e.to_string();
    loop {
        let event = events.recv().await;
        let next = match event {
            Some(ExecEvent::Token(t)) => chunks.push_token(&t).map_err(seal_err)?,
            Some(ExecEvent::Piece {
                index,
                text,
                logprobs,
            }) => chunks
                .push_piece(index, &text, logprobs)
                .map_err(seal_err)?,
            Some(ExecEvent::ChoiceDone { index, finish, .. }) => {
                chunks.push_choice_end(index, finish);
                None
            }
            Some(ExecEvent::Done {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            }) => {
                if let Some(c) = chunks.flush().map_err(seal_err)? {
                    if !post_chunk(shared, job_id, &c).await {
                        return settle(shared, chunks, job_id).await;
                    }
                }
                let last = chunks
                    .finish(usage(prompt_tokens, completion_tokens, cached_tokens))
                    .map_err(seal_err)?;
                post_chunk(shared, job_id, &last).await;
                return Ok(());
            }
            Some(ExecEvent::Failed(why)) => {
                tracing::warn!(job_id, why, "generation failed mid-stream");
                let aborted = shared
                    .post(routes::JOB_CHUNK, job_id, &ChunkRequest::abort())
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                return if aborted {
                    Ok(())
                } else {
                    Err(format!("engine: {why}"))
                };
            }
            None => return Err("engine: the generation ended without a result".into()),
        };
        if let Some(c) = next {
            if !post_chunk(shared, job_id, &c).await {
                drop(events);
                return settle(shared, chunks, job_id).await;
            }
        }
    }
}

/// The client went away: the settlement chunk bills only delivered tokens.
async fn settle(shared: &Shared, chunks: StreamChunks<'_>, job_id: &str) -> Result<(), String> {
    let delivered = chunks.tokens_sent();
    tracing::info!(job_id, delivered, "client gone; settling");
    let last = chunks
        .finish(Usage::new(0, delivered))
        .map_err(|e| e.to_string())?;
    post_chunk(shared, job_id, &last).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_ride_in_the_usage_only_when_there_are_some() {
        let none = serde_json::to_value(usage(40, 3, 0)).unwrap();
        assert!(none.get("prompt_tokens_details").is_none(), "{none}");
        let some = usage(40, 3, 32);
        assert_eq!(
            some.prompt_tokens_details.map(|d| d.cached_tokens),
            Some(32)
        );
        assert_eq!((some.prompt_tokens, some.total_tokens), (40, 43));
        // Never more than the prompt, whatever an engine says.
        let over = usage(40, 3, 64);
        assert_eq!(
            over.prompt_tokens_details.map(|d| d.cached_tokens),
            Some(40)
        );
    }

    #[test]
    fn heartbeat_always_carries_active_job_ids() {
        let body = serde_json::to_value(HeartbeatRequest::default()).unwrap();
        assert_eq!(body["active_job_ids"], serde_json::json!([]));
    }
}
