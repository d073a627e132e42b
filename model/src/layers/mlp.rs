//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::Linear;
use crate::weights::QuantizedTensors;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        quantized: &QuantizedTensors,
    ) -> Result<Self> {
        let q = quantized;
        Ok(Self {
            gate: Linear::load(vb.pp("gate_proj"), (hidden, intermediate), false, q)?,
            up: Linear::load(vb.pp("up_proj"), (hidden, intermediate), false, q)?,
            down: Linear::load(vb.pp("down_proj"), (intermediate, hidden), false, q)?,
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

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}
