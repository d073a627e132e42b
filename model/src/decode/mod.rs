//! The fused decode step: a token, or a short span of tokens (a speculative draft to
//! check), for each of a batch of sequences, up to [`MAX_BATCH`] tokens in all, through the
//! whole model on plain f32 slices (CPU).
//!
//! The general path runs a decode token as ~60 candle ops per layer. Each allocates its
//! output, and each parallel one (every matmul) hands its work to rayon and waits for it,
//! so a batch-1 token of a 30-layer model pays some 300 thread wake-ups on top of reading
//! the weights. Here the step's threads (rayon's, woken once per token by `broadcast`) live
//! for the whole token: per layer they split every projection by output rows (the weights
//! are read once: on AVX-512 CPUs from their packed panels, `layers::Packed`, through the
//! same kernel as prefill, otherwise straight from the tensors' storage through the AVX2
//! decode kernels), split the token mixing by (sequence,
//! KV head), and meet at a spinning barrier between the five phases that depend on each
//! other:
//!
//! ```text
//! norm + q/k/v rows | mixing per (seq, kv head) | o rows (+= residual)
//!   | norm + gate/up rows (silu * up) | down rows (+= residual)
//! ```
//!
//! (Each thread computes the RMSNorm of the whole residual itself: cheaper than another
//! barrier.) A thread that reaches a barrier before the others prefetches the first weights
//! of the next projection phase while it waits (`Step::ahead`): at batch 1 the step reads
//! weights from memory, and a wait is memory bandwidth left unused. The general path stays
//! the reference: with `RuntimeOptions::fast_decode` off it runs instead, and
//! `tests/fused_decode.rs` holds the two equal, logits and states.
//!
//! A span's tokens are rows of the projections like any others; its token mixing runs them
//! in order within their (sequence, KV head) unit, each seeing the span's earlier tokens.
//! Rows leave the window as a span goes on and compete for the global cache's places: a
//! unit replays those admissions query by query (`global::Admissions`, what the cache's
//! own `plan` replays when the step is stored), so each token sees the entries the plan
//! says it sees, as a mask over the kept and cached rows already in the step's inputs.
//!
//! Not covered (those steps take the general path): GSA layers, weights other than f32 and
//! Q8_0, unmerged adapters, gradients, other devices, spans longer than a window, spans
//! during which a kept entry passes the distance cap, and prefill.

mod attend;
mod mixing;
mod rows;
mod sync;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::mix::Mix;
use half::f16;
use mixing::{GroupIn, GroupOut, Memory, Scratch};
use rows::{sized, Rows, RowsMut};
use sync::{PanicGuard, Shared, SpinBarrier};

use crate::global::GlobalCache;
use crate::layers::{gemm, matvec, matvec_q8, Packed};
use crate::layers::{HeadScreen, Linear};
use crate::state::LayerState;
use crate::state::SeqStep;
use crate::{Logits, Result};

/// Most tokens one fused step takes; larger batches are compute-bound and go to gemm.
pub const MAX_BATCH: usize = matvec::MAX_ROWS;

/// Most tokens of a sequence the fused step takes: a decode token and its speculative
/// draft, after the tokens a rejected draft left unread (`2k + 1` for `k` drafted tokens: 9
/// at the server's default 4). Longer spans are prompt chunks, read on the general path
/// (`Model::split_decodes` gives a batch's short steps to the fused step and its chunks to
/// the general path).
pub const SHORT_SPAN: usize = 16;

/// Weight rows per inner block of a projection: the block's outputs for the whole batch stay
/// in L1 (`48 x 32` floats at most) and it is a multiple of the kernel's 3-row tile.
const BAND: usize = 48;

/// Output columns per band of a packed weight: three of the AVX-512 kernel's panels. Fewer
/// claims than one or two panels, and the model's 576- and 192-wide projections split
/// into even band counts (6 and 2), so two threads end a phase together. Against two panels,
/// alternating in one process: batch 1 f32 1.4-2.8% and q8_0 1.9-4.3% faster, batch 8 and
/// 32 -0.9 to +2.2%; one panel 2-5% slower, four +0.2 to +3.5%, six -1.6%, eight -12%.
const PACKED_BAND: usize = 3 * gemm::NR;

/// Most tokens a step reads the LM head's screen for (`HeadScreen`): past a few rows the
/// head's product is bound by compute, not by its bytes, and the screen saves nothing.
const SCREEN_ROWS: usize = 16;

/// Most logits of a row the screen computes exactly before the row is computed in full
/// instead (each ~0.5 us; the full row ~2.5 ms at f32 for SmolLM2).
const SCREEN_MOST: usize = 1024;

/// [`SCREEN_MOST`], or what a test on this thread set instead (to reach the fallback).
fn screen_most() -> usize {
    #[cfg(test)]
    if let Some(most) = tests::SCREEN_MOST_HERE.with(|m| m.get()) {
        return most;
    }
    SCREEN_MOST
}

/// The widest band of gate/up columns one claim takes (dense or packed weights).
const GATE_UP_BAND: usize = if BAND > PACKED_BAND {
    BAND
} else {
    PACKED_BAND
};

/// One decoder layer as the fused step reads it.
pub(crate) struct LayerRefs<'m> {
    pub input_norm: &'m Tensor,
    pub post_norm: &'m Tensor,
    /// q, k, v, o.
    pub attn: [&'m Linear; 4],
    /// gate, up, down.
    pub mlp: [&'m Linear; 3],
    pub mix: Mix,
}

/// The model as the fused step reads it (built by `Model::decode_refs`).
pub(crate) struct ModelRefs<'m> {
    pub embed: &'m Tensor,
    pub norm: &'m Tensor,
    pub lm_head: &'m Linear,
    /// The LM head's screen, where greedy steps may read it instead.
    pub screen: Option<&'m HeadScreen>,
    pub layers: Vec<LayerRefs<'m>>,
    pub eps: f32,
    /// Query heads, KV heads, head dim.
    pub heads: (usize, usize, usize),
    pub inv_freq: Vec<f32>,
}

/// Tensors the step reads, numbered; locked all at once into slices.
#[derive(Default)]
struct Inputs {
    tensors: Vec<Tensor>,
    /// Cache rows a state stores in f16 (locked the same way).
    halves: Vec<Tensor>,
    /// Q8_0 weights (their bytes are borrowed the same way).
    blocks: Vec<Arc<QTensor>>,
    /// Weights packed for the AVX-512 kernel (`Linear::packed`).
    packs: Vec<Arc<Packed>>,
}

/// Where cache rows are in [`Inputs`]: among the f32 tensors or the f16 ones.
#[derive(Clone, Copy)]
enum RowsIx {
    F32(usize),
    F16(usize),
}

/// Which dtype a layer's new window rows are stored in.
#[derive(Clone, Copy, PartialEq)]
enum RowsDtype {
    F32,
    F16,
}

impl RowsDtype {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            _ => None,
        }
    }
}

impl Inputs {
    /// Registers cache rows (a contiguous f32 or f16 CPU tensor; `None` otherwise).
    fn add_rows(&mut self, t: &Tensor) -> Option<RowsIx> {
        match t.dtype() {
            DType::F16 if t.device().is_cpu() && t.is_contiguous() => {
                self.halves.push(t.clone());
                Some(RowsIx::F16(self.halves.len() - 1))
            }
            _ => self.add(t).map(RowsIx::F32),
        }
    }

    /// Registers `t` (a contiguous f32 CPU tensor; `None` otherwise).
    fn add(&mut self, t: &Tensor) -> Option<usize> {
        if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
            return None;
        }
        self.tensors.push(t.clone());
        Some(self.tensors.len() - 1)
    }

    /// A dense f32 or a Q8_0 projection (`None` for other formats or an unmerged adapter):
    /// its packed panels where the CPU has AVX-512, its tensor's data otherwise.
    fn add_linear(&mut self, lin: &Linear) -> Option<Proj> {
        let ((n, k), w, b) = match (lin.plain_f32(), lin.plain_q8_0()) {
            (Some((_, b)), _) | (None, Some((_, b))) if lin.packed().is_some() => {
                let p = lin.packed()?.clone();
                self.packs.push(p.clone());
                (p.dims(), Weight::Packed(self.packs.len() - 1), b)
            }
            (Some((w, b)), _) => (w.dims2().ok()?, Weight::Dense(self.add(w)?), b),
            (None, Some((q, b))) => {
                let dims = q.shape().dims2().ok()?;
                if !q.device().is_cpu() || dims.1 % matvec_q8::BLOCK != 0 {
                    return None;
                }
                self.blocks.push(q);
                (dims, Weight::Q8_0(self.blocks.len() - 1), b)
            }
            (None, None) => return None,
        };
        Some(Proj {
            w,
            b: match b {
                Some(b) => Some(self.add(b)?),
                None => None,
            },
            n,
            k,
        })
    }
}

/// A projection `[n, k]`: indices of its weight and bias in [`Inputs`].
#[derive(Clone, Copy)]
struct Proj {
    w: Weight,
    b: Option<usize>,
    n: usize,
    k: usize,
}

/// Where a projection's weight is: dense f32 (index into the tensors), Q8_0 blocks (index
/// into the block tensors) or packed panels (index into the packed weights).
#[derive(Clone, Copy)]
enum Weight {
    Dense(usize),
    Q8_0(usize),
    /// Index into the packed weights.
    Packed(usize),
}

impl Proj {
    /// Output columns per claimed band: whole panels of the AVX-512 kernel for a packed
    /// weight, [`BAND`] rows otherwise.
    fn band(&self) -> usize {
        match self.w {
            Weight::Packed(_) => PACKED_BAND,
            Weight::Dense(_) | Weight::Q8_0(_) => BAND,
        }
    }
}

struct LayerIx {
    input_norm: usize,
    post_norm: usize,
    qkv: [Proj; 3],
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
    mix: Mix,
}

/// One sequence's state in one layer: its cache (indices of keys and values, rows), how
/// many rows the cache keeps, and its recurrent memory when the layer has one.
struct SeqLayerIx {
    cached: Option<Cached>,
    /// Rows a query sees through its window besides its own: the cache's capacity.
    window: usize,
    keep: usize,
    /// What the cache stores its rows in.
    stored: RowsDtype,
    memory: Option<usize>,
    /// The global cache's keys and values, when it has entries.
    global: Option<GlobalRows>,
    /// Which global rows are past the distance cap, `[hkv * rows]` (empty: none).
    global_far: Vec<bool>,
    /// Values per KV head the layer measures for the global cache (`Mix::scoring`): the
    /// span's attention shares of the window rows (cached, then its own), then its tokens'
    /// recall scores.
    scores: usize,
    /// Whether the layer measures attention shares, and recall scores.
    scoring: (bool, bool),
}

impl SeqLayerIx {
    /// Rows per KV head a token adds to the cache: 1, or 0 for a cache of capacity 0.
    fn token_rows(&self) -> usize {
        usize::from(self.keep > 0)
    }

    fn cached_len(&self) -> usize {
        self.cached.map_or(0, |c| c.len)
    }
}

/// A sequence's tokens in the step: rows `first..first + len` of the projections, from
/// position `position`.
#[derive(Clone, Copy)]
struct Span {
    first: usize,
    len: usize,
    position: usize,
}

/// A global cache's kept rows in the step's inputs: its key and value buffers
/// (`[hkv, room, d]`), whose first `n` rows per head are kept entries.
#[derive(Clone, Copy)]
struct GlobalRows {
    k: RowsIx,
    v: RowsIx,
    n: usize,
    room: usize,
}

/// A cache's rows in the step's inputs: its key and value buffers (`[hkv, room, d]`), and
/// where in them the `len` rows start.
#[derive(Clone, Copy)]
struct Cached {
    k: RowsIx,
    v: RowsIx,
    start: usize,
    len: usize,
    room: usize,
}

/// The token's cache rows (`[hkv, 1, d]`), in the dtype the cache stores them in; the
/// state's `KvCache::push` appends them. Allocated uninitialized: the buffer is cut into
/// one part per KV head (`Step::group`), each written whole by that group's `write_row`.
enum NewRows {
    F32(Vec<MaybeUninit<f32>>),
    F16(Vec<MaybeUninit<f16>>),
}

impl NewRows {
    fn uninit(dtype: RowsDtype, n: usize) -> Self {
        match dtype {
            RowsDtype::F32 => Self::F32(crate::uninit::vec(n)),
            RowsDtype::F16 => Self::F16(crate::uninit::vec(n)),
        }
    }

    fn shared(&mut self) -> SharedRows<'_> {
        match self {
            Self::F32(x) => SharedRows::F32(Shared::new(x)),
            Self::F16(x) => SharedRows::F16(Shared::new(x)),
        }
    }

    /// The rows, once the step has run.
    ///
    /// # Safety
    /// Every group of the step has written its part (the parts cover the buffer).
    unsafe fn into_tensor(self, shape: (usize, usize, usize)) -> Result<Tensor> {
        let device = candle_core::Device::Cpu;
        Ok(match self {
            Self::F32(x) => Tensor::from_vec(crate::uninit::assume_init(x), shape, &device)?,
            Self::F16(x) => Tensor::from_vec(crate::uninit::assume_init(x), shape, &device)?,
        })
    }
}

/// [`NewRows`] shared among the step's threads.
enum SharedRows<'a> {
    F32(Shared<'a, MaybeUninit<f32>>),
    F16(Shared<'a, MaybeUninit<f16>>),
}

impl SharedRows<'_> {
    /// # Safety
    /// As [`Shared::part`].
    unsafe fn part(&self, range: std::ops::Range<usize>) -> RowsMut<'_> {
        match self {
            Self::F32(x) => RowsMut::F32(x.part(range)),
            Self::F16(x) => RowsMut::F16(x.part(range)),
        }
    }
}

/// The LM head's screen in a step's inputs: its Q8_0 copy, and the f32 head (a tensor)
/// whose rows it computes exactly.
#[derive(Clone, Copy)]
struct Screened {
    approx: Proj,
    head: usize,
}

/// What a sequence's tokens produced in one layer.
struct SeqLayerOut {
    new_k: NewRows,
    new_v: NewRows,
    memory: Option<Vec<MaybeUninit<f32>>>,
    /// `[hkv, scores]`, when measured (`SeqLayerIx::scores`).
    salience: Vec<f32>,
}

/// Fused steps taken by this process (for tests that must know the fused path ran).
static STEPS_TAKEN: AtomicU64 = AtomicU64::new(0);

/// Logits rows this process settled through the LM head's screen (for tests).
static SCREENED_ROWS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn screened_rows() -> u64 {
    SCREENED_ROWS.load(Ordering::Relaxed)
}

pub(crate) fn steps_taken() -> u64 {
    STEPS_TAKEN.load(Ordering::Relaxed)
}

/// Whether the fused step takes a sequence's `tokens` (a decode token, or a span of at most
/// [`SHORT_SPAN`]).
pub(crate) fn is_short(tokens: &[u32]) -> bool {
    (1..=SHORT_SPAN).contains(&tokens.len())
}

/// Runs every sequence's tokens (a decode token, or a short span) when the model and
/// states allow it, with logits per sequence as `logits` asks (`Model::forward_batch`).
/// Returns `None`, touching nothing, when the step must take the general path. Advances
/// nothing but the states' contents: the caller moves their positions on.
pub(crate) fn step(
    refs: &ModelRefs,
    seqs: &mut [SeqStep<'_>],
    logits: Logits,
) -> Result<Option<Vec<Tensor>>> {
    let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    if seqs.is_empty() || rows > MAX_BATCH || !seqs.iter().all(|s| is_short(s.tokens)) {
        return Ok(None);
    }
    let Some(plan) = Plan::new(refs, seqs) else {
        return Ok(None);
    };
    // Read locks on every tensor the step reads, held until the threads are done. A storage
    // may be locked more than once (forked states share tensors; a tied head is the
    // embedding): harmless, since nothing writes weights or states in place while a step
    // runs (states are replaced, never mutated; the caches' in-place appends come after,
    // in `store`, once these locks are dropped).
    let guards: Vec<_> = plan
        .inputs
        .tensors
        .iter()
        .map(|t| t.storage_and_layout())
        .collect();
    let half_guards: Vec<_> = plan
        .inputs
        .halves
        .iter()
        .map(|t| t.storage_and_layout())
        .collect();
    let slices = cpu_slices(&guards, |s| match s {
        CpuStorage::F32(data) => Some(data.as_slice()),
        _ => None,
    });
    let halves = cpu_slices(&half_guards, |s| match s {
        CpuStorage::F16(data) => Some(data.as_slice()),
        _ => None,
    });
    let (Some(slices), Some(halves)) = (slices, halves) else {
        return Ok(None);
    };
    // On the CPU these borrow the blocks' storage (no copy).
    let bytes: Vec<Cow<[u8]>> = plan
        .inputs
        .blocks
        .iter()
        .map(|q| q.data())
        .collect::<candle_core::Result<_>>()?;
    let bytes: Vec<&[u8]> = bytes.iter().map(|b| b.as_ref()).collect();
    let (mut all_logits, x, outs) = plan.run(refs, (&slices, &halves, &bytes), seqs);
    if let Some(screened) = plan.screen {
        plan.pick(refs, (screened, &slices), &x, (&mut all_logits, logits))?;
    }
    drop(slices);
    drop(halves);
    drop(guards);
    drop(half_guards);
    let (_, hkv, d) = refs.heads;
    let out = plan.store((hkv, d), seqs, (all_logits, logits), outs)?;
    STEPS_TAKEN.fetch_add(1, Ordering::Relaxed);
    Ok(Some(out))
}

/// The step's inputs, locked: f32 tensors, f16 cache rows, Q8_0 blocks.
type Locked<'a> = (&'a [&'a [f32]], &'a [&'a [f16]], &'a [&'a [u8]]);

/// The contiguous data of each locked storage, as `data` reads a CPU storage of the
/// expected dtype (`None` if any is not one).
fn cpu_slices<'g, T, G: std::ops::Deref<Target = Storage>>(
    guards: &'g [(G, &candle_core::Layout)],
    data: impl Fn(&CpuStorage) -> Option<&[T]>,
) -> Option<Vec<&'g [T]>> {
    guards
        .iter()
        .map(
            |(storage, layout)| match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(cpu), Some((a, b))) => data(cpu).map(|d| &d[a..b]),
                _ => None,
            },
        )
        .collect()
}

/// Everything a step needs, checked and numbered before any thread starts.
struct Plan {
    inputs: Inputs,
    embed: usize,
    norm: usize,
    lm_head: Proj,
    /// Where the step reads the head's screen instead (every sequence greedy).
    screen: Option<Screened>,
    layers: Vec<LayerIx>,
    /// `[layer][seq]`
    states: Vec<Vec<SeqLayerIx>>,
    /// Per sequence.
    spans: Vec<Span>,
    /// Tokens in all: the projections' rows.
    rows: usize,
    /// The RoPE table of the global caches' distance cap (`Mix::Liger::max_distance`).
    cap_rope: Option<(Vec<f32>, Vec<f32>)>,
    hidden: usize,
    intermediate: usize,
}

impl Plan {
    fn new(refs: &ModelRefs, seqs: &[SeqStep<'_>]) -> Option<Self> {
        let mut inputs = Inputs::default();
        let (h, hkv, d) = refs.heads;
        let embed = inputs.add(refs.embed)?;
        let (_, hidden) = refs.embed.dims2().ok()?;
        let norm = inputs.add(refs.norm)?;
        let lm_head = inputs.add_linear(refs.lm_head)?;
        let mut layers = Vec::with_capacity(refs.layers.len());
        for l in &refs.layers {
            let [q, k, v, o] = l.attn.map(|p| inputs.add_linear(p));
            let [gate, up, down] = l.mlp.map(|p| inputs.add_linear(p));
            layers.push(LayerIx {
                input_norm: inputs.add(l.input_norm)?,
                post_norm: inputs.add(l.post_norm)?,
                qkv: [q?, k?, v?],
                o: o?,
                gate: gate?,
                up: up?,
                down: down?,
                mix: l.mix,
            });
        }
        let shapes_fit = layers.iter().all(|l| {
            let [q, k, v] = l.qkv;
            q.n == h * d
                && k.n == hkv * d
                && v.n == hkv * d
                && [q.k, k.k, v.k, l.gate.k, l.up.k, l.o.n, l.down.n]
                    .iter()
                    .all(|&x| x == hidden)
                && l.o.k == h * d
                && l.gate.n == l.up.n
                && l.down.k == l.gate.n
        }) && lm_head.k == hidden;
        if !shapes_fit || layers.is_empty() {
            return None;
        }
        let intermediate = layers[0].gate.n;
        // One cap for the model: every Liger layer has the same settings.
        let cap_rope = refs.layers.iter().find_map(|l| match l.mix {
            Mix::Liger {
                max_distance: Some(cap),
                ..
            } => {
                let angles = refs.inv_freq.iter().map(|f| cap as f32 * f);
                Some((
                    angles.clone().map(f32::cos).collect(),
                    angles.map(f32::sin).collect(),
                ))
            }
            _ => None,
        });
        let mut spans = Vec::with_capacity(seqs.len());
        let mut rows = 0;
        for s in seqs {
            spans.push(Span {
                first: rows,
                len: s.tokens.len(),
                position: s.state.position,
            });
            rows += s.tokens.len();
        }
        let screen = match (refs.screen, refs.lm_head.plain_f32(), lm_head.w) {
            (Some(s), Some((w, None)), Weight::Packed(_))
                if rows <= SCREEN_ROWS && seqs.iter().all(|s| s.argmax_only) =>
            {
                // (A head the step cannot read as one f32 slice is read in full instead.)
                inputs.add(w).map(|head| {
                    let (n, k) = s.approx().dims();
                    inputs.packs.push(s.approx().clone());
                    let approx = Weight::Packed(inputs.packs.len() - 1);
                    Screened {
                        approx: Proj {
                            w: approx,
                            b: None,
                            n,
                            k,
                        },
                        head,
                    }
                })
            }
            _ => None,
        };
        let mut states = Vec::with_capacity(layers.len());
        for (li, layer) in layers.iter().enumerate() {
            let mut per_seq = Vec::with_capacity(seqs.len());
            for (s, span) in seqs.iter().zip(&spans) {
                let t = span.len;
                let mut global = None;
                let mut global_far = Vec::new();
                let (cache, memory) = match (&s.state.layers.get(li)?, layer.mix) {
                    (LayerState::Softmax(cache), Mix::Softmax) => (cache, None),
                    (
                        LayerState::Liger {
                            window,
                            recurrent,
                            global: g,
                        },
                        Mix::Liger {
                            memory: keeps_memory,
                            global: has_global,
                            recall_scores,
                            max_distance,
                            ..
                        },
                    ) => {
                        let memory = if !keeps_memory {
                            None
                        } else {
                            if recurrent.dims() != [1, hkv, d, d] {
                                return None;
                            }
                            Some(inputs.add(recurrent)?)
                        };
                        if has_global != g.is_enabled() {
                            return None;
                        }
                        if recall_scores && memory.is_none() {
                            return None;
                        }
                        if let Some((k, v, n)) = g.buffers() {
                            let (kh, room, kd) = k.dims3().ok()?;
                            if (kh, kd) != (hkv, d) || v.dims() != k.dims() || n > room {
                                return None;
                            }
                            let (k, v) = (inputs.add_rows(k)?, inputs.add_rows(v)?);
                            global = Some(GlobalRows { k, v, n, room });
                            if max_distance.is_some() {
                                // Stored un-rotated exactly when this query scores them at
                                // the cap.
                                global_far = g.raw_entries(span.position).concat();
                                // A span's later queries score them alike (none passes
                                // the cap during the span).
                                if t > 1
                                    && g.raw_entries(span.position + t - 1).concat() != global_far
                                {
                                    return None;
                                }
                            }
                        }
                        if t > 1 && has_global && !span_fits_global(g, window, t, hkv) {
                            return None;
                        }
                        (window, memory)
                    }
                    _ => return None,
                };
                let cached = match cache.buffers() {
                    None => None,
                    Some((k, v, start, len)) => {
                        let (kh, room, kd) = k.dims3().ok()?;
                        if (kh, kd) != (hkv, d) || v.dims() != k.dims() || start + len > room {
                            return None;
                        }
                        Some(Cached {
                            k: inputs.add_rows(k)?,
                            v: inputs.add_rows(v)?,
                            start,
                            len,
                            room,
                        })
                    }
                };
                let stored = RowsDtype::of(cache.stored_dtype().unwrap_or(DType::F32))?;
                let window = cache.capacity().unwrap_or(usize::MAX);
                // A span's tokens all stay in the window to its end (its rows are pushed
                // together, and its queries see all of its earlier tokens).
                if t > window.max(1) {
                    return None;
                }
                let total = cached.map_or(0, |c| c.len) + t;
                let scoring = layer.mix.scoring();
                let scores = if scoring.0 { total } else { 0 } + if scoring.1 { t } else { 0 };
                per_seq.push(SeqLayerIx {
                    cached,
                    window,
                    keep: total.min(window),
                    stored,
                    memory,
                    global,
                    global_far,
                    scores,
                    scoring,
                });
            }
            states.push(per_seq);
        }
        Some(Self {
            inputs,
            embed,
            norm,
            lm_head,
            screen,
            layers,
            states,
            spans,
            rows,
            cap_rope,
            hidden,
            intermediate,
        })
    }

    /// The head's product the step runs: the screen's, or the f32 head's.
    fn head(&self) -> Proj {
        *self.head_ref()
    }

    fn head_ref(&self) -> &Proj {
        self.screen.as_ref().map_or(&self.lm_head, |s| &s.approx)
    }

    /// Runs the step on the locked `slices`. Returns the logits `[tokens, vocab]` (the
    /// screen's, where the step reads it), the residual stream after the last layer, and,
    /// per layer and sequence, the new state parts.
    fn run(
        &self,
        refs: &ModelRefs,
        (slices, halves, blocks): Locked,
        seqs: &[SeqStep<'_>],
    ) -> (Vec<f32>, Vec<f32>, Vec<Vec<SeqLayerOut>>) {
        let nb = self.rows;
        let (h, hkv, d) = refs.heads;
        let mut x = vec![0f32; nb * self.hidden];
        let table = slices[self.embed];
        let tokens = seqs.iter().flat_map(|s| s.tokens);
        for (row, &t) in x.chunks_mut(self.hidden).zip(tokens) {
            let t = t as usize;
            row.copy_from_slice(&table[t * self.hidden..(t + 1) * self.hidden]);
        }
        // Per row: each token's position.
        let rope: Vec<(Vec<f32>, Vec<f32>)> = self
            .spans
            .iter()
            .flat_map(|s| s.position..s.position + s.len)
            .map(|p| {
                let angles = refs.inv_freq.iter().map(|f| p as f32 * f);
                (
                    angles.clone().map(f32::cos).collect(),
                    angles.map(f32::sin).collect(),
                )
            })
            .collect();
        let mut outs: Vec<Vec<SeqLayerOut>> = self
            .states
            .iter()
            .map(|per_seq| {
                per_seq
                    .iter()
                    .zip(&self.spans)
                    .map(|(s, span)| {
                        let rows = hkv * span.len * s.token_rows() * d;
                        SeqLayerOut {
                            new_k: NewRows::uninit(s.stored, rows),
                            new_v: NewRows::uninit(s.stored, rows),
                            memory: s.memory.map(|_| crate::uninit::vec(hkv * d * d)),
                            salience: vec![0f32; hkv * s.scores],
                        }
                    })
                    .collect()
            })
            .collect();
        let mut q = vec![0f32; nb * h * d];
        let mut k = vec![0f32; nb * hkv * d];
        let mut v = vec![0f32; nb * hkv * d];
        let mut mixed = vec![0f32; nb * h * d];
        let mut act = vec![0f32; nb * self.intermediate];
        let mut logits = vec![0f32; nb * self.lm_head.n];
        let threads = rayon::current_num_threads().max(1);
        let new_state: Vec<Vec<NewState>> = outs
            .iter_mut()
            .map(|per_seq| {
                per_seq
                    .iter_mut()
                    .map(|o| {
                        let memory = o.memory.as_deref_mut().unwrap_or(&mut []);
                        NewState {
                            k: o.new_k.shared(),
                            v: o.new_v.shared(),
                            memory: Shared::new(memory),
                            salience: Shared::new(&mut o.salience),
                        }
                    })
                    .collect()
            })
            .collect();
        // The global caches whose admissions a span's tokens replay (`mix_layer`).
        let globals: Vec<Vec<Option<&GlobalCache>>> = (0..self.layers.len())
            .map(|li| {
                seqs.iter()
                    .zip(&self.spans)
                    .map(|(s, span)| match s.state.layers.get(li) {
                        Some(LayerState::Liger { global, .. })
                            if span.len > 1 && global.is_enabled() =>
                        {
                            Some(global)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let step = Step {
            plan: self,
            slices,
            halves,
            blocks,
            globals,
            nb,
            heads: refs.heads,
            eps: refs.eps,
            rope: &rope,
            x: Shared::new(&mut x),
            qkv: [
                Shared::new(&mut q),
                Shared::new(&mut k),
                Shared::new(&mut v),
            ],
            mixed: Shared::new(&mut mixed),
            act: Shared::new(&mut act),
            logits: Shared::new(&mut logits),
            new_state,
            counters: (0..5 * self.layers.len() + 1)
                .map(|_| AtomicUsize::new(0))
                .collect(),
            barrier: SpinBarrier::new(threads),
        };
        if threads > 1 && rayon::current_thread_index().is_none() {
            // rayon's pool threads already exist: waking them once per token costs far less
            // than spawning threads (which grows with the core count). The caller waits.
            rayon::broadcast(|_| step.worker());
        } else {
            // One thread (the caller alone), or called from inside the pool (whose threads
            // may be busy with the caller's own job): threads of our own, the caller among them.
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    let step = &step;
                    scope.spawn(move || step.worker());
                }
                step.worker();
            });
        }
        drop(step);
        (logits, x, outs)
    }

    /// The greedy rows' logits, from the screen's (`HeadScreen::pick`): exact wherever
    /// they can be the largest, `-inf` elsewhere; a row the screen cannot settle is
    /// computed in full by the f32 head. Rows the caller does not read (`which`) are left.
    fn pick(
        &self,
        refs: &ModelRefs,
        (screened, slices): (Screened, &[&[f32]]),
        x: &[f32],
        (logits, which): (&mut [f32], Logits),
    ) -> Result<()> {
        let screen = refs.screen.expect("a screened step has a screen");
        let (hidden, n) = (self.hidden, self.lm_head.n);
        let mut xn = vec![0f32; self.rows * hidden];
        mixing::rms_norm(x, slices[self.norm], refs.eps, &mut xn);
        let head = slices[screened.head];
        let read: Vec<usize> = self
            .spans
            .iter()
            .flat_map(|s| match which {
                Logits::All => s.first..s.first + s.len,
                Logits::Last => s.first + s.len - 1..s.first + s.len,
            })
            .collect();
        let most = screen_most();
        let settle = |(r, row): (usize, &mut [f32])| {
            let x = &xn[r * hidden..][..hidden];
            let wanted = read.binary_search(&r).is_ok();
            (wanted && !screen.pick(head, x, row, most)).then_some(r)
        };
        let unsettled: Vec<usize> = if read.len() > 1 {
            logits
                .par_chunks_mut(n)
                .enumerate()
                .filter_map(settle)
                .collect()
        } else {
            logits
                .chunks_mut(n)
                .enumerate()
                .filter_map(settle)
                .collect()
        };
        SCREENED_ROWS.fetch_add((read.len() - unsettled.len()) as u64, Ordering::Relaxed);
        if unsettled.is_empty() {
            return Ok(());
        }
        let Weight::Packed(full) = self.lm_head.w else {
            unreachable!("a screened step's head is packed (`Plan::new`)");
        };
        let device = Device::Cpu;
        for r in unsettled {
            let x = Tensor::from_slice(&xn[r * hidden..][..hidden], (1, hidden), &device)?;
            let row = gemm::matmul_packed(&x, &[self.inputs.packs[full].as_ref()])?;
            let row: Vec<f32> = row[0].flatten_all()?.to_vec1()?;
            logits[r * n..][..n].copy_from_slice(&row);
        }
        Ok(())
    }

    /// Writes the new state parts into the sequences' states and splits the logits: all of
    /// a sequence's rows, or its last, as `which` asks.
    fn store(
        &self,
        (hkv, d): (usize, usize),
        seqs: &mut [SeqStep<'_>],
        (logits, which): (Vec<f32>, Logits),
        outs: Vec<Vec<SeqLayerOut>>,
    ) -> Result<Vec<Tensor>> {
        let device = candle_core::Device::Cpu;
        // Each (layer, sequence) pair's update is its own: the global cache's choice alone
        // is ~35 us of candle ops per pair, a quarter of a 32-sequence step when it ran on
        // one thread while the others waited.
        let mut per_seq_layers: Vec<_> =
            seqs.iter_mut().map(|s| s.state.layers.iter_mut()).collect();
        let mut jobs = Vec::with_capacity(outs.len() * self.spans.len());
        for (li, per_seq) in outs.into_iter().enumerate() {
            for ((si, out), layers) in per_seq.into_iter().enumerate().zip(&mut per_seq_layers) {
                let layer = layers.next().expect("a state per layer");
                jobs.push((li, si, layer, out));
            }
        }
        jobs.into_par_iter().try_for_each(|(li, si, layer, out)| {
            self.store_one((li, si), (hkv, d), self.spans[si].position, layer, out)
        })?;
        let logits = Tensor::from_vec(logits, (self.rows, self.lm_head.n), &device)?;
        self.spans
            .iter()
            .map(|s| {
                Ok(match which {
                    Logits::All => logits.narrow(0, s.first, s.len)?,
                    Logits::Last => logits.narrow(0, s.first + s.len - 1, 1)?,
                })
            })
            .collect()
    }

    /// Writes layer `li`'s new state parts into sequence `si`'s `layer`.
    fn store_one(
        &self,
        (li, si): (usize, usize),
        (hkv, d): (usize, usize),
        position: usize,
        layer: &mut LayerState,
        out: SeqLayerOut,
    ) -> Result<()> {
        let kv = if self.states[li][si].token_rows() == 0 {
            None
        } else {
            let shape = (hkv, self.spans[si].len, d);
            // SAFETY: `run` returned, so every group of every layer and sequence ran its
            // `write_row` over its whole part (a panicking worker would have ended the
            // step before this).
            unsafe { Some((out.new_k.into_tensor(shape)?, out.new_v.into_tensor(shape)?)) }
        };
        let push = |cache: &mut crate::state::KvCache, kv: Option<(Tensor, Tensor)>| match kv {
            Some((k, v)) => cache.push(&k, &v),
            None => {
                cache.clear();
                Ok(())
            }
        };
        match layer {
            LayerState::Softmax(cache) => push(cache, kv)?,
            LayerState::Liger {
                window,
                recurrent,
                global,
            } => {
                if global.is_enabled() {
                    let new = kv.clone().expect("a window keeps the new token");
                    let n = self.states[li][si].scores;
                    let (attention_scores, recall_scores) = self.layers[li].mix.scoring();
                    let per_head: Vec<&[f32]> = match n {
                        0 => vec![&[][..]; hkv],
                        n => out.salience.chunks(n).collect(),
                    };
                    let t = self.spans[si].len;
                    let recall_at = n - if recall_scores { t } else { 0 };
                    let mass: Option<Vec<&[f32]>> = attention_scores
                        .then(|| per_head.iter().map(|h| &h[..recall_at]).collect());
                    let recall: Option<Vec<&[f32]>> =
                        recall_scores.then(|| per_head.iter().map(|h| &h[recall_at..]).collect());
                    let places = window.capacity().unwrap_or(usize::MAX);
                    global.decode_step(
                        position,
                        places,
                        window.parts(),
                        (&new.0, &new.1),
                        (mass.as_deref(), recall.as_deref()),
                    )?;
                }
                push(window, kv)?;
                if let Some(memory) = out.memory {
                    // SAFETY: as for the rows above: every group wrote its head's memory.
                    let memory = unsafe { crate::uninit::assume_init(memory) };
                    *recurrent = Tensor::from_vec(memory, (1, hkv, d, d), &Device::Cpu)?;
                }
            }
        }
        Ok(())
    }
}

/// Weight bytes a waiting thread prefetches for the next phase, at most: a quarter of a
/// core's L2 on the CPUs measured (batch 1, f32: 64 KB bought nothing, 512 KB and 1 MB
/// 2-3%, 2 MB less).
const AHEAD_BYTES: usize = 512 << 10;

/// A prefetch in progress over some byte ranges (see `Step::ahead`), a few lines per call.
struct Ahead<'a> {
    pieces: Vec<&'a [u8]>,
    piece: usize,
    at: usize,
    left: usize,
}

impl<'a> Ahead<'a> {
    fn new(pieces: Vec<&'a [u8]>, most: usize) -> Self {
        Self {
            pieces,
            piece: 0,
            at: 0,
            left: most,
        }
    }

    /// The next cache line to ask for: every 64th byte of the pieces in order, until
    /// `most` bytes are asked for.
    fn next_line(&mut self) -> Option<&'a u8> {
        while self.left > 0 {
            let piece = self.pieces.get(self.piece)?;
            if let Some(byte) = piece.get(self.at) {
                self.at += 64;
                self.left = self.left.saturating_sub(64);
                return Some(byte);
            }
            self.piece += 1;
            self.at = 0;
        }
        None
    }

    /// Asks for the next few cache lines (few, so that a waiting thread sees the barrier
    /// open soon); `false` once there is nothing left to ask for.
    fn step(&mut self) -> bool {
        for _ in 0..4 {
            match self.next_line() {
                Some(byte) => prefetch_line(byte),
                None => return false,
            }
        }
        true
    }
}

/// The first `most` bytes (or a little more) of some weights, one band of each in turn:
/// `weights` holds each one's bytes and bytes per band.
fn band_pieces<'a>(weights: &[(&'a [u8], usize)], most: usize) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut total = 0;
    for b in 0.. {
        let mut any = false;
        for &(all, per) in weights {
            let piece = all
                .get(b * per..((b + 1) * per).min(all.len()))
                .unwrap_or(&[]);
            if !piece.is_empty() {
                any = true;
                pieces.push(piece);
                total += piece.len();
                if total >= most {
                    return pieces;
                }
            }
        }
        if !any {
            return pieces;
        }
    }
    unreachable!("the loop returns once the weights are walked")
}

/// Asks for the cache line holding `byte` into L2 (a hint: it cannot fault).
#[inline]
fn prefetch_line(byte: &u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is SSE (every x86-64 CPU) and only hints at an address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>((byte as *const u8).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = byte;
}

/// The shared context of one step's threads.
struct Step<'a> {
    plan: &'a Plan,
    slices: &'a [&'a [f32]],
    halves: &'a [&'a [f16]],
    blocks: &'a [&'a [u8]],
    /// `[layer][seq]`: the global cache of a sequence with a span of several tokens.
    globals: Vec<Vec<Option<&'a GlobalCache>>>,
    /// Tokens (rows) in all.
    nb: usize,
    heads: (usize, usize, usize),
    eps: f32,
    /// cos and sin per row.
    rope: &'a [(Vec<f32>, Vec<f32>)],
    /// The residual stream `[nb, hidden]`.
    x: Shared<'a>,
    /// Raw q `[nb, h*d]`, k and v `[nb, hkv*d]`.
    qkv: [Shared<'a>; 3],
    mixed: Shared<'a>,
    act: Shared<'a>,
    logits: Shared<'a>,
    /// `[layer][seq]`: new keys, values, recurrent memory.
    new_state: Vec<Vec<NewState<'a>>>,
    /// One work counter per phase (five per layer, then the LM head), claimed from by all
    /// threads; fresh each step, so never reset.
    counters: Vec<AtomicUsize>,
    barrier: SpinBarrier,
}

/// Where one sequence's new state parts in one layer go.
struct NewState<'a> {
    k: SharedRows<'a>,
    v: SharedRows<'a>,
    memory: Shared<'a, MaybeUninit<f32>>,
    salience: Shared<'a>,
}

/// A projection phase's input: the rows `[nb, k]`, and packed for the AVX-512 kernel
/// (`gemm::pack_input`; empty when no projection of the phase has packed panels).
#[derive(Clone, Copy)]
struct Input<'a> {
    rows: &'a [f32],
    packed: &'a [f32],
}

/// What a projection does with its output rows.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// `out = xW^T + b`
    Store(&'a Shared<'a>),
    /// `out += xW^T + b` (the residual add).
    Accumulate(&'a Shared<'a>),
}

impl Step<'_> {
    fn worker(&self) {
        let _poison_on_panic = PanicGuard(&self.barrier);
        let plan = self.plan;
        let (nb, hidden) = (self.nb, plan.hidden);
        let mut xn = vec![0f32; nb * hidden];
        let mut bands = (Vec::new(), Vec::new());
        // A phase's input packed for the AVX-512 kernel, by each thread for itself.
        let mut packed_in = Vec::new();
        let mut scratch = (Scratch::default(), SpanScratch::default());
        // Work is claimed, not assigned: a thread that falls behind (a busy core, a
        // descheduled vCPU) takes fewer bands instead of holding everyone at the barrier.
        let mut phase = self.counters.iter();
        let mut claim = || phase.next().expect("a counter per phase");
        for (li, layer) in plan.layers.iter().enumerate() {
            // SAFETY (every `read`/`part` below): the phases are separated by barriers; in
            // each, a buffer is either only read, or written in parts claimed by one thread
            // (bands of rows of a projection, (seq, kv head) units of the mixing).
            let x = unsafe { self.x.read() };
            mixing::rms_norm(x, self.slices[layer.input_norm], self.eps, &mut xn);
            let qkv: Vec<(Proj, Epilogue)> = layer
                .qkv
                .iter()
                .zip(&self.qkv)
                .map(|(p, out)| (*p, Epilogue::Store(out)))
                .collect();
            self.project(&qkv, &xn, claim(), (&mut bands.0, &mut packed_in));
            // The o projection's prefetch goes on from the first barrier to the second.
            let mut o_ahead = self.prefetching(std::slice::from_ref(&layer.o));
            self.barrier.wait_doing(&mut o_ahead);
            self.mix_layer(li, claim(), &mut scratch);
            self.barrier.wait_doing(&mut o_ahead);
            let mixed = unsafe { self.mixed.read() };
            let o = [(layer.o, Epilogue::Accumulate(&self.x))];
            self.project(&o, mixed, claim(), (&mut bands.0, &mut packed_in));
            self.barrier
                .wait_doing(self.prefetching(&[layer.gate, layer.up]));
            let x = unsafe { self.x.read() };
            mixing::rms_norm(x, self.slices[layer.post_norm], self.eps, &mut xn);
            self.gate_up(
                layer,
                &xn,
                claim(),
                (&mut bands.0, &mut bands.1, &mut packed_in),
            );
            self.barrier
                .wait_doing(self.prefetching(std::slice::from_ref(&layer.down)));
            let act = unsafe { self.act.read() };
            let down = [(layer.down, Epilogue::Accumulate(&self.x))];
            self.project(&down, act, claim(), (&mut bands.0, &mut packed_in));
            let next = match plan.layers.get(li + 1) {
                Some(next) => &next.qkv[..],
                None => std::slice::from_ref(plan.head_ref()),
            };
            self.barrier.wait_doing(self.prefetching(next));
        }
        let x = unsafe { self.x.read() };
        mixing::rms_norm(x, self.slices[plan.norm], self.eps, &mut xn);
        let head = [(plan.head(), Epilogue::Store(&self.logits))];
        self.project(&head, &xn, claim(), (&mut bands.0, &mut packed_in));
    }

    /// `input [nb, k] @ W^T (+ b)` for each projection of `projs` (all reading `input`),
    /// written per its epilogue into an `[nb, n]` buffer: bands of [`Proj::band`] columns,
    /// claimed one at a time from `next` until none is left.
    fn project(
        &self,
        projs: &[(Proj, Epilogue)],
        input: &[f32],
        next: &AtomicUsize,
        (band, packed_in): (&mut Vec<f32>, &mut Vec<f32>),
    ) {
        let nb = self.nb;
        band.resize(BAND.max(PACKED_BAND) * nb, 0.0);
        let input = self.input(input, projs.iter().map(|(p, _)| p), packed_in);
        let per_proj: Vec<usize> = projs.iter().map(|(p, _)| p.n.div_ceil(p.band())).collect();
        // Which projection a claim falls in, and its columns.
        let locate = |mut claimed: usize| {
            let pi = per_proj.iter().position(|&count| {
                let here = claimed < count;
                if !here {
                    claimed -= count;
                }
                here
            })?;
            let p = projs[pi].0;
            Some((pi, claimed * p.band()..((claimed + 1) * p.band()).min(p.n)))
        };
        // Each band is claimed one ahead, so its first weights are fetched while the
        // band before it runs.
        let mut upcoming = locate(next.fetch_add(1, Ordering::Relaxed));
        while let Some((pi, sub)) = upcoming {
            upcoming = locate(next.fetch_add(1, Ordering::Relaxed));
            let then = upcoming.as_ref().map_or(&[][..], |(pj, cols)| {
                self.first_bytes(projs[*pj].0, cols.start)
            });
            let (p, epilogue) = projs[pi];
            let bias = p.b.map(|b| self.slices[b]);
            let at = self.product(p, input, sub.clone(), (band, then));
            let (out, add) = match epilogue {
                Epilogue::Store(o) => (o, false),
                Epilogue::Accumulate(o) => (o, true),
            };
            for i in 0..nb {
                let dst = unsafe { out.part(i * p.n + sub.start..i * p.n + sub.end) };
                for (jj, y) in dst.iter_mut().enumerate() {
                    let mut val = band[at(jj, i)];
                    if let Some(b) = bias {
                        val += b[sub.start + jj];
                    }
                    *y = if add { *y + val } else { val };
                }
            }
        }
    }

    /// A phase's input `[nb, k]` for its projections: as it is, and packed into `buf` for
    /// the AVX-512 kernel when one of them has packed panels.
    fn input<'i>(
        &self,
        rows: &'i [f32],
        mut projs: impl Iterator<Item = &'i Proj>,
        buf: &'i mut Vec<f32>,
    ) -> Input<'i> {
        let mut packed: &[f32] = &[];
        if let Some(p) = projs.find(|p| matches!(p.w, Weight::Packed(_))) {
            gemm::pack_input(rows, (self.nb, p.k), buf);
            packed = buf;
        }
        Input { rows, packed }
    }

    /// A barrier's idle work (`SpinBarrier::wait_doing`): the prefetch of `projs`' first
    /// weights, planned on the first call, so only by a thread that waits (the last to
    /// arrive never does).
    fn prefetching<'s>(&'s self, projs: &'s [Proj]) -> impl FnMut() -> bool + 's {
        let mut ahead = None;
        move || ahead.get_or_insert_with(|| self.ahead(projs)).step()
    }

    /// What a thread waiting for the others at a barrier fetches for the projections of
    /// the next phase: their first weights, one band of each projection in turn (as
    /// `gate_up` claims them; `project` claims a whole projection's bands before the next's,
    /// so with Q8_0's smaller weights the first bands of k and v come in before the rest of
    /// q's: all of them read in the phase).
    fn ahead(&self, projs: &[Proj]) -> Ahead<'_> {
        let width = projs.iter().map(|p| p.band()).max().unwrap_or(1);
        let weights: Vec<(&[u8], usize)> = projs
            .iter()
            .map(|&p| {
                let all = self.weight_bytes(p);
                // Bytes per band: the weights are stored a column (or panel) at a time.
                (all, all.len() * width / p.n.max(1))
            })
            .collect();
        Ahead::new(band_pieces(&weights, AHEAD_BYTES), AHEAD_BYTES)
    }

    /// Every weight byte of `p`, in the order its bands read them.
    fn weight_bytes(&self, p: Proj) -> &[u8] {
        match p.w {
            Weight::Packed(i) => self.plan.inputs.packs[i].all_bytes(),
            Weight::Dense(i) => crate::layers::f32_bytes(self.slices[i]),
            Weight::Q8_0(i) => self.blocks[i],
        }
    }

    /// The first weight bytes a band from column `col` of `p` reads (packed panels only:
    /// the other formats are read in row order, which the hardware prefetches).
    fn first_bytes(&self, p: Proj, col: usize) -> &[u8] {
        match p.w {
            Weight::Packed(i) => self.plan.inputs.packs[i].block_bytes(col / gemm::NR, 0),
            Weight::Dense(_) | Weight::Q8_0(_) => &[],
        }
    }

    /// `input @ W[cols]^T` into `band`, whatever the weight's format, fetching `then`
    /// (what the thread reads next) meanwhile; returns where the value of column
    /// `cols.start + jj` for sequence `i` is: `[cols, nb]` for the AVX2 kernels,
    /// `[nb, PACKED_BAND]` for packed panels.
    fn product(
        &self,
        p: Proj,
        input: Input,
        cols: std::ops::Range<usize>,
        (band, then): (&mut [f32], &[u8]),
    ) -> impl Fn(usize, usize) -> usize {
        let nb = self.nb;
        let (col, seq) = match p.w {
            Weight::Dense(i) => {
                matvec::block(input.rows, (nb, p.k), self.slices[i], cols, band);
                (nb, 1)
            }
            Weight::Q8_0(i) => {
                matvec_q8::block(input.rows, (nb, p.k), self.blocks[i], cols, band);
                (nb, 1)
            }
            Weight::Packed(i) => {
                let panels = cols.start / gemm::NR..cols.end.div_ceil(gemm::NR);
                let w = &self.plan.inputs.packs[i];
                gemm::band(input.packed, nb, w, panels, (band, PACKED_BAND), None, then);
                (1, PACKED_BAND)
            }
        };
        move |jj, i| jj * col + i * seq
    }

    /// `silu(x G^T) * (x U^T)` into `act`, in bands claimed from `next`.
    fn gate_up(
        &self,
        layer: &LayerIx,
        xn: &[f32],
        next: &AtomicUsize,
        (band_g, band_u, packed_in): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
    ) {
        let nb = self.nb;
        let (g, u) = (layer.gate, layer.up);
        let (gb, ub) = (g.b.map(|b| self.slices[b]), u.b.map(|b| self.slices[b]));
        band_g.resize(BAND.max(PACKED_BAND) * nb, 0.0);
        band_u.resize(BAND.max(PACKED_BAND) * nb, 0.0);
        let input = self.input(xn, [&g, &u].into_iter(), packed_in);
        // Both take the same columns: whole panels when either is packed.
        let width = g.band().max(u.band());
        let locate = |claimed: usize| {
            (claimed * width < g.n).then(|| claimed * width..((claimed + 1) * width).min(g.n))
        };
        // Claimed one ahead, as in `project`: the gate's band fetches the up band's first
        // weights, which fetches the next gate band's.
        let mut upcoming = locate(next.fetch_add(1, Ordering::Relaxed));
        while let Some(sub) = upcoming {
            upcoming = locate(next.fetch_add(1, Ordering::Relaxed));
            let then = upcoming
                .as_ref()
                .map_or(&[][..], |c| self.first_bytes(g, c.start));
            let up_first = self.first_bytes(u, sub.start);
            let at_g = self.product(g, input, sub.clone(), (band_g, up_first));
            let at_u = self.product(u, input, sub.clone(), (band_u, then));
            // Gathered into rows, then the vectorized SiLU prefill uses (libm's scalar
            // `expf` was ~2% of a batch-8 step).
            let (mut gs, mut us) = ([0f32; GATE_UP_BAND], [0f32; GATE_UP_BAND]);
            let n = sub.len();
            for i in 0..nb {
                for (jj, (gv, uv)) in gs[..n].iter_mut().zip(&mut us[..n]).enumerate() {
                    let j = sub.start + jj;
                    *gv = band_g[at_g(jj, i)] + gb.map_or(0.0, |b| b[j]);
                    *uv = band_u[at_u(jj, i)] + ub.map_or(0.0, |b| b[j]);
                }
                let dst = unsafe { self.act.part(i * g.n + sub.start..i * g.n + sub.end) };
                crate::layers::vexp::silu_mul(&gs[..n], &us[..n], dst);
            }
        }
    }

    /// Layer `li`'s token mixing, (sequence, KV head) units claimed from `next`.
    fn mix_layer(&self, li: usize, next: &AtomicUsize, scratch: &mut (Scratch, SpanScratch)) {
        let hkv = self.heads.1;
        let units = self.plan.spans.len() * hkv;
        loop {
            let unit = next.fetch_add(1, Ordering::Relaxed);
            if unit >= units {
                return;
            }
            self.mix_unit(li, (unit / hkv, unit % hkv), scratch);
        }
    }

    /// Sequence `s`'s tokens in KV head `kvh`'s group of layer `li`, in order.
    fn mix_unit(
        &self,
        li: usize,
        (s, kvh): (usize, usize),
        (scratch, span_scratch): &mut (Scratch, SpanScratch),
    ) {
        let (h, hkv, d) = self.heads;
        let g = h / hkv;
        let layer = &self.plan.layers[li];
        let state = &self.plan.states[li][s];
        let span = self.plan.spans[s];
        let t = span.len;
        let (q, k, v) = unsafe { (self.qkv[0].read(), self.qkv[1].read(), self.qkv[2].read()) };
        // Head `kvh`'s `len` rows from row `start`, of `room` rows per head.
        let rows_of = |ix: RowsIx, room: usize, (start, len): (usize, usize)| {
            let at = (kvh * room + start) * d;
            let range = at..at + len * d;
            match ix {
                RowsIx::F32(i) => Rows::F32(&self.slices[i][range]),
                RowsIx::F16(i) => Rows::F16(&self.halves[i][range]),
            }
        };
        let w = state.cached_len();
        let (global_k, global_v, n) = match state.global {
            Some(g) => (
                rows_of(g.k, g.room, (0, g.n)),
                rows_of(g.v, g.room, (0, g.n)),
                g.n,
            ),
            None => (Rows::EMPTY, Rows::EMPTY, 0),
        };
        let global_far = match (state.global, state.global_far.is_empty()) {
            (Some(GlobalRows { n, .. }), false) => &state.global_far[kvh * n..(kvh + 1) * n],
            _ => &[][..],
        };
        // A span's admissions to the global cache, replayed as its queries go.
        let global = self.globals[li][s];
        let mut admissions = global.map(|c| c.admissions(kvh, state.window, (w, t), true));
        if let Some(a) = &admissions {
            debug_assert_eq!(a.kept_before(), n, "a score per kept entry");
        }
        let NewState {
            k: new_k,
            v: new_v,
            memory,
            salience,
        } = &self.new_state[li][s];
        let token_rows = state.token_rows() * d;
        let salience = if state.scores > 0 {
            let n = state.scores;
            unsafe { salience.part(kvh * n..(kvh + 1) * n) }
        } else {
            &mut []
        };
        let (attention, recall) = state.scoring;
        // The span's attention shares of the window rows (cached, then its own), summed
        // over its queries in order, and its recall scores.
        let sp = span_scratch;
        sized(&mut sp.mass, if attention { w + t } else { 0 }).fill(0.0);
        sized(&mut sp.recall, if recall { t } else { 0 });
        sp.earlier.0.clear();
        sp.earlier.1.clear();
        let mut memory_out = state
            .memory
            .map(|_| unsafe { memory.part(kvh * d * d..(kvh + 1) * d * d) });
        for i in 0..t {
            let row = span.first + i;
            // Cached rows that have left the window before this token.
            let left = (i + w).saturating_sub(state.window);
            let (cached_from, left_seen, hidden): (usize, usize, &[bool]) = match &mut admissions {
                Some(a) => {
                    let mass = &sp.mass;
                    let cache = global.expect("admissions come from a global cache");
                    // (No shares without attention places: the scores stay as they are.)
                    let share = |j: usize| mass.get(j).copied().unwrap_or(0.0);
                    a.advance(i, |j| cache.window_row_scores(kvh, j, share(j)));
                    sp.hidden.clear();
                    sp.hidden.extend((0..n + left).map(|c| !a.keeps(c, i)));
                    let hidden = if sp.hidden.contains(&true) {
                        &sp.hidden[..]
                    } else {
                        &[]
                    };
                    (0, left, hidden)
                }
                // Without a global cache, rows that left are not seen at all.
                None => (left, 0, &[]),
            };
            let (cached_k, cached_v) = match state.cached {
                Some(c) => (
                    rows_of(c.k, c.room, (c.start + cached_from, c.len - cached_from)),
                    rows_of(c.v, c.room, (c.start + cached_from, c.len - cached_from)),
                ),
                None => (Rows::EMPTY, Rows::EMPTY),
            };
            let (cos, sin) = &self.rope[row];
            let input = GroupIn {
                q: &q[row * h * d + kvh * g * d..][..g * d],
                k: &k[row * hkv * d + kvh * d..][..d],
                v: &v[row * hkv * d + kvh * d..][..d],
                cached_k,
                cached_v,
                global_k,
                global_v,
                global_far,
                cos,
                sin,
                cap_rope: self
                    .plan
                    .cap_rope
                    .as_ref()
                    .map(|(c, s)| (c.as_slice(), s.as_slice())),
                earlier: (&sp.earlier.0, &sp.earlier.1),
                left: left_seen,
                hidden,
            };
            // This token's window shares: cached rows from `left`, the span's tokens to it.
            let shares = if attention { w - left + i + 1 } else { 0 };
            let token_out = sized(&mut sp.token, shares + usize::from(recall));
            let at = (kvh * t + i) * token_rows;
            let out = GroupOut {
                out: unsafe {
                    self.mixed
                        .part(row * h * d + kvh * g * d..row * h * d + (kvh + 1) * g * d)
                },
                new_k: unsafe { new_k.part(at..at + token_rows) },
                new_v: unsafe { new_v.part(at..at + token_rows) },
                salience: token_out,
            };
            // The memory before this token: the state's, or the span's previous token's.
            let mem = match (&mut memory_out, state.memory) {
                (Some(last), Some(mi)) => {
                    let [before, after] = &mut sp.memory;
                    let old: &[f32] = if i == 0 {
                        &self.slices[mi][kvh * d * d..(kvh + 1) * d * d]
                    } else {
                        before
                    };
                    let new: &mut [MaybeUninit<f32>] = if i + 1 == t {
                        last
                    } else {
                        let buf = sized(after, d * d);
                        // SAFETY: only written through (`Memory::new`), with plain floats.
                        unsafe { &mut *(buf as *mut [f32] as *mut [MaybeUninit<f32>]) }
                    };
                    Some(Memory { old, new })
                }
                _ => None,
            };
            mixing::mix_group(layer.mix, d, (input, out), mem, scratch);
            if state.memory.is_some() && i + 1 < t {
                sp.memory.swap(0, 1);
            }
            let token_out = &sp.token;
            if attention {
                for (m, &x) in sp.mass[left..].iter_mut().zip(&token_out[..shares]) {
                    *m += x;
                }
            }
            if recall {
                sp.recall[i] = token_out[shares];
            }
            if i + 1 < t {
                sp.earlier.0.extend_from_slice(scratch.last_key());
                sp.earlier
                    .1
                    .extend_from_slice(&v[row * hkv * d + kvh * d..][..d]);
            }
        }
        let (mass_out, recall_out) = salience.split_at_mut(sp.mass.len());
        mass_out.copy_from_slice(&sp.mass);
        recall_out.copy_from_slice(&sp.recall);
    }
}

/// Per-thread working memory of a span's tokens in a unit (`Step::mix_unit`).
#[derive(Default)]
struct SpanScratch {
    mass: Vec<f32>,
    recall: Vec<f32>,
    /// The span's rotated keys and values so far.
    earlier: (Vec<f32>, Vec<f32>),
    hidden: Vec<bool>,
    /// One token's window shares and recall score.
    token: Vec<f32>,
    /// The memory between a span's tokens: before the token, after it.
    memory: [Vec<f32>; 2],
}

/// Whether a span of `t` tokens can replay its global cache's admissions in the fused step:
/// the cache has a score for each window row, and no row that takes a place during the
/// span is past the distance cap for the span's queries.
fn span_fits_global(g: &GlobalCache, window: &crate::state::KvCache, t: usize, hkv: usize) -> bool {
    let w = window.len();
    let scored = w == 0 || (0..hkv).all(|h| g.window_scores_of(h).len() == w);
    let within_cap = match (g.distance_cap(), window.capacity()) {
        (None, _) => true,
        (Some(cap), Some(c)) => c + t <= cap.max,
        (Some(_), None) => false,
    };
    scored && within_cap
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Overrides [`SCREEN_MOST`] for steps this thread runs.
        pub(super) static SCREEN_MOST_HERE: std::cell::Cell<Option<usize>> =
            const { std::cell::Cell::new(None) };
    }

    /// A greedy step whose rows the screen cannot settle (no candidate allowed) computes
    /// them in full: the same bits as a step that asked for every logit.
    #[test]
    fn rows_the_screen_cannot_settle_are_computed_in_full() {
        use crate::testing::{state_after, step_batch_as, Family, SplitMix, TinyCheckpoint};
        if !gemm::available() || !crate::layers::screen::has_fma() {
            return;
        }
        let m = TinyCheckpoint::new(Family::Qwen2, 4)
            .unwrap()
            .with_liger(&crate::LigerConfig {
                window: 4,
                ..Default::default()
            })
            .model(DType::F32)
            .unwrap();
        let mut rng = SplitMix(9);
        let base = state_after(&m, &rng.tokens(6, 61)).unwrap();
        let toks: Vec<Vec<u32>> = vec![rng.tokens(1, 61), rng.tokens(3, 61)];
        let run = |argmax_only: bool| {
            let mut states = [base.clone(), base.clone()];
            let before = (steps_taken(), screened_rows());
            let out = step_batch_as(&m, &mut states, &toks, argmax_only).unwrap();
            assert_eq!(steps_taken(), before.0 + 1, "fused");
            let rows: Vec<Vec<f32>> = out
                .iter()
                .flat_map(|t| t.to_vec2::<f32>().unwrap())
                .collect();
            (rows, screened_rows() - before.1)
        };
        let (full, _) = run(false);
        SCREEN_MOST_HERE.with(|m| m.set(Some(0)));
        let (fallen_back, settled) = run(true);
        SCREEN_MOST_HERE.with(|m| m.set(None));
        assert_eq!(settled, 0, "no row settled by the screen");
        let bits = |rows: &[Vec<f32>]| -> Vec<Vec<u32>> {
            rows.iter()
                .map(|r| r.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&fallen_back), bits(&full));
        let (screened, settled) = run(true);
        assert_eq!(settled, 4, "every row settled");
        assert!(screened.iter().flatten().any(|v| *v == f32::NEG_INFINITY));
    }

    #[test]
    fn band_pieces_take_one_band_of_each_weight_in_turn_up_to_the_budget() {
        let (gate, up) = ([1u8; 10], [2u8; 10]);
        let pieces = band_pieces(&[(&gate[..], 4), (&up[..], 4)], usize::MAX);
        let lens: Vec<(u8, usize)> = pieces.iter().map(|p| (p[0], p.len())).collect();
        assert_eq!(lens, [(1, 4), (2, 4), (1, 4), (2, 4), (1, 2), (2, 2)]);
        // The budget ends the walk at the piece that reaches it.
        assert_eq!(band_pieces(&[(&gate[..], 4), (&up[..], 4)], 5).len(), 2);
        assert!(band_pieces(&[], 5).is_empty());
    }

    #[test]
    fn ahead_asks_for_every_line_of_its_pieces_in_order_up_to_its_budget() {
        let (a, b) = (vec![0u8; 130], vec![0u8; 64]);
        let lines = |most| {
            let mut ahead = Ahead::new(vec![&a[..], &[][..], &b[..]], most);
            std::iter::from_fn(|| ahead.next_line())
                .map(|byte| byte as *const u8)
                .collect::<Vec<_>>()
        };
        let all = [&a[0], &a[64], &a[128], &b[0]].map(|x| x as *const u8);
        assert_eq!(lines(usize::MAX), all);
        assert_eq!(lines(128), all[..2]);
        let mut ahead = Ahead::new(vec![&a[..]], 64 * 5);
        assert!(
            !ahead.step() || !ahead.step(),
            "three lines: done by the second call"
        );
    }
}
