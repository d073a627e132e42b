//! A prefill piece's softmax with a global cache, on the host (CPU, no gradients).
//!
//! The cache's choice during a piece needs each window column's window-only softmax share
//! (attention places) before the piece's queries attend, so the reference
//! (`Attention::attend_piece`'s candle path) scores the window columns twice: once for
//! those shares (its own matmul, mask and softmax) and once with the cache columns for the
//! attention itself, exponentiating ~1,250 scores a query at 240 window rows and 384
//! places. Both softmaxes are ratios of the same `exp(s - m)` for any `m` not below the
//! scores that matter, so here one pass exponentiates each query's scores against all
//! candidates once, with `m` the maximum over every column it could see (all but the
//! piece's later tokens); the window shares are the band's values over their sum
//! ([`Exps::window_mass`]), and, once the cache has chosen, the attention's
//! probabilities are the values of the columns the query sees over theirs
//! ([`Exps::probabilities`]). Where a sum underflows (a column it cannot see outscored
//! every one it can by ~87), the caller falls back to the reference.
//!
//! With the AVX-512 kernel, both passes run block by block, [`QUERY_BLOCK`] queries of one
//! head at a time on one thread ([`Exps::score`], [`Exps::attend`]): a block's scores are
//! multiplied out and exponentiated while they are in the core's cache, and its
//! probabilities are normalized and multiplied by the values the same way, instead of four
//! whole-piece passes (scores, exponentials, probabilities, product) over megabytes, each
//! its own fork-join (measured: ~30% of a 512-token prefill went to those four).
//!
//! `tests/runtime.rs` holds this path and the reference to each other through whole models;
//! `tests` here hold the blocked passes to the whole-piece ones.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::Plan;
use crate::layers::gemm::{self, Causal, NR};
use crate::layers::{host, vexp, Packed};
use crate::Result;

/// Queries per block of the blocked passes: four kernel tiles. A block's scores (56 rows of
/// up to ~900 candidates, ~200 KB) stay in a core's cache from the product to the
/// exponentials, and its probabilities from the normalization to the product.
pub(crate) const QUERY_BLOCK: usize = 4 * gemm::MR;

/// The layout of a piece's candidates `[kept (n) | window cache (w) | piece (t)]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub w: usize,
    pub t: usize,
    /// Keys a query sees back in its window.
    pub window: usize,
    /// Query heads per KV head.
    pub g: usize,
}

impl Geometry {
    fn columns(&self) -> usize {
        self.n + self.w + self.t
    }

    /// Query `i`'s window band, in candidate columns: `lo..=hi`.
    fn band(&self, i: usize) -> (usize, usize) {
        let first_in_window = (i + self.w).saturating_sub(self.window);
        (self.n + first_in_window, self.n + self.w + i)
    }

    /// The piece's rows `[hkv, g, t]` in blocks of up to [`QUERY_BLOCK`] queries of one
    /// head, in row order.
    fn blocks(&self, hkv: usize) -> Vec<Block> {
        let mut out = Vec::new();
        for head in 0..hkv * self.g {
            for i0 in (0..self.t).step_by(QUERY_BLOCK) {
                out.push(Block {
                    kvh: head / self.g,
                    row0: head * self.t + i0,
                    i0,
                    m: QUERY_BLOCK.min(self.t - i0),
                });
            }
        }
        out
    }

    /// What a block's rows need of the candidates (each query sees up to its own token):
    /// the kernel's causal skip for those rows.
    fn causal(&self, b: &Block, output: bool) -> Causal {
        let (offset, period) = (self.n + self.w + b.i0, self.t);
        match output {
            true => Causal::Output { offset, period },
            false => Causal::Input { offset, period },
        }
    }
}

/// Rows `row0..row0 + m` of a piece: queries `i0..i0 + m` of one query head of KV head
/// `kvh`.
#[derive(Debug, Clone, Copy)]
struct Block {
    kvh: usize,
    row0: usize,
    i0: usize,
    m: usize,
}

/// `v` cut into the blocks' rows of `width` values each (the blocks cover `v` in order).
fn split_rows<'a, T>(mut v: &'a mut [T], blocks: &[Block], width: usize) -> Vec<&'a mut [T]> {
    blocks
        .iter()
        .map(|b| {
            let (rows, rest) = std::mem::take(&mut v).split_at_mut(b.m * width);
            v = rest;
            rows
        })
        .collect()
}

/// Where [`Exps`] takes a piece's scaled scores from.
#[derive(Clone, Copy)]
enum Scores<'a> {
    /// Computed already, `[hkv, g, t, columns]`.
    Given(&'a [f32]),
    /// Multiplied out block by block: the queries `[hkv, g * t, d]`, times `scale`, times
    /// each KV head's keys (packed `[columns, d]`).
    Product {
        q: &'a [f32],
        d: usize,
        scale: f32,
        keys: &'a [Packed],
    },
}

/// Every query's scores exponentiated once: `[hkv, g, t, columns]`, `exp(s - m)` over the
/// columns up to the query's own, 0 past it.
pub(crate) struct Exps {
    geo: Geometry,
    e: Vec<f32>,
    /// Per KV head and window column (`w + t`): the window-only softmax shares summed over
    /// the piece's queries, averaged over the group's query heads.
    mass: Vec<Vec<f32>>,
}

impl Exps {
    /// From the scaled scores `[hkv, g, t, columns]` (contiguous, f32, on the CPU); `None`
    /// when they are elsewhere or a query's window band underflows.
    pub fn new(scores: &Tensor, geo: Geometry) -> Result<Option<Self>> {
        let (hkv, g, t, l) = scores.dims4()?;
        assert!(g == geo.g && t == geo.t && l == geo.columns());
        let (storage, layout) = scores.storage_and_layout();
        let s = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((a, b))) => match cpu.as_slice::<f32>() {
                Ok(s) => &s[a..b],
                Err(_) => return Ok(None),
            },
            _ => return Ok(None),
        };
        Ok(Self::exponentiate(geo, hkv, Scores::Given(s)))
    }

    /// [`Exps::new`] of the scores [`crate::attention::attention_scores`] gives for `q`
    /// `[h, t, d]` (rotated) against `keys` `[hkv, columns, d]` with the causal skip, the
    /// product computed block by block by the AVX-512 kernel (the same values); `None`
    /// without that kernel, or where [`Exps::new`] gives `None`.
    pub fn score(q: &Tensor, keys: &Tensor, geo: Geometry) -> Result<Option<Self>> {
        let (h, t, d) = q.dims3()?;
        let (hkv, l, _) = keys.dims3()?;
        assert!(h == hkv * geo.g && t == geo.t && l == geo.columns());
        if !gemm::available() || !q.device().is_cpu() || q.track_op() || keys.track_op() {
            return Ok(None);
        }
        // Scaled as `attention_scores` scales them (candle's `affine`: `v * scale + 0`), so
        // the products are the same bits; here once the rows are packed, in each block's
        // task, rather than in a pass of its own on one thread.
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let q = crate::layers::to_f32(q)?;
        let keys = crate::layers::to_f32(keys)?;
        let owned = host::contiguous([&q, &keys])?;
        let guards = owned.each_ref().map(|t| t.storage_and_layout());
        let [q, keys] = host::f32_slices(&guards)?;
        let keys: Vec<Packed> = keys
            .chunks_exact(l * d)
            .map(|k| Packed::from_f32(k, (l, d)))
            .collect();
        Ok(Self::exponentiate(
            geo,
            hkv,
            Scores::Product {
                q,
                d,
                scale,
                keys: &keys,
            },
        ))
    }

    fn exponentiate(geo: Geometry, hkv: usize, scores: Scores<'_>) -> Option<Self> {
        let (l, wl) = (geo.columns(), geo.w + geo.t);
        let share = 1.0 / geo.g as f32;
        let blocks = geo.blocks(hkv);
        // Each row is written whole below (exponentials up to the query, zeros after).
        let mut e = scratch::take(&scratch::EXPS, hkv * geo.g * geo.t * l);
        let masses: Vec<Option<(usize, Vec<f32>)>> = blocks
            .par_iter()
            .zip(split_rows(&mut e, &blocks, l))
            .map(|(b, e)| {
                let mut packed = scratch::take(&scratch::ROWS, 0);
                let mut product = scratch::take(&scratch::BLOCK, 0);
                let s = match scores {
                    Scores::Given(all) => &all[b.row0 * l..(b.row0 + b.m) * l],
                    Scores::Product { q, d, scale, keys } => {
                        gemm::pack_input(&q[b.row0 * d..(b.row0 + b.m) * d], (b.m, d), &mut packed);
                        // Padding rows stay 0.
                        packed.iter_mut().for_each(|v| *v = *v * scale + 0.0);
                        product.resize(b.m * l, 0.0);
                        let needs = (geo.n + geo.w + b.i0 + b.m).min(l);
                        gemm::band(
                            &packed,
                            b.m,
                            &keys[b.kvh],
                            0..needs.div_ceil(NR),
                            (&mut product[..], l),
                            Some(geo.causal(b, true)),
                            &[],
                        );
                        &product[..b.m * l]
                    }
                };
                let mut mass = vec![0f32; wl];
                let ok = s
                    .chunks_exact(l)
                    .zip(e.chunks_exact_mut(l))
                    .enumerate()
                    .all(|(r, (s, e))| exp_row(&geo, b.i0 + r, (s, e), &mut mass, share));
                scratch::give(&scratch::ROWS, packed);
                scratch::give(&scratch::BLOCK, product);
                ok.then_some((b.kvh, mass))
            })
            .collect();
        // Summed in block order: the same sums whatever the threads did.
        let mut mass = vec![vec![0f32; wl]; hkv];
        for m in masses {
            let Some((kvh, m)) = m else {
                // A row's sum underflowed.
                scratch::give(&scratch::EXPS, e);
                return None;
            };
            mass[kvh].iter_mut().zip(&m).for_each(|(x, y)| *x += y);
        }
        Some(Self { geo, e, mass })
    }

    /// The window-only shares the cache's attention places are chosen by,
    /// `[hkv][w + t]` (as [`crate::attention::window_mass`] measures them).
    pub fn window_mass(&self) -> Vec<Vec<f32>> {
        self.mass.clone()
    }

    /// The attention's probabilities once the cache has chosen (`plan`): each query's
    /// values over the columns it sees, 0 elsewhere, `[hkv, g * t, columns]`; `None` where
    /// a query's sum underflows.
    pub fn probabilities(mut self, plan: &Plan) -> Result<Option<Tensor>> {
        let geo = self.geo;
        let (g, t, l) = (geo.g, geo.t, geo.columns());
        let ok = self
            .e
            .par_chunks_mut(l)
            .enumerate()
            .map_init(Vec::new, |kept, (row, e)| {
                let (kvh, i) = (row / (g * t), row % t);
                normalize_row(&geo, (plan, kvh), i, e, kept)
            })
            .all(|ok| ok);
        if !ok {
            return Ok(None);
        }
        let hkv = self.mass.len();
        let e = std::mem::take(&mut self.e);
        Ok(Some(Tensor::from_vec(e, (hkv, g * t, l), &Device::Cpu)?))
    }

    /// The attention's output once the cache has chosen (`plan`): the
    /// [`probabilities`](Self::probabilities) times `values` `[hkv, columns, d]`, as
    /// `[hkv, g * t, d]` f32, each query's terms past its own token skipped (they are 0);
    /// `None` where a query's sum underflows. With the AVX-512 kernel block by block (the
    /// same values).
    pub fn attend(mut self, plan: &Plan, values: &Tensor) -> Result<Option<Tensor>> {
        let geo = self.geo;
        let (hkv, l) = (self.mass.len(), geo.columns());
        let values = crate::layers::to_f32(values)?;
        let d = values.dim(2)?;
        if !gemm::available() || !values.device().is_cpu() || values.track_op() {
            let Some(p) = self.probabilities(plan)? else {
                return Ok(None);
            };
            let causal = Causal::Input {
                offset: geo.n + geo.w,
                period: geo.t,
            };
            return Ok(Some(gemm::batched_causal(&p, &values, Some(causal))?));
        }
        let [values] = host::contiguous([&values])?;
        let guards = [values.storage_and_layout()];
        let [v] = host::f32_slices(&guards)?;
        let values: Vec<Packed> = v
            .chunks_exact(l * d)
            .map(|v| Packed::from_f32_t(v, (d, l)))
            .collect();
        let blocks = geo.blocks(hkv);
        let mut out = vec![0f32; hkv * geo.g * geo.t * d];
        let ok = blocks
            .par_iter()
            .zip(split_rows(&mut self.e, &blocks, l))
            .zip(split_rows(&mut out, &blocks, d))
            .map_init(Vec::new, |kept, ((b, e), out)| {
                let ok = e
                    .chunks_exact_mut(l)
                    .enumerate()
                    .all(|(r, e)| normalize_row(&geo, (plan, b.kvh), b.i0 + r, e, kept));
                if ok {
                    let w = &values[b.kvh];
                    let mut packed = scratch::take(&scratch::ROWS, 0);
                    gemm::pack_input(e, (b.m, l), &mut packed);
                    let causal = Some(geo.causal(b, false));
                    gemm::band(&packed, b.m, w, 0..w.panels(), (out, d), causal, &[]);
                    scratch::give(&scratch::ROWS, packed);
                }
                ok
            })
            .all(|ok| ok);
        scratch::give(&scratch::EXPS, std::mem::take(&mut self.e));
        if !ok {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            out,
            (hkv, geo.g * geo.t, d),
            &Device::Cpu,
        )?))
    }
}

/// Query `i`'s row: `e = exp(s - m)` up to its own column (`m` the largest score there),
/// 0 after; its window band's shares (`share / sum`) added into `mass` (`[w + t]`).
/// False, with the row possibly unwritten, when the band's sum underflows.
fn exp_row(
    geo: &Geometry,
    i: usize,
    (s, e): (&[f32], &mut [f32]),
    mass: &mut [f32],
    share: f32,
) -> bool {
    let (lo, hi) = geo.band(i);
    let past = &s[..=hi];
    vexp::exp_shifted(past, vexp::max(past), &mut e[..=hi]);
    e[hi + 1..].fill(0.0);
    let band = &e[lo..=hi];
    let z = vexp::sum(band);
    if !usable(z) {
        return false;
    }
    let inv = share / z;
    for (mj, &x) in mass[lo - geo.n..=hi - geo.n].iter_mut().zip(band) {
        *mj += x * inv;
    }
    true
}

/// Query `i`'s (of KV head `kvh`) exponentials made its probabilities under `plan`: the
/// values of the columns it sees over their sum, 0 elsewhere (`kept`: scratch). False
/// where the sum underflows.
fn normalize_row(
    geo: &Geometry,
    (plan, kvh): (&Plan, usize),
    i: usize,
    e: &mut [f32],
    kept: &mut Vec<(usize, f32)>,
) -> bool {
    let (lo, hi) = geo.band(i);
    // Past the query's own column the row is already 0 (`exp_row`).
    let e = &mut e[..=hi];
    // Before the band, only the cache entries the query sees stay.
    kept.clear();
    kept.extend(
        plan.members(kvh)
            .iter()
            .filter(|&&(c, since, until)| c < lo && since <= i && i < until)
            .map(|&(c, _, _)| (c, e[c])),
    );
    e[..lo].fill(0.0);
    for &(c, x) in kept.iter() {
        e[c] = x;
    }
    let z = vexp::sum(e);
    if !usable(z) {
        return false;
    }
    let inv = 1.0 / z;
    e.iter_mut().for_each(|x| *x *= inv);
    true
}

/// Buffers kept per thread between pieces: a piece's exponentials are megabytes, and a
/// fresh allocation that size may be fresh pages, each faulted in and zeroed on first
/// touch. (Measured in a 512-token prefill: within noise either way, since `exp` ran one
/// lane at a time then; kept because it costs nothing.) A buffer is taken out while in
/// use, so a nested use on the same thread allocates its own.
mod scratch {
    use std::cell::Cell;
    use std::thread::LocalKey;

    pub type Pool = LocalKey<Cell<Vec<f32>>>;

    thread_local! {
        /// A piece's exponentials.
        pub static EXPS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
        /// A block's packed rows.
        pub static ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
        /// A block's scores.
        pub static BLOCK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }

    /// A buffer of `len` values from `pool`, whatever they hold (callers overwrite them).
    pub fn take(pool: &'static Pool, len: usize) -> Vec<f32> {
        let mut v = pool.take();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v.truncate(len);
        v
    }

    pub fn give(pool: &'static Pool, v: Vec<f32>) {
        pool.set(v);
    }
}

/// Whether a sum of exponentials can be divided by (not underflowed, not NaN).
fn usable(z: f32) -> bool {
    z.is_normal() && z > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::global::GlobalCache;
    use crate::rng::SplitMix;

    fn randn(rng: &mut SplitMix, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v = rng.normals(n, scale);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn blocked_passes_match_the_whole_piece_passes() {
        if !gemm::available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        // Three blocks per head (56, 56, 18 queries); a window of 5 keys, so most columns
        // are the cache's to choose.
        let (hkv, g, t, d) = (2, 3, 130, 64);
        let geo = Geometry {
            n: 0,
            w: 0,
            t,
            window: 5,
            g,
        };
        let mut rng = SplitMix(7);
        let q = randn(&mut rng, &[hkv * g, t, d], 1.0);
        let keys = randn(&mut rng, &[hkv, t, d], 1.0);
        let values = randn(&mut rng, &[hkv, t, d], 1.0);
        // The whole piece's scores, as `attention::attention_scores` computes them.
        let scaled = (&q * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .reshape((hkv, g * t, d))
            .unwrap();
        let causal = Causal::Output {
            offset: 0,
            period: t,
        };
        let scores = gemm::batched_causal(&scaled, &keys.t().unwrap(), Some(causal))
            .unwrap()
            .reshape((hkv, g, t, t))
            .unwrap();
        let whole = Exps::new(&scores, geo).unwrap().unwrap();
        let blocked = Exps::score(&q, &keys, geo).unwrap().unwrap();
        assert!(whole.e == blocked.e, "exponentials differ");
        for (a, b) in whole
            .mass
            .iter()
            .flatten()
            .zip(blocked.mass.iter().flatten())
        {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "mass {a} vs {b}");
        }
        // Attention places chosen by those shares, then both ways to the output.
        let mut cache = GlobalCache::new(6, 1, 3);
        let scored = cache
            .span_scores(0, (hkv, t), Some(whole.window_mass()), None)
            .unwrap();
        let plan = cache.plan(geo.window, 0, &scored).unwrap();
        assert!(!plan.all_visible(), "the plan hides columns");
        let p = whole.probabilities(&plan).unwrap().unwrap();
        let causal = Causal::Input {
            offset: 0,
            period: t,
        };
        let expected = gemm::batched_causal(&p, &values, Some(causal)).unwrap();
        let got = blocked.attend(&plan, &values).unwrap().unwrap();
        let (a, b) = (
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a == b, "outputs differ");
    }
}
