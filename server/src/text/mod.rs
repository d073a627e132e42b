//! Text in and out of the model: the tokenizer, the chat template and the special tokens
//! from a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`), plus the incremental decoding and stop strings that streaming
//! needs.

pub mod detok;
pub mod grammar;
pub mod stop;

use std::collections::HashMap;
use std::path::Path;

use liger_model::text::Text;
use serde_json::Value;
use tokenizers::Tokenizer;

pub use detok::{Decode, IncrementalDecoder};
pub use liger_model::chat::{ChatTemplate, FunctionCall, Message as ChatMessage, ToolCall, CHATML};
pub use stop::StopMatcher;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The folder's text files (missing tokenizer, bad JSON, a template that does not
    /// compile).
    #[error(transparent)]
    Folder(#[from] liger_model::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed (or called `raise_exception`): the request's fault.
    #[error("chat template: {0}")]
    Template(String),
}

/// The model's text side ([`liger_model::text::Text`]: tokenizer, template, special and
/// stop ids, read as training and evaluation read them) plus what serving adds: token bytes
/// for logprobs and grammars.
pub struct Codec {
    text: Text,
    /// Byte-level BPE stores bytes as printable characters; this maps them back.
    byte_decoder: Option<HashMap<char, u8>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("vocab", &self.text.vocab_size())
            .field("bos_token", &self.text.bos_token())
            .field("eos_token_ids", &self.text.eos_token_ids())
            .finish()
    }
}

impl Codec {
    /// Reads the tokenizer files of a model folder. `model_eos` are the `config.json`
    /// end-of-sequence ids; the tokenizer's and `generation_config.json`'s are added.
    pub fn load(dir: &Path, model_eos: &[u32]) -> Result<Self, TextError> {
        Ok(Self::new(Text::load(dir, model_eos)?))
    }

    pub fn from_parts(
        tokenizer: Tokenizer,
        tokenizer_config: &Value,
        generation_config: Option<&Value>,
        template_override: Option<String>,
        model_eos: &[u32],
    ) -> Result<Self, TextError> {
        let text = Text::from_parts(
            tokenizer,
            tokenizer_config,
            generation_config,
            template_override.as_deref(),
            model_eos,
        )
        .map_err(template_error)?;
        Ok(Self::new(text))
    }

    /// Serving's view of a folder's text side.
    pub fn new(text: Text) -> Self {
        let byte_level = text
            .tokenizer()
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|j| j.contains("\"ByteLevel\""));
        Self {
            text,
            byte_decoder: byte_level.then(byte_decoder),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.text.vocab_size()
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        self.text.eos_token_ids()
    }

    pub fn template(&self) -> &ChatTemplate {
        self.text.template()
    }

    /// Tokenizes text; special tokens written in it (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.text
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(tokenizer_error)
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TextError> {
        self.render_chat_with_tools(messages, None)
    }

    /// Renders a conversation with the template's own `tools` variable set.
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
    ) -> Result<String, TextError> {
        self.template()
            .render_with_tools(messages, tools, true)
            .map_err(template_error)
    }

    /// Renders and tokenizes a conversation. The tokenizer's own BOS is added only when the
    /// template did not already write one.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TextError> {
        self.encode_chat_with_tools(messages, None)
    }

    /// [`Self::encode_chat`] for templates that render `tools` themselves.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
    ) -> Result<Vec<u32>, TextError> {
        let text = self.render_chat_with_tools(messages, tools)?;
        self.text
            .encode_rendered(&text)
            .map(|e| e.get_ids().to_vec())
            .map_err(tokenizer_error)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode_ids(&self, ids: &[u32], skip_special: bool) -> String {
        self.text.decode(ids, skip_special).unwrap_or_default()
    }

    /// The raw bytes a token stands for (OpenAI's `bytes` in logprobs).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.text.tokenizer().id_to_token(id) else {
            return Vec::new();
        };
        if let Some(b) = byte_fallback(&piece) {
            return vec![b];
        }
        if self.is_added_token(id) {
            return piece.into_bytes();
        }
        match &self.byte_decoder {
            Some(map) if piece.chars().all(|c| map.contains_key(&c)) => {
                piece.chars().map(|c| map[&c]).collect()
            }
            // SentencePiece marks spaces with U+2581.
            _ => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// A token as text (lossy for partial characters), as logprobs list it.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    /// Added tokens (`<|im_end|>` and the like) stand for no text.
    pub fn is_added_token(&self, id: u32) -> bool {
        self.text
            .tokenizer()
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some()
    }
}

impl Decode for Codec {
    fn decode(&self, ids: &[u32]) -> String {
        self.decode_ids(ids, true)
    }
}

/// `<0xAB>`: SentencePiece's byte-fallback tokens.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE.
fn byte_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).expect("valid code point")
            };
            (c, b)
        })
        .collect()
}

/// The GPT-2 byte-to-character table, for building byte-level tokenizers in tests.
pub fn byte_encoder() -> HashMap<u8, char> {
    byte_decoder().into_iter().map(|(c, b)| (b, c)).collect()
}

fn tokenizer_error(e: liger_model::Error) -> TextError {
    match e {
        liger_model::Error::Tokenizer(message) => TextError::Tokenizer(message),
        other => TextError::Tokenizer(other.to_string()),
    }
}

/// A template's failure, as the request's fault (the model crate already names it).
fn template_error(e: liger_model::Error) -> TextError {
    match e {
        liger_model::Error::Template(message) => TextError::Template(message),
        other => TextError::Template(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tables_are_inverse_bijections() {
        let enc = byte_encoder();
        assert_eq!(enc.len(), 256);
        assert_eq!(enc[&b' '], '\u{120}', "space is Ġ");
        assert_eq!(enc[&b'a'], 'a');
        assert_eq!(byte_decoder().len(), 256);
    }

    #[test]
    fn config_shapes_are_understood() {
        let c = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        assert_eq!(liger_model::chat::config_source(&c).as_deref(), Some("D"));
        let specials = liger_model::chat::Specials::from_config(&c);
        assert_eq!(specials.bos.as_deref(), Some("<s>"));
        assert_eq!(specials.eos.as_deref(), Some("</s>"));
        assert_eq!(byte_fallback("<0x0A>"), Some(10));
        assert_eq!(byte_fallback("<0x0A"), None);
    }
}
