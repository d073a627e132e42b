//! Proving, before anything is written, that the converted folder will load.
//!
//! Rather than keeping a second list of the tensors each architecture needs (which would
//! drift from the runtime), the check builds the real [`Model`] from the config through a
//! `VarBuilder` whose backend only knows the weights' names and shapes. Every tensor the
//! model asks for is compared with what the source holds, and a mismatch is reported with
//! the tensor's name and both shapes. The backend hands out broadcast views of one zero, so
//! the check allocates nothing proportional to the model's size.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use liger_model::{Model, ModelConfig};

use crate::tensors::TensorInfo;
use crate::{Error, Result};

/// What the check found beyond "everything needed is there".
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Tensors in the weights that the model does not use (they are still written).
    pub unused: Vec<String>,
}

struct ShapeProbe<'a> {
    infos: HashMap<&'a str, &'a TensorInfo>,
    requested: Mutex<BTreeSet<String>>,
    failure: Mutex<Option<String>>,
}

impl ShapeProbe<'_> {
    fn fail(&self, msg: String) -> candle_core::Error {
        let mut f = self.failure.lock().expect("not poisoned");
        if f.is_none() {
            *f = Some(msg.clone());
        }
        candle_core::Error::Msg(msg)
    }
}

fn dims(d: &[usize]) -> String {
    format!("{d:?}")
}

impl SimpleBackend for ShapeProbe<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned());
        let Some(info) = self.infos.get(name) else {
            return Err(self.fail(format!(
                "tensor `{name}` is missing from the weights (the config needs shape {})",
                dims(s.dims())
            )));
        };
        if info.shape != s.dims() {
            return Err(self.fail(format!(
                "tensor `{name}` has shape {} in the weights but the config needs {}",
                dims(&info.shape),
                dims(s.dims())
            )));
        }
        if !info.is_float() {
            return Err(self.fail(format!(
                "tensor `{name}` is stored as {:?}; model weights must be floating point",
                info.dtype
            )));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned());
        match self.infos.get(name) {
            Some(info) => Tensor::zeros((), dtype, dev)?.broadcast_as(info.shape.as_slice()),
            None => Err(self.fail(format!("tensor `{name}` is missing from the weights"))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }
}

/// Checks that `cfg` and the weights described by `infos` make a loadable model.
pub fn check_weights(cfg: &ModelConfig, infos: &[TensorInfo]) -> Result<CheckReport> {
    let probe = ShapeProbe {
        infos: infos.iter().map(|i| (i.name.as_str(), i)).collect(),
        requested: Mutex::new(BTreeSet::new()),
        failure: Mutex::new(None),
    };
    let built = {
        let vb = VarBuilder::from_backend(Box::new(&probe), DType::F32, Device::Cpu);
        Model::new(cfg.clone(), vb)
    };
    if let Err(e) = built {
        return Err(match probe.failure.lock().expect("not poisoned").take() {
            Some(msg) => Error::Mismatch(msg),
            None => e.into(),
        });
    }
    let requested = probe.requested.into_inner().expect("not poisoned");
    let unused = infos
        .iter()
        .filter(|i| !requested.contains(&i.name))
        .map(|i| i.name.clone())
        .collect();
    Ok(CheckReport { unused })
}

// `VarBuilder::from_backend` takes a boxed backend; borrowing the probe keeps it readable
// after the model is built.
impl SimpleBackend for &ShapeProbe<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        (**self).get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        (**self).get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (**self).contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liger_model::testing::{Family, TinyCheckpoint, ALL_FAMILIES};
    use liger_model::LigerConfig;

    fn infos(ck: &TinyCheckpoint) -> Vec<TensorInfo> {
        ck.tensors
            .iter()
            .map(|(n, t)| TensorInfo {
                name: n.clone(),
                shape: t.dims().to_vec(),
                dtype: t.dtype().into(),
            })
            .collect()
    }

    #[test]
    fn tiny_checkpoints_pass() {
        for f in ALL_FAMILIES {
            let ck = TinyCheckpoint::new(f, 1)
                .unwrap()
                .with_liger(&LigerConfig::default());
            let r = check_weights(&ck.model_config().unwrap(), &infos(&ck)).unwrap();
            assert!(r.unused.is_empty(), "{f:?}: {:?}", r.unused);
        }
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let mut ck = TinyCheckpoint::new(Family::Qwen2, 1).unwrap();
        ck.config["intermediate_size"] = 40.into();
        let e = check_weights(&ck.model_config().unwrap(), &infos(&ck))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[48, 32]"),
            "{e}"
        );

        let mut ck = TinyCheckpoint::new(Family::Qwen2, 1).unwrap();
        ck.tensors.remove("model.layers.2.self_attn.k_proj.bias");
        ck.tensors.insert(
            "extra".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = check_weights(&ck.model_config().unwrap(), &infos(&ck))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`model.layers.2.self_attn.k_proj.bias` is missing"),
            "{e}"
        );
    }
}
