//! Rebuilding a Hugging Face tokenizer (and `tokenizer_config.json`, `generation_config.json`)
//! from the vocabulary stored in GGUF metadata.
//!
//! GGUF keeps the raw pieces: `tokenizer.ggml.tokens`, per-token types, BPE merges or
//! SentencePiece scores, the special-token ids, and a `pre` name for the pre-tokenizer regex.
//! We assemble the same pipeline Hugging Face's fast tokenizers use for those models instead of
//! candle's `TokenizerFromGguf`, which guesses a pre-tokenizer that adds a leading space for
//! SmolLM2 (`pre = smollm`).
//!
//! - `gpt2` (byte-level BPE): merges as stored; the pre-tokenizer chosen from `tokenizer.ggml.pre`
//!   the way llama.cpp chooses its split regexes.
//! - `llama` (SentencePiece): no merges are stored, so they are derived from the scores the way
//!   Hugging Face's `LlamaConverter` does (every split of a piece into two pieces, ranked by the
//!   piece's score), with byte fallback and `▁` for spaces.
//!
//! Control, unknown and user-defined tokens become special added tokens, so `<|im_start|>` in a
//! prompt is one token when encoding with `add_special_tokens`.

use serde_json::{json, Map, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::meta::Meta;
use crate::{Error, Result};

// llama.cpp token types (`tokenizer.ggml.token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer and the two JSON files that describe how to use it.
pub(crate) struct Built {
    pub tokenizer: Tokenizer,
    pub tokenizer_config: Value,
    pub generation_config: Option<Value>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The vocabulary as GGUF stores it, with special ids checked against its size.
struct Vocabulary<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    /// End-of-turn / end-of-message ids that differ from `eos` (Llama 3 instruct's `<|eot_id|>`).
    extra_eos: Vec<u32>,
}

impl<'a> Vocabulary<'a> {
    fn read(meta: &Meta<'a>) -> Result<Self> {
        let tokens = meta.str_array("tokenizer.ggml.tokens")?;
        let types = match meta.opt_i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() != tokens.len() => {
                return Err(tok_err(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )))
            }
            Some(t) => t,
            None => vec![NORMAL; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.opt_u64(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(tok_err(format!(
                    "{key} = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            }
        };
        let (bos, eos) = (
            id("tokenizer.ggml.bos_token_id")?,
            id("tokenizer.ggml.eos_token_id")?,
        );
        let mut extra_eos = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(t) = id(key)? {
                if Some(t) != eos && !extra_eos.contains(&t) {
                    extra_eos.push(t);
                }
            }
        }
        Ok(Self {
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            tokens,
            types,
            bos,
            eos,
            extra_eos,
        })
    }

    /// Token string to id, keeping the first id when a string repeats.
    fn map(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (id, tok) in self.tokens.iter().enumerate() {
            vocab.entry((*tok).to_owned()).or_insert(id as u32);
        }
        if vocab.len() != self.tokens.len() {
            tracing::warn!(
                "GGUF vocabulary has {} duplicate token strings; their later ids cannot be produced",
                self.tokens.len() - vocab.len()
            );
        }
        vocab
    }

    /// Ids that become special added tokens.
    fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..self.tokens.len() as u32)
            .filter(|&i| matches!(self.types[i as usize], UNKNOWN | CONTROL | USER_DEFINED))
            .collect();
        // BOS/EOS/UNK/PAD must never be split even if the file forgot to mark them.
        for id in [self.bos, self.eos, self.unk, self.pad]
            .into_iter()
            .flatten()
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids
    }

    fn content(&self, id: u32) -> &'a str {
        self.tokens[id as usize]
    }
}

/// The split regex of a byte-level BPE model, by llama.cpp's `tokenizer.ggml.pre` name.
enum PreTokenizerKind {
    /// GPT-2's regex (ByteLevel's built-in one).
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (StarCoder, SmolLM).
    DigitsThenGpt2,
    /// A Hugging Face `Split` regex, then byte-level mapping without ByteLevel's own regex.
    Regex {
        pattern: &'static str,
        ignore_merges: bool,
    },
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer_kind(pre: &str) -> PreTokenizerKind {
    match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreTokenizerKind::DigitsThenGpt2
        }
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "phi-2" => PreTokenizerKind::Gpt2,
        // Llama 3 ships `ignore_merges: true`: a word that is itself a token is not merged.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => PreTokenizerKind::Regex {
            pattern: LLAMA3_REGEX,
            ignore_merges: true,
        },
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => PreTokenizerKind::Regex {
            pattern: QWEN2_REGEX,
            ignore_merges: false,
        },
        other => {
            tracing::warn!(
                "tokenizer.ggml.pre = `{other}` is not one we know; using GPT-2's byte-level regex, \
                 tokenization may differ from the original model"
            );
            PreTokenizerKind::Gpt2
        }
    }
}

fn byte_level_bpe(meta: &Meta, vocab: &Vocabulary) -> Result<Tokenizer> {
    let merges = meta
        .str_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    tok_err(format!(
                        "merge {i} (`{m}`) is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let kind = pre_tokenizer_kind(pre);
    let ignore_merges = matches!(
        kind,
        PreTokenizerKind::Regex {
            ignore_merges: true,
            ..
        }
    );
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.map(), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tok_err)?;
    let pre_tokenizer: PreTokenizerWrapper = match kind {
        PreTokenizerKind::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreTokenizerKind::DigitsThenGpt2 => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreTokenizerKind::Regex { pattern, .. } => {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
    };
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// BPE merges implied by SentencePiece scores: every way to write a piece as the concatenation
/// of two pieces, the highest-scoring result first (what SentencePiece's BPE applies first).
fn sentencepiece_merges(vocab: &Vocabulary, scores: &[f32], ids: &Vocab) -> Vec<(String, String)> {
    let mut found: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if !matches!(vocab.types[id], NORMAL | USER_DEFINED) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                found.push((scores[id], id as u32, l, r));
            }
        }
    }
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    found
        .into_iter()
        .map(|(_, _, l, r)| (vocab.content(l).to_owned(), vocab.content(r).to_owned()))
        .collect()
}

fn sentencepiece(meta: &Meta, vocab: &Vocabulary) -> Result<Tokenizer> {
    let scores = meta
        .opt_f32_array("tokenizer.ggml.scores")?
        .ok_or_else(|| tok_err("missing GGUF metadata key `tokenizer.ggml.scores` (needed for a SentencePiece vocabulary)"))?;
    if scores.len() != vocab.tokens.len() {
        return Err(tok_err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            vocab.tokens.len()
        )));
    }
    let ids = vocab.map();
    let merges = sentencepiece_merges(vocab, &scores, &ids);
    let mut builder = BPE::builder()
        .vocab_and_merges(ids, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = vocab.unk {
        builder = builder.unk_token(vocab.content(unk).to_owned());
    }
    let bpe = builder.build().map_err(tok_err)?;
    // SentencePiece writes spaces as `▁` and (normally) prefixes the text with one.
    let prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let scheme = if prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)))
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// BOS/EOS insertion as a template; `None` when neither is added.
fn template(
    vocab: &Vocabulary,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<TemplateProcessing>> {
    let need = |on: bool, id: Option<u32>, what: &str| -> Result<Option<(String, u32)>> {
        match (on, id) {
            (false, _) => Ok(None),
            (true, Some(id)) => Ok(Some((vocab.content(id).to_owned(), id))),
            (true, None) => Err(tok_err(format!(
                "tokenizer.ggml.add_{what}_token is set but there is no {what} token id"
            ))),
        }
    };
    let bos = need(add_bos, vocab.bos, "bos")?;
    let eos = need(add_eos, vocab.eos, "eos")?;
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let piece = |t: &Option<(String, u32)>, type_id: u32| {
        t.as_ref().map(|(s, _)| format!("{s}:{type_id} "))
    };
    let (b0, e0) = (
        piece(&bos, 0).unwrap_or_default(),
        piece(&eos, 0).unwrap_or_default(),
    );
    let (b1, e1) = (
        piece(&bos, 1).unwrap_or_default(),
        piece(&eos, 1).unwrap_or_default(),
    );
    let single = format!("{b0}$A:0 {e0}");
    let pair = format!("{b0}$A:0 {e0}{b1}$B:1 {e1}");
    let specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
    TemplateProcessing::builder()
        .try_single(single.trim_end())
        .map_err(tok_err)?
        .try_pair(pair.trim_end())
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(tok_err)
}

/// Build the tokenizer and its configuration files. `model_max_length` is the context length.
pub(crate) fn build(meta: &Meta, model_max_length: u64) -> Result<Built> {
    let vocab = Vocabulary::read(meta)?;
    let model = meta.str("tokenizer.ggml.model")?;
    let (byte_level, class) = match model {
        "gpt2" => (true, "GPT2Tokenizer"),
        "llama" => (false, "LlamaTokenizer"),
        other => {
            return Err(tok_err(format!(
                "unsupported tokenizer model `{other}` in tokenizer.ggml.model (supported: gpt2, llama)"
            )))
        }
    };
    let mut tokenizer = if byte_level {
        byte_level_bpe(meta, &vocab)?
    } else {
        sentencepiece(meta, &vocab)?
    };

    let specials = vocab.special_ids();
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|&id| AddedToken::from(vocab.content(id), true))
        .collect();
    tokenizer.add_special_tokens(added).map_err(tok_err)?;
    for &id in &specials {
        let content = vocab.content(id);
        if tokenizer.token_to_id(content) != Some(id) {
            return Err(tok_err(format!(
                "special token `{content}` (id {id}) resolves to id {:?}; duplicate token strings?",
                tokenizer.token_to_id(content)
            )));
        }
    }

    // Hugging Face's defaults: LlamaTokenizer adds BOS, GPT2Tokenizer does not.
    let add_bos_key = meta.opt_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos_key = meta.opt_bool("tokenizer.ggml.add_eos_token")?;
    let template = template(
        &vocab,
        add_bos_key.unwrap_or(!byte_level),
        add_eos_key.unwrap_or(false),
    )?;
    let post: Option<PostProcessorWrapper> = match (byte_level, template) {
        (true, None) => Some(ByteLevel::new(false, false, true).into()),
        (true, Some(t)) => Some(
            PostSequence::new(vec![ByteLevel::new(false, false, true).into(), t.into()]).into(),
        ),
        (false, t) => t.map(Into::into),
    };
    tokenizer.with_post_processor(post);

    let mut cfg = Map::new();
    if let Some(b) = add_bos_key {
        cfg.insert("add_bos_token".into(), json!(b));
    }
    if let Some(b) = add_eos_key {
        cfg.insert("add_eos_token".into(), json!(b));
    }
    let added_tokens_decoder: Map<String, Value> = specials
        .iter()
        .map(|&id| {
            let entry = json!({
                "content": vocab.content(id),
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            });
            (id.to_string(), entry)
        })
        .collect();
    cfg.insert(
        "added_tokens_decoder".into(),
        Value::Object(added_tokens_decoder),
    );
    for (key, id) in [
        ("bos_token", vocab.bos),
        ("eos_token", vocab.eos),
        ("unk_token", vocab.unk),
        ("pad_token", vocab.pad),
    ] {
        if let Some(id) = id {
            cfg.insert(key.into(), json!(vocab.content(id)));
        }
    }
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if !byte_level {
        // Our Metaspace setup is Hugging Face's non-legacy Llama behaviour.
        cfg.insert("legacy".into(), json!(false));
    }
    cfg.insert("model_max_length".into(), json!(model_max_length));
    cfg.insert("tokenizer_class".into(), json!(class));

    let mut gen = Map::new();
    if let Some(b) = vocab.bos {
        gen.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = vocab.eos {
        if vocab.extra_eos.is_empty() {
            gen.insert("eos_token_id".into(), json!(e));
        } else {
            let all: Vec<u32> = std::iter::once(e)
                .chain(vocab.extra_eos.iter().copied())
                .collect();
            gen.insert("eos_token_id".into(), json!(all));
        }
    }
    if let Some(p) = vocab.pad {
        gen.insert("pad_token_id".into(), json!(p));
    }
    let generation_config = (!gen.is_empty()).then_some(Value::Object(gen));

    Ok(Built {
        tokenizer,
        tokenizer_config: Value::Object(cfg),
        generation_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every regex we may hand to `Split` compiles with the `fancy-regex` backend and splits
    /// the way its model expects.
    #[test]
    fn split_regexes_compile_and_split() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let split = |pattern: &str, text: &str| -> Vec<String> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap();
            let mut pre = PreTokenizedString::from(text);
            split.pre_tokenize(&mut pre).unwrap();
            pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(s, _, _)| s.to_owned())
                .collect()
        };
        assert_eq!(
            split(LLAMA3_REGEX, "I'LL pay 12345"),
            ["I", "'LL", " pay", " ", "123", "45"]
        );
        assert_eq!(split(QWEN2_REGEX, "x 42"), ["x", " ", "4", "2"]);
    }
}
