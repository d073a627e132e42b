//! Where layers get their weights: one [`WeightSource`] hands out a checkpoint's dense
//! tensors (a candle `VarBuilder`) and its block-quantized projections (GGML's Q8_0, Q4K)
//! under the same Hugging Face names, so a layer asks for a projection by its prefix and
//! gets whichever the checkpoint stores.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::Dims;
use crate::{Error, Result};

/// The block-quantized tensors of a checkpoint by name, handed out once each to the
/// layers that use them; whatever is left afterwards is a tensor the model does not know.
#[derive(Debug, Default)]
pub struct QuantizedTensors {
    // A RefCell because the source is shared by every prefix a model's constructor walks
    // (`WeightSource::pp` clones it) and each taken tensor must leave the map.
    tensors: RefCell<HashMap<String, QTensor>>,
}

impl QuantizedTensors {
    pub fn new(tensors: HashMap<String, QTensor>) -> Self {
        Self {
            tensors: RefCell::new(tensors),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.borrow().is_empty()
    }

    pub fn len(&self) -> usize {
        self.tensors.borrow().len()
    }

    /// Removes and returns `name`, checked to have the logical shape of `dims`.
    pub fn take(&self, name: &str, dims: Dims) -> Result<Option<QTensor>> {
        let (out_dim, in_dim) = dims.weight_shape();
        let Some(t) = self.tensors.borrow_mut().remove(name) else {
            return Ok(None);
        };
        if t.shape().dims() != [out_dim, in_dim] {
            return Err(Error::tensor(
                name,
                format!(
                    "is stored quantized as {:?}, the config implies [{out_dim}, {in_dim}]",
                    t.shape().dims()
                ),
            ));
        }
        Ok(Some(t))
    }

    /// Names not taken yet, sorted.
    pub fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.borrow().keys().cloned().collect();
        names.sort();
        names
    }
}

/// A checkpoint's weights at one name prefix (`model.layers.3.self_attn`): dense tensors
/// from the `VarBuilder`, block-quantized projections from the checkpoint's blocks.
#[derive(Clone)]
pub struct WeightSource<'a> {
    vb: VarBuilder<'a>,
    quantized: Rc<QuantizedTensors>,
}

impl<'a> WeightSource<'a> {
    /// Every tensor from `vb`, the ones in `quantized` as blocks.
    pub fn new(vb: VarBuilder<'a>, quantized: QuantizedTensors) -> Self {
        Self {
            vb,
            quantized: Rc::new(quantized),
        }
    }

    /// A checkpoint with no block-quantized tensors.
    pub fn dense(vb: VarBuilder<'a>) -> Self {
        Self::new(vb, QuantizedTensors::default())
    }

    /// The source under `prefix` (`pp("layers.0")`), as `VarBuilder::pp`.
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            quantized: self.quantized.clone(),
        }
    }

    /// The dense tensor `name` under this prefix, in the model's dtype.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        Ok(self.vb.get(shape, name)?)
    }

    /// The block-quantized `name` under this prefix, if the checkpoint stores it so,
    /// checked against the shape `dims` implies. Each is handed out once.
    pub fn quantized(&self, name: &str, dims: Dims) -> Result<Option<QTensor>> {
        let full = match self.vb.prefix() {
            p if p.is_empty() => name.to_owned(),
            p => format!("{p}.{name}"),
        };
        self.quantized.take(&full, dims)
    }

    /// Block-quantized tensors nothing has taken, sorted: after a model is built, tensors
    /// that are not projections of it.
    pub fn unused_quantized(&self) -> Vec<String> {
        self.quantized.unused()
    }

    /// The dtype dense tensors are handed out in (the model's activation dtype).
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }
}
