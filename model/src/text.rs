//! The text side of a model folder, read one way for serving, training and evaluation:
//! the tokenizer (`tokenizer.json`), the chat template (by [`crate::chat`]'s precedence,
//! one clock), the special tokens (`tokenizer_config.json`) and the ids that end a
//! generation.
//!
//! - End-of-sequence ids are the union of `config.json`'s `eos_token_id` (the caller's
//!   [`ModelConfig`](crate::ModelConfig) has them), `generation_config.json`'s, and the
//!   tokenizer config's `eos_token`: Llama 3 Instruct ends turns with `<|eot_id|>`, which
//!   only `generation_config.json` lists.
//! - A rendered conversation gets the tokenizer's own special tokens (its BOS) only when the
//!   template did not write the BOS itself, so neither way doubles it.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use tokenizers::{Encoding, Tokenizer};

use crate::chat::{self, ChatTemplate, Specials};
use crate::files::read_optional_json;
use crate::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A model's tokenizer with its chat template and special tokens.
#[derive(Debug)]
pub struct Text {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos_token: Option<String>,
    eos_token_ids: Vec<u32>,
}

impl Text {
    /// Reads `dir`'s text files. `model_eos` are `config.json`'s end-of-sequence ids.
    pub fn load(dir: &Path, model_eos: &[u32]) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(Error::Tokenizer(format!(
                "{}: missing (a model folder needs its Hugging Face tokenizer to read and write text)",
                path.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = chat::tokenizer_config(dir)?;
        let template = ChatTemplate::from_folder_config(dir, &config)?;
        let generation = read_optional_json(&dir.join(GENERATION_CONFIG_FILE), Error::Tokenizer)?;
        Ok(Self::assemble(
            tokenizer,
            template,
            &config,
            generation.as_ref(),
            model_eos,
        ))
    }

    /// The same from parts in memory (tests, benches): `template` overrides the config's.
    pub fn from_parts(
        tokenizer: Tokenizer,
        tokenizer_config: &Value,
        generation_config: Option<&Value>,
        template: Option<&str>,
        model_eos: &[u32],
    ) -> Result<Self> {
        let specials = Specials::from_config(tokenizer_config);
        let source = template
            .map(str::to_owned)
            .or_else(|| chat::config_source(tokenizer_config));
        let template = match source {
            Some(src) => ChatTemplate::new(&src, &specials)?,
            None => ChatTemplate::chatml(&specials),
        };
        Ok(Self::assemble(
            tokenizer,
            template,
            tokenizer_config,
            generation_config,
            model_eos,
        ))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        tokenizer_config: &Value,
        generation_config: Option<&Value>,
        model_eos: &[u32],
    ) -> Self {
        let Specials { bos, eos } = Specials::from_config(tokenizer_config);
        let mut ids: BTreeSet<u32> = model_eos.iter().copied().collect();
        if let Some(v) = generation_config.and_then(|g| g.get("eos_token_id")) {
            ids.extend(id_list(v));
        }
        if let Some(id) = eos.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            ids.insert(id);
        }
        Self {
            tokenizer,
            template,
            bos_token: bos,
            eos_token_ids: ids.into_iter().collect(),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer config's `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Ids that end a generation, sorted (see the module header for where they come from).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Tokenizes plain text; special tokens written in it (`<|im_start|>`) become their
    /// ids, and the tokenizer adds its own (a BOS) when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Tokenizes what the chat template rendered: the tokenizer's own BOS is added only
    /// when the template did not already write one.
    pub fn encode_rendered(&self, text: &str) -> Result<Encoding> {
        let has_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        self.encode(text, !has_bos)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// `eos_token_id`: one id or a list.
fn id_list(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A word-level tokenizer knowing `<s>`, `</s>`, `<|im_end|>` and a few words, whose
    /// post-processor adds `<s>` (as SentencePiece Llama tokenizers do).
    fn tokenizer() -> Tokenizer {
        let vocab = json!({"<s>": 0, "</s>": 1, "<|im_end|>": 2, "hi": 3, "there": 4, "[UNK]": 5});
        let added = ["<s>", "</s>", "<|im_end|>"]
            .iter()
            .enumerate()
            .map(|(id, t)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect::<Vec<_>>();
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        Tokenizer::from_bytes(spec.to_string()).unwrap()
    }

    #[test]
    fn stop_ids_join_every_source_and_the_bos_is_never_doubled() {
        let config = json!({"bos_token": "<s>", "eos_token": "</s>"});
        let generation = json!({"eos_token_id": [2, 1]});
        let t = Text::from_parts(tokenizer(), &config, Some(&generation), None, &[1]).unwrap();
        assert_eq!(t.eos_token_ids(), [1, 2]);
        assert!(t.template().is_fallback(), "no template: ChatML");
        // The tokenizer adds <s> to text without one, not to text that starts with it.
        assert_eq!(t.encode_rendered("hi there").unwrap().get_ids(), [0, 3, 4]);
        assert_eq!(t.encode_rendered("<s> hi").unwrap().get_ids(), [0, 3]);
        assert_eq!(t.encode("hi", false).unwrap().get_ids(), [3]);
    }

    #[test]
    fn eos_ids_are_one_or_a_list() {
        assert_eq!(id_list(&json!([2, 3])), vec![2, 3]);
        assert_eq!(id_list(&json!(7)), vec![7]);
        assert!(id_list(&json!("x")).is_empty());
    }

    #[test]
    fn a_folder_without_a_tokenizer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Text::load(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json: missing"), "{e}");
        tokenizer()
            .save(dir.path().join(TOKENIZER_FILE), false)
            .unwrap();
        std::fs::write(dir.path().join(GENERATION_CONFIG_FILE), "{oops").unwrap();
        let e = Text::load(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("generation_config.json: not valid JSON"), "{e}");
    }
}
