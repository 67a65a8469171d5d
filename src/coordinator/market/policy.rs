//! The attestation policy this coordinator verifies evidence against
//! (PROTOCOL.md §7b), published with its digest.

use axum::extract::State;
use axum::Json;
use serde_json::json;

use crate::coordinator::state::Grid;

/// `GET /grid/attestation/policy` (§7b): the policy evidence is verified
/// against, as canonical JSON, and its digest.
pub async fn policy(State(grid): State<Grid>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body: serde_json::Value =
        serde_json::from_str(&grid.config.policy.canonical_json()).unwrap_or_default();
    Json(json!({"policy": body, "policy_digest": grid.config.policy.digest()})).into_response()
}
