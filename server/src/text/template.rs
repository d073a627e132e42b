//! Chat templates: the Jinja template a model ships in `tokenizer_config.json`, rendered with
//! minijinja the way Hugging Face's `apply_chat_template` does (trim/lstrip blocks, Python
//! string methods, `raise_exception`, `strftime_now`), or ChatML when the model has none.

use minijinja::value::Serde;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

/// The template used when the model ships none.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const NAME: &str = "chat";

/// One chat message with its content flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template text, for `/v1/models`-style introspection and debugging.
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported now, not on the first request.
    pub fn new(source: &str) -> Result<Self, JinjaError> {
        let mut env = Environment::new();
        // Hugging Face compiles chat templates with trim_blocks and lstrip_blocks; without
        // them the whitespace (and so the tokens) around `{% %}` tags differ.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    pub fn chatml() -> Self {
        Self::new(CHATML).expect("the built-in ChatML template compiles")
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation followed by the assistant's turn opening.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String, JinjaError> {
        let tmpl = self.env.get_template(NAME)?;
        tmpl.render(context! {
            messages => Serde(messages),
            add_generation_prompt => true,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
    }
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
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
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn chatml_matches_the_reference_layout() {
        let text = ChatTemplate::chatml().render(&msgs(), None, None).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_block_trimming_and_raise_exception_work() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n{{ m.content.strip().upper() }}|{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let mut m = msgs();
        m[1].content = "  hi  ".into();
        assert_eq!(t.render(&m, Some("<s>"), None).unwrap(), "<s>BE BRIEF.|HI|");
        m[1].role = "tool".into();
        let err = t.render(&m, None, None).unwrap_err();
        assert!(err.to_string().contains("no tools"), "{err}");
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-23 13:45:06 UTC
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %B %%", 1_721_742_306),
            "23 Jul 2024 13:45:06 July %"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}
