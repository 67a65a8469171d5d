//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`)
//! rendered with minijinja, or a built-in one per architecture when the model
//! carries none.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// A message as the template sees it: role and text content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

/// ChatML, used by SmolLM2, Qwen2 and many others.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The Llama 3 instruct format.
pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Renders one template. Templates run with a fuel limit so a pathological one
/// cannot spin forever.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(5_000_000));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template to use: the model's, else one chosen from the
    /// architecture and the special tokens the vocabulary has.
    pub fn fallback_source(architecture: &str, has_token: &dyn Fn(&str) -> bool) -> &'static str {
        if has_token("<|start_header_id|>") && architecture == "llama" {
            LLAMA3
        } else {
            CHATML
        }
    }

    /// Render the prompt, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let s = t.render(&[msg("user", "hi")]).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    /// Tools reach ChatML (SmolLM2's format, and Qwen2.5's, whose own
    /// template writes a system message, a call and a tool result exactly
    /// so) in the Hermes format.
    #[test]
    fn tools_render_into_chatml() {
        use crate::proto::openai::{tools, ChatMessage};
        let spec = tools::parse(
            Some(
                &serde_json::json!([{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]),
            ),
            None,
        )
        .unwrap()
        .unwrap();
        let msgs: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
        ]))
        .unwrap();
        let rendered: Vec<TemplateMessage> = tools::render_messages(&msgs, Some(&spec))
            .into_iter()
            .map(|m| msg(&m.role, &m.content.text()))
            .collect();
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let s = t.render(&rendered).unwrap();
        let want = concat!(
            "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n",
            "You may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            "{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": ",
            "{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\"}}}}}\n</tools>\n\n",
            "For each function call, return a json object with function name and arguments within ",
            "<tool_call></tool_call> XML tags:\n<tool_call>\n",
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\ngo<|im_end|>\n",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(s, want);
    }

    #[test]
    fn raise_exception_is_an_error_and_pycompat_methods_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() }}",
            "",
            "",
        )
        .unwrap();
        assert!(t.render(&[msg("system", "x")]).is_err());
        assert_eq!(t.render(&[msg("user", "  hi ")]).unwrap(), "hi");
    }

    #[test]
    fn runaway_template_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.render(&[msg("user", "hi")]).is_err());
    }
}
