//! AdamW (Loshchilov & Hutter, 2019) with bias correction and decoupled weight decay, as
//! PyTorch's `torch.optim.AdamW` computes it, plus the learning-rate schedule.
//!
//! candle-nn has an AdamW, but its moment estimates are private: a run could not be stopped
//! and resumed to the same result. Here the state (first and second moments per parameter,
//! and the step count) can be written out and read back exactly, which is what `--resume`
//! relies on for bit-identical weights.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates applied so far (the `t` of bias correction).
    step: u64,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. `grads[i]` is the gradient of parameter `i` (in
    /// the order given to [`new`](Self::new)); a parameter without one is left alone,
    /// moments and decay included (as PyTorch does for parameters whose `grad` is `None`).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Training(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&slot.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&slot.m / bc1)? / denom)?;
            // Decoupled decay: p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps).
            let p = (slot.var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            slot.var.set(&(p - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments under `{name}.exp_avg` / `{name}.exp_avg_sq` (PyTorch's names).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.m.clone()),
                    (format!("{}.exp_avg_sq", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores what [`state_tensors`](Self::state_tensors) and
    /// [`step_count`](Self::step_count) returned.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::Training(format!("optimizer state lacks `{key}`")))?;
                if t.dims() != s.var.dims() {
                    return Err(Error::Training(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(s.var.device())?)
            };
            s.m = get("exp_avg")?;
            s.v = get("exp_avg_sq")?;
        }
        self.step = step;
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Clipping keeps one unlucky batch from undoing many good steps.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Err(Error::Training(
            "the gradient is not finite (NaN or infinity); lower --lr".into(),
        ));
    }
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Linear warm-up over the first `warmup` steps, then cosine decay to `floor` times the
/// peak at the last step. A pure function of the step, so resumed runs follow it exactly.
pub fn lr_at(peak: f64, step: usize, total: usize, warmup: usize, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(&[("p".into(), p.clone())], AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.1).unwrap();
        // First step: m^ = g, v^ = g^2, so the update is lr * sign(g) (up to eps).
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        let want = [
            1.0 * (1.0 - 0.1 * 0.01) - 0.1,
            -2.0 * (1.0 - 0.1 * 0.01) - 0.1,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // State round trip.
        let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut other = AdamW::new(&[("p".into(), p.clone())], AdamWConfig::default()).unwrap();
        other.load_state(&state, opt.step_count()).unwrap();
        assert_eq!(other.step_count(), 1);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(1.0, 0, 100, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, 9, 100, 10, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, 100, 100, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(1.0, 50, 100, 10, 0.1) < 1.0);
    }
}
