//! The files of a model folder: their names, and the check that a safetensors file is
//! whole. A leaf that both weight loading ([`crate::weights`]) and adapters
//! ([`crate::lora`]) use.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The JSON file at `path`, `None` when there is none; unreadable or invalid JSON is
/// `invalid`'s error (each file's own kind: a tokenizer file's, a template's).
pub fn read_optional_json(
    path: &Path,
    invalid: fn(String) -> Error,
) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| invalid(format!("{}: not valid JSON ({e})", path.display())))
}

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
