//! The scheduler: one engine thread owns the model and runs steps. Between
//! steps it admits queued requests (continuous batching), drops requests whose
//! receiver is gone, and builds the next step from every decoding sequence plus
//! prefill chunks of new prompts.
//!
//! A step that panics (a bug in a kernel, say) fails the requests in that step
//! with an error event; the engine thread goes on serving the others and the
//! next ones.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use rand_core::{OsRng, RngCore};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::grammar::{Constraint, Vocab};
use super::logprobs;
use super::metrics::Metrics;
use super::model::{self, KvCache, Model, StepItem};
use super::prefix::PrefixCache;
use super::sampler::{self, Rng, SamplingParams};
use super::template::{ChatTemplate, TemplateMessage};
use super::tokenizer::{Detokenizer, TextTokenizer};
use super::{
    DeviceChoice, EngineConfig, EngineError, GenerationEvent, GenerationRequest, Prompt,
    SubmitError, MAX_STOP_LEN, MAX_STOP_SEQUENCES,
};
use crate::proto::limits::{DEFAULT_MAX_TOKENS, MAX_N, MAX_TOP_LOGPROBS};
use crate::proto::openai::{ChatMessage, FinishReason, JsonGrammar, TokenLogprob, ROLES};

/// The events of one request.
pub type EventReceiver = UnboundedReceiver<GenerationEvent>;

/// What a loaded engine serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id clients name in `model`.
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Formats of the linear layers after loading (`Q4_1`, `Q8_0`, …).
    pub weight_formats: Vec<String>,
    /// Weight bytes read per decode step, for the bandwidth bound.
    pub weight_bytes_per_token: u64,
    pub max_batch: usize,
    pub max_queue: usize,
    /// Seconds the load took.
    pub load_seconds: f64,
}

/// Loads models.
pub struct Engine;

impl Engine {
    /// Load the model and start the engine thread. Blocking (seconds); call it
    /// from `spawn_blocking` in async code.
    pub fn load(cfg: EngineConfig) -> Result<EngineHandle, EngineError> {
        let t0 = Instant::now();
        // The device first: a wrong --device fails at once, before any loading.
        let device = match cfg.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(i) if !cfg!(feature = "cuda") => {
                return Err(EngineError::Model(format!(
                    "--device cuda:{i}: this sgl was built without CUDA support; \
                     rebuild with `--features cuda` (README: Running on a GPU)"
                )))
            }
            DeviceChoice::Cuda(i) => Device::new_cuda(i).map_err(|e| {
                EngineError::Model(format!("--device cuda:{i}: no usable CUDA device: {e}"))
            })?,
        };
        let path = &cfg.model;
        // A GGUF file, or a Hugging Face checkpoint directory; each brings
        // its tokenizer and chat template.
        let (model, tokenizer, file_template) = if path.is_dir() {
            let (model, ck) = Model::load_safetensors(path, &device, cfg.max_context)?;
            let tok = TextTokenizer::from_file(
                cfg.tokenizer_json.as_ref().unwrap_or(&ck.tokenizer_json),
            )?;
            (model, tok, ck.chat_template)
        } else {
            let (model, content) =
                Model::load_gguf(path, &device, cfg.weight_format, cfg.max_context)?;
            let sibling = path.with_file_name("tokenizer.json");
            let tokenizer = match &cfg.tokenizer_json {
                Some(p) => TextTokenizer::from_file(p)?,
                None => match TextTokenizer::from_gguf(&content.metadata) {
                    Ok(t) => t,
                    Err(_) if sibling.is_file() => TextTokenizer::from_file(&sibling)?,
                    Err(e) => return Err(e),
                },
            };
            let template = content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned();
            (model, tokenizer, template)
        };
        let source = match &cfg.chat_template {
            Some(s) => s.clone(),
            None => match file_template {
                Some(s) => s,
                None => ChatTemplate::fallback_source(&model.cfg.architecture, &|t| {
                    tokenizer.token_id(t).is_some()
                })
                .to_string(),
            },
        };
        let template = ChatTemplate::new(
            &source,
            tokenizer.bos_token.as_deref().unwrap_or(""),
            tokenizer.eos_token.as_deref().unwrap_or(""),
        )?;
        let max_batch = cfg.max_batch.max(1);
        let max_queue = cfg.max_queue.max(1);
        let info = ModelInfo {
            id: cfg.id.clone(),
            path: cfg.model.clone(),
            architecture: model.cfg.architecture.clone(),
            context_length: model.cfg.context_length,
            vocab_size: model.cfg.vocab_size,
            weight_formats: model.weight_formats.clone(),
            weight_bytes_per_token: model.weight_bytes_per_token,
            max_batch,
            max_queue,
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = sync_channel::<Job>(max_queue);
        // Prefix caching needs KV rows it can copy: the CPU forward's.
        let prefix = KvCache::new(&model, 0)?
            .floats_per_position()
            .and_then(|per| PrefixCache::new(cfg.prefix_cache_bytes, per));
        #[cfg(test)]
        let fault = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            metrics: metrics.clone(),
            rx,
            max_batch,
            prefill_chunk: cfg.prefill_chunk.max(1),
            active: Vec::new(),
            waiting: None,
            prefix,
            vocab: None,
            #[cfg(test)]
            fault: fault.clone(),
        };
        std::thread::Builder::new()
            .name("sgl-engine".into())
            .spawn(move || worker.run())?;
        Ok(EngineHandle {
            shared: Arc::new(Shared {
                tokenizer,
                template,
                info,
                metrics,
                #[cfg(test)]
                fault,
            }),
            tx,
        })
    }
}

struct Shared {
    tokenizer: Arc<TextTokenizer>,
    template: ChatTemplate,
    info: ModelInfo,
    metrics: Arc<Metrics>,
    /// Tests set it to make the next step panic (see `Model::inject_panic`).
    #[cfg(test)]
    fault: Arc<std::sync::atomic::AtomicBool>,
}

/// The engine as its callers see it. Cheap to clone; the engine thread ends
/// when the last handle is dropped and its running requests are done.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    tx: SyncSender<Job>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.shared.info.id)
            .finish()
    }
}

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    grammar: Option<Arc<JsonGrammar>>,
    logprobs: Option<u8>,
    /// One per completion (`n`); the first is the sequence prefilled, the
    /// others fork from it once the prompt is in.
    txs: Vec<UnboundedSender<GenerationEvent>>,
    submitted: Instant,
}

/// The seed of completion `i` of a request seeded `seed`: the first keeps it,
/// so `n: 1` draws as before; the others are spread by splitmix64's constant
/// so that neighbouring seeds do not share completions.
fn choice_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl EngineHandle {
    /// The models this engine serves (one).
    pub fn models(&self) -> Vec<ModelInfo> {
        vec![self.shared.info.clone()]
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.shared.tokenizer
    }

    /// Render OpenAI messages with the model's chat template, ready to
    /// tokenise. Checks roles and content kinds.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, SubmitError> {
        let bad = |m: String| SubmitError::InvalidRequest(m);
        if messages.is_empty() {
            return Err(bad("messages must not be empty".into()));
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(bad(format!(
                    "messages[{i}].role {:?} is not one of {}",
                    m.role,
                    ROLES.join(", ")
                )));
            }
            if m.content.has_non_text_parts() {
                return Err(bad(format!(
                    "messages[{i}] has non-text content; this model reads text only"
                )));
            }
            // `developer` is OpenAI's new name for `system`; templates know the old one.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            msgs.push(TemplateMessage {
                role: role.to_string(),
                content: m.content.text(),
            });
        }
        self.shared
            .template
            .render(&msgs)
            .map_err(|e| bad(e.to_string()))
    }

    /// The prompt tokens a request would use.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, SubmitError> {
        let text = match prompt {
            Prompt::Chat(m) => self.render_chat(m)?,
            Prompt::Raw(s) => s.clone(),
        };
        self.shared
            .tokenizer
            .encode(&text)
            .map_err(|e| SubmitError::InvalidRequest(e.to_string()))
    }

    /// Queue a generation of one completion. Never blocks; see the module
    /// documentation. A request for `n` > 1 goes through
    /// [`EngineHandle::submit_n`].
    pub fn submit(&self, req: GenerationRequest) -> Result<EventReceiver, SubmitError> {
        if req.n != 1 {
            return Err(SubmitError::InvalidRequest(
                "n > 1 needs one receiver per completion (submit_n)".into(),
            ));
        }
        let mut rx = self.submit_n(req)?;
        rx.pop().ok_or(SubmitError::Stopped)
    }

    /// Queue a generation of `req.n` completions of one prompt, one receiver
    /// each, in choice order. The prompt is prefilled once; the completions
    /// fork from its KV rows and decode side by side, so the request takes
    /// `n` batch slots. Never blocks.
    pub fn submit_n(&self, req: GenerationRequest) -> Result<Vec<EventReceiver>, SubmitError> {
        let bad = |m: String| SubmitError::InvalidRequest(m);
        let n = req.n as usize;
        if !(1..=MAX_N as usize).contains(&n) {
            return Err(bad(format!("n must be between 1 and {MAX_N}")));
        }
        if n > self.shared.info.max_batch {
            return Err(bad(format!(
                "n must be at most {}, the sequences this engine decodes together",
                self.shared.info.max_batch
            )));
        }
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(bad(format!(
                "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
            )));
        }
        if !(req.temperature.is_finite() && (0.0..=2.0).contains(&req.temperature)) {
            return Err(bad("temperature must be between 0 and 2".into()));
        }
        if !(req.top_p.is_finite() && req.top_p > 0.0 && req.top_p <= 1.0) {
            return Err(bad("top_p must be in (0, 1]".into()));
        }
        if req.stop.len() > MAX_STOP_SEQUENCES {
            return Err(bad(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
            )));
        }
        if req
            .stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(bad(format!(
                "stop sequences must be 1 to {MAX_STOP_LEN} bytes"
            )));
        }
        let ctx = self.shared.info.context_length;
        if let Some(n) = req.max_tokens {
            if n == 0 || n as usize > ctx {
                return Err(bad(format!("max_tokens must be between 1 and {ctx}")));
            }
        }
        let prompt = self.prompt_tokens(&req.prompt)?;
        if prompt.is_empty() {
            return Err(bad("the prompt is empty".into()));
        }
        if prompt.len() >= ctx {
            return Err(SubmitError::ContextLengthExceeded {
                prompt_tokens: prompt.len(),
                context_length: ctx,
            });
        }
        let room = ctx - prompt.len();
        let default = usize::try_from(DEFAULT_MAX_TOKENS).unwrap_or(usize::MAX);
        let max_tokens = req.max_tokens.map_or(default, |n| n as usize).min(room);
        let seed = req.seed.unwrap_or_else(|| OsRng.next_u64());
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
        let job = Job {
            prompt,
            max_tokens,
            params: SamplingParams {
                temperature: req.temperature,
                top_p: req.top_p,
                seed,
            },
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            grammar: req.grammar,
            logprobs: req.logprobs,
            txs,
            submitted: Instant::now(),
        };
        let m = &self.shared.metrics;
        m.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(rxs),
            Err(TrySendError::Full(_)) => {
                m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                m.requests_rejected.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::QueueFull {
                    retry_after_secs: 1,
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Err(SubmitError::Stopped)
            }
        }
    }
}

/// A sequence in the running batch.
struct Seq {
    prompt: Vec<u32>,
    prefilled: usize,
    /// Prompt tokens whose KV rows came from the prefix cache.
    cached: usize,
    /// Sampled tokens fed back (their KV rows follow the prompt's), kept for
    /// the prefix cache.
    fed: Vec<u32>,
    cache: KvCache,
    /// The last sampled token, fed in the next step.
    input: Vec<u32>,
    generated: u32,
    detok: Detokenizer,
    /// Text not yet sent because it might begin a stop string.
    held: String,
    params: SamplingParams,
    rng: Rng,
    stop: Vec<String>,
    ignore_eos: bool,
    /// `response_format`: the tokens allowed next, and whether the value is
    /// whole.
    constraint: Option<Constraint>,
    max_tokens: usize,
    /// `Some(k)`: report each sampled token's logprob and the `k` most
    /// likely alternatives.
    logprobs: Option<u8>,
    /// Logprobs of tokens whose text has not been sent yet (held for a stop
    /// string, or part of a character); they travel with that text.
    pending_logprobs: Vec<TokenLogprob>,
    /// The other completions of this request (receiver, seed), forked from
    /// this sequence when its prompt is in.
    forks: Vec<(UnboundedSender<GenerationEvent>, u64)>,
    tx: UnboundedSender<GenerationEvent>,
    submitted: Instant,
    last_token: Option<Instant>,
    gone: bool,
}

impl Seq {
    fn send(&mut self, ev: GenerationEvent) {
        if self.tx.send(ev).is_err() {
            self.gone = true;
        }
    }

    fn emit(&mut self, text: String) {
        if !text.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            self.send(GenerationEvent::Token { text, logprobs });
        }
    }

    /// Batch slots this sequence holds: itself and the completions that
    /// will fork from it.
    fn width(&self) -> usize {
        1 + self.forks.len()
    }

    /// Whether nobody waits for this sequence or its forks any more.
    fn abandoned(&self) -> bool {
        self.gone || (self.tx.is_closed() && self.forks.iter().all(|f| f.0.is_closed()))
    }

    /// A sibling completion: the same prompt and KV rows (copied), its own
    /// receiver and seed. Called when the prompt is in and nothing sampled.
    fn fork(&self, cache: KvCache, tx: UnboundedSender<GenerationEvent>, seed: u64) -> Seq {
        let params = SamplingParams {
            seed,
            ..self.params
        };
        Seq {
            prompt: self.prompt.clone(),
            prefilled: self.prefilled,
            cached: self.cached,
            fed: Vec::new(),
            cache,
            input: Vec::new(),
            generated: 0,
            detok: Detokenizer::new(),
            held: String::new(),
            rng: Rng::new(seed),
            params,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            // Nothing is sampled yet: the copy is at the grammar's start.
            constraint: self.constraint.clone(),
            max_tokens: self.max_tokens,
            logprobs: self.logprobs,
            pending_logprobs: Vec::new(),
            forks: Vec::new(),
            tx,
            submitted: self.submitted,
            last_token: None,
            gone: false,
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() && !self.pending_logprobs.is_empty() {
            // Tokens whose text a stop string cut still count, and so are
            // reported.
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            self.send(GenerationEvent::Token {
                text: String::new(),
                logprobs,
            });
        }
        self.emit(held);
        let ev = GenerationEvent::Done {
            finish_reason: reason,
            prompt_tokens: self.prompt.len() as u32,
            completion_tokens: self.generated,
            cached_tokens: self.cached as u32,
        };
        self.send(ev);
    }
}

struct Worker {
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    metrics: Arc<Metrics>,
    rx: Receiver<Job>,
    max_batch: usize,
    prefill_chunk: usize,
    active: Vec<Seq>,
    /// A request taken from the queue that needs more free slots (its `n`)
    /// than the batch has now; it is admitted first.
    waiting: Option<Job>,
    /// `None`: prefix caching is off (`prefix_cache_bytes` 0, or a backend
    /// whose KV rows are not copied).
    prefix: Option<PrefixCache>,
    /// The vocabulary as bytes, made at the first constrained request.
    vocab: Option<Arc<Vocab>>,
    #[cfg(test)]
    fault: Arc<std::sync::atomic::AtomicBool>,
}

enum Outcome {
    Continue,
    Finished,
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            let before = self.active.len();
            self.active.retain(|s| !s.abandoned());
            let cancelled = before - self.active.len();
            if cancelled > 0 {
                self.metrics
                    .requests_cancelled
                    .fetch_add(cancelled as u64, Ordering::Relaxed);
            }
            self.metrics
                .active_sequences
                .store(self.active.len() as u64, Ordering::Relaxed);
            if !self.active.is_empty() {
                // `step` catches a panic of the forward itself; one anywhere
                // else in the step (sampling, detokenising) leaves the running
                // sequences in an unknown state, so they all fail.
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.step())) {
                    tracing::error!(panic = panic_message(&*payload), "engine step panicked");
                    for s in &mut self.active {
                        s.send(GenerationEvent::Error {
                            message: STEP_PANICKED.into(),
                        });
                        s.gone = true;
                    }
                }
            }
        }
    }

    /// Take queued requests into free slots. Blocks only when nothing is
    /// running. Returns false when every handle is gone and nothing runs.
    fn admit(&mut self) -> bool {
        loop {
            let used: usize = self.active.iter().map(Seq::width).sum();
            if used >= self.max_batch {
                break;
            }
            let job = if let Some(j) = self.waiting.take() {
                j
            } else {
                let j = if self.active.is_empty() {
                    match self.rx.recv() {
                        Ok(j) => j,
                        Err(_) => return false,
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                    }
                };
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                j
            };
            // A request for n completions waits, first in line, until n
            // slots are free (submit refused n above the batch).
            if used + job.txs.len() > self.max_batch && !self.active.is_empty() {
                self.waiting = Some(job);
                break;
            }
            if job.txs.iter().all(|t| t.is_closed()) {
                self.metrics
                    .requests_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let ctx = self.model.cfg.context_length;
            let cap = (job.prompt.len() + job.max_tokens.min(256)).min(ctx);
            let mut cache = match KvCache::new(&self.model, cap) {
                Ok(c) => c,
                Err(e) => {
                    for tx in &job.txs {
                        let _ = tx.send(GenerationEvent::Error {
                            message: e.to_string(),
                        });
                    }
                    continue;
                }
            };
            let cached = self.restore_prefix(&job.prompt, &mut cache);
            let constraint = job.grammar.map(|g| {
                let tok = &self.tokenizer;
                let vocab = self
                    .vocab
                    .get_or_insert_with(|| Arc::new(Vocab::new(tok)))
                    .clone();
                Constraint::new(g, vocab)
            });
            self.metrics
                .prompt_tokens
                .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
            self.metrics
                .requests_started
                .fetch_add(1, Ordering::Relaxed);
            let mut txs = job.txs.into_iter();
            let Some(tx) = txs.next() else {
                continue;
            };
            let seed = job.params.seed;
            let forks = txs
                .enumerate()
                .map(|(i, t)| (t, choice_seed(seed, i + 1)))
                .collect();
            self.active.push(Seq {
                prompt: job.prompt,
                prefilled: cached,
                cached,
                fed: Vec::new(),
                cache,
                input: Vec::new(),
                generated: 0,
                detok: Detokenizer::new(),
                held: String::new(),
                rng: Rng::new(job.params.seed),
                params: job.params,
                stop: job.stop,
                // A grammar decides where the output ends.
                ignore_eos: job.ignore_eos && constraint.is_none(),
                constraint,
                max_tokens: job.max_tokens,
                logprobs: job.logprobs,
                pending_logprobs: Vec::new(),
                forks,
                tx,
                submitted: job.submitted,
                last_token: None,
                gone: false,
            });
        }
        true
    }

    fn step(&mut self) {
        let ctx = self.model.cfg.context_length;
        // Decide what each sequence brings. Prefill chunks start where the
        // prefix cache left off, then at steps of `prefill_chunk`, whatever
        // else runs; where they start does not change a row's numbers (each
        // row is computed from its token, position and the K/V rows before
        // it alone), so a sequence is computed the same way alone, in a
        // batch, or after a cache hit.
        let mut plan: Vec<(usize, usize, usize, bool)> = Vec::new(); // (seq, from, to, logits)
        let mut prefill_used = 0;
        for (i, s) in self.active.iter().enumerate() {
            if s.prefilled < s.prompt.len() {
                let n = (s.prompt.len() - s.prefilled).min(self.prefill_chunk);
                if prefill_used == 0 || prefill_used + n <= self.prefill_chunk {
                    prefill_used += n;
                    let to = s.prefilled + n;
                    plan.push((i, s.prefilled, to, to == s.prompt.len()));
                }
            } else if !s.input.is_empty() {
                plan.push((i, 0, 1, true));
            }
        }
        if plan.is_empty() {
            return;
        }
        let mut failed: Option<String> = None;
        for &(i, from, to, _) in &plan {
            let s = &mut self.active[i];
            let n = if s.prefilled < s.prompt.len() {
                to - from
            } else {
                1
            };
            if let Err(e) = s.cache.reserve(s.cache.len() + n, ctx) {
                failed = Some(e.to_string());
            }
        }
        let logits = if failed.is_none() {
            let mut planned = plan.iter().peekable();
            let mut items = Vec::with_capacity(plan.len());
            for (i, s) in self.active.iter_mut().enumerate() {
                let Some(&&(pi, from, to, want)) = planned.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                planned.next();
                let tokens: &[u32] = if s.prefilled < s.prompt.len() {
                    &s.prompt[from..to]
                } else {
                    &s.input
                };
                items.push(StepItem {
                    tokens,
                    cache: &mut s.cache,
                    want_logits: want,
                });
            }
            // The CPU forward's thread team carries a panic of any share
            // here once every thread is done; the requests of this step fail.
            let forward = catch_unwind(AssertUnwindSafe(|| {
                #[cfg(test)]
                if self.fault.swap(false, Ordering::Relaxed) {
                    self.model.inject_panic();
                }
                self.model.forward(&mut items)
            }));
            match forward {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    failed = Some(e.to_string());
                    None
                }
                Err(payload) => {
                    tracing::error!(panic = panic_message(&*payload), "engine step panicked");
                    failed = Some(STEP_PANICKED.into());
                    None
                }
            }
        } else {
            None
        };
        if let Some(message) = failed {
            tracing::error!(%message, "engine step failed");
            for &(i, ..) in &plan {
                let s = &mut self.active[i];
                s.send(GenerationEvent::Error {
                    message: message.clone(),
                });
                s.gone = true;
            }
            return;
        }
        let mut row = 0;
        let mut finished = Vec::new();
        let mut born = Vec::new();
        for &(i, _, to, want) in &plan {
            let s = &mut self.active[i];
            if s.prefilled < s.prompt.len() {
                s.prefilled = to;
                // The whole prompt is in: others sending the same prefix
                // (a shared system prompt) can have it while this one decodes.
                if to == s.prompt.len() {
                    if let Some(p) = self.prefix.as_mut() {
                        if let Err(e) = p.insert(&s.prompt, &s.cache) {
                            tracing::warn!(%e, "prefix cache insert failed");
                        }
                    }
                }
            }
            if !want {
                continue;
            }
            let r = match logits.as_ref().map(|l| model::row(l, row)) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    s.send(GenerationEvent::Error {
                        message: e.to_string(),
                    });
                    s.gone = true;
                    continue;
                }
                None => {
                    s.send(GenerationEvent::Error {
                        message: "the step returned no logits".into(),
                    });
                    s.gone = true;
                    continue;
                }
            };
            row += 1;
            // The prompt is in and nothing is sampled yet: the other
            // completions of the request start here from a copy of its rows,
            // each drawing its first token from these same logits.
            for (tx, seed) in std::mem::take(&mut s.forks) {
                let cache = match s.cache.fork(&self.model) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(GenerationEvent::Error {
                            message: e.to_string(),
                        });
                        continue;
                    }
                };
                let mut f = s.fork(cache, tx, seed);
                // One that ends at its first token has sent its events.
                if let Ok(Outcome::Continue) =
                    sample_and_accept(&mut f, &r, &self.tokenizer, &self.metrics)
                {
                    born.push(f);
                }
            }
            match sample_and_accept(s, &r, &self.tokenizer, &self.metrics) {
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Finished) => finished.push(i),
                Err(()) => {}
            }
        }
        if !finished.is_empty() {
            self.metrics
                .requests_finished
                .fetch_add(finished.len() as u64, Ordering::Relaxed);
            // Removing in descending order keeps the other indices valid.
            for i in finished.into_iter().rev() {
                let s = self.active.remove(i);
                // The prompt and the reply: the next turn of a chat resends
                // both.
                if let Some(p) = self.prefix.as_mut() {
                    let mut tokens = s.prompt;
                    tokens.extend_from_slice(&s.fed);
                    if let Err(e) = p.insert(&tokens, &s.cache) {
                        tracing::warn!(%e, "prefix cache insert failed");
                    }
                }
            }
        }
        // Appended after the removals, whose indices refer to the old list.
        self.active.extend(born);
        self.update_prefix_gauges();
    }

    /// Copy the cached prefix of `prompt` into the new sequence's `cache`;
    /// returns the prompt tokens it restored. At least the last prompt token
    /// is left to prefill: its logits give the first token.
    fn restore_prefix(&mut self, prompt: &[u32], cache: &mut KvCache) -> usize {
        let Some(p) = self.prefix.as_mut() else {
            return 0;
        };
        let m = &self.metrics;
        m.prefix_cache_lookups.fetch_add(1, Ordering::Relaxed);
        let limit = prompt.len().saturating_sub(1);
        match p.restore(prompt, limit, cache) {
            Ok(hit) if hit.tokens > 0 => {
                m.prefix_cache_hits.fetch_add(1, Ordering::Relaxed);
                m.prefix_cache_tokens
                    .fetch_add(hit.tokens as u64, Ordering::Relaxed);
                hit.tokens
            }
            Ok(_) => 0,
            Err(e) => {
                // A partial copy is of no use: prefill it all.
                tracing::warn!(%e, "prefix cache restore failed");
                cache.clear();
                0
            }
        }
    }

    fn update_prefix_gauges(&self) {
        if let Some(p) = &self.prefix {
            let m = &self.metrics;
            m.prefix_cache_bytes.store(p.bytes(), Ordering::Relaxed);
            m.prefix_cache_blocks
                .store(p.blocks() as u64, Ordering::Relaxed);
        }
    }
}

/// What the requests of a step that panicked are told; the panic's message
/// goes to the log.
const STEP_PANICKED: &str = "internal error: the engine failed on this step";

/// The message of a panic payload (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Draw the next token of `s` from `logits` and take it in; an error has
/// been sent to the sequence's receiver.
fn sample_and_accept(
    s: &mut Seq,
    logits: &[f32],
    tok: &TextTokenizer,
    metrics: &Metrics,
) -> Result<Outcome, ()> {
    // `response_format`: only tokens that keep the output a prefix of a
    // value the grammar allows may be drawn. The logprobs stay those of the
    // model's own distribution, as for any other request.
    let masked;
    let draw: &[f32] = match s.constraint.as_mut() {
        Some(c) => {
            let mut r = logits.to_vec();
            if !c.mask(&mut r) {
                s.send(GenerationEvent::Error {
                    message: "no token of this model's vocabulary continues the response_format"
                        .into(),
                });
                s.gone = true;
                return Err(());
            }
            masked = r;
            &masked
        }
        None => logits,
    };
    let id = sampler::sample(draw, &s.params, &mut s.rng);
    if let Some(c) = s.constraint.as_mut() {
        if !c.accept(id) {
            s.send(GenerationEvent::Error {
                message: "internal error: the sampler left the response_format".into(),
            });
            s.gone = true;
            return Err(());
        }
    }
    let logprob = s
        .logprobs
        .map(|k| logprobs::entry(tok, logits, id, usize::from(k)));
    accept(s, id, logprob, tok, metrics).map_err(|e| {
        s.send(GenerationEvent::Error {
            message: e.to_string(),
        });
        s.gone = true;
    })
}

/// Take a sampled token into the sequence: stream its text, apply stop
/// strings and the budget.
fn accept(
    s: &mut Seq,
    id: u32,
    logprob: Option<TokenLogprob>,
    tok: &TextTokenizer,
    metrics: &Metrics,
) -> Result<Outcome, EngineError> {
    let now = Instant::now();
    match s.last_token {
        None => metrics
            .ttft
            .observe(now.duration_since(s.submitted).as_secs_f64()),
        Some(t) => metrics
            .inter_token
            .observe(now.duration_since(t).as_secs_f64()),
    }
    s.last_token = Some(now);
    s.input.clear();
    if tok.is_stop(id) && !s.ignore_eos {
        s.finish(FinishReason::Stop);
        return Ok(Outcome::Finished);
    }
    s.generated += 1;
    metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
    // Every token counted in the usage has its entry; an end-of-turn token
    // that ends the reply is neither counted nor reported.
    s.pending_logprobs.extend(logprob);
    let delta = s.detok.push(tok, id)?;
    s.held.push_str(&delta);
    if s.stop.is_empty() {
        let held = std::mem::take(&mut s.held);
        s.emit(held);
    } else if let Some(at) = s
        .stop
        .iter()
        .filter_map(|st| s.held.find(st.as_str()))
        .min()
    {
        s.held.truncate(at);
        s.finish(FinishReason::Stop);
        return Ok(Outcome::Finished);
    } else {
        // Hold back the longest tail that could still grow into a stop string.
        let keep = s
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &s.held[i..];
                s.stop.iter().any(|st| st.starts_with(tail))
            })
            .unwrap_or(s.held.len());
        let rest = s.held.split_off(keep);
        let out = std::mem::replace(&mut s.held, rest);
        s.emit(out);
    }
    // The JSON value is whole: nothing may follow it.
    if s.constraint.as_ref().is_some_and(Constraint::is_complete) {
        s.finish(FinishReason::Stop);
        return Ok(Outcome::Finished);
    }
    if s.generated as usize >= s.max_tokens {
        s.finish(FinishReason::Length);
        return Ok(Outcome::Finished);
    }
    s.input.push(id);
    s.fed.push(id);
    Ok(Outcome::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL_ID: &str = "smollm2-135m";

    /// Every event of a request, to the end.
    fn events(mut rx: EventReceiver) -> Vec<GenerationEvent> {
        let mut out = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            out.push(ev);
        }
        out
    }

    #[test]
    fn a_panicking_step_fails_its_request_and_the_engine_serves_the_next() {
        let model = match crate::node::model_cache::resolve(MODEL_ID) {
            Ok(m) => m,
            Err(e) => {
                assert_ne!(
                    std::env::var("SGL_REQUIRE_MODEL").as_deref(),
                    Ok("1"),
                    "SGL_REQUIRE_MODEL=1 but the model is missing: {e}"
                );
                eprintln!("skipping: {e} (run `sgl model fetch {MODEL_ID}`)");
                return;
            }
        };
        let engine = Engine::load(EngineConfig::new(model.path, model.id)).expect("load");
        let req = || {
            GenerationRequest::raw("The capital of France is")
                .max_tokens(4)
                .temperature(0.0)
                .seed(1)
        };
        // A panic inside the forward's parallel section (a worker thread's
        // share where the team has more than one).
        engine.shared.fault.store(true, Ordering::Relaxed);
        let failed = events(engine.submit(req()).expect("submit"));
        assert_eq!(
            failed,
            vec![GenerationEvent::Error {
                message: STEP_PANICKED.into()
            }]
        );
        // The engine thread, its thread team and its scratch buffers serve
        // the next request in full.
        for _ in 0..2 {
            let next = events(engine.submit(req()).expect("submit"));
            assert!(
                matches!(
                    next.last(),
                    Some(GenerationEvent::Done {
                        completion_tokens: 4,
                        ..
                    })
                ),
                "{next:?}"
            );
        }
    }
}
