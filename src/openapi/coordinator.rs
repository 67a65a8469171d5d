//! The coordinator's operations (PROTOCOL.md §5, §6 and the sgl
//! extensions): the client API, the node API, payments and the compute
//! plane, the explorer and operations.

use serde_json::{json, Value};

use super::build::{add_metrics_and_document, any_object, text, Doc, Op};
use crate::proto::api::*;
use crate::proto::openai::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelList,
};
use crate::proto::routes;

const DESCRIPTION: &str = "The SGL grid coordinator: an OpenAI-compatible client API \
(sealed and plain chat), the node API, payments and credits, the compute plane and the \
grid explorer. Client errors have the OpenAI shape `{\"error\": {\"message\", \"type\", \
\"code\"}}`; node API errors are `{\"error\", \"code\"}`. A route this coordinator does \
not serve answers 404 with code `not_supported`. Routes under `/compute/` and \
`/api/x402/` are served only when the coordinator runs with a database, \
`--compute-provider` or `--code-exec`; otherwise they answer 404 `not_supported`.";

pub(super) fn document() -> Value {
    let mut d = Doc::default();
    client(&mut d);
    node_api(&mut d);
    payments(&mut d);
    compute(&mut d);
    operations(&mut d);
    d.finish(
        "SGL coordinator",
        DESCRIPTION,
        json!({
            "apiKey": {"type": "http", "scheme": "bearer",
                "description": "An API key (`sgl coordinator keys create`); \
                    `X-API-Key: <key>` is taken too."},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "walletSignature": {"type": "apiKey", "in": "header", "name": "X-Auth",
                "description": "A wallet signature over the request (EIP-191 or ed25519), \
                    with X-Auth-Address and X-Auth-Timestamp."},
            "nodeToken": {"type": "apiKey", "in": "header", "name": "X-Node-Auth",
                "description": "The token a node received at registration."},
            "payment": {"type": "apiKey", "in": "header", "name": "X-PAYMENT",
                "description": "An x402 payment (or `PAYMENT-SIGNATURE`, or an MPP \
                    `Authorization: Payment` credential)."},
        }),
    )
}

/// A 402's body: not the error shape.
fn payment_required(d: &mut Doc) -> Value {
    d.named(
        "PaymentRequired",
        any_object(
            "A 402 challenge: the x402 body (`x402Version`, `accepts`, `error`), an \
             `insufficient_credits` error, or an RFC 9457 problem for MPP credentials.",
        ),
    )
}

/// The client API (§5, §7).
fn client(d: &mut Doc) {
    let err = d.schema::<ErrorResponse>();
    let challenge = payment_required(d);
    let paid = &["apiKey", "apiKeyHeader", "walletSignature", "payment"];
    let reserve_req = d.schema::<ReserveRequest>();
    let reserve_resp = d.schema::<ReserveResponse>();
    d.add(
        "post",
        routes::RESERVE,
        Op::new(
            "reserve",
            "client",
            "Pick a node and return its keys (§5.1)",
        )
        .auth(paid)
        .body(reserve_req, true)
        .json(200, "The reserved node", reserve_resp)
        .payment_required(&challenge)
        .errors(&[400, 401, 403, 404, 413, 415, 422, 429, 503], &err),
    );

    let plain = d.schema::<ChatCompletionRequest>();
    let sealed = d.schema::<SealedChatRequest>();
    let plain_resp = d.schema::<ChatCompletionResponse>();
    let sealed_resp = d.schema::<SealedChatResponse>();
    let chunk = d.schema::<ChatCompletionChunk>();
    let sealed_chunk = d.schema::<SealedSseChunk>();
    let sse = d.named(
        "ChatEventStream",
        json!({"type": "string", "description": format!(
            "Server-sent events: `data: <chunk>` lines, each chunk a \
             ChatCompletionChunk (plain) or a SealedSseChunk (sealed), then `data: [DONE]`. \
             Chunk schemas: {} and {}.",
            chunk["$ref"].as_str().unwrap_or_default(),
            sealed_chunk["$ref"].as_str().unwrap_or_default())}),
    );
    d.add(
        "post",
        routes::CHAT_COMPLETIONS,
        Op::new(
            "chat_completions",
            "client",
            "Chat, sealed to a reserved node (§5.2) or plain (OpenAI's body)",
        )
        .describe(
            "A body with `enc` is sealed: it carries a reservation token and goes to \
             that node unread. Any other body is an OpenAI chat completion request, \
             run in plain mode and paid with an API key, credits or a payment.",
        )
        .auth(paid)
        .body(json!({"anyOf": [sealed, plain]}), true)
        .answer(
            200,
            "The answer; with `stream: true`, server-sent events",
            &[
                (
                    "application/json",
                    json!({"anyOf": [plain_resp, sealed_resp]}),
                ),
                ("text/event-stream", sse),
            ],
        )
        .payment_required(&challenge)
        .errors(
            &[400, 401, 403, 404, 409, 413, 415, 422, 429, 502, 503, 504],
            &err,
        ),
    );

    let models = d.schema::<ModelList>();
    d.add(
        "get",
        routes::MODELS,
        Op::new(
            "list_models",
            "client",
            "Models served by an active node (§5.6)",
        )
        .query(
            "type",
            "A model type; only chat models are served, so any type lists none",
            json!({"type": "string"}),
        )
        .json(200, "The OpenAI model list", models)
        .errors(&[400], &err),
    );
    let providers = d.schema::<ProvidersResponse>();
    d.add(
        "get",
        routes::PROVIDERS,
        Op::new(
            "list_providers",
            "client",
            "Nodes serving a model, cheapest first (§5.5)",
        )
        .query("model", "The model (required)", json!({"type": "string"}))
        .query(
            "cluster",
            "Only nodes of this cluster",
            json!({"type": "string"}),
        )
        .json(200, "The providers", providers)
        .errors(&[400], &err),
    );
    let capacity = d.schema::<CapacityResponse>();
    d.add(
        "get",
        routes::CAPACITY,
        Op::new("capacity", "client", "The grid's capacity (§5.7)").json(
            200,
            "Nodes, slots and models",
            capacity,
        ),
    );
    let grid_models = d.schema::<GridModelsResponse>();
    d.add(
        "get",
        routes::GRID_MODELS,
        Op::new("grid_models", "client", "The model table (§5.9)").json(
            200,
            "Models with their reference prices",
            grid_models,
        ),
    );
    let pricing = d.schema::<GridPricingResponse>();
    d.add(
        "get",
        routes::GRID_PRICING,
        Op::new("grid_pricing", "client", "The price table (§5.9)").json(
            200,
            "Prices per model",
            pricing,
        ),
    );
    let prices = d.schema::<NodePricesResponse>();
    d.add(
        "get",
        routes::NODE_PRICES,
        Op::new("node_prices", "client", "A node's prices (§5.8)")
            .json(200, "The node's prices per model", prices)
            .errors(&[400, 404], &err),
    );
    let set_req = d.schema::<SetPriceRequest>();
    let set_resp = d.schema::<SetPriceResponse>();
    d.add(
        "post",
        routes::NODE_PRICES,
        Op::new(
            "set_node_price",
            "client",
            "Set a node's price for a model (§5.8)",
        )
        .auth(&["nodeToken", "walletSignature"])
        .body(set_req, true)
        .json(200, "The price now in force", set_resp)
        .errors(&[400, 401, 403, 404, 413, 429], &err),
    );
    let earnings = d.schema::<NodeEarningsResponse>();
    d.add(
        "get",
        routes::NODE_EARNINGS,
        Op::new(
            "node_earnings",
            "client",
            "A node's earnings per day and model",
        )
        .auth(&["nodeToken", "walletSignature"])
        .query(
            "days",
            "Days back from today, 1 to 366 (default 30)",
            json!({"type": "integer", "minimum": 1, "maximum": 366}),
        )
        .json(200, "Earnings", earnings)
        .errors(&[400, 401, 403, 404, 503], &err),
    );
    let evidence = d.schema::<EvidenceResponse>();
    d.add(
        "get",
        routes::NODE_EVIDENCE,
        Op::new(
            "node_evidence",
            "client",
            "A node's public attestation evidence (§7b)",
        )
        .json(200, "The evidence and its verdict", evidence)
        .errors(&[400, 404], &err),
    );
    let proof = d.schema::<AttestationProof>();
    d.add(
        "get",
        routes::JOB_ATTESTATION,
        Op::new(
            "job_attestation",
            "client",
            "The attestation proof of a job (§5.11)",
        )
        .auth(&["apiKey", "apiKeyHeader", "walletSignature"])
        .json(200, "The proof", proof)
        .errors(&[400, 401, 403, 404], &err),
    );
    d.add(
        "get",
        routes::ATTESTATION_POLICY,
        Op::new(
            "attestation_policy",
            "client",
            "The coordinator's attestation policy",
        )
        .json(
            200,
            "The policy and its digest",
            json!({"type": "object", "required": ["policy", "policy_digest"],
                   "properties": {"policy": any_object("The policy, canonical"),
                                  "policy_digest": {"type": "string"}}}),
        ),
    );
}

/// The node API (§6): every route but registration takes the node's token.
fn node_api(d: &mut Doc) {
    let node_err = d.schema::<NodeError>();
    let client_err = d.schema::<ErrorResponse>();
    // A path that matches no route (an empty id) is the fallback's
    // `not_supported`, in the client shape.
    let err = d.named(
        "NodeApiError",
        json!({"anyOf": [node_err, client_err],
               "description": "`{\"error\", \"code\"}`; a path that matches no route \
                   gets the client API's `not_supported`"}),
    );
    let common = [400, 401, 403, 404, 409, 413, 415, 422, 429];
    let token = &["nodeToken"];
    let (req, resp) = (
        d.schema::<RegisterRequest>(),
        d.schema::<RegisterResponse>(),
    );
    d.add(
        "post",
        routes::REGISTER,
        Op::new("register_node", "node", "Register a node (§6.2)")
            .body(req, true)
            .json(200, "The node's id and token", resp)
            .errors(&common, &err),
    );
    let (req, resp) = (
        d.schema::<HeartbeatRequest>(),
        d.schema::<HeartbeatResponse>(),
    );
    d.add(
        "post",
        routes::HEARTBEAT,
        Op::new(
            "heartbeat",
            "node",
            "A node's heartbeat; pending jobs back (§6.5)",
        )
        .auth(token)
        .body(req, true)
        .json(200, "Pending jobs", resp)
        .errors(&common, &err),
    );
    let info = d.schema::<NodeInfoResponse>();
    d.add(
        "get",
        routes::NODE,
        Op::new("node_info", "node", "The node's standing (§6.11)")
            .auth(token)
            .json(200, "The node", info)
            .errors(&[400, 401, 403, 404], &err),
    );
    let challenge = d.schema::<ChallengeResponse>();
    d.add(
        "post",
        routes::CHALLENGE,
        Op::new(
            "attestation_challenge",
            "node",
            "A fresh attestation nonce (§6.3)",
        )
        .auth(token)
        .json(200, "The nonce", challenge)
        .errors(&[400, 401, 403, 404, 429], &err),
    );
    let (req, resp) = (
        d.schema::<VerifyAttestationRequest>(),
        d.schema::<VerifyAttestationResponse>(),
    );
    d.add(
        "post",
        routes::VERIFY_ATTESTATION,
        Op::new(
            "verify_attestation",
            "node",
            "Submit attestation evidence (§6.4)",
        )
        .auth(token)
        .body(req, true)
        .json(200, "The verdict", resp)
        .errors(&common, &err),
    );
    let (req, resp) = (d.schema::<StatusRequest>(), d.schema::<StatusResponse>());
    d.add(
        "post",
        routes::NODE_STATUS,
        Op::new("set_node_status", "node", "Go on or off the grid (§6.11)")
            .auth(token)
            .body(req, true)
            .json(200, "The status now", resp)
            .errors(&common, &err),
    );
    d.add(
        "get",
        routes::NODE_WS,
        Op::new(
            "node_websocket",
            "node",
            "The node's WebSocket for pushed jobs (§6.6)",
        )
        .describe("Upgraded to a WebSocket; the token rides in the `auth_token` query.")
        .query(
            routes::WS_AUTH_QUERY,
            "The node's token",
            json!({"type": "string"}),
        )
        .answer(101, "Switching to the WebSocket", &[])
        .errors(&[400, 401, 403, 404, 426], &err),
    );
    let (req, ok) = (d.schema::<CompleteRequest>(), d.schema::<OkResponse>());
    d.add(
        "post",
        routes::JOB_COMPLETE,
        Op::new("complete_job", "node", "A job's whole sealed result (§6.8)")
            .auth(token)
            .body(req, true)
            .json(200, "Accepted", ok.clone())
            .errors(&common, &err),
    );
    let (req, resp) = (d.schema::<ChunkRequest>(), d.schema::<ChunkResponse>());
    d.add(
        "post",
        routes::JOB_CHUNK,
        Op::new(
            "job_chunk",
            "node",
            "One sealed stream chunk of a job (§6.9)",
        )
        .auth(token)
        .body(req, true)
        .json(200, "Accepted", resp)
        .errors(&common, &err),
    );
    let req = d.schema::<FailRequest>();
    d.add(
        "post",
        routes::JOB_FAIL,
        Op::new("fail_job", "node", "A job the node could not run (§6.10)")
            .auth(token)
            .body(req, true)
            .json(200, "Accepted", ok)
            .errors(&common, &err),
    );
    let allowed = d.schema::<AllowedBinaries>();
    d.add(
        "get",
        routes::ALLOWED_BINARIES,
        Op::new(
            "allowed_binaries",
            "node",
            "Node binaries the grid accepts (§6.11)",
        )
        .json(200, "The list", allowed),
    );
}

/// API keys and credits (also served by `sgl compute serve`).
fn payments(d: &mut Doc) {
    let err = d.schema::<ErrorResponse>();
    let key = &["apiKey", "apiKeyHeader", "walletSignature"];
    let signed = &["walletSignature"];
    let challenge = payment_required(d);
    let paid_402 = |op: Op| op.payment_required(&challenge);
    d.add(
        "post",
        "/compute/api-keys",
        Op::new("create_api_key", "payments", "Mint an API key; shown once")
            .auth(signed)
            .body(any_object("`{\"name\"?}`"), false)
            .json(201, "The new key", any_object("`key`, `id`, `wallet`, …"))
            .errors(&[400, 401, 403, 404, 413, 415], &err),
    );
    d.add(
        "get",
        "/compute/api-keys",
        Op::new("list_api_keys", "payments", "The wallet's API keys")
            .auth(key)
            .json(200, "The keys, without their secrets", any_object("`keys`"))
            .errors(&[400, 401, 403, 404], &err),
    );
    d.add(
        "delete",
        "/compute/api-keys/{id}",
        Op::new("revoke_api_key", "payments", "Revoke an API key")
            .auth(signed)
            .json(200, "Revoked", any_object("`revoked`"))
            .errors(&[400, 401, 403, 404], &err),
    );
    d.add(
        "get",
        "/compute/credits/balance",
        Op::new("credit_balance", "payments", "The wallet's credits")
            .auth(key)
            .json(
                200,
                "The balance",
                any_object("`balance`, `balance_micros`, …"),
            )
            .errors(&[400, 401, 403, 404], &err),
    );
    d.add(
        "post",
        "/compute/credits/topup",
        paid_402(
            Op::new(
                "credit_topup",
                "payments",
                "Add credits with a payment (minimum $1)",
            )
            .auth(&["payment"])
            .body(any_object("`{\"amount\"}` in USD"), false)
            .json(200, "The new balance", any_object("`balance`, …"))
            .errors(&[400, 401, 403, 404, 413, 415, 502], &err),
        ),
    );
}

/// `POST /compute/provision`'s order: its fields and an example from the
/// Vultr catalogue, so that generated orders reach the provider. Which plans,
/// regions and images exist, and the bounds of `prepaid_hours`, come from
/// the catalogue and the server's flags.
fn provision_body() -> Value {
    let text =
        |max: u32, what: &str| json!({"type": "string", "maxLength": max, "description": what});
    json!({
        "type": "object",
        "required": ["plan", "region", "os_id"],
        "properties": {
            "plan": text(128, "A plan id from `GET /compute/plans`"),
            "region": text(64, "A region id from `GET /compute/regions`"),
            "os_id": {"type": "integer", "minimum": 0, "description": "An image id from `GET /compute/os`"},
            "label": text(64, "A name for the machine (printable characters)"),
            "prepaid_hours": {"type": "integer", "minimum": 0, "description": "Hours paid up front (the server's minimum when absent)"},
            "ssh_public_key": text(8192, "An OpenSSH public key line (required for DigitalOcean)"),
            "provider": {"type": "string", "enum": ["vultr", "digitalocean"]},
            "network": text(64, "The payment network"),
            "use_credits": {"type": "boolean", "description": "Pay from the wallet's credits"}
        },
        "example": {"plan": "vc2-1c-1gb", "region": "ewr", "os_id": 2284, "label": "build",
            "prepaid_hours": 24, "use_credits": true}
    })
}

/// The compute plane: the Machines API and code execution, each served
/// only with its flag.
fn compute(d: &mut Doc) {
    let err = d.schema::<ErrorResponse>();
    let challenge = payment_required(d);
    let owner = &["apiKey", "apiKeyHeader", "walletSignature", "payment"];
    let listing = |what: &str| any_object(what);
    d.add(
        "get",
        "/compute/plans",
        Op::new("compute_plans", "compute", "Machine plans with prices")
            .query(
                "type",
                "Only plans of this category",
                json!({"type": "string", "enum": ["vps", "vhp", "vdc", "vcg"]}),
            )
            .json(
                200,
                "Machine plans with prices",
                listing("Machine plans with prices"),
            )
            .errors(&[400, 404, 502, 503], &err),
    );
    for (path, id, summary) in [
        ("/compute/regions", "compute_regions", "Regions"),
        ("/compute/os", "compute_os", "Operating system images"),
    ] {
        d.add(
            "get",
            path,
            Op::new(id, "compute", summary)
                .json(200, summary, listing(summary))
                .errors(&[404, 502, 503], &err),
        );
    }
    let failing = [400, 401, 403, 404, 409, 413, 415, 502, 503];
    d.add(
        "post",
        "/compute/provision",
        Op::new(
            "compute_provision",
            "compute",
            "Rent a machine, paid up front",
        )
        .auth(owner)
        .body(provision_body(), true)
        .json(200, "The machine", listing("The instance"))
        .payment_required(&challenge)
        .errors(&failing, &err),
    );
    d.add(
        "get",
        "/compute/instances",
        Op::new("compute_instances", "compute", "The wallet's machines")
            .auth(owner)
            .json(200, "The machines", listing("`instances`"))
            .errors(&[400, 401, 403, 404, 502], &err),
    );
    d.add(
        "get",
        "/compute/instances/{id}",
        Op::new("compute_instance", "compute", "One machine")
            .auth(owner)
            .json(200, "The machine", listing("The instance"))
            .errors(&[400, 401, 403, 404, 502], &err),
    );
    d.add(
        "delete",
        "/compute/instances/{id}",
        Op::new("compute_destroy", "compute", "Destroy a machine")
            .auth(owner)
            .json(200, "Destroyed", listing("The instance"))
            .errors(&[400, 401, 403, 404, 409, 502], &err),
    );
    for (path, id, summary) in [
        (
            "/compute/instances/{id}/password",
            "compute_password",
            "A machine's root password, once",
        ),
        (
            "/compute/instances/{id}/extend",
            "compute_extend",
            "Pay for more hours",
        ),
        (
            "/compute/instances/{id}/resize",
            "compute_resize",
            "Move to a larger plan",
        ),
    ] {
        d.add(
            "post",
            path,
            Op::new(id, "compute", summary)
                .auth(owner)
                .body(any_object(summary), false)
                .json(200, summary, listing(summary))
                .payment_required(&challenge)
                .errors(&failing, &err),
        );
    }
    d.add(
        "post",
        "/api/x402/compute",
        Op::new(
            "code_execute",
            "compute",
            "Run code in a sandbox, paid per request",
        )
        .auth(&["payment", "apiKey", "apiKeyHeader"])
        .body(any_object("`language`, `code`, limits"), true)
        .json(
            200,
            "The run's output",
            listing("stdout, stderr, exit code"),
        )
        .payment_required(&challenge)
        .errors(&[400, 401, 403, 404, 408, 413, 415, 503], &err),
    );
    d.add(
        "get",
        "/.well-known/x402",
        Op::new("x402_discovery", "compute", "The x402 discovery document")
            .json(
                200,
                "Resources and ownership proofs",
                listing("The document"),
            )
            .errors(&[404], &err),
    );
}

/// Liveness, metrics, the explorer and this document.
fn operations(d: &mut Doc) {
    let err = d.schema::<ErrorResponse>();
    d.add(
        "get",
        routes::HEALTH,
        Op::new("health", "operations", "Liveness").answer(200, "`ok`", &[("text/plain", text())]),
    );
    add_metrics_and_document(d);
    d.add(
        "get",
        routes::EXPLORER,
        Op::new("explorer_page", "explorer", "The grid explorer page")
            .describe("HTML for browsers; a client that accepts JSON and not HTML gets 404 `not_supported`.")
            .answer(200, "The page", &[("text/html", text())])
            .errors(&[404], &err),
    );
    d.add(
        "get",
        routes::EXPLORER_SCRIPT,
        Op::new("explorer_script", "explorer", "The explorer's script").answer(
            200,
            "JavaScript",
            &[("text/javascript", text())],
        ),
    );
    d.add(
        "get",
        routes::EXPLORER_STYLE,
        Op::new("explorer_style", "explorer", "The explorer's style sheet").answer(
            200,
            "CSS",
            &[("text/css", text())],
        ),
    );
    d.add(
        "get",
        routes::EXPLORER_JSON,
        Op::new("explorer_data", "explorer", "What the explorer shows").json(
            200,
            "Slots and load, nodes with their verdicts, recent traffic and latency",
            any_object("The explorer's data"),
        ),
    );
}
