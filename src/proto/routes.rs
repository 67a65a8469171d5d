//! Every HTTP path of the protocol (PROTOCOL.md §5, §6). Servers declare
//! their routes with these templates and clients fill them with [`path`], so
//! a path is spelled once.
//!
//! A template names its one path parameter `{id}`, the syntax the coordinator's
//! router takes as is.

// ------------------------------------------------------- client API (§5)

/// `POST`: pick a node and return its keys (§5.1).
pub const RESERVE: &str = "/v1/reserve";
/// `POST`: sealed or plain chat (§5.2); also the node's local server.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
/// `GET`: the OpenAI model list (§5.6); also the node's local server.
pub const MODELS: &str = "/v1/models";
/// `GET`: nodes serving a model, cheapest first (§5.5).
pub const PROVIDERS: &str = "/v1/providers";
/// `GET`: the capacity summary (§5.7).
pub const CAPACITY: &str = "/grid/capacity";
/// `GET`: the model table (§5.9).
pub const GRID_MODELS: &str = "/grid/models";
/// `GET`: the price table (§5.9).
pub const GRID_PRICING: &str = "/grid/pricing";
/// `GET` and `POST`: a node's prices (§5.8).
pub const NODE_PRICES: &str = "/grid/nodes/{id}/prices";
/// `GET`: a node's earnings, per day and model (node token or owner wallet).
pub const NODE_EARNINGS: &str = "/grid/nodes/{id}/earnings";
/// `GET`: a node's public evidence (§7b).
pub const NODE_EVIDENCE: &str = "/grid/nodes/{id}/attestation/evidence";
/// `GET`: the attestation proof of a job (§5.11).
pub const JOB_ATTESTATION: &str = "/grid/jobs/{id}/attestation";
/// `GET`: the coordinator's attestation policy.
pub const ATTESTATION_POLICY: &str = "/grid/attestation/policy";

// --------------------------------------------------------- node API (§6)

/// `POST`, unauthenticated (§6.2).
pub const REGISTER: &str = "/grid/nodes/register";
/// `POST` (§6.5).
pub const HEARTBEAT: &str = "/grid/nodes/heartbeat";
/// `GET`: the node's standing (§6.11).
pub const NODE: &str = "/grid/nodes/{id}";
/// `POST`, no body (§6.3).
pub const CHALLENGE: &str = "/grid/nodes/{id}/challenge";
/// `POST` (§6.4).
pub const VERIFY_ATTESTATION: &str = "/grid/nodes/{id}/verify-attestation";
/// `POST`: on or off the grid (§6.11).
pub const NODE_STATUS: &str = "/grid/nodes/{id}/status";
/// `GET`, upgraded to a WebSocket; the token rides in [`WS_AUTH_QUERY`] (§6.6).
pub const NODE_WS: &str = "/grid/nodes/{id}/ws";
/// The query parameter of [`NODE_WS`] that carries the node's token (§6.6).
pub const WS_AUTH_QUERY: &str = "auth_token";
/// `POST` (§6.8).
pub const JOB_COMPLETE: &str = "/grid/jobs/{id}/complete";
/// `POST` (§6.9, §6.10).
pub const JOB_CHUNK: &str = "/grid/jobs/{id}/chunk";
/// `POST` (§6.10).
pub const JOB_FAIL: &str = "/grid/jobs/{id}/fail";
/// `GET`, public (§6.11).
pub const ALLOWED_BINARIES: &str = "/grid/allowed-binaries";

// ------------------------------------------------------------ operations

/// `GET`: liveness, on the coordinator and the node's local server.
pub const HEALTH: &str = "/health";
/// `GET`: Prometheus metrics, on the coordinator and the node's local server.
pub const METRICS: &str = "/metrics";
/// `GET`: the server's OpenAPI 3.1 document, on the coordinator and the
/// node's local server (`docs/openapi/`).
pub const OPENAPI: &str = "/openapi.json";

// ------------------------------------- grid explorer (an extension of §5)

/// `GET`: the grid explorer page, on the coordinator (HTML; a request that
/// accepts JSON and not HTML gets §5.12's `not_supported`, as before).
pub const EXPLORER: &str = "/";
/// `GET`: the explorer's script and style sheet.
pub const EXPLORER_SCRIPT: &str = "/explorer/explorer.js";
pub const EXPLORER_STYLE: &str = "/explorer/explorer.css";
/// `GET`, no auth: what the explorer shows beside the public listings:
/// slots and load, every node with its verdict step by step, and recent
/// traffic and latency.
pub const EXPLORER_JSON: &str = "/grid/explorer.json";

/// A template with its `{id}` filled in, percent-encoded so that only
/// `A–Z a–z 0–9 - . _ ~` stay as they are (§1.2): an id a peer chose cannot
/// reach another path. Ids the protocol issues (UUIDs) come out unchanged.
pub fn path(template: &str, id: &str) -> String {
    template.replacen("{id}", &encode_segment(id), 1)
}

/// Percent-encode one path segment or query value, keeping only the
/// unreserved characters of RFC 3986.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fill_templates_and_are_encoded() {
        let id = "3f2b1c9e-0d4a-4e8b-9c1d-2a3b4c5d6e7f";
        assert_eq!(path(CHALLENGE, id), format!("/grid/nodes/{id}/challenge"));
        assert_eq!(
            path(JOB_CHUNK, "a/../b c"),
            "/grid/jobs/a%2F..%2Fb%20c/chunk"
        );
        assert_eq!(encode_segment("é~"), "%C3%A9~");
    }

    #[test]
    fn every_template_has_at_most_one_parameter() {
        for t in [
            NODE_PRICES,
            NODE_EVIDENCE,
            JOB_ATTESTATION,
            NODE,
            CHALLENGE,
            VERIFY_ATTESTATION,
            NODE_STATUS,
            NODE_WS,
            JOB_COMPLETE,
            JOB_CHUNK,
            JOB_FAIL,
        ] {
            assert_eq!(t.matches("{id}").count(), 1, "{t}");
            assert!(!path(t, "x").contains('{'), "{t}");
        }
    }
}
