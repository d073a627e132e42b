//! The weights of a Hugging Face model folder: safetensors, either one `model.safetensors`
//! or shards listed in `model.safetensors.index.json`, memory-mapped and converted to the
//! requested dtype and device as tensors are read ([`crate::checkpoint`] opens folders).
//!
//! A *quantized* checkpoint is the same folder with some projection weights stored as GGML
//! blocks (Q8_0, Q4K): each such tensor is a flat `U8` tensor under the usual name, and its
//! file's safetensors metadata maps the name to its format and logical shape under
//! [`QUANTIZED_KEY`] (a JSON string, since safetensors metadata values are strings):
//! `{"model.layers.0.self_attn.q_proj.weight": {"format": "q4k", "shape": [576, 576]}}`.
//! The blocks are GGML's byte layout, so they load with no conversion; a tied model also
//! stores a quantized `lm_head.weight` so that its head product reads the small blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::layers::{format_name, parse_format, PROJECTIONS};
use crate::{Error, Result};

pub use crate::files::{
    check_safetensors, safetensors_files, CONFIG_FILE, INDEX_FILE, SINGLE_FILE,
};
pub use crate::layers::QuantizedTensors;
/// The safetensors metadata key listing a file's block-quantized tensors.
pub const QUANTIZED_KEY: &str = "liger.quantized";

/// One block-quantized tensor's entry under [`QUANTIZED_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedEntry {
    /// `q8_0` or `q4k`.
    pub format: String,
    /// The logical shape `[out, in]`.
    pub shape: Vec<usize>,
}

impl QuantizedEntry {
    pub fn new(format: GgmlDType, shape: &[usize]) -> Result<Self> {
        let name = format_name(format).ok_or_else(|| {
            Error::Invalid(format!(
                "{format:?} is not a checkpoint quantization format"
            ))
        })?;
        Ok(Self {
            format: name.into(),
            shape: shape.to_vec(),
        })
    }

    /// Bytes of the blocks, `elements / block_size * type_size`; `None` for an unknown
    /// format or rows that do not fill whole blocks (blocks never span two rows).
    pub fn byte_len(&self) -> Option<usize> {
        let f = parse_format(&self.format)?;
        let row = *self.shape.last()?;
        let n: usize = self.shape.iter().product();
        (row % f.block_size() == 0).then(|| n / f.block_size() * f.type_size())
    }
}

/// Whether a checkpoint may store `name` block-quantized: the projections of every layer
/// and the LM head. Embeddings and norms stay dense (a lookup reads one row per token;
/// norms are tiny).
pub fn is_quantizable(name: &str) -> bool {
    if name == "lm_head.weight" {
        return true;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && PROJECTIONS
            .iter()
            .any(|(t, block)| tail == format!("{block}.{t}.weight"))
}

/// The [`QUANTIZED_KEY`] entries of one safetensors file (empty for a dense file).
pub fn quantized_entries(path: &Path) -> Result<BTreeMap<String, QuantizedEntry>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map, dropped before we return; only the header is read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    entries_in(path, &mmap)
}

fn entries_in(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, QuantizedEntry>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::weights(path, format!("not a valid safetensors file ({e})")))?;
    let Some(json) = meta.metadata().as_ref().and_then(|m| m.get(QUANTIZED_KEY)) else {
        return Ok(BTreeMap::new());
    };
    serde_json::from_str(json)
        .map_err(|e| Error::weights(path, format!("metadata `{QUANTIZED_KEY}` is invalid: {e}")))
}

/// Reads every block-quantized tensor of `files` onto `device`.
pub fn read_quantized(files: &[PathBuf], device: &Device) -> Result<QuantizedTensors> {
    let mut out = HashMap::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map, dropped before we return; blocks are copied out of it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let entries = entries_in(path, &mmap)?;
        if entries.is_empty() {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::weights(path, format!("not a valid safetensors file ({e})")))?;
        for (name, entry) in entries {
            let bad = |reason: String| Error::weights(path, format!("tensor `{name}`: {reason}"));
            let format = parse_format(&entry.format)
                .ok_or_else(|| bad(format!("unknown quantization `{}`", entry.format)))?;
            let expected = entry
                .byte_len()
                .filter(|_| entry.shape.len() == 2)
                .ok_or_else(|| {
                    bad(format!(
                        "shape {:?} does not fit {format:?} blocks",
                        entry.shape
                    ))
                })?;
            let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
            if view.dtype() != safetensors::Dtype::U8 || view.data().len() != expected {
                return Err(bad(format!(
                    "stored as {:?} with {} bytes, {format:?} {:?} needs {expected} bytes of U8",
                    view.dtype(),
                    view.data().len(),
                    entry.shape
                )));
            }
            let q = qtensor_from_ggml(format, view.data(), entry.shape.clone(), device)?;
            out.insert(name, q);
        }
    }
    Ok(QuantizedTensors::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Dims;
    use safetensors::tensor::TensorView;

    #[test]
    fn only_projections_and_the_head_are_quantizable() {
        for yes in [
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.12.mlp.down_proj.weight",
        ] {
            assert!(is_quantizable(yes), "{yes}");
        }
        for no in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.self_attn.q_proj.bias",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.3.mlp.q_proj.weight",
        ] {
            assert!(!is_quantizable(no), "{no}");
        }
    }

    /// A file whose metadata lists `name` as `entry`, stored as `bytes` of U8.
    fn write(dir: &Path, entry: &str, bytes: usize) -> PathBuf {
        let data = vec![0u8; bytes];
        let view = TensorView::new(safetensors::Dtype::U8, vec![bytes], &data).unwrap();
        let meta = HashMap::from([(
            QUANTIZED_KEY.to_owned(),
            format!("{{\"lm_head.weight\": {entry}}}"),
        )]);
        let path = dir.join("model.safetensors");
        let file = safetensors::tensor::serialize([("lm_head.weight", view)], Some(meta)).unwrap();
        std::fs::write(&path, file).unwrap();
        path
    }

    #[test]
    fn bad_quantized_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        // 64 x 32 in Q8_0: 64 rows of one 34-byte block.
        let good = r#"{"format": "q8_0", "shape": [64, 32]}"#;
        let path = write(dir.path(), good, 64 * 34);
        let q = read_quantized(&[path], &Device::Cpu).unwrap();
        assert_eq!(q.len(), 1);
        assert!(
            q.take("lm_head.weight", Dims::new(64, 32)).is_err(),
            "shape checked"
        );

        for (entry, bytes, needle) in [
            (good, 100, "needs 2176 bytes"),
            (
                r#"{"format": "q3", "shape": [64, 32]}"#,
                64,
                "unknown quantization `q3`",
            ),
            (
                r#"{"format": "q8_0", "shape": [64, 33]}"#,
                64,
                "does not fit",
            ),
            (r#"{"format": "q8_0"}"#, 64, "is invalid"),
        ] {
            let path = write(dir.path(), entry, bytes);
            let e = read_quantized(&[path], &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("model.safetensors"), "{e}");
        }
    }
}
