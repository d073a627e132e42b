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
//! (one `d_k x d_v` update per chunk) is sequential.
//!
//! The key and value widths may differ (GSA's memories are `slots x d`), and besides the
//! usual read `q S` there is the transposed read `S q^T` that GSA's key memory needs
//! ([`chunked_value_read`]).

use candle_core::{DType, Tensor};

use super::GlaInputs;
use crate::Result;

/// `x` as in [`super::recurrent`] (key width `dk`, value width `dv`), `state: [b, hkv, dk, dv]`,
/// chunk length `c`. Returns `(o: [b, hkv, g, t, dv], new_state)`.
pub fn chunked(x: &GlaInputs, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let ch = Chunks::split(x, state, c)?;
    let (bh, n, g, dk, dv) = (ch.bh, ch.n, ch.g, ch.dk, ch.dv);

    // Inter-chunk: (q * e^B) S_j, all chunks at once.
    let q_decayed = ch.q.broadcast_mul(&ch.cum.unsqueeze(2)?.exp()?)?;
    let inter = q_decayed
        .reshape((bh, n, g * c, dk))?
        .matmul(&ch.entering)?; // [bh, n, g*c, dv]

    // Intra-chunk: A[t, s] = sum_i q_{t,i} k_{s,i} e^{B_{t,i} - B_{s,i}}, s <= t.
    let decay = ch.pair_decay(x)?; // [bh, n, c(t), c(s), dk]
    let kd = decay.broadcast_mul(&ch.k.unsqueeze(2)?)?;
    // For each (chunk, t): [g, dk] x [dk, c(s)].
    // (Flattened to one batch axis: candle's CPU matmul takes at most two.)
    let q_by_t =
        ch.q.permute((0, 1, 3, 2, 4))?
            .reshape((bh * n * c, g, dk))?;
    let kd = kd.transpose(3, 4)?.reshape((bh * n * c, dk, c))?; // [.., dk, c(s)]
    let scores = q_by_t.matmul(&kd)?.reshape((bh, n, c, g, c))?; // [bh, n, c(t), g, c(s)]
    let scores = scores.permute((0, 1, 3, 2, 4))?.contiguous()?; // [bh, n, g, c(t), c(s)]
    let intra = scores.reshape((bh, n, g * c, c))?.matmul(&ch.v)?; // [bh, n, g*c, dv]

    let o = ch.unchunk(&(inter + intra)?, dv)?;
    Ok((o, ch.last_state()?))
}

/// The same recurrence (`S_t = diag(e^{g_t}) S_{t-1} + k_t^T v_t`) read the other way
/// round: `o_t = S_t q_t^T`, contracting the value width. Here `x.q` has the value width
/// (`[b, hkv, g, t, dv]`) and the output the key width:
///
/// ```text
/// o_{t,i} = e^{B_{t,i}} (S_j q_t^T)_i  +  sum_{s<=t in chunk} (q_t . v_s) e^{B_{t,i}-B_{s,i}} k_{s,i}
/// ```
///
/// Returns `(o: [b, hkv, g, t, dk], new_state)`.
pub fn chunked_value_read(x: &GlaInputs, state: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let ch = Chunks::split(x, state, c)?;
    let (bh, n, g, dk, dv) = (ch.bh, ch.n, ch.g, ch.dk, ch.dv);

    // Inter-chunk: e^{B_t} * (S_j q_t^T), all chunks at once.
    let read =
        ch.q.reshape((bh, n, g * c, dv))?
            .matmul(&ch.entering.transpose(2, 3)?.contiguous()?)?
            .reshape((bh, n, g, c, dk))?;
    let inter = read.broadcast_mul(&ch.cum.unsqueeze(2)?.exp()?)?;

    // Intra-chunk: plain dot products q_t . v_s, then per key dim the decayed, masked keys.
    let dots =
        ch.q.reshape((bh, n, g * c, dv))?
            .matmul(&ch.v.transpose(2, 3)?.contiguous()?)? // [bh, n, g*c(t), c(s)]
            .reshape((bh, n, g, c, c))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((bh * n * c, g, c))?; // [.., g, c(s)] per (chunk, t)
    let decay = ch.pair_decay(x)?; // [bh, n, c(t), c(s), dk]
    let kd = decay
        .broadcast_mul(&ch.k.unsqueeze(2)?)?
        .reshape((bh * n * c, c, dk))?;
    let intra = dots
        .matmul(&kd)? // [.., g, dk]
        .reshape((bh, n, c, g, dk))?
        .permute((0, 1, 3, 2, 4))?;

    let o = ch.unchunk(&(inter + intra)?.contiguous()?, dk)?;
    Ok((o, ch.last_state()?))
}

/// The inputs cut into chunks, the cumulative gates and the state entering each chunk.
struct Chunks {
    b: usize,
    hkv: usize,
    bh: usize,
    n: usize,
    c: usize,
    g: usize,
    t: usize,
    dk: usize,
    dv: usize,
    /// `[bh, n, g, c, dq]` (dq: whatever width the read contracts).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `B`: `[bh, n, c, dk]`, <= 0.
    cum: Tensor,
    /// `[bh, n, dk, dv]`.
    entering: Tensor,
    /// The state after the last chunk, `[bh, dk, dv]`.
    last: Tensor,
}

impl Chunks {
    fn split(x: &GlaInputs, state: &Tensor, c: usize) -> Result<Self> {
        let (b, hkv, g, t, dq) = x.q.dims5()?;
        let dk = x.k.dim(3)?;
        let dv = x.v.dim(3)?;
        let bh = b * hkv;
        let n = t.div_ceil(c);
        let pad = n * c - t;
        // Zero padding at the end is inert: k = 0 writes nothing, g = 0 does not decay, and
        // the padded outputs are cut off in `unchunk`.
        let q = pad_tokens(&x.q.reshape((bh, g, t, dq))?, 2, pad)?;
        let k = pad_tokens(&x.k.reshape((bh, t, dk))?, 1, pad)?.reshape((bh, n, c, dk))?;
        let gate = pad_tokens(&x.gate.reshape((bh, t, dk))?, 1, pad)?.reshape((bh, n, c, dk))?;
        let v = pad_tokens(&x.v.reshape((bh, t, dv))?, 1, pad)?.reshape((bh, n, c, dv))?;
        // (candle's cumsum is a matmul, which rejects the degenerate strides of a length-1 axis.)
        let cum = if c == 1 {
            gate
        } else {
            gate.cumsum(2)?.contiguous()?
        };
        let cum_last = cum.narrow(2, c - 1, 1)?; // [bh, n, 1, dk]

        // Each chunk's write into the state, decayed to the chunk's end.
        let k_to_end = k.broadcast_mul(&cum_last.broadcast_sub(&cum)?.exp()?)?;
        let writes = k_to_end.transpose(2, 3)?.contiguous()?.matmul(&v)?; // [bh, n, dk, dv]
        let chunk_decay = cum_last.exp()?.transpose(2, 3)?.contiguous()?; // [bh, n, dk, 1]

        // Sequential hand-off: the state entering each chunk.
        let mut s = state.reshape((bh, dk, dv))?;
        let mut entering = Vec::with_capacity(n);
        for j in 0..n {
            entering.push(s.clone());
            let decay = chunk_decay.narrow(1, j, 1)?.squeeze(1)?;
            let write = writes.narrow(1, j, 1)?.squeeze(1)?;
            s = (s.broadcast_mul(&decay)? + write)?;
        }
        let entering = Tensor::stack(&entering, 1)?;
        // q grouped by chunk: [bh, n, g, c, dq].
        let q = q.reshape((bh, g, n, c, dq))?.permute((0, 2, 1, 3, 4))?;
        Ok(Self {
            b,
            hkv,
            bh,
            n,
            c,
            g,
            t,
            dk,
            dv,
            q,
            k,
            v,
            cum,
            entering,
            last: s,
        })
    }

    /// `e^{B_t - B_s}` for `s <= t`, else 0: `[bh, n, c(t), c(s), dk]`.
    fn pair_decay(&self, x: &GlaInputs) -> Result<Tensor> {
        let diff = self
            .cum
            .unsqueeze(3)?
            .broadcast_sub(&self.cum.unsqueeze(2)?)?;
        let causal = causal_mask(self.c, x.q.device())?; // [c, c, 1]
                                                         // Clamp before exp: above the diagonal the difference is positive and could overflow.
        Ok(diff.minimum(0.0)?.exp()?.broadcast_mul(&causal)?)
    }

    /// `[bh, n, g, c, w]` (or `[bh, n, g*c, w]`) back to `[b, hkv, g, t, w]`.
    fn unchunk(&self, o: &Tensor, w: usize) -> Result<Tensor> {
        let (bh, n, g, c) = (self.bh, self.n, self.g, self.c);
        Ok(o.reshape((bh, n, g, c, w))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((bh, g, n * c, w))?
            .narrow(2, 0, self.t)?
            .reshape((self.b, self.hkv, g, self.t, w))?
            .contiguous()?)
    }

    fn last_state(&self) -> Result<Tensor> {
        Ok(self.last.reshape((self.b, self.hkv, self.dk, self.dv))?)
    }
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
