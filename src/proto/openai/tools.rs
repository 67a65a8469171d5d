//! OpenAI's `tools` and `tool_choice`: function calling.
//!
//! The catalogue's models have no tool-call tokens of their own, so a call
//! is text in one format, written here and nowhere else: the Hermes format
//! that Qwen2.5's own chat template uses. The tools go into the system
//! message as one JSON line each inside `<tools></tools>`, the model answers
//! a call as `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, an
//! earlier call of the conversation is written back the same way, and a
//! tool's result goes back as `<tool_response>…</tool_response>` in a user
//! turn. Qwen2.5 was trained on exactly this text; SmolLM2's ChatML has no
//! tool format at all, so it gets the same text, which at least is one it
//! can copy from the system message. Rendering the messages here, before any
//! chat template runs, gives both models (and a node whatever its template)
//! the same prompt.
//!
//! Output: `tool_choice` `"required"` or a named function decodes under a
//! grammar ([`ToolSpec::grammar`]) whose only values are
//! `{"name": <a tool>, "arguments": <valid against its parameters>}`, with
//! no tags around it; `"auto"` lets the model write freely and
//! [`ToolStream`] lifts the `<tool_call>` blocks out of its text. A block
//! that is not JSON naming a known tool stays content.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::json_schema::{JsonGrammar, SchemaError};
use super::ChatMessage;

/// Tools one request may declare.
pub const MAX_TOOLS: usize = 64;
/// Bytes of the `tools` list as JSON text: it all goes into the prompt.
pub const MAX_TOOLS_BYTES: usize = 64 * 1024;
/// The longest function name OpenAI takes.
const MAX_NAME: usize = 64;

/// The tags of the format (see the module documentation).
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// One call the model made: OpenAI's `message.tool_calls[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

/// The function a [`ToolCall`] calls; `arguments` is JSON text, as OpenAI
/// sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// A streamed piece of a call: `delta.tool_calls[i]`. This server sends
/// each call whole in one delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCall {
    /// A call with a fresh id (`call_` and 24 random hex digits).
    pub fn new(name: &str, arguments: String) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        ToolCall {
            id: format!("call_{}", &id[..24]),
            kind: function_kind(),
            function: FunctionCall {
                name: name.to_string(),
                arguments,
            },
        }
    }

    /// The whole call as the one delta of a stream.
    pub fn delta(&self, index: u32) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: Some(self.id.clone()),
            kind: Some(self.kind.clone()),
            function: Some(FunctionCallDelta {
                name: Some(self.function.name.clone()),
                arguments: Some(self.function.arguments.clone()),
            }),
        }
    }
}

/// Why `tools` or `tool_choice` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsError {
    #[error("tools: {0}")]
    Tools(String),
    #[error("tools[{index}].function.name: {message}")]
    Name { index: usize, message: String },
    #[error("tools[{index}].function.parameters: {error}")]
    Schema { index: usize, error: SchemaError },
    #[error("tool_choice: {0}")]
    Choice(String),
}

impl ToolsError {
    /// The parameter at fault (OpenAI's `param`).
    pub fn param(&self) -> String {
        match self {
            ToolsError::Tools(_) => "tools".into(),
            ToolsError::Name { index, .. } => format!("tools[{index}].function.name"),
            ToolsError::Schema { index, .. } => format!("tools[{index}].function.parameters"),
            ToolsError::Choice(_) => "tool_choice".into(),
        }
    }
}

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of its arguments (`{"type": "object"}` when absent).
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model may answer in text or call any tools.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this one.
    Named(String),
}

/// A request's tools once checked: never empty, and never with
/// `tool_choice: "none"`, which asks for nothing ([`parse`] gives `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// For a forced call: the grammar of its JSON.
    grammar: Option<Arc<JsonGrammar>>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Read `tools` and `tool_choice` (either may be absent or `null`). `None`
/// when the request asks for no tool: no tools, an empty list, or
/// `tool_choice: "none"`.
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
) -> Result<Option<ToolSpec>, ToolsError> {
    let list = match tools {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(ToolsError::Tools("must be a list".into())),
    };
    if list.len() > MAX_TOOLS {
        return Err(ToolsError::Tools(format!(
            "at most {MAX_TOOLS} tools are allowed, got {}",
            list.len()
        )));
    }
    let bytes = serde_json::to_string(list).map(|s| s.len()).unwrap_or(0);
    if bytes > MAX_TOOLS_BYTES {
        return Err(ToolsError::Tools(format!(
            "the tools exceed {MAX_TOOLS_BYTES} bytes of JSON"
        )));
    }
    let mut parsed: Vec<Tool> = Vec::with_capacity(list.len());
    for (index, t) in list.iter().enumerate() {
        let shape = |m: &str| ToolsError::Tools(format!("tools[{index}]: {m}"));
        let o = t.as_object().ok_or_else(|| shape("must be an object"))?;
        if o.get("type").and_then(Value::as_str) != Some("function") {
            return Err(shape("type must be \"function\""));
        }
        let f = o
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| shape("needs a function object"))?;
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n) if valid_name(n) => n.to_string(),
            _ => {
                return Err(ToolsError::Name {
                    index,
                    message: "must be 1 to 64 letters, digits, _ or -".into(),
                })
            }
        };
        if parsed.iter().any(|p| p.name == name) {
            return Err(ToolsError::Name {
                index,
                message: format!("{name:?} is declared twice"),
            });
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(shape("function.description must be a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(shape("function.parameters must be a JSON schema object")),
        };
        // Checked alone, so that an error names this tool.
        JsonGrammar::from_schema(&parameters)
            .map_err(|error| ToolsError::Schema { index, error })?;
        parsed.push(Tool {
            name,
            description,
            parameters,
        });
    }
    let choice = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            _ => {
                return Err(ToolsError::Choice(
                    "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = (o.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| o.get("function").and_then(|f| f.get("name")))
                .flatten()
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ToolsError::Choice(
                        "an object must be {\"type\": \"function\", \"function\": {\"name\": …}}"
                            .into(),
                    )
                })?;
            if !parsed.iter().any(|t| t.name == name) {
                let shown: String = name.chars().take(64).collect();
                return Err(ToolsError::Choice(format!(
                    "function {shown:?} is not one of the tools"
                )));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
        Some(_) => return Err(ToolsError::Choice("must be a string or an object".into())),
    };
    if parsed.is_empty() {
        return match choice {
            None | Some(ToolChoice::Auto) => Ok(None),
            Some(_) => Err(ToolsError::Choice(
                "a call is required but no tools are given".into(),
            )),
        };
    }
    let choice = choice.unwrap_or(ToolChoice::Auto);
    let grammar = forced_grammar(&parsed, &choice)?;
    Ok(Some(ToolSpec {
        tools: parsed,
        choice,
        grammar,
    }))
}

/// The grammar of a forced call: `{"name": <const>, "arguments": <schema>}`
/// for each tool it may call, as one `anyOf`.
fn forced_grammar(
    tools: &[Tool],
    choice: &ToolChoice,
) -> Result<Option<Arc<JsonGrammar>>, ToolsError> {
    let callable: Vec<(usize, &Tool)> = match choice {
        ToolChoice::Auto => return Ok(None),
        ToolChoice::Required => tools.iter().enumerate().collect(),
        ToolChoice::Named(n) => tools
            .iter()
            .enumerate()
            .filter(|(_, t)| &t.name == n)
            .collect(),
    };
    let branches: Vec<Value> = callable
        .iter()
        .map(|(_, t)| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match branches.as_slice() {
        [one] => one.clone(),
        _ => json!({ "anyOf": branches }),
    };
    JsonGrammar::from_schema(&schema)
        .map(|g| Some(Arc::new(g)))
        .map_err(|error| ToolsError::Schema {
            index: callable.first().map(|(i, _)| *i).unwrap_or(0),
            error,
        })
}

impl ToolSpec {
    /// The grammar the output follows: `Some` when a call is forced.
    pub fn grammar(&self) -> Option<Arc<JsonGrammar>> {
        self.grammar.clone()
    }

    /// Whether the whole output is one call's JSON (no tags).
    pub fn is_forced(&self) -> bool {
        self.grammar.is_some()
    }

    fn is_known(&self, name: &str) -> bool {
        self.tools.iter().any(|t| t.name == name)
    }

    /// The tools section of the system message (Hermes format).
    pub fn system_block(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in &self.tools {
            let name = Value::String(t.name.clone());
            let mut f = format!("{{\"name\": {name}");
            if let Some(d) = &t.description {
                f.push_str(&format!(", \"description\": {}", Value::String(d.clone())));
            }
            f.push_str(&format!(", \"parameters\": {}}}", py_json(&t.parameters)));
            s.push_str(&format!("\n{{\"type\": \"function\", \"function\": {f}}}"));
        }
        s.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
        s
    }

    /// Read one call's JSON text: an object with a known `name` and
    /// `arguments` an object (or JSON text of one); the arguments come back
    /// as compact JSON text.
    pub fn read_call(&self, text: &str) -> Option<(String, String)> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let name = v.get("name")?.as_str()?;
        if !self.is_known(name) {
            return None;
        }
        let args = match v.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(a @ Value::Object(_)) => a.clone(),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(a @ Value::Object(_)) => a,
                _ => return None,
            },
            Some(_) => return None,
        };
        Some((name.to_string(), args.to_string()))
    }
}

/// The system text used when tools are given and the conversation has no
/// system message of its own.
const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// The messages a chat template gets: the tools (if any) appended to the
/// system message, earlier calls written into their assistant turns, and
/// tool results as `<tool_response>` blocks in a user turn (consecutive
/// results in one turn). A conversation without tools, calls or results
/// comes back as it was.
pub fn render_messages(messages: &[ChatMessage], spec: Option<&ToolSpec>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(spec) = spec {
        let block = spec.system_block();
        match messages.first() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                out.push(ChatMessage::new(
                    "system",
                    &format!("{}\n\n{block}", m.content.text()),
                ));
            }
            _ => out.push(ChatMessage::new(
                "system",
                &format!("{DEFAULT_SYSTEM}\n\n{block}"),
            )),
        }
    }
    let skip = usize::from(
        spec.is_some()
            && messages
                .first()
                .is_some_and(|m| m.role == "system" || m.role == "developer"),
    );
    let mut prev_tool = false;
    for m in &messages[skip..] {
        if m.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content.text());
            match out.last_mut() {
                Some(last) if prev_tool => {
                    let joined = format!("{}\n{block}", last.content.text());
                    *last = ChatMessage::new("user", &joined);
                }
                _ => out.push(ChatMessage::new("user", &block)),
            }
            prev_tool = true;
            continue;
        }
        prev_tool = false;
        let calls = m.tool_calls.as_deref().unwrap_or_default();
        if m.role == "assistant" && !calls.is_empty() {
            let mut text = m.content.text();
            for c in calls {
                // The arguments as an object when they are JSON, as the
                // model writes them.
                let args = serde_json::from_str::<Value>(&c.function.arguments)
                    .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
                let call = format!(
                    "{{\"name\": {}, \"arguments\": {}}}",
                    Value::String(c.function.name.clone()),
                    py_json(&args)
                );
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!("{CALL_OPEN}\n{call}\n{CALL_CLOSE}"));
            }
            out.push(ChatMessage::new("assistant", &text));
            continue;
        }
        out.push(ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            name: m.name.clone(),
            tool_calls: None,
            tool_call_id: None,
        });
    }
    out
}

/// Whether rendering changes anything: tools to show, or calls and results
/// in the conversation.
pub fn needs_rendering(messages: &[ChatMessage], spec: Option<&ToolSpec>) -> bool {
    spec.is_some()
        || messages
            .iter()
            .any(|m| m.role == "tool" || m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()))
}

/// What the output turns into, piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    Call(ToolCall),
}

/// Lifts tool calls out of one completion's text as it arrives. Text that
/// may begin a `<tool_call>` tag is held back until it is known not to; a
/// call is given whole once its block closes (or, forced, once the output
/// ends).
#[derive(Debug, Clone)]
pub struct ToolStream {
    spec: Arc<ToolSpec>,
    buf: String,
    in_call: bool,
    calls: u32,
}

impl ToolStream {
    pub fn new(spec: Arc<ToolSpec>) -> Self {
        ToolStream {
            spec,
            buf: String::new(),
            in_call: false,
            calls: 0,
        }
    }

    /// Calls given so far.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    fn call(&mut self, name: String, args: String) -> Piece {
        self.calls += 1;
        Piece::Call(ToolCall::new(&name, args))
    }

    /// The next piece of text; what can be given already.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.spec.is_forced() {
            return out;
        }
        loop {
            if !self.in_call {
                if let Some(at) = self.buf.find(CALL_OPEN) {
                    if at > 0 {
                        out.push(Piece::Content(self.buf[..at].to_string()));
                    }
                    self.buf.drain(..at + CALL_OPEN.len());
                    self.in_call = true;
                    continue;
                }
                let keep = partial_tag_len(&self.buf, CALL_OPEN);
                let give = self.buf.len() - keep;
                if give > 0 {
                    out.push(Piece::Content(self.buf[..give].to_string()));
                    self.buf.drain(..give);
                }
                return out;
            }
            let Some(at) = self.buf.find(CALL_CLOSE) else {
                return out;
            };
            let inner = self.buf[..at].to_string();
            self.buf.drain(..at + CALL_CLOSE.len());
            self.in_call = false;
            match self.spec.read_call(&inner) {
                Some((name, args)) => {
                    let p = self.call(name, args);
                    out.push(p);
                }
                None => out.push(Piece::Content(format!("{CALL_OPEN}{inner}{CALL_CLOSE}"))),
            }
        }
    }

    /// The output ended: whatever was held back. An unclosed block that
    /// holds a whole call is one (the model may stop right after the JSON).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        if self.spec.is_forced() || self.in_call {
            let was_open = self.in_call && !self.spec.is_forced();
            self.in_call = false;
            if let Some((name, args)) = self.spec.read_call(&rest) {
                return vec![self.call(name, args)];
            }
            let text = if was_open {
                format!("{CALL_OPEN}{rest}")
            } else {
                rest
            };
            return (!text.is_empty())
                .then_some(Piece::Content(text))
                .into_iter()
                .collect();
        }
        (!rest.is_empty())
            .then_some(Piece::Content(rest))
            .into_iter()
            .collect()
    }
}

/// The stream side of [`split_output`] for every choice of an answer: the
/// deltas each piece of text gives (content, and whole calls as
/// `delta.tool_calls`), and the finish reason each choice ends with.
#[derive(Debug, Clone, Default)]
pub struct DeltaSplitter {
    spec: Option<Arc<ToolSpec>>,
    streams: Vec<ToolStream>,
}

impl DeltaSplitter {
    /// Without tools every piece is one content delta, as it came.
    pub fn new(spec: Option<Arc<ToolSpec>>) -> Self {
        DeltaSplitter {
            spec,
            streams: Vec::new(),
        }
    }

    pub fn has_tools(&self) -> bool {
        self.spec.is_some()
    }

    fn stream(&mut self, index: u32) -> Option<&mut ToolStream> {
        let spec = self.spec.as_ref()?;
        let i = index as usize;
        while self.streams.len() <= i {
            self.streams.push(ToolStream::new(spec.clone()));
        }
        self.streams.get_mut(i)
    }

    /// The deltas a piece of choice `index` gives (none while text is held
    /// back).
    pub fn push(&mut self, index: u32, text: &str) -> Vec<super::Delta> {
        match self.stream(index) {
            None => vec![content_delta(text.to_string())],
            Some(s) => {
                let before = s.calls();
                let pieces = s.push(text);
                deltas(pieces, before)
            }
        }
    }

    /// Choice `index` ended: what was held back, and its finish reason.
    pub fn end(
        &mut self,
        index: u32,
        finish: super::FinishReason,
    ) -> (Vec<super::Delta>, super::FinishReason) {
        let Some(s) = self.stream(index) else {
            return (Vec::new(), finish);
        };
        let before = s.calls();
        let out = deltas(s.finish(), before);
        let finish = match finish {
            super::FinishReason::Stop if s.calls() > 0 => super::FinishReason::ToolCalls,
            f => f,
        };
        (out, finish)
    }
}

fn content_delta(text: String) -> super::Delta {
    super::Delta {
        role: None,
        content: Some(text),
        tool_calls: None,
    }
}

/// Pieces as deltas; calls are numbered on from `first`.
fn deltas(pieces: Vec<Piece>, first: u32) -> Vec<super::Delta> {
    let mut index = first;
    pieces
        .into_iter()
        .map(|p| match p {
            Piece::Content(c) => content_delta(c),
            Piece::Call(c) => {
                let d = c.delta(index);
                index += 1;
                super::Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![d]),
                }
            }
        })
        .collect()
}

/// JSON text as Python's `json.dumps` writes it (`", "` and `": "`
/// between items), which is how the templates the models learned from
/// write tools and calls.
fn py_json(v: &Value) -> String {
    match v {
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(py_json).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), py_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// The length of the longest end of `s` that begins `tag`.
fn partial_tag_len(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && s.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// A whole completion's text as OpenAI's message: the content (`None` when
/// only whitespace is left) and the calls.
pub fn split_output(spec: &Arc<ToolSpec>, text: &str) -> (Option<String>, Vec<ToolCall>) {
    let mut s = ToolStream::new(spec.clone());
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(c) => content.push_str(&c),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if calls.is_empty() {
        Some(content)
    } else {
        let t = content.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}])
    }

    fn spec(choice: Value) -> Arc<ToolSpec> {
        Arc::new(parse(Some(&weather()), Some(&choice)).unwrap().unwrap())
    }

    #[test]
    fn choices_and_refusals() {
        assert_eq!(parse(None, None), Ok(None));
        assert_eq!(parse(Some(&json!([])), Some(&json!("auto"))), Ok(None));
        assert_eq!(parse(Some(&weather()), Some(&json!("none"))), Ok(None));
        assert_eq!(spec(json!("auto")).choice, ToolChoice::Auto);
        assert!(!spec(json!("auto")).is_forced());
        assert!(spec(json!("required")).is_forced());
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        assert_eq!(spec(named).choice, ToolChoice::Named("get_time".into()));
        let e = parse(
            Some(&weather()),
            Some(&json!({"type": "function", "function": {"name": "nope"}})),
        )
        .unwrap_err();
        assert_eq!(e.param(), "tool_choice");
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(
            parse(None, Some(&json!("required"))).unwrap_err().param(),
            "tool_choice"
        );
        let many: Vec<Value> = (0..65)
            .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
            .collect();
        assert_eq!(
            parse(Some(&Value::Array(many)), None).unwrap_err().param(),
            "tools"
        );
        let bad_name = json!([{"type": "function", "function": {"name": "a b"}}]);
        assert_eq!(
            parse(Some(&bad_name), None).unwrap_err().param(),
            "tools[0].function.name"
        );
        let bad_schema = json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "string", "format": "email"}}}]);
        let e = parse(Some(&bad_schema), None).unwrap_err();
        assert_eq!(e.param(), "tools[0].function.parameters");
        assert!(e.to_string().contains("format"), "{e}");
        let big = json!([{"type": "function", "function": {"name": "f",
            "description": "x".repeat(MAX_TOOLS_BYTES)}}]);
        assert_eq!(parse(Some(&big), None).unwrap_err().param(), "tools");
        let twice = json!([{"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f"}}]);
        assert!(parse(Some(&twice), None).is_err());
    }

    #[cfg(feature = "node")]
    #[test]
    fn the_forced_grammar_takes_only_calls() {
        use crate::engine::grammar::automaton::State;
        let accepts = |g: &JsonGrammar, text: &str| {
            let mut s = State::start(g);
            s.advance(g, text.as_bytes()) && s.is_complete()
        };
        let g = spec(json!("required")).grammar().unwrap();
        assert!(accepts(
            &g,
            r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#
        ));
        assert!(accepts(&g, r#"{"name":"get_time","arguments":{}}"#));
        assert!(!accepts(&g, r#"{"name":"get_weather","arguments":{}}"#));
        assert!(!accepts(&g, r#"{"name":"other","arguments":{}}"#));
        let named = spec(json!({"type": "function", "function": {"name": "get_weather"}}));
        let g = named.grammar().unwrap();
        assert!(!accepts(&g, r#"{"name":"get_time","arguments":{}}"#));
        assert!(accepts(
            &g,
            r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}"#
        ));
    }

    #[test]
    fn calls_are_lifted_out_of_text() {
        let s = spec(json!("auto"));
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = split_output(&s, text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
        assert_ne!(calls[0].id, calls[1].id);
        assert_eq!(calls[1].function.arguments, "{}");
        // Broken JSON, or an unknown tool, stays content.
        let broken = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\n</tool_call>";
        let (content, calls) = split_output(&s, broken);
        assert!(calls.is_empty());
        assert_eq!(content.as_deref(), Some(broken));
        let unknown = "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>";
        assert_eq!(split_output(&s, unknown).0.as_deref(), Some(unknown));
        // Plain text is content as it was; an unclosed whole call is a call.
        assert_eq!(
            split_output(&s, "just words <tool").0.as_deref(),
            Some("just words <tool")
        );
        let open = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}";
        let (content, calls) = split_output(&s, open);
        assert_eq!((content, calls.len()), (None, 1));
        // Forced: the whole text is the call.
        let f = spec(json!("required"));
        let (content, calls) = split_output(&f, r#"{"name":"get_time","arguments":{}}"#);
        assert_eq!((content, calls.len()), (None, 1));
    }

    #[test]
    fn a_stream_holds_back_only_what_may_be_a_tag() {
        let s = spec(json!("auto"));
        let mut st = ToolStream::new(s);
        let mut got = Vec::new();
        for piece in [
            "Hi <",
            "b> <tool",
            "_call>\n{\"name\": \"get_time\", ",
            "\"arguments\": {}}\n</tool_",
            "call> bye",
        ] {
            got.extend(st.push(piece));
        }
        got.extend(st.finish());
        let contents: String = got
            .iter()
            .filter_map(|p| match p {
                Piece::Content(c) => Some(c.as_str()),
                Piece::Call(_) => None,
            })
            .collect();
        assert_eq!(contents, "Hi <b>  bye");
        assert_eq!(st.calls(), 1);
        assert!(matches!(&got[2], Piece::Call(c) if c.function.name == "get_time"));
    }

    #[test]
    fn the_splitter_numbers_calls_per_choice_and_ends_with_tool_calls() {
        use super::super::FinishReason;
        let mut sp = DeltaSplitter::new(Some(spec(json!("auto"))));
        let call = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let a = sp.push(0, call);
        let b = sp.push(0, call);
        assert_eq!(a[0].tool_calls.as_ref().unwrap()[0].index, 0);
        assert_eq!(b[0].tool_calls.as_ref().unwrap()[0].index, 1);
        assert_eq!(sp.push(1, "plain")[0].content.as_deref(), Some("plain"));
        assert_eq!(sp.end(0, FinishReason::Stop).1, FinishReason::ToolCalls);
        assert_eq!(sp.end(1, FinishReason::Stop).1, FinishReason::Stop);
        let mut forced = DeltaSplitter::new(Some(spec(json!("required"))));
        assert!(forced
            .push(0, "{\"name\":\"get_time\",\"arguments\":{}}")
            .is_empty());
        let (d, f) = forced.end(0, FinishReason::Stop);
        assert_eq!(f, FinishReason::ToolCalls);
        let c = &d[0].tool_calls.as_ref().unwrap()[0];
        assert_eq!(
            c.function.as_ref().unwrap().name.as_deref(),
            Some("get_time")
        );
        assert!(c.id.as_deref().unwrap().starts_with("call_"));
        let mut none = DeltaSplitter::new(None);
        assert_eq!(
            none.push(0, "<tool_call>")[0].content.as_deref(),
            Some("<tool_call>")
        );
    }

    #[test]
    fn messages_render_in_the_hermes_format() {
        let s = spec(json!("auto"));
        let msgs: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
        ]))
        .unwrap();
        let out = render_messages(&msgs, Some(&s));
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        let sys = out[0].content.text();
        assert!(
            sys.starts_with("You are a helpful assistant.\n\n# Tools\n"),
            "{sys}"
        );
        assert!(
            sys.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather of a city\", \"parameters\": {"),
            "{sys}"
        );
        assert!(sys.ends_with("</tool_call>"), "{sys}");
        assert_eq!(
            out[2].content.text(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(
            out[3].content.text(),
            "<tool_response>\n18C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
        // A system message of the caller's own is kept, with the tools after it.
        let mut with_sys = vec![ChatMessage::new("system", "Be brief.")];
        with_sys.extend(msgs.clone());
        let out = render_messages(&with_sys, Some(&s));
        assert!(out[0].content.text().starts_with("Be brief.\n\n# Tools"));
        assert_eq!(out.len(), 4);
        // No tools: calls and results are still written out.
        assert!(needs_rendering(&msgs, None));
        let plain = render_messages(&msgs, None);
        assert_eq!(plain[0].role, "user");
        assert!(!needs_rendering(&[ChatMessage::new("user", "x")], None));
    }
}
