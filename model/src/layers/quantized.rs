//! Block-quantized weights (GGML's Q8_0, Q4K) as a checkpoint holds them, handed to the
//! projections that load them.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::quantized::QTensor;

use super::Dims;
use crate::{Error, Result};

/// The block-quantized tensors of a checkpoint by name, handed out once each to the
/// layers that use them; whatever is left afterwards is a tensor the model does not know.
#[derive(Debug, Default)]
pub struct QuantizedTensors {
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
