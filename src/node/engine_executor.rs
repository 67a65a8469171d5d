//! The candle engine as the agent's [`Executor`]: a job's validated request
//! becomes a [`GenerationRequest`], the engine's events become the agent's.
//! Dropping the agent's receiver drops the engine's, which frees the batch
//! slot before the next step.

use tokio::sync::mpsc;

use super::executor::{ExecError, ExecEvent, Executor, ServedModel};
use super::jobs::ChatJob;
use crate::engine::{EngineHandle, GenerationEvent, GenerationRequest, SubmitError};
use crate::proto::openai::{ChatMessage, FinishReason};

pub struct EngineExecutor {
    engine: EngineHandle,
}

impl EngineExecutor {
    pub fn new(engine: EngineHandle) -> Self {
        EngineExecutor { engine }
    }
}

/// The engine's models as an executor lists them.
pub(super) fn served_models(engine: &EngineHandle) -> Vec<ServedModel> {
    engine
        .models()
        .into_iter()
        .map(|m| ServedModel {
            name: m.id,
            context_size: m.context_length as u64,
        })
        .collect()
}

impl From<GenerationEvent> for ExecEvent {
    fn from(ev: GenerationEvent) -> Self {
        match ev {
            GenerationEvent::Token { text, .. } => ExecEvent::Token(text),
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => ExecEvent::Done {
                finish: finish_reason,
                prompt_tokens: u64::from(prompt_tokens),
                completion_tokens: u64::from(completion_tokens),
                cached_tokens: u64::from(cached_tokens),
            },
            GenerationEvent::Error { message } => ExecEvent::Failed(message),
        }
    }
}

/// The other way, for a server that answers from any executor as the engine
/// would.
impl From<ExecEvent> for GenerationEvent {
    fn from(ev: ExecEvent) -> Self {
        match ev {
            ExecEvent::Token(text) => GenerationEvent::Token {
                text,
                logprobs: Vec::new(),
            },
            ExecEvent::Piece { text, logprobs, .. } => GenerationEvent::Token { text, logprobs },
            // A server that answers from an executor refuses `n` > 1, so a
            // choice's end is the answer's `Done`, which follows.
            ExecEvent::ChoiceDone { .. } => GenerationEvent::Token {
                text: String::new(),
                logprobs: Vec::new(),
            },
            ExecEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => GenerationEvent::Done {
                finish_reason: finish,
                // Counts beyond u32 cannot come from a context of this size.
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(completion_tokens).unwrap_or(u32::MAX),
                cached_tokens: u32::try_from(cached_tokens).unwrap_or(u32::MAX),
            },
            ExecEvent::Failed(message) => GenerationEvent::Error { message },
        }
    }
}

impl Executor for EngineExecutor {
    fn models(&self) -> Vec<ServedModel> {
        served_models(&self.engine)
    }

    fn slots(&self) -> u32 {
        self.engine.info().max_batch.max(1) as u32
    }

    fn features(&self) -> Vec<&'static str> {
        crate::proto::features::ALL.to_vec()
    }

    fn start(&self, job: &ChatJob) -> Result<mpsc::Receiver<ExecEvent>, ExecError> {
        if job.model != self.engine.info().id {
            return Err(ExecError::UnknownModel(job.model.clone()));
        }
        let messages = job
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let mut req = GenerationRequest::chat(messages)
            .max_tokens(u32::try_from(job.max_tokens).unwrap_or(u32::MAX))
            .temperature(job.temperature as f32);
        if let Some(p) = job.top_p {
            req = req.top_p(p as f32);
        }
        if let Some(s) = job.seed {
            req = req.seed(s);
        }
        for s in &job.stop {
            req = req.stop(s.clone());
        }
        if let Some(g) = &job.grammar {
            req = req.grammar(g.clone());
        }
        req.n = job.choices.n;
        req.logprobs = job.choices.logprobs;
        // Tool jobs go through the structured path, whose pieces the
        // agent splits into content and calls.
        let extended = job.is_structured();
        let mut receivers = self.engine.submit_n(req).map_err(|e| match e {
            SubmitError::QueueFull { .. } => ExecError::Busy,
            other => ExecError::Invalid(other.to_string()),
        })?;
        let (tx, rx) = mpsc::channel(64);
        if extended {
            tokio::spawn(forward_choices(receivers, tx));
            return Ok(rx);
        }
        let Some(mut events) = receivers.pop() else {
            return Err(ExecError::Invalid("the engine gave no receiver".into()));
        };
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let last = !matches!(ev, GenerationEvent::Token { .. });
                let out = ExecEvent::from(ev);
                // The agent dropped its receiver: the job is cancelled, and
                // dropping `events` here frees the engine's slot.
                if tx.send(out).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(rx)
    }
}

/// A job that asked for `n` or `logprobs`: every choice's events, merged as
/// they come, as `Piece` and `ChoiceDone`, then one `Done` with the usage of
/// them all (the prompt once). The first error fails the job.
async fn forward_choices(
    receivers: Vec<crate::engine::EventReceiver>,
    tx: mpsc::Sender<ExecEvent>,
) {
    use futures_util::StreamExt;
    let n = receivers.len();
    let streams = receivers.into_iter().zip(0u32..).map(|(rx, i)| {
        futures_util::stream::unfold(rx, move |mut rx| async move {
            rx.recv().await.map(|ev| ((i, ev), rx))
        })
        .boxed()
    });
    let mut merged = futures_util::stream::select_all(streams);
    let (mut left, mut prompt, mut completion, mut cached) = (n, 0u64, 0u64, 0u64);
    let mut first_finish = FinishReason::Stop;
    while let Some((index, ev)) = merged.next().await {
        let out = match ev {
            GenerationEvent::Token { text, logprobs } => ExecEvent::Piece {
                index,
                text,
                logprobs,
            },
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                left -= 1;
                prompt = u64::from(prompt_tokens);
                // The choices share one prefill: the prompt, and what the
                // cache supplied of it, count once.
                cached = cached.max(u64::from(cached_tokens));
                completion += u64::from(completion_tokens);
                if index == 0 {
                    first_finish = finish_reason;
                }
                ExecEvent::ChoiceDone {
                    index,
                    finish: finish_reason,
                    completion_tokens: u64::from(completion_tokens),
                }
            }
            GenerationEvent::Error { message } => {
                let _ = tx.send(ExecEvent::Failed(message)).await;
                return;
            }
        };
        // The agent dropped its receiver: the job is cancelled, and dropping
        // the merged receivers frees the engine's slots.
        if tx.send(out).await.is_err() {
            return;
        }
        if left == 0 {
            let _ = tx
                .send(ExecEvent::Done {
                    finish: first_finish,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    cached_tokens: cached,
                })
                .await;
            return;
        }
    }
    let _ = tx
        .send(ExecEvent::Failed(
            "the generation ended without a result".into(),
        ))
        .await;
}
