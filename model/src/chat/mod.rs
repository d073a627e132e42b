//! Chat templates: one renderer for serving, training and evaluation.
//!
//! The Jinja template a model ships, rendered with minijinja the way Hugging Face's
//! `apply_chat_template` does (trim/lstrip blocks, Python string methods,
//! `raise_exception`, `strftime_now`), or ChatML when the model has none. Where a folder has
//! more than one, the precedence is Hugging Face's (`transformers` >= 4.43):
//! 1. `chat_template.jinja` (newer hub repositories keep the template there);
//! 2. `tokenizer_config.json`'s `chat_template`: a string, or a list of named templates
//!    (the one called `default`, else the first);
//! 3. ChatML.
//!
//! `strftime_now` reads one clock, the wall clock in UTC, wherever a template is rendered:
//! a conversation is trained on, evaluated and served as the same text on the same day.
//!
//! Recovery needs two things from a template: the text of a whole conversation, and which
//! of its characters the assistant wrote ([`ChatTemplate::render_conversation`]; the `lm`
//! stage learns only those, as instruction tuning does).

use std::ops::Range;
use std::path::Path;

use minijinja::value::Serde;
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::files::read_optional_json;
use crate::{Error, Result};

/// The template used when a model ships none (SmolLM2, Qwen2 and many others use ChatML).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const NAME: &str = "chat";

/// One turn of a conversation, its content flattened to text. Assistant turns may carry
/// the tool calls they made, and `tool` turns the id of the call they answer; both are
/// rendered only by templates that know them (Hugging Face's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function call an assistant turn made, as templates expect it:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as OpenAI's API carries it. Templates receive it as an object (what
    /// Hugging Face templates index and pass to `tojson`) when it parses as one.
    #[serde(serialize_with = "arguments_as_json")]
    pub arguments: String,
}

fn arguments_as_json<S: serde::Serializer>(
    text: &str,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => v.serialize(s),
        _ => s.serialize_str(text),
    }
}

/// A compiled chat template plus the special tokens templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// The special tokens of a folder's `tokenizer_config.json` (`bos_token`, `eos_token`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Specials {
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl Specials {
    pub fn from_config(config: &Value) -> Self {
        Self {
            bos: special_token(config, "bos_token"),
            eos: special_token(config, "eos_token"),
        }
    }
}

impl ChatTemplate {
    /// Compiles `source` (a syntax error is reported now, not on the first render);
    /// `bos_token` and `eos_token` render as `specials` says (empty when absent).
    pub fn new(source: &str, specials: &Specials) -> Result<Self> {
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
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos: specials.bos.clone().unwrap_or_default(),
            eos: specials.eos.clone().unwrap_or_default(),
            fallback: false,
        })
    }

    /// The built-in ChatML template.
    pub fn chatml(specials: &Specials) -> Self {
        let mut t = Self::new(CHATML, specials).expect("the built-in ChatML template compiles");
        t.fallback = true;
        t
    }

    /// The template of a model folder, by the precedence in the module header.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        Self::from_folder_config(dir, &tokenizer_config(dir)?)
    }

    /// [`Self::from_folder`] with the folder's `tokenizer_config.json` already read.
    pub fn from_folder_config(dir: &Path, config: &Value) -> Result<Self> {
        let specials = Specials::from_config(config);
        match folder_source(dir, config)? {
            Some((from, source)) => Self::new(&source, &specials)
                .map_err(|e| Error::Template(format!("{}: {e}", from.display()))),
            None => Ok(Self::chatml(&specials)),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this is the built-in ChatML fallback.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// The text of `messages`, followed by the opening of an assistant turn when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders a `tools` list itself (tool-calling templates such as
    /// Qwen2.5's or Llama 3.1's); callers describe tools in a system message otherwise.
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// [`Self::render`] with the `tools` variable set (OpenAI's `tools` array), for
    /// templates that [`Self::supports_tools`].
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        tmpl.render(context! {
            messages => Serde(messages),
            tools => tools.map(Serde),
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

/// A folder's `tokenizer_config.json` (`null` when it has none).
pub fn tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    Ok(read_optional_json(&path, Error::Template)?.unwrap_or(Value::Null))
}

/// The template text of a folder whose `tokenizer_config.json` is `config`, with the file
/// it came from; `None` when it has none (then ChatML).
pub fn folder_source(dir: &Path, config: &Value) -> Result<Option<(std::path::PathBuf, String)>> {
    let file = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&file) {
        Ok(text) => return Ok(Some((file, text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Io { path: file, source }),
    }
    Ok(config_source(config).map(|s| (dir.join("tokenizer_config.json"), s)))
}

/// `tokenizer_config.json`'s `chat_template`: a string, or a list of named templates (the
/// one called `default`, else the first).
pub fn config_source(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// `bos_token` / `eos_token`: a string or an AddedToken object with `content`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The template's own message (minijinja puts it in the detail), on one line.
fn template_error(e: minijinja::Error) -> Error {
    let text = e.detail().map_or_else(|| e.to_string(), str::to_owned);
    Error::Template(
        text.lines()
            .next()
            .unwrap_or("cannot be rendered")
            .to_owned(),
    )
}

/// Llama 3.x templates print today's date with `strftime_now("%d %b %Y")`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC `strftime` covering the directives chat templates use.
fn strftime(format: &str, unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
