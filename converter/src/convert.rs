//! `convert`: a Transformer (Hugging Face folder, hub id or GGUF) into a Liger checkpoint.
//!
//! Conversion adds no parameters (LIGER.md §1): the weights are written unchanged (only cast
//! to the output dtype) and `config.json` gains a `liger` section that tells the runtime how
//! each attention layer now mixes. The steps are ordered so that cheap mistakes fail first:
//! flags, then the output path, then the source, then a full load check of the config
//! against the weights; only then is anything written, into a folder that becomes visible
//! at its final path only once complete (see [`crate::output`]).

use std::path::{Path, PathBuf};

use candle_core::DType;
use liger_model::layers::Quantization;
use liger_model::{LigerConfig, ModelConfig};
use serde_json::Value;

use crate::card::{model_card, CardInfo};
use crate::check::check_weights;
use crate::output::{self, PartialDir, WeightFormat, DEFAULT_SHARD_LIMIT};
use crate::progress::Progress;
use crate::settings::LigerSettings;
use crate::source::{self, HubOptions, LoadedSource, SideContent, SourceKind};
use crate::{Error, Result};

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
    if let SourceKind::Folder(p) | SourceKind::Gguf(p) = &kind {
        output::check_not_source(&opts.out, p)?;
    }
    let (loaded, out) = if matches!(kind, SourceKind::Hub(_)) {
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
    write_model(
        out,
        &loaded,
        &cfg,
        config_json,
        &format,
        &opts.source,
        opts.command_line.as_deref(),
        progress,
    )
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

/// The Hugging Face name of a dtype, as `torch_dtype` spells it.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Checks `cfg` against the weights, then writes config, weights, side files and card into
/// `out` and moves it into place. Shared by `convert` and `import`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_model(
    out: PartialDir,
    loaded: &LoadedSource,
    cfg: &ModelConfig,
    mut config_json: Value,
    format: &WeightFormat,
    source: &str,
    command_line: Option<&str>,
    progress: &Progress,
) -> Result<Summary> {
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
    let dir = out.path().to_path_buf();
    if let Value::Object(m) = &mut config_json {
        m.insert(
            "torch_dtype".into(),
            Value::String(torch_dtype_name(dtype).into()),
        );
    }
    output::write_json(&dir.join(liger_model::weights::CONFIG_FILE), &config_json)?;
    let written = output::write_weights(&dir, &loaded.tensors, format, progress)?;
    write_side_files(&dir, &loaded.side_files)?;

    let parameters = loaded.tensors.parameter_count();
    let card = model_card(&CardInfo {
        source,
        source_kind: &loaded.kind,
        source_name: loaded.name.as_deref(),
        config: cfg,
        parameters,
        dtype: &format_label(format),
        weight_files: &written.files,
        command_line,
    });
    let readme = dir.join("README.md");
    std::fs::write(&readme, card).map_err(|e| Error::io(&readme, e))?;

    let out = out.commit()?;
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

pub(crate) fn write_side_files(dir: &Path, files: &[(String, SideContent)]) -> Result<()> {
    for (name, content) in files {
        let path = dir.join(name);
        match content {
            SideContent::Copy(src) => {
                std::fs::copy(src, &path).map_err(|e| Error::io(src, e))?;
            }
            SideContent::Json(v) => output::write_json(&path, v)?,
            SideContent::Tokenizer(t) => t.save(&path, false).map_err(|e| {
                liger_model::Error::Tokenizer(format!("saving {}: {e}", path.display()))
            })?,
        }
    }
    Ok(())
}
