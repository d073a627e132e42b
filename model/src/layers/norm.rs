//! RMSNorm (Zhang & Sennrich, 2019) as Llama, Mistral and Qwen2 use it.

use candle_core::{DType, Module, Tensor};
use rayon::prelude::*;

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
        if super::host::applies(&[x, &self.weight]) {
            return self.forward_host(x);
        }
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
    /// [`rms_norm_rows`] over the rows, in parallel: candle's kernel sums each row's
    /// squares in one dependent chain (~0.3 ms of each of a 512-token prefill's 60 norms).
    fn forward_host(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let to_candle = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let owned = super::host::contiguous([x, &self.weight]).map_err(to_candle)?;
        let guards = owned.each_ref().map(|t| t.storage_and_layout());
        let [xs, w] = super::host::f32_slices(&guards).map_err(to_candle)?;
        let n = w.len();
        if n == 0 || x.dims().last() != Some(&n) {
            candle_core::bail!("rms_norm: rows of {:?} against a weight of {n}", x.dims());
        }
        let mut out = vec![0f32; xs.len()];
        let eps = self.eps as f32;
        out.par_chunks_mut(n * 16)
            .zip(xs.par_chunks(n * 16))
            .for_each(|(o, x)| rms_norm_rows(x, w, eps, o));
        Tensor::from_vec(out, x.shape(), x.device())
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` for each `w.len()`-wide row of `x`, as `x * inv * w`
/// with `inv = 1 / sqrt(..)`; each row's squares summed in sixteen lanes (so in another
/// order than a plain fold). Prefill and the fused decode step both normalize with it.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let inv = 1.0 / (sum_squares(row) / n as f32 + eps).sqrt();
        for ((o, &v), &wi) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * wi;
        }
    }
}

/// `sum(x^2)` in sixteen independent lanes, added up at the end.
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn host_norm_matches_the_elementary_ops() {
        let dev = Device::Cpu;
        let norm = RmsNorm {
            weight: Tensor::randn(0f32, 1.0, 37, &dev).unwrap(),
            eps: 1e-5,
        };
        // Rows beyond one parallel task, a strided view, a 3-d input.
        let x = Tensor::randn(0f32, 2.0, (50, 37), &dev).unwrap();
        let wide = Tensor::randn(0f32, 2.0, (50, 74), &dev).unwrap();
        let view = wide.narrow(1, 10, 37).unwrap();
        let cube = Tensor::randn(0f32, 2.0, (3, 5, 37), &dev).unwrap();
        for x in [x, view, cube] {
            let ours = norm.forward(&x).unwrap();
            let reference = norm.forward_differentiable(&x).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
        // A row of zeros stays finite (eps).
        let zeros = Tensor::zeros((2, 37), DType::F32, &dev).unwrap();
        let out = norm.forward(&zeros).unwrap().to_vec2::<f32>().unwrap();
        assert!(out.iter().flatten().all(|v| *v == 0.0));
    }
}
