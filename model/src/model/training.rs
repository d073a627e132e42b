//! Views of the forward pass that recovery's training needs: the residual stream entering
//! every layer (the teacher's activations) and one layer's attention output on given
//! inputs (the student's, for attention transfer).

use candle_core::{Module, Tensor};

use super::Model;
use crate::state::{LayerState, SequenceState};
use crate::{Error, Result};

impl Model {
    /// The residual stream entering every layer (and, last, the final norm) for fresh
    /// sequences: `num_layers + 1` tensors of `[total tokens, hidden]`. Attention transfer
    /// feeds these teacher activations to each student layer.
    pub fn layer_inputs(&self, seqs: &[&[u32]]) -> Result<Vec<Tensor>> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let (spans, positions) = Self::fresh_spans(&lens);
        let ctx = self.batch_context(&spans, &positions)?;
        let ids: Vec<u32> = seqs.concat();
        let x = self
            .embed
            .forward(&Tensor::new(ids.as_slice(), &self.device)?)?;
        let mut states: Vec<SequenceState> = seqs
            .iter()
            .map(|_| self.new_state())
            .collect::<Result<_>>()?;
        let mut refs: Vec<&mut SequenceState> = states.iter_mut().collect();
        let mut out = Vec::with_capacity(self.layers.len() + 1);
        let x = self.decoder_layers(x, &ctx, &mut refs, |x| out.push(x.clone()))?;
        out.push(x);
        Ok(out)
    }

    /// Layer `layer`'s attention output before `o_proj` (`[tokens, heads * head_dim]`, f32)
    /// for the residual stream `residual` of fresh sequences of lengths `lens`.
    pub fn attention_output(
        &self,
        layer: usize,
        residual: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Invalid(format!("layer {layer} does not exist")))?;
        let (spans, positions) = Self::fresh_spans(lens);
        let ctx = self.batch_context(&spans, &positions)?;
        let mut states: Vec<LayerState> = lens
            .iter()
            .map(|_| self.spec.new_layer_state(layer))
            .collect::<Result<_>>()?;
        let mut refs: Vec<&mut LayerState> = states.iter_mut().collect();
        l.attn
            .mix(&self.norm_fwd(&l.input_norm, residual)?, &ctx, &mut refs)
    }
}
