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
use crate::decode;
use crate::layers::{Dims, Linear, Mlp, RmsNorm, Rope, WeightSource};
use crate::lora;
use crate::state::{Backup, LayerState, SeqStep, SequenceState, StateSpec};
use crate::{Error, Result};

mod adapters;
mod export;
mod training;

/// Knobs that change how, not what, the model computes.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeOptions {
    /// Chunk length of the chunked-parallel recurrent form.
    pub chunk_size: usize,
    /// Queries a layer with a global cache attends at once: a longer span is read as
    /// consecutive pieces of this many tokens (the same result as prefill chunks of that
    /// length). Each query sees only its window, itself and the cache, so shorter pieces
    /// score fewer masked columns per query (a 512-token piece after 240 window rows and 384
    /// places scores 1,136 columns a query, a 256-token one 880), while each piece pays for
    /// its own cache bookkeeping: 256 read 4,096 tokens fastest of 64, 128, 256 and 512 on
    /// SmolLM2 (`docs/results/prefill-window-w256-g64.md`, measured on the candle path).
    pub global_block: usize,
    /// Use only ops that have a backward pass (for training; slower).
    pub differentiable: bool,
    /// Run decode steps (one token per sequence, up to 32 sequences) through the fused CPU
    /// path when the model allows it (f32 weights, no GSA, no unmerged adapter). Off, they
    /// take the general path, which is the fused one's reference.
    pub fast_decode: bool,
    /// Read prefill pieces of layers with a global cache with the host kernel
    /// ([`crate::global::Band`]: each query scores only the columns it sees) when on the CPU
    /// without gradients. Off, they take the candle path, which is its reference.
    pub host_attention: bool,
    /// Fused decode steps whose sequences all want only their argmax
    /// ([`SeqStep::argmax_only`]) read the LM head's Q8_0 screen and compute in f32 only
    /// the logits that can be the largest ([`crate::layers::screen`]: the same picks, a
    /// quarter of the head's bytes). Off, they read the f32 head in full: the reference.
    pub head_screen: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            chunk_size: 16,
            global_block: 256,
            differentiable: false,
            fast_decode: true,
            host_attention: true,
            head_screen: true,
        }
    }
}

/// Most tokens one fused CPU decode step takes (decodes and short spans, `decode` module):
/// a batch with more takes several, each reading every weight again.
pub const FUSED_STEP_TOKENS: usize = decode::MAX_BATCH;

/// Most tokens of one sequence a fused CPU decode step takes (a decode token and its
/// speculative draft); longer spans are read on the general path.
pub const FUSED_SPAN_TOKENS: usize = decode::SHORT_SPAN;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only each sequence's last token (generation).
    Last,
    /// Every token (scoring, echo with logprobs, training).
    All,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn projection(&self, name: &str) -> Option<&Linear> {
        match lora::block_of(name)? {
            "mlp" => self.mlp.projection(name),
            _ => self.attn.projection(name),
        }
    }

    fn projection_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match lora::block_of(name)? {
            "mlp" => self.mlp.projection_mut(name),
            _ => self.attn.projection_mut(name),
        }
    }
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
    /// Builds the model from dense weights under Hugging Face names
    /// (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, WeightSource::dense(vb))
    }

    /// [`Model::new`] for any checkpoint: block-quantized projections where `w` has them,
    /// dense tensors otherwise. Every quantized tensor must be used.
    pub fn load(cfg: ModelConfig, w: WeightSource) -> Result<Self> {
        let (dtype, device) = (w.dtype(), w.device().clone());
        let wm = w.pp("model");
        let embed_w = wm
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let embed = Embedding::new(embed_w.clone(), cfg.hidden_size);
        let head_dims = Dims::new(cfg.hidden_size, cfg.vocab_size);
        let head = w.pp("lm_head");
        let lm_head = match head.quantized("weight", head_dims)? {
            // A quantized checkpoint of a tied model stores the head's blocks apart: the
            // embedding lookup stays dense, the head's product reads 4-8 bit weights.
            Some(blocks) => Linear::from_quantized(blocks, dtype)?,
            None if cfg.tie_word_embeddings => Linear::from_weights(embed_w, None),
            None => Linear::load(&head, head_dims, false)?,
        };
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let wl = wm.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_norm: RmsNorm::load(&wl.pp("input_layernorm"), hidden, eps)?,
                    attn: Attention::load(&wl.pp("self_attn"), &cfg, i)?,
                    post_norm: RmsNorm::load(&wl.pp("post_attention_layernorm"), hidden, eps)?,
                    mlp: Mlp::load(&wl.pp("mlp"), hidden, cfg.intermediate_size)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(&wm.pp("norm"), hidden, eps)?;
        if let Some(name) = w.unused_quantized().first() {
            return Err(Error::tensor(
                name,
                "is stored quantized but is not a projection of this model",
            ));
        }
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
        if options.chunk_size == 0 || options.global_block == 0 {
            return Err(Error::Invalid(
                "chunk_size and global_block must be at least 1".into(),
            ));
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
        let mut step = [SeqStep {
            tokens,
            state,
            argmax_only: false,
        }];
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
        // A backup only bumps reference counts (tensors are replaced, never mutated, but
        // for the caches' spare rows, which the backup does not see, and the global caches'
        // kept rows, which are saved for it when a change writes over them; the global
        // caches' scores and positions log what undoes each change instead of being copied).
        let backup = self.take_backups(seqs);
        let out = self.forward_batch_inner(seqs, logits);
        if out.is_err() {
            for (s, b) in seqs.iter_mut().zip(backup) {
                b.restore(s.state)?;
            }
        } else {
            self.drop_backups(backup);
        }
        out
    }

    /// Every sequence's backup before a step (on the CPU, taken on the pool: ~0.4 ms at
    /// 32 sequences, on one thread while the others waited).
    fn take_backups(&self, seqs: &mut [SeqStep<'_>]) -> Vec<Backup> {
        use rayon::prelude::*;
        if self.device.is_cpu() && seqs.len() > 1 {
            self.on_pool(|| seqs.par_iter_mut().map(|s| s.state.backup()).collect())
        } else {
            seqs.iter_mut().map(|s| s.state.backup()).collect()
        }
    }

    /// Lets a step's backups go. What the step replaced is freed here (old recurrent
    /// memories, the window scores the logs kept, the rows' journals): in liger-serve at
    /// 32 sequences, ~3 ms of frees a step on the engine's thread while the pool's
    /// threads waited. On the CPU they are freed on the pool, a share per thread.
    fn drop_backups(&self, backup: Vec<Backup>) {
        use rayon::prelude::*;
        if self.device.is_cpu() && backup.len() > 1 {
            self.on_pool(|| backup.into_par_iter().for_each(drop));
        }
    }

    fn forward_batch_inner(&self, seqs: &mut [SeqStep<'_>], logits: Logits) -> Result<Vec<Tensor>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let (spans, positions) = self.spans_of(seqs)?;
        if self.options.fast_decode && !self.options.differentiable && self.device.is_cpu() {
            let greedy = seqs.iter().any(|s| s.argmax_only);
            if let Some(refs) = self.decode_refs(greedy)? {
                if let Some(out) = decode::step(&refs, seqs, logits)? {
                    for s in seqs.iter_mut() {
                        s.state.position += s.tokens.len();
                    }
                    return Ok(out);
                }
                if let Some(out) = self.split_decodes(&refs, seqs, logits)? {
                    return Ok(out);
                }
            }
        }
        let x = self.on_pool(|| self.run_layers(seqs, &spans, &positions))?;
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

    /// Runs `f` on a thread of rayon's pool when called from outside it, on the CPU.
    ///
    /// The general path is a chain of ops, ~20 a layer, most of them parallel. Called from
    /// outside the pool, each parallel op hands its work over and puts the caller to sleep
    /// until the pool is done (two futex round trips and two context switches an op), and the
    /// serial ops between them run on the caller while the pool's threads sleep. From a pool
    /// thread, a parallel op splits its work with the thread it runs on, which keeps running.
    /// Measured (decode bench, 2 threads, alternating): a 128-token prefill 163 / 160 / 174 ->
    /// 148 / 163 / 156 ms, 512 tokens 707 / 727 / 718 -> 663 / 700 / 666 ms, a 128-token chunk
    /// beside 8 decodes 211 / 209 -> 192 / 197 ms. The fused decode step is not run this way:
    /// it wakes the pool's threads once per token itself (`decode::step`).
    fn on_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    /// A batch the fused decode step does not take whole: one that mixes decode steps
    /// (a token, or a short speculative span) with prompt chunks (a server step while
    /// prompts are read), or has more tokens than one fused step holds. The decode steps
    /// take fused steps, up to [`decode::MAX_BATCH`] tokens at a time, and the rest the
    /// general path, instead of all taking the general path, where each one-token sequence
    /// is a piece of its own through every layer's attention (measured in liger-serve: nine
    /// decodes beside a 32-token chunk took ~500 ms as one general batch, where a fused
    /// step of nine takes ~65 ms). `None`, touching nothing, when there is nothing to split
    /// or the fused step does not apply. Outputs in batch order.
    fn split_decodes(
        &self,
        refs: &decode::ModelRefs,
        seqs: &mut [SeqStep<'_>],
        logits: Logits,
    ) -> Result<Option<Vec<Tensor>>> {
        let short: Vec<bool> = seqs.iter().map(|s| decode::is_short(s.tokens)).collect();
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if !short.contains(&true) || (short.iter().all(|&o| o) && rows <= decode::MAX_BATCH) {
            return Ok(None);
        }
        let mut groups: Vec<(Vec<usize>, Vec<SeqStep<'_>>)> = Vec::new();
        let mut rest: (Vec<usize>, Vec<SeqStep<'_>>) = (Vec::new(), Vec::new());
        for (i, s) in seqs.iter_mut().enumerate() {
            let part = SeqStep {
                tokens: s.tokens,
                state: &mut *s.state,
                argmax_only: s.argmax_only,
            };
            if !short[i] {
                rest.0.push(i);
                rest.1.push(part);
                continue;
            }
            let fits = |g: &[SeqStep<'_>]| {
                g.iter().map(|s| s.tokens.len()).sum::<usize>() + part.tokens.len()
                    <= decode::MAX_BATCH
            };
            match groups.last_mut() {
                Some((idx, g)) if fits(g) => {
                    idx.push(i);
                    g.push(part);
                }
                _ => groups.push((vec![i], vec![part])),
            }
        }
        let mut outs: Vec<Option<Tensor>> = vec![None; short.len()];
        for (k, (idx, mut group)) in groups.into_iter().enumerate() {
            let Some(stepped) = decode::step(refs, &mut group, logits)? else {
                if k == 0 {
                    // Not fusable; nothing was touched yet.
                    return Ok(None);
                }
                // (Groups of one model are alike, so this is not expected; if it happens,
                // the general path reads them with the chunks.)
                rest.0.extend(idx);
                rest.1.extend(group);
                continue;
            };
            for s in group.iter_mut() {
                s.state.position += s.tokens.len();
            }
            for (&i, o) in idx.iter().zip(stepped) {
                outs[i] = Some(o);
            }
        }
        if !rest.1.is_empty() {
            let chunks = self.forward_batch_inner(&mut rest.1, logits)?;
            for (&i, o) in rest.0.iter().zip(chunks) {
                outs[i] = Some(o);
            }
        }
        Ok(Some(
            outs.into_iter()
                .map(|o| o.expect("one output per sequence"))
                .collect(),
        ))
    }

    /// The final residual stream (before the last norm and the LM head), `[tokens, hidden]`
    /// for every token of `seqs` in batch order, each continuing from its state (which
    /// advances). Training with state passing runs a long sequence through this in pieces,
    /// so its loss can be taken piece by piece (see [`SequenceState::detach`]).
    pub fn final_residual(&self, seqs: &mut [SeqStep<'_>]) -> Result<Tensor> {
        if seqs.is_empty() {
            return Err(Error::Invalid("no sequences to run".into()));
        }
        let (spans, positions) = self.spans_of(seqs)?;
        let backup: Vec<SequenceState> = seqs.iter().map(|s| s.state.clone()).collect();
        let out = self.run_layers(seqs, &spans, &positions);
        if out.is_err() {
            for (s, b) in seqs.iter_mut().zip(backup) {
                *s.state = b;
            }
        }
        out
    }

    /// Checks a batch and lays its sequences end to end: their spans and every token's
    /// position.
    fn spans_of(&self, seqs: &[SeqStep<'_>]) -> Result<(Vec<Span>, Vec<u32>)> {
        let mut spans = Vec::with_capacity(seqs.len());
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
                start: positions.len(),
                len: s.tokens.len(),
                position,
            });
            positions.extend((position..position + s.tokens.len()).map(|p| p as u32));
        }
        Ok((spans, positions))
    }

    /// Embeds the batch and runs every layer over it, advancing the states: the final
    /// residual stream, `[tokens, hidden]`.
    fn run_layers(
        &self,
        seqs: &mut [SeqStep<'_>],
        spans: &[Span],
        positions: &[u32],
    ) -> Result<Tensor> {
        let ctx = self.batch_context(spans, positions)?;
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let x = self
            .embed
            .forward(&Tensor::new(ids.as_slice(), &self.device)?)?;
        let mut states: Vec<&mut SequenceState> = seqs.iter_mut().map(|s| &mut *s.state).collect();
        let x = self.decoder_layers(x, &ctx, &mut states, |_| ())?;
        for (s, span) in seqs.iter_mut().zip(spans) {
            s.state.position += span.len;
        }
        Ok(x)
    }

    /// Every decoder layer over the residual stream `x` (one batch, `ctx`), advancing each
    /// sequence's layer states; `observe` sees each layer's input first.
    fn decoder_layers(
        &self,
        mut x: Tensor,
        ctx: &BatchContext,
        states: &mut [&mut SequenceState],
        mut observe: impl FnMut(&Tensor),
    ) -> Result<Tensor> {
        for (l, layer) in self.layers.iter().enumerate() {
            observe(&x);
            let mut layer_states: Vec<&mut LayerState> =
                states.iter_mut().map(|s| &mut s.layers[l]).collect();
            let a = layer.attn.forward(
                &self.norm_fwd(&layer.input_norm, &x)?,
                ctx,
                &mut layer_states,
            )?;
            let h = (x + a)?;
            let m = layer.mlp.forward(&self.norm_fwd(&layer.post_norm, &h)?)?;
            x = (h + m)?;
        }
        Ok(x)
    }

    fn batch_context<'s>(&self, spans: &'s [Span], positions: &[u32]) -> Result<BatchContext<'s>> {
        let (cos, sin) = self.rope.cos_sin(positions, self.dtype)?;
        Ok(BatchContext {
            spans,
            cos,
            sin,
            chunk_size: self.options.chunk_size,
            global_block: self.options.global_block,
            host_attention: self.options.host_attention,
            differentiable: self.options.differentiable,
        })
    }

    /// Spans and positions of fresh sequences of the given lengths laid end to end.
    fn fresh_spans(lens: &[usize]) -> (Vec<Span>, Vec<u32>) {
        let mut spans = Vec::with_capacity(lens.len());
        let mut positions = Vec::new();
        for &len in lens {
            spans.push(Span {
                start: positions.len(),
                len,
                position: 0,
            });
            positions.extend(0..len as u32);
        }
        (spans, positions)
    }

    /// Packs every projection's weight and the LM head for the AVX-512 kernel now
    /// (`Linear::packed`) rather than at its first product, so that a server's first request
    /// does not wait for it, with the head's screen where [`RuntimeOptions::head_screen`]
    /// asks for one. Returns how many were packed and their bytes (the screen's counted
    /// in): none without AVX-512, on other devices, or for weights in other formats.
    pub fn pack_weights(&self) -> (usize, usize) {
        let screen = self.head_screen().map_or(0, |s| s.approx().bytes());
        self.projections()
            .filter_map(|l| l.packed())
            .fold((0, screen), |(n, bytes), p| (n + 1, bytes + p.bytes()))
    }

    /// The LM head's screen for greedy picks, when [`RuntimeOptions::head_screen`] asks for
    /// it and the head allows it (built on first use).
    fn head_screen(&self) -> Option<&crate::layers::HeadScreen> {
        let on = self.options.head_screen && self.device.is_cpu();
        on.then(|| self.lm_head.screen())
            .flatten()
            .map(|s| s.as_ref())
    }

    /// Where the projections' and the LM head's weights live, which a decode step reads in
    /// full, as address ranges: to put on huge pages ([`crate::hugepages`]). Their packed
    /// copies where the CPU takes them (packed now if [`pack_weights`](Self::pack_weights)
    /// has not been called).
    pub fn weight_memory(&self) -> Vec<std::ops::Range<usize>> {
        let screen = self.head_screen().map(|s| s.memory()).unwrap_or_default();
        self.projections()
            .flat_map(Linear::memory)
            .chain(screen.into_iter().map(crate::hugepages::span))
            .collect()
    }

    /// The LM head and every layer's projections.
    fn projections(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.lm_head).chain(
            self.layers
                .iter()
                .flat_map(|l| lora::TARGETS.iter().filter_map(|(t, _)| l.projection(t))),
        )
    }

    /// The model as the fused decode step reads it; `None` when a layer's mixer is not
    /// covered there. The head's screen only for a step with `greedy` sequences (it is
    /// built on first use: a model that never decodes greedily never holds one).
    fn decode_refs(&self, greedy: bool) -> Result<Option<decode::ModelRefs<'_>>> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let Some((mix, attn)) = l.attn.decode_view() else {
                return Ok(None);
            };
            layers.push(decode::LayerRefs {
                input_norm: l.input_norm.weight(),
                post_norm: l.post_norm.weight(),
                attn,
                mlp: l.mlp.projections(),
                mix,
            });
        }
        Ok(Some(decode::ModelRefs {
            embed: self.embed.embeddings(),
            norm: self.norm.weight(),
            lm_head: &self.lm_head,
            screen: greedy.then(|| self.head_screen()).flatten(),
            layers,
            eps: self.norm.eps() as f32,
            heads: (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim),
            inv_freq: self.rope.inv_freq()?,
        }))
    }

    fn norm_fwd(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        Ok(if self.options.differentiable {
            norm.forward_differentiable(x)?
        } else {
            norm.forward(x)?
        })
    }
}
