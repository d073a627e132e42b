//! `x W^T` on CPUs with AVX-512: every product with a weight (prefill chunks and decode
//! steps alike, weights packed once: [`super::packed`]) and attention's products of many
//! rows (packed per call).
//!
//! candle's `gemm` crate runs its AVX2 kernels on stable Rust (its AVX-512 ones need the
//! `nightly` feature), so on an AVX-512 CPU with two 512-bit FMA units it reaches about half
//! the cores' peak. This is the classic GotoBLAS/BLIS shape written for 16 lanes:
//!
//! - the right operand `[n, k]` is read in panels of [`NR`] = 32 output columns and
//!   [`KC`] = 256 inputs, k-major (a 32 KB panel stays in L1 while every input row runs
//!   past it); a Q8_0 weight is decoded a panel block at a time, never into a whole dense
//!   copy;
//! - a micro-tile of [`MR`] = 14 input rows x 32 columns keeps its 28 accumulators in
//!   registers: per input, two panel loads and 14 broadcasts feed 28 FMAs; a tile of fewer
//!   rows (a decode step of a few sequences) runs a kernel of its own size;
//! - k-blocks run in sequence and the panels of a block are split over rayon's threads, so
//!   the `[m, KC]` slice of the input each thread reads stays in its L2.
//!
//! Each value is one FMA chain per k-block, the blocks added in order: the same for every
//! number of rows, so a row's product does not depend on the rows beside it. It is the
//! reference's sum in another order, so it agrees with candle's matmul to float rounding,
//! which `tests` holds it to for f32 and Q8_0 weights and for shapes that are not multiples
//! of the tiles.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use super::packed::{Packed, Panel};

/// Input rows per micro-tile.
pub const MR: usize = 14;
pub use super::packed::{available, KC, NR};

/// Inputs of up to this many rows (decode steps) hand out their panels at least two at a
/// time in [`gemm_jobs`].
const FEW_ROWS: usize = 64;

/// Products of activations by activations (attention's) take this path from this many
/// rows; fewer go to candle's matmul. Weights take it for any number of rows, packed
/// ([`Packed`]).
pub const MIN_ROWS: usize = super::matvec::MAX_ROWS + 1;

/// A matrix `[n, k]` packed per call (attention's keys and values), as the kernel reads it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    /// `W^T` stored instead, `[k, n]` row-major, with its `n`: the right operand of an
    /// ordinary product `x B` (attention's probabilities times values).
    F32T(&'a [f32], usize),
}

/// Where a product's panels come from: packed per call, or packed once.
#[derive(Clone, Copy)]
enum Panels<'a> {
    Pack(Weight<'a>),
    Packed(&'a Packed),
}

/// Whether an input `x` can be multiplied by packed weights: f32 rows on the CPU of an
/// AVX-512 machine, and no gradient to carry (the kernel has no backward pass).
pub fn applies_to_input(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 && !x.track_op() && available()
}

/// `f` on `x`'s values (`[m, k]` row-major) when the kernel takes `x`
/// ([`applies_to_input`]), an error otherwise: the input side of [`matmul_packed`] and
/// [`gate_up_silu`].
fn with_input<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> crate::Result<R>) -> crate::Result<R> {
    if !applies_to_input(x) {
        return Err(crate::Error::Invalid(
            "gemm: f32 CPU inputs without gradients, on an AVX-512 CPU".into(),
        ));
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xd)), Some((x0, x1))) = (&*xs, xl.contiguous_offsets())
    else {
        return Err(crate::Error::Invalid("gemm: f32 CPU inputs".into()));
    };
    f(&xd[x0..x1])
}

/// `x W^T` for every packed weight `W: [n, k]` of `ws`, all reading `x: [m, k]` (q, k and
/// v; gate and up) in one call: one packing of `x`, and all weights' panels split over the
/// threads together. Each product is the same, value for value, as that weight's alone
/// and as [`band`]'s.
pub fn matmul_packed(x: &Tensor, ws: &[&Packed]) -> crate::Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.dims().1 != k) {
        return Err(crate::Error::Invalid(format!(
            "gemm: [{m}, {k}] by a packed weight of shape {:?}",
            w.dims()
        )));
    }
    let dims: Vec<usize> = ws.iter().map(|w| w.dims().0).collect();
    let outs = with_input(x, |xd| {
        let mut outs: Vec<Vec<f32>> = dims.iter().map(|&n| Vec::with_capacity(m * n)).collect();
        if m > 0 && k > 0 {
            let jobs: Vec<Job<'_>> = ws
                .iter()
                .zip(&dims)
                .zip(outs.iter_mut())
                .filter(|((_, &n), _)| n > 0)
                .map(|((&w, &n), out)| Job {
                    w: Panels::Packed(w),
                    n,
                    out: SharedOut(out.as_mut_ptr()),
                    causal: None,
                })
                .collect();
            // SAFETY: AVX-512F is available; every weight holds `n` rows of `k`; each output
            // has room for `m * n` values and is its own allocation.
            unsafe { gemm_jobs(xd, (m, k), &jobs) };
            for (out, &n) in outs.iter_mut().zip(&dims) {
                // SAFETY: `gemm_jobs` wrote all `m * n` values of every output (none when `n`
                // is 0).
                unsafe { out.set_len(m * n) };
            }
        } else {
            for (out, &n) in outs.iter_mut().zip(&dims) {
                out.resize(m * n, 0.0);
            }
        }
        Ok(outs)
    })?;
    outs.into_iter()
        .zip(&dims)
        .map(|(y, &n)| Ok(Tensor::from_vec(y, (m, n), x.device())?))
        .collect()
}

/// Values per input in a packed tile of an `m`-row input: [`MR`], or `m` when fewer rows
/// than that make one partial tile (a single row is then its own packed tile: k-major with
/// one value per input is the row itself). Padded to 14, a batch-1 decode step's one row
/// was read one value in every 56 bytes: 86 KB per panel for a 1,536-wide input, more than
/// L1 holds; a speculative check's 2 to 9 rows, padded so, cost a one-token step 8% for
/// their second row.
pub(crate) fn tile_stride(m: usize) -> usize {
    m.min(MR)
}

/// Values an `[m, k]` input takes packed: whole tiles of [`tile_stride`] values per input.
pub(crate) fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * tile_stride(m) * k
}

/// `x: [m, k]` (row-major) packed for [`band`]: tiles of [`tile_stride`] rows, k-major (a
/// single row as it is).
pub(crate) fn pack_input(x: &[f32], (m, k): (usize, usize), dst: &mut Vec<f32>) {
    dst.resize(packed_len(m, k), 0.0);
    if m == 1 {
        dst.copy_from_slice(&x[..k]);
        return;
    }
    let lda = tile_stride(m);
    for (t, d) in dst.chunks_exact_mut(lda * k).enumerate() {
        pack_rows(x, (m, k), (t * MR, lda), d);
    }
}

/// `out[i * ldo + j - NR * panels.start] = x[i] . W[j]` for the columns of `w`'s panels
/// `panels`, every row of `a` (`m` rows packed by [`pack_input`]), on the calling thread:
/// a band of a decode step's projection, or a block of a prefill piece's attention
/// (`causal`, as in [`batched_causal`]). The same values as [`matmul_packed`] and
/// [`batched_causal`]. `then` is what the thread reads after the band (its next band's
/// first block, [`Packed::block_bytes`]): it is fetched while the band's last block runs.
pub(crate) fn band(
    a: &[f32],
    m: usize,
    w: &Packed,
    panels: std::ops::Range<usize>,
    (out, ldo): (&mut [f32], usize),
    causal: Option<Causal>,
    then: &[u8],
) {
    let (n, k) = w.dims();
    let cols_end = n.min(panels.end * NR);
    assert!(
        available()
            && a.len() >= packed_len(m, k)
            && panels.end <= w.panels()
            && cols_end - panels.start * NR <= ldo
            && (m == 0 || out.len() >= (m - 1) * ldo + cols_end - panels.start * NR)
    );
    let mut panel = scratch::take_panel();
    for p in panels.clone() {
        for k0 in (0..k).step_by(KC) {
            let block = Block {
                w: Panels::Packed(w),
                p,
                n,
                k0,
                out: out.as_mut_ptr().wrapping_add((p - panels.start) * NR),
                ldo,
                causal,
                next: match next_block((p, k0), k, panels.clone()) {
                    Some((np, nk0)) => w.block_bytes(np, nk0),
                    None => then,
                },
            };
            // SAFETY: AVX-512F is available and the sizes were asserted above: the block
            // reads `a`'s packed rows and writes rows `0..m` of its panel's columns.
            unsafe { run_block(a, (m, k), block, &mut panel) };
        }
    }
    scratch::give_panel(panel);
}

/// `a.matmul(b)` for `a: [batch, m, k]` and `b: [batch, k, n]` (attention's scores and
/// weighted values): the kernel per batch entry when both are f32 on an AVX-512 CPU, `a`
/// has enough rows, no gradient flows and `b` is either contiguous or the transpose of a
/// contiguous `[batch, n, k]` (`keys.t()`); candle's matmul otherwise.
pub fn batched(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    batched_causal(a, b, None)
}

/// Rows that need only their leading part of a product: row `r` of each batch entry needs
/// `needs(r) = min(all, offset + r % period + 1)` of its columns (`Output`) or of its
/// inputs (`Input`): a prefill piece's queries, `period` of them per query head, each
/// seeing the candidates up to its own token and none after (the causal upper triangle).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Causal {
    /// Output columns past a row's need are never read: they are left 0 (scores).
    Output { offset: usize, period: usize },
    /// Inputs past a row's need multiply zeros: they are skipped (probabilities times
    /// values, where a query's probabilities past its own token are 0).
    Input { offset: usize, period: usize },
}

impl Causal {
    /// The most any of rows `rows` needs, of `all`.
    fn needs(self, rows: std::ops::Range<usize>, all: usize) -> usize {
        let (Causal::Output { offset, period } | Causal::Input { offset, period }) = self;
        rows.map(|r| offset + r % period + 1)
            .max()
            .unwrap_or(0)
            .min(all)
    }
}

/// [`batched`] computing only what `causal` says each row needs (the same values there, 0
/// past it for `Output`); `None`: everything, as `batched`.
pub fn batched_causal(
    a: &Tensor,
    b: &Tensor,
    causal: Option<Causal>,
) -> candle_core::Result<Tensor> {
    match try_batched(a, b, causal)? {
        Some(y) => Ok(y),
        None => a.matmul(b),
    }
}

fn try_batched(
    a: &Tensor,
    b: &Tensor,
    causal: Option<Causal>,
) -> candle_core::Result<Option<Tensor>> {
    let (Ok((batch, m, k)), Ok((batch_b, k_b, n))) = (a.dims3(), b.dims3()) else {
        return Ok(None);
    };
    if batch != batch_b
        || k != k_b
        || m < MIN_ROWS
        || n * k == 0
        || !super::host::applies(&[a, b])
        || !available()
    {
        return Ok(None);
    }
    let a = a.contiguous()?;
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(ad)), Storage::Cpu(CpuStorage::F32(bd)), Some((a0, _))) =
        (&*a_storage, &*b_storage, a_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let b0 = b_layout.start_offset();
    let transposed = b_layout.stride() == [n * k, 1, k];
    if !transposed && !b_layout.is_contiguous() {
        return Ok(None);
    }
    let mut y: Vec<f32> = Vec::with_capacity(batch * m * n);
    for i in 0..batch {
        let x = &ad[a0 + i * m * k..a0 + (i + 1) * m * k];
        let wd = &bd[b0 + i * n * k..b0 + (i + 1) * n * k];
        let w = if transposed {
            Weight::F32(wd)
        } else {
            Weight::F32T(wd, n)
        };
        let job = Job {
            w: Panels::Pack(w),
            n,
            out: SharedOut(y.as_mut_ptr().wrapping_add(i * m * n)),
            causal,
        };
        // SAFETY: AVX-512F is available; `w` holds `n` rows of `k`; `y` has room for
        // `batch * m * n` values and entry `i` writes its own `m * n`.
        unsafe { gemm_jobs(x, (m, k), &[job]) };
    }
    // SAFETY: every entry wrote its `m * n` values.
    unsafe { y.set_len(batch * m * n) };
    Ok(Some(Tensor::from_vec(y, (batch, m, n), a.device())?))
}

/// One weight of a [`gemm_jobs`] call and where its `[m, n]` product goes.
struct Job<'a> {
    w: Panels<'a>,
    n: usize,
    out: SharedOut,
    /// What each row needs, when not everything.
    causal: Option<Causal>,
}

/// `x W^T` for every job's weight (all `[n, k]` with the same `k`), the input packed once
/// and the panels of all weights shared out among the threads together, so narrow
/// projections (k and v: 192 columns, 6 panels) do not leave threads idle at each k-block.
///
/// # Safety
/// AVX-512F must be available; every weight must hold its `n` rows of `k`; every `out`
/// must have room for `m * n` values (all written) and not overlap another's.
unsafe fn gemm_jobs(x: &[f32], (m, k): (usize, usize), jobs: &[Job<'_>]) {
    debug_assert!(available() && m * k > 0 && jobs.iter().all(|j| j.n > 0));
    // The input, packed once: tile by tile, k-major, `MR` rows per input (rows past `m`
    // zero), so the kernel's broadcasts read one stream instead of 14 rows.
    let packed = pack_all(x, (m, k));
    let a = &packed[..packed_len(m, k)];
    // Panel `p` of the whole call: job `i`, its panel `p - first[i]`.
    let first: Vec<usize> = jobs
        .iter()
        .scan(0, |at, j| {
            let here = *at;
            *at += j.n.div_ceil(NR);
            Some(here)
        })
        .collect();
    let panels: usize = jobs.iter().map(|j| j.n.div_ceil(NR)).sum();
    // Panel `p`'s k-block `k0`, every tile.
    let run = |p: usize, k0: usize, panel: &mut Panel| {
        let i = first.partition_point(|&f| f <= p) - 1;
        let Job { w, n, out, causal } = &jobs[i];
        let (own, j0) = (p - first[i], (p - first[i]) * NR);
        let mine = n.div_ceil(NR);
        let block = Block {
            w: *w,
            p: own,
            n: *n,
            k0,
            out: out.at(j0),
            ldo: *n,
            causal: *causal,
            next: match (w, next_block((own, k0), k, 0..mine)) {
                (Panels::Packed(w), Some((np, nk0))) => w.block_bytes(np, nk0),
                _ => &[],
            },
        };
        // SAFETY: AVX-512F is available (the caller's contract); `a` holds the packed
        // input; `out` has room for `m x n` values, and this task owns panel `p`'s columns
        // (tasks own whole panels); later k-blocks read only what the earlier ones wrote.
        unsafe { run_block(a, (m, k), block, panel) }
    };
    // A task takes whole panels through every k-block: one fork-join per call, and a
    // panel's outputs stay in cache from one k-block to the next. (Measured against one
    // fork-join per k-block over all panels, which prompt chunks took before: 1.15-1.4x
    // at 128 rows, 1.0-1.16x at 512, a prefill 1.06-1.08x.) Few-row calls (decode steps)
    // hand out panels at least two at a time: one is little work.
    let min_len = if m <= FEW_ROWS { 2 } else { 1 };
    (0..panels)
        .into_par_iter()
        .with_min_len(min_len)
        .for_each(|p| {
            let mut panel = scratch::take_panel();
            for k0 in (0..k).step_by(KC) {
                run(p, k0, &mut panel);
            }
            scratch::give_panel(panel);
        });
    scratch::give_rows(packed);
}

/// `x: [m, k]` packed for the kernel by all threads: tile by tile, k-major,
/// [`tile_stride`] rows per input (rows past `m` zero), so the kernel's broadcasts read one
/// stream instead of 14 rows. In this thread's scratch buffer: give it back
/// (`scratch::give_rows`) when done.
fn pack_all(x: &[f32], (m, k): (usize, usize)) -> Vec<f32> {
    let (tiles, lda) = (m.div_ceil(MR), tile_stride(m));
    let mut packed = scratch::take_rows(packed_len(m, k));
    if m == 1 {
        packed[..k].copy_from_slice(&x[..k]);
        return packed;
    }
    packed[..tiles * lda * k]
        .par_chunks_mut(lda * k)
        .with_min_len(4)
        .enumerate()
        .for_each(|(t, dst)| pack_rows(x, (m, k), (t * MR, lda), dst));
    packed
}

/// SwiGLU's `silu(x G^T) * (x U^T)` for packed `gate` and `up` (`[n, k]` each), without
/// the two `[m, n]` products: each task runs a gate panel and the up panel of the same
/// columns into two `[m, NR]` buffers of its own, which stay in cache, and writes only
/// their `silu(g) * u` (`vexp::silu_mul`). The products and the activation are those of
/// [`matmul_packed`] followed by `vexp::silu_mul`, bit for bit; the `[m, n]` products
/// written and read back were a prefill's 26 ms of SiLU on top of the projections.
pub fn gate_up_silu(x: &Tensor, (gate, up): (&Packed, &Packed)) -> crate::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, kg) = gate.dims();
    if up.dims() != (n, kg) || kg != k {
        return Err(crate::Error::Invalid(format!(
            "gemm: [{m}, {k}] by gate {:?} and up {:?}",
            gate.dims(),
            up.dims()
        )));
    }
    let act = with_input(x, |xd| {
        let mut act: Vec<f32> = Vec::with_capacity(m * n);
        if m * n * k > 0 {
            let packed = pack_all(xd, (m, k));
            let a = &packed[..packed_len(m, k)];
            let out = SharedOut(act.as_mut_ptr());
            let panels = n.div_ceil(NR);
            (0..panels).into_par_iter().for_each(|p| {
                let mut panel = scratch::take_panel();
                let mut tiles = scratch::take_tiles(2 * m * NR);
                let (g, u) = tiles[..2 * m * NR].split_at_mut(m * NR);
                let cols = NR.min(n - p * NR);
                // After the gate panel's last block, the up panel's first; after that, the
                // next gate panel's (most often this thread's next).
                let then = [up.block_bytes(p, 0), gate.block_bytes(p + 1, 0)];
                for ((w, buf), then) in [(gate, &mut *g), (up, &mut *u)].into_iter().zip(then) {
                    for k0 in (0..k).step_by(KC) {
                        let next = match next_block((p, k0), k, p..p + 1) {
                            Some((np, nk0)) => w.block_bytes(np, nk0),
                            None => then,
                        };
                        let block = Block {
                            w: Panels::Packed(w),
                            p,
                            n,
                            k0,
                            out: buf.as_mut_ptr(),
                            ldo: NR,
                            causal: None,
                            next,
                        };
                        // SAFETY: AVX-512F is available (`applies_to_input`); `a` holds the
                        // packed input; `buf` holds `m` rows of `NR` values, this task's own.
                        unsafe { run_block(a, (m, k), block, &mut panel) };
                    }
                }
                for r in 0..m {
                    // SAFETY: this task alone writes columns `p * NR..p * NR + cols` of
                    // `act`, which has room for `m * n` values.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out.at(r * n + p * NR), cols) };
                    let at = r * NR..r * NR + cols;
                    super::vexp::silu_mul(&g[at.clone()], &u[at], dst);
                }
                scratch::give_tiles(tiles);
                scratch::give_panel(panel);
            });
            scratch::give_rows(packed);
            // SAFETY: the panels cover every column of every row.
            unsafe { act.set_len(m * n) };
        }
        Ok(act)
    })?;
    Ok(Tensor::from_vec(act, (m, n), x.device())?)
}

/// The block after `(p, k0)` when a thread goes through panels `panels` one whole panel
/// at a time (every k-block of `k`).
fn next_block(
    (p, k0): (usize, usize),
    k: usize,
    panels: std::ops::Range<usize>,
) -> Option<(usize, usize)> {
    if k0 + KC < k {
        Some((p, k0 + KC))
    } else {
        (p + 1 < panels.end).then_some((p + 1, 0))
    }
}

/// One panel's k-block of a product: what [`run_block`] reads and where it writes.
struct Block<'a> {
    w: Panels<'a>,
    /// The panel, of `w`'s.
    p: usize,
    /// `w`'s columns.
    n: usize,
    k0: usize,
    /// Row 0's value of the panel's first column; rows are `ldo` apart.
    out: *mut f32,
    ldo: usize,
    causal: Option<Causal>,
    /// The bytes of the block this thread likely runs next (packed weights only): they
    /// are fetched while this one runs.
    next: &'a [u8],
}

/// Every tile of the packed input `a` (`m` rows of `k`) through one panel's k-block: the
/// one loop of [`gemm_jobs`] and [`band`], so both sum each value in the same order.
///
/// # Safety
/// AVX-512F must be available; `a` must hold `m.div_ceil(MR)` packed tiles of `k` inputs;
/// `b.out` must have room for `m` rows (`b.ldo` apart) of the panel's columns, which no
/// one else writes meanwhile, and for a later k-block hold what the earlier ones wrote.
unsafe fn run_block(a: &[f32], (m, k): (usize, usize), b: Block<'_>, panel: &mut Panel) {
    let Block {
        w,
        p,
        n,
        k0,
        out,
        ldo,
        causal,
        next,
    } = b;
    let (j0, kc_all) = (p * NR, KC.min(k - k0));
    let cols = NR.min(n - j0);
    let mut block = None;
    let tiles = m.div_ceil(MR);
    let lda = tile_stride(m);
    // The next block's bytes, a share to each tile, which asks for them a few lines per
    // input as it runs: a weight too large for the caches streams from memory, and the
    // hardware's prefetcher stops at every 4 KiB page, where a block of f32 panels spans
    // eight.
    let ahead = next;
    let per_tile = ahead.len().div_ceil(64).div_ceil(tiles) * 64;
    for (t, a) in a.chunks_exact(lda * k).enumerate().take(tiles) {
        let share = ahead.get(t * per_tile..).unwrap_or(&[]);
        let i0 = t * MR;
        let rows = MR.min(m - i0);
        let tile = Tile {
            rows,
            cols,
            lda,
            first: k0 == 0,
            ahead: &share[..per_tile.min(share.len())],
        };
        let mut kc = kc_all;
        match causal {
            Some(c @ Causal::Output { .. }) if c.needs(i0..i0 + rows, n) <= j0 => {
                if tile.first {
                    for r in i0..i0 + rows {
                        // SAFETY: row `r`'s `cols` values are this block's (the contract).
                        unsafe { std::ptr::write_bytes(out.wrapping_add(r * ldo), 0, cols) };
                    }
                }
                continue;
            }
            Some(c @ Causal::Input { .. }) => {
                // Inputs past the tile's need multiply zeros: adding them changes no value,
                // so skipping them gives the same bits.
                let needs = c.needs(i0..i0 + rows, k);
                if needs <= k0 && !tile.first {
                    continue;
                }
                kc = kc.min(needs.saturating_sub(k0)).max(1);
            }
            _ => {}
        }
        if let (Panels::Packed(w), None, 1) = (w, causal, tiles) {
            if let Some((q, d)) = w.q8_block(p, k0, kc) {
                // One tile (a decode step's rows): the block is read once, so decoding it
                // into the f32 panel only to read it back is a store and a load per weight
                // more than decoding it in registers, as this kernel does (same values).
                // SAFETY: as `run_tile` below; `q` holds the block's `kc` inputs and `d`
                // the scales of every block of the panel.
                unsafe {
                    run_tile_q8(
                        a[k0 * lda..].as_ptr(),
                        (q, d, k0),
                        kc,
                        out.wrapping_add(i0 * ldo),
                        ldo,
                        tile,
                    )
                }
                continue;
            }
        }
        let bp = *block.get_or_insert_with(|| match w {
            Panels::Pack(w) => {
                panel.pack(w, k, j0..j0 + cols, k0, kc_all);
                panel.as_ptr()
            }
            Panels::Packed(w) => w.block(p, k0, kc_all, panel),
        });
        // SAFETY: the contract: `a` holds `k * lda` values per tile and the kernel reads
        // `kc * lda` from `k0 * lda`; the tile writes rows `i0..i0 + rows` of the block's
        // columns.
        unsafe {
            run_tile(
                a[k0 * lda..].as_ptr(),
                bp,
                kc,
                out.wrapping_add(i0 * ldo),
                ldo,
                tile,
            )
        }
    }
}

/// `avx512::$kernel(args)` where the module exists: the callers run a kernel only after
/// [`available`] said so, which it never does off x86_64.
macro_rules! on_avx512 {
    ($kernel:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the calling function's contract is the kernel's.
        unsafe {
            avx512::$kernel($($arg),*)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = ($($arg),*);
            unreachable!("the AVX-512 kernel runs only where `available()` says it can");
        }
    }};
}

/// [`avx512::tile`] where it exists ([`on_avx512`]).
///
/// # Safety
/// As `avx512::tile`.
unsafe fn run_tile(a: *const f32, p: *const f32, kc: usize, c: *mut f32, ldc: usize, t: Tile<'_>) {
    on_avx512!(tile(a, p, kc, c, ldc, t))
}

/// [`avx512::tile_q8`] where it exists ([`on_avx512`]).
///
/// # Safety
/// As `avx512::tile_q8`.
unsafe fn run_tile_q8(
    a: *const f32,
    q8: (&[i8], &[f32], usize),
    kc: usize,
    c: *mut f32,
    ldc: usize,
    t: Tile<'_>,
) {
    on_avx512!(tile_q8(a, q8, kc, c, ldc, t))
}

/// Buffers kept per thread between calls: a prefill calls the kernel seven times per
/// layer, and fresh multi-megabyte allocations are fresh pages, each faulted in on first
/// touch (measured: a fixed ~0.8 ms per 512-row call on this project's VM). A buffer is
/// taken out while in use, so a nested call on the same thread (rayon runs other tasks
/// while one waits) finds none and allocates its own.
mod scratch {
    use std::cell::Cell;

    use super::Panel;

    thread_local! {
        static ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
        static PANEL: Cell<Option<Panel>> = const { Cell::new(None) };
        static TILES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }

    /// A buffer of at least `len` values (their contents are overwritten by the caller).
    pub fn take_rows(len: usize) -> Vec<f32> {
        let mut v = ROWS.take();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    pub fn give_rows(v: Vec<f32>) {
        ROWS.set(v);
    }

    /// A task's own output buffer of at least `len` values (`gate_up_silu`'s).
    pub fn take_tiles(len: usize) -> Vec<f32> {
        let mut v = TILES.take();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    pub fn give_tiles(v: Vec<f32>) {
        TILES.set(v);
    }

    pub fn take_panel() -> Panel {
        PANEL.take().unwrap_or_else(Panel::new)
    }

    pub fn give_panel(p: Panel) {
        PANEL.set(Some(p));
    }
}

/// Packs rows `i0..i0 + lda` of `x: [m, k]` as `dst[kk * lda + r] = x[i0 + r, kk]`, zero
/// for rows past `m` (`lda`: the tile's stride, at most [`MR`]).
fn pack_rows(x: &[f32], (m, k): (usize, usize), (i0, lda): (usize, usize), dst: &mut [f32]) {
    assert!(dst.len() >= k * lda && x.len() >= m * k && i0 < m && (1..=MR).contains(&lda));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is available; the bounds were asserted above.
        unsafe { avx512::pack_rows(x, (m, k), (i0, lda), dst) };
        return;
    }
    pack_rows_reference(x, (m, k), (i0, lda), dst);
}

/// [`pack_rows`], one value at a time: the reference the transposing version is held to.
fn pack_rows_reference(
    x: &[f32],
    (m, k): (usize, usize),
    (i0, lda): (usize, usize),
    dst: &mut [f32],
) {
    for r in 0..lda {
        for kk in 0..k {
            dst[kk * lda + r] = if i0 + r < m {
                x[(i0 + r) * k + kk]
            } else {
                0.0
            };
        }
    }
}

/// The output, written by tasks at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes its own columns (see `gemm`); the buffer outlives the tasks.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A tile's extent: rows and columns actually written (the rest of the registers hold
/// padding), and whether it is the first k-block (store) or a later one (accumulate).
#[derive(Clone, Copy)]
struct Tile<'a> {
    rows: usize,
    cols: usize,
    /// Values per input in the packed rows ([`tile_stride`]).
    lda: usize,
    first: bool,
    /// Bytes to prefetch while the tile runs (the next block's share): spread over its
    /// inputs and brought into L2, not L1. Asked for all before the tile (the first way
    /// this was written), they queued behind one another while the kernel waited; and
    /// brought into L1 they evicted the current block's lines before the kernel read
    /// them. Decode steps 4-15% faster (batch 1 to 32), prefill unchanged.
    ahead: &'a [u8],
}

/// Per-call packing of a panel (attention's products).
impl Panel {
    /// Packs `W[cols, k0..k0 + kc]`: `panel[kk * NR + c] = W[cols.start + c, k0 + kk]`,
    /// zero for columns past `cols`.
    fn pack(
        &mut self,
        w: Weight<'_>,
        k: usize,
        cols: std::ops::Range<usize>,
        k0: usize,
        kc: usize,
    ) {
        assert!(cols.len() <= NR && kc <= KC && k0 + kc <= k);
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX-512F is available; `gemm` checked that `w` holds `n >= cols.end`
            // rows of `k` inputs, and the panel holds `KC * NR` values.
            unsafe { avx512::pack_panel(self.values(), w, k, cols, k0, kc) };
            return;
        }
        self.pack_reference(w, k, cols, k0, kc);
    }

    /// [`Panel::pack`], one value at a time: the reference.
    fn pack_reference(
        &mut self,
        w: Weight<'_>,
        k: usize,
        cols: std::ops::Range<usize>,
        k0: usize,
        kc: usize,
    ) {
        let panel = self.values();
        panel[..kc * NR].fill(0.0);
        for (c, j) in cols.enumerate() {
            for kk in 0..kc {
                panel[kk * NR + c] = weight_at(w, k, j, k0 + kk);
            }
        }
    }
}

/// `W[j, kk]` of a weight with `k` inputs.
fn weight_at(w: Weight<'_>, k: usize, j: usize, kk: usize) -> f32 {
    match w {
        Weight::F32(w) => w[j * k + kk],
        Weight::F32T(w, n) => w[kk * n + j],
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, Weight, MR, NR};
    use crate::layers::matvec_q8::BLOCK;

    /// `$kernel::<R>(args)` for `R` = `$rows`, 1 to [`MR`]: a tile runs the kernel compiled
    /// for its number of rows, so a short tile (a decode step's few rows) does only its
    /// own rows' work.
    macro_rules! by_rows {
        ($rows:expr, $kernel:ident($($arg:expr),*)) => {
            match $rows {
                14 => $kernel::<14>($($arg),*),
                13 => $kernel::<13>($($arg),*),
                12 => $kernel::<12>($($arg),*),
                11 => $kernel::<11>($($arg),*),
                10 => $kernel::<10>($($arg),*),
                9 => $kernel::<9>($($arg),*),
                8 => $kernel::<8>($($arg),*),
                7 => $kernel::<7>($($arg),*),
                6 => $kernel::<6>($($arg),*),
                5 => $kernel::<5>($($arg),*),
                4 => $kernel::<4>($($arg),*),
                3 => $kernel::<3>($($arg),*),
                2 => $kernel::<2>($($arg),*),
                1 => $kernel::<1>($($arg),*),
                r => unreachable!("tiles have 1 to {MR} rows, not {r}"),
            }
        };
    }

    /// `C[rows, cols] (+)= A[rows, 0..kc] . P[0..kc, cols]` for `A` packed `MR` values per
    /// input (see `pack_rows`), a packed panel `P` (64-byte aligned, `NR` per input) and
    /// `C` rows `ldc` apart: the kernel for the tile's number of rows, so a short tile (a
    /// decode step's few sequences) does only its own rows' work. Every row's values are
    /// the same whichever kernel computes them: one FMA chain per value over the k-block.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must hold `kc * tile.lda` values (`tile.lda` at least
    /// `tile.rows`), `p` `kc * NR`, and `c` `tile.rows` rows of `tile.cols` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        a: *const f32,
        p: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        tile: Tile<'_>,
    ) {
        by_rows!(tile.rows, rows(a, p, kc, c, ldc, tile))
    }

    /// [`tile`] for `R` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const R: usize>(
        a: *const f32,
        p: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        tile: Tile<'_>,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        // Cache lines of the next block to ask for per input (a prefetch cannot fault).
        let mut lines = tile.ahead.chunks(64);
        let per_k = lines.len().div_ceil(kc.max(1));
        for kk in 0..kc {
            for line in lines.by_ref().take(per_k) {
                _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
            }
            let b = (
                _mm512_load_ps(p.add(kk * NR)),
                _mm512_load_ps(p.add(kk * NR + 16)),
            );
            fma_rows(a.add(kk * tile.lda), b, (&mut lo, &mut hi));
        }
        store(&lo, &hi, c, ldc, &tile);
    }

    /// [`tile`] for a Q8_0 panel block read as stored (`q`: `kc` inputs of `NR` signed
    /// bytes; `d`: the panel's scales, `[k / 32][NR]`; `k0`: the block's first input): each
    /// input's weights are decoded in registers to the `d * q` that `Packed::block` writes
    /// into its f32 panel, and multiplied in as [`tile`] multiplies that panel's, so every
    /// value is the same bits.
    ///
    /// # Safety
    /// As [`tile`], with `q` holding `kc * NR` bytes, `kc` and `k0` multiples of 32, and `d`
    /// the scales of inputs `k0..k0 + kc`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_q8(
        a: *const f32,
        (q, d, k0): (&[i8], &[f32], usize),
        kc: usize,
        c: *mut f32,
        ldc: usize,
        tile: Tile<'_>,
    ) {
        assert!(
            q.len() >= kc * NR
                && kc.is_multiple_of(BLOCK)
                && k0.is_multiple_of(BLOCK)
                && d.len() >= (k0 + kc) / BLOCK * NR
        );
        let q8 = (q, d, k0);
        by_rows!(tile.rows, rows_q8(a, q8, kc, c, ldc, tile))
    }

    /// [`tile_q8`] for `R` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_q8<const R: usize>(
        a: *const f32,
        (q, d, k0): (&[i8], &[f32], usize),
        kc: usize,
        c: *mut f32,
        ldc: usize,
        tile: Tile<'_>,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let mut lines = tile.ahead.chunks(64);
        let per_k = lines.len().div_ceil(kc.max(1));
        let (q, d) = (q.as_ptr(), d.as_ptr());
        for b in 0..kc / BLOCK {
            let s = d.add((k0 / BLOCK + b) * NR);
            let (s0, s1) = (_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16)));
            for kk in b * BLOCK..(b + 1) * BLOCK {
                for line in lines.by_ref().take(per_k) {
                    _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
                }
                let q0 = _mm_loadu_si128(q.add(kk * NR).cast());
                let q1 = _mm_loadu_si128(q.add(kk * NR + 16).cast());
                let b0 = _mm512_mul_ps(s0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
                let b1 = _mm512_mul_ps(s1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
                fma_rows(a.add(kk * tile.lda), (b0, b1), (&mut lo, &mut hi));
            }
        }
        store(&lo, &hi, c, ldc, &tile);
    }

    /// One input's share of a tile: `lo[r] += a[r] * b0` and `hi[r] += a[r] * b1` for its `R`
    /// rows, the one FMA chain per value that every kernel here keeps (so an f32 panel and
    /// a Q8_0 block decoded in registers give the same bits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_rows<const R: usize>(
        a: *const f32,
        (b0, b1): (__m512, __m512),
        (lo, hi): (&mut [__m512; R], &mut [__m512; R]),
    ) {
        for r in 0..R {
            let av = _mm512_set1_ps(*a.add(r));
            lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
        }
    }

    /// Writes (or adds to, past a panel's first k-block) a tile's accumulators to its rows
    /// of `C`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const R: usize>(
        lo: &[__m512; R],
        hi: &[__m512; R],
        c: *mut f32,
        ldc: usize,
        tile: &Tile<'_>,
    ) {
        let m0 = lane_mask(tile.cols.min(16));
        let m1 = lane_mask(tile.cols.saturating_sub(16));
        for r in 0..R {
            let cr = c.add(r * ldc);
            let (mut v0, mut v1) = (lo[r], hi[r]);
            if !tile.first {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr.add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, v0);
            _mm512_mask_storeu_ps(cr.add(16), m1, v1);
        }
    }

    fn lane_mask(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// `super::pack_rows`, sixteen rows by sixteen inputs at a time through a register
    /// transpose.
    ///
    /// # Safety
    /// AVX-512F must be available; `dst` must hold `k * lda` values, `x` `m * k`, and
    /// `lda <= MR`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_rows(
        x: &[f32],
        (m, k): (usize, usize),
        (i0, lda): (usize, usize),
        dst: &mut [f32],
    ) {
        let rows = lda.min(m - i0);
        let store = lane_mask(lda);
        for kb in (0..k).step_by(16) {
            let lanes = lane_mask(16.min(k - kb));
            let mut v = [_mm512_setzero_ps(); 16];
            for (r, v) in v.iter_mut().enumerate().take(rows) {
                *v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add((i0 + r) * k + kb));
            }
            let t = transpose(v);
            for (kk, t) in t.iter().enumerate().take(16.min(k - kb)) {
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add((kb + kk) * lda), store, *t);
            }
        }
    }

    /// `Panel::pack`: sixteen columns by sixteen inputs at a time, read (or decoded from
    /// Q8_0) as rows and transposed in registers.
    ///
    /// # Safety
    /// AVX-512F must be available; `w` must hold rows `cols` of `k` inputs, `panel`
    /// `kc * NR` values, and `k0 + kc <= k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_panel(
        panel: &mut [f32],
        w: Weight<'_>,
        k: usize,
        cols: std::ops::Range<usize>,
        k0: usize,
        kc: usize,
    ) {
        if let Weight::F32T(w, n) = w {
            // Already k-major: each input's 32 columns are one contiguous run.
            for half in 0..NR / 16 {
                let c0 = cols.start + 16 * half;
                let lanes = lane_mask(cols.end.saturating_sub(c0).min(16));
                for kk in 0..kc {
                    let v = _mm512_maskz_loadu_ps(lanes, w.as_ptr().add((k0 + kk) * n + c0));
                    _mm512_store_ps(panel.as_mut_ptr().add(kk * NR + 16 * half), v);
                }
            }
            return;
        }
        for half in 0..NR / 16 {
            let c0 = cols.start + 16 * half;
            let width = cols.end.saturating_sub(c0).min(16);
            for kb in (0..kc).step_by(16) {
                let n = 16.min(kc - kb);
                let mut v = [_mm512_setzero_ps(); 16];
                for (c, v) in v.iter_mut().enumerate().take(width) {
                    *v = load(w, k, c0 + c, k0 + kb, n);
                }
                let t = transpose(v);
                for (kk, t) in t.iter().enumerate().take(n) {
                    _mm512_store_ps(panel.as_mut_ptr().add((kb + kk) * NR + 16 * half), *t);
                }
            }
        }
    }

    /// `W[j, kk..kk + n]` (`n <= 16`), zero past `n`.
    #[target_feature(enable = "avx512f")]
    unsafe fn load(w: Weight<'_>, k: usize, j: usize, kk: usize, n: usize) -> __m512 {
        match w {
            Weight::F32(w) => _mm512_maskz_loadu_ps(lane_mask(n), w.as_ptr().add(j * k + kk)),
            Weight::F32T(..) => unreachable!("packed by straight copies"),
        }
    }

    /// The 16 x 16 transpose: `out[c]` lane `r` = `rows[r]` lane `c`.
    #[target_feature(enable = "avx512f")]
    fn transpose(r: [__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved by 32 bits, then by 64 bits: `u[4g + j]`, 128-bit lane
        // `l`, holds rows `4g..4g + 4` of column `4l + j`.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
            u[4 * g + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
            u[4 * g + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
            u[4 * g + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        }
        // Then 128-bit lanes gathered across the four groups: column `4l + j` is lane `l`
        // of `u[j]`, `u[4 + j]`, `u[8 + j]` and `u[12 + j]`.
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
            out[j] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
            out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(v0, w0);
            out[4 + j] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// Whether this CPU lacks the kernel (the test then says so and passes).
    fn skipped() -> bool {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
        }
        !available()
    }

    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        x.matmul(&w.t().unwrap()).unwrap()
    }

    fn packed_product(x: &Tensor, w: &Packed) -> Tensor {
        matmul_packed(x, &[w]).unwrap().pop().unwrap()
    }

    #[test]
    fn matches_matmul_on_ragged_shapes() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        // Rows, inputs and outputs that are and are not multiples of MR, KC and NR; single
        // rows and short tiles (decode steps) as well as many.
        for (m, k, n) in [
            (33, 64, 32),
            (47, 300, 45),
            (64, 576, 192),
            (100, 520, 70),
            (14, 256, 33),
            (1, 576, 100),
            (5, 37, 3),
            (17, 600, 64),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let got = packed_product(&x, &Packed::from_tensor(&w).unwrap());
            let want = reference(&x, &w);
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(d < 1e-4 * (k as f32).sqrt(), "[{m}, {k}] x [{n}, {k}]: {d}");
        }
    }

    #[test]
    fn q8_0_matches_the_dequantized_product() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        for (m, k, n) in [(40, 64, 50), (70, 544, 96), (1, 288, 40), (9, 64, 7)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let got = packed_product(&x, &Packed::from_q8_0(&q).unwrap());
            let want = reference(&x, &q.dequantize(&dev).unwrap());
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(d < 1e-4 * (k as f32).sqrt(), "[{m}, {k}] x [{n}, {k}]: {d}");
        }
    }

    /// A row's product is the same bits whatever rows share the call (a decode step of one
    /// sequence or of 32, a prompt chunk), and a decode step's bands give the same bits.
    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        let (k, n) = (608, 70);
        let x = Tensor::randn(0f32, 1.0, (40, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        for w in [
            Packed::from_tensor(&w).unwrap(),
            Packed::from_q8_0(&q).unwrap(),
        ] {
            let all = packed_product(&x, &w).to_vec2::<f32>().unwrap();
            for (start, m) in [(0, 1), (3, 1), (5, 13), (2, 14), (7, 15), (1, 33)] {
                let part = packed_product(&x.narrow(0, start, m).unwrap(), &w)
                    .to_vec2::<f32>()
                    .unwrap();
                assert_eq!(&part[..], &all[start..start + m], "rows {start}..+{m}");
                // The same rows through bands of one and two panels.
                let xs = x.narrow(0, start, m).unwrap().flatten_all().unwrap();
                let xs = xs.to_vec1::<f32>().unwrap();
                let mut a = Vec::new();
                pack_input(&xs, (m, k), &mut a);
                let ldo = 2 * NR;
                let mut out = vec![f32::NAN; m * ldo];
                for p0 in (0..w.panels()).step_by(2) {
                    let panels = p0..(p0 + 2).min(w.panels());
                    // `then` only asks for bytes: the next band's, or none past the last.
                    let then = w.block_bytes(p0 + 2, 0);
                    band(&a, m, &w, panels, (&mut out, ldo), None, then);
                    for i in 0..m {
                        for j in p0 * NR..((p0 + 2) * NR).min(n) {
                            assert_eq!(out[i * ldo + j - p0 * NR], part[i][j], "band [{i}, {j}]");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_gate_up_is_the_products_then_silu_mul() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        // Partial panels (n = 70), a partial k-block (k = 288, Q8_0's blocks of 32), one
        // row to several tiles.
        let (k, n) = (288, 70);
        let g = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let (gq, uq) = (
            QTensor::quantize(&g, GgmlDType::Q8_0).unwrap(),
            QTensor::quantize(&u, GgmlDType::Q8_0).unwrap(),
        );
        let weights = [
            (
                Packed::from_tensor(&g).unwrap(),
                Packed::from_tensor(&u).unwrap(),
            ),
            (
                Packed::from_q8_0(&gq).unwrap(),
                Packed::from_q8_0(&uq).unwrap(),
            ),
        ];
        for (gate, up) in &weights {
            for m in [1, 13, 40] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let fused = gate_up_silu(&x, (gate, up)).unwrap();
                let [pg, pu]: [Tensor; 2] =
                    matmul_packed(&x, &[gate, up]).unwrap().try_into().unwrap();
                let (pg, pu) = (
                    pg.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    pu.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let mut want = vec![0f32; m * n];
                crate::layers::vexp::silu_mul(&pg, &pu, &mut want);
                let got = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, want, "m {m}");
            }
        }
        // Mismatched weights are refused.
        let x = Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap();
        let short = Packed::from_tensor(&g.narrow(0, 0, 40).unwrap()).unwrap();
        assert!(gate_up_silu(&x, (&weights[0].0, &short)).is_err());
    }

    #[test]
    fn packing_matches_its_reference() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        for (m, k) in [(14, 16), (20, 37), (3, 300), (5, 40), (9, 17)] {
            let x: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
            let lda = tile_stride(m);
            for i0 in (0..m).step_by(MR) {
                let (mut a, mut b) = (vec![-1f32; k * MR], vec![-1f32; k * MR]);
                pack_rows(&x, (m, k), (i0, lda), &mut a);
                pack_rows_reference(&x, (m, k), (i0, lda), &mut b);
                assert_eq!(a, b, "rows of [{m}, {k}] from {i0}");
                // Fewer rows than a tile's are packed at their own stride, nothing after.
                assert_eq!(
                    b[lda * (k - 1) + lda.min(m - i0) - 1],
                    x[(i0 + lda.min(m - i0) - 1) * k + k - 1]
                );
                assert!(b[lda * k..].iter().all(|&v| v == -1.0));
            }
        }
        for (n, k) in [(45, 64), (32, 288), (7, 544)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let dense = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let t = w.t().unwrap().contiguous().unwrap();
            let transposed = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for weight in [Weight::F32(&dense), Weight::F32T(&transposed, n)] {
                for j0 in (0..n).step_by(NR) {
                    for k0 in (0..k).step_by(KC) {
                        let (cols, kc) = (j0..NR.min(n - j0) + j0, KC.min(k - k0));
                        let (mut a, mut b) = (Panel::new(), Panel::new());
                        a.values().fill(-1.0);
                        a.pack(weight, k, cols.clone(), k0, kc);
                        b.pack_reference(weight, k, cols, k0, kc);
                        assert_eq!(&a.values()[..kc * NR], &b.values()[..kc * NR]);
                    }
                }
            }
        }
    }

    #[test]
    fn batched_matches_matmul_for_both_layouts() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        for (batch, m, k, n) in [(3, 40, 64, 70), (2, 100, 300, 33), (1, 33, 17, 5)] {
            let a = Tensor::randn(0f32, 1.0, (batch, m, k), &dev).unwrap();
            let rows = Tensor::randn(0f32, 1.0, (batch, n, k), &dev).unwrap();
            let plain = rows.t().unwrap().contiguous().unwrap();
            for b in [rows.t().unwrap(), plain] {
                let got = try_batched(&a, &b, None)
                    .unwrap()
                    .expect("the kernel applies");
                let d = crate::testing::max_abs_diff(&got, &a.matmul(&b).unwrap());
                assert!(
                    d < 1e-4 * (k as f32).sqrt(),
                    "{batch} x [{m}, {k}] x [{k}, {n}]: {d}"
                );
            }
        }
        // Too few rows: candle's matmul.
        let a = Tensor::randn(0f32, 1.0, (2, 8, 16), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 16, 4), &dev).unwrap();
        assert!(try_batched(&a, &b, None).unwrap().is_none());
        assert_eq!(batched(&a, &b).unwrap().dims(), &[2, 8, 4]);
    }

    /// Causal products: scores only up to each query's own column (0 after), and values
    /// weighted by probabilities that are 0 past it, the same bits as the whole product.
    #[test]
    fn causal_products_compute_what_each_row_needs() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        // Two query heads of 45 queries each, 30 earlier candidates, head dim 64.
        let (batch, period, heads, offset, d) = (2, 45, 2, 30, 64);
        let (m, l) = (heads * period, offset + period);
        let q = Tensor::randn(0f32, 1.0, (batch, m, d), &dev).unwrap();
        let keys = Tensor::randn(0f32, 1.0, (batch, l, d), &dev).unwrap();
        let needs = |r: usize| offset + r % period + 1;
        let full = batched(&q, &keys.t().unwrap())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let causal = Causal::Output { offset, period };
        let part = batched_causal(&q, &keys.t().unwrap(), Some(causal)).unwrap();
        let part = part.to_vec3::<f32>().unwrap();
        for b in 0..batch {
            for r in 0..m {
                assert_eq!(&part[b][r][..needs(r)], &full[b][r][..needs(r)], "row {r}");
                // Whole tiles past every row's need are 0; the rest of a tile is computed.
                assert!(part[b][r][needs(r)..].iter().all(|x| x.is_finite()));
            }
        }
        // The first tile's rows (0..14) need at most 44 columns: the third panel is 0.
        let skipped = needs(MR - 1).div_ceil(NR) * NR;
        assert!(skipped < l && part[0][0][skipped..].iter().all(|&x| x == 0.0));
        // Probabilities past each row's need are 0.
        let mut p = Tensor::rand(0f32, 1.0, (batch, m, l), &dev)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for rows in p.iter_mut() {
            for (r, row) in rows.iter_mut().enumerate() {
                row[needs(r)..].fill(0.0);
            }
        }
        let p = Tensor::new(p, &dev).unwrap();
        let values = Tensor::randn(0f32, 1.0, (batch, l, d), &dev).unwrap();
        let full = batched(&p, &values).unwrap();
        let causal = Causal::Input { offset, period };
        let part = batched_causal(&p, &values, Some(causal)).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&full, &part), 0.0);
    }

    #[test]
    fn many_weights_at_once_match_one_at_a_time() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        let (m, k) = (50, 96);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w1 = Tensor::randn(0f32, 1.0, (70, k), &dev).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (20, k), &dev).unwrap();
        let q = QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (33, k), &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let ws = [
            Packed::from_tensor(&w1).unwrap(),
            Packed::from_q8_0(&q).unwrap(),
            Packed::from_tensor(&w2).unwrap(),
        ];
        let all = matmul_packed(&x, &[&ws[0], &ws[1], &ws[2]]).unwrap();
        for (a, w) in all.iter().zip(&ws) {
            assert_eq!(crate::testing::max_abs_diff(a, &packed_product(&x, w)), 0.0);
        }
        // A weight of another input size is refused, and so is an input with a gradient.
        let bad = Packed::from_tensor(&Tensor::zeros((5, k + 1), DType::F32, &dev).unwrap());
        assert!(matmul_packed(&x, &[&ws[0], &bad.unwrap()]).is_err());
        let var = candle_core::Var::from_tensor(&x).unwrap();
        assert!(matmul_packed(var.as_tensor(), &[&ws[0]]).is_err());
    }
}
