//! `import`: a GGUF file as a plain Hugging Face Transformer folder (no Liger section).
//!
//! The imported folder is the original model in the form the rest of the project reads:
//! the teacher for recovery training and the baseline the server compares a Liger model
//! with. Weights are written as f32, since the import dequantizes them.

use std::path::PathBuf;

use candle_core::DType;
use liger_model::ModelConfig;

use crate::convert::{write_model, Conversion, Summary};
use crate::output::{self, PartialDir, WeightFormat, DEFAULT_SHARD_LIMIT};
use crate::progress::Progress;
use crate::source::{self, Source};
use crate::{Error, Result};

/// Everything `liger-convert import` takes.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The `.gguf` file.
    pub source: PathBuf,
    pub out: PathBuf,
    pub force: bool,
    pub shard_limit: u64,
    pub command_line: Option<String>,
}

impl ImportOptions {
    pub fn new(source: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            out: out.into(),
            force: false,
            shard_limit: DEFAULT_SHARD_LIMIT,
            command_line: None,
        }
    }
}

/// Imports `opts.source` into a Hugging Face folder at `opts.out`.
pub fn import(opts: &ImportOptions, progress: &Progress) -> Result<Summary> {
    output::check_destination(&opts.out, opts.force)?;
    let src = opts.source.to_string_lossy().into_owned();
    match source::classify(&src)? {
        Source::Gguf(_) => {}
        _ => {
            return Err(Error::Source(format!(
                "{src} is not a GGUF file; `import` reads .gguf files (use `convert` for Hugging Face folders and hub ids)"
            )))
        }
    }
    output::check_not_source(&opts.out, &opts.source)?;
    let out = PartialDir::begin(&opts.out, opts.force)?;
    let loaded = source::load_gguf(&opts.source, progress)?;
    let cfg = ModelConfig::from_json(loaded.config.clone())?;
    let config_json = cfg.to_json_with_liger(None);
    let conversion = Conversion {
        loaded: &loaded,
        cfg: &cfg,
        config_json: &config_json,
        format: WeightFormat {
            shard_limit: opts.shard_limit,
            ..WeightFormat::dense(DType::F32)
        },
        source: &src,
        command_line: opts.command_line.as_deref(),
    };
    write_model(out, &conversion, progress)
}
