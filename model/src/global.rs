//! The global cache: a bounded set of older tokens the window branch keeps attending to.
//!
//! A sliding window forgets a token `window` steps after reading it, and the recurrent
//! memory keeps only a blurred sum of what it read. LoLA (McDermott et al., "LoLA: Low-Rank
//! Linear Attention With Sparse Caching", arXiv 2505.23666) keeps, besides the window, a
//! small cache of the past key/value pairs the linear memory *predicts worst*: those are the
//! ones the memory cannot stand in for (a pass key in filler text; a name defined once),
//! while redundant tokens are left to the memory. The memory stays constant: at most
//! `capacity` pairs per KV head and layer.
//!
//! Here, per KV head:
//! - every token gets a **salience** when it is read: `1 - cos(v_t, r_t)` with
//!   `r_t = phi(k_t) diag(a_t) S_{t-1}`, how far the memory's answer to the token's own key
//!   (before the token is written) is from its value. A token the memory already "knows"
//!   scores near 0; a surprising one near 1 or more; while the memory has next to nothing to
//!   say (`|r| <= 1e-5 |v|`, the first tokens of a sequence) a token scores 1. The first
//!   `sinks` tokens score `+inf` (StreamingLLM's attention sinks, arXiv 2309.17453).
//! - when a token leaves the window it competes for a place: while the cache has room it
//!   enters; when full, it replaces the lowest-scored entry if it scores strictly higher
//!   (ties keep the incumbent; among equal lowest, the first place goes). A token that lost
//!   is gone for good (it only lives on in the recurrent memory, which read it anyway).
//! - a query sees its window, itself, and the cache as it stood when the query was read.
//!
//! Scores never change once given, so the cache after any prefix is exactly "the
//! `capacity` highest-scored tokens that have left the window" (ties to the older), however
//! the prefix was cut into prefill chunks or decode steps: [`Plan`] replays the same
//! admissions token by token for a chunk, and a decode step is a chunk of one.
//! The recurrence itself is unchanged: every token still enters the memory.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// One layer's global cache for one sequence.
#[derive(Debug, Clone)]
pub struct GlobalCache {
    capacity: usize,
    sinks: usize,
    /// The kept entries: keys `[hkv, n, d]` (post-RoPE), values `[hkv, n, d]` and their
    /// saliences `[hkv, n]` (f32). `n` is the same for every head.
    kept: Option<(Tensor, Tensor, Tensor)>,
    /// Saliences of the window cache's rows, `[hkv, len]`, oldest first: they compete for a
    /// place when they leave the window.
    window_scores: Option<Tensor>,
}

/// Which candidate keys each new query sees, and what the cache keeps afterwards. The
/// candidates of a span are laid out as `[kept (n) | window cache (w) | new tokens (t)]`.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Per head, per query, per candidate: visible or not. `[hkv][t][n + w + t]`.
    visible: Vec<Vec<Vec<bool>>>,
    /// Per head, the candidate index of every kept entry after the span, in place order.
    kept_after: Vec<Vec<usize>>,
    /// Per head, the saliences of those entries.
    kept_scores: Vec<Vec<f32>>,
}

impl GlobalCache {
    pub fn new(capacity: usize, sinks: usize) -> Self {
        Self {
            capacity,
            sinks,
            kept: None,
            window_scores: None,
        }
    }

    /// Places per KV head (0: no global cache).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Entries kept per head.
    pub fn len(&self) -> usize {
        self.kept
            .as_ref()
            .map_or(0, |(k, _, _)| k.dim(1).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Kept keys, values and saliences (none while empty).
    pub fn kept(&self) -> Option<(&Tensor, &Tensor, &Tensor)> {
        self.kept.as_ref().map(|(k, v, s)| (k, v, s))
    }

    /// Saliences of the window cache's rows (none while the window is empty).
    pub fn window_scores(&self) -> Option<&Tensor> {
        self.window_scores.as_ref()
    }

    /// Restores parts written by [`kept`](Self::kept) and
    /// [`window_scores`](Self::window_scores) (state deserialization checks the shapes).
    pub(crate) fn set_parts(
        &mut self,
        kept: Option<(Tensor, Tensor, Tensor)>,
        window_scores: Option<Tensor>,
    ) {
        self.kept = kept;
        self.window_scores = window_scores;
    }

    /// Cuts the kept keys and values off from the autograd graph (see
    /// [`SequenceState::detach`](crate::SequenceState::detach)).
    pub(crate) fn detach(&mut self) {
        if let Some((k, v, _)) = &mut self.kept {
            (*k, *v) = (k.detach(), v.detach());
        }
    }

    /// Bytes held (keys, values and saliences).
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.kept.as_ref().map_or(0, |(k, v, s)| b(k) + b(v) + b(s))
            + self.window_scores.as_ref().map_or(0, b)
    }

    /// Per-token saliences of a span starting at `position`: `1 - cos(v, r)` for values
    /// `v` and the memory's reads `r` before each token (`[hkv, t, d]` each), `+inf` for the
    /// first `sinks` positions. Without reads (a cache of sinks only) every other token
    /// scores 0: it can never displace a sink. Returns `[hkv][t]`.
    pub fn saliences(
        &self,
        position: usize,
        v: &Tensor,
        read: Option<&Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let (hkv, t, _) = v.dims3()?;
        let raw = match read {
            None => vec![vec![0.0; t]; hkv],
            Some(read) => {
                let v = v.to_dtype(DType::F32)?.to_vec3::<f32>()?;
                let read = read.to_dtype(DType::F32)?.to_vec3::<f32>()?;
                v.iter()
                    .zip(&read)
                    .map(|(vh, rh)| vh.iter().zip(rh).map(|(a, b)| salience(a, b)).collect())
                    .collect()
            }
        };
        Ok(self.with_sinks(position, raw))
    }

    /// `raw` saliences (`[hkv][t]`, a span from `position`) with the sinks' set to `+inf`.
    fn with_sinks(&self, position: usize, mut raw: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        for head in &mut raw {
            for (i, s) in head.iter_mut().enumerate() {
                if position + i < self.sinks {
                    *s = f32::INFINITY;
                }
            }
        }
        raw
    }

    /// The saliences of the window rows kept after a span: the last `keep` of the cached
    /// rows' followed by the span's (`scores`, `[hkv][t]`).
    pub fn window_scores_after(&self, scores: &[Vec<f32>], keep: usize) -> Result<Vec<Vec<f32>>> {
        let old: Vec<Vec<f32>> = match &self.window_scores {
            Some(s) => s.to_vec2::<f32>()?,
            None => vec![Vec::new(); scores.len()],
        };
        Ok(old
            .into_iter()
            .zip(scores)
            .map(|(old, new)| {
                let all = [old, new.clone()].concat();
                all[all.len() - keep..].to_vec()
            })
            .collect())
    }

    /// One decode token's update, as the fused decode step needs it: the token (position
    /// `position`, raw salience per head `raw`, post-RoPE key and value `[hkv, 1, d]`) was
    /// read after `window_before` (the window cache before it, if any); the window keeps
    /// `window` rows, so the oldest cached row may leave and compete for a place.
    pub(crate) fn decode_step(
        &mut self,
        position: usize,
        window: usize,
        window_before: Option<(&Tensor, &Tensor)>,
        (k, v): (&Tensor, &Tensor),
        raw: Vec<f32>,
    ) -> Result<()> {
        let scores = self.with_sinks(position, raw.into_iter().map(|s| vec![s]).collect());
        let window_len = window_before.map_or(Ok(0), |(k, _)| k.dim(1))?;
        let plan = self.plan(window, window_len, &scores)?;
        let keep = (window_len + 1).min(window);
        let window_scores = self.window_scores_after(&scores, keep)?;
        let device = k.device().clone();
        let kept = self.kept.clone();
        // One token steps in, so at most the oldest window row leaves and competes: when the
        // plan keeps nothing past it (always, unless the window is empty), the candidates are
        // the kept rows and that one row, not the whole window (a fifth of the copying at
        // window 256 and 64 places).
        let n = self.len();
        let oldest_only = window_len > 0 && plan.kept_after.iter().flatten().all(|&c| c <= n);
        let oldest = match window_before {
            Some((wk, wv)) if oldest_only => Some((wk.narrow(1, 0, 1)?, wv.narrow(1, 0, 1)?)),
            _ => None,
        };
        let rows: Vec<(&Tensor, &Tensor)> = match &oldest {
            Some((wk, wv)) => vec![(wk, wv)],
            None => window_before.into_iter().chain([(k, v)]).collect(),
        };
        self.apply(
            &plan,
            || candidates(kept.as_ref(), &rows),
            window_scores,
            &device,
        )
    }

    /// The keys and values a plan's columns index: the kept rows, then `rows` in order (the
    /// window cache and the new tokens), each `[hkv, len, d]`.
    pub fn candidates(&self, rows: &[(&Tensor, &Tensor)]) -> Result<(Tensor, Tensor)> {
        candidates(self.kept.as_ref(), rows)
    }

    /// The admissions of a span of `t` tokens after `window_len` cached window rows, for
    /// a window of `window` keys: replays, token by token, every token leaving the window
    /// (`scores`: the new tokens' saliences, `[hkv][t]`).
    pub fn plan(&self, window: usize, window_len: usize, scores: &[Vec<f32>]) -> Result<Plan> {
        let hkv = scores.len();
        let t = scores.first().map_or(0, Vec::len);
        let kept_scores: Vec<Vec<f32>> = match &self.kept {
            Some((_, _, s)) => s.to_vec2()?,
            None => vec![Vec::new(); hkv],
        };
        let window_scores: Vec<Vec<f32>> = match &self.window_scores {
            Some(s) => s.to_vec2()?,
            None => vec![Vec::new(); hkv],
        };
        let mut plan = Plan {
            visible: Vec::with_capacity(hkv),
            kept_after: Vec::with_capacity(hkv),
            kept_scores: Vec::with_capacity(hkv),
        };
        for h in 0..hkv {
            let head = HeadPlan {
                capacity: self.capacity,
                window,
                kept: &kept_scores[h],
                stream: [&window_scores[h][..window_len], &scores[h][..]].concat(),
                new_tokens: t,
            }
            .run();
            plan.visible.push(head.0);
            plan.kept_after.push(head.1);
            plan.kept_scores.push(head.2);
        }
        Ok(plan)
    }

    /// Carries out `plan` for a span: `candidates` gives the keys and values
    /// `[hkv, n + w + t, d]` in the plan's layout (built only when an entry changes),
    /// `window_scores_after` the saliences of the window rows kept after the span (`[hkv][len]`).
    pub fn apply(
        &mut self,
        plan: &Plan,
        candidates: impl FnOnce() -> Result<(Tensor, Tensor)>,
        window_scores_after: Vec<Vec<f32>>,
        device: &Device,
    ) -> Result<()> {
        let before = self.len();
        let n = plan.kept_after.first().map_or(0, Vec::len);
        let unchanged = n == before
            && plan
                .kept_after
                .iter()
                .all(|row| row.iter().enumerate().all(|(i, &c)| i == c));
        if !unchanged {
            let (ck, cv) = candidates()?;
            let (hkv, _, d) = ck.dims3()?;
            let idx: Vec<u32> = plan
                .kept_after
                .iter()
                .flat_map(|row| row.iter().flat_map(|&c| std::iter::repeat_n(c as u32, d)))
                .collect();
            let idx = Tensor::from_vec(idx, (hkv, n, d), ck.device())?;
            let scores: Vec<f32> = plan.kept_scores.concat();
            self.kept = Some((
                ck.contiguous()?.gather(&idx, 1)?,
                cv.contiguous()?.gather(&idx, 1)?,
                Tensor::from_vec(scores, (hkv, n), device)?,
            ));
        }
        let hkv = window_scores_after.len();
        let len = window_scores_after.first().map_or(0, Vec::len);
        self.window_scores = if len == 0 {
            None
        } else {
            Some(Tensor::from_vec(
                window_scores_after.concat(),
                (hkv, len),
                device,
            )?)
        };
        Ok(())
    }
}

impl Plan {
    /// Whether every candidate is visible to every query (no mask needed).
    pub fn all_visible(&self) -> bool {
        self.visible.iter().flatten().flatten().all(|&v| v)
    }

    /// The additive mask `[hkv, 1, t, candidates]` (0 visible, -inf hidden).
    pub fn mask(&self, device: &Device) -> Result<Tensor> {
        let hkv = self.visible.len();
        let t = self.visible.first().map_or(0, Vec::len);
        let l = self
            .visible
            .first()
            .and_then(|q| q.first())
            .map_or(0, Vec::len);
        let m: Vec<f32> = self
            .visible
            .iter()
            .flatten()
            .flatten()
            .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        Ok(Tensor::from_vec(m, (hkv, 1, t, l), device)?)
    }
}

fn candidates(
    kept: Option<&(Tensor, Tensor, Tensor)>,
    rows: &[(&Tensor, &Tensor)],
) -> Result<(Tensor, Tensor)> {
    let kept = kept.map(|(k, v, _)| (k, v));
    let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) =
        kept.into_iter().chain(rows.iter().copied()).unzip();
    Ok((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?))
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

/// One head's admissions over a span, on plain data.
struct HeadPlan<'a> {
    capacity: usize,
    window: usize,
    /// Saliences of the entries kept before the span (candidates `0..n`).
    kept: &'a [f32],
    /// Saliences of the cached window rows then the new tokens (candidates `n..`).
    stream: Vec<f32>,
    new_tokens: usize,
}

impl HeadPlan<'_> {
    /// Returns (visibility `[t][n + w + t]`, kept candidates after, their saliences).
    fn run(self) -> (Vec<Vec<bool>>, Vec<usize>, Vec<f32>) {
        let n = self.kept.len();
        let t = self.new_tokens;
        let w = self.stream.len() - t; // cached window rows
        let total = n + w + t;
        // Places: (candidate, salience); membership of each candidate as [since, until)
        // in query indices.
        let mut places: Vec<(usize, f32)> = self.kept.iter().copied().enumerate().collect();
        let mut since = vec![usize::MAX; total];
        let mut until = vec![usize::MAX; total];
        for s in since.iter_mut().take(n) {
            *s = 0;
        }
        let mut next_leave = 0; // stream index of the next row to leave the window
        let mut visible = Vec::with_capacity(t);
        // Query i (the span's i-th token) sees stream rows i + w - window ..= i + w; rows
        // before that have left. After the span, rows before t + w - window have left.
        for i in 0..=t {
            let first_in_window = (i + w).saturating_sub(self.window);
            while next_leave < first_in_window {
                let c = n + next_leave;
                let score = self.stream[next_leave];
                if places.len() < self.capacity {
                    places.push((c, score));
                    since[c] = i;
                } else if let Some(p) = lowest(&places) {
                    if score > places[p].1 {
                        until[places[p].0] = i;
                        places[p] = (c, score);
                        since[c] = i;
                    }
                }
                next_leave += 1;
            }
            if i == t {
                break;
            }
            let row: Vec<bool> = (0..total)
                .map(|c| {
                    let in_window = c >= n && c - n >= first_in_window && c - n <= i + w;
                    in_window || (since[c] <= i && i < until[c])
                })
                .collect();
            visible.push(row);
        }
        let (kept_after, kept_scores) = places.into_iter().unzip();
        (visible, kept_after, kept_scores)
    }
}

/// The place with the lowest salience (the first among equals).
fn lowest(places: &[(usize, f32)]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &(_, s)) in places.iter().enumerate() {
        if best.is_none_or(|b| s < places[b].1) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(capacity: usize, window: usize, kept: &[f32], stream: &[f32], t: usize) -> String {
        let (vis, after, _) = HeadPlan {
            capacity,
            window,
            kept,
            stream: stream.to_vec(),
            new_tokens: t,
        }
        .run();
        let rows: Vec<String> = vis
            .iter()
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
    fn a_chunked_span_replays_what_single_steps_do() {
        // The same tokens, the first three read as one chunk, then one at a time: the
        // places after each step must equal those of the whole run.
        let scores = [2.0, 7.0, 1.0, 9.0, 3.0, 3.0, 8.0];
        let whole = run(2, 2, &[], &scores, 7);
        assert!(whole.ends_with("-> [3, 1]"), "{whole}");
        // Replayed in two pieces through GlobalCache on tensors.
        let dev = Device::Cpu;
        let mut g = GlobalCache::new(2, 0);
        let (mut wk, mut ws): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        for piece in [&scores[..3], &scores[3..4], &scores[4..]] {
            let plan = g.plan(2, ws.len(), &[piece.to_vec()]).unwrap();
            // Keys are the candidates' own scores, so the kept keys name the kept tokens.
            let mut cand: Vec<f32> = g
                .kept()
                .map(|(k, _, _)| k.flatten_all().unwrap().to_vec1().unwrap())
                .unwrap_or_default();
            cand.extend(&wk);
            cand.extend(piece);
            let l = cand.len();
            let c = Tensor::from_vec(cand, (1, l, 1), &dev).unwrap();
            wk.extend(piece);
            ws.extend(piece);
            let keep = wk.len().min(2);
            wk.drain(..wk.len() - keep);
            ws.drain(..ws.len() - keep);
            g.apply(&plan, || Ok((c.clone(), c.clone())), vec![ws.clone()], &dev)
                .unwrap();
        }
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

    /// The definition, from scratch for every query: the window, itself, and the
    /// `capacity` highest-scored tokens older than the window.
    fn naive_visible(capacity: usize, window: usize, scores: &[f32], p: usize) -> Vec<bool> {
        let first_in_window = p.saturating_sub(window);
        let mut old: Vec<usize> = (0..first_in_window).collect();
        old.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        old.truncate(capacity);
        (0..=p)
            .map(|j| j >= first_in_window || old.contains(&j))
            .collect()
    }

    #[test]
    fn chunks_of_any_size_see_what_the_definition_says() {
        let mut rng = crate::rng::SplitMix(7);
        for case in 0..40 {
            let (capacity, window) = (1 + case % 4, 1 + case % 5);
            let len = 30;
            // Distinct scores (ties are resolved by place, not by age).
            let scores: Vec<f32> = (0..len).map(|i| rng.uniform() + i as f32 * 1e-3).collect();
            let mut g = GlobalCache::new(capacity, 0);
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
                for (i, row) in plan.visible[0].iter().enumerate() {
                    let p = start + i;
                    let want = naive_visible(capacity, window, &scores, p);
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
                let keep = (start + t).min(window);
                let ws = scores[start + t - keep..start + t].to_vec();
                g.window_scores =
                    (keep > 0).then(|| Tensor::from_vec(ws, (1, keep), &Device::Cpu).unwrap());
                let ks: Vec<f32> = plan.kept_scores[0].clone();
                let n = ks.len();
                g.kept = (n > 0).then(|| {
                    let z = Tensor::zeros((1, n, 1), DType::F32, &Device::Cpu).unwrap();
                    (
                        z.clone(),
                        z,
                        Tensor::from_vec(ks, (1, n), &Device::Cpu).unwrap(),
                    )
                });
                start += t;
            }
        }
    }

    #[test]
    fn sinks_score_infinite_and_never_leave() {
        let g = GlobalCache::new(2, 1);
        let v = Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        let s = g.saliences(0, &v, Some(&v)).unwrap();
        assert_eq!(s[0][0], f32::INFINITY);
        assert!(s[0][1].abs() < 1e-6, "a perfectly recalled token scores 0");
        let r = Tensor::new(&[[[0f32, 1.0], [0.0, -1.0]]], &Device::Cpu).unwrap();
        let s = g.saliences(1, &v, Some(&r)).unwrap();
        assert_eq!(s[0], [1.0, 2.0]);
    }
}
