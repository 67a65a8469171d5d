//! The two error edges of the coordinator: the OpenAI shape for clients
//! (`{"error": {"message", "type", "code"}}`) and `{"error", "code"}` for nodes
//! (PROTOCOL.md §1.5). Internal details go to the log, never into a body.
//!
//! Every error leaves in one of the two shapes: handlers return these types,
//! node JSON bodies are read with [`NodeJson`], whose rejections are node
//! errors, an unknown route is §5.12's `not_supported`, and what axum answers
//! on its own (another extractor's rejection, the body limit's 413, a wrong
//! method) is rewritten by [`client_edge`] or [`node_edge`].

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, Method, StatusCode, Uri};
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
    /// The request parameter at fault (OpenAI's `param`), when one is.
    pub param: Option<String>,
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
            param: None,
            extra: None,
        }
    }

    /// The same error naming the parameter at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
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
        Self {
            param: Some(e.param()),
            ..Self::new(status, InvalidRequest::KIND, e.code(), e.to_string())
        }
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        let body = ErrorResponse::new(self.message, self.kind, self.code).with_param(self.param);
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

impl From<JsonRejection> for NodeApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        NodeApiError::new(status, code_for(status), rejection.body_text())
    }
}

/// A JSON request body on the node API: a body that is not JSON, not of the
/// expected shape, not labelled `application/json` or over the size limit is
/// answered as a [`NodeApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeJson<T>(pub T);

impl<S, T> FromRequest<S> for NodeJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = NodeApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(NodeJson(value))
    }
}

/// The error code of a status axum answered on its own.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::NOT_FOUND => "not_supported",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal_error",
        _ => "invalid_request",
    }
}

/// The client-API error type of a status.
fn kind_for(status: StatusCode) -> &'static str {
    match status {
        s if s.is_server_error() => "server_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        _ => "invalid_request_error",
    }
}

/// An error response that is not JSON yet: its status and its message (the
/// rejection's text; a generic one for server errors).
async fn unshaped(resp: Response) -> Result<(StatusCode, String), Response> {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    if (!status.is_client_error() && !status.is_server_error()) || is_json {
        return Err(resp);
    }
    // Rejection texts are short; a longer body is not one of them.
    const MAX_MESSAGE_BYTES: usize = 4096;
    let text = axum::body::to_bytes(resp.into_body(), MAX_MESSAGE_BYTES)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty() && !status.is_server_error());
    let message = text.unwrap_or_else(|| {
        if status.is_server_error() {
            "internal error".to_string()
        } else {
            status
                .canonical_reason()
                .unwrap_or("invalid request")
                .to_lowercase()
        }
    });
    Ok((status, message))
}

/// Middleware of the client API: an error answered outside the handlers
/// (rejections, the body limit, a wrong method) in the client shape.
pub async fn client_edge(resp: Response) -> Response {
    match unshaped(resp).await {
        Ok((status, message)) => {
            ClientError::new(status, kind_for(status), code_for(status), message).into_response()
        }
        Err(resp) => resp,
    }
}

/// Middleware of the node API: the same, in the node shape.
pub async fn node_edge(resp: Response) -> Response {
    match unshaped(resp).await {
        Ok((status, message)) => {
            NodeApiError::new(status, code_for(status), message).into_response()
        }
        Err(resp) => resp,
    }
}

/// Any route this coordinator does not serve: 404 `not_supported` (§5.12).
pub async fn not_supported(method: Method, uri: Uri) -> ClientError {
    let path: String = uri.path().chars().take(128).collect();
    ClientError::not_found(
        "not_supported",
        format!("{method} {path} is not supported by this coordinator"),
    )
}

/// The body of an error response, for tests.
#[cfg(test)]
pub(crate) async fn body_json(resp: Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("a readable body");
    serde_json::from_slice(&bytes).expect("a JSON body")
}
