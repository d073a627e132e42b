//! The weights to write, wherever they come from: memory-mapped safetensors files (a Hugging
//! Face folder, local or downloaded) or tensors already in memory (a GGUF import).
//!
//! Tensors are read one at a time and cast on the fly, so converting a model never needs
//! more memory than its largest tensor (plus the map). A tensor whose dtype already is the
//! output dtype is copied byte for byte, which is what keeps unchanged weights identical.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::View;
use safetensors::Dtype;

use crate::progress::Progress;
use crate::{Error, Result};

/// Name, shape and stored dtype of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Whether the converter casts this tensor to the output dtype. Integer and exotic
    /// tensors (rare extras such as step counters) are copied as they are.
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        )
    }

    /// Size in bytes as stored in the source.
    pub fn stored_bytes(&self) -> u64 {
        (self.numel() * self.dtype.bitsize() as u64).div_ceil(8)
    }

    /// Stored size in bytes when written as `out` (or as stored, for non-float tensors).
    pub fn bytes_as(&self, out: DType) -> u64 {
        let bits = if self.is_float() {
            out.size_in_bytes() * 8
        } else {
            self.dtype.bitsize()
        };
        (self.numel() * bits as u64).div_ceil(8)
    }
}

enum Backing {
    /// Safetensors files and, for each tensor, the file holding it.
    Files {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        location: HashMap<String, usize>,
    },
    /// Tensors in memory (CPU).
    Memory(HashMap<String, Tensor>),
}

/// A model's tensors, listed in natural name order (`layers.2` before `layers.10`).
pub struct TensorSet {
    infos: Vec<TensorInfo>,
    backing: Backing,
}

impl TensorSet {
    /// Opens safetensors `files` (already resolved from `model.safetensors` or the index).
    /// `index` is the index file, if any, whose `weight_map` is cross-checked.
    pub fn open_files(
        files: &[PathBuf],
        index: Option<&Path>,
        progress: &Progress,
    ) -> Result<Self> {
        let bar = progress.items(files.len() as u64, "load");
        let mut opened = Vec::with_capacity(files.len());
        let mut location = HashMap::new();
        let mut infos = Vec::new();
        for (i, path) in files.iter().enumerate() {
            bar.set_message(file_name(path));
            // Reports missing, truncated and non-safetensors files by name.
            liger_model::weights::check_safetensors(path)?;
            // SAFETY: the file is mapped read-only; the converter never writes to its source.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                liger_model::Error::weights(path, format!("not a valid safetensors file ({e})"))
            })?;
            for (name, view) in st.tensors() {
                if let Some(&j) = location.get(&name) {
                    let other: &PathBuf = &files[j];
                    return Err(liger_model::Error::weights(
                        path,
                        format!("tensor `{name}` is also stored in {}", file_name(other)),
                    )
                    .into());
                }
                location.insert(name.clone(), i);
                infos.push(TensorInfo {
                    name,
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                });
            }
            opened.push((path.clone(), st));
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(index) = index {
            check_index(index, files, &location)?;
        }
        infos.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        Ok(Self {
            infos,
            backing: Backing::Files {
                files: opened,
                location,
            },
        })
    }

    /// Wraps in-memory tensors (moved to the CPU by the caller).
    pub fn from_memory(tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut infos = Vec::with_capacity(tensors.len());
        for (name, t) in &tensors {
            infos.push(TensorInfo {
                name: name.clone(),
                shape: t.dims().to_vec(),
                dtype: t.dtype().into(),
            });
        }
        infos.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        Ok(Self {
            infos,
            backing: Backing::Memory(tensors.into_iter().collect()),
        })
    }

    pub fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    pub fn parameter_count(&self) -> u64 {
        self.infos.iter().map(TensorInfo::numel).sum()
    }

    /// The dtype most of the floating-point weights (by bytes) are stored in; f32 when the
    /// set has none or when that dtype is f64 (which the runtime has no use for).
    pub fn dominant_float_dtype(&self) -> DType {
        let mut bytes: BTreeMap<Dtype, u64> = BTreeMap::new();
        for i in self.infos.iter().filter(|i| i.is_float()) {
            *bytes.entry(i.dtype).or_default() += i.stored_bytes();
        }
        match bytes
            .into_iter()
            .max_by_key(|&(d, b)| (b, d))
            .map(|(d, _)| d)
        {
            Some(Dtype::F16) => DType::F16,
            Some(Dtype::BF16) => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The bytes of `info` as they are written for output dtype `out`: a borrowed slice of
    /// the mapped file when no cast is needed, otherwise a freshly cast copy.
    pub fn bytes(&self, info: &TensorInfo, out: DType) -> Result<Cow<'_, [u8]>> {
        let target: Dtype = out.into();
        let cast = info.is_float() && info.dtype != target;
        match &self.backing {
            Backing::Files { files, location } => {
                let (path, st) = &files[location[&info.name]];
                let view = st.get(&info.name).map_err(|e| {
                    liger_model::Error::weights(path, format!("tensor `{}`: {e}", info.name))
                })?;
                if !cast {
                    return Ok(Cow::Borrowed(view.data()));
                }
                let t = view.load(&Device::Cpu).map_err(|e| {
                    liger_model::Error::weights(path, format!("tensor `{}`: {e}", info.name))
                })?;
                Ok(Cow::Owned(tensor_bytes(&t.to_dtype(out)?)))
            }
            Backing::Memory(map) => {
                let t = &map[&info.name];
                let t = if cast { t.to_dtype(out)? } else { t.clone() };
                Ok(Cow::Owned(tensor_bytes(&t)))
            }
        }
    }
}

/// Little-endian bytes of a CPU tensor, in row-major order.
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    View::data(t).into_owned()
}

/// The index's `weight_map` must agree with what the shard files contain, or a loader that
/// trusts the index (transformers does) would look in the wrong file.
fn check_index(index: &Path, files: &[PathBuf], location: &HashMap<String, usize>) -> Result<()> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| liger_model::Error::weights(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| liger_model::Error::weights(index, "no `weight_map` object"))?;
    for (name, file) in map {
        let file = file.as_str().unwrap_or_default();
        match location.get(name) {
            None => {
                return Err(liger_model::Error::weights(
                    index,
                    format!("lists tensor `{name}` in {file}, which does not contain it"),
                )
                .into())
            }
            Some(&i) if file_name(&files[i]) != file => {
                return Err(liger_model::Error::weights(
                    index,
                    format!(
                        "lists tensor `{name}` in {file}, but it is in {}",
                        file_name(&files[i])
                    ),
                )
                .into())
            }
            Some(_) => {}
        }
    }
    if let Some(name) = location.keys().find(|n| !map.contains_key(n.as_str())) {
        return Err(liger_model::Error::weights(
            index,
            format!("does not list tensor `{name}`, which the shards contain"),
        )
        .into());
    }
    Ok(())
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Compares names so that embedded numbers sort by value: `layers.2.x` < `layers.10.x`.
/// Shards then hold consecutive layers, as the original checkpoints do.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na
                    .len()
                    .cmp(&nb.len())
                    .then_with(|| na.cmp(nb))
                    .then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec![
            "model.layers.10.a",
            "model.layers.2.a",
            "lm_head",
            "model.layers.2.b",
            "model.layers.1.a",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "lm_head",
                "model.layers.1.a",
                "model.layers.2.a",
                "model.layers.2.b",
                "model.layers.10.a"
            ]
        );
        assert_eq!(natural_cmp("a01", "a1"), Ordering::Greater);
        assert_eq!(natural_cmp("x", "x"), Ordering::Equal);
    }

    #[test]
    fn casts_and_raw_copies() {
        let t = Tensor::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        let set = TensorSet::from_memory(vec![("w".into(), t)]).unwrap();
        let info = set.infos()[0].clone();
        assert_eq!(info.bytes_as(DType::F16), 6);
        let raw = set.bytes(&info, DType::F32).unwrap();
        assert_eq!(&raw[..4], &1.5f32.to_le_bytes());
        let half = set.bytes(&info, DType::BF16).unwrap();
        assert_eq!(half.len(), 6);
        assert_eq!(set.dominant_float_dtype(), DType::F32);
    }
}
