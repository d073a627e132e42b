//! Rotary position embeddings (Su et al., 2021) in the half-split layout that Hugging Face
//! checkpoints use, with Llama 3 and linear frequency scaling.
//!
//! Angles are computed for the exact positions of each token rather than read from a fixed
//! table: a batch mixes sequences at different offsets, and a recurrent model has no hard
//! context limit, so positions beyond `max_position_embeddings` must still work.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::config::{ModelConfig, RopeScaling};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[head_dim / 2]` inverse frequencies, f32, on the model's device.
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let inv = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, n, device)?,
        })
    }

    /// The rotation frequencies, `[head_dim / 2]`: angle = position * frequency.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        Ok(self.inv_freq.to_vec1::<f32>()?)
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim / 2]` in `dtype`.
    pub fn cos_sin(&self, positions: &[u32], dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let angles = pos.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x`: `[tokens, heads, head_dim]`, one position per token. On the CPU in f32
    /// without gradients, token rows in parallel and each head's halves as slices
    /// ([`rotate_heads`]); elsewhere candle's `rope_thd`, which on the CPU runs a batch
    /// on one thread with the heads innermost (~0.3 ms of each layer of a 512-token
    /// prefill). The same arithmetic per element, so the same bits (tested).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if super::host::applies(&[x, cos, sin]) {
            let owned = super::host::contiguous([x, cos, sin])?;
            let guards = owned.each_ref().map(|t| t.storage_and_layout());
            let [xs, c, s] = super::host::f32_slices(&guards)?;
            let (t, h, d) = x.dims3()?;
            if c.len() >= t * d / 2 && s.len() >= t * d / 2 {
                let mut out = vec![0f32; t * h * d];
                out.par_chunks_mut(h * d)
                    .zip(xs.par_chunks(h * d))
                    .enumerate()
                    .with_min_len(16)
                    .for_each(|(i, (o, x))| {
                        let half = d / 2;
                        let cs = (&c[i * half..][..half], &s[i * half..][..half]);
                        rotate_heads(x, cs, o);
                    });
                return Ok(Tensor::from_vec(out, (t, h, d), x.device())?);
            }
        }
        let x = x.unsqueeze(0)?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
    }

    /// The same rotation from elementary ops (with gradients) for training.
    pub fn apply_differentiable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(candle_core::D::Minus1)? / 2;
        let x1 = x.narrow(candle_core::D::Minus1, 0, half)?;
        let x2 = x.narrow(candle_core::D::Minus1, half, half)?;
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[r1, r2], candle_core::D::Minus1)?)
    }
}

/// One token's heads `x` (`[heads, d]`) rotated into `out` by its `(cos, sin)` (`[d / 2]`
/// each): `x1 cos - x2 sin`, `x1 sin + x2 cos` per pair, as candle's `rope_thd` computes.
fn rotate_heads(x: &[f32], (cos, sin): (&[f32], &[f32]), out: &mut [f32]) {
    let half = cos.len();
    for (x, o) in x.chunks_exact(2 * half).zip(out.chunks_exact_mut(2 * half)) {
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = o.split_at_mut(half);
        for i in 0..half {
            o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
            o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
        }
    }
}

/// Rotates each row of `x` (`[rows, head_dim]`) by its own signed position with the
/// frequencies `inv_freq`: `-p` rotates back what [`Rope::cos_sin`] at `p` rotated (the
/// angles are the same f32 products, negated, so the two cancel to rounding), 0 leaves the
/// row as it is.
pub fn rotate_rows(x: &Tensor, positions: &[i64], inv_freq: &[f32]) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let angles: Vec<f32> = positions
        .iter()
        .flat_map(|&p| {
            let (sign, p) = (p.signum() as f32, p.unsigned_abs() as f32);
            inv_freq.iter().map(move |f| sign * (p * f))
        })
        .collect();
    let angles = Tensor::from_vec(angles, (rows, inv_freq.len()), x.device())?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(x.dtype())?,
        angles.sin()?.to_dtype(x.dtype())?,
    );
    Ok(Rope::apply_differentiable(&x.reshape((rows, 1, d))?, &cos, &sin)?.reshape((rows, d))?)
}

/// `theta^(-2i/d)`, adjusted by the scaling rule.
pub(crate) fn inv_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Vec<f32> {
    let base = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64));
    match scaling {
        None => base.map(|f| f as f32).collect(),
        Some(RopeScaling::Linear { factor }) => base.map(|f| (f / factor) as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // Long wavelengths are slowed by `factor`, short ones kept, and the band in
            // between interpolated smoothly (Llama 3.1's "rope_type": "llama3").
            let old_ctx = *original_max_position_embeddings as f64;
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                scaled as f32
            })
            .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_matches_elementary() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 3, 8), &dev)?;
        let cfg = crate::config::ModelConfig::from_json(serde_json::json!({
            "model_type": "llama", "hidden_size": 24, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 3, "vocab_size": 10
        }))?;
        let rope = Rope::new(&cfg, &dev)?;
        let (c, s) = rope.cos_sin(&[0, 1, 7, 100, 3], DType::F32)?;
        let a = Rope::apply(&x, &c, &s)?;
        let b = Rope::apply_differentiable(&x, &c, &s)?;
        let diff = (&a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // The host rotation and candle's kernel: the same bits, rows beyond one parallel
        // task too.
        let candle = |x: &Tensor, c: &Tensor, s: &Tensor| -> Result<Vec<f32>> {
            let r = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, c, s)?;
            Ok(r.flatten_all()?.to_vec1::<f32>()?)
        };
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, candle(&x, &c, &s)?);
        let positions: Vec<u32> = (0..40).map(|i| i * 37 % 1000).collect();
        let (c, s) = rope.cos_sin(&positions, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (40, 3, 8), &dev)?;
        let ours = Rope::apply(&x, &c, &s)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(ours, candle(&x, &c, &s)?);
        // A strided input (a view of every other head) is rotated as its copy.
        let wide = Tensor::randn(0f32, 1.0, (40, 6, 8), &dev)?;
        let view = wide.narrow(1, 0, 3)?;
        assert_eq!(
            Rope::apply(&view, &c, &s)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            candle(&view.contiguous()?, &c, &s)?
        );
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let plain = inv_frequencies(64, 500000.0, None);
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled = inv_frequencies(64, 500000.0, Some(&s));
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[31] / 8.0 - scaled[31]).abs() < 1e-12);
    }
}
