//! `convert`: a Transformer (Hugging Face folder, hub id or GGUF) into a Liger checkpoint.
//!
//! Conversion adds no parameters (LIGER.md §1): the weights are written unchanged (only cast
//! to the output dtype) and `config.json` gains a `liger` section that tells the runtime how
//! each attention layer now mixes. The steps are ordered so that cheap mistakes fail first:
//! flags, then the output path, then the source, then a full load check of the config
//! against the weights; only then is anything written, into a folder that becomes visible
//! at its final path only once complete (see [`crate::output`]).

use std::path::PathBuf;

use candle_core::DType;
use liger_model::layers::Quantization;
use liger_model::{LigerConfig, ModelConfig};
use serde_json::Value;

use crate::card::{model_card, CardInfo};
use crate::check::check_weights;
use crate::folder::{Config, ModelFolder, SideFiles, Weights};
use crate::output::{self, PartialDir, WeightFormat, WrittenWeights, DEFAULT_SHARD_LIMIT};
use crate::progress::Progress;
use crate::settings::LigerSettings;
use crate::source::{self, HubOptions, LoadedSource, Source};
use crate::{Error, Result};
use liger_model::checkpoint::torch_dtype_name;

/// Everything `liger-convert convert` takes.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// SRC: folder, `.gguf` file or hub id.
    pub source: String,
    pub out: PathBuf,
    pub settings: LigerSettings,
    /// Output dtype; `None` keeps the source's (f32 for GGUF imports).
    pub dtype: Option<DType>,
    /// Store the projections as GGML blocks of this format.
    pub quantize: Option<Quantization>,
    pub hub: HubOptions,
    /// Replace an existing output folder.
    pub force: bool,
    /// Largest safetensors file before sharding, in bytes.
    pub shard_limit: u64,
    /// The command line, for the model card.
    pub command_line: Option<String>,
}

impl ConvertOptions {
    /// Reference Liger-GLA settings, source dtype, 2 GB shards.
    pub fn new(source: impl Into<String>, out: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            out: out.into(),
            settings: LigerSettings::default(),
            dtype: None,
            quantize: None,
            hub: HubOptions::default(),
            force: false,
            shard_limit: DEFAULT_SHARD_LIMIT,
            command_line: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Summary {
    pub out: PathBuf,
    pub tensors: usize,
    pub parameters: u64,
    pub dtype: DType,
    /// The projections' block format, if quantized.
    pub quantize: Option<Quantization>,
    /// Weight file names.
    pub weight_files: Vec<String>,
    /// Bytes of tensor data.
    pub weight_bytes: u64,
    /// The `liger` section written (`None` for imports).
    pub liger: Option<LigerConfig>,
    /// Source tensors the model does not use (written anyway).
    pub unused: Vec<String>,
}

/// Converts `opts.source` into a Liger checkpoint at `opts.out`.
pub fn convert(opts: &ConvertOptions, progress: &Progress) -> Result<Summary> {
    opts.settings.validate()?;
    output::check_destination(&opts.out, opts.force)?;
    // Local sources: claim the output folder first, so the (possibly long) load happens
    // under the cleanup guard. Hub sources: download first, since a download can take a long
    // time and an interrupted one should leave nothing of ours behind.
    let kind = source::classify(&opts.source)?;
    if let Source::Folder(p) | Source::Gguf(p) = &kind {
        output::check_not_source(&opts.out, p)?;
    }
    let (loaded, out) = if matches!(kind, Source::Hub(_)) {
        let loaded = source::load(&opts.source, &opts.hub, progress)?;
        (loaded, PartialDir::begin(&opts.out, opts.force)?)
    } else {
        let out = PartialDir::begin(&opts.out, opts.force)?;
        (source::load(&opts.source, &opts.hub, progress)?, out)
    };
    finish_convert(opts, loaded, out, progress)
}

fn finish_convert(
    opts: &ConvertOptions,
    loaded: LoadedSource,
    out: PartialDir,
    progress: &Progress,
) -> Result<Summary> {
    let base = ModelConfig::from_json(loaded.config.clone())?;
    if base.liger.is_some() {
        tracing::warn!(
            "the source is already a Liger conversion; its `liger` settings are replaced"
        );
    }
    opts.settings.check_slots(base.head_dim)?;
    let liger = opts.settings.to_liger_config(
        (base.num_layers, base.max_position_embeddings),
        Some(&opts.source),
    )?;
    let cfg = base.with_liger(liger.clone())?;
    let dtype = opts.dtype.unwrap_or(loaded.native_dtype);
    let config_json = cfg.to_json_with_liger(Some(&liger));
    let format = WeightFormat {
        dtype,
        quantize: opts.quantize,
        shard_limit: opts.shard_limit,
    };
    let conversion = Conversion {
        loaded: &loaded,
        cfg: &cfg,
        config_json: &config_json,
        format,
        source: &opts.source,
        command_line: opts.command_line.as_deref(),
    };
    write_model(out, &conversion, progress)
}

/// How a card and a summary name the stored format: `float32`, or
/// `float32 with q4k projections`.
pub fn format_label(format: &WeightFormat) -> String {
    let dtype = torch_dtype_name(format.dtype);
    match format.quantize {
        Some(q) => format!("{dtype}, with {} projections", q.name()),
        None => dtype.to_owned(),
    }
}

/// A model to write from a loaded source: `convert`'s and `import`'s output.
pub(crate) struct Conversion<'a> {
    pub loaded: &'a LoadedSource,
    pub cfg: &'a ModelConfig,
    /// `config.json` (the `torch_dtype` is set from `format`).
    pub config_json: &'a Value,
    pub format: WeightFormat,
    /// SRC as given, and the command line, for the card.
    pub source: &'a str,
    pub command_line: Option<&'a str>,
}

/// Checks the config against the weights, then writes the model folder into `out` and
/// moves it into place. Shared by `convert` and `import`.
pub(crate) fn write_model(out: PartialDir, c: &Conversion, progress: &Progress) -> Result<Summary> {
    let (loaded, cfg, format) = (c.loaded, c.cfg, &c.format);
    let dtype = format.dtype;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::flag(
            "--dtype",
            format!("{dtype:?} is not supported (f32, f16, bf16)"),
        ));
    }
    let report = check_weights(cfg, loaded.tensors.infos())?;
    if !report.unused.is_empty() {
        let mut names = report.unused[..report.unused.len().min(3)].join(", ");
        if report.unused.len() > 3 {
            names.push_str(", ...");
        }
        tracing::warn!(
            "{} tensor(s) are not used by the model and are copied as they are: {names}",
            report.unused.len()
        );
    }
    let parameters = loaded.tensors.parameter_count();
    let folder = ModelFolder {
        config: Config::Json(c.config_json),
        weights: Weights::Tensors(&loaded.tensors),
        format,
        side_files: SideFiles::Planned(&loaded.side_files),
        records: Vec::new(),
    };
    let card = |written: &WrittenWeights| {
        model_card(&CardInfo {
            source: c.source,
            source_kind: &loaded.kind,
            source_name: loaded.name.as_deref(),
            config: cfg,
            parameters,
            dtype: &format_label(format),
            weight_files: &written.files,
            command_line: c.command_line,
        })
    };
    let (out, written) = folder.write(out, card, progress)?;
    Ok(Summary {
        out,
        tensors: loaded.tensors.infos().len(),
        parameters,
        dtype,
        quantize: format.quantize,
        weight_files: written.files,
        weight_bytes: written.total_size,
        liger: cfg.liger.clone(),
        unused: report.unused,
    })
}
