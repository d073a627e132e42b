//! Loading a Hugging Face model folder: `config.json` plus safetensors weights, either one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`. Files are
//! memory-mapped and converted to the requested dtype and device as tensors are read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::model::Model;
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files of a model folder, checked to exist and to have readable headers.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let files = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::weights(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::weights(&index, "no `weight_map` object"))?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if names.is_empty() {
            return Err(Error::weights(&index, "`weight_map` lists no files"));
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join(SINGLE_FILE)]
    };
    for f in &files {
        check_safetensors(f)?;
    }
    Ok(files)
}

/// Fails with the file's name if it is missing, truncated or not safetensors.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before we return; a file changed underneath
    // us can at worst make the check fail.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::weights(path, format!("not a valid safetensors file ({e})")))?;
    Ok(())
}

/// Loads `dir/config.json` and its weights as `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    let cfg = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
    let files = safetensors_files(dir)?;
    // SAFETY: safetensors files are mapped read-only; every file was validated above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    Model::new(cfg, vb).map_err(|e| match e {
        Error::Candle(c) => Error::weights(dir, format!("weights do not match config.json: {c}")),
        e => e,
    })
}
