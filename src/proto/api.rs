//! Serde types for every JSON body of PROTOCOL.md §5 (client API) and §6
//! (node API), with the sgl extensions of §7. Field names are the wire names;
//! optional fields are skipped when absent so that peers that do not know an
//! extension see the public shape. Unknown fields are ignored on input, as the
//! public SDKs and node do.
//!
//! Prices here are USD per 1M tokens as JSON numbers, because that is the wire
//! format; billing converts them to integer micro-units before any arithmetic.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::e2e::{EncEnvelope, SealedResult};
use super::openai::Usage;

// ------------------------------------------------------------ errors (§1.5)

/// The node API error body: `{"error": "<message>", "code": "<code>"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

// ------------------------------------------------------- client API (§5)

/// `POST /v1/reserve` request (§5.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReserveRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pay_in_coin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_count: Option<u32>,
    /// sgl extension §7c: `"hardware"` or `"self_reported"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_attestation: Option<String>,
    /// sgl extension: the request features ([`super::features`]) the sealed
    /// payload will ask for; only a node that advertises every one is
    /// reserved, since the coordinator cannot read a sealed request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `POST /v1/reserve` response (§5.1, §7c).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReserveResponse {
    pub reservation_token: String,
    pub node_id: String,
    pub node_x25519_pubkey: String,
    pub node_ed25519_pubkey: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_x25519_pubkey_sig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    pub tee_type: String,
    pub attestation_verified: bool,
    pub expires_in_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_level: Option<AttestationLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_url: Option<String>,
    /// sgl extension: the request features the reserved node advertises
    /// (`capabilities.features`); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// How far a node's attestation reaches (§7a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttestationLevel {
    Hardware,
    SelfReported,
    Simulated,
    None,
}

/// Sealed-mode `POST /v1/chat/completions` body (§5.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedChatRequest {
    pub reservation_token: String,
    pub enc: EncEnvelope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pay_in_coin: Option<bool>,
}

/// Sealed-mode non-stream response (§5.3.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub job_id: String,
    pub sealed_result: SealedResult,
    pub usage: Usage,
    pub result_envelope_signature: String,
    pub result_envelope_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
    /// sgl extension §7f: what a per-request payment (x402, MPP) credited
    /// back to the payer's credits, quote − cost, in µUSD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_micros: Option<u64>,
}

/// One sealed SSE event of a sealed stream (§5.3.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedSseChunk {
    pub seq: u64,
    #[serde(rename = "final")]
    pub is_final: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eph: Option<String>,
    pub ct: String,
    pub job: String,
    pub sig: String,
    pub sigv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
    /// sgl extension §7f, on the final chunk: what a per-request payment (x402, MPP) credited
    /// back to the payer's credits, quote − cost, in µUSD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_micros: Option<u64>,
}

/// The plaintext of a sealed non-stream reply (§3.5), compact JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedReplyPlaintext {
    pub content: String,
    pub model: String,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// sgl extension: every choice, OpenAI-shaped, when the job asked for
    /// `n` > 1 or `logprobs`; `content` is then the first choice's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<crate::proto::openai::Choice>>,
}

/// `GET /v1/providers` (§5.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProvidersResponse {
    pub model: String,
    pub cluster: Option<String>,
    pub count: usize,
    pub providers: Vec<Provider>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Provider {
    pub node_id: String,
    pub input_per_m: f64,
    pub output_per_m: f64,
    pub blended_per_1k: f64,
    pub is_custom: bool,
    pub reputation: i64,
    pub load: f64,
    pub max_concurrent_jobs: u32,
    pub tee_type: String,
    pub online: bool,
    /// sgl extension: the request features the node's engine implements
    /// (`capabilities.features` of its heartbeat); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `GET /grid/capacity`: the union of the OPENAPI and SDK shapes (§5.7).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CapacityResponse {
    pub total_nodes: u64,
    pub active_nodes: u64,
    pub available_nodes: u64,
    pub by_tee_type: Vec<TeeTypeCapacity>,
    pub updated_at: Option<String>,
    #[serde(default)]
    pub apple_nodes: u64,
    #[serde(default)]
    pub intel_nodes: u64,
    #[serde(default)]
    pub amd_nodes: u64,
    #[serde(default)]
    pub nvidia_nodes: u64,
    #[serde(default)]
    pub total_jobs: u64,
    #[serde(default)]
    pub jobs_completed: u64,
    #[serde(default)]
    pub jobs_submitted: u64,
    #[serde(default)]
    pub total_sgl_staked: u64,
    #[serde(default)]
    pub at_capacity: bool,
    #[serde(default)]
    pub models: Vec<ModelCapacity>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TeeTypeCapacity {
    pub tee_type: String,
    pub total_nodes: u64,
    pub active_nodes: u64,
    pub available_nodes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelCapacity {
    pub model: String,
    pub nodes: u64,
    pub busy_nodes: u64,
    pub free_slots: u64,
    pub at_capacity: bool,
}

/// A price pair in the camelCase of `GET /grid/nodes/{id}/prices` (§5.8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PricePair {
    #[serde(rename = "inputPerM")]
    pub input_per_m: f64,
    #[serde(rename = "outputPerM")]
    pub output_per_m: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodePricesResponse {
    pub node_id: String,
    pub prices: Vec<NodePriceEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodePriceEntry {
    pub model: String,
    pub reference: PricePair,
    pub floor: PricePair,
    pub ceiling: PricePair,
    pub custom: Option<PricePair>,
    pub effective: PricePair,
    pub cooldown_until: Option<String>,
}

/// `POST /grid/nodes/{id}/prices`: set (`input_per_m`, `output_per_m`) or `reset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetPriceRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_per_m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_per_m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetPriceResponse {
    pub ok: bool,
    pub price: NodePriceEntry,
}

/// `GET /grid/models` (§5.9): always an object, never a bare array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridModelsResponse {
    pub models: Vec<GridModel>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridModel {
    pub id: String,
    pub owned_by: String,
    pub sgl_node_count: u64,
    pub sgl_tee_types: Vec<String>,
    pub sgl_pricing: GridModelPricing,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridModelPricing {
    pub price_per_1k_input_tokens_usd: f64,
    pub price_per_1k_output_tokens_usd: f64,
}

/// `GET /grid/pricing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridPricingResponse {
    pub pricing: Vec<GridPricingEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GridPricingEntry {
    pub model: String,
    pub price_per_1k_input_tokens_usd: f64,
    pub price_per_1k_output_tokens_usd: f64,
}

/// `GET /grid/jobs/{id}/attestation`: PYSDK's `AttestationProof` (§5.11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttestationProof {
    pub node_id: String,
    pub tee_type: String,
    pub job_id: String,
    pub attestation_signature: String,
    /// A JSON text: `{"attestation_level","evidence_url","report_hash","policy_digest"}`.
    pub attestation_report: String,
    pub verified: bool,
    pub verified_at: Option<String>,
}

/// `GET /grid/nodes/{id}/attestation/evidence` (§7b).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvidenceResponse {
    pub node_id: String,
    pub key_version: u32,
    pub ed25519_pubkey: String,
    pub x25519_pubkey: String,
    pub keybind_signature: Option<String>,
    pub challenge: Option<String>,
    pub evidence: Option<Evidence>,
    pub verified_at: Option<String>,
    pub attestation_level: AttestationLevel,
    pub policy_digest: Option<String>,
}

// --------------------------------------------------------- node API (§6)

/// `POST /grid/nodes/register` (§6.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    pub wallet_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_code: Option<String>,
    pub tee_type: String,
    #[serde(default)]
    pub available_models: Vec<String>,
    pub public_key: String,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub ram_gb: f64,
    #[serde(default)]
    pub gpu_model: String,
    #[serde(default)]
    pub supported_runtimes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub node_id: String,
    pub auth_token: String,
}

/// `POST /grid/nodes/{id}/challenge` response (§6.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChallengeResponse {
    pub challenge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// `POST /grid/nodes/{id}/verify-attestation` (§6.4, §7a).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyAttestationRequest {
    pub signature: String,
    pub encryption_public_key: String,
    pub hardware_report: HardwareReport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_public_key_signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyAttestationResponse {
    pub verified: bool,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_level: Option<AttestationLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
}

/// The self-reported hardware facts (§6.4). Every field is the node's word.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HardwareReport {
    #[serde(default)]
    pub tee_type: String,
    #[serde(default)]
    pub chip_model: String,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub memory_gb: f64,
    #[serde(default)]
    pub secure_enclave: bool,
    #[serde(default)]
    pub sip_enabled: bool,
    #[serde(default)]
    pub os_version: String,
    #[serde(default)]
    pub kernel_version: String,
    #[serde(default)]
    pub boot_uuid: String,
    #[serde(default)]
    pub hardware_uuid: String,
    #[serde(default)]
    pub firmware_version: String,
    #[serde(default)]
    pub serial_hash: String,
    #[serde(default)]
    pub binary_hash: String,
    #[serde(default)]
    pub report_hash: String,
}

impl HardwareReport {
    /// The §6.4 `report_hash`: hex SHA-256 of the plain concatenation of the
    /// covered fields (not injective, but it is the public definition).
    pub fn compute_report_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.tee_type.as_bytes());
        h.update(self.chip_model.as_bytes());
        h.update(self.cpu_cores.to_le_bytes());
        h.update(self.hardware_uuid.as_bytes());
        h.update(self.firmware_version.as_bytes());
        h.update(self.boot_uuid.as_bytes());
        h.update(self.kernel_version.as_bytes());
        h.update([u8::from(self.secure_enclave)]);
        h.update([u8::from(self.sip_enabled)]);
        h.update(self.binary_hash.as_bytes());
        hex::encode(h.finalize())
    }
}

/// TEE evidence (§7a). `report` is base64; `certs` (SEV-SNP) and `collateral`
/// (TDX) are optional; `gpu` never changes the attestation level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evidence {
    pub format: String,
    pub report: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collateral: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Vec<Value>>,
}

/// `POST /grid/nodes/heartbeat` (§6.5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub current_load: f64,
    #[serde(default)]
    pub available_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_public_key_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Always sent, even empty.
    #[serde(default)]
    pub active_job_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_hash: Option<String>,
    #[serde(default)]
    pub max_concurrent_jobs: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Capabilities {
    #[serde(default)]
    pub streaming: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u64>,
    /// sgl extension §7d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_usage: Option<bool>,
    /// sgl extension: the request features the node's engine implements
    /// ([`super::features`]: `response_format`, `n`, `logprobs`). Absent on
    /// public nodes, older `sgl` nodes and the echo engine; the coordinator
    /// routes a request that needs one only to a node that lists it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

impl Capabilities {
    /// Whether the node advertises `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    pub status: String,
    #[serde(default)]
    pub pending_jobs: Vec<PendingJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_auth_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<String>,
}

/// A job offered to a node (§6.5, §6.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingJob {
    pub id: String,
    pub job_type: String,
    pub model: String,
    pub input_payload: Value,
}

/// The sealed shape of `input_payload` (§6.7): the client's `enc` unchanged,
/// the clear-text stream marker, and the token cap the payment was quoted
/// for (§7f), nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedInputPayload {
    pub enc: EncEnvelope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// §7f "The quote binds the node": the node generates at most
    /// min(sealed `max_tokens`, this) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_cap: Option<u64>,
}

/// WebSocket frames (§6.6, §7e), tagged by `type`. Unknown types are kept as
/// [`WsMessage::Unknown`] so that a newer peer never breaks this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsMessage {
    Job {
        job: PendingJob,
    },
    Ping,
    Pong,
    TokenRotated {
        new_auth_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_expires_at: Option<String>,
    },
    Hello {
        protocol: String,
        #[serde(default)]
        features: Vec<String>,
    },
    StreamChunk {
        job_id: String,
        #[serde(flatten)]
        chunk: ChunkRequest,
    },
    StreamChunkAck {
        job_id: String,
        seq: u64,
        ok: bool,
        closed: bool,
    },
    Error {
        #[serde(default)]
        job_id: Option<String>,
        #[serde(default)]
        seq: Option<u64>,
        error: String,
        #[serde(default)]
        code: Option<String>,
    },
    JobCompleteAck,
    JobFailedAck,
    #[serde(other)]
    Unknown,
}

/// `POST /grid/jobs/{id}/complete` (§6.8): plain or sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompleteRequest {
    /// Plain form: the compact JSON text of the result (not encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_result: Option<String>,
    /// Sealed form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_result: Option<SealedResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_envelope_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_envelope_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
}

/// `POST /grid/jobs/{id}/chunk` (§6.9), or the abort `{"error": true}` (§6.10).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChunkRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, rename = "final", skip_serializing_if = "Option::is_none")]
    pub is_final: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_envelope_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_envelope_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_signature: Option<String>,
    /// The abort form: exactly `{"error": true}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<bool>,
}

impl ChunkRequest {
    pub fn abort() -> Self {
        ChunkRequest {
            error: Some(true),
            ..Default::default()
        }
    }

    pub fn is_abort(&self) -> bool {
        self.error == Some(true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChunkResponse {
    pub ok: bool,
    pub closed: bool,
}

/// `POST /grid/jobs/{id}/fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailRequest {
    pub reason: String,
    /// Why, as a code: [`FAIL_BAD_SEALED_INPUT`] when the client's sealed
    /// input could not be opened or read (§7f), so the failure is the
    /// client's and not the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The `/fail` code of a sealed input the node cannot open (invalid base58,
/// wrong lengths, a low-order key, a failed tag) or read (§7f).
pub const FAIL_BAD_SEALED_INPUT: &str = "bad_sealed_input";

/// `POST /grid/nodes/{id}/status`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusRequest {
    pub off_grid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusResponse {
    pub ok: bool,
    pub off_grid: bool,
}

/// `GET /grid/nodes/{id}` (§6.11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfoResponse {
    pub status: String,
    pub attestation_verified: bool,
    pub reputation_score: i64,
    #[serde(alias = "total_jobs_completed")]
    pub jobs_completed: u64,
    #[serde(alias = "total_jobs_failed")]
    pub jobs_failed: u64,
}

/// `GET /grid/allowed-binaries`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AllowedBinaries {
    pub hashes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OkResponse {
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_frames_parse_and_unknown_types_survive() {
        let job: WsMessage = serde_json::from_str(
            r#"{"type":"job","job":{"id":"j","job_type":"inference","model":"m","input_payload":{"prompt":"x"}}}"#,
        )
        .unwrap();
        assert!(matches!(job, WsMessage::Job { .. }));
        assert_eq!(
            serde_json::from_str::<WsMessage>(r#"{"type":"ping"}"#).unwrap(),
            WsMessage::Ping
        );
        assert_eq!(
            serde_json::to_string(&WsMessage::Pong).unwrap(),
            r#"{"type":"pong"}"#
        );
        assert_eq!(
            serde_json::from_str::<WsMessage>(r#"{"type":"telemetry_v9","x":1}"#).unwrap(),
            WsMessage::Unknown
        );
        let chunk: WsMessage = serde_json::from_str(
            r#"{"type":"stream_chunk","job_id":"j","seq":2,"final":false,"ciphertext":"abc"}"#,
        )
        .unwrap();
        match chunk {
            WsMessage::StreamChunk { job_id, chunk } => {
                assert_eq!(job_id, "j");
                assert_eq!(chunk.seq, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sealed_sse_chunk_field_names() {
        let c = SealedSseChunk {
            seq: 0,
            is_final: false,
            eph: Some("e".into()),
            ct: "c".into(),
            job: "j".into(),
            sig: "s".into(),
            sigv: "v1".into(),
            usage: None,
            usage_signature: None,
            refunded_micros: None,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"seq":0,"final":false,"eph":"e","ct":"c","job":"j","sig":"s","sigv":"v1"}"#
        );
    }

    #[test]
    fn node_call_bodies_have_the_section_6_bytes() {
        assert_eq!(
            serde_json::to_string(&StatusRequest { off_grid: true }).unwrap(),
            r#"{"off_grid":true}"#
        );
        assert_eq!(
            serde_json::to_string(&FailRequest {
                reason: "engine: x".into(),
                code: None,
            })
            .unwrap(),
            r#"{"reason":"engine: x"}"#
        );
        // The public fields; the §7a extensions only when present.
        let v = serde_json::to_value(VerifyAttestationRequest {
            signature: "s".into(),
            encryption_public_key: "k".into(),
            hardware_report: HardwareReport::default(),
            evidence: None,
            key_version: None,
            encryption_public_key_signature: None,
        })
        .unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["encryption_public_key", "hardware_report", "signature"]
        );
    }

    #[test]
    fn abort_chunk_is_exactly_error_true() {
        assert_eq!(
            serde_json::to_string(&ChunkRequest::abort()).unwrap(),
            r#"{"error":true}"#
        );
    }

    #[test]
    fn report_hash_covers_the_listed_fields_only() {
        let mut r = HardwareReport {
            tee_type: "none".into(),
            cpu_cores: 16,
            ..Default::default()
        };
        let h = r.compute_report_hash();
        r.memory_gb = 64.0;
        r.os_version = "x".into();
        assert_eq!(r.compute_report_hash(), h);
        r.sip_enabled = true;
        assert_ne!(r.compute_report_hash(), h);
    }

    #[test]
    fn attestation_levels_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&AttestationLevel::SelfReported).unwrap(),
            r#""self_reported""#
        );
    }
}

// ------------------------------------------- node earnings (sgl, §7f)

/// Sums of a node's usage rows (`GET /grid/nodes/{id}/earnings`). Money is
/// integer micro-USD; `earned` is the operator share of `revenue`, and
/// `unpaid` = `earned` − `paid` (it includes `in_payout_batch`, the part in
/// a payout batch planned and not yet marked paid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EarningsTotals {
    pub jobs: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub revenue_micro_usd: u64,
    pub earned_micro_usd: u64,
    pub paid_micro_usd: u64,
    pub unpaid_micro_usd: u64,
    pub in_payout_batch_micro_usd: u64,
}

/// One UTC day of [`NodeEarningsResponse::by_day`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DayEarnings {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    #[serde(flatten)]
    pub totals: EarningsTotals,
}

/// One model of [`NodeEarningsResponse::by_model`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelEarnings {
    pub model: String,
    #[serde(flatten)]
    pub totals: EarningsTotals,
}

/// `GET /grid/nodes/{id}/earnings?days=N`: the node's lifetime totals, and
/// over the last `days` UTC days (today included) totals per day (days
/// with usage only, oldest first) and per model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeEarningsResponse {
    pub node_id: String,
    pub operator_wallet: String,
    pub days: u32,
    /// The first day of the window, `YYYY-MM-DD`.
    pub since: String,
    pub lifetime: EarningsTotals,
    pub window: EarningsTotals,
    pub by_day: Vec<DayEarnings>,
    pub by_model: Vec<ModelEarnings>,
}
