//! The two error edges of the coordinator: the OpenAI shape for clients
//! (`{"error": {"message", "type", "code"}}`) and `{"error", "code"}` for nodes
//! (PROTOCOL.md §1.5). Internal details go to the log, never into a body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::proto::api::NodeError;
use crate::proto::openai::{ErrorResponse, InvalidRequest};

/// An error answered to a client.
#[derive(Debug)]
pub struct ClientError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    /// Keys added beside `error` at the top of the body (e.g. `retry_after_s`,
    /// the x402 `accepts` of a 402).
    /// Boxed: it is rare, and keeps `Result<_, ClientError>` small.
    pub extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl ClientError {
    pub fn with_extra(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), value);
        self
    }

    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ClientError {
            status,
            kind,
            code,
            message: message.into(),
            extra: None,
        }
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }
    pub fn no_capacity() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_capacity",
            "every eligible node is busy; retry shortly",
        )
    }
    pub fn node_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "node_failed",
            message,
        )
    }
    pub fn node_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "node_timeout",
            "the node did not answer in time",
        )
    }
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal error",
        )
    }
}

/// A refused chat request: the status and code every client-facing server
/// gives it (the node's local server too).
impl From<InvalidRequest> for ClientError {
    fn from(e: InvalidRequest) -> Self {
        let status =
            StatusCode::from_u16(InvalidRequest::STATUS).unwrap_or(StatusCode::BAD_REQUEST);
        Self::new(
            status,
            InvalidRequest::KIND,
            InvalidRequest::CODE,
            e.to_string(),
        )
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        let body = ErrorResponse::new(self.message, self.kind, self.code);
        let Some(extra) = self.extra else {
            return (self.status, Json(body)).into_response();
        };
        let mut value = serde_json::to_value(body).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut resp = (self.status, Json(value)).into_response();
        if let Some(secs) = extra.get("retry_after_s").and_then(|v| v.as_u64()) {
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// An error answered to a node.
#[derive(Debug)]
pub struct NodeApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl NodeApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        NodeApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid X-Node-Auth",
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl IntoResponse for NodeApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(NodeError {
                error: self.message,
                code: Some(self.code.to_string()),
            }),
        )
            .into_response()
    }
}
