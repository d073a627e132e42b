//! The `README.md` model card written into every output folder.
//!
//! A converted folder is a derived artifact: whoever finds it later should be able to tell
//! where the weights came from, which settings made it, and (for Liger conversions) that it
//! is not usable for quality-sensitive work until it has been through recovery.

use std::fmt::Write;

use liger_model::{LayerKind, LigerConfig, ModelConfig};

use crate::settings::variant_label;
use crate::source::Source;

/// The facts a card states.
pub struct CardInfo<'a> {
    /// SRC as the user gave it.
    pub source: &'a str,
    pub source_kind: &'a Source,
    /// A human name from the source (GGUF `general.name`).
    pub source_name: Option<&'a str>,
    /// The written config (with its `liger` section for conversions).
    pub config: &'a ModelConfig,
    pub parameters: u64,
    /// `float32`, `float16` or `bfloat16`.
    pub dtype: &'a str,
    pub weight_files: &'a [String],
    pub command_line: Option<&'a str>,
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Markdown for `README.md`, front matter included.
pub fn model_card(info: &CardInfo) -> String {
    let cfg = info.config;
    let liger = cfg.liger.as_ref();
    let mut s = String::new();
    s.push_str("---\n");
    if let Source::Hub(id) = info.source_kind {
        let _ = writeln!(s, "base_model: {id}");
    }
    s.push_str("library_name: liger\ntags:\n");
    if liger.is_some() {
        s.push_str("- liger\n- linear-attention\n- gated-linear-attention\n");
    } else {
        s.push_str("- gguf-import\n");
    }
    let _ = writeln!(s, "- {}", cfg.architecture.name());
    s.push_str("---\n\n");

    let what = match info.source_name {
        Some(n) => format!("{n} (`{}`)", info.source),
        None => format!("`{}`", info.source),
    };
    let kind = match info.source_kind {
        Source::Folder(_) => "a Hugging Face model folder",
        Source::Gguf(_) => "a GGUF file (dequantized to float32)",
        Source::Hub(_) => "the Hugging Face hub",
    };
    match liger {
        Some(l) => {
            let _ = writeln!(s, "# Liger conversion of {what}\n");
            let _ = writeln!(
                s,
                "This model was made from {kind} by `liger-convert` {}. Every weight of the \
                 original is kept unchanged (stored as {}); each attention layer listed below \
                 as Liger now mixes a gated recurrent branch, whose gate is computed from the \
                 key projection, with sliding-window softmax attention (Liger, arXiv:2503.01496). \
                 Its per-sequence state no longer grows with the context.\n",
                env!("CARGO_PKG_VERSION"),
                info.dtype
            );
            s.push_str(
                "**This is a zero-shot conversion: it needs recovery training before it is useful.** \
                 Without it the model's outputs are much worse than the original's. \
                 Run `liger-convert recover` (coming) on this folder.\n\n",
            );
            settings_table(&mut s, cfg, l);
        }
        None => {
            let _ = writeln!(s, "# {what} as a Hugging Face Transformer\n");
            let _ = writeln!(
                s,
                "This folder was imported from {kind} by `liger-convert import` {}: the same \
                 model, with its tensors renamed and laid out as Hugging Face `transformers` \
                 expects ({} weights). It is the teacher for recovering a Liger conversion and \
                 the baseline to compare one with.\n",
                env!("CARGO_PKG_VERSION"),
                info.dtype
            );
        }
    }

    s.push_str("## Model\n\n| | |\n|---|---|\n");
    let _ = writeln!(s, "| architecture | {} |", cfg.architecture.name());
    let _ = writeln!(
        s,
        "| parameters | {} ({}) |",
        human_count(info.parameters),
        info.parameters
    );
    let _ = writeln!(s, "| dtype | {} |", info.dtype);
    let _ = writeln!(
        s,
        "| layers | {} (hidden {}, {} heads, {} KV heads, head dim {}) |",
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    );
    let _ = writeln!(s, "| weights | {} |", info.weight_files.join(", "));
    let _ = writeln!(s, "| source | `{}` |", info.source);
    s.push('\n');

    if let Some(cmd) = info.command_line {
        let _ = writeln!(s, "## How it was made\n\n```sh\n{cmd}\n```\n");
    }
    s.push_str("Inspect it with `liger-convert inspect <folder>`.\n");
    s
}

fn settings_table(s: &mut String, cfg: &ModelConfig, l: &LigerConfig) {
    s.push_str("## Liger settings\n\n| setting | value |\n|---|---|\n");
    let _ = writeln!(s, "| variant | {} |", variant_label(l));
    let _ = writeln!(
        s,
        "| window | {} (each query sees itself and {} earlier keys) |",
        l.window, l.window
    );
    let _ = writeln!(
        s,
        "| mix | {} window + {} recurrent |",
        l.window_weight, l.recurrent_weight
    );
    let _ = writeln!(s, "| gate normalizer | {} |", l.gate_normalizer);
    let full: Vec<String> = (0..cfg.num_layers)
        .filter(|&i| matches!(cfg.layer_kind(i), LayerKind::Softmax { .. }))
        .map(|i| i.to_string())
        .collect();
    let _ = writeln!(
        s,
        "| full attention layers | {} |",
        if full.is_empty() {
            "none".to_owned()
        } else {
            full.join(", ")
        }
    );
    s.push('\n');
}
