//! OpenAI's `n`, `logprobs` and `top_logprobs`: how a request asks for
//! several completions of one prompt and for the log-probabilities of the
//! sampled tokens, and the shape those come back in (`choices[i].logprobs`,
//! in a `chat.completion` and in each streamed chunk alike).
//!
//! The parameters are read from the request's `extra` map, where every
//! parameter without a typed field lands, so that the request type stays as
//! it is; [`check`] is the one place their ranges are enforced.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tools::{self, ToolSpec};

use super::{AssistantMessage, ChatCompletionRequest, Choice, FinishReason, InvalidRequest, Usage};
use crate::proto::limits::{MAX_N, MAX_TOP_LOGPROBS};

/// One token of `logprobs.content`: OpenAI's `ChatCompletionTokenLogprob`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenLogprob {
    /// The token's text (its bytes read as UTF-8, lossily where a token holds
    /// part of a character).
    pub token: String,
    /// The natural log of the token's probability under the model.
    pub logprob: f32,
    /// The token's UTF-8 bytes; several tokens' bytes together make a
    /// character that one token alone cuts.
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens at this step, most likely first; as many as
    /// `top_logprobs` asked for (none when it asked for 0).
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative of [`TokenLogprob::top_logprobs`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

/// `choices[i].logprobs` of a completion or of one streamed chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Option<Vec<TokenLogprob>>,
    /// OpenAI's field for the tokens of a refusal; this engine never refuses.
    #[serde(default)]
    pub refusal: Option<Vec<TokenLogprob>>,
}

impl ChoiceLogprobs {
    pub fn content(tokens: Vec<TokenLogprob>) -> Self {
        ChoiceLogprobs {
            content: Some(tokens),
            refusal: None,
        }
    }
}

/// What a request asks of `n`, `logprobs` and `top_logprobs`, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChoiceParams {
    /// Completions of the prompt, 1 to [`MAX_N`].
    pub n: u32,
    /// `None`: no logprobs; `Some(k)`: logprobs with the `k` most likely
    /// alternatives at each step (0 to [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<u8>,
}

impl Default for ChoiceParams {
    fn default() -> Self {
        ChoiceParams {
            n: 1,
            logprobs: None,
        }
    }
}

impl ChoiceParams {
    /// Whether the request asks for anything beyond one completion without
    /// logprobs (the only thing a public node or SDK knows).
    pub fn is_extended(&self) -> bool {
        self.n > 1 || self.logprobs.is_some()
    }
}

fn present<'a>(req: &'a ChatCompletionRequest, name: &str) -> Option<&'a Value> {
    req.extra.get(name).filter(|v| !v.is_null())
}

/// Check the three parameters under OpenAI's rules and the caps: `n` an
/// integer in 1..=[`MAX_N`], `logprobs` a boolean, `top_logprobs` an integer
/// in 0..=[`MAX_TOP_LOGPROBS`] that asks for alternatives only with
/// `logprobs: true`. `null` is absent, as OpenAI reads it.
pub fn check(req: &ChatCompletionRequest) -> Result<ChoiceParams, InvalidRequest> {
    let n = match present(req, "n") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_N)).contains(&n) => n as u32,
            _ => return Err(InvalidRequest::N),
        },
    };
    let logprobs = match present(req, "logprobs") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(InvalidRequest::Logprobs),
    };
    let top = match present(req, "top_logprobs") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= u64::from(MAX_TOP_LOGPROBS) => Some(k as u8),
            _ => return Err(InvalidRequest::TopLogprobs),
        },
    };
    // OpenAI: "logprobs must be set to true if top_logprobs is used"; 0
    // asks for nothing and stays accepted alone, as it was before.
    if top.is_some_and(|k| k > 0) && !logprobs {
        return Err(InvalidRequest::TopLogprobsWithoutLogprobs);
    }
    Ok(ChoiceParams {
        n,
        logprobs: logprobs.then_some(top.unwrap_or(0)),
    })
}

impl ChatCompletionRequest {
    /// `n`, `logprobs` and `top_logprobs` as [`check`] reads them; a request
    /// that [`ChatCompletionRequest::validate`] passed always has them.
    pub fn choice_params(&self) -> ChoiceParams {
        check(self).unwrap_or_default()
    }
}

/// The plaintext of a stream chunk of a job that asked for `n` > 1 or
/// `logprobs` (sgl extension; only sgl clients ask for those): compact JSON
/// of OpenAI's streamed choices, each with its `index`, content delta,
/// logprobs and, on a choice's last piece, its `finish_reason`. Other jobs'
/// chunks stay raw text (§3.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StructuredChunk {
    pub choices: Vec<super::ChunkChoice>,
}

/// The logprobs of one streamed delta: `None` when none were asked for.
pub fn delta_logprobs(tokens: Vec<TokenLogprob>) -> Option<ChoiceLogprobs> {
    (!tokens.is_empty()).then(|| ChoiceLogprobs::content(tokens))
}

/// The choices of a non-stream answer, built from each choice's pieces as
/// they arrive in any order, and the usage of them all: the prompt once (the
/// choices share it) and every choice's completion tokens, which is what
/// OpenAI bills for `n` completions.
#[derive(Debug, Default)]
pub struct Answers {
    logprobs: bool,
    /// Tools: each choice's text is split into content and calls.
    tools: Option<Arc<ToolSpec>>,
    choices: Vec<Answer>,
    prompt_tokens: u64,
    cached_tokens: u64,
}

#[derive(Debug, Default, Clone)]
struct Answer {
    text: String,
    /// Calls that arrived already split out (a structured stream's
    /// `delta.tool_calls`).
    calls: Vec<super::ToolCall>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    completion_tokens: u64,
}

impl Answers {
    /// `logprobs`: whether each choice carries `logprobs.content`.
    pub fn new(logprobs: bool) -> Self {
        Answers {
            logprobs,
            ..Answers::default()
        }
    }

    /// Split each choice's text into content and the tool calls in it.
    pub fn with_tools(mut self, tools: Option<Arc<ToolSpec>>) -> Self {
        self.tools = tools;
        self
    }

    fn at(&mut self, index: u32) -> &mut Answer {
        let i = index as usize;
        if self.choices.len() <= i {
            self.choices.resize(i + 1, Answer::default());
        }
        &mut self.choices[i]
    }

    /// A piece of choice `index`.
    pub fn push(&mut self, index: u32, text: &str, logprobs: Vec<TokenLogprob>) {
        let a = self.at(index);
        a.text.push_str(text);
        a.logprobs.extend(logprobs);
    }

    /// Whole calls of choice `index`, as a structured stream's
    /// `delta.tool_calls` carry them.
    pub fn push_calls(&mut self, index: u32, calls: Vec<super::ToolCallDelta>) {
        let a = self.at(index);
        for c in calls {
            let f = c.function.unwrap_or(super::tools::FunctionCallDelta {
                name: None,
                arguments: None,
            });
            a.calls.push(super::ToolCall {
                id: c.id.unwrap_or_default(),
                kind: c.kind.unwrap_or_else(|| "function".into()),
                function: super::tools::FunctionCall {
                    name: f.name.unwrap_or_default(),
                    arguments: f.arguments.unwrap_or_default(),
                },
            });
        }
    }

    /// Choice `index` ended.
    pub fn done(
        &mut self,
        index: u32,
        finish: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        cached_tokens: u32,
    ) {
        let a = self.at(index);
        a.finish = Some(finish);
        a.completion_tokens = u64::from(completion_tokens);
        self.prompt_tokens = u64::from(prompt_tokens);
        self.cached_tokens = u64::from(cached_tokens);
    }

    /// The choices in index order and the usage; `None` unless every choice
    /// ended.
    pub fn finish(self) -> Option<(Vec<Choice>, Usage)> {
        if self.choices.is_empty() || self.choices.iter().any(|a| a.finish.is_none()) {
            return None;
        }
        let completion = self.choices.iter().map(|a| a.completion_tokens).sum();
        let usage =
            Usage::new(self.prompt_tokens, completion).with_cached_tokens(self.cached_tokens);
        let logprobs = self.logprobs;
        let spec = self.tools;
        let choices = self
            .choices
            .into_iter()
            .zip(0u32..)
            .map(|(a, index)| {
                let (message, finish) = if a.calls.is_empty() {
                    tool_message(spec.as_ref(), a.text, a.finish)
                } else {
                    let t = a.text.trim();
                    let message = AssistantMessage {
                        role: "assistant".into(),
                        content: (!t.is_empty()).then(|| t.to_string()),
                        tool_calls: Some(a.calls),
                    };
                    (message, a.finish)
                };
                Choice {
                    index,
                    message,
                    logprobs: logprobs.then(|| ChoiceLogprobs::content(a.logprobs)),
                    finish_reason: finish,
                }
            })
            .collect();
        Some((choices, usage))
    }
}

/// A whole completion as the assistant's message: with tools, the calls in
/// its text lifted out and the finish reason `tool_calls` when it made any
/// and was not cut short.
pub fn tool_message(
    spec: Option<&Arc<ToolSpec>>,
    text: String,
    finish: Option<FinishReason>,
) -> (AssistantMessage, Option<FinishReason>) {
    let Some(spec) = spec else {
        return (AssistantMessage::text(text), finish);
    };
    let (content, calls) = tools::split_output(spec, &text);
    if calls.is_empty() {
        return (AssistantMessage::text(text), finish);
    }
    let finish = match finish {
        Some(FinishReason::Length) => Some(FinishReason::Length),
        _ => Some(FinishReason::ToolCalls),
    };
    let message = AssistantMessage {
        role: "assistant".into(),
        content,
        tool_calls: Some(calls),
    };
    (message, finish)
}

/// The usage of a streamed answer of `n` choices, complete when each has
/// ended.
#[derive(Debug)]
pub struct StreamUsage {
    left: u32,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
}

impl StreamUsage {
    pub fn new(n: u32) -> Self {
        StreamUsage {
            left: n.max(1),
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    /// A choice ended; the usage of all once the last has.
    pub fn done(
        &mut self,
        prompt_tokens: u32,
        completion_tokens: u32,
        cached: u32,
    ) -> Option<Usage> {
        self.prompt_tokens = u64::from(prompt_tokens);
        self.cached_tokens = u64::from(cached);
        self.completion_tokens += u64::from(completion_tokens);
        self.left = self.left.saturating_sub(1);
        (self.left == 0).then(|| {
            Usage::new(self.prompt_tokens, self.completion_tokens)
                .with_cached_tokens(self.cached_tokens)
        })
    }
}

impl super::ChatCompletionChunk {
    /// The same events for choice `index` of an `n` > 1 request.
    pub fn for_choice(mut self, index: u32) -> Self {
        for c in &mut self.choices {
            c.index = index;
        }
        self
    }

    /// Attach the logprobs of this delta's tokens.
    pub fn with_logprobs(mut self, logprobs: Option<ChoiceLogprobs>) -> Self {
        for c in &mut self.choices {
            c.logprobs = logprobs.clone();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(extra: Value) -> Result<ChoiceParams, InvalidRequest> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        let checked = check(&req);
        // The one check of a request runs this one.
        assert_eq!(req.validate().err(), checked.clone().err());
        checked
    }

    #[test]
    fn ranges_and_combinations() {
        assert_eq!(params(json!({})), Ok(ChoiceParams::default()));
        assert_eq!(
            params(json!({"n": 3, "logprobs": true, "top_logprobs": 20})),
            Ok(ChoiceParams {
                n: 3,
                logprobs: Some(20)
            })
        );
        assert_eq!(
            params(json!({"logprobs": true})),
            Ok(ChoiceParams {
                n: 1,
                logprobs: Some(0)
            })
        );
        assert_eq!(
            params(json!({"n": null, "logprobs": false, "top_logprobs": 0})),
            Ok(ChoiceParams::default())
        );
        for bad in [
            json!(0),
            json!(MAX_N + 1),
            json!(1.5),
            json!("2"),
            json!(-1),
        ] {
            assert_eq!(params(json!({ "n": bad })), Err(InvalidRequest::N));
        }
        assert_eq!(
            params(json!({"logprobs": "yes"})),
            Err(InvalidRequest::Logprobs)
        );
        assert_eq!(
            params(json!({"logprobs": true, "top_logprobs": 21})),
            Err(InvalidRequest::TopLogprobs)
        );
        assert_eq!(
            params(json!({"top_logprobs": 2})),
            Err(InvalidRequest::TopLogprobsWithoutLogprobs)
        );
        assert_eq!(
            params(json!({"logprobs": false, "top_logprobs": 2})),
            Err(InvalidRequest::TopLogprobsWithoutLogprobs)
        );
    }

    #[test]
    fn logprobs_have_the_openai_shape() {
        let lp = ChoiceLogprobs::content(vec![TokenLogprob {
            token: "Hi".into(),
            logprob: -0.5,
            bytes: Some(b"Hi".to_vec()),
            top_logprobs: vec![TopLogprob {
                token: "Hi".into(),
                logprob: -0.5,
                bytes: Some(b"Hi".to_vec()),
            }],
        }]);
        assert_eq!(
            serde_json::to_value(&lp).unwrap(),
            json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                    "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}],
                   "refusal": null})
        );
    }
}
