//! Tiny random checkpoints for tests (this crate's, the converter's and the server's).
//!
//! Each family gets the features that make it differ: Llama with GQA and tied embeddings,
//! Mistral with a sliding window and an untied head, Qwen2 with q/k/v biases. Weights are
//! seeded, so every test sees the same model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

pub mod fixture;

use crate::config::{LigerConfig, ModelConfig};
use crate::model::{Logits, Model};
use crate::state::SeqStep;
use crate::state::SequenceState;
use crate::weights::{is_quantizable, QuantizedEntry, QUANTIZED_KEY};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// GQA (4 query heads over 2 KV heads), tied embeddings.
    Llama,
    /// Sliding window of 6 (Hugging Face counting), untied LM head.
    Mistral,
    /// q/k/v biases, untied LM head.
    Qwen2,
}

pub const ALL_FAMILIES: [Family; 3] = [Family::Llama, Family::Mistral, Family::Qwen2];

/// The largest absolute elementwise difference of two tensors of one shape (panics on a
/// shape or dtype mismatch: tests want the failure loud).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>())
        .expect("tensors of the same shape and dtype")
}

/// The largest absolute element of a tensor: the scale relative tolerances are taken of.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>())
        .expect("a non-empty tensor")
}

/// Decode steps this process has run through the fused CPU path so far (monotonic; tests
/// compare it before and after a step to know which path ran).
pub fn fused_decode_steps() -> u64 {
    crate::decode::steps_taken()
}

/// Logits rows this process has settled through the LM head's screen so far (monotonic;
/// `RuntimeOptions::head_screen`).
pub fn screened_rows() -> u64 {
    crate::decode::screened_rows()
}

/// A fresh state of `m` that has read `history` (nothing, when empty).
pub fn state_after(m: &Model, history: &[u32]) -> Result<SequenceState> {
    let mut s = m.new_state()?;
    if !history.is_empty() {
        m.forward(history, &mut s, Logits::Last)?;
    }
    Ok(s)
}

/// One batched step of `m`: `steps[i]` read by `states[i]`; all-position logits per
/// sequence, as [`Model::forward_batch`] returns them.
pub fn step_batch(
    m: &Model,
    states: &mut [SequenceState],
    steps: &[Vec<u32>],
) -> Result<Vec<Tensor>> {
    step_batch_as(m, states, steps, false)
}

/// [`step_batch`] with every sequence marked [`SeqStep::argmax_only`] as asked.
pub fn step_batch_as(
    m: &Model,
    states: &mut [SequenceState],
    steps: &[Vec<u32>],
    argmax_only: bool,
) -> Result<Vec<Tensor>> {
    let mut batch: Vec<SeqStep> = states
        .iter_mut()
        .zip(steps)
        .map(|(state, tokens)| SeqStep {
            tokens,
            state,
            argmax_only,
        })
        .collect();
    m.forward_batch(&mut batch, Logits::All)
}

/// How many files in `dir` end in `.ext` (snapshot folders, checkpoint folders).
pub fn count_files(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == ext))
                .count()
        })
        .unwrap_or(0)
}

/// A tiny checkpoint: its `config.json` and its weights under Hugging Face names.
pub struct TinyCheckpoint {
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
}

/// `config.json` of a tiny model of `family`.
pub fn tiny_config(family: Family) -> Value {
    let mut c = json!({
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    });
    let extra = match family {
        Family::Llama => json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "tie_word_embeddings": true}),
        Family::Mistral => json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "tie_word_embeddings": false, "sliding_window": 6}),
        Family::Qwen2 => json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "tie_word_embeddings": false, "num_key_value_heads": 1, "use_sliding_window": false}),
    };
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

/// Seeded random weights matching `config` (any valid config, tiny or not).
pub fn random_weights(config: &Value, seed: u64) -> Result<HashMap<String, Tensor>> {
    let cfg = ModelConfig::from_json(config.clone())?;
    let mut rng = SplitMix(seed);
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
        t.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let (hd, h, hkv, d) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let w = 1.0 / (hd as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, hd],
        1.0,
        0.0,
    )?;
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[cfg.vocab_size, hd], w, 0.0)?;
    }
    put("model.norm.weight".into(), &[hd], 0.1, 1.0)?;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        // Keys larger than the other projections so the gates span weak to strong decay.
        for (name, rows, std) in [
            ("q_proj", h * d, 2.0 * w),
            ("k_proj", hkv * d, 3.0 * w),
            ("v_proj", hkv * d, w),
        ] {
            put(
                format!("{p}.self_attn.{name}.weight"),
                &[rows, hd],
                std,
                0.0,
            )?;
            if cfg.qkv_bias {
                put(format!("{p}.self_attn.{name}.bias"), &[rows], 0.5, 0.0)?;
            }
        }
        put(format!("{p}.self_attn.o_proj.weight"), &[hd, h * d], w, 0.0)?;
        if cfg.o_bias {
            put(format!("{p}.self_attn.o_proj.bias"), &[hd], 0.1, 0.0)?;
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[cfg.intermediate_size, hd],
            w,
            0.0,
        )?;
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[cfg.intermediate_size, hd],
            w,
            0.0,
        )?;
        let wi = 1.0 / (cfg.intermediate_size as f32).sqrt();
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[hd, cfg.intermediate_size],
            wi,
            0.0,
        )?;
        put(format!("{p}.input_layernorm.weight"), &[hd], 0.1, 1.0)?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[hd],
            0.1,
            1.0,
        )?;
    }
    Ok(t)
}

impl TinyCheckpoint {
    pub fn new(family: Family, seed: u64) -> Result<Self> {
        let config = tiny_config(family);
        let tensors = random_weights(&config, seed)?;
        Ok(Self { config, tensors })
    }

    /// The same weights, converted the Liger way with `liger` settings.
    pub fn with_liger(mut self, liger: &LigerConfig) -> Self {
        self.config["liger"] = serde_json::to_value(liger).expect("plain struct");
        self
    }

    pub fn model_config(&self) -> Result<ModelConfig> {
        ModelConfig::from_json(self.config.clone())
    }

    /// Builds the model on the CPU in `dtype`.
    pub fn model(&self, dtype: DType) -> Result<Model> {
        model_from_tensors(self.model_config()?, &self.tensors, dtype, &Device::Cpu)
    }

    /// Writes a Hugging Face folder (`config.json`, `model.safetensors`).
    pub fn write_folder(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config).expect("json");
        std::fs::write(&cfg, text).map_err(|e| Error::io(&cfg, e))?;
        candle_core::safetensors::save(&self.tensors, dir.join("model.safetensors"))?;
        Ok(())
    }

    /// [`Self::write_folder`] with the projections stored as GGML blocks of `format`, as
    /// a quantized checkpoint holds them ([`crate::weights`]).
    pub fn write_quantized_folder(&self, dir: &Path, format: GgmlDType) -> Result<()> {
        use safetensors::tensor::TensorView;
        self.write_folder(dir)?;
        let mut dense: Vec<(String, Tensor)> = Vec::new();
        let mut blocks: Vec<(String, Vec<u8>)> = Vec::new();
        let mut entries = serde_json::Map::new();
        for (name, t) in &self.tensors {
            // Rows that do not fill whole blocks stay dense, as `Model::quantize` leaves them.
            let whole_blocks = t
                .dims()
                .last()
                .is_some_and(|n| n % format.block_size() == 0);
            if !is_quantizable(name) || !whole_blocks {
                dense.push((name.clone(), t.clone()));
                continue;
            }
            let q = QTensor::quantize(t, format)?;
            let entry = QuantizedEntry::new(format, t.dims())?;
            entries.insert(
                name.clone(),
                serde_json::to_value(entry).expect("plain struct"),
            );
            blocks.push((name.clone(), q.data()?.into_owned()));
        }
        let dense_bytes: Vec<(String, Vec<u8>)> = dense
            .iter()
            .map(|(n, t)| {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            })
            .collect::<Result<_>>()?;
        let mut views = Vec::new();
        for ((n, t), (_, bytes)) in dense.iter().zip(&dense_bytes) {
            let view = TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), bytes)
                .map_err(|e| Error::tensor(n, e.to_string()))?;
            views.push((n.clone(), view));
        }
        for (n, bytes) in &blocks {
            let view = TensorView::new(safetensors::Dtype::U8, vec![bytes.len()], bytes)
                .map_err(|e| Error::tensor(n, e.to_string()))?;
            views.push((n.clone(), view));
        }
        let meta = HashMap::from([(QUANTIZED_KEY.to_owned(), Value::Object(entries).to_string())]);
        let file = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| Error::tensor("model.safetensors", e.to_string()))?;
        let path = dir.join("model.safetensors");
        std::fs::write(&path, file).map_err(|e| Error::io(&path, e))
    }
}

/// Builds a model from in-memory weights (converted to `dtype` on `device`).
pub fn model_from_tensors(
    cfg: ModelConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let converted = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Model::new(cfg, VarBuilder::from_tensors(converted, dtype, device))
}

pub use crate::rng::SplitMix;
