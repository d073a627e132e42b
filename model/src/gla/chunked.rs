//! The chunked-parallel form (LIGER.md §2) used for prefill.
//!
//! The sequence is cut into chunks of `c` tokens. Inside chunk `j`, with
//! `B_t = g_{start} + ... + g_t` (cumulative from the chunk start, so `B_t <= 0` and
//! decreasing in t):
//!
//! ```text
//! o_t     = (q_t * e^{B_t}) S_j  +  sum_{s<=t in chunk} [sum_i q_{t,i} k_{s,i} e^{B_{t,i}-B_{s,i}}] v_s
//! S_{j+1} = diag(e^{B_last}) S_j +  sum_s (k_s * e^{B_last - B_s})^T v_s
//! ```
//!
//! Every exponent is <= 0 (we never divide by `e^B`), so nothing overflows however strong
//! the decay; a factor that underflows to 0 multiplies a true value that is smaller still.
//! All chunks' outputs come from batched matmuls; only the state hand-off between chunks
//! (one `d x d` update per chunk) is sequential.

use candle_core::{DType, Tensor};

use super::GlaInputs;
use crate::Result;

/// `x` as in [`super::recurrent`], `state: [b, hkv, d, d]`, chunk length `c`.
/// Returns `(o: [b, hkv, g, t, d], new_state)`.
pub fn chunked(x: &GlaInputs, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let (b, hkv, g, t, d) = x.q.dims5()?;
    let bh = b * hkv;
    let n = t.div_ceil(c);
    let pad = n * c - t;
    // Zero padding at the end is inert: k = 0 writes nothing, g = 0 does not decay, and
    // the padded outputs are cut off below.
    let q = pad_tokens(&x.q.reshape((bh, g, t, d))?, 2, pad)?;
    let k = pad_tokens(&x.k.reshape((bh, t, d))?, 1, pad)?;
    let gate = pad_tokens(&x.gate.reshape((bh, t, d))?, 1, pad)?;
    let v = pad_tokens(&x.v.reshape((bh, t, d))?, 1, pad)?;

    let k = k.reshape((bh, n, c, d))?;
    let v = v.reshape((bh, n, c, d))?;
    let gate = gate.reshape((bh, n, c, d))?;
    // (candle's cumsum is a matmul, which rejects the degenerate strides of a length-1 axis.)
    let cum = if c == 1 {
        gate
    } else {
        gate.cumsum(2)?.contiguous()?
    }; // B, <= 0
    let cum_last = cum.narrow(2, c - 1, 1)?; // [bh, n, 1, d]

    // Each chunk's write into the state, decayed to the chunk's end.
    let k_to_end = (k.broadcast_mul(&cum_last.broadcast_sub(&cum)?.exp()?))?;
    let writes = k_to_end.transpose(2, 3)?.contiguous()?.matmul(&v)?; // [bh, n, d, d]
    let chunk_decay = cum_last.exp()?.transpose(2, 3)?.contiguous()?; // [bh, n, d, 1]

    // Sequential hand-off: the state entering each chunk.
    let mut s = state.reshape((bh, d, d))?;
    let mut entering = Vec::with_capacity(n);
    for j in 0..n {
        entering.push(s.clone());
        let decay = chunk_decay.narrow(1, j, 1)?.squeeze(1)?;
        let write = writes.narrow(1, j, 1)?.squeeze(1)?;
        s = (s.broadcast_mul(&decay)? + write)?;
    }
    let entering = Tensor::stack(&entering, 1)?; // [bh, n, d, d]

    // q grouped by chunk: [bh, n, g, c, d].
    let q = q.reshape((bh, g, n, c, d))?.permute((0, 2, 1, 3, 4))?;

    // Inter-chunk: (q * e^B) S_j, all chunks at once.
    let q_decayed = q.broadcast_mul(&cum.unsqueeze(2)?.exp()?)?;
    let inter = q_decayed.reshape((bh, n, g * c, d))?.matmul(&entering)?; // [bh, n, g*c, d]

    // Intra-chunk: A[t, s] = sum_i q_{t,i} k_{s,i} e^{B_{t,i} - B_{s,i}}, s <= t.
    let diff = cum.unsqueeze(3)?.broadcast_sub(&cum.unsqueeze(2)?)?; // [bh, n, c(t), c(s), d]
    let causal = causal_mask(c, x.q.device())?; // [c, c, 1]
                                                // Clamp before exp: above the diagonal the difference is positive and could overflow.
    let decay = diff.minimum(0.0)?.exp()?.broadcast_mul(&causal)?;
    let kd = decay.broadcast_mul(&k.unsqueeze(2)?)?; // [bh, n, c(t), c(s), d]
                                                     // For each (chunk, t): [g, d] x [d, c(s)].
                                                     // (Flattened to one batch axis: candle's CPU matmul takes at most two.)
    let q_by_t = q.permute((0, 1, 3, 2, 4))?.reshape((bh * n * c, g, d))?; // [.., g, d]
    let kd = kd.transpose(3, 4)?.reshape((bh * n * c, d, c))?; // [.., d, c(s)]
    let scores = q_by_t.matmul(&kd)?.reshape((bh, n, c, g, c))?; // [bh, n, c(t), g, c(s)]
    let scores = scores.permute((0, 1, 3, 2, 4))?.contiguous()?; // [bh, n, g, c(t), c(s)]
    let intra = scores.reshape((bh, n, g * c, c))?.matmul(&v)?; // [bh, n, g*c, d]

    let o = (inter + intra)?
        .reshape((bh, n, g, c, d))?
        .permute((0, 2, 1, 3, 4))?
        .reshape((bh, g, n * c, d))?
        .narrow(2, 0, t)?
        .reshape((b, hkv, g, t, d))?
        .contiguous()?;
    Ok((o, s.reshape((b, hkv, d, d))?))
}

fn pad_tokens(x: &Tensor, dim: usize, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.contiguous()?);
    }
    Ok(x.pad_with_zeros(dim, 0, pad)?.contiguous()?)
}

/// `[c, c, 1]`: 1 where `s <= t` (row t, column s), else 0.
fn causal_mask(c: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..c)
        .flat_map(|t| (0..c).map(move |s| if s <= t { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (c, c, 1), device)?.to_dtype(DType::F32)?)
}
