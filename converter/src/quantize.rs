//! `quantize`: stores a model folder's projections as GGML blocks (Q8_0 or Q4K), like
//! `llama-quantize` does for GGUF files. Embeddings and norms stay dense; the config, the
//! tokenizer and the Liger settings are kept. The result loads in the runtime with no
//! flags, at a fraction of the memory, and decodes with candle's quantized kernels.
//!
//! Tensors stream through one at a time (read, quantize, write), so quantizing never needs
//! the whole model in memory. The format is described in `liger_model::weights`.

use std::path::PathBuf;

use candle_core::DType;
use liger_model::layers::Quantization;
use liger_model::ModelConfig;

use crate::check::check_weights;
use crate::convert::{format_label, Summary};
use crate::folder::{Config, ModelFolder, SideFiles, Weights};
use crate::output::{self, PartialDir, WeightFormat, DEFAULT_SHARD_LIMIT};
use crate::progress::Progress;
use crate::source;
use crate::{Error, Result};

/// Everything `liger-convert quantize` takes.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// A model folder (original, converted or recovered-and-merged).
    pub model: PathBuf,
    pub out: PathBuf,
    pub format: Quantization,
    /// The dense tensors' dtype; `None` keeps the folder's.
    pub dtype: Option<DType>,
    pub force: bool,
    pub shard_limit: u64,
    pub command_line: Option<String>,
}

impl QuantizeOptions {
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>, format: Quantization) -> Self {
        Self {
            model: model.into(),
            out: out.into(),
            format,
            dtype: None,
            force: false,
            shard_limit: DEFAULT_SHARD_LIMIT,
            command_line: None,
        }
    }
}

/// Quantizes `opts.model` into `opts.out`.
pub fn quantize(opts: &QuantizeOptions, progress: &Progress) -> Result<Summary> {
    output::check_destination(&opts.out, opts.force)?;
    output::check_not_source(&opts.out, &opts.model)?;
    if !opts.model.is_dir() {
        return Err(Error::flag(
            "--model",
            format!("{} is not a model folder", opts.model.display()),
        ));
    }
    let out = PartialDir::begin(&opts.out, opts.force)?;
    let loaded = source::load_folder(&opts.model, progress)?;
    let cfg = ModelConfig::from_json(loaded.config.clone())?;
    let report = check_weights(&cfg, loaded.tensors.infos())?;
    let format = WeightFormat {
        dtype: opts.dtype.unwrap_or(loaded.native_dtype),
        quantize: Some(opts.format),
        shard_limit: opts.shard_limit,
    };
    let folder = ModelFolder {
        config: Config::Json(&loaded.config),
        weights: Weights::Tensors(&loaded.tensors),
        format: &format,
        side_files: SideFiles::Planned(&loaded.side_files),
        records: Vec::new(),
    };
    let (out, written) = folder.write(out, |_| card(opts, &cfg, &format), progress)?;
    Ok(Summary {
        out,
        tensors: loaded.tensors.infos().len(),
        parameters: loaded.tensors.parameter_count(),
        dtype: format.dtype,
        quantize: format.quantize,
        weight_files: written.files,
        weight_bytes: written.total_size,
        liger: cfg.liger.clone(),
        unused: report.unused,
    })
}

fn card(opts: &QuantizeOptions, cfg: &ModelConfig, format: &WeightFormat) -> String {
    let name = opts.model.file_name().unwrap_or_default().to_string_lossy();
    let kind = if cfg.liger.is_some() {
        "Liger model"
    } else {
        "Transformer"
    };
    let mut s = format!(
        "---\nlibrary_name: liger\ntags:\n- quantized\n- {q}\n---\n\n# {name}, {q}\n\n\
         This {kind} is `{src}` with its attention and MLP projections and its LM head \
         stored as GGML `{q}` blocks (projections whose input size does not fill whole \
         blocks use `q8_0`), written by `liger-convert quantize` {version}; everything else \
         is kept ({label}). Measure what it costs with `liger-convert eval --model <this \
         folder> --reference {src} --data FILES`.\n",
        q = opts.format.name(),
        src = opts.model.display(),
        version = env!("CARGO_PKG_VERSION"),
        label = format_label(format),
    );
    if let Some(cmd) = &opts.command_line {
        s.push_str(&format!("\n## How it was made\n\n```sh\n{cmd}\n```\n"));
    }
    s
}
