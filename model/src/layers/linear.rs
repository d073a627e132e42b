//! A dense projection `y = x W^T (+ b)` over a 2-D batch of rows, with an optional LoRA
//! adapter (Hu et al., 2021): `y += (alpha / r) * (x A^T) B^T`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;

/// A low-rank update `scale * B A` of a weight `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// `alpha / rank`
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::from_weights(weight, bias))
    }

    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) {
        self.lora = lora;
    }

    /// Folds the adapter into the weight (`W += scale * B A`, in the weight's dtype) and
    /// drops it: the merged layer computes the same function with no extra cost.
    pub fn merge_lora(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let delta = (l.b.matmul(&l.a)? * l.scale)?;
            let merged = (self.weight.to_dtype(delta.dtype())? + delta)?;
            self.weight = merged.to_dtype(self.weight.dtype())?;
        }
        Ok(())
    }
}

impl Module for Linear {
    /// `x`: `[rows, in]` -> `[rows, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The fast path has no backward pass: use it only when no gradient flows through.
        let mut y = if !x.track_op() && super::matvec::applies(x, &self.weight) {
            super::matvec::matvec(x, &self.weight)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xa = x.to_dtype(l.a.dtype())?.matmul(&l.a.t()?)?;
            let delta = (xa.matmul(&l.b.t()?)? * l.scale)?;
            y = (y + delta.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }
}
