//! Writing the output folder so that nothing partial is ever left at its path.
//!
//! Everything is written into a hidden sibling, `.NAME.partial-PID`, which is renamed into
//! place only when complete (a rename within one folder is atomic). Any error drops the
//! [`PartialDir`] and removes it; an interrupt handler calls [`abort_pending`], which removes
//! every folder still being written. With `--force` an existing folder is moved aside first
//! and deleted only after the new one is in place, so a failure never loses both.
//!
//! Weights are written as safetensors by hand, one tensor at a time, so memory stays at one
//! tensor and progress can be reported per tensor; when the total exceeds the shard limit
//! they are split into `model-0000i-of-0000N.safetensors` plus the usual index.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use liger_model::layers::Quantization;
use liger_model::weights::{is_quantizable, QuantizedEntry, QUANTIZED_KEY};
use serde_json::{json, Value};

use crate::progress::Progress;
use crate::tensors::{TensorInfo, TensorSet};
use crate::{Error, Result};

/// Default largest shard size: 2 GB, as `transformers` uses for `max_shard_size`.
pub const DEFAULT_SHARD_LIMIT: u64 = 2_000_000_000;

/// Folders being written right now, removed by [`abort_pending`].
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic elsewhere while holding the lock must not stop the cleanup.
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every partial output folder of this process. For signal handlers: it keeps the
/// lock, so no folder can be committed afterwards; the caller is expected to exit.
pub fn abort_pending() {
    let mut guard = pending();
    for dir in guard.drain(..) {
        remove_dir_retrying(&dir);
    }
    std::mem::forget(guard);
}

/// `remove_dir_all` can race with a writer creating a file inside; a few retries win.
fn remove_dir_retrying(dir: &Path) {
    for _ in 0..20 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Fails early (before anything is downloaded or read) when `dest` cannot be written.
pub fn check_destination(dest: &Path, force: bool) -> Result<()> {
    if dest.file_name().is_none() {
        return Err(Error::flag(
            "--out",
            format!("`{}` cannot be used as an output folder", dest.display()),
        ));
    }
    if !force && std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::OutputExists(dest.to_path_buf()));
    }
    Ok(())
}

/// Refuses an output that would replace (or contain) the source: `--force` would otherwise
/// delete the very model the user converted from once the new folder is in place.
pub fn check_not_source(dest: &Path, source: &Path) -> Result<()> {
    let (Ok(dest_c), Ok(src_c)) = (dest.canonicalize(), source.canonicalize()) else {
        // `dest` does not exist yet (nothing to replace) or the source is not local.
        return Ok(());
    };
    if src_c.starts_with(&dest_c) {
        return Err(Error::flag(
            "--out",
            format!(
                "{} holds the source {}; replacing it would delete the source",
                dest.display(),
                source.display()
            ),
        ));
    }
    Ok(())
}

/// An output folder under construction.
pub struct PartialDir {
    temp: PathBuf,
    dest: PathBuf,
    force: bool,
    done: bool,
}

impl PartialDir {
    /// Creates the temporary folder beside `dest` (refusing an existing `dest` unless `force`).
    pub fn begin(dest: &Path, force: bool) -> Result<Self> {
        check_destination(dest, force)?;
        let name = dest
            .file_name()
            .expect("checked")
            .to_string_lossy()
            .into_owned();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let temp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        // A leftover from an earlier run of a process with the same id is garbage.
        remove_dir_retrying(&temp);
        let mut list = pending();
        std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, e))?;
        list.push(temp.clone());
        Ok(Self {
            temp,
            dest: dest.to_path_buf(),
            force,
            done: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Moves the finished folder to `dest`, replacing an existing one if `force` was given.
    pub fn commit(mut self) -> Result<PathBuf> {
        // Holding the lock keeps an interrupt from deleting the folder mid-rename.
        let mut list = pending();
        if !list.contains(&self.temp) {
            return Err(Error::Interrupted);
        }
        let existing = std::fs::symlink_metadata(&self.dest).ok();
        let mut aside = None;
        if let Some(meta) = existing {
            if !self.force {
                return Err(Error::OutputExists(self.dest.clone()));
            }
            let name = self
                .dest
                .file_name()
                .expect("checked")
                .to_string_lossy()
                .into_owned();
            let old = self
                .temp
                .with_file_name(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            aside = Some((old, meta.is_dir()));
        }
        if let Err(e) = std::fs::rename(&self.temp, &self.dest) {
            if let Some((old, _)) = &aside {
                // Put the previous folder back: the user keeps what they had.
                let _ = std::fs::rename(old, &self.dest);
            }
            return Err(Error::io(&self.dest, e));
        }
        list.retain(|p| p != &self.temp);
        self.done = true;
        drop(list);
        if let Some((old, is_dir)) = aside {
            let removed = if is_dir {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            if let Err(e) = removed {
                tracing::warn!(
                    "could not remove the replaced output {}: {e}",
                    old.display()
                );
            }
        }
        Ok(self.dest.clone())
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.done {
            let mut list = pending();
            remove_dir_retrying(&self.temp);
            list.retain(|p| p != &self.temp);
        }
    }
}

/// Writes `value` as pretty JSON (with a final newline, as Hugging Face tools do).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// What [`write_weights`] produced.
#[derive(Debug, Clone)]
pub struct WrittenWeights {
    /// File names inside the folder, in order.
    pub files: Vec<String>,
    /// Sum of all tensors' data bytes (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Groups tensors (in order) into shards of at most `limit` bytes each; a tensor larger than
/// the limit gets a shard of its own. Returns index ranges into `sizes`.
pub fn plan_shards(sizes: &[u64], limit: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut acc) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && acc + s > limit {
            shards.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    if start < sizes.len() || shards.is_empty() {
        shards.push(start..sizes.len());
    }
    shards
}

/// How weights are written.
#[derive(Debug, Clone, Copy)]
pub struct WeightFormat {
    /// Floating-point tensors are cast to this.
    pub dtype: DType,
    /// Store the projections (and the LM head) as GGML blocks of this format.
    pub quantize: Option<Quantization>,
    /// Largest safetensors file before sharding, in bytes.
    pub shard_limit: u64,
}

impl WeightFormat {
    pub fn dense(dtype: DType) -> Self {
        Self {
            dtype,
            quantize: None,
            shard_limit: DEFAULT_SHARD_LIMIT,
        }
    }
}

/// How one tensor is stored.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// As the output dtype (floats) or as it is (anything else).
    Cast,
    /// GGML blocks, as a flat `U8` tensor.
    Blocks(GgmlDType),
}

/// One tensor to write: `name`, read from `source`.
struct Planned<'a> {
    name: String,
    source: &'a TensorInfo,
    encoding: Encoding,
    size: u64,
}

/// The tensors of `set` as `format` stores them, in natural name order. A quantized tied
/// model gains a quantized `lm_head.weight` made from the embeddings (see
/// `liger_model::weights`).
fn plan<'a>(set: &'a TensorSet, format: &WeightFormat) -> Result<Vec<Planned<'a>>> {
    let blocks = |info: &TensorInfo| -> Option<GgmlDType> {
        let q = format.quantize?;
        let fits = info.is_float() && info.shape.len() == 2;
        fits.then(|| q.format_for(info.shape[1])).flatten()
    };
    let planned = |name: &str, source: &'a TensorInfo, encoding| -> Result<Planned<'a>> {
        let size = match encoding {
            Encoding::Cast => source.bytes_as(format.dtype),
            Encoding::Blocks(f) => QuantizedEntry::new(f, &source.shape)?
                .byte_len()
                .expect("format_for only picks formats whose blocks fit")
                as u64,
        };
        Ok(Planned {
            name: name.to_owned(),
            source,
            encoding,
            size,
        })
    };
    let mut out = Vec::with_capacity(set.infos().len() + 1);
    for info in set.infos() {
        let encoding = match blocks(info) {
            Some(f) if is_quantizable(&info.name) => Encoding::Blocks(f),
            _ => Encoding::Cast,
        };
        out.push(planned(&info.name, info, encoding)?);
    }
    let has_head = set.infos().iter().any(|i| i.name == "lm_head.weight");
    let embed = set
        .infos()
        .iter()
        .find(|i| i.name == "model.embed_tokens.weight");
    if let (false, Some(embed)) = (has_head, embed) {
        if let Some(f) = blocks(embed) {
            out.push(planned("lm_head.weight", embed, Encoding::Blocks(f))?);
            out.sort_by(|a, b| crate::tensors::natural_cmp(&a.name, &b.name));
        }
    }
    Ok(out)
}

/// Writes all tensors of `set` as `format` says into `dir`: one `model.safetensors` when
/// the total is at most the shard limit, shards and `model.safetensors.index.json`
/// otherwise.
pub fn write_weights(
    dir: &Path,
    set: &TensorSet,
    format: &WeightFormat,
    progress: &Progress,
) -> Result<WrittenWeights> {
    let planned = plan(set, format)?;
    let sizes: Vec<u64> = planned.iter().map(|p| p.size).collect();
    let total_size: u64 = sizes.iter().sum();
    // One file whenever everything fits (`plan_shards` would give the same single range).
    let shards = plan_shards(&sizes, format.shard_limit.max(1));
    let bar = progress.bytes(total_size, "write");
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    for (k, range) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            liger_model::weights::SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let items = &planned[range];
        write_safetensors(&dir.join(&file), items, format.dtype, set, &mut |p| {
            bar.set_message(p.name.clone());
            bar.inc(p.size);
        })?;
        for p in items {
            weight_map.insert(p.name.clone(), Value::String(file.clone()));
        }
        files.push(file);
    }
    bar.finish_and_clear();
    if n > 1 {
        let index = json!({
            "metadata": { "total_size": total_size },
            "weight_map": Value::Object(weight_map),
        });
        write_json(&dir.join(liger_model::weights::INDEX_FILE), &index)?;
    }
    Ok(WrittenWeights { files, total_size })
}

/// The bytes `p` is stored as.
fn encoded_bytes<'s>(p: &Planned, dtype: DType, set: &'s TensorSet) -> Result<Cow<'s, [u8]>> {
    match p.encoding {
        Encoding::Cast => set.bytes(p.source, dtype),
        Encoding::Blocks(f) => {
            let raw = set.bytes(p.source, DType::F32)?;
            let dense = Tensor::from_raw_buffer(&raw, DType::F32, &p.source.shape, &Device::Cpu)?;
            let blocks = QTensor::quantize(&dense, f)?;
            Ok(Cow::Owned(blocks.data()?.into_owned()))
        }
    }
}

/// One safetensors file: 8-byte little-endian header length, the JSON header (padded with
/// spaces to a multiple of 8 so the data is aligned), then the tensors back to back.
fn write_safetensors(
    path: &Path,
    items: &[Planned],
    dtype: DType,
    set: &TensorSet,
    on_tensor: &mut dyn FnMut(&Planned),
) -> Result<()> {
    let out_dtype: safetensors::Dtype = dtype.into();
    let mut header = BTreeMap::new();
    let mut quantized = BTreeMap::new();
    let mut offset = 0u64;
    for p in items {
        let (stored, shape) = match p.encoding {
            Encoding::Blocks(f) => {
                quantized.insert(p.name.clone(), QuantizedEntry::new(f, &p.source.shape)?);
                (safetensors::Dtype::U8, vec![p.size as usize])
            }
            Encoding::Cast if p.source.is_float() => (out_dtype, p.source.shape.clone()),
            Encoding::Cast => (p.source.dtype, p.source.shape.clone()),
        };
        header.insert(
            p.name.clone(),
            json!({
                "dtype": stored,
                "shape": shape,
                "data_offsets": [offset, offset + p.size],
            }),
        );
        offset += p.size;
    }
    // transformers refuses safetensors files without `format: pt` in the metadata.
    let mut metadata = json!({ "format": "pt" });
    if !quantized.is_empty() {
        metadata[QUANTIZED_KEY] =
            Value::String(serde_json::to_string(&quantized).expect("JSON values serialize"));
    }
    header.insert("__metadata__".to_owned(), metadata);
    let mut head = serde_json::to_vec(&header).expect("JSON values serialize");
    head.resize(head.len().div_ceil(8) * 8, b' ');

    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&head).map_err(io)?;
    for p in items {
        let bytes = encoded_bytes(p, dtype, set)?;
        if bytes.len() as u64 != p.size {
            return Err(liger_model::Error::tensor(
                &p.name,
                format!("holds {} bytes, expected {}", bytes.len(), p.size),
            )
            .into());
        }
        w.write_all(&bytes).map_err(io)?;
        on_tensor(p);
    }
    // Flushing surfaces a full disk here rather than silently in `drop`.
    w.into_inner().map_err(|e| io(e.into_error()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_plans() {
        assert_eq!(plan_shards(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1, 1], 4), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[1, 10, 1], 4), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&[], 4), vec![0..0]);
    }

    #[test]
    fn partial_dir_cleans_up_and_commits() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        {
            let p = PartialDir::begin(&dest, false).unwrap();
            std::fs::write(p.path().join("f"), "x").unwrap();
            assert!(p.path().exists());
        }
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "dropped => removed"
        );

        let p = PartialDir::begin(&dest, false).unwrap();
        std::fs::write(p.path().join("f"), "1").unwrap();
        p.commit().unwrap();
        assert!(matches!(
            PartialDir::begin(&dest, false),
            Err(Error::OutputExists(_))
        ));

        let p = PartialDir::begin(&dest, true).unwrap();
        std::fs::write(p.path().join("f"), "2").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "2");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
    }
}
