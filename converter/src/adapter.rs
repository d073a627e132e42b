//! `apply-adapter`: folds a LoRA adapter (PEFT layout) into a model folder's weights and
//! writes the result as a plain model folder, servable with no adapter support at all.
//!
//! Also home to what `recover` shares with it: choosing the device and the dtype a folder
//! is stored in (both write their folders with [`crate::folder`]).

use std::path::PathBuf;

use candle_core::{DType, Device};
use liger_model::checkpoint::{Checkpoint, LoadOptions};
use liger_model::device::DeviceKind;
use liger_model::layers::Quantization;

use crate::folder::{Config, ModelFolder, SideFiles, Weights};
use crate::output::{self, PartialDir, WeightFormat};
use crate::progress::Progress;
use crate::{Error, Result};

/// Where training and evaluation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

impl DeviceChoice {
    pub fn device(self) -> Result<Device> {
        let kind = match self {
            DeviceChoice::Cpu => DeviceKind::Cpu,
            DeviceChoice::Cuda => DeviceKind::Cuda,
        };
        liger_model::device::open(kind).map_err(|e| match e {
            liger_model::Error::Device(why) => Error::flag("--device", why),
            other => other.into(),
        })
    }
}

/// Everything `liger-convert apply-adapter` takes.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The base model folder the adapter was trained on.
    pub model: PathBuf,
    /// Adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    pub adapter: PathBuf,
    pub out: PathBuf,
    /// Store the merged projections as GGML blocks of this format.
    pub quantize: Option<Quantization>,
    pub force: bool,
    pub command_line: Option<String>,
}

/// What `apply-adapter` wrote.
#[derive(Debug, Clone)]
pub struct Applied {
    pub out: PathBuf,
    pub adapted: usize,
    pub dtype: DType,
    pub quantize: Option<Quantization>,
    pub weight_files: Vec<String>,
}

/// Merges `opts.adapter` into `opts.model` and writes `opts.out`.
pub fn apply_adapter(opts: &ApplyOptions, progress: &Progress) -> Result<Applied> {
    output::check_destination(&opts.out, opts.force)?;
    output::check_not_source(&opts.out, &opts.model)?;
    let ckpt = Checkpoint::open(&opts.model)?.with_adapter(&opts.adapter)?;
    if ckpt.is_quantized() {
        return Err(Error::flag(
            "--model",
            format!(
                "{} is a quantized checkpoint; merge into the dense model (and add \
                 --quantize to quantize the result)",
                opts.model.display()
            ),
        ));
    }
    let spinner = progress.spinner("merge");
    // Merging in f32 then casting once keeps f16/bf16 models from double rounding.
    let merge = LoadOptions {
        merge_adapter: true,
        quantize: None,
    };
    let model = ckpt.load(&Device::Cpu, DType::F32, &merge)?;
    spinner.finish_and_clear();
    let (dtype, adapter) = (ckpt.stored_dtype(), ckpt.adapter().expect("opened with it"));
    let (cfg, adapted) = (&adapter.config, adapter.projections());
    let out = PartialDir::begin(&opts.out, opts.force)?;
    let format = WeightFormat {
        quantize: opts.quantize,
        ..WeightFormat::dense(dtype)
    };
    let mut card = format!(
        "# {} with a merged LoRA adapter\n\nThis folder is `{}` with the LoRA adapter `{}` \
         (rank {}, alpha {}, on {}; {adapted} projections) folded into its weights by \
         `liger-convert apply-adapter` {}, stored as {}. It loads and serves like the base \
         model, with no adapter support needed.\n",
        opts.model.file_name().unwrap_or_default().to_string_lossy(),
        opts.model.display(),
        opts.adapter.display(),
        cfg.rank,
        cfg.alpha,
        cfg.targets.join(", "),
        env!("CARGO_PKG_VERSION"),
        crate::convert::format_label(&format),
    );
    if let Some(cmd) = &opts.command_line {
        card.push_str(&format!("\n## How it was made\n\n```sh\n{cmd}\n```\n"));
    }
    let folder = ModelFolder {
        config: Config::CopyFrom(&opts.model),
        weights: Weights::Model(&model),
        format: &format,
        side_files: SideFiles::CopyFrom(&opts.model),
        records: Vec::new(),
    };
    let (out, written) = folder.write(out, |_| card, progress)?;
    Ok(Applied {
        out,
        adapted,
        dtype,
        quantize: opts.quantize,
        weight_files: written.files,
    })
}
