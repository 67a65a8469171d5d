//! The node's local OpenAI-compatible server (`sgl node serve`): chat
//! completions (JSON and SSE), the model list, health and Prometheus metrics,
//! straight from the in-process engine. No coordinator, no sealing: it listens
//! on loopback by default.
//!
//! What answers is a [`Backend`]: the candle engine, or an [`Executor`] — the
//! echo load-test engine (`--engine echo`), which answers instantly so that a
//! benchmark of this server against the coordinator in front of an echo node
//! measures the coordinator, not the model. Its answers are not model output.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::executor::{ExecError, ExecEvent, Executor, ServedModel};
use super::jobs;
use crate::engine::{
    Engine, EngineConfig, EngineHandle, EventReceiver, GenerationEvent, GenerationRequest,
    SubmitError,
};
use crate::proto::job::JobPayload;
use crate::proto::openai::{choices, tools};
use crate::proto::openai::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Delta, ErrorResponse,
    InvalidRequest, ModelEntry, ModelList,
};
use crate::proto::routes;

/// Default cap on a request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// What answers the requests.
#[derive(Clone)]
pub enum Backend {
    /// The candle engine.
    Engine(EngineHandle),
    /// An executor of the node agent; in practice the echo load-test engine.
    Executor(Arc<dyn Executor>),
}

impl Backend {
    /// The models served; the first is the default.
    fn models(&self) -> Vec<ServedModel> {
        match self {
            Backend::Engine(e) => super::engine_executor::served_models(e),
            Backend::Executor(x) => x.models(),
        }
    }

    /// The model a request without `model` gets.
    fn default_model(&self) -> String {
        match self {
            Backend::Engine(e) => e.info().id.clone(),
            Backend::Executor(x) => x
                .models()
                .into_iter()
                .next()
                .map(|m| m.name)
                .unwrap_or_default(),
        }
    }
}

/// What the server answers with once started.
pub enum Source {
    /// Load this model into the candle engine, in the background (503 until
    /// it has loaded).
    Engine(EngineConfig),
    /// An executor that is ready at once (the echo load-test engine).
    Executor(Arc<dyn Executor>),
}

/// The server's state: the backend once it is ready.
#[derive(Default)]
pub struct LocalState {
    backend: OnceLock<Backend>,
    load_error: Mutex<Option<String>>,
}

impl LocalState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Hand the server its backend; `/health` turns 200.
    pub fn set_backend(&self, backend: Backend) {
        let _ = self.backend.set(backend);
    }

    pub fn backend(&self) -> Option<&Backend> {
        self.backend.get()
    }

    fn set_error(&self, e: String) {
        if let Ok(mut g) = self.load_error.lock() {
            *g = Some(e);
        }
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorResponse::new(message, kind, code))).into_response()
}

fn bad_request(code: &str, message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn loading() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_loading",
        "the model is still loading",
    )
}

fn now_secs() -> u64 {
    crate::clock::Clock::system().now_secs()
}

/// The routes, for embedding in another server or a test. Every error
/// leaves as OpenAI JSON: an unknown route is 404 `not_supported`, and what
/// axum answers on its own (a wrong method) is rewritten by [`json_edge`].
pub fn router(state: Arc<LocalState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(routes::CHAT_COMPLETIONS, post(chat_completions))
        .route(routes::MODELS, get(models))
        .route(routes::HEALTH, get(health))
        .route(routes::METRICS, get(metrics))
        .merge(crate::openapi::router(crate::openapi::node()))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .fallback(not_supported)
        .layer(axum::middleware::map_response(
            crate::http::openai_json_edge,
        ))
        .with_state(state)
}

async fn not_supported(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path: String = uri.path().chars().take(128).collect();
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_supported",
        format!("{method} {path} is not served here"),
    )
}

/// Serve on `listener` until `shutdown` resolves. With [`Source::Engine`] the
/// routes answer at once (503 while loading) and the model loads in the
/// background; an error is returned if it cannot be loaded.
pub async fn serve(
    listener: TcpListener,
    source: Source,
    max_body_bytes: usize,
    limits: crate::http::ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = LocalState::new();
    let app = router(state.clone(), max_body_bytes);
    let config = match source {
        Source::Executor(x) => {
            state.set_backend(Backend::Executor(x));
            crate::http::serve(listener, app, limits, shutdown).await?;
            return Ok(());
        }
        Source::Engine(config) => config,
    };
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || match Engine::load(config) {
            Ok(engine) => {
                tracing::info!(model = %engine.info().id, secs = engine.info().load_seconds, "model loaded");
                state.set_backend(Backend::Engine(engine));
                Ok(())
            }
            Err(e) => {
                state.set_error(e.to_string());
                Err(e)
            }
        })
    };
    let server = crate::http::serve(listener, app, limits, shutdown);
    let server = tokio::spawn(server);
    match loader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            server.abort();
            return Err(anyhow::Error::new(e).context("loading the model"));
        }
        Err(e) => {
            server.abort();
            return Err(anyhow::anyhow!("the model loader failed: {e}"));
        }
    }
    server.await??;
    Ok(())
}

async fn health(State(state): State<Arc<LocalState>>) -> Response {
    match state.backend() {
        Some(b) => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "model": b.default_model()})),
        )
            .into_response(),
        None => {
            let err = state.load_error.lock().ok().and_then(|g| g.clone());
            let body = match err {
                Some(e) => serde_json::json!({"status": "error", "error": e}),
                None => serde_json::json!({"status": "loading"}),
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn models(State(state): State<Arc<LocalState>>) -> Response {
    let Some(backend) = state.backend() else {
        return loading();
    };
    let data = backend
        .models()
        .into_iter()
        .map(|m| ModelEntry {
            id: m.name,
            object: "model".into(),
            created: 0,
            owned_by: "sgl".into(),
            context_window: Some(m.context_size),
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

const READY_HELP: &str =
    "# HELP sgl_engine_ready 1 once the model has loaded.\n# TYPE sgl_engine_ready gauge\n";

async fn metrics(State(state): State<Arc<LocalState>>) -> Response {
    let body = match state.backend() {
        Some(Backend::Engine(e)) => {
            let mut s = e.metrics().render_prometheus(&e.info().id);
            s.push_str(READY_HELP);
            s.push_str("sgl_engine_ready 1\n");
            s
        }
        // The echo engine keeps no engine metrics: it runs no model.
        Some(Backend::Executor(_)) => format!("{READY_HELP}sgl_engine_ready 1\n"),
        None => format!("{READY_HELP}sgl_engine_ready 0\n"),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::QueueFull { retry_after_secs } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                e.to_string(),
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        SubmitError::InvalidRequest(m) => bad_request("invalid_request", m),
        e @ SubmitError::ContextLengthExceeded { .. } => {
            bad_request("context_length_exceeded", e.to_string())
        }
        SubmitError::Stopped => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "engine_stopped",
            "the engine has stopped",
        ),
    }
}

fn exec_error(e: ExecError) -> Response {
    match e {
        ExecError::Busy => submit_error(SubmitError::QueueFull {
            retry_after_secs: 1,
        }),
        ExecError::UnknownModel(m) => {
            bad_request("model_not_found", format!("model {m:?} is not served here"))
        }
        ExecError::Invalid(m) => bad_request("invalid_request", m),
    }
}

async fn chat_completions(
    State(state): State<Arc<LocalState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            // Over the size limit: 413; a body that could not be read: 400.
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request_too_large"
            } else {
                "invalid_body"
            };
            let kind = "invalid_request_error";
            return error(status, kind, code, format!("cannot read the body: {e}"));
        }
    };
    let Some(backend) = state.backend() else {
        return loading();
    };
    let req: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request("invalid_json", format!("invalid JSON body: {e}")),
    };
    // The one check of a client's request, before any engine sees it, so
    // that every engine (and the coordinator) answers a body alike.
    if let Err(e) = req.validate() {
        let status =
            StatusCode::from_u16(InvalidRequest::STATUS).unwrap_or(StatusCode::BAD_REQUEST);
        return (status, Json(e.to_response())).into_response();
    }
    let id = backend.default_model();
    if !req.model.is_empty() && req.model != id {
        return bad_request(
            "model_not_found",
            format!(
                "model {:?} is not served here; this node serves {id:?}",
                req.model
            ),
        );
    }
    let completion_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let choices = req.choice_params();
    // `validate` passed, so this reads.
    let tools = req.tool_spec().ok().flatten();
    let rx = match backend {
        Backend::Engine(engine) => {
            let gen = match GenerationRequest::from_openai(&req) {
                Ok(g) => g,
                Err(e) => return submit_error(e),
            };
            match engine.submit_n(gen) {
                Ok(rx) => Events::engine(rx),
                Err(e) => return submit_error(e),
            }
        }
        // The echo engine runs no model: it has no logprobs, one answer
        // and calls no tools.
        Backend::Executor(_) if choices.is_extended() || tools.is_some() => {
            let (param, accepted) = if tools.is_some() {
                ("tools", "no tools on the echo engine")
            } else if choices.n > 1 {
                ("n", "1 completion without logprobs on the echo engine")
            } else {
                (
                    "logprobs",
                    "1 completion without logprobs on the echo engine",
                )
            };
            let e = InvalidRequest::Unsupported { param, accepted };
            let status =
                StatusCode::from_u16(InvalidRequest::STATUS).unwrap_or(StatusCode::BAD_REQUEST);
            return (status, Json(e.to_response())).into_response();
        }
        Backend::Executor(x) => {
            // The payload a plain grid job would carry, read by the same
            // rules, so the executor sees the request it would see behind a
            // coordinator.
            let payload = JobPayload::from_openai(&req, req.effective_max_tokens(), None);
            let job = match jobs::plain_job(&completion_id, &id, &payload) {
                Ok(j) => j,
                Err(e) => return bad_request("invalid_request", e.to_string()),
            };
            match x.start(&job) {
                Ok(rx) => Events::Executor(rx),
                Err(e) => return exec_error(e),
            }
        }
    };
    let created = now_secs();
    let wants_logprobs = choices.logprobs.is_some();
    let splitter = tools::DeltaSplitter::new(tools.clone());
    if req.is_stream() {
        stream_response(
            rx,
            completion_id,
            created,
            id,
            req.include_usage(),
            splitter,
        )
    } else {
        let answers = choices::Answers::new(wants_logprobs).with_tools(tools);
        json_response(rx, completion_id, created, id, answers).await
    }
}

/// A request's events, from whichever backend runs it, each with the index
/// of its choice. Dropping it drops the backend's receivers, which cancels
/// the request and frees its slots.
enum Events {
    /// One receiver per choice, merged as events come.
    Engine(futures_util::stream::SelectAll<IndexedEvents>),
    Executor(mpsc::Receiver<ExecEvent>),
}

type IndexedEvents =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = (u32, GenerationEvent)> + Send>>;

impl Events {
    fn engine(rxs: Vec<EventReceiver>) -> Self {
        let streams = rxs.into_iter().zip(0u32..).map(|(rx, i)| {
            let s = futures_util::stream::unfold(rx, move |mut rx| async move {
                rx.recv().await.map(|ev| ((i, ev), rx))
            });
            Box::pin(s) as IndexedEvents
        });
        Events::Engine(futures_util::stream::select_all(streams))
    }

    /// The next event of any choice; `None` once every choice's receiver
    /// has ended.
    async fn recv(&mut self) -> Option<(u32, GenerationEvent)> {
        use futures_util::StreamExt;
        match self {
            Events::Engine(rx) => rx.next().await,
            Events::Executor(rx) => rx.recv().await.map(|ev| (0, GenerationEvent::from(ev))),
        }
    }
}

async fn json_response(
    mut rx: Events,
    cid: String,
    created: u64,
    model: String,
    mut answers: choices::Answers,
) -> Response {
    let fail = |message: String| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "engine_error",
            message,
        )
    };
    while let Some((index, ev)) = rx.recv().await {
        match ev {
            GenerationEvent::Token { text, logprobs } => answers.push(index, &text, logprobs),
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => answers.done(
                index,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            ),
            GenerationEvent::Error { message } => return fail(message),
        }
    }
    let Some((choices, usage)) = answers.finish() else {
        return fail("the engine ended the request without an answer".into());
    };
    Json(ChatCompletionResponse {
        id: cid,
        object: "chat.completion".into(),
        created,
        model,
        choices,
        usage: Some(usage),
        usage_signature: None,
        refunded_micros: None,
    })
    .into_response()
}

struct StreamState {
    rx: Events,
    cid: String,
    created: u64,
    model: String,
    include_usage: bool,
    queue: VecDeque<Event>,
    finished: bool,
    /// The usage of the choices done so far; the stream ends when each has
    /// sent `Done`.
    usage: choices::StreamUsage,
    /// Lifts tool calls out of the text when the request has tools.
    splitter: tools::DeltaSplitter,
}

impl StreamState {
    fn chunk(&mut self, c: &ChatCompletionChunk) {
        match serde_json::to_string(c) {
            Ok(s) => self.queue.push_back(Event::default().data(s)),
            Err(e) => tracing::error!(%e, "cannot encode a chunk"),
        }
    }

    fn delta_chunk(&self, index: u32, delta: Delta) -> ChatCompletionChunk {
        let mut c = ChatCompletionChunk::content(&self.cid, self.created, &self.model, "");
        for ch in &mut c.choices {
            ch.delta = delta.clone();
        }
        c.for_choice(index)
    }

    fn fail(&mut self, message: String) {
        let body = ErrorResponse::new(message, "server_error", "engine_error");
        if let Ok(s) = serde_json::to_string(&body) {
            self.queue.push_back(Event::default().data(s));
        }
        self.queue.push_back(Event::default().data("[DONE]"));
        self.finished = true;
    }

    fn on_event(&mut self, ev: Option<(u32, GenerationEvent)>) {
        match ev {
            Some((index, GenerationEvent::Token { text, logprobs })) => {
                let mut deltas = self.splitter.push(index, &text);
                let mut logprobs = choices::delta_logprobs(logprobs);
                if deltas.is_empty() && logprobs.is_some() {
                    deltas.push(Delta {
                        content: Some(String::new()),
                        ..Delta::default()
                    });
                }
                for d in deltas {
                    let c = self.delta_chunk(index, d).with_logprobs(logprobs.take());
                    self.chunk(&c);
                }
            }
            Some((
                index,
                GenerationEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                },
            )) => {
                let (rest, finish_reason) = self.splitter.end(index, finish_reason);
                for d in rest {
                    let c = self.delta_chunk(index, d);
                    self.chunk(&c);
                }
                let c = ChatCompletionChunk::finish(
                    &self.cid,
                    self.created,
                    &self.model,
                    finish_reason,
                )
                .for_choice(index);
                self.chunk(&c);
                let usage = self
                    .usage
                    .done(prompt_tokens, completion_tokens, cached_tokens);
                if let Some(usage) = usage {
                    if self.include_usage {
                        let c =
                            ChatCompletionChunk::usage(&self.cid, self.created, &self.model, usage);
                        self.chunk(&c);
                    }
                    self.queue.push_back(Event::default().data("[DONE]"));
                    self.finished = true;
                }
            }
            Some((_, GenerationEvent::Error { message })) => self.fail(message),
            None => self.fail("the engine ended the request without an answer".into()),
        }
    }
}

/// SSE: the role chunk, content chunks, the finish chunk, the usage chunk when
/// asked for, then `[DONE]`. When the client goes away the body stream is
/// dropped, with it the receiver, and the engine frees the slot.
fn stream_response(
    rx: Events,
    cid: String,
    created: u64,
    model: String,
    include_usage: bool,
    splitter: tools::DeltaSplitter,
) -> Response {
    let n = match &rx {
        Events::Engine(s) => s.len() as u32,
        Events::Executor(_) => 1,
    };
    let mut st = StreamState {
        rx,
        cid,
        created,
        model,
        include_usage,
        queue: VecDeque::new(),
        finished: false,
        usage: choices::StreamUsage::new(n),
        splitter,
    };
    // OpenAI opens each choice with its role.
    for index in 0..n {
        let role = ChatCompletionChunk::role(&st.cid, st.created, &st.model).for_choice(index);
        st.chunk(&role);
    }
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                return Some((Ok::<Event, Infallible>(ev), st));
            }
            if st.finished {
                return None;
            }
            let ev = st.rx.recv().await;
            st.on_event(ev);
        }
    });
    Sse::new(stream).into_response()
}

#[cfg(test)]
mod tests {
    //! Every error of the local server is OpenAI JSON, driven without a socket.

    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::node::executor::EchoExecutor;

    fn app(max_body: usize) -> Router {
        let state = LocalState::new();
        state.set_backend(Backend::Executor(Arc::new(EchoExecutor::new("m", 1))));
        router(state, max_body)
    }

    async fn send(req: Request<Body>, max_body: usize) -> (StatusCode, serde_json::Value) {
        let resp = app(max_body).oneshot(req).await.unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(ct.as_deref(), Some("application/json"), "status {status}");
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap()
    }

    fn code(v: &serde_json::Value) -> &str {
        assert!(v["error"]["message"].is_string(), "{v}");
        v["error"]["code"].as_str().unwrap()
    }

    #[tokio::test]
    async fn errors_are_json_on_every_route() {
        let (status, v) = send(post("/v1/chat/completions", "{not json"), 1024).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code(&v), "invalid_json");
        let (status, v) = send(post("/v1/chat/completions", vec![b' '; 2048]), 1024).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(code(&v), "request_too_large");
        let (status, v) = send(post("/v1/embeddings", "{}"), 1024).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(code(&v), "not_supported");
        let get = Request::get("/v1/chat/completions")
            .body(Body::empty())
            .unwrap();
        let (status, v) = send(get, 1024).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(code(&v), "method_not_allowed");
    }
}
