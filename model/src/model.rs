//! The causal language model: embeddings, decoder layers (each an [`Attention`] block and a
//! SwiGLU MLP with pre-RMSNorm and residuals), final norm and LM head.
//!
//! One model type serves Llama, Mistral and Qwen2, converted (Liger) or not: they differ
//! only in config, which picks the biases, RoPE scaling, windows and each layer's mixer.
//!
//! The batched forward takes any mix of sequences, each with its own tokens and state:
//! decode steps (one token) and prefill chunks (many). Every projection and MLP runs once
//! over all tokens of the batch; only the token mixing looks at sequences one by one.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::attention::{Attention, BatchContext, Span};
use crate::config::ModelConfig;
use crate::layers::{Linear, Mlp, RmsNorm, Rope};
use crate::state::{LayerState, SequenceState, StateSpec};
use crate::{Error, Result};

/// Knobs that change how, not what, the model computes.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeOptions {
    /// Chunk length of the chunked-parallel recurrent form.
    pub chunk_size: usize,
    /// Use only ops that have a backward pass (for training; slower).
    pub differentiable: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            chunk_size: 16,
            differentiable: false,
        }
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only each sequence's last token (generation).
    Last,
    /// Every token (scoring, echo with logprobs, training).
    All,
}

/// One sequence's part of a batched step.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SequenceState,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    spec: StateSpec,
    dtype: DType,
    device: Device,
    options: RuntimeOptions,
}

impl Model {
    /// Builds the model from weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let vm = vb.pp("model");
        let embed_w = vm
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let embed = Embedding::new(embed_w.clone(), cfg.hidden_size);
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(embed_w, None)
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let vl = vm.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_norm: RmsNorm::load(
                        vl.pp("input_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    attn: Attention::load(vl.pp("self_attn"), &cfg, i)?,
                    post_norm: RmsNorm::load(
                        vl.pp("post_attention_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::load(vl.pp("mlp"), cfg.hidden_size, cfg.intermediate_size)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(vm.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let rope = Rope::new(&cfg, &device)?;
        let spec = StateSpec::new(&cfg, dtype, &device);
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            spec,
            dtype,
            device,
            options: RuntimeOptions::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn options(&self) -> RuntimeOptions {
        self.options
    }

    pub fn set_options(&mut self, options: RuntimeOptions) -> Result<()> {
        if options.chunk_size == 0 {
            return Err(Error::Invalid("chunk_size must be at least 1".into()));
        }
        self.options = options;
        Ok(())
    }

    pub fn state_spec(&self) -> &StateSpec {
        &self.spec
    }

    /// A fresh sequence state for this model.
    pub fn new_state(&self) -> Result<SequenceState> {
        self.spec.new_state()
    }

    /// Runs one sequence's tokens. Returns logits `[1, vocab]` (`Last`) or `[tokens, vocab]`
    /// (`All`), f32.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut SequenceState,
        logits: Logits,
    ) -> Result<Tensor> {
        let mut step = [SeqStep { tokens, state }];
        Ok(self
            .forward_batch(&mut step, logits)?
            .pop()
            .expect("one sequence in, one out"))
    }

    /// Feeds `tokens` in pieces of at most `chunk` tokens so memory stays bounded for long
    /// prompts. Returns the logits of the last token, `[1, vocab]`.
    pub fn prefill(
        &self,
        tokens: &[u32],
        state: &mut SequenceState,
        chunk: usize,
    ) -> Result<Tensor> {
        if tokens.is_empty() || chunk == 0 {
            return Err(Error::Invalid(
                "prefill needs tokens and a positive chunk".into(),
            ));
        }
        let mut last = None;
        for piece in tokens.chunks(chunk) {
            last = Some(self.forward(piece, state, Logits::Last)?);
        }
        Ok(last.expect("at least one chunk"))
    }

    /// One step over many sequences. Each sequence's state advances by its tokens.
    /// Returns per-sequence logits in the order given, shaped as in [`forward`](Self::forward).
    ///
    /// On error every state is left as it was before the call (a failed step never leaves a
    /// half-advanced state behind).
    pub fn forward_batch(&self, seqs: &mut [SeqStep<'_>], logits: Logits) -> Result<Vec<Tensor>> {
        // Cloning a state only bumps reference counts (tensors are replaced, never mutated).
        let backup: Vec<SequenceState> = seqs.iter().map(|s| s.state.clone()).collect();
        let out = self.forward_batch_inner(seqs, logits);
        if out.is_err() {
            for (s, b) in seqs.iter_mut().zip(backup) {
                *s.state = b;
            }
        }
        out
    }

    fn forward_batch_inner(&self, seqs: &mut [SeqStep<'_>], logits: Logits) -> Result<Vec<Tensor>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut spans = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Invalid(
                    "a sequence in the batch has no tokens".into(),
                ));
            }
            if s.state.layers.len() != self.layers.len() {
                return Err(Error::State("state belongs to another model".into()));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(Error::Invalid(format!(
                    "token id {bad} is out of range (vocabulary size {})",
                    self.cfg.vocab_size
                )));
            }
            let position = s.state.position;
            spans.push(Span {
                start: ids.len(),
                len: s.tokens.len(),
                position,
            });
            ids.extend_from_slice(s.tokens);
            positions.extend((position..position + s.tokens.len()).map(|p| p as u32));
        }
        let (cos, sin) = self.rope.cos_sin(&positions, self.dtype)?;
        let ctx = BatchContext {
            spans: &spans,
            cos,
            sin,
            chunk_size: self.options.chunk_size,
            differentiable: self.options.differentiable,
        };
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut states: Vec<&mut LayerState> =
                seqs.iter_mut().map(|s| &mut s.state.layers[l]).collect();
            let a =
                layer
                    .attn
                    .forward(&self.norm_fwd(&layer.input_norm, &x)?, &ctx, &mut states)?;
            let h = (x + a)?;
            let m = layer.mlp.forward(&self.norm_fwd(&layer.post_norm, &h)?)?;
            x = (h + m)?;
        }
        for (s, span) in seqs.iter_mut().zip(&spans) {
            s.state.position += span.len;
        }
        // Only the rows that need logits go through the (large) LM head.
        let rows = match logits {
            Logits::All => x,
            Logits::Last => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
        };
        let out = self
            .lm_head
            .forward(&self.norm_fwd(&self.norm, &rows)?)?
            .to_dtype(DType::F32)?;
        spans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(match logits {
                    Logits::All => out.narrow(0, s.start, s.len)?,
                    Logits::Last => out.narrow(0, i, 1)?,
                })
            })
            .collect()
    }

    fn norm_fwd(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        Ok(if self.options.differentiable {
            norm.forward_differentiable(x)?
        } else {
            norm.forward(x)?
        })
    }
}
