//! Writing a model folder: the one sequence every command that writes a model follows
//! (`convert`, `import`, `quantize`, `apply-adapter`, `recover`): `config.json`, the
//! weights, the tokenizer and generation files, any records (`recovery.json`), the model
//! card, all into a [`PartialDir`] that is moved into place only once everything is
//! written (see [`crate::output`]). The commands differ only in where each part comes from.

use std::path::{Path, PathBuf};

use candle_core::Device;
use liger_model::checkpoint::torch_dtype_name;
use liger_model::Model;
use serde_json::Value;

use crate::output::{self, PartialDir, WeightFormat, WrittenWeights};
use crate::progress::Progress;
use crate::source::{SideContent, SIDE_FILES};
use crate::tensors::TensorSet;
use crate::{Error, Result};

/// Where `config.json` comes from.
pub enum Config<'a> {
    /// This JSON, with `torch_dtype` set to the stored dtype.
    Json(&'a Value),
    /// The `config.json` of this folder, byte for byte (a merged model is the same
    /// architecture, stored in the same dtype).
    CopyFrom(&'a Path),
}

/// Where the weights come from.
pub enum Weights<'a> {
    /// A source's tensors, read (and cast) one at a time.
    Tensors(&'a TensorSet),
    /// A loaded model's weights; adapters must be merged first, and a quantized model is
    /// refused (its weights would be written dequantized).
    Model(&'a Model),
}

/// Where the tokenizer and generation files come from.
pub enum SideFiles<'a> {
    /// As the source loader planned them (copies, JSON, a tokenizer built from GGUF).
    Planned(&'a [(String, SideContent)]),
    /// The [`SIDE_FILES`] this folder has.
    CopyFrom(&'a Path),
}

/// Everything a model folder holds, by origin.
pub struct ModelFolder<'a> {
    pub config: Config<'a>,
    pub weights: Weights<'a>,
    pub format: &'a WeightFormat,
    pub side_files: SideFiles<'a>,
    /// Further JSON files by name (`recovery.json`).
    pub records: Vec<(&'static str, Value)>,
}

impl ModelFolder<'_> {
    /// Writes the folder into `out`, then `README.md` from `card` (which sees the weight
    /// files written), and moves it into place. Returns its final path and the weights
    /// written. On any error `out` is dropped, which removes it.
    pub fn write(
        self,
        out: PartialDir,
        card: impl FnOnce(&WrittenWeights) -> String,
        progress: &Progress,
    ) -> Result<(PathBuf, WrittenWeights)> {
        let dir = out.path().to_path_buf();
        let config_path = dir.join(liger_model::weights::CONFIG_FILE);
        match self.config {
            Config::Json(v) => {
                let mut v = v.clone();
                if let Value::Object(m) = &mut v {
                    m.insert(
                        "torch_dtype".into(),
                        Value::String(torch_dtype_name(self.format.dtype).into()),
                    );
                }
                output::write_json(&config_path, &v)?;
            }
            Config::CopyFrom(src) => {
                let from = src.join(liger_model::weights::CONFIG_FILE);
                std::fs::copy(&from, &config_path).map_err(|e| Error::io(&from, e))?;
            }
        }
        let written = match self.weights {
            Weights::Tensors(set) => output::write_weights(&dir, set, self.format, progress)?,
            Weights::Model(model) => model_weights(&dir, model, self.format, progress)?,
        };
        match self.side_files {
            SideFiles::Planned(files) => write_side_files(&dir, files)?,
            SideFiles::CopyFrom(src) => copy_side_files(src, &dir)?,
        }
        for (name, value) in &self.records {
            output::write_json(&dir.join(name), value)?;
        }
        let readme = dir.join("README.md");
        std::fs::write(&readme, card(&written)).map_err(|e| Error::io(&readme, e))?;
        Ok((out.commit()?, written))
    }
}

fn model_weights(
    dir: &Path,
    model: &Model,
    format: &WeightFormat,
    progress: &Progress,
) -> Result<WrittenWeights> {
    if model.is_quantized() {
        return Err(liger_model::Error::Invalid(
            "a quantized model cannot be written (its weights would be dequantized); \
             write the dense model and quantize that"
                .into(),
        )
        .into());
    }
    let weights = model
        .named_weights()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let set = TensorSet::from_memory(weights)?;
    output::write_weights(dir, &set, format, progress)
}

fn write_side_files(dir: &Path, files: &[(String, SideContent)]) -> Result<()> {
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

fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, dst.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}
