//! Chat conversations as the model saw them in fine-tuning: rendered with the chat template
//! the model ships in `tokenizer_config.json` (Jinja, through minijinja with Python string
//! methods), or ChatML when it ships none.
//!
//! Recovery needs two things from a template: the text of a whole conversation (training
//! data), and which of its characters the assistant wrote (the `lm` stage learns only those,
//! as instruction tuning does). The second comes from rendering growing prefixes of the
//! conversation, so it works for any template that renders a conversation as the
//! concatenation of its turns.

use std::ops::Range;
use std::path::Path;

use minijinja::value::Serde;
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// The template used when a model ships none (SmolLM2, Qwen2 and many others use ChatML).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const NAME: &str = "chat";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special tokens templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// Whether this is the built-in ChatML fallback.
    pub fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// A rendered conversation and the byte ranges of its text that assistant turns produced.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source`. `bos` and `eos` are what `bos_token` / `eos_token` render as.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face compiles chat templates with trim_blocks and lstrip_blocks; without
        // them the whitespace around `{% %}` tags (and so the tokens) would differ.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // Templates that print today's date get a fixed one, so rendering is reproducible.
        env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_owned());
        env.add_template_owned(NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
            fallback: false,
        })
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Self {
        let mut t = Self::new(CHATML, "", "").expect("the built-in ChatML template compiles");
        t.fallback = true;
        t
    }

    /// The template of a model folder (`tokenizer_config.json`, or `chat_template.jinja`),
    /// ChatML when it has none.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Data(format!("{}: not valid JSON ({e})", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            }
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default", else the first.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let source = match source {
            Some(s) => Some(s),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        match source {
            Some(s) => Self::new(&s, &token("bos_token"), &token("eos_token"))
                .map_err(|e| Error::Data(format!("{}: chat_template: {e}", path.display()))),
            None => Ok(Self::chatml()),
        }
    }

    /// The text of `messages`, followed by the opening of an assistant turn when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        tmpl.render(context! {
            messages => Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(template_error)
    }

    /// A whole conversation and where its assistant turns are. An assistant turn's range
    /// runs from the end of the prompt that asks for it to the end of the conversation
    /// rendered up to and including it, so it covers the turn's closing tokens too (the
    /// model must learn to stop). `None` for the ranges when the template does not render
    /// conversations as growing prefixes (then callers train on every token).
    pub fn render_conversation(
        &self,
        messages: &[Message],
    ) -> Result<(String, Option<Vec<Range<usize>>>)> {
        let text = self.render(messages, false)?;
        let mut ranges = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !(upto.starts_with(&prompt) && text.starts_with(&upto)) {
                return Ok((text, None));
            }
            if upto.len() > prompt.len() {
                ranges.push(prompt.len()..upto.len());
            }
        }
        Ok((text, Some(ranges)))
    }
}

fn template_error(e: minijinja::Error) -> Error {
    // minijinja's Display can span lines (it shows the failing source); keep the first.
    let text = e.to_string();
    Error::Data(format!(
        "chat template: {}",
        text.lines().next().unwrap_or("cannot be rendered")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_ranges_cover_assistant_turns_and_their_end() {
        let t = ChatTemplate::chatml();
        let msgs = [
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
            Message::new("assistant", "See you."),
        ];
        let (text, ranges) = t.render_conversation(&msgs).unwrap();
        let ranges = ranges.unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(&text[ranges[0].clone()], "Hello!<|im_end|>\n");
        assert_eq!(&text[ranges[1].clone()], "See you.<|im_end|>\n");
        assert_eq!(
            t.render(&msgs[..1], true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_exceptions_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ m.content.strip() }}|{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  x ")], false).unwrap(),
            "x|"
        );
        let e = t.render(&[Message::new("bad", "x")], false).unwrap_err();
        assert!(e.to_string().contains("no bad roles"), "{e}");
    }
}
