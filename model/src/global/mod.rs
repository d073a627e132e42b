//! The global cache: a bounded set of older tokens the window branch keeps attending to.
//!
//! A sliding window forgets a token `window` steps after reading it, and the recurrent
//! memory keeps only a blurred sum of what it read. Besides the window, each layer keeps at
//! most `capacity` older key/value pairs per KV head, in up to three kinds of places:
//! - **sinks**: the first `sinks` tokens of a sequence, for good (StreamingLLM's attention
//!   sinks, arXiv 2309.17453);
//! - **recall places**: the tokens the linear memory *predicts worst* (LoLA, McDermott et al.,
//!   arXiv 2505.23666): `1 - cos(v_t, r_t)` with `r_t = phi(k_t) diag(a_t) S_{t-1}`, how far
//!   the memory's answer to the token's own key (before the token is written) is from its
//!   value; 1 while the memory has next to nothing to say (`|r| <= 1e-5 |v|`). What was said
//!   once and is not echoed (a pass key in filler text);
//! - **attention places**: the tokens that got the most attention while they were in the
//!   window (H2O's heavy hitters, Zhang et al., arXiv 2306.14048, measured over the same
//!   span for every token): a token's score is the sum, over the `window + 1` queries that
//!   saw it, of its share of each query's softmax over its window keys (the global rows
//!   left out, so the score does not depend on what the cache kept), averaged over the
//!   group's query heads. What the text keeps referring to, which the memory may already
//!   predict well and recall places then pass over.
//!
//! When a token leaves the window it is offered to the sinks and recall places (one pool,
//! the sinks scoring `+inf` there): while the pool has room it enters; when full, it
//! replaces the lowest-scored entry if it scores strictly higher. Whatever that pool turns
//! away or pushes out is then offered, by its attention score, to the attention places the
//! same way (ties keep the incumbent; among equal lowest, the first place goes). What both
//! turn away is gone for good (it lives on only in the recurrent memory, when there is one).
//! So the places fill in the same order in every head: sinks and recall places first, then
//! attention places, and a place's kind is its index.
//!
//! With a distance cap (`max_distance` L), a query at `P` scores an entry at `j < P - L` as
//! if it were exactly L back: `<R(L) q, k>` with both un-rotated, rather than
//! `<R(P) q, R(j) k>` (RoPE models break on distances they were never trained on, and only
//! kept tokens get that far). An entry's key is stored rotated until it passes L, and
//! un-rotated (rotated back by `j`, once) from then on, so a decode step scores every far
//! entry with one extra rotation of its query.
//!
//! A query sees its window, itself, and the cache as it stood when the query was read. A
//! token's scores are complete when it leaves the window (every query that sees it comes
//! before that) and never change after, so the cache after any prefix is the same however
//! the prefix was cut into prefill chunks or decode steps: [`Plan`] replays the admissions
//! token by token for a chunk, and a decode step is a chunk of one.

use std::sync::{Arc, Mutex, Weak};

use candle_core::{DType, Device, Tensor};

mod attend;
mod rows;
mod undo;

use crate::layers::convert;
use crate::Result;
pub(crate) use attend::{Exps, Geometry};
use rows::{Changes, Gather, Unrotate};

/// The global cache's distance cap ([`crate::config::LigerConfig::max_distance`]), with the
/// rotary frequencies its keys were rotated by.
#[derive(Debug, Clone, PartialEq)]
pub struct DistanceCap {
    pub max: usize,
    /// `[head_dim / 2]`, as [`crate::layers::Rope`] computes them.
    pub inv_freq: Arc<[f32]>,
}

impl DistanceCap {
    /// Whether a query at `query` scores a token at `position` at the cap.
    pub fn far(&self, position: u32, query: usize) -> bool {
        query.saturating_sub(position as usize) > self.max
    }
}

/// Where a span's candidate rows sit: the first candidate after the kept entries (the
/// oldest window row, or the span's first token without one), the span's first token, and
/// the position after its last.
#[derive(Debug, Clone, Copy)]
pub struct SpanPositions {
    pub first_row: usize,
    pub start: usize,
    pub end: usize,
}

/// One layer's global cache for one sequence.
#[derive(Debug, Clone)]
pub struct GlobalCache {
    capacity: usize,
    sinks: usize,
    /// Places given by attention (the last ones); those between the sinks and them go by
    /// recall.
    attention: usize,
    /// The kept entries' keys `[hkv, n, d]` (post-RoPE) and values `[hkv, n, d]`. `n` is
    /// the same for every head. Views into `room`'s buffers when it is set.
    kept_kv: Option<(Tensor, Tensor)>,
    /// Buffers with a row per place, which changes are written into in place ([`Room`]).
    room: Option<Box<Room>>,
    /// A backup's way back ([`backup`](Self::backup)).
    undo: Option<Box<Undo>>,
    /// The kept entries' scores, `[hkv][n]`: each its own place's kind first (the first
    /// pool's, or attention in an attention place), then, with both kinds of places, its
    /// attention score (a recall place's entry pushed out moves on to the attention
    /// places by it), else its own again. Plain host data: a decode step reads and
    /// writes a few of them per layer, and as tensors each step converted them to
    /// vectors and back (allocations a tenth of the step's state update).
    kept_scores: Vec<Vec<Scores>>,
    /// The kept entries' positions in the sequence, `[hkv][n]` (the distance cap scores
    /// an entry by how far back it is).
    positions: Vec<Vec<u32>>,
    /// Scores of the window cache's rows, `[hkv][len]`, oldest first: the recall scores
    /// when there are recall places, else the running attention sums; then, with both
    /// kinds of places, the running attention sums, else the first again. They compete
    /// for a place when they leave the window.
    window_scores: Vec<Vec<Scores>>,
    /// The logs of live backups, which each change to the three above is first recorded
    /// in (see [`undo`]).
    logs: undo::Logs,
    /// With a distance cap, the entries more than its distance before the next token are
    /// stored un-rotated.
    cap: Option<DistanceCap>,
    /// What kept keys and values are stored in; `None`: as they come.
    stored: Option<DType>,
}

/// Keys and values `[hkv, capacity, d]` (contiguous, on the CPU) whose first `n` rows per
/// head are the kept entries. A decode step changes a place or two per head (the token
/// that left the window takes a place, and the entry it pushed out of the first pool may
/// take another); rebuilding every kept row into new tensors for that copied the whole
/// cache, allocated it fresh and freed the old one: at 32 sequences and 1K tokens of
/// context, over a third of the state update after a decode step, itself a quarter of the
/// step. With a room only the changed places are written.
#[derive(Debug, Clone)]
struct Room {
    k: Tensor,
    v: Tensor,
    /// Cloned with the cache: a buffer is written in place only by the one cache holding
    /// it (a forked or snapshotted state shares it, and the first to change copies), since
    /// every kept row is seen by the views of whoever shares it.
    holder: Arc<()>,
    /// Never written in place (a restored backup's buffers, which caches other than the
    /// one it replaces may still read: see [`GlobalCache::restore`]).
    read_only: bool,
    /// Journals of this cache's live backups: a change first saves there the rows it is
    /// about to write over.
    journals: Vec<Weak<Journal>>,
}

/// Rows a backup saw, saved before changes wrote over them, oldest first: keys, values.
type Journal = Mutex<Vec<(Changes, Changes)>>;

/// What a backup needs to get back what it saw: the log of its host data's changes, and,
/// with a room, the rows' way back.
#[derive(Debug, Clone)]
struct Undo {
    host: Arc<undo::Log>,
    rows: Option<RowsUndo>,
}

/// A backup's way back to its rows: its journal, the buffers it was kept for, and which
/// room they were (to take it over from the cache it replaces, if that still has it).
#[derive(Debug, Clone)]
struct RowsUndo {
    journal: Arc<Journal>,
    k: Tensor,
    v: Tensor,
    room: Weak<()>,
}

/// A token's scores: (recall, attention), the first pool's then the second's. With one
/// kind of place both hold that kind's.
pub type Scores = (f32, f32);

/// Values per KV head: `[hkv][len]`.
pub type PerHead = Vec<Vec<f32>>;

/// A span's attention mass and recall scores per head, borrowed (as
/// [`GlobalCache::span_scores`] takes them owned); `None`: not scored.
pub(crate) type SpanScoring<'a> = (Option<&'a [&'a [f32]]>, Option<&'a [&'a [f32]]>);

/// Which candidate keys each new query sees, and what the cache keeps afterwards. The
/// candidates of a span are laid out as `[kept (n) | window cache (w) | new tokens (t)]`.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Per head, which candidates each query sees.
    visible: Vec<Visibility>,
    /// Per head, the candidate index of every kept entry after the span, in place order.
    kept_after: Vec<Vec<usize>>,
    /// Per head, the scores of those entries.
    kept_scores: Vec<Vec<Scores>>,
}

impl GlobalCache {
    /// `capacity` places per KV head: `sinks` for the first tokens, the last `attention`
    /// given by attention, those between by recall.
    pub fn new(capacity: usize, sinks: usize, attention: usize) -> Self {
        Self {
            capacity,
            sinks,
            attention,
            kept_kv: None,
            room: None,
            undo: None,
            kept_scores: Vec::new(),
            positions: Vec::new(),
            window_scores: Vec::new(),
            logs: undo::Logs::default(),
            cap: None,
            stored: None,
        }
    }

    /// Stores kept keys and values in `dtype` (rounded once, when stored); the candidates
    /// it hands out are in the dtype of the rows they are built with.
    pub fn stored_as(mut self, dtype: DType) -> Self {
        self.stored = Some(dtype);
        self
    }

    /// The same cache with a distance cap (`None`: none).
    pub fn with_distance_cap(mut self, cap: Option<DistanceCap>) -> Self {
        self.cap = cap;
        self
    }

    pub fn distance_cap(&self) -> Option<&DistanceCap> {
        self.cap.as_ref()
    }

    /// Which kept entries are stored un-rotated while `next` is the next token's position
    /// (those a query there scores at the cap), `[hkv][n]`; empty without a cap, or when
    /// none is. A decode step asks for every layer and sequence on one thread before it
    /// starts: until the context passes the cap that is answered without reading the
    /// positions (whose cache misses made even a scan ~1 ms of a 32-sequence step).
    pub fn raw_entries(&self, next: usize) -> Vec<Vec<bool>> {
        let Some(cap) = &self.cap else {
            return Vec::new();
        };
        if next <= cap.max || !self.positions.iter().flatten().any(|&p| cap.far(p, next)) {
            return Vec::new();
        }
        self.positions
            .iter()
            .map(|row| row.iter().map(|&p| cap.far(p, next)).collect())
            .collect()
    }

    /// Places per KV head (0: no global cache).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Whether tokens are scored by the attention they get in the window.
    pub fn scores_attention(&self) -> bool {
        self.attention > 0
    }

    /// Whether tokens are scored by the memory's recall (there are recall places).
    pub fn scores_recall(&self) -> bool {
        self.capacity > self.sinks + self.attention
    }

    /// Whether both kinds are scored (two scores per token kept).
    pub(crate) fn two_kinds(&self) -> bool {
        self.scores_attention() && self.scores_recall()
    }

    /// Places of the first pool: the sinks and the recall places, which come first.
    fn first_pool(&self) -> usize {
        self.capacity - self.attention
    }

    /// Entries kept per head.
    pub fn len(&self) -> usize {
        self.kept_kv
            .as_ref()
            .map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Kept keys and values (none while empty).
    pub fn kept(&self) -> Option<(&Tensor, &Tensor)> {
        self.kept_kv.as_ref().map(|(k, v)| (k, v))
    }

    /// The kept keys' and values' buffers (`[hkv, rows, d]`, contiguous), and how many
    /// rows of each head are kept entries (the rest are spare places).
    pub(crate) fn buffers(&self) -> Option<(&Tensor, &Tensor, usize)> {
        let n = self.len();
        match (&self.kept_kv, &self.room) {
            (None, _) => None,
            (Some(_), Some(room)) => Some((&room.k, &room.v, n)),
            (Some((k, v)), None) => Some((k, v, n)),
        }
    }

    /// A copy to restore if the step about to run must be undone (see
    /// [`SequenceState::backup`](crate::SequenceState::backup)). It shares every tensor
    /// but not the right to write the kept rows in place: that stays with this cache,
    /// which from now on saves the rows it writes over into the backup's journal, so that
    /// [`restore`](Self::restore) can put them back. It holds no scores or positions: this
    /// cache logs how to undo each change it makes to them (see [`undo`]).
    pub(crate) fn backup(&mut self) -> Self {
        let rows = self.room.as_mut().map(|room| {
            let journal = Arc::new(Journal::default());
            room.journals.retain(|j| j.strong_count() > 0);
            room.journals.push(Arc::downgrade(&journal));
            RowsUndo {
                journal,
                k: room.k.clone(),
                v: room.v.clone(),
                room: Arc::downgrade(&room.holder),
            }
        });
        Self {
            capacity: self.capacity,
            sinks: self.sinks,
            attention: self.attention,
            kept_kv: self.kept_kv.clone(),
            room: None,
            undo: Some(Box::new(Undo {
                host: self.logs.open(),
                rows,
            })),
            kept_scores: Vec::new(),
            positions: Vec::new(),
            window_scores: Vec::new(),
            logs: undo::Logs::default(),
            cap: self.cap.clone(),
            stored: self.stored,
        }
    }

    /// A backup made whole again, to take the place of `live`, the cache it was taken from
    /// (which must go: the rows its changes wrote are written back over). Where `live`
    /// still writes the same room, the backup takes it over, so the next change is written
    /// in place rather than copied (after every rejected speculative draft).
    pub(crate) fn restore(&mut self, live: &mut GlobalCache) -> Result<()> {
        let Some(undo) = self.undo.take() else {
            return Ok(());
        };
        if let Some(rows) = undo.rows {
            let saved = std::mem::take(&mut *rows.journal.lock().expect("a journal lock"));
            for (k, v) in saved.iter().rev() {
                k.write(&rows.k)?;
                v.write(&rows.v)?;
            }
            let same = |r: &Room| std::ptr::eq(Arc::as_ptr(&r.holder), rows.room.as_ptr());
            if live.room.as_deref().is_some_and(same) {
                // The kept rows are the room's first rows again (those past them are spare
                // places to this cache), and the room's buffers are the ones its views read.
                self.room = live.room.take();
            } else {
                // `live` had copied its rows into a room of its own (the one it had was
                // shared: a snapshot's, a fork's). The kept rows still lie in the buffers
                // this backup was kept for, which the fused decode step reads whole (their
                // views alone are strided: without the buffers the next step took the
                // general path, 235 ms for 8 streams against ~30). Read only: others may
                // read them (the snapshot), and older backups' journals are not kept
                // here, so the next change copies, as it would have.
                self.room = Some(Box::new(Room {
                    k: rows.k,
                    v: rows.v,
                    holder: Arc::new(()),
                    read_only: true,
                    journals: Vec::new(),
                }));
            }
        }
        // The live cache's data with its changes undone; it goes on logging for the
        // backups taken before this one.
        let log = std::mem::take(&mut *undo.host.lock().expect("a log lock"));
        self.kept_scores = std::mem::take(&mut live.kept_scores);
        self.positions = std::mem::take(&mut live.positions);
        self.window_scores = std::mem::take(&mut live.window_scores);
        undo::replay(
            log,
            undo::Host {
                kept_scores: &mut self.kept_scores,
                positions: &mut self.positions,
                window_scores: &mut self.window_scores,
            },
        );
        self.logs = std::mem::take(&mut live.logs);
        Ok(())
    }

    /// The kept entries' positions, `[hkv][n]` (empty while nothing is kept).
    pub fn positions(&self) -> &[Vec<u32>] {
        &self.positions
    }

    /// The kept entries' scores in their place's kind, `[hkv, n]` (none while nothing is
    /// kept).
    pub fn kept_scores(&self) -> Result<Option<Tensor>> {
        self.kept_kv
            .as_ref()
            .map(|_| channel(&self.kept_scores, |s| s.0))
            .transpose()
    }

    /// The kept entries' attention scores `[hkv, n]`, with both kinds of places.
    pub fn kept_attention(&self) -> Result<Option<Tensor>> {
        match self.kept_kv {
            Some(_) if self.two_kinds() => Ok(Some(channel(&self.kept_scores, |s| s.1)?)),
            _ => Ok(None),
        }
    }

    /// Scores of the window cache's rows `[hkv, len]` (none while the window is empty).
    pub fn window_scores(&self) -> Result<Option<Tensor>> {
        match self.window_scores.first() {
            Some(row) if !row.is_empty() => Ok(Some(channel(&self.window_scores, |s| s.0)?)),
            _ => Ok(None),
        }
    }

    /// The window rows' running attention sums `[hkv, len]`, with both kinds of places.
    pub fn window_attention(&self) -> Result<Option<Tensor>> {
        match self.window_scores.first() {
            Some(row) if !row.is_empty() && self.two_kinds() => {
                Ok(Some(channel(&self.window_scores, |s| s.1)?))
            }
            _ => Ok(None),
        }
    }

    /// Restores what the getters above give (state deserialization checks shapes):
    /// the kept keys, values and scores, and the other parts.
    pub(crate) fn set_parts(
        &mut self,
        kept: Option<(Tensor, Tensor, Tensor)>,
        parts: Parts,
    ) -> Result<()> {
        let (kept_kv, scores) = match kept {
            Some((k, v, s)) => (Some((k, v)), Some(s)),
            None => (None, None),
        };
        let kept_scores = pairs(scores.as_ref(), parts.kept_attention.as_ref())?;
        let window_scores = pairs(
            parts.window_scores.as_ref(),
            parts.window_attention.as_ref(),
        )?;
        let old_kept = std::mem::replace(&mut self.kept_scores, kept_scores);
        let old_positions = std::mem::replace(&mut self.positions, parts.positions);
        self.logs
            .record(undo::Change::Kept(old_kept, old_positions));
        let old_window = std::mem::replace(&mut self.window_scores, window_scores);
        self.logs.record(undo::Change::Window(old_window));
        self.kept_kv = kept_kv;
        (self.room, self.undo) = (None, None);
        Ok(())
    }

    /// Cuts the kept keys and values off from the autograd graph (see
    /// [`SequenceState::detach`](crate::SequenceState::detach)).
    pub(crate) fn detach(&mut self) {
        // The detached views still read the room's buffers (plain host data, never part of
        // a graph), so the room stays: written in place only while this cache alone holds
        // it, as before. Dropping it would let a clone that still holds it write over rows
        // these views read.
        if let Some((k, v)) = &mut self.kept_kv {
            (*k, *v) = (k.detach(), v.detach());
        }
    }

    /// Bytes held (keys and values with their spare places, positions and scores).
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        // A room is held whole, its spare places too.
        let rows = match (&self.room, self.kept()) {
            (Some(room), Some(_)) => b(&room.k) + b(&room.v),
            (_, kept) => kept.map_or(0, |(k, v)| b(k) + b(v)),
        };
        // Scores as the state blob holds them: one f32 each, two with both kinds.
        let per_score = std::mem::size_of::<f32>() * if self.two_kinds() { 2 } else { 1 };
        let scores: usize = self
            .kept_scores
            .iter()
            .chain(&self.window_scores)
            .map(Vec::len)
            .sum();
        rows + scores * per_score
            + self.positions.iter().map(Vec::len).sum::<usize>() * std::mem::size_of::<u32>()
    }

    /// The scores of a span of `t` new tokens from `position` in `hkv` heads, `[hkv][t]`,
    /// sinks at `+inf`.
    /// `mass` (`[hkv][w + t]`, attention places only, [`crate::attention::window_mass`]):
    /// the attention the span's queries gave each of the `w` cached window rows and the new
    /// tokens; the first `w` are added to the window rows' running sums. `recall`
    /// (`[hkv][t]`, recall places only, [`recall_scores`]): the new tokens' recall scores.
    /// What a kind needs and is not given scores 0 (sinks only: no other token can take a
    /// place anyway).
    pub fn span_scores(
        &mut self,
        position: usize,
        (hkv, t): (usize, usize),
        mass: Option<Vec<Vec<f32>>>,
        recall: Option<Vec<Vec<f32>>>,
    ) -> Result<Vec<Vec<Scores>>> {
        let (mass, recall) = (per_head_slices(&mass), per_head_slices(&recall));
        self.span_scores_of(position, (hkv, t), (mass.as_deref(), recall.as_deref()))
    }

    /// [`span_scores`](Self::span_scores) from borrowed rows (the fused decode step's
    /// outputs, read where they lie instead of copied per head).
    fn span_scores_of(
        &mut self,
        position: usize,
        (hkv, t): (usize, usize),
        (mass, recall): SpanScoring<'_>,
    ) -> Result<Vec<Vec<Scores>>> {
        // Each head's new tokens' attention mass (after the `cached` window rows').
        let new_mass: Option<(&[&[f32]], usize)> = match mass {
            Some(mass) if self.scores_attention() => {
                let two = self.two_kinds();
                let cached = self.window_scores.first().map_or(0, Vec::len);
                if mass.iter().any(|m| m.len() != cached + t) {
                    return Err(crate::Error::State(
                        "attention scores do not cover the window".into(),
                    ));
                }
                // The running sums: the second score with both kinds, else the first
                // (and the second its copy).
                if self.logs.window_unsaved() {
                    self.logs
                        .record(undo::Change::Window(self.window_scores.clone()));
                }
                for (row, m) in self.window_scores.iter_mut().zip(mass) {
                    for (s, &a) in row.iter_mut().zip(m.iter()) {
                        *s = with_mass(*s, a, two);
                    }
                }
                Some((mass, cached))
            }
            _ => None,
        };
        let mass_of = |h: usize, i: usize| new_mass.map_or(0.0, |(m, cached)| m[h][cached + i]);
        let recall = recall.filter(|_| self.scores_recall());
        let recall_of = |h: usize, i: usize| recall.map_or(0.0, |r| r[h][i]);
        Ok((0..hkv)
            .map(|h| {
                (0..t)
                    .map(|i| {
                        if position + i < self.sinks {
                            return (f32::INFINITY, f32::INFINITY);
                        }
                        let (a, r) = (mass_of(h, i), recall_of(h, i));
                        match (self.scores_recall(), self.scores_attention()) {
                            (true, true) => (r, a),
                            (false, true) => (a, a),
                            (_, false) => (r, r),
                        }
                    })
                    .collect()
            })
            .collect())
    }

    /// The scores of the window rows kept after a span: the last `keep` of the cached rows'
    /// followed by the span's (`scores`, `[hkv][t]`).
    pub fn window_scores_after(
        &self,
        scores: &[Vec<Scores>],
        keep: usize,
    ) -> Result<Vec<Vec<Scores>>> {
        Ok(scores
            .iter()
            .enumerate()
            .map(|(h, new)| {
                let old = self.window_scores_of(h);
                // The last `keep` of `old` followed by `new`, copied once.
                let from_new = keep.min(new.len());
                let from_old = keep - from_new;
                let mut kept = Vec::with_capacity(keep);
                kept.extend_from_slice(&old[old.len() - from_old..]);
                kept.extend_from_slice(&new[new.len() - from_new..]);
                kept
            })
            .collect())
    }

    /// A short span's update, as the fused decode step needs it: its `t` tokens (from
    /// position `position`, post-RoPE keys and values `[hkv, t, d]`) were read after
    /// `window_before` (the window cache before them, if any); the window keeps `window`
    /// rows, so the oldest cached rows may leave and compete for places. `mass` and
    /// `recall` as in [`span_scores`](Self::span_scores).
    pub(crate) fn decode_step(
        &mut self,
        position: usize,
        window: usize,
        window_before: Option<(&Tensor, &Tensor)>,
        (k, v): (&Tensor, &Tensor),
        scoring: SpanScoring<'_>,
    ) -> Result<()> {
        let (hkv, t, _) = k.dims3()?;
        let scores = self.span_scores_of(position, (hkv, t), scoring)?;
        let window_len = window_before.map_or(Ok(0), |(k, _)| k.dim(1))?;
        // The fused step replayed what its queries saw; only the places after are needed.
        let plan = self.plan_tracked(window, window_len, &scores, false)?;
        let keep = (window_len + t).min(window);
        let window_scores = self.window_scores_after(&scores, keep)?;
        let rows: Vec<(&Tensor, &Tensor)> = window_before.into_iter().chain([(k, v)]).collect();
        let span = SpanPositions {
            first_row: position - window_len,
            start: position,
            end: position + t,
        };
        self.apply(&plan, &rows, (window_scores, span))
    }

    /// The keys and values a plan's columns index: the kept rows, then `rows` in order (the
    /// window cache and the new tokens), each `[hkv, len, d]`, in the dtype of the first
    /// rows.
    pub fn candidates(&self, rows: &[(&Tensor, &Tensor)]) -> Result<(Tensor, Tensor)> {
        let dtype = rows.first().map_or(DType::F32, |(k, _)| k.dtype());
        candidates(self.kept_kv.as_ref(), rows, dtype)
    }

    /// The admissions of a span of `t` tokens after `window_len` cached window rows, for
    /// a window of `window` keys: replays, token by token, every token leaving the window
    /// (`scores`: the new tokens', `[hkv][t]`, from [`span_scores`](Self::span_scores)).
    pub fn plan(&self, window: usize, window_len: usize, scores: &[Vec<Scores>]) -> Result<Plan> {
        self.plan_tracked(window, window_len, scores, true)
    }

    /// [`plan`](Self::plan), with what each query sees (`tracked`) or only the places after
    /// the span (a plan whose visibility nobody reads: `visible_row` and `mask` then
    /// show the queries' windows alone).
    fn plan_tracked(
        &self,
        window: usize,
        window_len: usize,
        scores: &[Vec<Scores>],
        tracked: bool,
    ) -> Result<Plan> {
        let hkv = scores.len();
        let t = scores.first().map_or(0, Vec::len);
        let mut plan = Plan {
            visible: Vec::with_capacity(hkv),
            kept_after: Vec::with_capacity(hkv),
            kept_scores: Vec::with_capacity(hkv),
        };
        for (h, new) in scores.iter().enumerate() {
            // The window rows' scores, then the span's (read in place, not joined).
            let cached = &self.window_scores_of(h)[..window_len];
            let score = |j: usize| {
                cached
                    .get(j)
                    .copied()
                    .unwrap_or_else(|| new[j - window_len])
            };
            let mut head = self.admissions(h, window, (window_len, t), tracked);
            for i in 0..=t {
                head.advance(i, score);
            }
            let head = head.finish();
            plan.visible.push(head.0);
            plan.kept_after.push(head.1);
            plan.kept_scores.push(head.2);
        }
        Ok(plan)
    }

    /// Carries out `plan` for a span: `rows` are the candidates after the kept entries,
    /// in the plan's layout (the window cache, then the new tokens, each `[hkv, len, d]`);
    /// `window_scores_after` is the scores of the window rows kept after the span
    /// (`[hkv][len]`). With a distance cap, the entries that have passed it by the next
    /// token are then stored un-rotated.
    pub fn apply(
        &mut self,
        plan: &Plan,
        rows: &[(&Tensor, &Tensor)],
        (window_scores_after, span): (Vec<Vec<Scores>>, SpanPositions),
    ) -> Result<()> {
        let first_row = span.first_row;
        let before = self.len();
        // Which entries are stored un-rotated now, in the new place order.
        let mut was_raw = self.raw_entries(span.start);
        let n = plan.kept_after.first().map_or(0, Vec::len);
        let first_pool = self.first_pool();
        let unchanged = n == before
            && plan
                .kept_after
                .iter()
                .all(|row| row.iter().enumerate().all(|(i, &c)| i == c));
        let two = self.two_kinds();
        let hkv = plan.kept_after.len();
        if !unchanged {
            // What undoes the writes below, for a live backup: the entries written over
            // or dropped, saved head by head before they are.
            let mut undo = self
                .logs
                .active()
                .then(|| undo::Entries::new(&self.kept_scores, &self.positions));
            // Only the places whose entry changes are written (a decode step changes a
            // place or two of hundreds): an entry that stays keeps its position, its
            // rotation and its scores (stored as below already).
            self.kept_scores.resize(hkv, Vec::new());
            self.positions.resize(hkv, Vec::new());
            let raw = !was_raw.is_empty();
            was_raw.resize(hkv, Vec::new());
            for (h, (row, scores)) in plan.kept_after.iter().zip(&plan.kept_scores).enumerate() {
                // Read every changed place's entry before any is written: an entry may move
                // to a place whose entry moves on.
                let old = &self.positions[h];
                let changed: Vec<(usize, u32, bool)> = row
                    .iter()
                    .enumerate()
                    .filter(|&(i, &c)| c != i || i >= before)
                    .map(|(i, &c)| {
                        let position = match old.get(c) {
                            Some(&p) => p,
                            None => (first_row + c - old.len()) as u32,
                        };
                        (i, position, was_raw[h].get(c) == Some(&true))
                    })
                    .collect();
                let n = row.len();
                if let Some(undo) = &mut undo {
                    let had = self.kept_scores[h].len().max(self.positions[h].len());
                    let places = changed.iter().map(|&(i, ..)| i).chain(n..had);
                    undo.save(h, places, (&self.kept_scores[h], &self.positions[h]));
                }
                self.kept_scores[h].resize(n, (0.0, 0.0));
                self.positions[h].resize(n, 0);
                if raw {
                    was_raw[h].resize(n, false);
                }
                for (i, position, is_raw) in changed {
                    // Each entry's score in its place's kind, then its attention score
                    // with both kinds (see `kept_scores`).
                    let s = scores[i];
                    let own = if i < first_pool { s.0 } else { s.1 };
                    self.kept_scores[h][i] = (own, if two { s.1 } else { own });
                    self.positions[h][i] = position;
                    if raw {
                        was_raw[h][i] = is_raw;
                    }
                }
            }
            if let Some(undo) = undo {
                self.logs.record(undo::Change::Entries(undo));
            }
        }
        let back = self.passing(&was_raw, span.end);
        if !unchanged || back.is_some() {
            self.rebuild(plan, rows, unchanged, back.as_deref())?;
        }
        let mut window_scores = window_scores_after;
        if !two {
            for s in window_scores.iter_mut().flatten() {
                s.1 = s.0;
            }
        }
        let old = std::mem::replace(&mut self.window_scores, window_scores);
        self.logs.record(undo::Change::Window(old));
        Ok(())
    }

    /// With a distance cap, how far to rotate back each entry's key (`[hkv * n]`): by its
    /// own position where a query at `next` scores it at the cap and it is still rotated
    /// (`was_raw`: which are un-rotated already), else 0; `None` when none passes (most
    /// steps).
    fn passing(&self, was_raw: &[Vec<bool>], next: usize) -> Option<Vec<i64>> {
        let cap = self.cap.as_ref()?;
        let passes = |h: usize, i: usize, p: u32| {
            cap.far(p, next)
                && !was_raw
                    .get(h)
                    .and_then(|r| r.get(i))
                    .copied()
                    .unwrap_or(false)
        };
        let rows = self.positions.iter().enumerate();
        if !rows
            .clone()
            .any(|(h, row)| row.iter().enumerate().any(|(i, &p)| passes(h, i, p)))
        {
            return None;
        }
        Some(
            rows.flat_map(|(h, row)| {
                row.iter()
                    .enumerate()
                    .map(move |(i, &p)| if passes(h, i, p) { -(p as i64) } else { 0 })
            })
            .collect(),
        )
    }

    /// Rebuilds the kept keys and values in the plan's place order from the kept entries
    /// and `rows` (or, `unchanged`, only rotates back the keys `back` names).
    fn rebuild(
        &mut self,
        plan: &Plan,
        rows: &[(&Tensor, &Tensor)],
        unchanged: bool,
        back: Option<&[i64]>,
    ) -> Result<()> {
        let dtype = match (self.stored, &self.kept_kv, rows.first()) {
            (Some(d), _, _) => d,
            (None, _, Some((k, _))) => k.dtype(),
            (None, Some((k, _)), None) => k.dtype(),
            (None, None, None) => return Ok(()),
        };
        let identity: Vec<Vec<usize>>;
        let (kept_after, rows) = if unchanged {
            let n = self.positions.first().map_or(0, Vec::len);
            identity = vec![(0..n).collect(); plan.kept_after.len()];
            (&identity, &[][..])
        } else {
            (&plan.kept_after, rows)
        };
        let unrotate = match (&self.cap, back) {
            (Some(cap), Some(back)) => Some(Unrotate {
                back,
                inv_freq: &cap.inv_freq,
            }),
            _ => None,
        };
        let old = self.kept_kv.take();
        let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) = old
            .iter()
            .map(|(k, v)| (k, v))
            .chain(rows.iter().copied())
            .unzip();
        let gather = |sources, kept_after| Gather {
            sources,
            kept_after,
            dtype,
        };
        let n = kept_after.first().map_or(0, Vec::len);
        let on_cpu = ks.iter().chain(&vs).all(|t| t.device().is_cpu());
        // In place, where the room is this cache's alone and takes these rows.
        if let Some(room) = self.room.as_mut().filter(|r| {
            on_cpu && !r.read_only && Arc::strong_count(&r.holder) == 1 && r.k.dtype() == dtype
        }) {
            let old_n = old.as_ref().map_or(Ok(0), |(k, _)| k.dim(1))?;
            // Values move with their keys but are never rotated: with the places
            // unchanged, only keys are written.
            let k = gather(&ks, kept_after).changes(unrotate.as_ref(), &room.k, old_n)?;
            let v = if unchanged {
                k.as_ref().map(|k| Changes::none(k.d))
            } else {
                gather(&vs, kept_after).changes(None, &room.v, old_n)?
            };
            if let (Some(k), Some(v)) = (k, v) {
                room.journals.retain(|j| j.strong_count() > 0);
                for journal in room.journals.iter().filter_map(Weak::upgrade) {
                    let saved = (k.current(&room.k)?, v.current(&room.v)?);
                    journal.lock().expect("a journal lock").push(saved);
                }
                k.write(&room.k)?;
                v.write(&room.v)?;
                self.kept_kv = Some((room.k.narrow(1, 0, n)?, room.v.narrow(1, 0, n)?));
                return Ok(());
            }
        }
        // A copy: on the CPU into a new room (a place per row of the capacity), so that the
        // next changes can be written in place.
        let rows_per_head = if on_cpu { self.capacity.max(n) } else { n };
        let k = gather(&ks, kept_after).run_padded(unrotate.as_ref(), rows_per_head)?;
        let v = match (&old, unchanged) {
            (Some((_, v)), true) if !on_cpu => v.clone(),
            _ => gather(&vs, kept_after).run_padded(None, rows_per_head)?,
        };
        if on_cpu {
            self.kept_kv = Some((k.narrow(1, 0, n)?, v.narrow(1, 0, n)?));
            self.room = Some(Box::new(Room {
                k,
                v,
                holder: Arc::new(()),
                read_only: false,
                journals: Vec::new(),
            }));
        } else {
            self.kept_kv = Some((k, v));
            self.room = None;
        }
        Ok(())
    }
}

/// Each head's row, borrowed.
fn per_head_slices(x: &Option<PerHead>) -> Option<Vec<&[f32]>> {
    x.as_ref().map(|x| x.iter().map(Vec::as_slice).collect())
}

/// The score parts of a global cache besides the kept entries' own, for
/// [`GlobalCache::set_parts`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub positions: Vec<Vec<u32>>,
    pub kept_attention: Option<Tensor>,
    pub window_scores: Option<Tensor>,
    pub window_attention: Option<Tensor>,
}

/// One score of every pair, `[hkv, len]` (f32, on the CPU).
fn channel(rows: &[Vec<Scores>], f: fn(&Scores) -> f32) -> Result<Tensor> {
    let len = rows.first().map_or(0, Vec::len);
    let x: Vec<f32> = rows.iter().flatten().map(f).collect();
    Ok(Tensor::from_vec(x, (rows.len(), len), &Device::Cpu)?)
}

/// Score pairs from one score tensor `[hkv, n]` and, with two kinds, the attention scores:
/// an entry's first score is `own`, its second the attention (or `own` again).
fn pairs(own: Option<&Tensor>, second: Option<&Tensor>) -> Result<Vec<Vec<Scores>>> {
    let Some(own) = own else {
        return Ok(Vec::new());
    };
    let own = own.to_vec2::<f32>()?;
    let second = match second {
        Some(r) => r.to_vec2::<f32>()?,
        None => own.clone(),
    };
    Ok(own
        .into_iter()
        .zip(second)
        .map(|(o, r)| o.into_iter().zip(r).collect())
        .collect())
}

impl Plan {
    /// Whether every candidate is visible to every query (no mask needed).
    pub fn all_visible(&self) -> bool {
        self.visible
            .iter()
            .all(|v| (0..v.t).all(|i| v.row(i).iter().all(|&x| x)))
    }

    /// Head `h`'s candidates that are in the cache for some of the span's queries:
    /// (candidate, since, until), in query indices.
    pub(crate) fn members(&self, h: usize) -> &[(usize, usize, usize)] {
        &self.visible[h].members
    }

    /// Which candidates query `i` of head `h` sees (`[n + w + t]`).
    pub fn visible_row(&self, h: usize, i: usize) -> Vec<bool> {
        self.visible[h].row(i)
    }

    /// The additive mask `[hkv, 1, t, candidates]` (0 visible, -inf hidden).
    pub fn mask(&self, device: &Device) -> Result<Tensor> {
        let hkv = self.visible.len();
        let (t, l) = self.visible.first().map_or((0, 0), |v| (v.t, v.total()));
        let mut m = vec![f32::NEG_INFINITY; hkv * t * l];
        for (v, head) in self.visible.iter().zip(m.chunks_mut((t * l).max(1))) {
            for (i, row) in head.chunks_mut(l.max(1)).enumerate().take(t) {
                v.fill_row(i, row, 0.0);
            }
        }
        Ok(Tensor::from_vec(m, (hkv, 1, t, l), device)?)
    }
}

/// Which candidates (`[kept (n) | window cache (w) | new tokens (t)]`) each of a span's
/// queries sees in one head: its window (consecutive columns), and the global cache's
/// entries while they are kept, `[since, until)` in query indices. Kept as ranges, not a
/// table of `t * (n + w + t)` flags: a prefill piece's mask is written with row fills.
#[derive(Debug, Clone)]
struct Visibility {
    n: usize,
    w: usize,
    t: usize,
    window: usize,
    /// Candidates that are in the cache for some queries: (candidate, since, until).
    members: Vec<(usize, usize, usize)>,
}

impl Visibility {
    fn total(&self) -> usize {
        self.n + self.w + self.t
    }

    /// Query `i`'s window: candidates `lo..=hi`.
    fn window_of(&self, i: usize) -> (usize, usize) {
        let first_in_window = (i + self.w).saturating_sub(self.window);
        (self.n + first_in_window, self.n + i + self.w)
    }

    /// Writes `value` where query `i` sees a candidate (`row`: `[total]`).
    fn fill_row<T: Copy>(&self, i: usize, row: &mut [T], value: T) {
        let (lo, hi) = self.window_of(i);
        row[lo..=hi].fill(value);
        for &(c, since, until) in &self.members {
            if since <= i && i < until {
                row[c] = value;
            }
        }
    }

    fn row(&self, i: usize) -> Vec<bool> {
        let mut row = vec![false; self.total()];
        self.fill_row(i, &mut row, true);
        row
    }
}

/// The kept rows then `rows`, in `dtype` (the kept rows may be stored in another).
fn candidates(
    kept: Option<&(Tensor, Tensor)>,
    rows: &[(&Tensor, &Tensor)],
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let kept = kept.map(|(k, v)| (k, v));
    let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = kept
        .into_iter()
        .chain(rows.iter().copied())
        .map(|(k, v)| Ok((convert(k, dtype)?, convert(v, dtype)?)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    Ok((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?))
}

/// Recall scores of a span (`[hkv][t]`): `1 - cos(v, r)` for values `v` and the memory's
/// reads `r` before each token (`[hkv, t, d]` each).
pub fn recall_scores(v: &Tensor, read: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (hkv, t, d) = v.dims3()?;
    if read.dims3()? != (hkv, t, d) {
        return Err(crate::Error::State(
            "memory reads do not match the values".into(),
        ));
    }
    // Flat copies: `read` is a view into the recurrence's output, and reading a strided
    // tensor element by element (`to_vec3`) took ~0.35 ms a prefill piece.
    let flat = |x: &Tensor| -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (v, read) = (flat(v)?, flat(read)?);
    Ok((0..hkv)
        .map(|h| {
            (0..t)
                .map(|i| {
                    let row = (h * t + i) * d..(h * t + i + 1) * d;
                    salience(&v[row.clone()], &read[row])
                })
                .collect()
        })
        .collect())
}

/// `1 - cos(v, r)`; 1 when the read is negligible next to the value (nothing to compare
/// with: the read is then mostly the rounding of taking the token's own write out of it, so
/// the cosine would be noise).
pub(crate) fn salience(v: &[f32], r: &[f32]) -> f32 {
    let (mut dot, mut vv, mut rr) = (0f64, 0f64, 0f64);
    for (&a, &b) in v.iter().zip(r) {
        dot += a as f64 * b as f64;
        vv += a as f64 * a as f64;
        rr += b as f64 * b as f64;
    }
    if vv == 0.0 || rr <= 1e-10 * vv {
        return 1.0;
    }
    (1.0 - dot / (vv * rr).sqrt()) as f32
}

/// One head's admissions over a span, on plain data, query by query: before query `i`
/// ([`advance`](Self::advance)), every row that has left the window by then competes for
/// a place. [`GlobalCache::plan`] replays a whole span with it; the fused decode step
/// steps it along a short span's queries, so that each sees the entries the plan will
/// say it sees (the scores a row competes with are final once it has left: only queries
/// that see it in their window add to them).
pub(crate) struct Admissions {
    capacity: usize,
    /// Places of the first pool (sinks and recall places), compared by the first score;
    /// the rest are attention places, compared by the second.
    first: usize,
    window: usize,
    /// Entries kept before the span (candidates `0..n`), cached window rows (`n..n + w`),
    /// new tokens (`t`).
    n: usize,
    w: usize,
    t: usize,
    /// Places: (candidate, scores).
    places: Vec<(usize, Scores)>,
    /// Each candidate's membership, `[since, until)` in query indices (`usize::MAX`:
    /// never / not yet); empty when not tracked (a decode step's plan needs only the
    /// places after it: its one query sees what was kept before it).
    since: Vec<usize>,
    until: Vec<usize>,
    tracked: bool,
    /// Stream index (window rows, then new tokens) of the next row to leave the window.
    next_leave: usize,
}

impl GlobalCache {
    /// Head `h`'s admissions over a span of `t` tokens after `w` cached window rows, for a
    /// window of `window` keys; `tracked`: with what each query sees.
    pub(crate) fn admissions(
        &self,
        h: usize,
        window: usize,
        (w, t): (usize, usize),
        tracked: bool,
    ) -> Admissions {
        let kept = self.kept_scores.get(h).map_or(&[][..], Vec::as_slice);
        Admissions::new(
            (self.capacity, self.first_pool()),
            window,
            kept,
            (w, t),
            tracked,
        )
    }

    /// Head `h`'s window row `j`'s scores once the span's queries have given it `mass`
    /// (the sum of their attention shares), as [`span_scores`](Self::span_scores) makes
    /// them: a row competes with these when it leaves.
    pub(crate) fn window_row_scores(&self, h: usize, j: usize, mass: f32) -> Scores {
        let s = self.window_scores[h][j];
        if self.scores_attention() {
            with_mass(s, mass, self.two_kinds())
        } else {
            s
        }
    }

    /// Head `h`'s pre-span window scores, `[w]`.
    pub(crate) fn window_scores_of(&self, h: usize) -> &[Scores] {
        self.window_scores.get(h).map_or(&[][..], Vec::as_slice)
    }
}

/// A window row's scores after `a` more attention: the running sum is the second score
/// with both kinds, else the first (and the second its copy).
fn with_mass(s: Scores, a: f32, two: bool) -> Scores {
    if two {
        (s.0, s.1 + a)
    } else {
        (s.0 + a, s.0 + a)
    }
}

impl Admissions {
    /// `capacity` places, the first `first` of them the first pool, holding `kept`.
    fn new(
        (capacity, first): (usize, usize),
        window: usize,
        kept: &[Scores],
        (w, t): (usize, usize),
        tracked: bool,
    ) -> Self {
        let n = kept.len();
        let total = if tracked { n + w + t } else { 0 };
        let mut since = vec![usize::MAX; total];
        since[..n.min(total)].fill(0);
        Self {
            capacity,
            first: first.min(capacity),
            window,
            n,
            w,
            t,
            places: kept.iter().copied().enumerate().collect(),
            since,
            until: vec![usize::MAX; total],
            tracked,
            next_leave: 0,
        }
    }

    /// Stream rows that leave the window before query `i` (query `t`: after the span).
    fn leaving(&self, i: usize) -> std::ops::Range<usize> {
        // Query i (the span's i-th token) sees stream rows i + w - window ..= i + w; rows
        // before that have left.
        let first_in_window = (i + self.w).saturating_sub(self.window);
        self.next_leave..first_in_window.max(self.next_leave)
    }

    /// Lets every row leave that leaves before query `i`, each competing for a place with
    /// its scores (`stream(j)` for stream row `j`). Queries are advanced in order.
    pub(crate) fn advance(&mut self, i: usize, stream: impl Fn(usize) -> Scores) {
        let first = self.first;
        for j in self.leaving(i) {
            let c = self.n + j;
            let entry = (c, stream(j));
            self.next_leave = j + 1;
            let tracked = self.tracked;
            let (since, until) = (&mut self.since, &mut self.until);
            let mark = |at: &mut Vec<usize>, c: usize, i: usize| {
                if tracked {
                    at[c] = i;
                }
            };
            let places = &mut self.places;
            // The first pool, by the first score.
            let offered = if places.len() < first {
                places.push(entry);
                mark(since, c, i);
                continue;
            } else {
                match lowest(&places[..first], |s| s.0) {
                    Some(p) if entry.1 .0 > places[p].1 .0 => {
                        mark(since, c, i);
                        std::mem::replace(&mut places[p], entry)
                    }
                    _ => entry,
                }
            };
            // What it turned away or pushed out: the attention places, by the second.
            let taken = if places.len() < self.capacity {
                places.push(offered);
                true
            } else {
                match lowest(&places[first..], |s| s.1) {
                    Some(p) if offered.1 .1 > places[first + p].1 .1 => {
                        let out = std::mem::replace(&mut places[first + p], offered);
                        mark(until, out.0, i);
                        true
                    }
                    _ => false,
                }
            };
            if !tracked {
                continue;
            }
            if taken {
                if since[offered.0] == usize::MAX {
                    since[offered.0] = i;
                }
            } else if since[offered.0] != usize::MAX {
                until[offered.0] = i; // pushed out of the first pool and gone
            }
        }
    }

    /// Whether query `i` sees candidate `c` as a kept entry (not through its window).
    pub(crate) fn keeps(&self, c: usize, i: usize) -> bool {
        debug_assert!(self.tracked, "membership is tracked");
        self.since[c] <= i && i < self.until[c]
    }

    /// Entries kept before the span.
    pub(crate) fn kept_before(&self) -> usize {
        self.n
    }

    /// Returns (what each query sees, kept candidates after, their scores).
    fn finish(self) -> (Visibility, Vec<usize>, Vec<Scores>) {
        let total = self.since.len();
        let members = (0..total)
            .filter(|&c| self.since[c] != usize::MAX)
            .map(|c| (c, self.since[c], self.until[c]))
            .collect();
        let visible = Visibility {
            n: self.n,
            w: self.w,
            t: self.t,
            window: self.window,
            members,
        };
        let (kept_after, kept_scores) = self.places.into_iter().unzip();
        (visible, kept_after, kept_scores)
    }
}

/// The place with the lowest score by `key` (the first among equals).
fn lowest(places: &[(usize, Scores)], key: impl Fn(&Scores) -> f32) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, (_, s)) in places.iter().enumerate() {
        if best.is_none_or(|b| key(s) < key(&places[b].1)) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(scores: &[f32]) -> Vec<Scores> {
        scores.iter().map(|&s| (s, s)).collect()
    }

    /// A whole span's admissions, as `GlobalCache::plan` replays them.
    fn replay(
        (capacity, first): (usize, usize),
        window: usize,
        kept: &[Scores],
        stream: &[Scores],
        t: usize,
    ) -> (Visibility, Vec<usize>, Vec<Scores>) {
        let w = stream.len() - t;
        let mut a = Admissions::new((capacity, first), window, kept, (w, t), true);
        for i in 0..=t {
            a.advance(i, |j| stream[j]);
        }
        a.finish()
    }

    fn run(capacity: usize, window: usize, kept: &[f32], stream: &[f32], t: usize) -> String {
        let (vis, after, _) = replay((capacity, 0), window, &same(kept), &same(stream), t);
        let rows: Vec<String> = (0..t)
            .map(|i| vis.row(i))
            .map(|r| r.iter().map(|&v| if v { '1' } else { '.' }).collect())
            .collect();
        format!("{} -> {:?}", rows.join(" "), after)
    }

    #[test]
    fn leaving_tokens_compete_for_places() {
        // Window 1, two places, five fresh tokens scored 5, 1, 3, 0, 4.
        // Query 0 sees itself; query 1 sees 0, 1; query 2 sees 1, 2 and (kept) 0; ...
        // Token 1 (score 1) is replaced by token 2 (score 3) when 2 leaves, before query 4.
        assert_eq!(
            run(2, 1, &[], &[5.0, 1.0, 3.0, 0.0, 4.0], 5),
            "1.... 11... 111.. 1111. 1.111 -> [0, 2]"
        );
    }

    #[test]
    fn what_recall_places_push_out_moves_on_to_attention_places() {
        // Window 1, one recall place then one attention place. Scores (recall, attention):
        // token 0 (1, 9) takes the recall place; token 1 (5, 0) pushes it out, and it
        // moves on to the attention place with its 9; token 2 (0, 3) loses both.
        let stream = vec![(1.0, 9.0), (5.0, 0.0), (0.0, 3.0), (0.0, 0.0)];
        let (_, after, scores) = replay((2, 1), 1, &[], &stream, 4);
        assert_eq!(after, [1, 0]);
        assert_eq!(scores, [(5.0, 0.0), (1.0, 9.0)]);
    }

    #[test]
    fn a_chunked_span_replays_what_single_steps_do() {
        // The same tokens, the first three read as one chunk, then one at a time: the
        // places after each step must equal those of the whole run.
        let scores = [2.0, 7.0, 1.0, 9.0, 3.0, 3.0, 8.0];
        let whole = run(2, 2, &[], &scores, 7);
        assert!(whole.ends_with("-> [3, 1]"), "{whole}");
        // Replayed in two pieces through GlobalCache on tensors.
        let dev = Device::Cpu;
        let mut g = GlobalCache::new(2, 0, 0);
        let (mut wk, mut ws): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut read = 0;
        for piece in [&scores[..3], &scores[3..4], &scores[4..]] {
            let plan = g.plan(2, ws.len(), &[same(piece)]).unwrap();
            let first_row = read - ws.len();
            read += piece.len();
            // Keys are the candidates' own scores, so the kept keys name the kept tokens.
            let mut cand: Vec<f32> = wk.clone();
            cand.extend(piece);
            let l = cand.len();
            let c = Tensor::from_vec(cand, (1, l, 1), &dev).unwrap();
            wk.extend(piece);
            ws.extend(piece);
            let keep = wk.len().min(2);
            wk.drain(..wk.len() - keep);
            ws.drain(..ws.len() - keep);
            g.apply(
                &plan,
                &[(&c, &c)],
                (
                    vec![same(&ws)],
                    SpanPositions {
                        first_row,
                        start: read - piece.len(),
                        end: read,
                    },
                ),
            )
            .unwrap();
        }
        // Tokens 3 and 1 (scores 9 and 7), and their positions with them.
        assert_eq!(g.positions(), [vec![3, 1]]);
        let kept: Vec<f32> = g
            .kept()
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(kept, [9.0, 7.0]);
    }

    /// The definition, from scratch for every query at `p`: replay the tokens that have
    /// left the window, one by one, through the two pools (`first` places by the first
    /// score, then the rest by the second); the query sees those kept, the window, itself.
    fn naive_visible(
        (capacity, first): (usize, usize),
        window: usize,
        scores: &[Scores],
        p: usize,
    ) -> Vec<bool> {
        let first_in_window = p.saturating_sub(window);
        let mut pool_a: Vec<usize> = Vec::new();
        let mut pool_b: Vec<usize> = Vec::new();
        let min_by = |pool: &[usize], key: &dyn Fn(usize) -> f32| -> usize {
            let mut best = 0;
            for i in 1..pool.len() {
                if key(pool[i]) < key(pool[best]) {
                    best = i;
                }
            }
            best
        };
        for tok in 0..first_in_window {
            let mut offered = tok;
            if pool_a.len() < first {
                pool_a.push(tok);
                continue;
            }
            if first > 0 {
                let m = min_by(&pool_a, &|j| scores[j].0);
                if scores[tok].0 > scores[pool_a[m]].0 {
                    offered = std::mem::replace(&mut pool_a[m], tok);
                }
            }
            if pool_b.len() < capacity - first {
                pool_b.push(offered);
            } else if !pool_b.is_empty() {
                let m = min_by(&pool_b, &|j| scores[j].1);
                if scores[offered].1 > scores[pool_b[m]].1 {
                    pool_b[m] = offered;
                }
            }
        }
        (0..=p)
            .map(|j| j >= first_in_window || pool_a.contains(&j) || pool_b.contains(&j))
            .collect()
    }

    #[test]
    fn chunks_of_any_size_see_what_the_definition_says() {
        let mut rng = crate::rng::SplitMix(7);
        for case in 0..60 {
            let (capacity, window) = (1 + case % 4, 1 + case % 5);
            // Places of the first pool: 0 (attention only) ..= all (recall only).
            let first = (case / 4) % (capacity + 1);
            let len = 30;
            // Distinct scores (ties are resolved by place, not by age); with one kind of
            // place both scores are that kind's, as `span_scores` gives them.
            let scores: Vec<Scores> = (0..len)
                .map(|i| {
                    let (a, r) = (
                        rng.uniform() + i as f32 * 1e-3,
                        rng.uniform() + i as f32 * 1e-3,
                    );
                    match first {
                        0 => (a, a),
                        f if f == capacity => (r, r),
                        _ => (r, a),
                    }
                })
                .collect();
            let mut g = GlobalCache::new(capacity, 0, capacity - first);
            let mut kept_tokens: Vec<usize> = Vec::new(); // token of each place
            let mut start = 0;
            while start < len {
                let t = (1 + rng.next_u64() as usize % 6).min(len - start);
                let window_len = start.min(window);
                let plan = g
                    .plan(window, window_len, &[scores[start..start + t].to_vec()])
                    .unwrap();
                // Candidates: kept places, then stream rows start - window_len .. start + t.
                let candidate_token = |c: usize| {
                    if c < kept_tokens.len() {
                        kept_tokens[c]
                    } else {
                        start - window_len + (c - kept_tokens.len())
                    }
                };
                for (i, row) in (0..t).map(|i| plan.visible_row(0, i)).enumerate() {
                    let p = start + i;
                    let want = naive_visible((capacity, first), window, &scores, p);
                    let mut got = vec![false; p + 1];
                    for (c, &v) in row.iter().enumerate() {
                        if v {
                            got[candidate_token(c)] = true;
                        }
                    }
                    assert_eq!(got, want, "case {case}, query {p}");
                }
                kept_tokens = plan.kept_after[0]
                    .iter()
                    .map(|&c| candidate_token(c))
                    .collect();
                // Carry the state the way `apply` does, without keys.
                let keep = (start + t).min(window);
                let ws = scores[start + t - keep..start + t].to_vec();
                let c = Tensor::zeros((1, window_len + t, 1), DType::F32, &Device::Cpu).unwrap();
                let span = SpanPositions {
                    first_row: start - window_len,
                    start,
                    end: start + t,
                };
                g.apply(&plan, &[(&c, &c)], (vec![ws], span)).unwrap();
                let positions: Vec<u32> = kept_tokens.iter().map(|&p| p as u32).collect();
                assert_eq!(g.positions().concat(), positions, "case {case}");
                start += t;
            }
        }
    }

    #[test]
    fn sinks_score_infinite_and_scores_follow_the_kinds_of_places() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]]], &dev).unwrap();
        let perfect = recall_scores(&v, &v).unwrap();
        assert!(
            perfect[0][1].abs() < 1e-6,
            "a perfectly recalled token scores 0"
        );
        let r = Tensor::new(&[[[0f32, 1.0], [0.0, -1.0]]], &dev).unwrap();
        assert_eq!(recall_scores(&v, &r).unwrap(), [[1.0, 2.0]]);
        // Reads as views into a larger output (as the recurrence hands them over).
        let pairs = Tensor::stack(&[&r, &v], 3).unwrap(); // [1, 2, 2, 2]
        let (r_view, v_view) = (
            pairs.narrow(3, 0, 1).unwrap().squeeze(3).unwrap(),
            pairs.narrow(3, 1, 1).unwrap().squeeze(3).unwrap(),
        );
        assert!(!r_view.is_contiguous());
        assert_eq!(recall_scores(&v, &r_view).unwrap(), [[1.0, 2.0]]);
        assert_eq!(recall_scores(&v, &v_view).unwrap(), perfect);
        // Recall places only: both scores are the recall score; the sink is +inf.
        let mut g = GlobalCache::new(2, 1, 0);
        let s = g
            .span_scores(0, (1, 2), None, Some(vec![vec![1.0, 2.0]]))
            .unwrap();
        assert_eq!(s, [[(f32::INFINITY, f32::INFINITY), (2.0, 2.0)]]);
        // Both kinds: (recall, attention); the cached window rows' attention adds up.
        let mut g = GlobalCache::new(4, 1, 1);
        g.window_scores = vec![vec![(0.7, 0.5)]];
        let s = g
            .span_scores(
                3,
                (1, 1),
                Some(vec![vec![0.25, 0.75]]),
                Some(vec![vec![1.5]]),
            )
            .unwrap();
        assert_eq!(s, [[(1.5, 0.75)]]);
        let w = g.window_attention().unwrap().unwrap().to_vec2::<f32>();
        assert_eq!(w.unwrap(), [[0.75]]);
        assert_eq!(
            g.window_scores()
                .unwrap()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            [[0.7]]
        );
        // A mass that does not cover the window is refused.
        assert!(g
            .span_scores(4, (1, 1), Some(vec![vec![1.0]]), None)
            .is_err());
        // Sinks only: nothing measured, every other token scores 0 in every head.
        let mut g = GlobalCache::new(2, 2, 0);
        assert_eq!(
            g.span_scores(5, (2, 1), None, None).unwrap(),
            [[(0.0, 0.0)], [(0.0, 0.0)]]
        );
    }
    #[test]
    fn changes_in_place_equal_copies_and_spare_forks_and_backups() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SplitMix(5);
        let (hkv, d, window) = (2, 4, 3);
        let mut random = |shape: (usize, usize, usize)| {
            let x: Vec<f32> = (0..shape.0 * shape.1 * shape.2)
                .map(|_| rng.uniform() * 2.0 - 1.0)
                .collect();
            Tensor::from_vec(x, shape, &dev).unwrap()
        };
        let mut uniform = crate::rng::SplitMix(6);
        let mut draws = |n: usize| -> PerHead {
            (0..hkv)
                .map(|_| (0..n).map(|_| uniform.uniform()).collect())
                .collect()
        };
        type Rows = Option<(Vec<f32>, Vec<f32>)>;
        // Everything but the rows: what a backup now gets back through its log.
        let host = |g: &GlobalCache| {
            let bits = |rows: &[Vec<Scores>]| -> Vec<Vec<(u32, u32)>> {
                let pair = |s: &Scores| (s.0.to_bits(), s.1.to_bits());
                rows.iter().map(|r| r.iter().map(pair).collect()).collect()
            };
            (
                bits(&g.kept_scores),
                g.positions.clone(),
                bits(&g.window_scores),
            )
        };
        let kept_rows = |g: &GlobalCache| -> Rows {
            let f32s = |t: &Tensor| -> Vec<f32> {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            g.kept().map(|(k, v)| (f32s(k), f32s(v)))
        };
        // Recall places only, both kinds, attention places only.
        for (capacity, sinks, attention) in [(4, 1, 0), (5, 1, 2), (3, 0, 3)] {
            let mut fast = GlobalCache::new(capacity, sinks, attention).stored_as(DType::F16);
            let mut slow = fast.clone();
            let mut fork = None;
            let mut detached = None;
            let mut backup = None;
            let mut rows: Vec<(Tensor, Tensor)> = Vec::new();
            let mut in_place = 0;
            let mut position = 0;
            let (mut restored, mut failed) = (false, false);
            while position < 40 {
                let (k, v) = (random((hkv, 1, d)), random((hkv, 1, d)));
                let w0 = rows.len().saturating_sub(window);
                let before = (w0 < rows.len()).then(|| {
                    let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) =
                        rows[w0..].iter().map(|(k, v)| (k, v)).unzip();
                    (Tensor::cat(&ks, 1).unwrap(), Tensor::cat(&vs, 1).unwrap())
                });
                let mass = (attention > 0).then(|| draws(rows.len() - w0 + 1));
                let recall = (capacity > sinks + attention).then(|| draws(1));
                // The reference copies every kept row on every change, as before rooms.
                slow.room = None;
                let holder = fast.room.as_ref().map(|r| Arc::as_ptr(&r.holder));
                // While the outer backup below lives, each step also runs under a backup
                // of its own, as `forward_batch`'s: dropped after the step, and at token
                // 27 restored (a failed step) while the outer one keeps logging.
                let inner = (backup.is_some() && !restored).then(|| (fast.backup(), slow.clone()));
                let (mass, recall) = (per_head_slices(&mass), per_head_slices(&recall));
                for g in [&mut fast, &mut slow] {
                    let before = before.as_ref().map(|(k, v)| (k, v));
                    let scores = (mass.as_deref(), recall.as_deref());
                    g.decode_step(position, window, before, (&k, &v), scores)
                        .unwrap();
                }
                let kept_room = fast.room.as_ref().map(|r| Arc::as_ptr(&r.holder));
                in_place += usize::from(holder.is_some() && holder == kept_room);
                let what = format!("{capacity} places, {attention} by attention, token {position}");
                assert_eq!(kept_rows(&fast), kept_rows(&slow), "{what}");
                assert_eq!(host(&fast), host(&slow), "{what}");
                if let Some((mut b, s)) = inner.filter(|_| position == 27 && !failed) {
                    b.restore(&mut fast).unwrap();
                    (fast, slow, failed) = (b, s, true);
                    assert_eq!(kept_rows(&fast), kept_rows(&slow), "{what}: undone");
                    assert_eq!(host(&fast), host(&slow), "{what}: undone");
                    continue;
                }
                rows.push((k, v));
                position += 1;
                if position == 15 {
                    // A fork shares the room: neither may write the other's rows.
                    fork = Some((fast.clone(), kept_rows(&fast)));
                }
                if position == 33 {
                    // Nor may a fork once one of the two is detached (training's truncated
                    // backpropagation): the detached views still read the room.
                    let mut d = fast.clone();
                    d.detach();
                    let rows = kept_rows(&d);
                    detached = Some((d, rows));
                }
                if position == 25 && !restored {
                    // A backup does not stop the cache writing in place; restored, it is
                    // the cache as it was, and the tokens are read again from there.
                    backup = Some((fast.backup(), slow.clone(), kept_rows(&fast)));
                }
                if position == 29 && !restored {
                    let (mut b, s, at_backup) = backup.take().unwrap();
                    b.restore(&mut fast).unwrap();
                    assert!(b.room.is_some(), "a restored backup takes the room over");
                    assert_eq!(kept_rows(&b), at_backup, "{capacity} places: restored");
                    assert_eq!(host(&b), host(&s), "{capacity} places: restored");
                    (fast, slow, restored) = (b, s, true);
                    rows.truncate(25);
                    position = 25;
                }
            }
            let (detached, at_detach) = detached.unwrap();
            assert_eq!(
                kept_rows(&detached),
                at_detach,
                "{capacity} places: detached"
            );
            let (fork, at_fork) = fork.unwrap();
            assert_eq!(
                kept_rows(&fork),
                at_fork,
                "{capacity} places: the fork's rows"
            );
            // Most steps kept their room: all but those before the first copy, the one
            // after the fork, the one after the restore, and those beside the detached
            // fork.
            assert!(in_place >= 24, "{in_place} steps in place");
        }
    }

    #[test]
    fn a_backup_restored_over_a_copied_room_reads_its_buffers_and_leaves_them_alone() {
        // A state's first decode step after its prompt copies the kept rows (the room is
        // shared with the prompt's snapshot); a draft rejected in that step restores the
        // backup, which must still read whole buffers (the fused step needs them) without
        // writing the snapshot's rows.
        let dev = Device::Cpu;
        let mut rng = crate::rng::SplitMix(9);
        let (hkv, d, window) = (2, 4, 3);
        let mut token = || {
            let mut t = || {
                let x: Vec<f32> = (0..hkv * d).map(|_| rng.uniform() * 2.0 - 1.0).collect();
                Tensor::from_vec(x, (hkv, 1, d), &dev).unwrap()
            };
            (t(), t())
        };
        let f32s = |t: &Tensor| -> Vec<f32> {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let kept = |g: &GlobalCache| g.kept().map(|(k, v)| (f32s(k), f32s(v)));
        let mut g = GlobalCache::new(6, 1, 0).stored_as(DType::F16);
        let mut rows: Vec<(Tensor, Tensor)> = Vec::new();
        let mut step = |g: &mut GlobalCache, rows: &mut Vec<(Tensor, Tensor)>, position: usize| {
            let (k, v) = token();
            let w0 = rows.len().saturating_sub(window);
            let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) =
                rows[w0..].iter().map(|(k, v)| (k, v)).unzip();
            let before = (!ks.is_empty())
                .then(|| (Tensor::cat(&ks, 1).unwrap(), Tensor::cat(&vs, 1).unwrap()));
            let recall: PerHead = (0..hkv)
                .map(|h| vec![0.1 * (position + h) as f32])
                .collect();
            let recall: Vec<&[f32]> = recall.iter().map(Vec::as_slice).collect();
            let before = before.as_ref().map(|(k, v)| (k, v));
            g.decode_step(position, window, before, (&k, &v), (None, Some(&recall)))
                .unwrap();
            rows.push((k, v));
        };
        for position in 0..8 {
            step(&mut g, &mut rows, position);
        }
        assert!(g.room.is_some());
        let snapshot = g.clone();
        let at_snapshot = kept(&snapshot);
        let mut backup = g.backup();
        step(&mut g, &mut rows, 8);
        let holder = |g: &GlobalCache| Arc::as_ptr(&g.room.as_ref().unwrap().holder);
        assert_ne!(holder(&g), holder(&snapshot), "the shared room was copied");
        backup.restore(&mut g).unwrap();
        rows.pop();
        assert_eq!(kept(&backup), at_snapshot);
        let (k, v, n) = backup.buffers().unwrap();
        assert!(
            k.is_contiguous() && v.is_contiguous(),
            "whole buffers, not strided views"
        );
        assert_eq!(n, backup.len());
        for position in 8..12 {
            step(&mut backup, &mut rows, position);
        }
        assert_eq!(
            kept(&snapshot),
            at_snapshot,
            "the snapshot's rows are left alone"
        );
    }
}
