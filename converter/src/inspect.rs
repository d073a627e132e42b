//! `inspect`: what a model folder holds and what serving it costs per sequence.
//!
//! The point of a Liger conversion is memory: its per-sequence state is fixed, while the
//! original's KV cache grows with the context. The report puts both side by side at 4K and
//! 32K tokens, computed with the runtime's own [`StateSpec::bytes_at`] so the numbers are
//! the ones the server will actually allocate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use candle_core::{DType, Device};
use liger_model::weights::{CONFIG_FILE, INDEX_FILE};
use liger_model::{LayerKind, LigerConfig, ModelConfig, StateSpec};
use serde::Serialize;

use crate::progress::Progress;
use crate::settings::variant_label;
use crate::tensors::{file_name, TensorSet};
use crate::{Error, Result};
use liger_model::checkpoint::{torch_dtype_name, Checkpoint};

/// Context lengths the state comparison is given at.
pub const STATE_CONTEXTS: [usize; 2] = [4096, 32768];

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub index: usize,
    /// `liger` or `attention`.
    pub kind: &'static str,
    /// For attention layers with a sliding window (Mistral), the keys seen besides the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateAt {
    pub context: usize,
    /// Per-sequence state of this (converted) model; `None` when it is not converted.
    pub liger_bytes: Option<u64>,
    /// KV cache of the same model with every layer back to softmax attention.
    pub transformer_kv_bytes: u64,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub path: String,
    pub architecture: &'static str,
    pub architectures: Vec<String>,
    pub parameters: u64,
    /// The dtype most weights are stored in (`float32`, `float16`, `bfloat16`).
    pub dtype: &'static str,
    /// Parameters per stored dtype (safetensors names; `q8_0`, `q4k` for GGML blocks).
    pub parameters_by_dtype: BTreeMap<String, u64>,
    /// The GGML block formats of a quantized checkpoint, with how many tensors use each.
    pub quantized: BTreeMap<String, usize>,
    pub weight_files: Vec<String>,
    pub weight_bytes: u64,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub converted: bool,
    pub liger: Option<LigerConfig>,
    pub layers: Vec<LayerInfo>,
    pub state: Vec<StateAt>,
}

/// Reads `dir` (config and safetensors headers only; no weight data is loaded).
pub fn inspect(dir: &Path) -> Result<Report> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::missing(&config_path, "not a model folder"));
    }
    let ckpt = Checkpoint::open(dir)?;
    let (cfg, files, blocks) = (ckpt.config(), ckpt.files(), ckpt.quantized());
    let index = dir.join(INDEX_FILE);
    let set = TensorSet::open_files(
        files,
        index.is_file().then_some(index.as_path()),
        &Progress::hidden(),
    )?;

    let mut by_dtype = BTreeMap::new();
    let mut quantized = BTreeMap::new();
    let mut parameters = 0;
    for i in set.infos() {
        // A quantized tensor is stored as bytes; count its logical elements.
        let (kind, numel) = match blocks.get(&i.name) {
            Some(e) => {
                *quantized.entry(e.format.clone()).or_insert(0) += 1;
                (e.format.clone(), e.shape.iter().product::<usize>() as u64)
            }
            None => (format!("{:?}", i.dtype), i.numel()),
        };
        *by_dtype.entry(kind).or_insert(0u64) += numel;
        // A tied model's quantized head repeats the embeddings: not a parameter of its own.
        if !(i.name == "lm_head.weight" && cfg.tie_word_embeddings) {
            parameters += numel;
        }
    }
    let dtype = set.dominant_float_dtype();
    let weight_bytes = set.infos().iter().map(|i| i.stored_bytes()).sum();

    let layers = (0..cfg.num_layers)
        .map(|i| match cfg.layer_kind(i) {
            LayerKind::Liger => LayerInfo {
                index: i,
                kind: "liger",
                window: None,
            },
            LayerKind::Softmax { window } => LayerInfo {
                index: i,
                kind: "attention",
                window,
            },
        })
        .collect();

    let (liger_spec, original_spec) = state_specs(cfg, dtype)?;
    let state = STATE_CONTEXTS
        .iter()
        .map(|&c| StateAt {
            context: c,
            liger_bytes: liger_spec.as_ref().map(|s| s.bytes_at(c) as u64),
            transformer_kv_bytes: original_spec.bytes_at(c) as u64,
        })
        .collect();

    let architectures = cfg
        .raw
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Report {
        path: dir.display().to_string(),
        architecture: cfg.architecture.name(),
        architectures,
        parameters,
        dtype: torch_dtype_name(dtype),
        parameters_by_dtype: by_dtype,
        quantized,
        weight_files: files.iter().map(|f| file_name(f)).collect(),
        weight_bytes,
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_layers: cfg.num_layers,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        converted: cfg.liger.is_some(),
        liger: cfg.liger.clone(),
        layers,
        state,
    })
}

/// State specs of the model as configured (when converted) and of the same model with the
/// `liger` section removed (the original Transformer's KV cache), with `cache_dtype` caches.
pub fn state_specs(
    cfg: &ModelConfig,
    cache_dtype: DType,
) -> Result<(Option<StateSpec>, StateSpec)> {
    let converted = cfg
        .liger
        .as_ref()
        .map(|_| StateSpec::new(cfg, cache_dtype, &Device::Cpu));
    let original = ModelConfig::from_json(cfg.to_json_with_liger(None))?;
    Ok((
        converted,
        StateSpec::new(&original, cache_dtype, &Device::Cpu),
    ))
}

/// `1234567` -> `1.18 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn human_params(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn context_label(c: usize) -> String {
    // (`is_multiple_of` would need Rust 1.87; the workspace supports 1.85.)
    match c % 1024 {
        0 => format!("{}K tokens", c / 1024),
        _ => format!("{c} tokens"),
    }
}

/// Runs of equal layer kinds: `0-6 liger`, `7 attention`, ...
fn layer_runs(layers: &[LayerInfo]) -> Vec<String> {
    let label = |l: &LayerInfo| match (l.kind, l.window) {
        ("liger", _) => "liger".to_owned(),
        (_, Some(w)) => format!("full attention (window {w})"),
        _ => "full attention".to_owned(),
    };
    let mut runs: Vec<(usize, usize, String)> = Vec::new();
    for l in layers {
        let lab = label(l);
        match runs.last_mut() {
            Some((_, end, k)) if *k == lab => *end = l.index,
            _ => runs.push((l.index, l.index, lab)),
        }
    }
    runs.into_iter()
        .map(|(a, b, k)| {
            if a == b {
                format!("{a}: {k}")
            } else {
                format!("{a}-{b}: {k}")
            }
        })
        .collect()
}

/// The human-readable report.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "{k:<22}{v}");
    };
    row(&mut s, "path", r.path.clone());
    let archs = if r.architectures.is_empty() {
        String::new()
    } else {
        format!(" ({})", r.architectures.join(", "))
    };
    row(&mut s, "architecture", format!("{}{archs}", r.architecture));
    row(
        &mut s,
        "parameters",
        format!("{} ({})", human_params(r.parameters), r.parameters),
    );
    let quantized = r
        .quantized
        .iter()
        .map(|(f, n)| format!("{n} tensors {f}"))
        .collect::<Vec<_>>();
    if quantized.is_empty() {
        row(&mut s, "dtype", r.dtype.to_owned());
    } else {
        row(
            &mut s,
            "dtype",
            format!("{}, quantized: {}", r.dtype, quantized.join(", ")),
        );
    }
    row(
        &mut s,
        "weights",
        format!(
            "{} in {}",
            human_bytes(r.weight_bytes),
            r.weight_files.join(", ")
        ),
    );
    row(
        &mut s,
        "shape",
        format!(
            "hidden {}, intermediate {}, vocab {}, {} heads / {} KV heads x {}",
            r.hidden_size,
            r.intermediate_size,
            r.vocab_size,
            r.num_heads,
            r.num_kv_heads,
            r.head_dim
        ),
    );
    let n_liger = r.layers.iter().filter(|l| l.kind == "liger").count();
    row(
        &mut s,
        "layers",
        format!(
            "{} ({} Liger, {} full attention)",
            r.num_layers,
            n_liger,
            r.num_layers - n_liger
        ),
    );
    for run in layer_runs(&r.layers) {
        row(&mut s, "", run);
    }
    match &r.liger {
        Some(l) => {
            row(
                &mut s,
                "liger",
                format!(
                    "variant {}, window {} ({} keys), mix {} window + {} recurrent, gate normalizer {}",
                    variant_label(l),
                    l.window,
                    l.window + 1,
                    l.window_weight,
                    l.recurrent_weight,
                    l.gate_normalizer
                ),
            );
            if l.global_cache > 0 {
                row(
                    &mut s,
                    "global cache",
                    format!(
                        "{} older tokens per KV head and layer: {} sinks, {} by the attention they got in the window, {} by the recurrent memory's recall{}",
                        l.global_cache,
                        l.sinks,
                        l.attention_places,
                        l.recall_places(),
                        if l.recurrent_weight == 0.0 && l.keeps_memory() {
                            " (the memory only chooses them: no read-out)"
                        } else {
                            ""
                        }
                    ),
                );
                if let Some(m) = l.max_distance {
                    row(
                        &mut s,
                        "distance cap",
                        format!("kept tokens more than {m} back are scored as if {m} back"),
                    );
                }
            }
            if let Some(d) = l.kv_dtype {
                row(
                    &mut s,
                    "state rows",
                    format!("window and kept keys and values stored in {}", d.name()),
                );
            }
            if let Some(src) = &l.source {
                row(&mut s, "converted from", src.clone());
            }
        }
        None => row(
            &mut s,
            "liger",
            "not converted (plain Transformer)".to_owned(),
        ),
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "{:<22}{:>26}{:>26}",
        "state per sequence", "this model", "original (KV cache)"
    );
    for st in &r.state {
        let this = st.liger_bytes.unwrap_or(st.transformer_kv_bytes);
        let _ = writeln!(
            s,
            "{:<22}{:>26}{:>26}",
            context_label(st.context),
            format!("{} ({this} B)", human_bytes(this)),
            format!(
                "{} ({} B)",
                human_bytes(st.transformer_kv_bytes),
                st.transformer_kv_bytes
            ),
        );
    }
    s
}
