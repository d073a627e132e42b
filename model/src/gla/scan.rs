//! The recurrence over a whole span on the host (CPU, f32, no gradients): prefill.
//!
//! The chunked form ([`super::chunked`]) turns a span into matmuls, which is what a GPU
//! wants; on the CPU its chunks of 16 tokens are small candle ops (pairwise decays, tiny
//! matmuls), and their overhead made the recurrent branch a quarter of a 4,096-token
//! prefill. Here the recurrence itself runs token by token on plain slices, split by KV head
//! and by blocks of value columns (a state's columns evolve independently), each block's
//! state staying in L1 for the whole span. It is the definition in f32, so it equals
//! [`super::recurrent`] up to summation order; `tests/gla_forms.rs` holds it to the
//! chunked and recurrent forms.

use candle_core::Tensor;
use rayon::prelude::*;

use super::GlaInputs;
use crate::layers::host::{contiguous, f32_slices};
use crate::layers::vexp;
use crate::Result;

/// Value columns per task: a block's state (`dk x 16` f32) stays in L1.
const COLUMNS: usize = 16;

/// Whether [`scan`] can run these inputs: CPU, f32, no gradient to track.
pub fn applies(x: &GlaInputs, state: &Tensor) -> bool {
    super::fused::applies(&[&x.q, &x.k, &x.gate, &x.v, state])
}

/// Shapes as in [`super::recurrent`]: returns `(o: [b, hkv, g, t, dv], new_state)`.
pub fn scan(x: &GlaInputs, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, hkv, g, t, dk) = x.q.dims5()?;
    let dv = x.v.dim(3)?;
    let owned = contiguous([&x.q, &x.k, &x.gate, &x.v, state])?;
    let guards = owned.each_ref().map(|t| t.storage_and_layout());
    let [q, k, gate, v, s] = f32_slices(&guards)?;
    let heads = b * hkv;
    let cw = if dv % COLUMNS == 0 { COLUMNS } else { dv };
    let blocks = dv / cw;
    // Each task: one KV head's columns c0..c0 + cw; its state block and outputs.
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (h, c0) = (task / blocks, (task % blocks) * cw);
            let mut st = vec![0f32; dk * cw];
            for i in 0..dk {
                let at = (h * dk + i) * dv + c0;
                st[i * cw..(i + 1) * cw].copy_from_slice(&s[at..at + cw]);
            }
            let mut decay = vec![0f32; t * dk];
            vexp::exp_shifted(&gate[h * t * dk..(h + 1) * t * dk], 0.0, &mut decay);
            let mut out = vec![0f32; g * t * cw];
            let block = Block {
                q: &q[h * g * t * dk..(h + 1) * g * t * dk],
                k: &k[h * t * dk..(h + 1) * t * dk],
                v: &v[h * t * dv..(h + 1) * t * dv],
                decay: &decay,
                shape: (g, t, dk, dv),
                columns: c0..c0 + cw,
            };
            block.run(&mut st, &mut out);
            (st, out)
        })
        .collect();
    let mut new_state = vec![0f32; heads * dk * dv];
    let mut o = vec![0f32; heads * g * t * dv];
    for (task, (st, out)) in parts.into_iter().enumerate() {
        let (h, c0) = (task / blocks, (task % blocks) * cw);
        for i in 0..dk {
            let at = (h * dk + i) * dv + c0;
            new_state[at..at + cw].copy_from_slice(&st[i * cw..(i + 1) * cw]);
        }
        for row in 0..g * t {
            let at = (h * g * t + row) * dv + c0;
            o[at..at + cw].copy_from_slice(&out[row * cw..(row + 1) * cw]);
        }
    }
    let dev = state.device();
    Ok((
        Tensor::from_vec(o, (b, hkv, g, t, dv), dev)?,
        Tensor::from_vec(new_state, (b, hkv, dk, dv), dev)?,
    ))
}

/// One task's inputs: a KV head's `q: [g, t, dk]`, `k: [t, dk]`, `v: [t, dv]`, the decays
/// `exp(gate): [t, dk]`, and the value columns it owns.
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    decay: &'a [f32],
    shape: (usize, usize, usize, usize),
    columns: std::ops::Range<usize>,
}

impl Block<'_> {
    /// Runs the span over the state block `st: [dk, cw]`, writing `out: [g, t, cw]`.
    fn run(&self, st: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let (g, ..) = self.shape;
                // SAFETY: the features were just detected; the kernels assert their bounds.
                unsafe {
                    match (self.columns.len(), g) {
                        (COLUMNS, 1) => avx2::block16::<1>(self, st, out),
                        (COLUMNS, 2) => avx2::block16::<2>(self, st, out),
                        (COLUMNS, 3) => avx2::block16::<3>(self, st, out),
                        (COLUMNS, 4) => avx2::block16::<4>(self, st, out),
                        (COLUMNS, 5) => avx2::block16::<5>(self, st, out),
                        _ => self.run_avx2(st, out),
                    }
                }
                return;
            }
        }
        self.run_portable(st, out);
    }

    /// The same code compiled for AVX2: the state rows updated eight lanes at a time
    /// (the default x86-64 target has only SSE2's four).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, st: &mut [f32], out: &mut [f32]) {
        self.run_portable(st, out);
    }

    #[inline(always)]
    fn run_portable(&self, st: &mut [f32], out: &mut [f32]) {
        let (g, t, dk, dv) = self.shape;
        let (c0, cw) = (self.columns.start, self.columns.len());
        for step in 0..t {
            let kt = &self.k[step * dk..(step + 1) * dk];
            let vt = &self.v[step * dv + c0..step * dv + c0 + cw];
            let dt = &self.decay[step * dk..(step + 1) * dk];
            for i in 0..dk {
                let row = &mut st[i * cw..(i + 1) * cw];
                let (a, ki) = (dt[i], kt[i]);
                for (r, &vj) in row.iter_mut().zip(vt) {
                    *r = *r * a + ki * vj;
                }
                for gq in 0..g {
                    let qi = self.q[(gq * t + step) * dk + i];
                    let o = &mut out[(gq * t + step) * cw..(gq * t + step + 1) * cw];
                    for (acc, &r) in o.iter_mut().zip(row.iter()) {
                        *acc += qi * r;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Block, COLUMNS};

    /// [`Block::run_portable`] for a block of 16 columns and `G` readers: each step walks the
    /// state's rows once, updating a row in two registers and adding it, scaled, into the
    /// `G` readers' outputs, which stay in registers for the whole step (`2 G + 4` of the 16).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block16<const G: usize>(b: &Block, st: &mut [f32], out: &mut [f32]) {
        let (g, t, dk, dv) = b.shape;
        let c0 = b.columns.start;
        assert!(g == G && b.columns.len() == COLUMNS && c0 + COLUMNS <= dv);
        assert!(st.len() == dk * COLUMNS && out.len() == G * t * COLUMNS);
        assert!(b.q.len() >= G * t * dk && b.k.len() >= t * dk && b.decay.len() >= t * dk);
        assert!(b.v.len() >= t * dv);
        let (sp, op) = (st.as_mut_ptr(), out.as_mut_ptr());
        for step in 0..t {
            let vp = b.v.as_ptr().add(step * dv + c0);
            let (v0, v1) = (_mm256_loadu_ps(vp), _mm256_loadu_ps(vp.add(8)));
            let (kp, dp) = (b.k.as_ptr().add(step * dk), b.decay.as_ptr().add(step * dk));
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for i in 0..dk {
                let a = _mm256_broadcast_ss(&*dp.add(i));
                let ki = _mm256_broadcast_ss(&*kp.add(i));
                let row = sp.add(i * COLUMNS);
                // row = row * a + k_i v, in place.
                let r0 = _mm256_fmadd_ps(_mm256_loadu_ps(row), a, _mm256_mul_ps(ki, v0));
                let r1 = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8)), a, _mm256_mul_ps(ki, v1));
                _mm256_storeu_ps(row, r0);
                _mm256_storeu_ps(row.add(8), r1);
                for (gq, acc) in acc.iter_mut().enumerate() {
                    let qi = _mm256_broadcast_ss(&*b.q.as_ptr().add((gq * t + step) * dk + i));
                    acc[0] = _mm256_fmadd_ps(qi, r0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(qi, r1, acc[1]);
                }
            }
            for (gq, acc) in acc.iter().enumerate() {
                let o = op.add((gq * t + step) * COLUMNS);
                _mm256_storeu_ps(o, acc[0]);
                _mm256_storeu_ps(o.add(8), acc[1]);
            }
        }
    }
}
