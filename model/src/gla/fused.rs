//! The GLA decode step fused into one pass over each state (CPU, f32).
//!
//! [`super::step_reference`] spends five tensor ops per layer and step (decay, outer
//! product, scale, add, a batched matmul whose per-head gemm calls are tiny), each
//! allocating a state-sized tensor. Here, per sequence and KV head, every state row is
//! read once, decayed, written with `k_i v`, stored, and immediately multiplied into the
//! group's query outputs while it is in cache. Held equal to the reference by
//! `tests::fused_step_matches_the_reference`.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::layers::host::{contiguous, f32_slices};
use crate::Result;

/// Whether [`step`] can run these inputs: CPU, f32, no gradient to track.
pub fn applies(tensors: &[&Tensor]) -> bool {
    crate::layers::host::applies(tensors)
}

/// Shapes as in [`super::step`]: `q: [b, hkv, g, dk]`, `k`, `gate`: `[b, hkv, dk]`,
/// `v: [b, hkv, dv]`, `state: [b, hkv, dk, dv]`.
pub fn step(
    q: &Tensor,
    k: &Tensor,
    gate: &Tensor,
    v: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, hkv, g, dk) = q.dims4()?;
    let dv = v.dim(2)?;
    let owned = contiguous([q, k, gate, v, state])?;
    let guards = owned.each_ref().map(|t| t.storage_and_layout());
    let [q, k, gate, v, s] = f32_slices(&guards)?;
    let heads = b * hkv;
    let mut new_state = vec![0f32; heads * dk * dv];
    let mut out = vec![0f32; heads * g * dv];
    new_state
        .par_chunks_mut(dk * dv)
        .zip(out.par_chunks_mut(g * dv))
        .enumerate()
        .for_each(|(h, (s_new, o))| {
            let s_old = &s[h * dk * dv..(h + 1) * dk * dv];
            let qh = &q[h * g * dk..(h + 1) * g * dk];
            let vh = &v[h * dv..(h + 1) * dv];
            for i in 0..dk {
                let decay = gate[h * dk + i].exp();
                let ki = k[h * dk + i];
                let row_old = &s_old[i * dv..(i + 1) * dv];
                let row = &mut s_new[i * dv..(i + 1) * dv];
                for ((r, &old), &vj) in row.iter_mut().zip(row_old).zip(vh) {
                    *r = old * decay + ki * vj;
                }
                for (gg, oq) in o.chunks_mut(dv).enumerate() {
                    let qi = qh[gg * dk + i];
                    for (acc, &r) in oq.iter_mut().zip(row.iter()) {
                        *acc += qi * r;
                    }
                }
            }
        });
    let dev = state.device();
    Ok((
        Tensor::from_vec(out, (b, hkv, g, dv), dev)?,
        Tensor::from_vec(new_state, (b, hkv, dk, dv), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;
    use candle_core::Device;

    fn randn(rng: &mut SplitMix, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v = rng.normals(n, scale);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_step_matches_the_reference() {
        let mut rng = SplitMix(4);
        // GLA's square state and GSA's value memory (dk = slots != dv).
        for (b, hkv, g, dk, dv) in [(3, 2, 3, 8, 8), (2, 3, 1, 4, 8), (1, 1, 2, 5, 3)] {
            let q = randn(&mut rng, &[b, hkv, g, dk], 1.0);
            let k = randn(&mut rng, &[b, hkv, dk], 1.0);
            let gate = randn(&mut rng, &[b, hkv, dk], 1.0)
                .abs()
                .unwrap()
                .neg()
                .unwrap();
            let v = randn(&mut rng, &[b, hkv, dv], 1.0);
            let s = randn(&mut rng, &[b, hkv, dk, dv], 1.0);
            let (o1, s1) = step(&q, &k, &gate, &v, &s).unwrap();
            let (o2, s2) = super::super::step_reference(&q, &k, &gate, &v, &s).unwrap();
            let diff = crate::testing::max_abs_diff;
            assert!(diff(&o1, &o2) < 1e-5 && diff(&s1, &s2) < 1e-5);
        }
    }
}
