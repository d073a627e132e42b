//! LoRA on a loaded model: attaching fresh trainable adapters, applying a saved one,
//! reading them back under PEFT names, and merging them into the weights.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::Model;
use crate::layers::{Dims, LoraAdapter};
use crate::lora::{self, LoraConfig};
use crate::{Error, Result};

impl Model {
    /// Attaches fresh trainable LoRA adapters (B = 0, so the model is unchanged) to every
    /// layer's `cfg.targets` and returns their variables under PEFT names.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Var)>> {
        cfg.validate()?;
        let mut rng = crate::rng::SplitMix(seed);
        let mut vars = Vec::new();
        let device = self.device.clone();
        for i in 0..self.layers.len() {
            for t in &cfg.targets {
                let lin = self.layers[i].projection_mut(t).expect("validated target");
                let dims = lin.dims();
                let (a, b) = lora::init_pair(&mut rng, cfg.rank, dims.input, dims.output, &device)?;
                lin.set_lora(Some(LoraAdapter {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: cfg.scale(),
                }));
                vars.push((lora::peft_name(i, t, "A"), a));
                vars.push((lora::peft_name(i, t, "B"), b));
            }
        }
        Ok(vars)
    }

    /// Applies an adapter read with [`lora::load_adapter`] (weights cast to f32 on the
    /// model's device). Every adapter tensor must be used and fit its projection.
    pub fn apply_lora(
        &mut self,
        cfg: &LoraConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        cfg.validate()?;
        let mut used = 0;
        for i in 0..self.layers.len() {
            for t in &cfg.targets {
                let (na, nb) = (lora::peft_name(i, t, "A"), lora::peft_name(i, t, "B"));
                let (Some(a), Some(b)) = (tensors.get(&na), tensors.get(&nb)) else {
                    continue;
                };
                let lin = self.layers[i].projection_mut(t).expect("validated target");
                let Dims {
                    input: in_dim,
                    output: out_dim,
                } = lin.dims();
                if a.dims() != [cfg.rank, in_dim] || b.dims() != [out_dim, cfg.rank] {
                    return Err(Error::tensor(&na, format!(
                        "adapter shapes {:?} / {:?} do not fit a [{out_dim}, {in_dim}] projection with rank {}",
                        a.dims(), b.dims(), cfg.rank
                    )));
                }
                let to = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.to_dtype(DType::F32)?.to_device(&self.device)?)
                };
                let (a, b) = (to(a)?, to(b)?);
                lin.set_lora(Some(LoraAdapter {
                    a,
                    b,
                    scale: cfg.scale(),
                }));
                used += 2;
            }
        }
        if used != tensors.len() {
            return Err(Error::Invalid(format!(
                "the adapter has {} tensors but only {used} match this model's layers and targets",
                tensors.len()
            )));
        }
        Ok(())
    }

    /// The current adapters' weights under PEFT names.
    pub fn lora_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (t, _) in lora::TARGETS {
                if let Some(l) = layer.projection(t).and_then(|p| p.lora()) {
                    out.push((lora::peft_name(i, t, "A"), l.a.clone()));
                    out.push((lora::peft_name(i, t, "B"), l.b.clone()));
                }
            }
        }
        out
    }

    /// Folds every adapter into its weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for (t, _) in lora::TARGETS {
                if let Some(p) = layer.projection_mut(t) {
                    p.merge_lora()?;
                }
            }
        }
        Ok(())
    }
}
