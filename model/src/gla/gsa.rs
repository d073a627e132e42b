//! Gated slot attention (GSA; Zhang et al. 2024), the Liger variant whose memory is a
//! bounded set of `M` slots read through a softmax (LIGER.md §1). Per KV head, on the raw
//! (pre-RoPE) q, k and v, with scale 1:
//!
//! ```text
//! log a_t = logsigmoid(Pool_M(k_t)) / c        s_t = 1 - a_t            (both [M])
//! K~_t = K~_{t-1} diag(a_t) + k_t^T s_t                                   (d x M)
//! V~_t = diag(a_t) V~_{t-1} + s_t^T v_t                                   (M x d)
//! o_t  = softmax_M(q_t K~_t) V~_t
//! ```
//!
//! `Pool_M` averages the head dim in `M` equal groups (the identity when `M = d`).
//!
//! Both memories are kept as `M x d` matrices gated on their `M` rows (the key memory
//! transposed), stacked in one state tensor `[b, hkv, 2M, d]`: rows `0..M` hold `K~^T`,
//! rows `M..2M` hold `V~`. Each is then the GLA recurrence with key `s` and a per-slot gate:
//! the value memory with value `v`, read as usual by the slot weights `p = softmax(..)`; the
//! key memory with value `k`, read transposed (`K~^T q^T`), which is
//! [`super::chunked::chunked_value_read`]. So the chunked form is two chunked GLA passes
//! with a softmax between them, exactly as the reference code computes GSA.

use candle_core::{DType, Tensor, D};

use super::feature::log_sigmoid;
use super::{FeatureMaps, GlaInputs};
use crate::{Error, Result};

/// Inputs to GSA for `b` sequences of `t` tokens: `q: [b, hkv, g, t, d]`, `k`, `v`:
/// `[b, hkv, t, d]`, `slots` (the writes `s = 1 - a`) and `gate` (`log a`): `[b, hkv, t, M]`.
#[derive(Debug, Clone)]
pub struct GsaInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub slots: Tensor,
    pub gate: Tensor,
    /// Use the softmax that has a backward pass (training).
    pub differentiable: bool,
}

/// `q: [b, h, t, d]`, `k`, `v`: `[b, hkv, t, d]` (any float dtype) to GSA inputs with
/// `fm.slots` slots.
pub fn feature_maps(fm: FeatureMaps, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<GsaInputs> {
    let (b, h, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let m = fm.slots;
    if !crate::config::slots_fit(m, d) {
        return Err(Error::State(format!(
            "GSA: {m} slots do not divide the head dim {d}"
        )));
    }
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let pooled = if m == d {
        k.clone()
    } else {
        k.reshape((b, hkv, t, m, d / m))?.mean(D::Minus1)?
    };
    let gate = (log_sigmoid(&pooled)? / fm.gate_normalizer)?;
    let slots = (1.0 - gate.exp()?)?;
    Ok(GsaInputs {
        q: q.to_dtype(DType::F32)?.reshape((b, hkv, h / hkv, t, d))?,
        k,
        v: v.to_dtype(DType::F32)?.contiguous()?,
        slots: slots.contiguous()?,
        gate: gate.contiguous()?,
        differentiable: fm.differentiable,
    })
}

impl GsaInputs {
    fn slot_count(&self) -> Result<usize> {
        Ok(self.gate.dim(3)?)
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.differentiable {
            candle_nn::ops::softmax(x, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(x)?
        })
    }

    /// Tokens `start..start + len`.
    pub fn tokens(&self, start: usize, len: usize) -> Result<Self> {
        let cut = |x: &Tensor, dim: usize| -> Result<Tensor> {
            Ok(x.narrow(dim, start, len)?.contiguous()?)
        };
        Ok(Self {
            q: cut(&self.q, 3)?,
            k: cut(&self.k, 2)?,
            v: cut(&self.v, 2)?,
            slots: cut(&self.slots, 2)?,
            gate: cut(&self.gate, 2)?,
            differentiable: self.differentiable,
        })
    }
}

/// The chunked-parallel form, chunk length `c`. `state: [b, hkv, 2M, d]`. Returns
/// `(o: [b, hkv, g, t, d], new_state)`.
pub fn chunked(x: &GsaInputs, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let m = x.slot_count()?;
    let (keys, values) = split_state(state, m)?;
    let key_memory = GlaInputs {
        q: x.q.clone(),
        k: x.slots.clone(),
        gate: x.gate.clone(),
        v: x.k.clone(),
    };
    let (scores, keys) = super::chunked::chunked_value_read(&key_memory, &keys, c)?;
    let value_memory = GlaInputs {
        q: x.softmax(&scores)?,
        k: x.slots.clone(),
        gate: x.gate.clone(),
        v: x.v.clone(),
    };
    let (o, values) = super::chunked(&value_memory, &values, c)?;
    Ok((o, Tensor::cat(&[keys, values], 2)?))
}

/// Token-by-token recurrence; what decode uses. Shapes as in [`chunked`].
pub fn recurrent(x: &GsaInputs, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = x.k.dim(2)?;
    let mut s = state.clone();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let at =
            |x: &Tensor, dim: usize| -> Result<Tensor> { Ok(x.narrow(dim, i, 1)?.squeeze(dim)?) };
        let (o, next) = step(
            x,
            &Step {
                q: at(&x.q, 3)?,
                k: at(&x.k, 2)?,
                v: at(&x.v, 2)?,
                slots: at(&x.slots, 2)?,
                gate: at(&x.gate, 2)?,
            },
            &s,
        )?;
        outs.push(o.unsqueeze(3)?);
        s = next;
    }
    Ok((Tensor::cat(&outs, 3)?, s))
}

/// One token: `q: [b, hkv, g, d]`, `k`, `v`: `[b, hkv, d]`, `slots`, `gate`: `[b, hkv, M]`.
struct Step {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slots: Tensor,
    gate: Tensor,
}

fn step(x: &GsaInputs, t: &Step, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = t.gate.dim(2)?;
    let (keys, values) = split_state(state, m)?;
    let decay = t.gate.exp()?.unsqueeze(3)?; // scales the slot rows of both memories
    let slots = t.slots.unsqueeze(3)?; // [b, hkv, M, 1]
    let keys = (keys.broadcast_mul(&decay)? + slots.broadcast_mul(&t.k.unsqueeze(2)?)?)?;
    // Slot scores [b, hkv, g, M]; the value memory is then the GLA step with key s, read
    // by the slot weights.
    let scores = t.q.matmul(&keys.transpose(2, 3)?.contiguous()?)?;
    let (o, values) = super::step(&x.softmax(&scores)?, &t.slots, &t.gate, &t.v, &values)?;
    Ok((o, Tensor::cat(&[keys, values], 2)?))
}

/// `[b, hkv, 2M, d]` into the key memory (transposed) and the value memory, `[b, hkv, M, d]`.
fn split_state(state: &Tensor, m: usize) -> Result<(Tensor, Tensor)> {
    if state.dim(2)? != 2 * m {
        return Err(Error::State(format!(
            "GSA state has {} rows, expected 2 x {m} slots",
            state.dim(2)?
        )));
    }
    Ok((
        state.narrow(2, 0, m)?.contiguous()?,
        state.narrow(2, m, m)?.contiguous()?,
    ))
}
