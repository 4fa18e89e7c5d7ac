//! How the document and a question are laid out for the model: the text
//! before the document, between the document and the question, and after the
//! question (where the answer starts). A .sack records its layout, so `ask`
//! frames questions exactly as `compress` framed the document.
//!
//! - `raw`, SAC's layout (SAC adapters are trained on it): BOS (when the
//!   tokenizer has one), `### Context:\n` + document, then
//!   `\n### Question:\n` + question + `\n### Answer:\n`.
//! - `chat`, the model's own chat template, rendered once with minijinja:
//!   the document goes into the user turn after a short instruction, the
//!   question after it in the same turn, and the assistant's turn starts the
//!   answer. The rendered text is split around the document and the
//!   question; the .sack keeps those pieces, never the template.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};

use crate::error::Result;
use crate::tokens::TextTokenizer;

/// A chat template that cannot be used to lay out a document.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template: cannot parse it")]
    Parse(#[source] JinjaError),
    #[error("chat template: cannot render it")]
    Render(#[source] JinjaError),
    #[error("chat template: the template does not print a user message exactly once ({0})")]
    UserMessage(&'static str),
}

/// What precedes the document in the raw layout (after BOS).
pub const CONTEXT_PREFIX: &str = "### Context:\n";

/// What precedes a question in the raw layout.
pub const QUESTION_HEAD: &str = "\n### Question:\n";

/// What follows a question in the raw layout; the answer comes after it.
pub const ANSWER_HEAD: &str = "\n### Answer:\n";

/// Where a new turn of the raw layout starts.
pub const RAW_TURN: &str = "\n###";

/// The instruction before the document in the chat layout's user turn.
pub const INSTRUCTION: &str =
    "Answer the question about the document below in a few words, from the document only.";

/// Stand-ins rendered into the template and split at.
const DOCUMENT: &str = "\u{e000}sac-document\u{e000}";
const QUESTION: &str = "\u{e000}sac-question\u{e000}";
const ANSWER: &str = "\u{e000}sac-answer\u{e000}";

/// Most template instructions one rendering may run (a bound on a
/// malformed template's loops).
const FUEL: u64 = 1_000_000;

/// Which layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    Raw,
    Chat,
}

impl PromptFormat {
    /// How a .sack header names it.
    pub fn name(self) -> &'static str {
        match self {
            PromptFormat::Raw => "raw",
            PromptFormat::Chat => "chat",
        }
    }

    /// The format a header names `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [PromptFormat::Raw, PromptFormat::Chat]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// The text around the document and the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLayout {
    pub format: PromptFormat,
    /// Before the document (after BOS in the raw layout).
    pub before_document: String,
    /// Between the document and the question.
    pub before_question: String,
    /// After the question; the answer follows.
    pub after_question: String,
}

/// A model's chat template and the special tokens it may print.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl PromptLayout {
    /// SAC's layout.
    pub fn raw() -> Self {
        PromptLayout {
            format: PromptFormat::Raw,
            before_document: CONTEXT_PREFIX.into(),
            before_question: QUESTION_HEAD.into(),
            after_question: ANSWER_HEAD.into(),
        }
    }

    /// The layout `template` gives a user turn holding [`INSTRUCTION`], the
    /// document and the question, followed by the assistant's turn.
    pub fn chat(template: &ChatTemplate) -> Result<Self> {
        let user = format!("{INSTRUCTION}\n\nDocument:\n{DOCUMENT}\n\nQuestion: {QUESTION}");
        let text = template.render(&[("user", &user)], true)?;
        let split = |text: &str, mark: &'static str| -> Result<(String, String)> {
            let mut parts = text.split(mark);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(TemplateError::UserMessage(mark.trim_matches('\u{e000}')).into()),
            }
        };
        let (before_document, rest) = split(&text, DOCUMENT)?;
        let (before_question, after_question) = split(&rest, QUESTION)?;
        Ok(PromptLayout {
            format: PromptFormat::Chat,
            before_document,
            before_question,
            after_question,
        })
    }

    /// The context as the compressor reads it: in the raw layout BOS (when
    /// the tokenizer has one) first, then the tokens of the text before the
    /// document and of the document, at positions 1..=L.
    pub fn context_ids(&self, tokenizer: &TextTokenizer, document: &str) -> Result<Vec<u32>> {
        let bos = match self.format {
            PromptFormat::Raw => tokenizer.bos(),
            // A template prints BOS itself when the model wants one.
            PromptFormat::Chat => None,
        };
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tokenizer.encode(&format!("{}{document}", self.before_document))?);
        Ok(ids)
    }

    /// The tokens the decoder reads after the context for `question`.
    pub fn question_ids(&self, tokenizer: &TextTokenizer, question: &str) -> Result<Vec<u32>> {
        tokenizer.encode(&self.question_text(question))
    }

    /// The text the decoder reads after the context for `question`.
    pub fn question_text(&self, question: &str) -> String {
        format!("{}{question}{}", self.before_question, self.after_question)
    }
}

impl ChatTemplate {
    /// Renders `messages` (role, content) as the model's template does, with
    /// the assistant's turn opened when `generation_prompt` is set.
    fn render(&self, messages: &[(&str, &str)], generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(TemplateError::Parse)?;
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| context! { role => *role, content => *content })
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    add_generation_prompt => generation_prompt,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
            })
            .map_err(|e| TemplateError::Render(e).into())
    }

    /// The text the template puts right after an assistant's answer: where
    /// its turn ends (`<|im_end|>`, `<|eot_id|>`, ...), if it prints one.
    pub fn end_of_turn(&self) -> Result<Option<String>> {
        let text = self.render(&[("user", "Hi."), ("assistant", ANSWER)], false)?;
        let after = text.split(ANSWER).nth(1).unwrap_or_default().trim();
        let end = after.split_whitespace().next().unwrap_or_default();
        Ok((!end.is_empty()).then(|| end.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (ChatML with a default system turn).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's, in short: BOS from the variable, the `trim` filter, and
    /// an error for a bad role.
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
            bos_token: "<|begin_of_text|>".into(),
            eos_token: "<|end_of_text|>".into(),
        }
    }

    #[test]
    fn chatml_splits_around_the_document_and_the_question() {
        let layout = PromptLayout::chat(&template(CHATML)).unwrap();
        assert_eq!(layout.format, PromptFormat::Chat);
        assert_eq!(
            layout.before_document,
            format!(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                 Hugging Face<|im_end|>\n<|im_start|>user\n{INSTRUCTION}\n\nDocument:\n"
            )
        );
        assert_eq!(layout.before_question, "\n\nQuestion: ");
        assert_eq!(layout.after_question, "<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(
            template(CHATML).end_of_turn().unwrap().as_deref(),
            Some("<|im_end|>")
        );
    }

    #[test]
    fn llama3_style_templates_render() {
        let layout = PromptLayout::chat(&template(LLAMA3)).unwrap();
        assert!(
            layout
                .before_document
                .starts_with("<|begin_of_text|><|start_header_id|>user")
        );
        assert_eq!(
            layout.after_question,
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            template(LLAMA3).end_of_turn().unwrap().as_deref(),
            Some("<|eot_id|>")
        );
    }

    #[test]
    fn bad_templates_are_one_line_errors() {
        for (source, why) in [
            ("{% for %}", "cannot parse"),
            ("{{ raise_exception('no') }}", "cannot render"),
            (
                "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}",
                "exactly once",
            ),
            (
                "{% for i in range(100000000) %}{% endfor %}",
                "cannot render",
            ),
        ] {
            let err = PromptLayout::chat(&template(source))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{source}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn the_raw_layout_is_sacs() {
        let raw = PromptLayout::raw();
        assert_eq!(
            raw.question_text("Who?"),
            "\n### Question:\nWho?\n### Answer:\n"
        );
        assert_eq!(raw.before_document, "### Context:\n");
    }
}
