//! Per-sequence state, kept outside the model: `Model::forward(&self, ..., &mut SequenceState)`.
//!
//! A Liger layer's state is constant-size: the recurrent memory (`hkv x d x d` f32 for GLA
//! and HGRN2, `hkv x 2M x d` for GSA with `M` slots) plus a
//! window cache of at most `window` post-RoPE keys and values. A softmax layer keeps a KV
//! cache that grows with the context (or is bounded by the original model's sliding window).
//!
//! Tensors in a state are never written in place, with one guarded exception: a cache's
//! spare rows past its last one (`KvCache::push`, the fused decode step's append), which no
//! view of the cache covers and which only a cache that holds its buffer alone may write.
//! Cloning a state is therefore cheap (reference counts) and the clone is independent, which
//! is what forking for `n > 1` and snapshotting for the conversation cache need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use candle_core::{DType, Device, Tensor};

use crate::config::{KvDtype, LayerKind, ModelConfig};
use crate::global::{DistanceCap, GlobalCache, Parts};
use crate::layers::{convert, join_rows};
use crate::{Error, Result};

/// What every state of one model must look like.
#[derive(Debug, Clone)]
pub struct StateSpec {
    pub layers: Vec<LayerKind>,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Rows of a Liger layer's recurrent memory per KV head (each `head_dim` wide): `d` for
    /// GLA and HGRN2, `2M` for GSA, 0 when the recurrent branch has weight 0.
    pub recurrent_rows: usize,
    /// Liger window (keys kept besides the current one).
    pub liger_window: usize,
    /// Places per KV head in a Liger layer's global cache, and how many go to the first
    /// tokens (sinks); 0 places: no global cache.
    pub global_cache: usize,
    pub sinks: usize,
    /// Of the places beyond the sinks, how many go by attention (the rest by recall).
    pub attention_places: usize,
    /// The global cache's distance cap ([`crate::config::LigerConfig::max_distance`]).
    pub distance_cap: Option<DistanceCap>,
    /// dtype cached keys and values are stored in (the config's `kv_dtype`, else the
    /// model's); recurrent states are always f32.
    pub cache_dtype: DType,
    pub device: Device,
}

impl StateSpec {
    /// The spec of a model computing in `dtype`, whose caches keep that dtype unless the
    /// config names another.
    pub fn new(cfg: &ModelConfig, cache_dtype: DType, device: &Device) -> Self {
        Self {
            layers: (0..cfg.num_layers).map(|i| cfg.layer_kind(i)).collect(),
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            recurrent_rows: match &cfg.liger {
                // Window-only attention (recurrent weight 0) keeps no recurrent memory unless
                // a global cache chooses by it.
                Some(l) if !l.keeps_memory() => 0,
                Some(l) => l.gsa_slots().map_or(cfg.head_dim, |m| 2 * m),
                None => cfg.head_dim,
            },
            liger_window: cfg.liger.as_ref().map_or(0, |l| l.window),
            global_cache: cfg.liger.as_ref().map_or(0, |l| l.global_cache),
            sinks: cfg.liger.as_ref().map_or(0, |l| l.sinks),
            attention_places: cfg.liger.as_ref().map_or(0, |l| l.attention_places),
            distance_cap: cfg
                .liger
                .as_ref()
                .and_then(|l| l.max_distance)
                .map(|max| DistanceCap {
                    max,
                    inv_freq: crate::layers::rope::inv_frequencies(
                        cfg.head_dim,
                        cfg.rope_theta,
                        cfg.rope_scaling.as_ref(),
                    )
                    .into(),
                }),
            cache_dtype: cfg
                .liger
                .as_ref()
                .and_then(|l| l.kv_dtype)
                .map_or(cache_dtype, KvDtype::dtype),
            device: device.clone(),
        }
    }

    /// Layer `i`'s part of a fresh state.
    pub fn new_layer_state(&self, i: usize) -> Result<LayerState> {
        Ok(match self.layers[i] {
            LayerKind::Liger => LayerState::Liger {
                window: KvCache::new(Some(self.liger_window)).stored_as(self.cache_dtype),
                recurrent: Tensor::zeros(
                    (1, self.num_kv_heads, self.recurrent_rows, self.head_dim),
                    DType::F32,
                    &self.device,
                )?,
                global: self.new_global_cache(),
            },
            LayerKind::Softmax { window } => {
                LayerState::Softmax(KvCache::new(window).stored_as(self.cache_dtype))
            }
        })
    }

    /// A Liger layer's empty global cache.
    fn new_global_cache(&self) -> GlobalCache {
        GlobalCache::new(self.global_cache, self.sinks, self.attention_places)
            .with_distance_cap(self.distance_cap.clone())
            .stored_as(self.cache_dtype)
    }

    /// Whether global caches keep two scores per token (attention and recall places).
    fn two_scores(&self) -> bool {
        self.new_global_cache().two_kinds()
    }

    /// Bytes one sequence's state occupies after `context` tokens.
    pub fn bytes_at(&self, context: usize) -> usize {
        self.bytes_by_kind_at(context).total()
    }

    /// [`bytes_at`](Self::bytes_at) split by what holds them.
    pub fn bytes_by_kind_at(&self, context: usize) -> StateBytes {
        let kv_row = 2 * self.num_kv_heads * self.head_dim * self.cache_dtype.size_in_bytes();
        let recurrent = self.num_kv_heads * self.recurrent_rows * self.head_dim * 4;
        let mut b = StateBytes::default();
        for k in &self.layers {
            match k {
                LayerKind::Liger => {
                    b.recurrent += recurrent;
                    let in_window = context.min(self.liger_window);
                    b.window += kv_row * in_window;
                    if self.global_cache > 0 {
                        // Kept entries (key, value, f32 score, u32 position) and the window
                        // rows' scores; with attention and recall places, a second score each.
                        let scores = self.num_kv_heads * 4 * (1 + usize::from(self.two_scores()));
                        let position = self.num_kv_heads * 4;
                        let kept = (context - in_window).min(self.global_cache);
                        b.global += (kv_row + scores + position) * kept + scores * in_window;
                    }
                }
                LayerKind::Softmax { window } => {
                    b.kv_cache += kv_row * window.map_or(context, |w| context.min(w));
                }
            }
        }
        b
    }

    /// A fresh state (no tokens consumed).
    pub fn new_state(&self) -> Result<SequenceState> {
        let layers = (0..self.layers.len())
            .map(|i| self.new_layer_state(i))
            .collect::<Result<_>>()?;
        Ok(SequenceState {
            layers,
            position: 0,
        })
    }
}

/// A state's bytes by what holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// Liger layers' recurrent memories (constant).
    pub recurrent: usize,
    /// Liger layers' sliding-window caches (bounded by the window).
    pub window: usize,
    /// Liger layers' global caches (bounded by their places) and the saliences they use.
    pub global: usize,
    /// Softmax layers' KV caches (growing with the context unless the layer has a window).
    pub kv_cache: usize,
}

impl StateBytes {
    pub fn total(&self) -> usize {
        self.recurrent + self.window + self.global + self.kv_cache
    }
}

impl std::ops::AddAssign for StateBytes {
    fn add_assign(&mut self, o: Self) {
        self.recurrent += o.recurrent;
        self.window += o.window;
        self.global += o.global;
        self.kv_cache += o.kv_cache;
    }
}

/// Keys and values of past tokens, `[hkv, len, d]`, oldest first, holding at most
/// `capacity` tokens when bounded (a sliding window).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// The rows (views into `room`'s buffers when it is set).
    kv: Option<(Tensor, Tensor)>,
    capacity: Option<usize>,
    /// What the rows are stored in; `None`: as they come.
    stored: Option<DType>,
    /// Buffers with spare rows after `kv`'s, which [`push`](Self::push) fills in place.
    room: Option<Room>,
}

/// Keys and values `[hkv, rows, d]` (contiguous) holding a cache's rows from `start` on,
/// then spare rows. Decoding a token appended a row by copying the whole window into a new
/// tensor: at 32 sequences that copy, and the page faults of its fresh memory, were ~10% of
/// a step. Writing the token's row into a spare row instead copies the window once per
/// `spare_rows` tokens.
#[derive(Debug, Clone)]
struct Room {
    k: Tensor,
    v: Tensor,
    start: usize,
    /// Cloned with the cache: a buffer is written in place only by the one cache holding
    /// it (a forked or snapshotted state shares it, and the first to push copies).
    holder: Arc<()>,
    /// A backup's view of the buffer of the cache it was taken from (that cache's holder):
    /// read, never written, unless the backup takes the buffer over when restored.
    backup_of: Option<Weak<()>>,
}

/// Spare rows a cache gets when [`KvCache::push`] copies its `rows` into a new buffer: a
/// quarter more (a 240-row window then copies once per 60 tokens).
fn spare_rows(rows: usize) -> usize {
    (rows / 4).max(16)
}

impl KvCache {
    pub fn new(capacity: Option<usize>) -> Self {
        Self {
            kv: None,
            capacity,
            stored: None,
            room: None,
        }
    }

    /// Stores rows in `dtype` (rounded once, when stored); [`extend`](Self::extend) still
    /// returns them in the dtype of the new rows.
    pub fn stored_as(mut self, dtype: DType) -> Self {
        self.stored = Some(dtype);
        self
    }

    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// What rows are stored in (`None`: as they come).
    pub fn stored_dtype(&self) -> Option<DType> {
        self.stored
    }

    /// Appends `k`, `v`: `[hkv, t, d]` and returns everything a query among the new tokens
    /// may need (the old cache followed by the new keys), then trims itself to capacity.
    pub fn extend(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let dtype = k.dtype();
        let cached = self.len();
        // In one pass each where the rows allow (`join_rows`), else through candle's ops.
        let joined = |old: &Tensor, new: &Tensor, skip: usize, to: DType| -> Result<Tensor> {
            Ok(match join_rows(old, new, skip, to)? {
                Some(t) => t,
                None => {
                    let all = Tensor::cat(&[&convert(old, new.dtype())?, new], 1)?;
                    let len = all.dim(1)?;
                    convert(&all.narrow(1, skip, len - skip)?.contiguous()?, to)?
                }
            })
        };
        let (k_all, v_all) = match &self.kv {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => (joined(ck, k, 0, dtype)?, joined(cv, v, 0, dtype)?),
        };
        let len = k_all.dim(1)?;
        let keep = self.capacity.map_or(len, |c| len.min(c));
        // An f16 window: its kept rows straight from the stored ones, without narrowing
        // the widened rows and rounding them back (the same values: a stored row widens
        // and rounds back to itself).
        if let (Some((ck, cv)), Some(stored)) = (&self.kv, self.stored) {
            if keep > 0 && stored != dtype && cached > 0 {
                let drop = len - keep;
                self.kv = Some((joined(ck, k, drop, stored)?, joined(cv, v, drop, stored)?));
                self.room = None;
                return Ok((k_all, v_all));
            }
        }
        let store = |x: &Tensor| -> Result<Tensor> {
            // Copy so the dropped prefix is freed rather than kept alive by a view.
            let x = if keep == len {
                x.clone()
            } else {
                x.narrow(1, len - keep, keep)?.contiguous()?
            };
            stored_as(x, self.stored)
        };
        self.kv = if keep == 0 {
            None
        } else {
            Some((store(&k_all)?, store(&v_all)?))
        };
        self.room = None;
        Ok((k_all, v_all))
    }

    /// Appends a few tokens' keys and values (`[hkv, t, d]`, in the stored dtype) and drops
    /// the oldest rows past capacity: what [`extend`](Self::extend) does with them, but
    /// into spare rows of the cache's buffer when it has them and holds the buffer alone;
    /// otherwise into a new buffer with spare rows. A span longer than the cache keeps
    /// goes to `extend`.
    pub(crate) fn push(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let len = self.len();
        let t = k.dim(1)?;
        let keep = self.capacity.map_or(len + t, |c| (len + t).min(c));
        if keep == 0 {
            (self.kv, self.room) = (None, None);
            return Ok(());
        }
        if t > keep {
            self.extend(k, v)?;
            return Ok(());
        }
        let drop = len + t - keep;
        if let Some(room) = &mut self.room {
            let at = room.start + len;
            if room.backup_of.is_none()
                && Arc::strong_count(&room.holder) == 1
                && at + t <= room.k.dim(1)?
                && room.k.dtype() == k.dtype()
            {
                // No view covers row `at` (every view ends at or before this cache's last
                // row), and no other cache holds this buffer.
                room.k.slice_set(k, 1, at)?;
                room.v.slice_set(v, 1, at)?;
                room.start += drop;
                self.kv = Some((
                    room.k.narrow(1, room.start, keep)?,
                    room.v.narrow(1, room.start, keep)?,
                ));
                return Ok(());
            }
        }
        let fresh = |old: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
            let (hkv, _, d) = new.dims3()?;
            let spare = Tensor::zeros((hkv, spare_rows(keep), d), new.dtype(), new.device())?;
            let mut parts = Vec::with_capacity(3);
            if let Some(old) = old {
                parts.push(convert(&old.narrow(1, drop, len - drop)?, new.dtype())?);
            }
            parts.extend([new.clone(), spare]);
            Ok(Tensor::cat(&parts, 1)?)
        };
        let old = self.kv.as_ref();
        let room = Room {
            k: fresh(old.map(|kv| &kv.0), k)?,
            v: fresh(old.map(|kv| &kv.1), v)?,
            start: 0,
            holder: Arc::new(()),
            backup_of: None,
        };
        self.kv = Some((room.k.narrow(1, 0, keep)?, room.v.narrow(1, 0, keep)?));
        self.room = Some(room);
        Ok(())
    }

    /// The rows' buffers (`[hkv, rows, d]`, contiguous when the cache has room to push
    /// into), where the rows start in them, and how many there are.
    pub(crate) fn buffers(&self) -> Option<(&Tensor, &Tensor, usize, usize)> {
        match (&self.kv, &self.room) {
            (None, _) => None,
            (Some((k, _)), Some(room)) => Some((&room.k, &room.v, room.start, k.dim(1).ok()?)),
            (Some((k, v)), None) => Some((k, v, 0, k.dim(1).ok()?)),
        }
    }

    /// A clone without the right to push in place (see [`SequenceState::backup`]). It
    /// still reads its rows from the buffer where they lie (the fused decode step reads
    /// whole buffers): what this cache appends lies past them.
    fn backup(&self) -> Self {
        let room = self.room.as_ref().map(|r| Room {
            k: r.k.clone(),
            v: r.v.clone(),
            start: r.start,
            holder: Arc::new(()),
            backup_of: Some(Arc::downgrade(&r.holder)),
        });
        Self {
            room,
            ..self.clone()
        }
    }

    /// A backup made whole again in place of `live`, the cache it was taken from: where
    /// `live` alone still holds the buffer, the backup takes it over, and appends in place
    /// again (over the rows `live` appended, which go with it).
    fn restore(&mut self, live: &mut KvCache) {
        let Some(room) = &mut self.room else { return };
        let Some(origin) = &room.backup_of else {
            return;
        };
        if let Some(theirs) = live.room.take() {
            let same = std::ptr::eq(Arc::as_ptr(&theirs.holder), origin.as_ptr());
            if same && Arc::strong_count(&theirs.holder) == 1 && theirs.backup_of.is_none() {
                room.holder = theirs.holder;
                room.backup_of = None;
            }
        }
    }

    fn detach(&mut self) {
        if let Some((k, v)) = &mut self.kv {
            (*k, *v) = (k.detach(), v.detach());
        }
        // Detached views no longer share the buffer: the next push copies.
        self.room = None;
    }

    /// The cached keys and values, `[hkv, len, d]` each (none while empty).
    pub fn parts(&self) -> Option<(&Tensor, &Tensor)> {
        self.kv.as_ref().map(|(k, v)| (k, v))
    }

    /// Empties the cache (the fused decode step on a cache of capacity 0, where the token
    /// adds no row to [`push`](Self::push)).
    pub(crate) fn clear(&mut self) {
        (self.kv, self.room) = (None, None);
    }

    /// Bytes of the rows, what [`StateSpec`] predicts. A buffer's spare rows are not
    /// counted: at most a quarter of the rows more, or 16 (`spare_rows`), per cache.
    fn bytes(&self) -> usize {
        self.kv
            .as_ref()
            .map_or(0, |(k, v)| tensor_bytes(k) + tensor_bytes(v))
    }
}

/// One layer's part of a sequence's state.
#[derive(Debug, Clone)]
pub enum LayerState {
    Softmax(KvCache),
    Liger {
        window: KvCache,
        /// `[1, hkv, d, d]`, f32.
        recurrent: Tensor,
        /// Older tokens the window branch still sees (disabled when it has no places).
        global: GlobalCache,
    },
}

/// Everything a model remembers about one sequence.
#[derive(Debug, Clone)]
pub struct SequenceState {
    pub(crate) layers: Vec<LayerState>,
    /// Tokens consumed so far (the next token's position).
    pub(crate) position: usize,
}

/// A state as it was before a step ([`SequenceState::backup`]), to restore in its place.
/// Not a state itself: until restored, the rows it sees may have been written over.
#[derive(Debug)]
pub struct Backup(SequenceState);

impl Backup {
    /// Puts the state as it was when the backup was taken in the place of `live`, the state
    /// it was taken from: the rows its step wrote over are written back, and the buffers
    /// `live` may still write in place pass to the restored state.
    pub fn restore(self, live: &mut SequenceState) -> Result<()> {
        let Backup(mut state) = self;
        for (l, now) in state.layers.iter_mut().zip(&mut live.layers) {
            match (l, now) {
                (LayerState::Softmax(cache), LayerState::Softmax(live_cache)) => {
                    cache.restore(live_cache)
                }
                (
                    LayerState::Liger { window, global, .. },
                    LayerState::Liger {
                        window: live_window,
                        global: live_global,
                        ..
                    },
                ) => {
                    window.restore(live_window);
                    global.restore(live_global)?;
                }
                _ => {}
            }
        }
        *live = state;
        Ok(())
    }
}

const STATE_FORMAT: &str = "liger-sequence-state";
/// 2: global caches keep their entries' positions (the distance cap).
const STATE_VERSION: &str = "2";

impl SequenceState {
    pub fn position(&self) -> usize {
        self.position
    }

    pub fn layers(&self) -> &[LayerState] {
        &self.layers
    }

    /// A copy to restore if a step fails, or if its tokens turn out unwanted (a rejected
    /// speculative draft). It shares every tensor, but unlike a clone (a fork) it takes no
    /// right to write the caches' buffers in place: the state keeps it. What a step
    /// appends to a window lies past every row the backup sees (`KvCache::push`), the
    /// kept rows a step writes over in a global cache are first saved for the backup, and
    /// the global caches log what undoes each change to their scores and positions, so
    /// [`Backup::restore`] gives back the state as it was. Take it right before the
    /// step, and drop it or restore it right after: a second step on the state may append
    /// over rows that a restored backup would then write again.
    pub fn backup(&mut self) -> Backup {
        let layers = self
            .layers
            .iter_mut()
            .map(|l| match l {
                LayerState::Softmax(c) => LayerState::Softmax(c.backup()),
                LayerState::Liger {
                    window,
                    recurrent,
                    global,
                } => LayerState::Liger {
                    window: window.backup(),
                    recurrent: recurrent.clone(),
                    global: global.backup(),
                },
            })
            .collect();
        Backup(Self {
            layers,
            position: self.position,
        })
    }

    /// Cuts the state off from the autograd graph that computed it (truncated
    /// backpropagation through time: training carries a state from one piece of a long
    /// sequence to the next, but not its gradient).
    pub fn detach(&mut self) {
        for l in &mut self.layers {
            match l {
                LayerState::Softmax(c) => c.detach(),
                LayerState::Liger {
                    window,
                    recurrent,
                    global,
                } => {
                    window.detach();
                    *recurrent = recurrent.detach();
                    global.detach();
                }
            }
        }
    }

    /// Bytes held by this state's tensors.
    pub fn size_bytes(&self) -> usize {
        self.bytes_by_kind().total()
    }

    /// [`size_bytes`](Self::size_bytes) split by what holds them.
    pub fn bytes_by_kind(&self) -> StateBytes {
        let mut b = StateBytes::default();
        for l in &self.layers {
            match l {
                LayerState::Softmax(c) => b.kv_cache += c.bytes(),
                LayerState::Liger {
                    window,
                    recurrent,
                    global,
                } => {
                    b.window += window.bytes();
                    b.recurrent += tensor_bytes(recurrent);
                    b.global += global.bytes();
                }
            }
        }
        b
    }

    /// Serializes to bytes (a safetensors blob: portable, self-describing, checked on load).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let cache = match l {
                LayerState::Softmax(c) => c,
                LayerState::Liger {
                    window,
                    recurrent,
                    global,
                } => {
                    tensors.push((format!("layers.{i}.recurrent"), recurrent.clone()));
                    if let (Some((k, v)), Some(s)) = (global.kept(), global.kept_scores()?) {
                        // Views into buffers with spare places are strided: written
                        // compact.
                        tensors.push((format!("layers.{i}.global.k"), k.contiguous()?));
                        tensors.push((format!("layers.{i}.global.v"), v.contiguous()?));
                        tensors.push((format!("layers.{i}.global.scores"), s));
                        let p = global.positions();
                        let flat: Vec<u32> = p.iter().flatten().copied().collect();
                        let shape = (p.len(), flat.len() / p.len().max(1));
                        tensors.push((
                            format!("layers.{i}.global.positions"),
                            Tensor::from_vec(flat, shape, &Device::Cpu)?,
                        ));
                    }
                    if let Some(a) = global.kept_attention()? {
                        tensors.push((format!("layers.{i}.global.attention"), a));
                    }
                    if let Some(s) = global.window_scores()? {
                        tensors.push((format!("layers.{i}.window_scores"), s));
                    }
                    if let Some(a) = global.window_attention()? {
                        tensors.push((format!("layers.{i}.window_attention"), a));
                    }
                    window
                }
            };
            if let Some((k, v)) = &cache.kv {
                // Views into a buffer with spare rows are strided: written compact.
                tensors.push((format!("layers.{i}.k"), k.contiguous()?));
                tensors.push((format!("layers.{i}.v"), v.contiguous()?));
            }
        }
        // One metadata key, so the header (and thus the blob) is byte-for-byte deterministic:
        // safetensors writes metadata maps in hash order.
        let header = serde_json::json!({
            "version": STATE_VERSION,
            "position": self.position,
            "layers": self.layers.len(),
        });
        let metadata: HashMap<String, String> =
            [(STATE_FORMAT.to_string(), header.to_string())].into();
        let data: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let views: Vec<(&str, &Tensor)> = data.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::State(format!("serialize: {e}")))
    }

    /// Restores a state written by [`to_bytes`](Self::to_bytes), checking that it fits `spec`.
    pub fn from_bytes(spec: &StateSpec, bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::State(m);
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a state blob: {e}")))?;
        let header: serde_json::Value = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_FORMAT))
            .and_then(|h| serde_json::from_str(h).ok())
            .ok_or_else(|| bad("not a sequence state blob".into()))?;
        if header["version"] != STATE_VERSION {
            return Err(bad(format!(
                "unsupported state version {}",
                header["version"]
            )));
        }
        let position = header["position"]
            .as_u64()
            .ok_or_else(|| bad("missing position".into()))? as usize;
        if header["layers"].as_u64() != Some(spec.layers.len() as u64) {
            return Err(bad("layer count does not match the model".into()));
        }
        let mut tensors = candle_core::safetensors::load_buffer(bytes, &spec.device)
            .map_err(|e| bad(format!("corrupt: {e}")))?;
        let mut state = spec.new_state()?;
        state.position = position;
        let (hkv, d) = (spec.num_kv_heads, spec.head_dim);
        for (i, layer) in state.layers.iter_mut().enumerate() {
            let cache = match layer {
                LayerState::Softmax(c) => c,
                LayerState::Liger {
                    window,
                    recurrent,
                    global,
                } => {
                    let r = tensors
                        .remove(&format!("layers.{i}.recurrent"))
                        .ok_or_else(|| bad(format!("layer {i}: missing recurrent state")))?;
                    check(&r, &[1, hkv, spec.recurrent_rows, d], DType::F32, i)?;
                    *recurrent = r;
                    if global.is_enabled() {
                        restore_global(&mut tensors, global, spec, i, position)?;
                    }
                    window
                }
            };
            let k = tensors.remove(&format!("layers.{i}.k"));
            let v = tensors.remove(&format!("layers.{i}.v"));
            let expect_len = cache.capacity.map_or(position, |c| position.min(c));
            match (k, v) {
                (Some(k), Some(v)) => {
                    check(&k, &[hkv, expect_len, d], spec.cache_dtype, i)?;
                    check(&v, &[hkv, expect_len, d], spec.cache_dtype, i)?;
                    cache.kv = Some((k, v));
                }
                (None, None) if expect_len == 0 => {}
                _ => {
                    return Err(bad(format!(
                        "layer {i}: cache does not match position {position}"
                    )))
                }
            }
        }
        if let Some(name) = tensors.keys().next() {
            return Err(bad(format!("unexpected tensor `{name}`")));
        }
        Ok(state)
    }
}

/// Layer `i`'s global cache from a state blob: as many kept entries as tokens have left the
/// window (up to the places), and a salience for every window row.
fn restore_global(
    tensors: &mut HashMap<String, Tensor>,
    global: &mut GlobalCache,
    spec: &StateSpec,
    i: usize,
    position: usize,
) -> Result<()> {
    let (hkv, d) = (spec.num_kv_heads, spec.head_dim);
    let in_window = position.min(spec.liger_window);
    let kept_len = (position - in_window).min(global.capacity());
    let mut take = |name: &str| tensors.remove(&format!("layers.{i}.{name}"));
    let mut positions = Vec::new();
    let kept = match (take("global.k"), take("global.v"), take("global.scores")) {
        (Some(k), Some(v), Some(s)) => {
            check(&k, &[hkv, kept_len, d], spec.cache_dtype, i)?;
            check(&v, &[hkv, kept_len, d], spec.cache_dtype, i)?;
            check(&s, &[hkv, kept_len], DType::F32, i)?;
            let p = take("global.positions").ok_or_else(|| {
                Error::State(format!("layer {i}: global cache without positions"))
            })?;
            check(&p, &[hkv, kept_len], DType::U32, i)?;
            positions = p.to_vec2::<u32>()?;
            // Kept tokens have left the window.
            if positions
                .iter()
                .flatten()
                .any(|&p| p as usize >= position - in_window)
            {
                return Err(Error::State(format!(
                    "layer {i}: a global cache position is not before the window"
                )));
            }
            Some((k, v, s))
        }
        (None, None, None) if kept_len == 0 => None,
        _ => {
            return Err(Error::State(format!(
                "layer {i}: global cache does not match position {position}"
            )))
        }
    };
    // A score tensor `[hkv, len]`, present exactly when `wanted` and `len > 0`.
    let mut scores = |name: &str, len: usize, wanted: bool| -> Result<Option<Tensor>> {
        match take(name) {
            Some(s) if wanted && len > 0 => {
                check(&s, &[hkv, len], DType::F32, i)?;
                Ok(Some(s))
            }
            None if !wanted || len == 0 => Ok(None),
            _ => Err(Error::State(format!(
                "layer {i}: `{name}` does not match position {position}"
            ))),
        }
    };
    let two = spec.two_scores();
    let parts = Parts {
        positions,
        kept_attention: scores("global.attention", kept_len, two)?,
        window_scores: scores("window_scores", in_window, true)?,
        window_attention: scores("window_attention", in_window, two)?,
    };
    global.set_parts(kept, parts)
}

fn check(t: &Tensor, dims: &[usize], dtype: DType, layer: usize) -> Result<()> {
    if t.dims() != dims || t.dtype() != dtype {
        return Err(Error::State(format!(
            "layer {layer}: tensor {:?} {:?} where {dims:?} {dtype:?} was expected",
            t.dims(),
            t.dtype()
        )));
    }
    Ok(())
}

/// Rows as a cache stores them: in `dtype` (rounded once, here), or as they come.
pub(crate) fn stored_as(rows: Tensor, dtype: Option<DType>) -> Result<Tensor> {
    Ok(match dtype {
        Some(d) => convert(&rows, d)?,
        None => rows,
    })
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A fixed number of sequence slots. [`acquire`](Self::acquire) hands out a [`Slot`] that
/// owns its state; [`release`](Self::release) consumes it. A slot cannot be released twice
/// or used after release because releasing moves it, and it cannot be released into another
/// pool (checked).
#[derive(Debug)]
pub struct StatePool {
    spec: StateSpec,
    id: u64,
    free_indices: Vec<usize>,
    capacity: usize,
}

/// A leased sequence slot: an index in `0..capacity` and the state it owns.
#[derive(Debug)]
pub struct Slot {
    index: usize,
    pool: u64,
    pub state: SequenceState,
}

impl Slot {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl StatePool {
    pub fn new(spec: StateSpec, capacity: usize) -> Self {
        Self {
            spec,
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            // Pop from the end: hand out low indices first.
            free_indices: (0..capacity).rev().collect(),
            capacity,
        }
    }

    pub fn spec(&self) -> &StateSpec {
        &self.spec
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn available(&self) -> usize {
        self.free_indices.len()
    }

    pub fn in_use(&self) -> usize {
        self.capacity - self.free_indices.len()
    }

    /// A slot with a fresh state, or `None` when all are leased.
    pub fn acquire(&mut self) -> Result<Option<Slot>> {
        self.acquire_with(|spec| spec.new_state())
    }

    /// A slot that starts from `state` (a fork or a cached snapshot).
    pub fn acquire_from(&mut self, state: SequenceState) -> Result<Option<Slot>> {
        if state.layers.len() != self.spec.layers.len() {
            return Err(Error::State("state belongs to another model".into()));
        }
        self.acquire_with(|_| Ok(state))
    }

    fn acquire_with(
        &mut self,
        make: impl FnOnce(&StateSpec) -> Result<SequenceState>,
    ) -> Result<Option<Slot>> {
        let Some(&index) = self.free_indices.last() else {
            return Ok(None);
        };
        let state = make(&self.spec)?;
        self.free_indices.pop();
        Ok(Some(Slot {
            index,
            pool: self.id,
            state,
        }))
    }

    /// Returns a slot; its state is dropped.
    pub fn release(&mut self, slot: Slot) -> Result<()> {
        if slot.pool != self.id {
            return Err(Error::State(
                "slot released into a pool that did not lease it".into(),
            ));
        }
        debug_assert!(!self.free_indices.contains(&slot.index));
        self.free_indices.push(slot.index);
        Ok(())
    }
}

/// One sequence's part of a batched step: the tokens to read and the state that reads them.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SequenceState,
    /// Only the argmax of this sequence's logits will be read (greedy sampling, nothing
    /// that changes or reports the other logits): a step may then compute exactly only the
    /// logits that can be the largest, and leave the others at `-inf`
    /// ([`crate::RuntimeOptions::head_screen`]).
    pub argmax_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Family, TinyCheckpoint};

    fn spec() -> StateSpec {
        let cfg = TinyCheckpoint::new(Family::Llama, 0)
            .unwrap()
            .with_liger(&Default::default())
            .model_config()
            .unwrap();
        StateSpec::new(&cfg, DType::F32, &Device::Cpu)
    }

    /// Token `t`'s key and value rows `[2, 1, 3]`, distinct per token.
    fn token_rows(t: usize, dtype: DType) -> (Tensor, Tensor) {
        let k: Vec<f32> = (0..6).map(|i| (t * 10 + i) as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let rows = |x: Vec<f32>| Tensor::from_vec(x, (2, 1, 3), &Device::Cpu)?.to_dtype(dtype);
        (rows(k).unwrap(), rows(v).unwrap())
    }

    /// Tokens `first..first + len`'s rows, `[2, len, 3]`.
    fn span_rows(first: usize, len: usize, dtype: DType) -> (Tensor, Tensor) {
        let rows: Vec<(Tensor, Tensor)> =
            (first..first + len).map(|t| token_rows(t, dtype)).collect();
        let (k, v): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().unzip();
        (Tensor::cat(&k, 1).unwrap(), Tensor::cat(&v, 1).unwrap())
    }

    #[test]
    fn a_backup_reads_its_rows_in_place_and_a_restored_one_appends_as_extend_does() {
        for dtype in [DType::F32, DType::F16] {
            let mut live = KvCache::new(Some(6)).stored_as(dtype);
            let mut reference = KvCache::new(Some(6)).stored_as(dtype);
            for t in 0..4 {
                let (k, v) = token_rows(t, dtype);
                live.push(&k, &v).unwrap();
                reference.extend(&k, &v).unwrap();
            }
            // A step that is undone: its rows go past the backup's.
            let mut backup = live.backup();
            let (k, v) = span_rows(10, 3, dtype);
            live.push(&k, &v).unwrap();
            assert_eq!(contents(&backup), contents(&reference), "{dtype:?}");
            let (buffer, start, len) = {
                let (k, _, start, len) = backup.buffers().unwrap();
                (k.clone(), start, len)
            };
            let rows = buffer.narrow(1, start, len).unwrap();
            assert_eq!(
                rows.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap(),
                contents(&reference).unwrap().0,
                "{dtype:?}: the buffer a backup hands out holds its rows"
            );
            // A backup never writes the buffer; once restored (its cache holds the buffer
            // alone) it takes it over and appends in place.
            backup.restore(&mut live);
            let holder = backup.room.as_ref().map(|r| Arc::as_ptr(&r.holder));
            for t in 20..24 {
                let (k, v) = span_rows(t * 2, 2, dtype);
                backup.push(&k, &v).unwrap();
                reference.extend(&k, &v).unwrap();
                assert_eq!(contents(&backup), contents(&reference), "{dtype:?} {t}");
            }
            assert_eq!(
                backup.room.as_ref().map(|r| Arc::as_ptr(&r.holder)),
                holder,
                "{dtype:?}: appended in place"
            );
            // A state snapshotted after the step shares the buffer: the restored backup
            // does not take it over, and its next push leaves the snapshot's rows alone.
            let (mut live, mut reference) = (
                KvCache::new(Some(6)).stored_as(dtype),
                KvCache::new(Some(6)).stored_as(dtype),
            );
            for t in 40..43 {
                let (k, v) = token_rows(t, dtype);
                live.push(&k, &v).unwrap();
                reference.extend(&k, &v).unwrap();
            }
            let mut backup = live.backup();
            let (k, v) = token_rows(50, dtype);
            live.push(&k, &v).unwrap();
            let snapshot = live.clone();
            let seen = contents(&snapshot);
            backup.restore(&mut live);
            let (k, v) = token_rows(51, dtype);
            backup.push(&k, &v).unwrap();
            reference.extend(&k, &v).unwrap();
            assert_eq!(contents(&backup), contents(&reference), "{dtype:?}");
            assert_eq!(
                contents(&snapshot),
                seen,
                "{dtype:?}: the snapshot keeps its rows"
            );
        }
    }

    /// Rows `[hkv][len][d]`.
    type Rows3 = Vec<Vec<Vec<f32>>>;

    fn contents(c: &KvCache) -> Option<(Rows3, Rows3)> {
        let f = |x: &Tensor| x.to_dtype(DType::F32)?.to_vec3::<f32>();
        c.parts().map(|(k, v)| (f(k).unwrap(), f(v).unwrap()))
    }

    #[test]
    fn push_appends_as_extend_does_in_place_or_not() {
        for capacity in [Some(5), Some(1), Some(0), None] {
            for dtype in [DType::F32, DType::F16] {
                let (mut pushed, mut extended) = (
                    KvCache::new(capacity).stored_as(dtype),
                    KvCache::new(capacity).stored_as(dtype),
                );
                // Forty pushes of one to three tokens (a span checked at once): past the
                // first buffer's spare rows, so pushes copy into new buffers and write in
                // place in turn.
                let mut buffers = Vec::new();
                for t in 0..40 {
                    let (k, v) = span_rows(3 * t, 1 + t % 3, dtype);
                    pushed.push(&k, &v).unwrap();
                    extended.extend(&k, &v).unwrap();
                    assert_eq!(
                        contents(&pushed),
                        contents(&extended),
                        "{capacity:?} {dtype:?} token {t}"
                    );
                    if let Some(room) = &pushed.room {
                        // Weak: counts no holder, and keeps each pointer distinct.
                        let buffer = Arc::downgrade(&room.holder);
                        if !buffers.iter().any(|b| std::sync::Weak::ptr_eq(b, &buffer)) {
                            buffers.push(buffer);
                        }
                    }
                }
                // Most pushes wrote in place: a new buffer once per 16 tokens or more (where
                // the spans fit the cache; longer ones are extended).
                if capacity.is_none_or(|c| c >= 3) {
                    assert!(
                        buffers.len() <= 6,
                        "{capacity:?}: {} buffers",
                        buffers.len()
                    );
                }
            }
        }
    }

    #[test]
    fn extend_keeps_the_last_rows_stored_as_asked_and_returns_them_all() {
        // The obvious version: every row so far, widened, the last `capacity` stored.
        let mut rng = 0x9e37_79b9_u32;
        let mut value = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            (rng % 2000) as f32 / 7.0 - 140.0
        };
        for capacity in [Some(6), Some(1), Some(0), None] {
            for stored in [DType::F32, DType::F16] {
                let mut cache = KvCache::new(capacity).stored_as(stored);
                let mut all: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 2];
                // Chunks shorter than, as long as and longer than the capacity, and pushes
                // between them (which leave the cache a strided view of a buffer).
                for (step, t) in [3, 1, 6, 9, 2, 1, 1, 4, 13, 1].into_iter().enumerate() {
                    let rows: Vec<f32> = (0..2 * t * 3).map(|_| value()).collect();
                    let k = Tensor::from_vec(rows.clone(), (2, t, 3), &Device::Cpu).unwrap();
                    let v = k.neg().unwrap();
                    // The stored values: rounded to the stored dtype once.
                    let rounded = k.to_dtype(stored).unwrap().to_dtype(DType::F32).unwrap();
                    for (h, head) in rounded.to_vec3::<f32>().unwrap().into_iter().enumerate() {
                        all[h].extend(head);
                    }
                    let before = contents(&cache);
                    if t == 1 && step % 2 == 1 {
                        cache
                            .push(&k.to_dtype(stored).unwrap(), &v.to_dtype(stored).unwrap())
                            .unwrap();
                    } else {
                        let (k_all, v_all) = cache.extend(&k, &v).unwrap();
                        // Returned: the rows the cache held, widened, then the new ones.
                        let mut want = before.map_or(vec![Vec::new(); 2], |(k, _)| k);
                        for (h, head) in k.to_vec3::<f32>().unwrap().into_iter().enumerate() {
                            want[h].extend(head);
                        }
                        assert_eq!(k_all.to_vec3::<f32>().unwrap(), want);
                        assert_eq!(v_all.neg().unwrap().to_vec3::<f32>().unwrap(), want);
                    }
                    let keep = capacity.map_or(all[0].len(), |c| all[0].len().min(c));
                    let want: Vec<Vec<Vec<f32>>> = all
                        .iter()
                        .map(|head| head[head.len() - keep..].to_vec())
                        .collect();
                    let got = contents(&cache);
                    if keep == 0 {
                        assert!(got.is_none(), "{capacity:?} {stored:?} step {step}");
                        continue;
                    }
                    let (k, v) = got.unwrap();
                    assert_eq!(k, want, "{capacity:?} {stored:?} step {step}");
                    let negated: Vec<Vec<Vec<f32>>> = v
                        .iter()
                        .map(|h| h.iter().map(|r| r.iter().map(|x| -x).collect()).collect())
                        .collect();
                    assert_eq!(negated, want, "{capacity:?} {stored:?} step {step}");
                    let (ck, _) = cache.parts().unwrap();
                    assert_eq!(ck.dtype(), stored);
                }
            }
        }
    }

    #[test]
    fn a_fork_or_backup_never_sees_the_other_side_push() {
        let mut a = KvCache::new(Some(8)).stored_as(DType::F16);
        for t in 0..3 {
            let (k, v) = token_rows(t, DType::F16);
            a.push(&k, &v).unwrap();
        }
        let before = contents(&a);
        // A backup keeps its rows while the cache writes its spare rows in place.
        let backup = a.backup();
        let (k, v) = token_rows(100, DType::F16);
        a.push(&k, &v).unwrap();
        assert_eq!(contents(&backup), before);
        assert_ne!(contents(&a), before);
        // A fork and the cache share the buffer: each push goes to its own rows.
        let mut fork = backup.clone();
        let mut b = a.clone();
        let (k1, v1) = token_rows(7, DType::F16);
        let (k2, v2) = token_rows(8, DType::F16);
        a.push(&k1, &v1).unwrap();
        b.push(&k2, &v2).unwrap();
        fork.push(&k2, &v2).unwrap();
        let last = |c: &KvCache| contents(c).unwrap().0[0].last().unwrap()[0];
        assert_eq!((last(&a), last(&b), last(&fork)), (70.0, 80.0, 80.0));
        assert_eq!(contents(&backup), before);
        assert_eq!(contents(&a).unwrap().0[0].len(), 5);
        // The bytes of the rows alone, as a state's size is predicted.
        assert_eq!(a.bytes(), 2 * (2 * 5 * 3) * 2);
        // A state written out and read back holds the same rows (views into a buffer
        // with spare rows are written compact).
        let state = SequenceState {
            layers: vec![LayerState::Softmax(a.clone())],
            position: 5,
        };
        let spec = StateSpec {
            layers: vec![LayerKind::Softmax { window: Some(8) }],
            num_kv_heads: 2,
            head_dim: 3,
            cache_dtype: DType::F16,
            ..spec()
        };
        let back = SequenceState::from_bytes(&spec, &state.to_bytes().unwrap()).unwrap();
        match &back.layers[0] {
            LayerState::Softmax(c) => assert_eq!(contents(c), contents(&a)),
            LayerState::Liger { .. } => panic!("a softmax layer"),
        }
    }

    #[test]
    fn pool_hands_out_each_slot_once() {
        let mut pool = StatePool::new(spec(), 2);
        let a = pool.acquire().unwrap().unwrap();
        let b = pool.acquire().unwrap().unwrap();
        assert_ne!(a.index(), b.index());
        assert!(pool.acquire().unwrap().is_none(), "pool is full");
        let freed = a.index();
        pool.release(a).unwrap();
        assert_eq!(pool.available(), 1);
        let c = pool.acquire().unwrap().unwrap();
        assert_eq!(c.index(), freed);
        assert_eq!(c.state.position(), 0, "a reused slot starts fresh");
        pool.release(b).unwrap();
        pool.release(c).unwrap();
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn slot_cannot_go_back_to_another_pool() {
        let mut p1 = StatePool::new(spec(), 1);
        let mut p2 = StatePool::new(spec(), 1);
        let s = p1.acquire().unwrap().unwrap();
        assert!(p2.release(s).is_err());
    }

    #[test]
    fn hybrid_state_bytes_split_by_kind() {
        let cfg = TinyCheckpoint::new(Family::Llama, 0)
            .unwrap()
            .with_liger(&crate::LigerConfig {
                full_attention_layers: vec![1],
                ..Default::default()
            })
            .model_config()
            .unwrap();
        let s = StateSpec::new(&cfg, DType::F32, &Device::Cpu);
        let (hkv, d) = (s.num_kv_heads, s.head_dim);
        let at = |n| s.bytes_by_kind_at(n);
        // Two Liger layers: constant recurrent memories, windows full after 64 tokens;
        // one softmax layer whose KV cache grows with the context.
        assert_eq!(at(10).recurrent, 2 * hkv * d * d * 4);
        assert_eq!(at(1000).recurrent, at(10).recurrent);
        assert_eq!(at(10).window, 2 * 10 * 2 * hkv * d * 4);
        assert_eq!(at(1000).window, 2 * 64 * 2 * hkv * d * 4);
        assert_eq!(at(1000).kv_cache, 1000 * 2 * hkv * d * 4);
        assert_eq!(at(1000).total(), s.bytes_at(1000));
    }

    #[test]
    fn liger_state_size_is_bounded_by_the_window() {
        let s = spec();
        let (hkv, d) = (s.num_kv_heads, s.head_dim);
        let per_layer = hkv * d * d * 4 + 2 * s.liger_window * hkv * d * 4;
        assert_eq!(s.bytes_at(1_000_000), per_layer * s.layers.len());
        assert_eq!(s.bytes_at(100_000), s.bytes_at(1_000_000));
    }
}
