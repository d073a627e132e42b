//! From raw (pre-RoPE) projections to the recurrence inputs, per Liger variant
//! (LIGER.md §1):
//!
//! - GLA: `q' = softmax(q)`, `k' = softmax(k)` over the head dim, `g = logsigmoid(k) / c`;
//! - HGRN2: `q' = softmax(q)`, `g = logsigmoid(k) / c`, `k' = 1 - exp(g)`.
//!
//! No 1/sqrt(d) scale and no normalizer: the softmax feature map already bounds each row.

use candle_core::{DType, Tensor, D};

use super::GlaInputs;
use crate::config::Variant;
use crate::Result;

/// Feature-map settings of one layer.
#[derive(Debug, Clone, Copy)]
pub struct FeatureMaps {
    pub variant: Variant,
    pub gate_normalizer: f64,
    /// GSA's slot count (unused by the other variants).
    pub slots: usize,
    /// Use ops that have a backward pass (slower); for training.
    pub differentiable: bool,
}

/// `q: [b, h, t, d]`, `k`, `v`: `[b, hkv, t, d]` (any float dtype) to recurrence inputs.
pub fn feature_maps(fm: FeatureMaps, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<GlaInputs> {
    let (b, h, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let softmax = |x: &Tensor| -> Result<Tensor> {
        Ok(if fm.differentiable {
            candle_nn::ops::softmax(x, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(x)?
        })
    };
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let gate = (log_sigmoid(&k)? / fm.gate_normalizer)?;
    let k = match fm.variant {
        Variant::Gla => softmax(&k)?,
        Variant::Hgrn2 => (1.0 - gate.exp()?)?,
        Variant::Gsa => {
            return Err(crate::Error::State(
                "GSA has its own inputs: use gla::gsa::feature_maps".into(),
            ))
        }
    };
    let q = softmax(&q)?.reshape((b, hkv, h / hkv, t, d))?;
    Ok(GlaInputs {
        q,
        k: k.contiguous()?,
        gate: gate.contiguous()?,
        v: v.to_dtype(DType::F32)?.contiguous()?,
    })
}

/// `log(sigmoid(x)) = -softplus(-x)`, written so that neither branch overflows.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // min(x, 0) - log(1 + exp(-|x|))
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(0.0)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}
