//! Rebuilding a Hugging Face `config.json` (LlamaForCausalLM) from llama GGUF metadata.
//!
//! llama.cpp's converter flattens the Hugging Face config into `llama.*` keys; this module maps
//! them back. Llama 3.x rope scaling is the one thing not stored as metadata: the converter bakes
//! it into a `rope_freqs.weight` tensor of per-frequency divisors, so [`llama3_rope_scaling`]
//! recovers the original parameters from that tensor and checks that they reproduce it exactly.

use serde_json::{json, Map, Value};

use super::meta::Meta;
use crate::{Error, Result};

/// The model dimensions, read and checked once, used for the config and for tensor shapes.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Dims {
    pub fn read(meta: &Meta) -> Result<Self> {
        let n_layer = meta.usize_nonzero("llama.block_count")?;
        let hidden = meta.usize_nonzero("llama.embedding_length")?;
        let ffn = meta.usize_nonzero("llama.feed_forward_length")?;
        let n_head = meta.usize_nonzero("llama.attention.head_count")?;
        let n_kv_head = match meta.opt_u64("llama.attention.head_count_kv")? {
            Some(_) => meta.usize_nonzero("llama.attention.head_count_kv")?,
            None => n_head,
        };
        // llama.cpp's default head size is embedding_length / head_count unless key_length says
        // otherwise; Hugging Face's `head_dim` has the same default.
        let head_dim = match meta.opt_u64("llama.attention.key_length")? {
            Some(_) => meta.usize_nonzero("llama.attention.key_length")?,
            None => hidden / n_head,
        };
        let bad = |field: &str, reason: String| {
            Err(Error::weights(meta.path(), format!("`{field}`: {reason}")))
        };
        if n_head % n_kv_head != 0 {
            return bad(
                "llama.attention.head_count_kv",
                format!("{n_kv_head} does not divide head_count {n_head}"),
            );
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return bad(
                "llama.attention.key_length",
                format!("head size {head_dim} must be even and positive"),
            );
        }
        if let Some(v) = meta.opt_u64("llama.attention.value_length")? {
            if v as usize != head_dim {
                return bad(
                    "llama.attention.value_length",
                    format!("{v} differs from the key length {head_dim}; Llama needs them equal"),
                );
            }
        }
        if let Some(r) = meta.opt_u64("llama.rope.dimension_count")? {
            if r as usize != head_dim {
                return bad(
                    "llama.rope.dimension_count",
                    format!("{r} differs from the head size {head_dim}; partial rotary embeddings are not supported"),
                );
            }
        }
        if meta.opt_u64("llama.expert_count")?.unwrap_or(0) > 0 {
            return bad(
                "llama.expert_count",
                "mixture-of-experts llama models are not supported".into(),
            );
        }
        // Bound every size so that shape arithmetic cannot overflow on a corrupt file.
        for (field, v) in [
            ("llama.embedding_length", hidden),
            ("llama.feed_forward_length", ffn),
            ("llama.attention.head_count", n_head),
            ("llama.attention.key_length", head_dim),
        ] {
            if v > 1 << 24 {
                return bad(field, format!("{v} is implausibly large"));
            }
        }
        Ok(Self {
            n_layer,
            hidden,
            ffn,
            n_head,
            n_kv_head,
            head_dim,
        })
    }
}

/// Build `config.json`. `vocab_size` comes from the embedding matrix (it may exceed the
/// tokenizer's size); `tied` is true when the GGUF has no `output.weight`.
pub(crate) fn hf_config(meta: &Meta, dims: &Dims, vocab_size: usize, tied: bool) -> Result<Value> {
    let max_pos = meta.u64("llama.context_length")?;
    let eps = meta
        .opt_f64("llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| {
            Error::weights(
                meta.path(),
                "missing GGUF metadata key `llama.attention.layer_norm_rms_epsilon`",
            )
        })?;
    // llama.cpp's default when the converter did not write a base frequency.
    let rope_theta = meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
    let mut c = Map::new();
    c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    c.insert("model_type".into(), json!("llama"));
    c.insert("hidden_size".into(), json!(dims.hidden));
    c.insert("intermediate_size".into(), json!(dims.ffn));
    c.insert("num_hidden_layers".into(), json!(dims.n_layer));
    c.insert("num_attention_heads".into(), json!(dims.n_head));
    c.insert("num_key_value_heads".into(), json!(dims.n_kv_head));
    c.insert("head_dim".into(), json!(dims.head_dim));
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert("rope_theta".into(), json!(rope_theta));
    c.insert("max_position_embeddings".into(), json!(max_pos));
    c.insert("vocab_size".into(), json!(vocab_size));
    c.insert("tie_word_embeddings".into(), json!(tied));
    c.insert("hidden_act".into(), json!("silu"));
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = meta.opt_u64(gguf_key)? {
            c.insert(hf_key.into(), json!(id));
        }
    }
    c.insert("torch_dtype".into(), json!("float32"));
    if let Some(scaling) = metadata_rope_scaling(meta)? {
        c.insert("rope_scaling".into(), scaling);
    }
    Ok(Value::Object(c))
}

/// Rope scaling that llama.cpp stores as metadata (linear and YaRN).
fn metadata_rope_scaling(meta: &Meta) -> Result<Option<Value>> {
    let factor = meta
        .opt_f64("llama.rope.scaling.factor")?
        .or(meta.opt_f64("llama.rope.scale_linear")?);
    let kind = match meta.opt_str("llama.rope.scaling.type")? {
        Some(kind) => kind,
        // Older files only have `rope.scale_linear`.
        None if factor.is_some() => "linear",
        None => return Ok(None),
    };
    let factor_of = |kind: &str| {
        factor.ok_or_else(|| {
            Error::weights(
                meta.path(),
                format!("rope scaling type `{kind}` without `llama.rope.scaling.factor`"),
            )
        })
    };
    match kind {
        "none" => Ok(None),
        "linear" => {
            let f = factor_of(kind)?;
            Ok((f != 1.0).then(|| json!({ "rope_type": "linear", "type": "linear", "factor": f })))
        }
        "yarn" => {
            let f = factor_of(kind)?;
            let orig = meta.u64("llama.rope.scaling.original_context_length")?;
            Ok(Some(json!({
                "rope_type": "yarn", "type": "yarn", "factor": f,
                "original_max_position_embeddings": orig,
            })))
        }
        other => Err(Error::weights(
            meta.path(),
            format!("unsupported rope scaling type `{other}` in `llama.rope.scaling.type` (supported: none, linear, yarn)"),
        )),
    }
}

/// Llama 3 rope divisors for the given parameters, as llama.cpp's converter writes them into
/// `rope_freqs.weight` (one per rotated pair).
fn llama3_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    orig_ctx: f64,
) -> Vec<f64> {
    let low_wavelen = orig_ctx / low;
    let high_wavelen = orig_ctx / high;
    (0..head_dim / 2)
        .map(|i| {
            let freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (orig_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Recover Hugging Face's `rope_scaling` (`rope_type: llama3`) from `rope_freqs.weight`.
///
/// The tensor fixes `factor` (its largest value) but not the three remaining parameters on its
/// own, so this assumes the values every Llama 3.x release uses (low_freq_factor 1,
/// high_freq_factor 4), solves for `original_max_position_embeddings` from the smoothly
/// interpolated entries, and then requires the rebuilt vector to match the tensor.
pub(crate) fn llama3_rope_scaling(freqs: &[f32], theta: f64, head_dim: usize) -> Result<Value> {
    let unsupported = |why: &str| {
        Error::tensor(
            "rope_freqs.weight",
            format!("{why}; only Llama 3 style rope scaling (low_freq_factor 1, high_freq_factor 4) can be expressed in config.json"),
        )
    };
    if freqs.len() != head_dim / 2 {
        return Err(unsupported(&format!(
            "has {} entries, expected head_dim/2 = {}",
            freqs.len(),
            head_dim / 2
        )));
    }
    let (low, high) = (1.0, 4.0);
    let factor = freqs.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x)));
    if !(factor.is_finite() && factor > 1.0) {
        return Err(unsupported(
            "its largest entry is not a finite factor above 1",
        ));
    }
    // Each interpolated entry r gives s = (1/r - 1/factor) / (1 - 1/factor) and
    // s = (L / wavelen - low) / (high - low), hence one estimate of L per entry.
    let estimates: Vec<f64> = freqs
        .iter()
        .enumerate()
        .filter(|(_, &r)| {
            (f64::from(r) - 1.0).abs() > 1e-4 && (f64::from(r) - factor).abs() > 1e-4 * factor
        })
        .map(|(i, &r)| {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64);
            let s = (1.0 / f64::from(r) - 1.0 / factor) / (1.0 - 1.0 / factor);
            (s * (high - low) + low) * wavelen
        })
        .collect();
    let orig_ctx = if estimates.is_empty() {
        8192.0 // no interpolated entries: any L in a range fits; use the Llama 3 value.
    } else {
        (estimates.iter().sum::<f64>() / estimates.len() as f64).round()
    };
    let rebuilt = llama3_factors(theta, head_dim, factor, low, high, orig_ctx);
    let max_err = rebuilt
        .iter()
        .zip(freqs)
        .map(|(a, &b)| ((a - f64::from(b)) / a).abs())
        .fold(0.0, f64::max);
    if max_err > 1e-4 {
        return Err(unsupported(&format!(
            "does not match the Llama 3 formula (relative error {max_err:.2e})"
        )));
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_llama3_rope_scaling() {
        // Llama 3.2 1B: theta 500000, head_dim 64, factor 32, original context 8192.
        let freqs: Vec<f32> = llama3_factors(500_000.0, 64, 32.0, 1.0, 4.0, 8192.0)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let s = llama3_rope_scaling(&freqs, 500_000.0, 64).unwrap();
        assert_eq!(s["rope_type"], "llama3");
        assert_eq!(s["factor"].as_f64(), Some(32.0));
        assert_eq!(s["original_max_position_embeddings"], 8192);

        let mut wrong = freqs.clone();
        wrong[20] *= 1.5;
        let err = llama3_rope_scaling(&wrong, 500_000.0, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_freqs.weight"), "{err}");
    }
}
