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
//! [`gsa`] builds gated slot attention from two such recurrences; [`Recurrence`] is what a
//! layer holds, whichever the variant.
//!
//! The state is kept once per KV head: keys, values and gates are shared inside a GQA
//! group, so per-query-head copies (as the reference code keeps) would be identical.

mod chunked;
pub mod feature;
mod fused;
pub mod gsa;
pub mod reference;
pub mod scan;

pub use chunked::{chunked, chunked_value_read};
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

/// A layer's recurrence inputs for a batch, whichever the variant.
#[derive(Debug, Clone)]
pub enum Recurrence {
    /// GLA or HGRN2: one `d x d` memory per KV head.
    Gla(GlaInputs),
    /// Gated slot attention: two `M x d` memories per KV head.
    Gsa(gsa::GsaInputs),
}

impl Recurrence {
    /// Raw `q: [b, h, t, d]`, `k`, `v`: `[b, hkv, t, d]` to the variant's inputs.
    pub fn new(fm: FeatureMaps, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        Ok(match fm.variant {
            crate::config::Variant::Gsa => Self::Gsa(gsa::feature_maps(fm, q, k, v)?),
            _ => Self::Gla(feature_maps(fm, q, k, v)?),
        })
    }

    /// One sequence's raw projections as a layer computes them, `q: [t, h, d]`, `k`, `v`:
    /// `[t, hkv, d]`, to the variant's inputs with the readers `readers` asks for: on the
    /// host in one pass where [`feature::host_maps`] applies, else [`Self::new`] and the
    /// key-read adapters (the reference it is tested against).
    pub fn from_projections(
        fm: FeatureMaps,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        readers: feature::Readers,
    ) -> Result<Self> {
        if let Some(x) = feature::host_maps(fm, (q, k, v), readers)? {
            return Ok(Self::Gla(x));
        }
        // [t, heads, d] -> [1, heads, t, d]
        let bhtd =
            |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?) };
        let all = Self::new(fm, &bhtd(q)?, &bhtd(k)?, &bhtd(v)?)?;
        match readers {
            feature::Readers::Queries => Ok(all),
            feature::Readers::QueriesAndKeys => all.with_key_reads(),
            feature::Readers::KeysOnly => all.key_reads_only(),
        }
    }

    /// Adds each token's own feature-mapped key as one more query head after the `g` of
    /// every KV head, so the output also holds `k_t S_t`: what the memory answers for the
    /// token's key right after writing it (the global cache's salience, [`crate::global`]).
    /// GLA and HGRN2 only (GSA's memories are read through a softmax).
    pub fn with_key_reads(self) -> Result<Self> {
        match self {
            Self::Gla(x) => Ok(Self::Gla(GlaInputs {
                q: Tensor::cat(&[&x.q, &x.k.unsqueeze(2)?], 2)?.contiguous()?,
                ..x
            })),
            Self::Gsa(_) => Err(crate::Error::State(
                "gated slot attention has no key reads for a global cache".into(),
            )),
        }
    }

    /// Each token's own feature-mapped key as the only query head of every KV head: the
    /// output is just the key reads of [`Self::with_key_reads`], for a layer that keeps its
    /// memory only to choose the global cache (no read-out). GLA and HGRN2 only.
    pub fn key_reads_only(self) -> Result<Self> {
        match self {
            Self::Gla(x) => Ok(Self::Gla(GlaInputs {
                q: x.k.unsqueeze(2)?.contiguous()?,
                ..x
            })),
            Self::Gsa(_) => Err(crate::Error::State(
                "gated slot attention has no key reads for a global cache".into(),
            )),
        }
    }

    /// Each token's own write as its key reads it back, `|k_t|^2 v_t`: `[b, hkv, t, d]`
    /// (GLA and HGRN2).
    pub fn own_writes(&self) -> Result<Tensor> {
        match self {
            Self::Gla(x) => Ok(x.v.broadcast_mul(&x.k.sqr()?.sum_keepdim(3)?)?),
            Self::Gsa(_) => Err(crate::Error::State(
                "gated slot attention has no key reads for a global cache".into(),
            )),
        }
    }

    /// Tokens `start..start + len` of every sequence.
    pub fn tokens(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Gla(x) => Self::Gla(GlaInputs {
                q: x.q.narrow(3, start, len)?.contiguous()?,
                k: x.k.narrow(2, start, len)?.contiguous()?,
                gate: x.gate.narrow(2, start, len)?.contiguous()?,
                v: x.v.narrow(2, start, len)?.contiguous()?,
            }),
            Self::Gsa(x) => Self::Gsa(x.tokens(start, len)?),
        })
    }

    /// Tokens `idx` of a one-sequence batch as a batch of one-token sequences (the token
    /// axis becomes the batch axis), for a batched decode step.
    pub fn rows(&self, idx: &Tensor) -> Result<Self> {
        // q: [1, hkv, g, t, w] -> [n, hkv, g, 1, w]; the rest: [1, hkv, t, w] -> [n, hkv, 1, w].
        let q_rows = |x: &Tensor| -> Result<Tensor> {
            Ok(x.index_select(idx, 3)?
                .permute((3, 1, 2, 0, 4))?
                .contiguous()?)
        };
        let rows = |x: &Tensor| -> Result<Tensor> {
            Ok(x.index_select(idx, 2)?
                .permute((2, 1, 0, 3))?
                .contiguous()?)
        };
        Ok(match self {
            Self::Gla(x) => Self::Gla(GlaInputs {
                q: q_rows(&x.q)?,
                k: rows(&x.k)?,
                gate: rows(&x.gate)?,
                v: rows(&x.v)?,
            }),
            Self::Gsa(x) => Self::Gsa(gsa::GsaInputs {
                q: q_rows(&x.q)?,
                k: rows(&x.k)?,
                v: rows(&x.v)?,
                slots: rows(&x.slots)?,
                gate: rows(&x.gate)?,
                differentiable: x.differentiable,
            }),
        })
    }

    /// The chunked-parallel form (prefill). Returns `(o: [b, hkv, g, t, d], new_state)`.
    pub fn chunked(&self, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Gla(x) => chunked(x, state, c),
            Self::Gsa(x) => gsa::chunked(x, state, c),
        }
    }

    /// A prefill span: on the CPU without gradients, GLA and HGRN2 run the host scan
    /// ([`scan`]), everything else the chunked form with chunks of `c`.
    pub fn span(&self, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Gla(x) if scan::applies(x, state) => scan::scan(x, state),
            _ => self.chunked(state, c),
        }
    }

    /// Token by token (decode). Returns `(o: [b, hkv, g, t, d], new_state)`.
    pub fn recurrent(&self, state: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Gla(x) => recurrent(x, state),
            Self::Gsa(x) => gsa::recurrent(x, state),
        }
    }
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
/// Returns `(o: [b, hkv, g, d], new_state)`. On the CPU without gradients, one fused pass
/// over the states; otherwise [`step_reference`].
pub fn step(
    q: &Tensor,
    k: &Tensor,
    gate: &Tensor,
    v: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if fused::applies(&[q, k, gate, v, state]) {
        return fused::step(q, k, gate, v, state);
    }
    step_reference(q, k, gate, v, state)
}

/// [`step`] as tensor ops: the slow, obviously right form (and the one with a backward pass).
pub fn step_reference(
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
