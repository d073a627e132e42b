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

/// Which rows read each KV head's memory: its query heads (the read-out), those and the
/// tokens' own keys (a global cache's key reads, [`super::Recurrence::with_key_reads`]), or
/// the keys only ([`super::Recurrence::key_reads_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    Queries,
    QueriesAndKeys,
    KeysOnly,
}

/// [`feature_maps`] (with the key reads `readers` asks for) in one pass on the host, from
/// one sequence's projections as they come out of the layer: `q: [t, h, d]`,
/// `k`, `v`: `[t, hkv, d]`, CPU f32, no gradients; `None` otherwise (and for GSA). The
/// candle path spends some twenty ops per layer here (transposes, two softmaxes, a
/// log-sigmoid of six elementwise passes, a concatenation), each a pass over memory and
/// most on one thread: a tenth of a 512-token prefill. `tests::host_maps_match_candle`
/// holds the two equal.
pub fn host_maps(
    fm: FeatureMaps,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    readers: Readers,
) -> Result<Option<GlaInputs>> {
    use rayon::prelude::*;
    if fm.differentiable
        || fm.variant == Variant::Gsa
        || !super::fused::applies(&[q, k, v])
        || q.rank() != 3
    {
        return Ok(None);
    }
    let (t, h, d) = q.dims3()?;
    let hkv = k.dim(1)?;
    let g = h / hkv;
    let dev = q.device().clone();
    let owned = crate::layers::host::contiguous([q, k, v])?;
    let guards = owned.each_ref().map(|t| t.storage_and_layout());
    let [q, k, v] = crate::layers::host::f32_slices(&guards)?;
    let inv_c = (1.0 / fm.gate_normalizer) as f32;
    // k', gate and v as [hkv, t, d], one row per item.
    let mut kf = vec![0f32; hkv * t * d];
    let mut gate = vec![0f32; hkv * t * d];
    let mut vf = vec![0f32; hkv * t * d];
    kf.par_chunks_mut(d)
        .zip(gate.par_chunks_mut(d))
        .zip(vf.par_chunks_mut(d))
        .enumerate()
        .for_each(|(r, ((kr, gr), vr))| {
            let (j, s) = (r / t, r % t);
            key_row(
                fm.variant,
                inv_c,
                &k[(s * hkv + j) * d..(s * hkv + j + 1) * d],
                gr,
                kr,
            );
            vr.copy_from_slice(&v[(s * hkv + j) * d..(s * hkv + j + 1) * d]);
        });
    // q' as [hkv, heads, t, d]: the group's query heads, then (if asked) the key.
    let (heads, key_slot) = match readers {
        Readers::Queries => (g, None),
        Readers::QueriesAndKeys => (g + 1, Some(g)),
        Readers::KeysOnly => (1, Some(0)),
    };
    let mut qf = vec![0f32; hkv * heads * t * d];
    qf.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        let (j, slot, s) = (r / (heads * t), r / t % heads, r % t);
        if Some(slot) == key_slot {
            row.copy_from_slice(&kf[(j * t + s) * d..(j * t + s + 1) * d]);
        } else {
            let hq = j * g + slot;
            row.copy_from_slice(&q[(s * h + hq) * d..(s * h + hq + 1) * d]);
            crate::layers::vexp::softmax(row);
        }
    });
    Ok(Some(GlaInputs {
        q: Tensor::from_vec(qf, (1, hkv, heads, t, d), &dev)?,
        k: Tensor::from_vec(kf, (1, hkv, t, d), &dev)?,
        gate: Tensor::from_vec(gate, (1, hkv, t, d), &dev)?,
        v: Tensor::from_vec(vf, (1, hkv, t, d), &dev)?,
    }))
}

/// One token's raw key for one KV head, on the host: its log-gate `log_sigmoid(k) / c`
/// into `gate` (`inv_c = 1 / c`) and its feature-mapped key into `key` (softmax for GLA,
/// `1 - exp(gate)` for HGRN2). The host feature maps use it for every row of a prefill and
/// the fused decode step for each token, so a token gets the same gates whichever path
/// reads it.
pub(crate) fn key_row(variant: Variant, inv_c: f32, k: &[f32], gate: &mut [f32], key: &mut [f32]) {
    crate::layers::vexp::log_sigmoid(k, inv_c, gate);
    match variant {
        Variant::Hgrn2 => {
            for (ki, &gi) in key.iter_mut().zip(gate.iter()) {
                *ki = 1.0 - gi.exp();
            }
        }
        Variant::Gla | Variant::Gsa => {
            key.copy_from_slice(k);
            crate::layers::vexp::softmax(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::gla::Recurrence;

    #[test]
    fn host_maps_match_candle() {
        let (t, h, hkv, d) = (37, 6, 2, 16);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 2.0, (t, h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 2.0, (t, hkv, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (t, hkv, d), &dev).unwrap();
        let bhtd = |x: &Tensor| {
            x.transpose(0, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        for variant in [Variant::Gla, Variant::Hgrn2] {
            let fm = FeatureMaps {
                variant,
                gate_normalizer: 16.0,
                slots: 0,
                differentiable: false,
            };
            for readers in [Readers::Queries, Readers::QueriesAndKeys, Readers::KeysOnly] {
                let host = host_maps(fm, (&q, &k, &v), readers).unwrap().unwrap();
                let all = Recurrence::new(fm, &bhtd(&q), &bhtd(&k), &bhtd(&v)).unwrap();
                let all = match readers {
                    Readers::Queries => all,
                    Readers::QueriesAndKeys => all.with_key_reads().unwrap(),
                    Readers::KeysOnly => all.key_reads_only().unwrap(),
                };
                let Recurrence::Gla(want) = all else {
                    panic!("GLA inputs")
                };
                for (name, a, b) in [
                    ("q", &host.q, &want.q),
                    ("k", &host.k, &want.k),
                    ("gate", &host.gate, &want.gate),
                    ("v", &host.v, &want.v),
                ] {
                    assert_eq!(a.dims(), b.dims(), "{name} {variant:?} {readers:?}");
                    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
                    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-6, "{name} {variant:?} {readers:?}: {diff}");
                }
            }
        }
    }
}
