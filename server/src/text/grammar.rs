//! Constrained decoding: JSON schemas, regular expressions, Lark grammars and fixed choices,
//! compiled by llguidance (the engine vLLM, SGLang and llama.cpp embed) into a matcher per
//! sequence that says, before each token, which tokens may come next.
//!
//! [`Grammars`] is built once per model from its tokenizer (every token's bytes in a trie);
//! compiling a request's [`GrammarSpec`] gives a [`Guide`], which the engine clones into each
//! choice, asks for a mask (in parallel with the forward pass, see the worker's step), and
//! feeds every sampled token.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::Codec;

/// What a request constrains its output to, as parsed from the request (not yet compiled).
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// `response_format: {"type": "json_object"}`: any JSON object.
    JsonObject,
    /// A JSON schema (`response_format: {"type": "json_schema"}`, tool arguments).
    JsonSchema(Value),
    /// The whole output matches this regular expression.
    Regex(String),
    /// A Lark grammar (llguidance's dialect; `start` is the top rule).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl GrammarSpec {
    /// The parameter a compile error is reported against.
    fn describe(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject => "the JSON object format",
            GrammarSpec::JsonSchema(_) => "the JSON schema",
            GrammarSpec::Regex(_) => "the regular expression",
            GrammarSpec::Lark(_) => "the grammar",
            GrammarSpec::Choice(_) => "the choices",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(s) => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(s.clone()))
            }
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Choice(c) => {
                // Lark string literals are JSON strings, so JSON quoting escapes any text.
                let alts: Vec<String> = c
                    .iter()
                    .map(|s| Value::from(s.as_str()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        }
    }
}

/// Whitespace between JSON tokens: one space, or one newline and up to 20 spaces or tabs of
/// indentation (llama.cpp's JSON grammar allows the same). llguidance's default is any run
/// of whitespace, and small models given that can spend their whole budget on blank lines.
/// A schema that sets its own `x-guidance` options keeps them.
const JSON_WHITESPACE: &str = r"\x20|\x0A[\x20\x09]{0,20}";

pub fn bounded_whitespace(mut schema: Value) -> Value {
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// The model's vocabulary as llguidance sees it: every token's bytes (special tokens marked
/// so that no text can produce them) and the real tokenizer for literals in grammars.
struct Vocabulary {
    trie: TokTrie,
    codec: Arc<Codec>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.codec
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}

/// Compiles grammars for one model. Cheap to share (`Arc`); compiling is CPU work of a few
/// milliseconds, best done off the async threads.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl Grammars {
    /// `vocab_size` is the model's (the length of a logits row); ids the tokenizer does not
    /// know get no bytes and are never allowed.
    pub fn new(codec: Arc<Codec>, vocab_size: usize) -> Result<Self, String> {
        let eos = *codec
            .eos_token_ids()
            .first()
            .ok_or("the tokenizer has no end-of-sequence token, which grammars need to end")?;
        let known = codec.vocab_size().min(vocab_size);
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                if (id as usize) >= known {
                    Vec::new()
                } else if codec.is_added_token(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(codec.token_bytes(id));
                    w
                } else {
                    codec.token_bytes(id)
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, codec });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Grammar warnings go to our logs as errors of the request, not to stderr.
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `spec`; the error names what is wrong with it (a 400 for the client).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Guide, String> {
        let parser = self
            .factory
            .create_parser(spec.top_level())
            .map_err(|e| format!("{} cannot be used: {e}", spec.describe()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!("{} cannot be used: {e}", spec.describe()));
        }
        Ok(Guide {
            matcher,
            mask: None,
        })
    }
}

/// One sequence's constraint: the matcher and the mask for its next token, once computed.
pub struct Guide {
    matcher: Matcher,
    mask: Option<Result<SimpleVob, String>>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .field("mask_ready", &self.mask.is_some())
            .finish()
    }
}

impl Clone for Guide {
    /// An independent copy (for the other choices of an `n > 1` request).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
        }
    }
}

impl Guide {
    /// Computes the mask for the next token if not done yet. The worker calls this for
    /// every constrained sequence while the forward pass runs.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask().map_err(|e| e.to_string()));
        }
    }

    /// Forbids (sets to -inf) every token the grammar does not allow next.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = self.mask.as_ref().expect("prepared above").as_ref()?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past a sampled token; the next mask is computed on demand.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar has ended: nothing may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
