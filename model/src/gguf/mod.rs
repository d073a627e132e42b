//! Importing a llama-architecture GGUF file (llama.cpp's format) into Hugging Face form:
//! `config.json`, f32 tensors under Hugging Face names and layout, a `tokenizers` tokenizer,
//! `tokenizer_config.json` and `generation_config.json`.
//!
//! Why: many small models are easiest to obtain as GGUF, while the Liger conversion and the
//! runtime work on Hugging Face names and layouts. Importing once into that form keeps the rest
//! of the code free of llama.cpp conventions (renamed tensors, permuted q/k rows, quantized
//! blocks, a vocabulary stored as metadata).
//!
//! The work is split by concern:
//! - [`header`]: one-line explanations when the file cannot even be parsed;
//! - [`meta`]: typed metadata access whose errors name the key;
//! - [`hf_config`]: `config.json` from `llama.*` keys (and Llama 3 rope scaling);
//! - [`tensors`]: names, shape checks, dequantization, q/k un-permutation;
//! - [`tokenizer`]: the tokenizer and its JSON side files.

mod header;
mod hf_config;
mod meta;
mod tensors;
mod tokenizer;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::Tensor;

use crate::{Error, Result};
use meta::Meta;

/// Architectures [`import_gguf`] accepts (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// A GGUF model in Hugging Face form.
pub struct GgufImport {
    /// `config.json` for a `LlamaForCausalLM`.
    pub config: serde_json::Value,
    /// All tensors under Hugging Face names, dequantized to f32 on the CPU, in Hugging Face
    /// layout (`[out, in]` for linear weights, q/k rows un-permuted), sorted by name.
    /// `lm_head.weight` is present only when the GGUF has an untied `output.weight`.
    pub tensors: Vec<(String, Tensor)>,
    /// Tokenizer rebuilt from the GGUF vocabulary.
    pub tokenizer: tokenizers::Tokenizer,
    /// `tokenizer_config.json` content (chat template, special tokens, tokenizer class, ...).
    pub tokenizer_config: serde_json::Value,
    /// `generation_config.json` content, when BOS/EOS ids are known.
    pub generation_config: Option<serde_json::Value>,
    /// `general.name`, if present (for model cards).
    pub name: Option<String>,
}

/// Read a llama GGUF file and convert it to Hugging Face form.
///
/// Every problem with the file (not GGUF, truncated, unsupported tensor type, other
/// architecture, missing metadata key, tensor shape inconsistent with the metadata) is reported
/// as an error with one line that names it; nothing here panics on bad input.
pub fn import_gguf(path: &Path) -> Result<GgufImport> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| header::diagnose(path, e))?;
    let meta = Meta::new(&content.metadata, path);

    let arch = meta.str("general.architecture")?;
    if !SUPPORTED_ARCHITECTURES.contains(&arch) {
        return Err(Error::UnsupportedArchitecture {
            found: arch.to_owned(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        });
    }

    // Everything cheap is checked before any tensor data is decoded.
    let dims = hf_config::Dims::read(&meta)?;
    let (plan, vocab_size) = tensors::plan(&content, &dims)?;
    tensors::check_data(&content, path, file_len)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut config = hf_config::hf_config(&meta, &dims, vocab_size, tied)?;
    let max_len = meta.u64("llama.context_length")?;
    let built = tokenizer::build(&meta, max_len)?;
    let n_tokens = built.tokenizer.get_vocab_size(true);
    if n_tokens > vocab_size {
        return Err(Error::weights(
            path,
            format!(
                "the tokenizer has {n_tokens} tokens but token_embd.weight only {vocab_size} rows"
            ),
        ));
    }

    if content.tensor_infos.contains_key(tensors::ROPE_FREQS) {
        let freqs = tensors::read_f32(&content, &mut reader, tensors::ROPE_FREQS)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let theta = config["rope_theta"].as_f64().unwrap_or(10_000.0);
        let scaling = hf_config::llama3_rope_scaling(&freqs, theta, dims.head_dim)?;
        config["rope_scaling"] = scaling;
    }

    let tensors = tensors::load(&content, &mut reader, &plan)?;
    Ok(GgufImport {
        config,
        tensors,
        tokenizer: built.tokenizer,
        tokenizer_config: built.tokenizer_config,
        generation_config: built.generation_config,
        name: meta.opt_str("general.name")?.map(str::to_owned),
    })
}
