//! LoRA adapters on the attention and MLP projections, in PEFT's on-disk layout so adapters
//! we write load in Hugging Face PEFT and the other way round:
//!
//! - `adapter_config.json`: `{"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}`
//! - `adapter_model.safetensors`: `base_model.model.model.layers.{i}.{block}.{proj}.lora_A.weight`
//!   (`[r, in]`) and `...lora_B.weight` (`[out, r]`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Projections an adapter can target (every projection of a block), with the block they
/// live in.
pub use crate::layers::PROJECTIONS as TARGETS;

/// What to adapt and how strongly.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names from [`TARGETS`].
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// The Liger recipe: r = 8, alpha = 8 on q, k and v.
    pub fn liger_default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: ["q_proj", "k_proj", "v_proj"].map(String::from).to_vec(),
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora.rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config("lora.alpha", "must be a positive number"));
        }
        if self.targets.is_empty() {
            return Err(Error::config(
                "lora.targets",
                "name at least one projection",
            ));
        }
        for t in &self.targets {
            if block_of(t).is_none() {
                let known: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
                return Err(Error::config(
                    "lora.targets",
                    format!("unknown projection `{t}` (known: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// The block (`self_attn` or `mlp`) a projection lives in.
pub fn block_of(target: &str) -> Option<&'static str> {
    TARGETS.iter().find(|(n, _)| *n == target).map(|(_, b)| *b)
}

/// PEFT's tensor name for one half (`"A"` or `"B"`) of an adapter.
pub fn peft_name(layer: usize, target: &str, half: &str) -> String {
    let block = block_of(target).unwrap_or("self_attn");
    format!("base_model.model.model.layers.{layer}.{block}.{target}.lora_{half}.weight")
}

/// Fresh trainable adapter weights: `A` uniform in +-1/sqrt(in) (PEFT's Kaiming default),
/// `B` zero, so a fresh adapter leaves the model unchanged.
pub fn init_pair(
    rng: &mut crate::rng::SplitMix,
    rank: usize,
    in_dim: usize,
    out_dim: usize,
    device: &Device,
) -> Result<(Var, Var)> {
    let bound = 1.0 / (in_dim as f32).sqrt();
    let a: Vec<f32> = (0..rank * in_dim)
        .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
        .collect();
    let a = Var::from_tensor(&Tensor::from_vec(a, (rank, in_dim), device)?)?;
    let b = Var::zeros((out_dim, rank), DType::F32, device)?;
    Ok((a, b))
}

#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default = "none")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
}

fn none() -> String {
    "none".into()
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    tensors: &[(String, Tensor)],
    base_model: Option<&str>,
) -> Result<()> {
    let peft = PeftConfig {
        peft_type: "LORA".into(),
        r: cfg.rank,
        lora_alpha: cfg.alpha,
        target_modules: cfg.targets.clone(),
        lora_dropout: 0.0,
        bias: none(),
        fan_in_fan_out: false,
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: base_model.map(String::from),
        inference_mode: true,
    };
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&peft).expect("plain struct"),
    )
    .map_err(|e| Error::io(&path, e))?;
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join(ADAPTER_WEIGHTS))?;
    Ok(())
}

/// Reads an adapter folder written by us or by PEFT.
pub fn load_adapter(dir: &Path) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let peft: PeftConfig = serde_json::from_str(&text)
        .map_err(|e| Error::config("adapter_config.json", e.to_string()))?;
    if peft.peft_type != "LORA" {
        return Err(Error::config(
            "adapter_config.json: peft_type",
            format!("`{}` is not LORA", peft.peft_type),
        ));
    }
    if peft.bias != "none" || peft.fan_in_fan_out {
        return Err(Error::config(
            "adapter_config.json",
            "only bias \"none\" and fan_in_fan_out false are supported",
        ));
    }
    let cfg = LoraConfig {
        rank: peft.r,
        alpha: peft.lora_alpha,
        targets: peft.target_modules,
    };
    cfg.validate()?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    crate::files::check_safetensors(&weights)?;
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    Ok((cfg, tensors))
}
