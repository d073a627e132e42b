//! RMSNorm (Zhang & Sennrich, 2019) as Llama, Mistral and Qwen2 use it.

use candle_core::{DType, Module, Tensor};

use super::WeightSource;
use crate::Result;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(w: &WeightSource, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The fused kernel accumulates in f32 whatever the input dtype. It has no backward
        // pass; training code must use `forward_differentiable`.
        if x.is_contiguous() {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
        } else {
            self.forward_differentiable(x)
        }
    }
}

impl RmsNorm {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The same math from elementary ops (which have gradients), in f32.
    pub fn forward_differentiable(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        y.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}
