//! What runs a job's tokens: the seam between the agent and an engine.
//!
//! The agent speaks the protocol (unseal, seal, sign, post) and knows nothing
//! of models; an [`Executor`] turns a validated [`ChatJob`] into a stream of
//! text deltas and a final count. The real engine implements it; so does
//! [`EchoExecutor`], the load-test engine that answers instantly so that a
//! benchmark measures the coordinator rather than the model.

use tokio::sync::mpsc;

use super::jobs::ChatJob;
use crate::proto::openai::{FinishReason, TokenLogprob};

/// One model a node advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub name: String,
    pub context_size: u64,
}

/// What an executor sends while it runs a job. Dropping the receiver cancels
/// the job; the executor frees its slot within one step.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// The text of one decoded token (may be empty for partial UTF-8).
    Token(String),
    /// A job that asked for `n` > 1 or `logprobs`: a piece of choice
    /// `index`, with the logprobs of its tokens when asked for.
    Piece {
        index: u32,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Such a job's choice `index` ended; `Done` follows the last one.
    ChoiceDone {
        index: u32,
        finish: FinishReason,
        completion_tokens: u64,
    },
    /// Generation ended; the counts are exact, for metering (with `n`
    /// choices, the completion tokens of them all).
    Done {
        finish: FinishReason,
        prompt_tokens: u64,
        completion_tokens: u64,
        /// Of `prompt_tokens`, those a cached prefix supplied (0 when none
        /// or unknown); reported, never billed apart.
        cached_tokens: u64,
    },
    /// Generation failed; the reason goes to `/fail`.
    Failed(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExecError {
    /// The executor is at capacity; the coordinator offers the job again.
    #[error("at capacity")]
    Busy,
    #[error("model {0} is not served here")]
    UnknownModel(String),
    #[error("{0}")]
    Invalid(String),
}

pub trait Executor: Send + Sync + 'static {
    fn models(&self) -> Vec<ServedModel>;
    /// Parallel slots this executor offers.
    fn slots(&self) -> u32;
    /// Start a job. Events arrive on the receiver until `Done` or `Failed`.
    fn start(&self, job: &ChatJob) -> Result<mpsc::Receiver<ExecEvent>, ExecError>;
    /// The request features ([`crate::proto::features`]) this executor
    /// implements, advertised in the heartbeat; none unless it says so.
    fn features(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// The load-test engine (`--engine echo`): repeats the last user message
/// back word by word, instantly. Never used for real work; a node running it
/// says so in its logs.
#[derive(Debug, Clone)]
pub struct EchoExecutor {
    pub model: String,
    pub slots: u32,
    /// A pause before each token, standing in for a model's decode pace
    /// (zero: all at once).
    pub token_delay: std::time::Duration,
    /// After this many tokens (or the whole echo, if shorter) every job is
    /// held open, never finishing, until it is cancelled: a generation that
    /// is certain to still be running, for tests that kill a process
    /// mid-stream (`--echo-stall-after`).
    pub stall_after: Option<u64>,
}

impl EchoExecutor {
    pub fn new(model: impl Into<String>, slots: u32) -> Self {
        EchoExecutor {
            model: model.into(),
            slots: slots.max(1),
            token_delay: std::time::Duration::ZERO,
            stall_after: None,
        }
    }

    /// The same engine, holding every job open after `tokens` tokens.
    pub fn stalling_after(self, tokens: Option<u64>) -> Self {
        EchoExecutor {
            stall_after: tokens,
            ..self
        }
    }

    /// The same, pausing `delay` before each token.
    pub fn with_token_delay(mut self, delay: std::time::Duration) -> Self {
        self.token_delay = delay;
        self
    }
}

impl Executor for EchoExecutor {
    fn models(&self) -> Vec<ServedModel> {
        vec![ServedModel {
            name: self.model.clone(),
            context_size: 8192,
        }]
    }

    fn slots(&self) -> u32 {
        self.slots
    }

    fn start(&self, job: &ChatJob) -> Result<mpsc::Receiver<ExecEvent>, ExecError> {
        // No model, no distribution: refused rather than answered with one
        // choice and no logprobs, or with text where a call was asked for.
        if job.is_structured() {
            return Err(ExecError::Invalid(
                "the echo engine answers one completion without logprobs or tools".into(),
            ));
        }
        if job.model != self.model {
            return Err(ExecError::UnknownModel(job.model.clone()));
        }
        let last = job
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let prompt_tokens: u64 = job
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64 + 1)
            .sum();
        let words: Vec<String> = last
            .split_inclusive(' ')
            .take(job.max_tokens as usize)
            .map(str::to_string)
            .collect();
        let finish = if (words.len() as u64) < job.max_tokens {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let completion_tokens = words.len() as u64;
        let (tx, rx) = mpsc::channel(words.len() + 1);
        if let Some(n) = self.stall_after {
            for w in words
                .into_iter()
                .take(usize::try_from(n).unwrap_or(usize::MAX))
            {
                let _ = tx.try_send(ExecEvent::Token(w));
            }
            // Hold the job open, never finishing it, until the receiver is
            // dropped (the job cancelled, or the process killed).
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { tx.closed().await });
                }
                Err(_) => std::mem::forget(tx),
            }
            return Ok(rx);
        }
        let done = ExecEvent::Done {
            finish,
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        };
        if !self.token_delay.is_zero() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let delay = self.token_delay;
                rt.spawn(async move {
                    for w in words {
                        tokio::time::sleep(delay).await;
                        // The job was dropped (cancelled): stop.
                        if tx.send(ExecEvent::Token(w)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(done).await;
                });
                return Ok(rx);
            }
        }
        for w in words {
            // The channel holds every event, so these sends cannot fail.
            let _ = tx.try_send(ExecEvent::Token(w));
        }
        let _ = tx.try_send(done);
        Ok(rx)
    }
}
