//! In-process inference on candle: model loading (GGUF), tokenizer, chat
//! template, sampler, continuous-batching scheduler, KV cache, metering.
//!
//! Owns: tokens in, tokens out. May not touch: HTTP, keys, the wire protocol.
//!
//! # The contract with the node agent
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sgl::engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest};
//! use sgl::proto::openai::ChatMessage;
//!
//! // A GGUF file (or checkpoint directory) and the id to serve it as; the
//! // node resolves catalogue ids to cached files before this point.
//! let cfg = EngineConfig::new("models/smollm2-135m.gguf", "smollm2-135m");
//! let engine = Engine::load(cfg)?; // blocking: call from spawn_blocking
//! let req = GenerationRequest::chat(vec![ChatMessage::new("user", "Hi")]).max_tokens(32);
//! let mut events = engine.submit(req)?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         GenerationEvent::Token { text, .. } => print!("{text}"),
//!         GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens, .. } => {
//!             println!("\n{finish_reason:?} {prompt_tokens}+{completion_tokens}");
//!         }
//!         GenerationEvent::Error { message } => eprintln!("{message}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - [`EngineHandle::submit`] never blocks: it validates, renders and tokenises
//!   the prompt, then queues it; a full queue is [`SubmitError::QueueFull`].
//! - Events arrive in order: zero or more `Token`, then exactly one `Done` or
//!   `Error`. `Token` texts concatenated are the completion; with logprobs
//!   asked for, their entries concatenated are one per completion token.
//! - [`EngineHandle::submit_n`] takes a request for `n` completions and gives
//!   one receiver per completion, each with the events above.
//! - Dropping the receiver cancels the request; its batch slot is freed before
//!   the next step.
//! - `Done` carries exact token counts: the prompt as tokenised, and every
//!   sampled token except an end-of-turn token.

// The one place the crate allows `unsafe`: the SIMD matmul kernels and the
// thread team of the CPU forward, each use with its safety argument.
#[allow(unsafe_code)]
pub mod cpu;
pub mod grammar;
pub mod logprobs;
pub mod metrics;
pub mod model;
pub mod prefix;
pub mod safetensors;
pub mod sampler;
mod scheduler;
pub mod template;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;

pub use metrics::Metrics;
pub use model::WeightFormat;
pub use scheduler::{Engine, EngineHandle, EventReceiver, ModelInfo};

use crate::proto::limits::DEFAULT_TEMPERATURE;
use crate::proto::openai::{ChatCompletionRequest, ChatMessage, FinishReason, JsonGrammar};

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// A CUDA device by ordinal; needs the `cuda` feature.
    Cuda(usize),
}

/// How to load and run a model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A GGUF file or a Hugging Face checkpoint directory. Which model a
    /// name means (the catalogue, the local cache) is the caller's business:
    /// see `node::model_cache::resolve`.
    pub model: PathBuf,
    /// The id the engine reports for the model.
    pub id: String,
    pub device: DeviceChoice,
    /// Requantise the linear layers at load.
    pub weight_format: WeightFormat,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests waiting for a slot before submit answers `QueueFull`.
    pub max_queue: usize,
    /// Prompt tokens per prefill chunk; longer prompts take several steps so
    /// that running streams keep getting tokens.
    pub prefill_chunk: usize,
    /// Cap on the context (defaults to the model's).
    pub max_context: Option<usize>,
    /// A `tokenizer.json` to use instead of the GGUF's vocabulary.
    pub tokenizer_json: Option<PathBuf>,
    /// A Jinja chat template to use instead of the model's.
    pub chat_template: Option<String>,
    /// Budget of the prefix cache ([`prefix`]) in bytes of KV rows; 0 turns
    /// it off. Used on the CPU forward only.
    pub prefix_cache_bytes: u64,
}

/// The prefix cache's default budget: 256 MiB holds about 5,800 positions of
/// SmolLM2-135M (45 KiB each), a dozen chats of a few hundred tokens.
pub const DEFAULT_PREFIX_CACHE_MB: u64 = 256;

impl EngineConfig {
    pub fn new(model: impl Into<PathBuf>, id: impl Into<String>) -> Self {
        EngineConfig {
            model: model.into(),
            id: id.into(),
            device: DeviceChoice::Cpu,
            weight_format: WeightFormat::Auto,
            max_batch: 8,
            max_queue: 64,
            prefill_chunk: 256,
            max_context: None,
            tokenizer_json: None,
            chat_template: None,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_MB << 20,
        }
    }
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// OpenAI chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Text given to the model as is (tokenised without a template).
    Raw(String),
}

/// One generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    /// Completion budget; `None` is the protocol's default
    /// ([`DEFAULT_MAX_TOKENS`](crate::proto::limits::DEFAULT_MAX_TOKENS)),
    /// lowered to the room the context leaves.
    pub max_tokens: Option<u32>,
    /// 0 is greedy; the default is the protocol's
    /// ([`DEFAULT_TEMPERATURE`]), the same on every server.
    pub temperature: f32,
    pub top_p: f32,
    /// Fixes the sampler's RNG; `None` draws a random seed.
    pub seed: Option<u64>,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens (benchmarks want a fixed
    /// length). OpenAI has no such parameter; the server reads `ignore_eos`.
    pub ignore_eos: bool,
    /// Constrained decoding (`response_format`): the completion is one JSON
    /// value of this grammar, and generation ends when it is whole.
    pub grammar: Option<Arc<JsonGrammar>>,
    /// Completions of the prompt (OpenAI's `n`), prefilled once; 1 unless
    /// [`EngineHandle::submit_n`] takes the request.
    pub n: u32,
    /// `Some(k)`: each token's logprob and the `k` most likely alternatives
    /// (OpenAI's `logprobs` with `top_logprobs`).
    pub logprobs: Option<u8>,
}

/// Caps on request parameters: the protocol's, which are OpenAI's where it
/// has them. The engine checks them again only as a defence; a server runs
/// [`ChatCompletionRequest::validate`] first.
pub use crate::proto::limits::{MAX_STOP as MAX_STOP_SEQUENCES, MAX_STOP_LEN};

impl GenerationRequest {
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        GenerationRequest {
            prompt: Prompt::Chat(messages),
            max_tokens: None,
            temperature: DEFAULT_TEMPERATURE as f32,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            grammar: None,
            n: 1,
            logprobs: None,
        }
    }

    pub fn raw(text: impl Into<String>) -> Self {
        let mut r = Self::chat(Vec::new());
        r.prompt = Prompt::Raw(text.into());
        r
    }

    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    pub fn seed(mut self, s: u64) -> Self {
        self.seed = Some(s);
        self
    }

    pub fn n(mut self, n: u32) -> Self {
        self.n = n;
        self
    }

    /// Report logprobs with `top` alternatives per token.
    pub fn logprobs(mut self, top: u8) -> Self {
        self.logprobs = Some(top);
        self
    }

    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    /// Decode under `g` (see the [`grammar`](self::grammar) module).
    pub fn grammar(mut self, g: Arc<JsonGrammar>) -> Self {
        self.grammar = Some(g);
        self
    }

    /// The generation an OpenAI chat completion body asks for, with the
    /// protocol's defaults. The model name is the caller's business and is
    /// not checked here; nor are the request's limits, which
    /// [`ChatCompletionRequest::validate`] checks first.
    pub fn from_openai(req: &ChatCompletionRequest) -> Result<Self, SubmitError> {
        let bad = |m: String| SubmitError::InvalidRequest(m);
        let max_tokens = match req.requested_max_tokens() {
            None => None,
            Some(n) => {
                Some(u32::try_from(n).map_err(|_| bad(format!("max_tokens {n} is out of range")))?)
            }
        };
        let choices = req.choice_params();
        // Tools are shown to the model in its messages
        // ([`crate::proto::openai::tools`]).
        let messages = req.prompt_messages().map_err(|e| bad(e.to_string()))?;
        Ok(GenerationRequest {
            prompt: Prompt::Chat(messages),
            max_tokens,
            temperature: req.effective_temperature() as f32,
            top_p: req.top_p.unwrap_or(1.0) as f32,
            seed: req.seed,
            stop: req.stop.as_ref().map(|s| s.to_vec()).unwrap_or_default(),
            ignore_eos: req
                .extra
                .get("ignore_eos")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            grammar: req.output_grammar().map_err(|e| bad(e.to_string()))?,
            n: choices.n,
            logprobs: choices.logprobs,
        })
    }
}

/// What a request's receiver gets.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The next piece of the completion (whole UTF-8 characters), with the
    /// logprobs of the tokens it completes when the request asked for them.
    /// The text is empty only when the event carries logprobs alone (tokens
    /// a stop string cut).
    Token {
        text: String,
        logprobs: Vec<crate::proto::openai::TokenLogprob>,
    },
    /// The end, with exact token counts.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// Prompt tokens restored from the prefix cache, not computed
        /// (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: u32,
    },
    /// The engine failed this request; nothing more follows.
    Error { message: String },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again after about this many seconds (HTTP 429).
    #[error("the engine's queue is full; retry in {retry_after_secs}s")]
    QueueFull { retry_after_secs: u64 },
    /// Bad parameters or messages (HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The prompt leaves no room to generate (HTTP 400, `context_length_exceeded`).
    #[error("the prompt has {prompt_tokens} tokens; the context holds {context_length}")]
    ContextLengthExceeded {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}
