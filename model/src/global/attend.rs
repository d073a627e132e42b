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
//! `tests/runtime.rs` holds this path and the reference to each other through whole models.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::Plan;
use std::mem::MaybeUninit;

use crate::layers::vexp;
use crate::Result;

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
        let wl = geo.w + t;
        // Each row is written once below (exponentials up to the query, zeros after), so
        // the buffer (megabytes per piece) is not zero-filled first.
        let mut e = crate::uninit::vec::<f32>(s.len());
        let share = 1.0 / g as f32;
        let mass = e
            .par_chunks_mut(l)
            .zip(s.par_chunks(l))
            .enumerate()
            .fold(
                || Some(vec![0f32; hkv * wl]),
                |mass, (row, (e, s))| {
                    let mut mass = mass?;
                    let (kvh, i) = (row / (g * t), row % t);
                    let (lo, hi) = geo.band(i);
                    let past = &s[..=hi];
                    let max = vexp::max(past);
                    vexp::exp_shifted_uninit(past, max, &mut e[..=hi]);
                    for x in &mut e[hi + 1..] {
                        x.write(0.0);
                    }
                    // SAFETY: the row was just written whole.
                    let band: &[f32] =
                        unsafe { &*(&e[lo..=hi] as *const [MaybeUninit<f32>] as *const [f32]) };
                    let z = vexp::sum(band);
                    if !usable(z) {
                        return None;
                    }
                    let inv = share / z;
                    let m = &mut mass[kvh * wl + lo - geo.n..=kvh * wl + hi - geo.n];
                    for (mj, &x) in m.iter_mut().zip(band) {
                        *mj += x * inv;
                    }
                    Some(mass)
                },
            )
            .reduce(
                || Some(vec![0f32; hkv * wl]),
                |a, b| {
                    let (mut a, b) = (a?, b?);
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    Some(a)
                },
            );
        drop(storage);
        let Some(mass) = mass else {
            // A row's sum underflowed: later rows may be unwritten; `e` is dropped as is.
            return Ok(None);
        };
        // SAFETY: with every row's sum usable, every row was written whole (`fold` stops
        // writing only after a `None`).
        let e = unsafe { crate::uninit::assume_init(e) };
        Ok(Some(Self {
            geo,
            e,
            mass: mass.chunks(wl.max(1)).map(<[f32]>::to_vec).collect(),
        }))
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
                let (lo, hi) = geo.band(i);
                // Past the query's own column the row is already 0 (`new`).
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
            })
            .all(|ok| ok);
        if !ok {
            return Ok(None);
        }
        let hkv = self.mass.len();
        let e = std::mem::take(&mut self.e);
        Ok(Some(Tensor::from_vec(e, (hkv, g * t, l), &Device::Cpu)?))
    }
}

/// Whether a sum of exponentials can be divided by (not underflowed, not NaN).
fn usable(z: f32) -> bool {
    z.is_normal() && z > 0.0
}
