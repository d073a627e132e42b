//! The gated recurrent branch of a Liger layer (LIGER.md §1-2).
//!
//! Per KV head, with feature-mapped queries `q` and keys `k`, values `v` and a log-gate `g`
//! (every entry <= 0, one per key dimension):
//!
//! ```text
//! S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (S: d_k x d_v, f32)
//! o_t = q_t S_t                                   (for each query head of the KV group)
//! ```
//!
//! Three implementations, held equal by tests:
//! - [`reference`]: the definition, quadratic, in f64 on plain vectors (obviously right);
//! - [`recurrent`]: one token at a time; what decode uses, batched over sequences;
//! - [`chunked`]: the chunked-parallel form for prefill.
//!
//! The state is kept once per KV head: keys, values and gates are shared inside a GQA
//! group, so per-query-head copies (as the reference code keeps) would be identical.

mod chunked;
pub mod feature;
pub mod reference;

pub use chunked::chunked;
pub use feature::{feature_maps, FeatureMaps};

use candle_core::Tensor;

use crate::Result;

/// Inputs to the recurrence for a batch of `b` sequences with equal token count `t`.
///
/// Shapes (all f32, contiguous): `q: [b, hkv, g, t, d]` (the `g` query heads that read each
/// KV head's state), `k`, `gate`, `v`: `[b, hkv, t, d]`.
#[derive(Debug, Clone)]
pub struct GlaInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub gate: Tensor,
    pub v: Tensor,
}

/// Token-by-token recurrence. `state`: `[b, hkv, d, d]`. Returns `(o, new_state)` with
/// `o: [b, hkv, g, t, d]`.
pub fn recurrent(x: &GlaInputs, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = x.k.dim(2)?;
    let mut s = state.clone();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let (o, s_next) = step(
            &x.q.narrow(3, i, 1)?.squeeze(3)?,
            &x.k.narrow(2, i, 1)?.squeeze(2)?,
            &x.gate.narrow(2, i, 1)?.squeeze(2)?,
            &x.v.narrow(2, i, 1)?.squeeze(2)?,
            &s,
        )?;
        outs.push(o.unsqueeze(3)?);
        s = s_next;
    }
    Ok((Tensor::cat(&outs, 3)?, s))
}

/// One decode step: `q: [b, hkv, g, d]`, `k`, `gate`, `v`: `[b, hkv, d]`, `state: [b, hkv, d, d]`.
/// Returns `(o: [b, hkv, g, d], new_state)`.
pub fn step(
    q: &Tensor,
    k: &Tensor,
    gate: &Tensor,
    v: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let decay = gate.exp()?.unsqueeze(3)?; // scales the rows (key dims) of S
    let write = k.unsqueeze(3)?.broadcast_mul(&v.unsqueeze(2)?)?; // k^T v
    let s = (state.broadcast_mul(&decay)? + write)?;
    let o = q.matmul(&s)?;
    Ok((o, s))
}
