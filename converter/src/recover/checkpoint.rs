//! Recovery checkpoints in `OUT.ckpt/`, so a long run survives interruption.
//!
//! ```text
//! OUT.ckpt/
//!   latest/meta.json               settings fingerprint, stage, step, RNG, stats so far
//!   latest/adapter.safetensors     LoRA weights (PEFT names)
//!   latest/optimizer.safetensors   AdamW moments (absent at a stage boundary)
//!   selfdistill.jsonl              the teacher's generated conversations, reused on resume
//! ```
//!
//! A checkpoint is written into `.tmp` and swapped in by renames, so an interrupt while
//! writing leaves the previous one intact (`previous/` bridges the window between the two
//! renames). Everything needed to continue exactly is in it: weights and moments are stored
//! as f32 bit for bit, and the data order is a function of the seed and the step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stats::StageStats;
use crate::{Error, Result};

const LATEST: &str = "latest";
const PREVIOUS: &str = "previous";
const TMP: &str = ".tmp";
const META: &str = "meta.json";
const ADAPTER: &str = "adapter.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
pub const SELF_DISTILL: &str = "selfdistill.jsonl";
const FORMAT: u32 = 1;

/// Where a run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// Everything that determines the result; a resume must match it exactly.
    pub settings: Value,
    /// Index into the run's stage list.
    pub stage_index: usize,
    /// Optimizer steps done in that stage (0 at a stage boundary).
    pub step: usize,
    /// Optimizer step counter (bias correction) at this point.
    pub optimizer_step: u64,
    /// The data-order RNG seed of the current stage.
    pub rng: u64,
    /// Stats of finished stages, then the current one's so far.
    pub stats: Vec<StageStats>,
    /// Wall time spent before this checkpoint, in seconds.
    pub elapsed_s: f64,
}

/// What a resume restores.
pub struct Restored {
    pub meta: Meta,
    pub adapter: HashMap<String, Tensor>,
    pub optimizer: Option<HashMap<String, Tensor>>,
}

/// The checkpoint folder of one output.
pub struct Checkpoints {
    pub dir: PathBuf,
}

impl Checkpoints {
    /// `OUT.ckpt` next to `OUT`.
    pub fn for_output(out: &Path) -> Self {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".ckpt");
        Self {
            dir: out.with_file_name(name),
        }
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// Writes a checkpoint and makes it the latest.
    pub fn save(
        &self,
        meta: &Meta,
        adapter: &[(String, Tensor)],
        optimizer: Option<&[(String, Tensor)]>,
    ) -> Result<()> {
        self.create()?;
        let tmp = self.dir.join(TMP);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let save = |name: &str, tensors: &[(String, Tensor)]| -> Result<()> {
            let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
            candle_core::safetensors::save(&map, tmp.join(name))?;
            Ok(())
        };
        save(ADAPTER, adapter)?;
        if let Some(o) = optimizer {
            save(OPTIMIZER, o)?;
        }
        let meta_path = tmp.join(META);
        std::fs::write(
            &meta_path,
            serde_json::to_string_pretty(meta).expect("plain struct"),
        )
        .map_err(|e| Error::io(&meta_path, e))?;
        let (latest, previous) = (self.dir.join(LATEST), self.dir.join(PREVIOUS));
        let _ = std::fs::remove_dir_all(&previous);
        if latest.exists() {
            std::fs::rename(&latest, &previous).map_err(|e| Error::io(&latest, e))?;
        }
        std::fs::rename(&tmp, &latest).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&previous);
        Ok(())
    }

    /// The newest complete checkpoint, if any.
    pub fn load(&self) -> Result<Option<Restored>> {
        let dir = [LATEST, PREVIOUS]
            .iter()
            .map(|n| self.dir.join(n))
            .find(|d| d.join(META).exists());
        let Some(dir) = dir else { return Ok(None) };
        let meta_path = dir.join(META);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&meta_path, format!("unreadable ({e})")))?;
        if meta.format != FORMAT {
            return Err(Error::checkpoint(
                &meta_path,
                format!("format {} is not {FORMAT}", meta.format),
            ));
        }
        let read = |name: &str| -> Result<HashMap<String, Tensor>> {
            let p = dir.join(name);
            candle_core::safetensors::load(&p, &Device::Cpu)
                .map_err(|e| Error::checkpoint(&p, format!("unreadable ({e})")))
        };
        let adapter = read(ADAPTER)?;
        let optimizer = if dir.join(OPTIMIZER).exists() {
            Some(read(OPTIMIZER)?)
        } else {
            None
        };
        Ok(Some(Restored {
            meta,
            adapter,
            optimizer,
        }))
    }

    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// The first setting in which `a` and `b` differ, as `key: a vs b`.
pub fn first_difference(a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                first_difference(va, vb).map(|d| {
                    if d.starts_with(':') {
                        format!("{k}{d}")
                    } else {
                        format!("{k}.{d}")
                    }
                })
            })
        }
        _ if a == b => None,
        _ => Some(format!(": {a} vs {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_are_named() {
        let a = json!({"seed": 0, "lora": {"rank": 8, "alpha": 8}});
        let b = json!({"seed": 0, "lora": {"rank": 4, "alpha": 8}});
        assert_eq!(first_difference(&a, &b).unwrap(), "lora.rank: 8 vs 4");
        assert!(first_difference(&a, &a).is_none());
    }
}
