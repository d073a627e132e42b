//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use super::{Dims, Linear, WeightSource};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(w: &WeightSource, hidden: usize, intermediate: usize) -> Result<Self> {
        let (into, out_of) = (
            Dims::new(hidden, intermediate),
            Dims::new(intermediate, hidden),
        );
        Ok(Self {
            gate: Linear::load(&w.pp("gate_proj"), into, false)?,
            up: Linear::load(&w.pp("up_proj"), into, false)?,
            down: Linear::load(&w.pp("down_proj"), out_of, false)?,
        })
    }
}

impl Mlp {
    /// gate, up, down.
    pub(crate) fn projections(&self) -> [&Linear; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// The projection called `name` (`gate_proj`, `up_proj`, `down_proj`).
    pub fn projection(&self, name: &str) -> Option<&Linear> {
        match name {
            "gate_proj" => Some(&self.gate),
            "up_proj" => Some(&self.up),
            "down_proj" => Some(&self.down),
            _ => None,
        }
    }

    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match name {
            "gate_proj" => Some(&mut self.gate),
            "up_proj" => Some(&mut self.up),
            "down_proj" => Some(&mut self.down),
            _ => None,
        }
    }
}

impl Mlp {
    /// `silu(gate(x)) * up(x)` in one kernel, without the two products (`gemm::gate_up_silu`,
    /// the same values): where both weights are packed and alone and `x` is f32 rows the
    /// kernel takes.
    fn fused_gate_up(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (Some(g), Some(u)) = (self.gate.packed_alone(), self.up.packed_alone()) else {
            return Ok(None);
        };
        if x.dtype() != DType::F32 || !super::gemm::applies_to_input(x) {
            return Ok(None);
        }
        super::gemm::gate_up_silu(x, (g, u))
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(act) = self.fused_gate_up(x)? {
            return self.down.forward(&act);
        }
        let [g, u]: [Tensor; 2] = Linear::forward_many(&[&self.gate, &self.up], x)?
            .try_into()
            .expect("two projections");
        self.down.forward(&silu_mul(&g, &u)?)
    }
}

/// `silu(g) * u`: on the CPU in f32 without gradients one fused pass in eight lanes over
/// all threads (candle's `silu` is a scalar `exp` per element on one thread, then a second
/// pass multiplies: ~7% of a 512-token prefill); elsewhere candle's ops, the reference
/// `tests::fused_silu_mul_matches_candle` holds it to.
pub(crate) fn silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let fused = g.device().is_cpu()
        && g.dtype() == DType::F32
        && u.dtype() == DType::F32
        && g.shape() == u.shape()
        && g.is_contiguous()
        && u.is_contiguous()
        && !g.track_op()
        && !u.track_op();
    if fused {
        g.apply_op2_no_bwd(u, &SiluMul)
    } else {
        g.silu()? * u
    }
}

struct SiluMul;

/// Elements per parallel task: large enough to amortize scheduling.
const SILU_TASK: usize = 1 << 14;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "liger-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gs, us) else {
            candle_core::bail!("liger-silu-mul: f32 only");
        };
        let (Some((ga, gb)), Some((ua, ub))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            candle_core::bail!("liger-silu-mul: contiguous inputs only");
        };
        let (g, u) = (&g[ga..gb], &u[ua..ub]);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(SILU_TASK)
            .zip(g.par_chunks(SILU_TASK).zip(u.par_chunks(SILU_TASK)))
            .for_each(|(o, (g, u))| crate::layers::vexp::silu_mul(g, u, o));
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn fused_silu_mul_matches_candle() {
        // Seeded: the bound is relative, and the largest products are near 50.
        let mut rng = crate::rng::SplitMix(19);
        let mut draw = |scale: f32| -> Tensor {
            let v = rng.normals(37 * 1000, scale);
            Tensor::from_vec(v, (37, 1000), &Device::Cpu).unwrap()
        };
        let (g, u) = (draw(3.0), draw(1.0));
        let fused = super::silu_mul(&g, &u).unwrap().flatten_all().unwrap();
        let reference = (g.silu().unwrap() * &u).unwrap().flatten_all().unwrap();
        let (fused, reference) = (
            fused.to_vec1::<f32>().unwrap(),
            reference.to_vec1::<f32>().unwrap(),
        );
        for (a, b) in fused.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
