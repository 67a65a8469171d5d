//! The SSE relay of a job's stream to its client (PROTOCOL.md §5.3.2,
//! §5.4, §5.6). Sealed mode forwards each node chunk unread, with its
//! signature; plain mode opens each chunk in order and re-sends its text as
//! OpenAI `chat.completion.chunk` events. Either way `[DONE]` follows the
//! final chunk only: a stream that fails ends with `event: error` and closes.
//! A paid stream's settlement receipt goes in the response headers, and the
//! refund of the unused quote in the last chunk before `[DONE]` (§7f).

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc;

use super::job::JobEvent;
use super::plain::finish_reason;
use crate::money::Micros;
use crate::proto::api::{ChunkRequest, SealedSseChunk};
use crate::proto::e2e::StreamOpener;
use crate::proto::envelope::ENVELOPE_VERSION;
use crate::proto::openai::choices::StructuredChunk;
use crate::proto::openai::{ChatCompletionChunk, ChoiceParams, ErrorResponse};

pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;

/// An SSE answer: no caching, a `ping` comment every 15 s.
pub(super) fn sse(body: EventStream) -> Response {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Sse::new(body).keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("ping"),
        ),
    )
        .into_response()
}

/// One `data:` event holding an OpenAI chunk.
pub(super) fn data(c: &ChatCompletionChunk) -> Result<Event, Infallible> {
    Ok(Event::default().data(serde_json::to_string(c).unwrap_or_default()))
}

fn done() -> Event {
    Event::default().data("[DONE]")
}

/// The `[DONE]` marker, as a stream to chain after the last chunk.
pub(super) fn done_marker() -> impl Stream<Item = Result<Event, Infallible>> {
    stream::once(async { Ok(done()) })
}

/// `event: error` with the client-API error body.
fn error_event(message: &str) -> Event {
    let body = ErrorResponse::new(message, "server_error", "stream_aborted");
    Event::default()
        .event("error")
        .data(serde_json::to_string(&body).unwrap_or_default())
}

fn sse_chunk(job_id: &str, c: ChunkRequest, refunded: Option<Micros>) -> Event {
    let chunk = SealedSseChunk {
        seq: c.seq.unwrap_or(0),
        is_final: c.is_final == Some(true),
        eph: c.ephemeral_public_key,
        ct: c.ciphertext.unwrap_or_default(),
        job: job_id.to_string(),
        sig: c.result_envelope_signature.unwrap_or_default(),
        sigv: ENVELOPE_VERSION.into(),
        usage: c.usage,
        usage_signature: c.usage_signature,
        refunded_micros: refunded.map(|m| m.0),
    };
    Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
}

enum Relay {
    Open(String, mpsc::Receiver<JobEvent>),
    Done,
}

/// The SSE events of one job event of a sealed stream, and whether the
/// stream is over.
fn sealed_events(job_id: &str, ev: Option<JobEvent>) -> (Vec<Event>, bool) {
    match ev {
        Some(JobEvent::Final(c, billed)) => {
            (vec![sse_chunk(job_id, c, billed.refunded), done()], true)
        }
        Some(JobEvent::Chunk(c)) => {
            let fin = c.is_final == Some(true);
            let mut evs = vec![sse_chunk(job_id, c, None)];
            if fin {
                evs.push(done());
            }
            (evs, fin)
        }
        Some(JobEvent::Failed(why)) | Some(JobEvent::BadInput(why)) => {
            (vec![error_event(&format!("the node failed: {why}"))], true)
        }
        Some(JobEvent::Complete(..) | JobEvent::Unstarted(..)) | None => (
            vec![error_event("the stream ended without a final chunk")],
            true,
        ),
    }
}

/// Relay node chunks as SSE, unread: each `data:` line is one JSON object;
/// after the final chunk `[DONE]`; a failure mid-stream is `event: error`.
/// `first` is the first chunk (or the final one), already received;
/// `receipt` goes in the headers.
pub(super) fn sealed(
    job_id: String,
    first: JobEvent,
    rx: mpsc::Receiver<JobEvent>,
    receipt: HeaderMap,
) -> Response {
    let (head, over) = sealed_events(&job_id, Some(first));
    let head = stream::iter(head.into_iter().map(Ok::<_, Infallible>));
    let state = if over {
        Relay::Done
    } else {
        Relay::Open(job_id, rx)
    };
    let rest = stream::unfold(state, |state| async move {
        match state {
            Relay::Done => None,
            Relay::Open(job_id, mut rx) => {
                let (evs, over) = sealed_events(&job_id, rx.recv().await);
                Some((
                    evs,
                    if over {
                        Relay::Done
                    } else {
                        Relay::Open(job_id, rx)
                    },
                ))
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    let mut resp = sse(Box::pin(head.chain(rest)));
    resp.headers_mut().extend(receipt);
    resp
}

/// A plain-mode stream being relayed.
pub(super) struct PlainStream {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub max_tokens: u64,
    pub include_usage: bool,
    /// `n` > 1 or `logprobs`: the node's chunks carry structured choices
    /// ([`StructuredChunk`]) rather than raw text.
    pub choices: ChoiceParams,
    /// `n`, `logprobs` or tools: structured chunks.
    pub structured: bool,
    pub opener: StreamOpener,
    pub rx: mpsc::Receiver<JobEvent>,
    /// The first chunk (or the final one), already received.
    pub pending: Option<JobEvent>,
    pub done: bool,
    /// The settlement receipt, for the response headers.
    pub receipt: HeaderMap,
}

/// Relay a plain-mode stream: the role chunk, then each node chunk opened
/// and re-sent as OpenAI events.
pub(super) fn plain(mut state: PlainStream) -> Response {
    let receipt = std::mem::take(&mut state.receipt);
    // OpenAI opens each choice with its role.
    let head = stream::iter(
        (0..state.choices.n)
            .map(|i| {
                data(
                    &ChatCompletionChunk::role(&state.id, state.created, &state.model)
                        .for_choice(i),
                )
            })
            .collect::<Vec<_>>(),
    );
    let body = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let ev = match s.pending.take() {
            Some(ev) => Some(ev),
            None => s.rx.recv().await,
        };
        let events = s.translate(ev);
        Some((events, s))
    })
    .flat_map(stream::iter);
    let mut resp = sse(Box::pin(head.chain(body)));
    resp.headers_mut().extend(receipt);
    resp
}

impl PlainStream {
    fn error(&mut self, message: &str) -> Vec<Result<Event, Infallible>> {
        self.done = true;
        vec![Ok(error_event(message))]
    }

    /// Open each chunk in order (the opener is rebuilt per chunk from the
    /// running seq, since it borrows the key) and turn it into OpenAI events.
    fn translate(&mut self, ev: Option<JobEvent>) -> Vec<Result<Event, Infallible>> {
        let (c, refunded) = match ev {
            Some(JobEvent::Chunk(c)) => (c, None),
            Some(JobEvent::Final(c, billed)) => (c, billed.refunded),
            Some(JobEvent::Failed(why)) | Some(JobEvent::BadInput(why)) => {
                return self.error(&format!("the node failed: {why}"))
            }
            Some(JobEvent::Complete(..) | JobEvent::Unstarted(..)) | None => {
                return self.error("the stream ended without a final chunk")
            }
        };
        let (Some(seq), Some(fin), Some(ct)) = (c.seq, c.is_final, c.ciphertext.as_deref()) else {
            return self.error("malformed chunk");
        };
        let text = match self
            .opener
            .open(seq, fin, c.ephemeral_public_key.as_deref(), ct)
        {
            Ok(t) => t.to_string(),
            Err(e) => return self.error(&format!("chunk does not open: {e}")),
        };
        let mut out = Vec::new();
        if self.structured {
            return self.translate_structured(&text, fin, c.usage, c.usage_signature, refunded);
        }
        if !text.is_empty() {
            out.push(data(&ChatCompletionChunk::content(
                &self.id,
                self.created,
                &self.model,
                &text,
            )));
        }
        if fin {
            self.done = true;
            let usage = c.usage.unwrap_or_default();
            let finish = finish_reason(None, usage, self.max_tokens);
            let mut last = ChatCompletionChunk::finish(&self.id, self.created, &self.model, finish);
            if self.include_usage {
                out.push(data(&last));
                last = ChatCompletionChunk::usage(&self.id, self.created, &self.model, usage);
                last.usage_signature = c.usage_signature;
            }
            // The refund rides on the last chunk before `[DONE]`.
            last.refunded_micros = refunded.map(|m| m.0);
            out.push(data(&last));
            out.push(Ok(done()));
        }
        out
    }
}

impl PlainStream {
    /// A chunk of a job that asked for `n` or `logprobs`: one event per
    /// choice it carries (each choice's finish comes from the node), then at
    /// the end the usage when asked for and `[DONE]`.
    fn translate_structured(
        &mut self,
        text: &str,
        fin: bool,
        usage: Option<crate::proto::openai::Usage>,
        usage_signature: Option<String>,
        refunded: Option<Micros>,
    ) -> Vec<Result<Event, Infallible>> {
        let mut events = Vec::new();
        if !text.is_empty() {
            let chunk: StructuredChunk = match serde_json::from_str(text) {
                Ok(c) => c,
                Err(e) => return self.error(&format!("chunk is not a structured chunk: {e}")),
            };
            for choice in chunk.choices {
                let mut c = ChatCompletionChunk::content(&self.id, self.created, &self.model, "");
                c.choices = vec![choice];
                events.push(c);
            }
        }
        if fin {
            self.done = true;
            if self.include_usage {
                let mut u = ChatCompletionChunk::usage(
                    &self.id,
                    self.created,
                    &self.model,
                    usage.unwrap_or_default(),
                );
                u.usage_signature = usage_signature;
                events.push(u);
            }
            // The refund rides on the last chunk before `[DONE]`.
            if let Some(last) = events.last_mut() {
                last.refunded_micros = refunded.map(|m| m.0);
            }
        }
        let mut out: Vec<_> = events.iter().map(data).collect();
        if fin {
            out.push(Ok(done()));
        }
        out
    }
}
