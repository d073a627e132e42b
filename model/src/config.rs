//! Model configuration: a Hugging Face `config.json` (Llama, Mistral and Qwen2 families)
//! read into a validated [`ModelConfig`], plus the optional `liger` section that converted
//! checkpoints carry.
//!
//! Parse, don't validate: everything downstream takes a [`ModelConfig`], which can only be
//! built through [`ModelConfig::from_json`], so the layers never re-check sizes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use crate::{Error, Result};

/// Model families we can run. They share one implementation; they differ only in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static str =
        "llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)";

    fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "llama" | "LlamaForCausalLM" => Some(Self::Llama),
            "mistral" | "MistralForCausalLM" => Some(Self::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling, as in Hugging Face's `rope_scaling`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The gated recurrent branch of a Liger layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Gated linear attention: gate from the key, softmax feature maps (LIGER.md §1).
    Gla,
    /// HGRN2: the key is replaced by 1 - gate.
    Hgrn2,
    /// Gated slot attention: two gated memories over `slots` slots, read through a softmax
    /// over the slots (LIGER.md §1).
    Gsa,
}

impl Variant {
    /// The log-gate normalizer the reference code uses for this variant.
    pub fn default_gate_normalizer(self) -> f64 {
        match self {
            Variant::Gla | Variant::Gsa => 16.0,
            Variant::Hgrn2 => 1.0,
        }
    }
}

/// How a state stores cached keys and values ([`LigerConfig::kv_dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            KvDtype::F32 => candle_core::DType::F32,
            KvDtype::F16 => candle_core::DType::F16,
            KvDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }
}

/// The `liger` section of a converted checkpoint's `config.json`. Every conversion
/// setting lives here so other settings than the reference ones can be served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LigerConfig {
    pub variant: Variant,
    /// Keys a query sees besides itself in the sliding-window branch: the reference code's
    /// 64 means query t attends to t-64..=t (65 keys).
    pub window: usize,
    /// Weight of the sliding-window branch in the mix.
    pub window_weight: f64,
    /// Weight of the gated recurrent branch in the mix.
    pub recurrent_weight: f64,
    /// The log-gate is `logsigmoid(k) / gate_normalizer`.
    pub gate_normalizer: f64,
    /// Layers that keep full softmax attention (inter-layer hybrid).
    #[serde(default)]
    pub full_attention_layers: Vec<usize>,
    /// GSA's slot count M (the gate is the key average-pooled from the head dim to M);
    /// [`DEFAULT_SLOTS`] when absent. Only GSA has slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<usize>,
    /// Global cache: besides the window, each layer keeps at most this many older tokens'
    /// keys and values per KV head for the window branch to attend to: the `sinks`, then
    /// the tokens the recurrent memory recalls worst (LoLA, arXiv 2505.23666), then
    /// `attention_places` by attention; 0 keeps none. Constant memory, like the window. See
    /// [`crate::global`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub global_cache: usize,
    /// Attention sinks: the first this many tokens of a sequence always hold places in the
    /// global cache (StreamingLLM, arXiv 2309.17453); at most `global_cache`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sinks: usize,
    /// Of the global cache's places beyond the sinks, how many go to the tokens that got
    /// the most attention while in the window (H2O), among those the recall places turn
    /// away; the rest go to the tokens the recurrent memory recalls worst (LoLA). See
    /// [`crate::global`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attention_places: usize,
    /// The longest query-key distance the global cache's tokens are scored at: a kept token
    /// more than this many positions back is scored as if it were exactly this far (its
    /// rotary angle relative to the query is capped). RoPE models break on distances past
    /// those they were trained on, which only kept tokens reach; the window's are always
    /// shorter (this must exceed `window`). `None`: no cap. See [`crate::global`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_distance: Option<usize>,
    /// How the state stores the keys and values it keeps (window, global cache and
    /// full-attention layers' rows):
    /// `f16` halves their bytes, so twice the rows fit the same state (llama.cpp's default
    /// cache type). Attention still computes in the model's dtype; rows are rounded once,
    /// when stored. `None`: the model's dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_dtype: Option<KvDtype>,
    /// Where the weights came from (a path, hub id or GGUF file); informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl Default for LigerConfig {
    /// The reference Liger-GLA settings (LIGER.md §1).
    fn default() -> Self {
        Self {
            variant: Variant::Gla,
            window: 64,
            window_weight: 0.5,
            recurrent_weight: 0.5,
            gate_normalizer: 16.0,
            full_attention_layers: Vec::new(),
            slots: None,
            global_cache: 0,
            sinks: 0,
            attention_places: 0,
            max_distance: None,
            kv_dtype: None,
            source: None,
        }
    }
}

/// GSA's slot count when the config names none (the Liger reference's 64).
pub const DEFAULT_SLOTS: usize = 64;

/// Whether `slots` can pool a head dim of `head_dim`: GSA's gate averages the head dim in
/// equal groups, one per slot.
pub fn slots_fit(slots: usize, head_dim: usize) -> bool {
    slots > 0 && slots <= head_dim && head_dim.is_multiple_of(slots)
}

impl LigerConfig {
    /// GSA's slot count; `None` for the other variants.
    pub fn gsa_slots(&self) -> Option<usize> {
        (self.variant == Variant::Gsa).then(|| self.slots.unwrap_or(DEFAULT_SLOTS))
    }

    /// Whether layers keep a recurrent memory: to read it into the output (a recurrent
    /// weight above 0), or only to choose what the global cache keeps (window-only
    /// attention with places beyond the sinks given by recall, LoLA's rule without its
    /// read-out).
    pub fn keeps_memory(&self) -> bool {
        self.recurrent_weight != 0.0 || self.recall_chooses()
    }

    /// Global cache places given by the memory's recall (beyond the sinks and the
    /// attention places).
    pub fn recall_places(&self) -> usize {
        self.global_cache
            .saturating_sub(self.sinks + self.attention_places)
    }

    /// Whether the memory's recall gives out global cache places.
    pub fn recall_chooses(&self) -> bool {
        self.recall_places() > 0
    }
}

/// What a layer's token mixer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerKind {
    /// Causal softmax attention, optionally limited to a window (Mistral's `sliding_window`).
    Softmax { window: Option<usize> },
    /// Liger hybrid: gated recurrent branch + sliding-window attention.
    Liger,
}

/// A validated model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// The original model's sliding window per layer (Mistral, Qwen2 with `use_sliding_window`),
    /// as the number of keys a query sees besides itself.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub liger: Option<LigerConfig>,
    /// The file as read, so a converter can write it back with only `liger` changed.
    pub raw: Value,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config("config.json", format!("{}: {e}", path.display())))?;
        Self::from_json(value)
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::config("config.json", "expected a JSON object"))?;
        let f = Fields(obj);

        let architecture = parse_architecture(&f)?;
        let hidden_size = f.usize_req("hidden_size")?;
        let num_heads = f.usize_req("num_attention_heads")?;
        let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        let num_layers = f.usize_req("num_hidden_layers")?;
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::config(
                        "head_dim",
                        format!("missing, and hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(Error::config(
                "head_dim",
                format!("{head_dim} must be even for RoPE"),
            ));
        }
        if let Some(act) = f.str_opt("hidden_act")?.or(f.str_opt("hidden_activation")?) {
            if act != "silu" && act != "swish" {
                return Err(Error::config(
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            Architecture::Llama => {
                let b = f.bool_opt("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };

        let sliding_window = parse_sliding_window(&f, architecture, num_layers)?;
        let rope_scaling = parse_rope_scaling(obj.get("rope_scaling"))?;
        let liger = match obj.get("liger") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_liger(v, num_layers, head_dim)?),
        };

        let cfg = Self {
            architecture,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            sliding_window,
            bos_token_id: f.u32_opt("bos_token_id")?,
            eos_token_ids: f.u32_list("eos_token_id")?,
            liger,
            raw,
        };
        for (name, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_layers),
            ("num_attention_heads", cfg.num_heads),
            ("num_key_value_heads", cfg.num_kv_heads),
            ("head_dim", cfg.head_dim),
        ] {
            if v == 0 {
                return Err(Error::config(name, "must be positive"));
            }
        }
        if !(cfg.rms_norm_eps > 0.0 && cfg.rms_norm_eps.is_finite()) {
            return Err(Error::config("rms_norm_eps", "must be a positive number"));
        }
        if !(cfg.rope_theta > 0.0 && cfg.rope_theta.is_finite()) {
            return Err(Error::config("rope_theta", "must be a positive number"));
        }
        Ok(cfg)
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// The token mixer of layer `i`.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        match &self.liger {
            Some(l) if !l.full_attention_layers.contains(&i) => LayerKind::Liger,
            _ => LayerKind::Softmax {
                window: self.sliding_window[i],
            },
        }
    }

    /// The JSON to write for this config with `liger` replaced (or removed with `None`).
    pub fn to_json_with_liger(&self, liger: Option<&LigerConfig>) -> Value {
        let mut raw = self.raw.clone();
        if let Value::Object(m) = &mut raw {
            match liger {
                Some(l) => {
                    m.insert(
                        "liger".into(),
                        serde_json::to_value(l).expect("plain struct"),
                    );
                }
                None => {
                    m.remove("liger");
                }
            }
        }
        raw
    }

    /// Returns a copy converted the Liger way with the given settings (validated).
    pub fn with_liger(&self, liger: LigerConfig) -> Result<Self> {
        Self::from_json(self.to_json_with_liger(Some(&liger)))
    }
}

fn parse_architecture(f: &Fields) -> Result<Architecture> {
    if let Some(mt) = f.str_opt("model_type")? {
        return Architecture::from_model_type(mt).ok_or_else(|| Error::UnsupportedArchitecture {
            found: mt.to_string(),
            supported: Architecture::SUPPORTED.into(),
        });
    }
    let archs = f.0.get("architectures").and_then(|v| v.as_array());
    match archs.and_then(|a| a.first()).and_then(|v| v.as_str()) {
        Some(a) => Architecture::from_model_type(a).ok_or_else(|| Error::UnsupportedArchitecture {
            found: a.to_string(),
            supported: Architecture::SUPPORTED.into(),
        }),
        None => Err(Error::config(
            "model_type",
            "missing (and no `architectures` entry to infer it from)",
        )),
    }
}

fn parse_sliding_window(
    f: &Fields,
    arch: Architecture,
    num_layers: usize,
) -> Result<Vec<Option<usize>>> {
    // Hugging Face's `sliding_window` counts the query itself (query t sees t-W+1..=t);
    // our windows count the keys before it, as Liger's reference code does.
    let window = match f.usize_opt("sliding_window")? {
        Some(0) => return Err(Error::config("sliding_window", "must be at least 1")),
        w => w.map(|w| w - 1),
    };
    Ok(match arch {
        Architecture::Llama => vec![None; num_layers],
        Architecture::Mistral => vec![window; num_layers],
        Architecture::Qwen2 => {
            // Qwen2 applies its window only when asked to, and then only from
            // `max_window_layers` on (matching transformers' Qwen2 implementation).
            if f.bool_opt("use_sliding_window")?.unwrap_or(false) {
                let w = window.ok_or_else(|| {
                    Error::config(
                        "sliding_window",
                        "use_sliding_window is true but no window is set",
                    )
                })?;
                let from = f.usize_opt("max_window_layers")?.unwrap_or(0);
                (0..num_layers).map(|i| (i >= from).then_some(w)).collect()
            } else {
                vec![None; num_layers]
            }
        }
    })
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<RopeScaling>> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(Error::config("rope_scaling", "expected an object")),
    };
    let f = Fields(obj);
    let kind = f
        .str_opt("rope_type")?
        .or(f.str_opt("type")?)
        .ok_or_else(|| Error::config("rope_scaling.rope_type", "missing"))?;
    let factor = |f: &Fields| -> Result<f64> {
        let x = f
            .f64_opt("factor")?
            .ok_or_else(|| Error::config("rope_scaling.factor", "missing"))?;
        if !(x > 0.0 && x.is_finite()) {
            return Err(Error::config("rope_scaling.factor", "must be positive"));
        }
        Ok(x)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: factor(&f)?,
        })),
        "llama3" => {
            let get = |k: &str| {
                f.f64_opt(k)?
                    .ok_or_else(|| Error::config(format!("rope_scaling.{k}"), "missing"))
            };
            let low = get("low_freq_factor")?;
            let high = get("high_freq_factor")?;
            if high <= low {
                return Err(Error::config(
                    "rope_scaling.high_freq_factor",
                    "must be larger than low_freq_factor",
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: factor(&f)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: f
                    .usize_opt("original_max_position_embeddings")?
                    .ok_or_else(|| {
                        Error::config("rope_scaling.original_max_position_embeddings", "missing")
                    })?,
            }))
        }
        other => Err(Error::config(
            "rope_scaling.rope_type",
            format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

fn parse_liger(v: &Value, num_layers: usize, head_dim: usize) -> Result<LigerConfig> {
    let l: LigerConfig = serde_json::from_value(v.clone()).map_err(|e| {
        // serde names the offending key in its message ("unknown field `x`", "missing field `y`").
        Error::config("liger", e.to_string())
    })?;
    if l.window == 0 {
        return Err(Error::config("liger.window", "must be at least 1"));
    }
    for (name, w) in [
        ("liger.window_weight", l.window_weight),
        ("liger.recurrent_weight", l.recurrent_weight),
    ] {
        if !(w.is_finite() && w >= 0.0) {
            return Err(Error::config(
                name,
                format!("{w} must be a finite number >= 0"),
            ));
        }
    }
    if !(l.gate_normalizer.is_finite() && l.gate_normalizer > 0.0) {
        return Err(Error::config(
            "liger.gate_normalizer",
            "must be a positive number",
        ));
    }
    if l.slots.is_some() && l.variant != Variant::Gsa {
        return Err(Error::config(
            "liger.slots",
            "only the gsa variant has slots",
        ));
    }
    if let Some(m) = l.gsa_slots() {
        if !slots_fit(m, head_dim) {
            return Err(Error::config(
                "liger.slots",
                format!(
                    "{m} slots: the gate pools the head dim ({head_dim}) into equal groups, \
                     so slots must divide it"
                ),
            ));
        }
    }
    if l.sinks > l.global_cache {
        return Err(Error::config(
            "liger.sinks",
            format!(
                "{} sinks do not fit a global cache of {} tokens (sinks take places in it)",
                l.sinks, l.global_cache
            ),
        ));
    }
    if l.sinks + l.attention_places > l.global_cache {
        return Err(Error::config(
            "liger.attention_places",
            format!(
                "{} attention places and {} sinks do not fit a global cache of {} tokens",
                l.attention_places, l.sinks, l.global_cache
            ),
        ));
    }
    if let Some(m) = l.max_distance {
        if m <= l.window {
            return Err(Error::config(
                "liger.max_distance",
                format!(
                    "{m} must exceed the window ({}): it caps the distance of tokens kept past it",
                    l.window
                ),
            ));
        }
    }
    // Places beyond the sinks go to the tokens a d x d memory recalls worst (kept for that
    // even when its read-out has weight 0); GSA's slot memories have no such recall.
    if l.recall_chooses() && l.variant == Variant::Gsa {
        return Err(Error::config(
            "liger.global_cache",
            "places beyond the sinks and attention places are chosen by the GLA/HGRN2 memory's \
             recall; gsa supports sinks and attention places only",
        ));
    }
    let mut seen = vec![false; num_layers];
    for &i in &l.full_attention_layers {
        if i >= num_layers {
            return Err(Error::config(
                "liger.full_attention_layers",
                format!("layer {i} does not exist (the model has {num_layers} layers)"),
            ));
        }
        if std::mem::replace(&mut seen[i], true) {
            return Err(Error::config(
                "liger.full_attention_layers",
                format!("layer {i} is listed twice"),
            ));
        }
    }
    Ok(l)
}

/// Typed access to a JSON object's fields with errors that name the field.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    Error::config(k, format!("expected a non-negative integer, got {v}"))
                })
            })
            .transpose()
    }

    fn usize_req(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?
            .ok_or_else(|| Error::config(k, "missing"))
    }

    fn u32_opt(&self, k: &str) -> Result<Option<u32>> {
        self.usize_opt(k)?
            .map(|x| u32::try_from(x).map_err(|_| Error::config(k, "out of range")))
            .transpose()
    }

    /// A token id or a list of them (`eos_token_id` is either).
    fn u32_list(&self, k: &str) -> Result<Vec<u32>> {
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| Error::config(k, format!("expected token ids, got {v}")))
                })
                .collect(),
            Some(_) => Ok(self.u32_opt(k)?.into_iter().collect()),
        }
    }

    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| Error::config(k, format!("expected a number, got {v}")))
            })
            .transpose()
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Error::config(k, format!("expected true or false, got {v}")))
            })
            .transpose()
    }

    fn str_opt(&self, k: &str) -> Result<Option<&str>> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::config(k, format!("expected a string, got {v}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "eos_token_id": [2, 3], "bos_token_id": 1
        })
    }

    fn err(v: Value) -> String {
        ModelConfig::from_json(v).unwrap_err().to_string()
    }

    #[test]
    fn parses_llama_defaults() {
        let c = ModelConfig::from_json(llama()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.group_size(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(c.liger.is_none());
        assert_eq!(c.layer_kind(0), LayerKind::Softmax { window: None });
    }

    #[test]
    fn liger_section_round_trips() {
        let c = ModelConfig::from_json(llama()).unwrap();
        let l = LigerConfig {
            full_attention_layers: vec![1],
            ..Default::default()
        };
        let c2 = c.with_liger(l.clone()).unwrap();
        assert_eq!(c2.liger.as_ref(), Some(&l));
        assert_eq!(c2.layer_kind(0), LayerKind::Liger);
        assert_eq!(c2.layer_kind(1), LayerKind::Softmax { window: None });
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = llama();
        v["num_key_value_heads"] = json!(3);
        assert!(err(v).contains("num_key_value_heads"));

        let mut v = llama();
        v["model_type"] = json!("gpt2");
        assert!(err(v).contains("unsupported architecture `gpt2`"));

        let mut v = llama();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(v).contains("hidden_size"));

        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 2.0});
        assert!(err(v).contains("rope_scaling.rope_type"));

        let mut v = llama();
        v["liger"] = json!({"variant": "gla", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "bogus": 1});
        assert!(err(v).contains("bogus"));

        let mut v = llama();
        v["liger"] = json!({"variant": "gla", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "full_attention_layers": [5]});
        assert!(err(v).contains("liger.full_attention_layers"));

        let mut v = llama();
        v["liger"] = json!({"variant": "mamba", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0});
        assert!(err(v).contains("mamba"));

        // GSA's slots must divide the head dim (16), and only GSA has slots.
        let mut v = llama();
        v["liger"] = json!({"variant": "gsa", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "slots": 6});
        assert!(err(v).contains("liger.slots"));
        let mut v = llama();
        v["liger"] = json!({"variant": "gsa", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0});
        assert!(
            err(v).contains("64 slots"),
            "the default of 64 exceeds head dim 16"
        );
        let mut v = llama();
        v["liger"] = json!({"variant": "gla", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "slots": 8});
        assert!(err(v).contains("only the gsa variant"));
        let mut v = llama();
        v["liger"] = json!({"variant": "gsa", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "slots": 8});
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(c.liger.unwrap().gsa_slots(), Some(8));

        // The distance cap must exceed the window (whose keys are never capped).
        let mut v = llama();
        v["liger"] = json!({"variant": "gla", "window": 64, "window_weight": 0.5,
            "recurrent_weight": 0.5, "gate_normalizer": 16.0, "global_cache": 8,
            "max_distance": 64});
        assert!(err(v.clone()).contains("liger.max_distance"));
        v["liger"]["max_distance"] = json!(65);
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(c.liger.unwrap().max_distance, Some(65));

        let mut v = llama();
        v["hidden_act"] = json!("gelu");
        assert!(err(v).contains("hidden_act"));
    }

    #[test]
    fn family_specifics() {
        let mut v = llama();
        v["model_type"] = json!("qwen2");
        v["sliding_window"] = json!(32);
        v["use_sliding_window"] = json!(false);
        let c = ModelConfig::from_json(v.clone()).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.sliding_window, vec![None, None]);
        v["use_sliding_window"] = json!(true);
        v["max_window_layers"] = json!(1);
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(c.sliding_window, vec![None, Some(31)]);

        let mut v = llama();
        v["model_type"] = json!("mistral");
        v["sliding_window"] = json!(4096);
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(c.layer_kind(1), LayerKind::Softmax { window: Some(4095) });

        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(v).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }
}
