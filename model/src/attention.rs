//! Token mixers: causal softmax attention (full, or windowed as in Mistral) and the Liger
//! hybrid (LIGER.md §1), which mixes a gated recurrent branch on the raw q/k with
//! sliding-window softmax attention on the RoPE'd q/k:
//!
//! ```text
//! o_t = w_window * SWA(q, k, v)_t + w_recurrent * R(q, k, v)_t
//! ```
//!
//! where `R` is the checkpoint's gated recurrence (GLA, HGRN2 or GSA; see [`crate::gla`]),
//! whose read-out is skipped when its weight is 0 (window-only attention). Its memory is then
//! still kept when the layer has recall places in its global cache, which go to the tokens
//! that memory recalls worst (LoLA's rule, [`crate::global`]); without them (window alone,
//! sinks, attention places) nothing recurrent is computed or kept.
//!
//! Both kinds share the q/k/v/o projections, which run once over every token of the batch;
//! only the mixing itself is done per sequence (each has its own cache and position).

use candle_core::{DType, Device, Module, Tensor};

use crate::config::{LayerKind, LigerConfig, ModelConfig, Variant};
use crate::gla::{self, FeatureMaps};
use crate::global::{recall_scores, DistanceCap, GlobalCache, SpanPositions};
use crate::global::{Exps, Geometry};
use crate::layers::gemm;
use crate::layers::rope::rotate_rows;
use crate::layers::{Dims, Linear, Rope, WeightSource};
use crate::mix::{Mix, Recurrent};
use crate::state::{KvCache, LayerState};
use crate::{Error, Result};

/// Settings of one Liger layer.
#[derive(Debug, Clone, Copy)]
struct Hybrid {
    features: FeatureMaps,
    window_weight: f64,
    recurrent_weight: f64,
    /// Global cache places per KV head.
    global_places: usize,
    /// Places beyond the sinks given by attention (the rest beyond those by recall).
    attention_places: usize,
    /// The memory's key reads score tokens for recall places
    /// ([`LigerConfig::recall_chooses`]).
    recall_chooses: bool,
    /// The layer keeps a recurrent memory ([`LigerConfig::keeps_memory`]).
    keeps_memory: bool,
    /// The distance cap of the global cache's entries ([`LigerConfig::max_distance`]).
    max_distance: Option<usize>,
}

impl Hybrid {
    /// Whether the recurrent memory's read-out goes into the output.
    fn reads_out(&self) -> bool {
        self.recurrent_weight != 0.0
    }
}

#[derive(Debug, Clone)]
enum Mixer {
    Softmax,
    Liger(Hybrid),
}

/// A layer's attention block: projections plus the token mixer.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    mixer: Mixer,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Where one sequence's tokens sit in a batch, and at which position they start.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub position: usize,
}

/// Per-forward data shared by all layers.
pub struct BatchContext<'a> {
    pub spans: &'a [Span],
    /// RoPE tables for every token of the batch, `[tokens, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Chunk length of the chunked-parallel recurrent form.
    pub chunk_size: usize,
    /// Queries a layer with a global cache attends at once (`RuntimeOptions::global_block`).
    pub global_block: usize,
    /// Global-cache prefill pieces on the host kernel (`RuntimeOptions::host_attention`).
    pub host_attention: bool,
    /// Use ops with a backward pass.
    pub differentiable: bool,
}

impl Attention {
    pub fn load(w: &WeightSource, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let (h, hkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (hidden, qkv_bias) = (cfg.hidden_size, cfg.qkv_bias);
        let mixer = match cfg.layer_kind(layer) {
            LayerKind::Softmax { .. } => Mixer::Softmax,
            LayerKind::Liger => {
                let l: &LigerConfig = cfg
                    .liger
                    .as_ref()
                    .expect("Liger layer implies a liger config");
                Mixer::Liger(Hybrid {
                    features: FeatureMaps {
                        variant: l.variant,
                        gate_normalizer: l.gate_normalizer,
                        slots: l.gsa_slots().unwrap_or(0),
                        differentiable: false,
                    },
                    window_weight: l.window_weight,
                    recurrent_weight: l.recurrent_weight,
                    global_places: l.global_cache,
                    attention_places: l.attention_places,
                    recall_chooses: l.recall_chooses(),
                    keeps_memory: l.keeps_memory(),
                    max_distance: l.max_distance,
                })
            }
        };
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), Dims::new(hidden, h * d), qkv_bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), Dims::new(hidden, hkv * d), qkv_bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), Dims::new(hidden, hkv * d), qkv_bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), Dims::new(h * d, hidden), cfg.o_bias)?,
            mixer,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
        })
    }

    /// `x`: `[tokens, hidden]` (normed) for all sequences of the batch; `states[i]` is this
    /// layer's state of the sequence `ctx.spans[i]`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &BatchContext,
        states: &mut [&mut LayerState],
    ) -> Result<Tensor> {
        let mixed = self.mix(x, ctx, states)?;
        Ok(self.o_proj.forward(&mixed.to_dtype(x.dtype())?)?)
    }

    /// The attention output before `o_proj`: `[tokens, heads * head_dim]`, f32. This is what
    /// attention transfer trains a Liger layer to reproduce.
    pub fn mix(
        &self,
        x: &Tensor,
        ctx: &BatchContext,
        states: &mut [&mut LayerState],
    ) -> Result<Tensor> {
        let n_tok = x.dim(0)?;
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                .try_into()
                .expect("three projections");
        let q = q.reshape((n_tok, h, d))?;
        let k = k.reshape((n_tok, hkv, d))?;
        let v = v.reshape((n_tok, hkv, d))?;
        let (q_rot, k_rot) = if ctx.differentiable {
            (
                Rope::apply_differentiable(&q, &ctx.cos, &ctx.sin)?,
                Rope::apply_differentiable(&k, &ctx.cos, &ctx.sin)?,
            )
        } else {
            (
                Rope::apply(&q, &ctx.cos, &ctx.sin)?,
                Rope::apply(&k, &ctx.cos, &ctx.sin)?,
            )
        };
        let mixed = match &self.mixer {
            Mixer::Softmax => {
                let mut caches = Vec::with_capacity(states.len());
                for state in states.iter_mut() {
                    let LayerState::Softmax(cache) = &mut **state else {
                        return Err(Error::State(
                            "layer state kind does not match the model".into(),
                        ));
                    };
                    caches.push(cache);
                }
                let outs = self.attend_all(&q_rot, &k_rot, &v, ctx, &mut caches)?;
                Tensor::cat(&outs, 0)?
            }
            Mixer::Liger(hy) => self.hybrid(hy, (&q, &k, &v), (&q_rot, &k_rot), ctx, states)?,
        };
        Ok(mixed.reshape((n_tok, h * d))?)
    }

    /// The mixer and the q, k, v, o projections as the fused decode step reads them; `None`
    /// for mixers it does not cover (GSA).
    pub(crate) fn decode_view(&self) -> Option<(Mix, [&Linear; 4])> {
        let mix = match &self.mixer {
            Mixer::Softmax => Mix::Softmax,
            Mixer::Liger(hy)
                if hy.recurrent_weight == 0.0 || hy.features.variant != Variant::Gsa =>
            {
                Mix::Liger {
                    recurrent: Recurrent {
                        variant: hy.features.variant,
                        gate_normalizer: hy.features.gate_normalizer as f32,
                    },
                    window_weight: hy.window_weight as f32,
                    recurrent_weight: hy.recurrent_weight as f32,
                    memory: hy.keeps_memory,
                    global: hy.global_places > 0,
                    attention_scores: hy.attention_places > 0,
                    recall_scores: hy.recall_chooses,
                    max_distance: hy.max_distance,
                }
            }
            Mixer::Liger(_) => return None,
        };
        Some((
            mix,
            [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj],
        ))
    }

    /// The projection called `name` (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
    pub fn projection(&self, name: &str) -> Option<&Linear> {
        match name {
            "q_proj" => Some(&self.q_proj),
            "k_proj" => Some(&self.k_proj),
            "v_proj" => Some(&self.v_proj),
            "o_proj" => Some(&self.o_proj),
            _ => None,
        }
    }

    /// [`projection`](Self::projection), mutable.
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match name {
            "q_proj" => Some(&mut self.q_proj),
            "k_proj" => Some(&mut self.k_proj),
            "v_proj" => Some(&mut self.v_proj),
            "o_proj" => Some(&mut self.o_proj),
            _ => None,
        }
    }

    /// Causal softmax attention for one sequence over its cache plus its new tokens.
    /// Returns `[len, h, d]` in f32.
    fn windowed(
        &self,
        q_rot: &Tensor,
        k_rot: &Tensor,
        v: &Tensor,
        span: &Span,
        cache: &mut KvCache,
        differentiable: bool,
    ) -> Result<Tensor> {
        let to_heads = |x: &Tensor| -> Result<Tensor> {
            Ok(x.narrow(0, span.start, span.len)?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let cached = cache.len();
        let (keys, values) = cache.extend(&to_heads(k_rot)?, &to_heads(v)?)?;
        let q = to_heads(q_rot)?;
        let mask = attention_mask(span.len, cached, cache.capacity(), q.device())?;
        softmax_attention(&q, &keys, &values, mask.as_ref(), differentiable)
    }

    /// Softmax attention (full or windowed, per the caches' capacity) for every sequence of
    /// the batch: prefill chunks one by one, and all one-token decode steps in one batched,
    /// padded call. Returns per-sequence `[len, h, d]` in f32, in batch order.
    fn attend_all(
        &self,
        q_rot: &Tensor,
        k_rot: &Tensor,
        v: &Tensor,
        ctx: &BatchContext,
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        let mut outs: Vec<Option<Tensor>> = vec![None; ctx.spans.len()];
        let mut decode = Vec::new();
        for (i, (span, cache)) in ctx.spans.iter().zip(caches.iter_mut()).enumerate() {
            if is_batched_decode(span, ctx) {
                decode.push(i);
            } else {
                outs[i] = Some(self.windowed(q_rot, k_rot, v, span, cache, ctx.differentiable)?);
            }
        }
        if !decode.is_empty() {
            let batched = self.decode_attention(q_rot, k_rot, v, ctx, caches, &decode)?;
            for (&i, o) in decode.iter().zip(batched) {
                outs[i] = Some(o);
            }
        }
        Ok(outs
            .into_iter()
            .map(|o| o.expect("every span computed"))
            .collect())
    }

    /// One-token steps of sequences `which`: each cache grows by its token, then all attend in
    /// one call, keys padded to the longest cache and the padding masked out. Equal to
    /// [`windowed`](Self::windowed) per sequence (held by the batched-vs-solo tests).
    fn decode_attention(
        &self,
        q_rot: &Tensor,
        k_rot: &Tensor,
        v: &Tensor,
        ctx: &BatchContext,
        caches: &mut [&mut KvCache],
        which: &[usize],
    ) -> Result<Vec<Tensor>> {
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (mut keys, mut values, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for &i in which {
            let row = |x: &Tensor| -> Result<Tensor> {
                Ok(x.narrow(0, ctx.spans[i].start, 1)?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let (k_all, v_all) = caches[i].extend(&row(k_rot)?, &row(v)?)?;
            lens.push(k_all.dim(1)?);
            keys.push(k_all);
            values.push(v_all);
        }
        let longest = *lens.iter().max().expect("non-empty");
        let pad = |x: &Tensor, len: usize| -> Result<Tensor> {
            Ok(if len == longest {
                x.clone()
            } else {
                x.pad_with_zeros(1, 0, longest - len)?
            })
        };
        let n = which.len();
        let keys: Vec<Tensor> = keys
            .iter()
            .zip(&lens)
            .map(|(k, &l)| pad(k, l))
            .collect::<Result<_>>()?;
        let values: Vec<Tensor> = values
            .iter()
            .zip(&lens)
            .map(|(v, &l)| pad(v, l))
            .collect::<Result<_>>()?;
        let keys = Tensor::stack(&keys, 0)?.to_dtype(DType::F32)?; // [n, hkv, L, d]
        let values = Tensor::stack(&values, 0)?.to_dtype(DType::F32)?;
        let idx: Vec<u32> = which.iter().map(|&i| ctx.spans[i].start as u32).collect();
        let q = q_rot
            .index_select(&Tensor::new(idx.as_slice(), q_rot.device())?, 0)?
            .to_dtype(DType::F32)?
            .reshape((n, hkv, h / hkv, d))?;
        let q = (q * (1.0 / (d as f64).sqrt()))?;
        let mut scores = q.matmul(&keys.transpose(2, 3)?.contiguous()?)?; // [n, hkv, g, L]
        if lens.iter().any(|&l| l != longest) {
            let mask: Vec<f32> = lens
                .iter()
                .flat_map(|&l| {
                    (0..longest).map(move |j| if j < l { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, 1, 1, longest), q.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = p.matmul(&values)?.reshape((n, 1, h, d))?; // [n, 1, h, d]
        (0..n).map(|j| Ok(o.get(j)?)).collect()
    }

    fn hybrid(
        &self,
        hy: &Hybrid,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (q_rot, k_rot): (&Tensor, &Tensor),
        ctx: &BatchContext,
        states: &mut [&mut LayerState],
    ) -> Result<Tensor> {
        for state in states.iter() {
            if !matches!(&**state, LayerState::Liger { .. }) {
                return Err(Error::State(
                    "layer state kind does not match the model".into(),
                ));
            }
        }
        // The recurrent branch first: its memory reads give the saliences the global cache
        // chooses by, before the window branch attends.
        let (recurrent_out, reads) = if hy.keeps_memory {
            self.recurrent_branch(hy, (q, k, v), ctx, states)?
        } else {
            // Window-only attention without a cache to choose for: the recurrent branch
            // would be multiplied by 0, so it is neither computed nor kept (no state rows).
            (None, vec![None; ctx.spans.len()])
        };
        let window_out = if hy.global_places > 0 {
            self.attend_with_global(hy, (q, q_rot, k_rot, v), ctx, states, &reads)?
        } else {
            let outs = self.attend_all(q_rot, k_rot, v, ctx, &mut window_caches(states)?)?;
            Tensor::cat(&outs, 0)?
        };
        // A weight of 1 (the default model's window) is skipped: `x * 1.0` is `x`, and on
        // the host it was a single-threaded pass over the layer's whole output (~15% of the
        // prefill's serial time between parallel ops).
        let scaled =
            |x: Tensor, w: f64| -> Result<Tensor> { Ok(if w == 1.0 { x } else { (x * w)? }) };
        let window_out = scaled(window_out, hy.window_weight)?;
        Ok(match recurrent_out {
            None => window_out,
            Some(r) => (window_out + scaled(r, hy.recurrent_weight)?)?,
        })
    }

    /// The gated recurrent branch for every sequence: its read-out `[tokens, h, d]` (`None`
    /// when its weight is 0: then only the memory and its key reads are computed), and, when
    /// the layer has a global cache, each sequence's memory reads at its own keys
    /// (`[hkv, len, d]`, see [`crate::global`]).
    fn recurrent_branch(
        &self,
        hy: &Hybrid,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        ctx: &BatchContext,
        states: &mut [&mut LayerState],
    ) -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Without a read-out the query heads are dropped: the key reads are all there is.
        let g = if hy.reads_out() { h / hkv } else { 0 };
        let features = FeatureMaps {
            differentiable: ctx.differentiable,
            ..hy.features
        };
        let self_read = hy.recall_chooses;
        // Feature maps for all tokens at once: [1, heads, tokens, d].
        let readers = match (hy.reads_out(), self_read) {
            (false, _) => gla::feature::Readers::KeysOnly,
            (true, true) => gla::feature::Readers::QueriesAndKeys,
            (true, false) => gla::feature::Readers::Queries,
        };
        let all = gla::Recurrence::from_projections(features, (q, k, v), readers)?;
        // Query heads per KV head in the recurrence's output, the key read last.
        let heads = if self_read { g + 1 } else { g };
        // [.., heads, t, d] -> ([t, h, d], the key reads [hkv, t, d]). A key read `k_t S_t`
        // includes the token's own write `|k_t|^2 v_t`: taken out, what is left is the memory's
        // answer from before the token, `k_t diag(a_t) S_{t-1}`.
        let split = |o: &Tensor,
                     t: usize,
                     own: Option<Tensor>|
         -> Result<(Option<Tensor>, Option<Tensor>)> {
            let o = o.reshape((hkv, heads, t, d))?;
            let out = (g > 0)
                .then(|| -> Result<Tensor> {
                    Ok(o.narrow(1, 0, g)?.reshape((h, t, d))?.transpose(0, 1)?)
                })
                .transpose()?;
            let read = match own {
                Some(own) => Some((o.narrow(1, g, 1)?.squeeze(1)? - own.reshape((hkv, t, d))?)?),
                None => None,
            };
            Ok((out, read))
        };
        let mut outs: Vec<Option<Tensor>> = vec![None; ctx.spans.len()];
        let mut reads: Vec<Option<Tensor>> = vec![None; ctx.spans.len()];
        // Sequences decoding one token share one batched recurrent step.
        let mut decode: Vec<usize> = Vec::new();
        for (i, (span, state)) in ctx.spans.iter().zip(states.iter_mut()).enumerate() {
            if is_batched_decode(span, ctx) {
                decode.push(i);
                continue;
            }
            let recurrent = recurrent_of(state);
            let x = all.tokens(span.start, span.len)?;
            let (o, s) = x.span(recurrent, ctx.chunk_size)?;
            *recurrent = s;
            let own = self_read.then(|| x.own_writes()).transpose()?;
            (outs[i], reads[i]) = split(&o, span.len, own)?;
        }
        if !decode.is_empty() {
            let idx: Vec<u32> = decode.iter().map(|&i| ctx.spans[i].start as u32).collect();
            let rows = all.rows(&Tensor::new(idx.as_slice(), q.device())?)?;
            let mut s_in = Vec::with_capacity(decode.len());
            for &i in &decode {
                s_in.push(recurrent_of(states[i]).clone());
            }
            let (o, s) = rows.recurrent(&Tensor::cat(&s_in, 0)?)?;
            let own = self_read.then(|| rows.own_writes()).transpose()?;
            for (j, &i) in decode.iter().enumerate() {
                *recurrent_of(states[i]) = s.narrow(0, j, 1)?;
                let own_j = own.as_ref().map(|w| w.get(j)).transpose()?;
                (outs[i], reads[i]) = split(&o.get(j)?, 1, own_j)?;
            }
        }
        if !hy.reads_out() {
            return Ok((None, reads));
        }
        let outs: Vec<Tensor> = outs
            .into_iter()
            .map(|o| o.expect("every span computed"))
            .collect();
        Ok((Some(Tensor::cat(&outs, 0)?), reads))
    }

    /// The window branch of a layer with a global cache, one sequence at a time: each query
    /// sees its window and the cache as it stood when the query was read, and the cache
    /// admits the tokens that leave the window (see [`crate::global`]). Returns
    /// `[tokens, h, d]`, f32.
    fn attend_with_global(
        &self,
        hy: &Hybrid,
        (q_raw, q_rot, k_rot, v): (&Tensor, &Tensor, &Tensor, &Tensor),
        ctx: &BatchContext,
        states: &mut [&mut LayerState],
        reads: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(ctx.spans.len());
        for ((whole, state), read) in ctx.spans.iter().zip(states.iter_mut()).zip(reads) {
            let LayerState::Liger { window, global, .. } = &mut **state else {
                unreachable!("checked by hybrid");
            };
            // Consecutive pieces of the span, each read as a prefill chunk of its own.
            let mut done = 0;
            while done < whole.len {
                let len = ctx.global_block.min(whole.len - done);
                let span = Span {
                    start: whole.start + done,
                    len,
                    position: whole.position + done,
                };
                let read = read.as_ref().map(|r| r.narrow(1, done, len)).transpose()?;
                outs.push(self.attend_piece(
                    hy,
                    (q_raw, q_rot, k_rot, v),
                    (&span, ctx.differentiable, ctx.host_attention),
                    (window, global),
                    read.as_ref(),
                )?);
                done += len;
            }
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// [`attend_with_global`](Self::attend_with_global) for one piece of one sequence's span
    /// (`read`: the memory's reads at its keys, when recall chooses). Returns `[len, h, d]`.
    fn attend_piece(
        &self,
        hy: &Hybrid,
        (q_raw, q_rot, k_rot, v): (&Tensor, &Tensor, &Tensor, &Tensor),
        (span, differentiable, host): (&Span, bool, bool),
        (window, global): (&mut KvCache, &mut GlobalCache),
        read: Option<&Tensor>,
    ) -> Result<Tensor> {
        let to_heads = |x: &Tensor| -> Result<Tensor> {
            Ok(x.narrow(0, span.start, span.len)?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (k_new, v_new, q) = (to_heads(k_rot)?, to_heads(v)?, to_heads(q_rot)?);
        let places = window.capacity().unwrap_or(usize::MAX);
        let cached = window.len();
        let (k_all, v_all) = window.extend(&k_new, &v_new)?;
        let q_raw = q_raw.narrow(0, span.start, span.len)?;
        let (keys, values) = global.candidates(&[(&k_all, &v_all)])?;
        let capped = match global.distance_cap() {
            Some(cap) => {
                let candidates = Candidates {
                    keys: &keys,
                    kept: global.positions(),
                    first_row: span.position - cached,
                };
                capped_scoring(&candidates, (&q_raw, span.position), cap)?
            }
            None => None,
        };
        // On the host, every score is exponentiated once, for the window shares and the
        // attention alike (see `global::attend`).
        let exps = match host && !differentiable && q.device().is_cpu() {
            true => {
                let geo = Geometry {
                    n: global.len(),
                    w: cached,
                    t: span.len,
                    window: places,
                    g: q.dim(0)? / k_new.dim(0)?,
                };
                match capped {
                    None if gemm::available() => Exps::score(&q, &keys, geo)?,
                    // Capped columns are scored apart: the piece's scores whole.
                    _ => {
                        // A query's scores past its own token are never read (`Exps`).
                        let causal = gemm::Causal::Output {
                            offset: geo.n + geo.w,
                            period: geo.t,
                        };
                        let scores = attention_scores((&q, &keys), capped.as_ref(), Some(causal))?
                            .contiguous()?;
                        Exps::new(&scores, geo)?
                    }
                }
            }
            false => None,
        };
        let mass = match (hy.attention_places, &exps) {
            (0, _) => None,
            (_, Some(exps)) => Some(exps.window_mass()),
            (_, None) => Some(window_mass(&q, &k_all, cached, places)?),
        };
        let recall = match read {
            Some(read) if hy.recall_chooses => Some(recall_scores(&v_new, read)?),
            _ => None,
        };
        let hkv = k_new.dim(0)?;
        let scores = global.span_scores(span.position, (hkv, span.len), mass, recall)?;
        let plan = global.plan(places, cached, &scores)?;
        let positions = SpanPositions {
            first_row: span.position - cached,
            start: span.position,
            end: span.position + span.len,
        };
        let attended = match exps {
            Some(exps) => exps.attend(&plan, &values)?, // [hkv, g*t, d]
            None => None,
        };
        let out = match attended {
            Some(o) => o.reshape(q.dims3()?)?.transpose(0, 1)?,
            None => {
                let mask = if plan.all_visible() {
                    None
                } else {
                    Some(plan.mask(q.device())?)
                };
                attention_with(
                    (&q, &keys, &values),
                    mask.as_ref(),
                    capped.as_ref(),
                    differentiable,
                )?
            }
        };
        let window_scores = global.window_scores_after(&scores, window.len())?;
        global.apply(&plan, &[(&k_all, &v_all)], (window_scores, positions))?;
        Ok(out)
    }
}

/// The recurrent memory of a Liger layer state (checked to be one by the caller).
fn recurrent_of(state: &mut LayerState) -> &mut Tensor {
    match state {
        LayerState::Liger { recurrent, .. } => recurrent,
        LayerState::Softmax(_) => unreachable!("checked by hybrid"),
    }
}

/// The window caches of Liger layer states (an error if a state is of another kind).
fn window_caches<'a>(states: &'a mut [&mut LayerState]) -> Result<Vec<&'a mut KvCache>> {
    states
        .iter_mut()
        .map(|state| match &mut **state {
            LayerState::Liger { window, .. } => Ok(window),
            LayerState::Softmax(_) => Err(Error::State(
                "layer state kind does not match the model".into(),
            )),
        })
        .collect()
}

/// One-token steps take the batched decode paths (inference only: the batched paths use
/// fused ops without a backward pass).
fn is_batched_decode(span: &Span, ctx: &BatchContext) -> bool {
    span.len == 1 && !ctx.differentiable
}

/// Additive mask `[t, cached + t]` for `t` new queries after `cached` cached keys: query i
/// (position p + i) sees key j (position p - cached + j) when the key is not in its future
/// and at most `window` tokens back. `None` when every key is visible.
pub fn attention_mask(
    t: usize,
    cached: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    if t == 1 {
        // A single query sees the whole cache: the cache holds at most `window` keys.
        return Ok(None);
    }
    let total = cached + t;
    let mut m = vec![0f32; t * total];
    for i in 0..t {
        let newest = cached + i; // the query's own key
        for (j, cell) in m[i * total..(i + 1) * total].iter_mut().enumerate() {
            let future = j > newest;
            let too_old = window.is_some_and(|w| newest - j.min(newest) > w);
            if future || too_old {
                *cell = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (t, total), device)?))
}

/// The window-only attention mass of a span (attention places, [`crate::global`]):
/// `t` queries `q: [h, t, d]` (post-RoPE) after `cached` window rows, over the keys
/// `k: [hkv, cached + t, d]`; each query sees itself and `window` keys back. Returns, per
/// KV head and key, the sum over the span's queries of the key's share of the query's
/// softmax over its window keys, averaged over the group's query heads: `[hkv][cached + t]`.
/// No gradient flows (the choice of places is not differentiable).
pub fn window_mass(q: &Tensor, k: &Tensor, cached: usize, window: usize) -> Result<Vec<Vec<f32>>> {
    // Blocks of queries see only their band of keys: a block of B queries needs B + window
    // columns, not all cached + t (a third of the work for 512-token chunks at window 240).
    window_mass_blocked(q, k, (cached, window), 128)
}

/// [`window_mass`] a block of `block` queries at a time.
fn window_mass_blocked(
    q: &Tensor,
    k: &Tensor,
    (cached, window): (usize, usize),
    block: usize,
) -> Result<Vec<Vec<f32>>> {
    let (h, t, d) = q.dims3()?;
    let (hkv, l, _) = k.dims3()?;
    let g = h / hkv;
    let q = (q.detach().to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?;
    let k = k.detach().to_dtype(DType::F32)?;
    let mut mass = vec![vec![0f32; l]; hkv];
    let mut start = 0;
    while start < t {
        let n = block.min(t - start);
        // Key columns the block's queries can see: from the first one's window to the last.
        let lo = (cached + start).saturating_sub(window);
        let hi = cached + start + n;
        let qb = q.narrow(1, start, n)?.reshape((hkv, g * n, d))?;
        let kb = k.narrow(1, lo, hi - lo)?;
        let scores = qb.matmul(&kb.t()?)?.reshape((hkv, g, n, hi - lo))?;
        let scores = match attention_mask(n, cached + start - lo, Some(window), q.device())? {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?.reshape((hkv, g * n, hi - lo))?;
        // Summing over the query rows as a product with a row of ones: candle's reductions
        // over inner dims are generic strided loops, its matmul is not.
        let ones = Tensor::ones((hkv, 1, g * n), DType::F32, p.device())?;
        let part = ones.matmul(&p)?.squeeze(1)?.to_vec2::<f32>()?;
        for (m, p) in mass.iter_mut().zip(part) {
            for (mj, pj) in m[lo..hi].iter_mut().zip(p) {
                *mj += pj / g as f32;
            }
        }
        start += n;
    }
    Ok(mass)
}

/// Grouped-query softmax attention without repeating keys: `q: [h, t, d]`, `k`, `v`:
/// `[hkv, L, d]`, `mask: [t, L]`, or `[hkv, 1, t, L]` for a mask per KV head. Scale
/// `1/sqrt(d)`. Returns `[t, h, d]` in f32.
pub fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    differentiable: bool,
) -> Result<Tensor> {
    attention_with((q, k, v), mask, None, differentiable)
}

/// How far key columns are scored under the distance cap ([`LigerConfig::max_distance`]):
/// the first `m` key columns take `<R(cap) q, k>`, both un-rotated, wherever `far` says
/// the pair is more than `cap` apart.
pub struct CappedScoring {
    /// The span's queries rotated by `cap` alone, `[h, t, d]`.
    pub q: Tensor,
    /// The first `m` columns' keys rotated back to no position, `[hkv, m, d]`.
    pub k: Tensor,
    /// Which (query, column) pairs are past the cap, `[hkv, 1, t, m]` (u8).
    pub far: Tensor,
}

/// A span's key columns, laid out as [`crate::global::Plan`]'s: the kept entries (at
/// their own positions per head), then rows at consecutive positions from `first_row`
/// (the window cache, then the span's tokens).
pub struct Candidates<'a> {
    /// `[hkv, n + rows, d]`, post-RoPE except the kept entries already past the cap at the
    /// span's first query, which the global cache stores un-rotated.
    pub keys: &'a Tensor,
    /// The kept entries' positions, `[hkv][n]`.
    pub kept: &'a [Vec<u32>],
    pub first_row: usize,
}

/// The distance cap's scoring for a span of queries (`q_raw`: `[t, h, d]` before RoPE, the
/// first at `position`); `None` when no column is more than `cap` before the last query,
/// which is always the case below `cap` tokens of context. The pairs past the cap are
/// those of the global cache's tokens (kept before the span or admitted during it: the
/// window's are never that far), and those are the oldest columns of each kind.
pub fn capped_scoring(
    c: &Candidates,
    (q_raw, position): (&Tensor, usize),
    cap: &DistanceCap,
) -> Result<Option<CappedScoring>> {
    let (t, h, _) = q_raw.dims3()?;
    let (hkv, l, d) = c.keys.dims3()?;
    let n = c.kept.first().map_or(0, Vec::len);
    let last = position + t - 1;
    // Rows (consecutive positions) past the cap for the last query.
    let rows = (l - n).min((last.saturating_sub(cap.max)).saturating_sub(c.first_row));
    if rows == 0 && !c.kept.iter().flatten().any(|&p| cap.far(p, last)) {
        return Ok(None);
    }
    let m = n + rows;
    let columns: Vec<Vec<u32>> = (0..hkv)
        .map(|h| {
            let kept = c.kept.get(h).map_or(&[][..], Vec::as_slice);
            let rows = (0..rows).map(|r| (c.first_row + r) as u32);
            kept.iter().copied().chain(rows).collect()
        })
        .collect();
    let mask: Vec<u8> = columns
        .iter()
        .flat_map(|row| {
            (position..=last)
                .flat_map(move |query| row.iter().map(move |&p| cap.far(p, query) as u8))
        })
        .collect();
    let far = Tensor::from_vec(mask, (hkv, 1, t, m), c.keys.device())?;
    // Back to no rotation: each key by minus its own position, except the kept entries the
    // global cache already stores un-rotated (past the cap at the first query).
    let back: Vec<i64> = columns
        .iter()
        .flat_map(|row| {
            row.iter()
                .enumerate()
                .map(|(col, &p)| match col < n && cap.far(p, position) {
                    true => 0,
                    false => -(p as i64),
                })
        })
        .collect();
    let first = c
        .keys
        .narrow(1, 0, m)?
        .contiguous()?
        .reshape((hkv * m, d))?;
    let k = rotate_rows(&first, &back, &cap.inv_freq)?.reshape((hkv, m, d))?;
    let q = rotate_rows(
        &q_raw.reshape((t * h, d))?,
        &vec![cap.max as i64; t * h],
        &cap.inv_freq,
    )?
    .reshape((t, h, d))?
    .transpose(0, 1)?
    .contiguous()?;
    Ok(Some(CappedScoring { q, k, far }))
}

/// [`softmax_attention`], with the first key columns scored under the distance cap where
/// `capped` says so.
pub fn attention_with(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: Option<&Tensor>,
    capped: Option<&CappedScoring>,
    differentiable: bool,
) -> Result<Tensor> {
    let (h, t, d) = q.dims3()?;
    let (hkv, l, _) = k.dims3()?;
    let g = h / hkv;
    let v = v.to_dtype(DType::F32)?;
    let scores = attention_scores((q, k), capped, None)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let p = if differentiable {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let o = gemm::batched(&p.reshape((hkv, g * t, l))?, &v)?; // [hkv, g*t, d]
    Ok(o.reshape((h, t, d))?.transpose(0, 1)?)
}

/// The scaled scores of [`attention_with`], `[hkv, g, t, L]` in f32, before any mask; with
/// `causal`, only the columns it says each query needs (0 after them, see
/// [`gemm::Causal`]), the capped columns among them.
pub fn attention_scores(
    (q, k): (&Tensor, &Tensor),
    capped: Option<&CappedScoring>,
    causal: Option<gemm::Causal>,
) -> Result<Tensor> {
    let (h, t, d) = q.dims3()?;
    let (hkv, l, _) = k.dims3()?;
    let g = h / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let q = (q.to_dtype(DType::F32)? * scale)?.reshape((hkv, g * t, d))?;
    let k = crate::layers::to_f32(k)?;
    let mut scores = gemm::batched_causal(&q, &k.t()?, causal)?.reshape((hkv, g, t, l))?;
    if let Some(c) = capped {
        let n = c.k.dim(1)?;
        let qc = (c.q.to_dtype(DType::F32)? * scale)?.reshape((hkv, g * t, d))?;
        let far = gemm::batched(&qc, &c.k.to_dtype(DType::F32)?.t()?)?.reshape((hkv, g, t, n))?;
        let near = scores.narrow(3, 0, n)?;
        let kept = c.far.broadcast_as(near.shape())?.where_cond(&far, &near)?;
        scores = if n == l {
            kept
        } else {
            Tensor::cat(&[kept, scores.narrow(3, n, l - n)?], 3)?
        };
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(t: usize, cached: usize, window: Option<usize>) -> Vec<String> {
        let m = attention_mask(t, cached, window, &Device::Cpu)
            .unwrap()
            .unwrap();
        m.to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&x| if x == 0.0 { '1' } else { '.' })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn window_counts_keys_before_the_query() {
        // Window 2: each query sees itself and the two keys before it.
        assert_eq!(visible(4, 0, Some(2)), ["1...", "11..", "111.", ".111"]);
        // Two cached keys precede three new queries.
        assert_eq!(visible(3, 2, Some(2)), ["111..", ".111.", "..111"]);
        // No window: plain causal.
        assert_eq!(visible(3, 1, None), ["11..", "111.", "1111"]);
    }

    /// `window_mass` by its definition, one query and one key at a time.
    fn naive_mass(
        q: &[Vec<Vec<f32>>],
        k: &[Vec<Vec<f32>>],
        cached: usize,
        window: usize,
    ) -> Vec<Vec<f32>> {
        let (h, hkv) = (q.len(), k.len());
        let (g, t, l) = (h / hkv, q[0].len(), k[0].len());
        let d = q[0][0].len();
        let mut mass = vec![vec![0f32; l]; hkv];
        for (head, qh) in q.iter().enumerate() {
            let kh = &k[head / g];
            for (i, qi) in qh.iter().enumerate().take(t) {
                let newest = cached + i;
                let seen: Vec<usize> = (newest.saturating_sub(window)..=newest).collect();
                let logits: Vec<f64> = seen
                    .iter()
                    .map(|&j| {
                        let dot: f64 = qi.iter().zip(&kh[j]).map(|(a, b)| (a * b) as f64).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|x| (x - max).exp()).sum();
                for (&j, x) in seen.iter().zip(&logits) {
                    mass[head / g][j] += (((x - max).exp() / z) / g as f64) as f32;
                }
            }
        }
        mass
    }

    #[test]
    fn window_mass_is_each_keys_share_of_the_window_softmax() {
        let dev = Device::Cpu;
        let (h, hkv, d) = (4, 2, 8);
        for (t, cached, window) in [
            (5, 0, 2),
            (3, 2, 2),
            (1, 3, 3),
            (6, 1, 8),
            (9, 3, 2),
            (7, 0, 3),
        ] {
            let l = cached + t;
            let q = Tensor::randn(0f32, 1.0, (h, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (hkv, l, d), &dev).unwrap();
            let got = window_mass(&q, &k, cached, window).unwrap();
            // In blocks of 1, 2 and 4 queries too.
            for block in [1, 2, 4] {
                let blocked = window_mass_blocked(&q, &k, (cached, window), block).unwrap();
                for (a, b) in blocked.iter().flatten().zip(got.iter().flatten()) {
                    assert!((a - b).abs() < 1e-5, "block {block}: {a} vs {b}");
                }
            }
            let want = naive_mass(&q.to_vec3().unwrap(), &k.to_vec3().unwrap(), cached, window);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-5, "t {t} cached {cached}: {g} vs {w}");
            }
            // Each query hands out one unit of mass, whatever it sees.
            let total: f32 = got.iter().flatten().sum();
            assert!((total - (hkv * t) as f32).abs() < 1e-4, "{total}");
        }
    }

    /// Half-split RoPE of one head at `pos`, in f64 (the definition).
    fn rotate(x: &[f32], pos: f64, inv_freq: &[f32]) -> Vec<f64> {
        let half = x.len() / 2;
        let mut out = vec![0f64; x.len()];
        for (i, &f) in inv_freq.iter().enumerate() {
            let (s, c) = (pos * f as f64).sin_cos();
            let (a, b) = (x[i] as f64, x[i + half] as f64);
            out[i] = a * c - b * s;
            out[i + half] = a * s + b * c;
        }
        out
    }

    #[test]
    fn capped_scoring_scores_far_entries_at_the_cap() {
        let dev = Device::Cpu;
        let (h, hkv, d, t, n, rows) = (4, 2, 8, 4, 5, 3);
        let (start, cap, first_row) = (40usize, 15usize, 22usize);
        let cfg = ModelConfig::from_json(serde_json::json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": h, "num_key_value_heads": hkv,
            "vocab_size": 10
        }))
        .unwrap();
        let rope = Rope::new(&cfg, &dev).unwrap();
        let inv = rope.inv_freq().unwrap();
        // Kept entries on both sides of the cap for the first query (40 - 15 = 25), one
        // (24) that only the later queries see past it, then rows at 22, 23, 24.
        let kept: Vec<Vec<u32>> = vec![vec![0, 3, 24, 25, 30], vec![1, 26, 14, 19, 33]];
        let position = |kv: usize, c: usize| match c < n {
            true => kept[kv][c] as usize,
            false => first_row + c - n,
        };
        let l = n + rows;
        let k_raw = Tensor::randn(0f32, 1.0, (hkv, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (hkv, l, d), &dev).unwrap();
        let q_raw = Tensor::randn(0f32, 1.0, (t, h, d), &dev).unwrap();
        let kr = k_raw.to_vec3::<f32>().unwrap();
        // Kept entries already past the cap at the first query are stored un-rotated.
        let raw: Vec<Vec<bool>> = kept
            .iter()
            .map(|row| row.iter().map(|&p| start - p as usize > cap).collect())
            .collect();
        assert!(raw.iter().flatten().any(|&r| r) && raw.iter().flatten().any(|&r| !r));
        let stored: Vec<f32> = (0..hkv)
            .flat_map(|kv| (0..l).map(move |c| (kv, c)))
            .flat_map(|(kv, c)| match c < n && raw[kv][c] {
                true => kr[kv][c].iter().map(|&x| x as f64).collect(),
                false => rotate(&kr[kv][c], position(kv, c) as f64, &inv),
            })
            .map(|x| x as f32)
            .collect();
        let keys = Tensor::from_vec(stored, (hkv, l, d), &dev).unwrap();
        let candidates = Candidates {
            keys: &keys,
            kept: &kept,
            first_row,
        };
        let capped_at = |max: usize| DistanceCap {
            max,
            inv_freq: inv.clone().into(),
        };
        let capped = capped_scoring(&candidates, (&q_raw, start), &capped_at(cap))
            .unwrap()
            .expect("some pairs are past the cap");
        assert_eq!(capped.k.dim(1).unwrap(), l, "every row is past the cap");
        let positions_q: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let (cos, sin) = rope.cos_sin(&positions_q, DType::F32).unwrap();
        let q_rot = Rope::apply(&q_raw, &cos, &sin)
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let got = attention_with((&q_rot, &keys, &v), None, Some(&capped), false)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        // Below the cap nothing is computed; rows are capped only when past it.
        let one = q_raw.narrow(0, 0, 1).unwrap();
        assert!(capped_scoring(&candidates, (&one, 34), &capped_at(34))
            .unwrap()
            .is_none());
        let some = capped_scoring(&candidates, (&one, 40), &capped_at(17))
            .unwrap()
            .expect("kept entries past the cap");
        assert_eq!(
            some.k.dim(1).unwrap(),
            n + 1,
            "only the row at 22 is past 17"
        );
        let (qr, vv) = (q_raw.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        for i in 0..t {
            let p = (start + i) as f64;
            for head in 0..h {
                let kv = head / (h / hkv);
                let q = rotate(&qr[i][head], p, &inv);
                let logits: Vec<f64> = (0..l)
                    .map(|c| {
                        let dist = (p - position(kv, c) as f64).min(cap as f64);
                        let k = rotate(&kr[kv][c], p - dist, &inv);
                        q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|x| (x - max).exp()).sum();
                for e in 0..d {
                    let want: f64 = (0..l)
                        .map(|c| (logits[c] - max).exp() / z * vv[kv][c][e] as f64)
                        .sum();
                    let diff = (got[i][head][e] as f64 - want).abs();
                    assert!(diff < 1e-4, "query {i} head {head}: {diff}");
                }
            }
        }
    }
}
