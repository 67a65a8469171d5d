//! The OpenAPI 3.1 documents of the binary's two HTTP servers: the
//! coordinator (client API, node API, payments, the compute plane, the
//! explorer) and the node's local server (`sgl node serve`). Each server
//! answers its own at [`crate::proto::routes::OPENAPI`]; `docs/openapi/`
//! holds the same text, and a test fails when the two differ.
//!
//! Schemas come from the wire types themselves (`utoipa::ToSchema`, derived
//! in [`crate::proto`]), so a field added to a body shows up here. The
//! operations are one table per server ([`coordinator`], [`node`]), next to
//! nothing else, because the routers are spread over several features and a
//! document must not change with the features a binary was built with.

mod build;
mod coordinator;
mod node;

use serde_json::Value;

/// The coordinator's document: every route it can serve. Routes that need
/// a flag (payments, the Machines API, code execution) are in it too; a
/// coordinator started without that flag answers them 404 `not_supported`.
pub fn coordinator() -> Value {
    coordinator::document()
}

/// The node's local server's document (`sgl node serve`).
pub fn node() -> Value {
    node::document()
}

/// A document as the servers send it and `docs/openapi/` keeps it: pretty
/// JSON with a final newline.
pub fn to_json(doc: &Value) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// `GET /openapi.json`, answering `doc`.
#[cfg(feature = "http-server")]
pub fn router<S: Clone + Send + Sync + 'static>(doc: Value) -> axum::Router<S> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let body: std::sync::Arc<str> = to_json(&doc).into();
    axum::Router::new().route(
        crate::proto::routes::OPENAPI,
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
        }),
    )
}
