//! How `sgl chat` prints an answer of several choices or with logprobs:
//! each choice's text, under a label when there are several, then one line
//! per token with its log probability and the alternatives asked for.

use std::fmt::Write;

use sgl::proto::openai::{Choice, TokenLogprob};

/// The text of every choice, in index order, ready to print.
pub fn choices_text(choices: &[Choice]) -> String {
    let mut out = String::new();
    let labelled = choices.len() > 1;
    for c in choices {
        if labelled {
            let _ = writeln!(out, "--- choice {} ---", c.index);
        }
        let _ = writeln!(out, "{}", c.message.text_or_empty());
        let tokens = c
            .logprobs
            .as_ref()
            .and_then(|l| l.content.as_deref())
            .unwrap_or_default();
        if c.logprobs.is_some() {
            let _ = writeln!(out, "logprobs:");
            for t in tokens {
                out.push_str(&token_line(t));
            }
        }
    }
    out
}

/// `  "tok"  -0.1234`, then `  | "alt" -1.0000, …` when alternatives came.
/// The token is quoted with Rust's escapes so that whitespace and control
/// characters stay visible.
fn token_line(t: &TokenLogprob) -> String {
    let mut line = format!("  {:?}\t{:.4}", t.token, t.logprob);
    if !t.top_logprobs.is_empty() {
        let alts: Vec<String> = t
            .top_logprobs
            .iter()
            .map(|a| format!("{:?} {:.4}", a.token, a.logprob))
            .collect();
        let _ = write!(line, "\t| {}", alts.join(", "));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use sgl::proto::openai::choices::{ChoiceLogprobs, TopLogprob};
    use sgl::proto::openai::{AssistantMessage, FinishReason};

    fn choice(index: u32, text: &str, logprobs: Option<Vec<TokenLogprob>>) -> Choice {
        Choice {
            index,
            message: AssistantMessage::text(text.into()),
            logprobs: logprobs.map(ChoiceLogprobs::content),
            finish_reason: Some(FinishReason::Stop),
        }
    }

    fn token(text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token: text.into(),
            logprob,
            bytes: Some(text.as_bytes().to_vec()),
            top_logprobs: top
                .iter()
                .map(|(t, l)| TopLogprob {
                    token: (*t).into(),
                    logprob: *l,
                    bytes: None,
                })
                .collect(),
        }
    }

    #[test]
    fn one_choice_is_printed_bare_and_several_labelled() {
        assert_eq!(choices_text(&[choice(0, "hi", None)]), "hi\n");
        assert_eq!(
            choices_text(&[choice(0, "a", None), choice(1, "b", None)]),
            "--- choice 0 ---\na\n--- choice 1 ---\nb\n"
        );
    }

    #[test]
    fn logprobs_are_one_token_a_line_with_the_alternatives() {
        let c = choice(
            0,
            "Hi there",
            Some(vec![
                token("Hi", -0.25, &[]),
                token(" there", -1.5, &[(" there", -1.5), ("\n", -2.0)]),
            ]),
        );
        assert_eq!(
            choices_text(&[c]),
            "Hi there\nlogprobs:\n  \"Hi\"\t-0.2500\n  \" there\"\t-1.5000\t| \" there\" -1.5000, \"\\n\" -2.0000\n"
        );
    }
}
