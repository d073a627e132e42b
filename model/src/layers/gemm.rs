//! `x W^T` for prompt chunks (many rows) on CPUs with AVX-512: the prefill projections.
//!
//! candle's `gemm` crate runs its AVX2 kernels on stable Rust (its AVX-512 ones need the
//! `nightly` feature), so on an AVX-512 CPU with two 512-bit FMA units it reaches about half
//! the cores' peak. This is the classic GotoBLAS/BLIS shape written for 16 lanes:
//!
//! - the weight `[n, k]` is read in panels of [`NR`] = 32 output columns and [`KC`] = 256
//!   inputs, packed k-major per call (a 32 KB panel stays in L1 while every input row runs
//!   past it), so nothing is packed at load and a Q8_0 weight is decoded panel by panel
//!   instead of into a whole dense copy per chunk;
//! - a micro-tile of [`MR`] = 14 input rows x 32 columns keeps its 28 accumulators in
//!   registers: per input, two panel loads and 14 broadcasts feed 28 FMAs;
//! - k-blocks run in sequence and the panels of a block are split over rayon's threads, so
//!   the `[m, KC]` slice of the input each thread reads stays in its L2.
//!
//! The product is the same sum as the reference in a different order (k-blocks, lanes),
//! so it agrees with candle's matmul to float rounding, which `tests` holds it to for f32
//! and Q8_0 weights and for shapes that are not multiples of the tiles.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use super::matvec_q8::{BLOCK, BLOCK_BYTES};

/// Input rows per micro-tile.
pub const MR: usize = 14;
/// Output columns per panel: two 16-lane registers.
pub const NR: usize = 32;
/// Inputs per k-block (a multiple of Q8_0's block of 32).
pub const KC: usize = 256;

/// Inputs with more rows than the decode kernels' (`matvec::MAX_ROWS`) take this path.
pub const MIN_ROWS: usize = super::matvec::MAX_ROWS + 1;

/// A weight `[n, k]`, row-major, as the kernel reads it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    /// `W^T` stored instead, `[k, n]` row-major, with its `n`: the right operand of an
    /// ordinary product `x B` (attention's probabilities times values).
    F32T(&'a [f32], usize),
    /// GGML Q8_0 blocks: each row is `k / 32` blocks of an f16 scale and 32 signed bytes.
    Q8_0(&'a [u8]),
}

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `x @ w^T` for a dense weight `w` takes this path (neither carrying a gradient).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    applies_to_input(x) && applies_weight(w)
}

/// Whether a dense weight can be read by this path: f32, contiguous, on the CPU, no
/// gradient.
pub fn applies_weight(w: &Tensor) -> bool {
    w.dtype() == DType::F32 && w.is_contiguous() && w.device().is_cpu() && !w.track_op()
}

/// Whether an input `x` (any weight) takes this path: f32 rows on the CPU, enough of them,
/// and no gradient to carry (the kernel has no backward pass).
pub fn applies_to_input(x: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| m >= MIN_ROWS)
        && !x.track_op()
        && available()
}

/// `x: [m, k]` by a dense f32 `w: [n, k]` -> `[m, n]`.
pub fn matmul(x: &Tensor, w: &Tensor) -> crate::Result<Tensor> {
    one(matmul_many(x, &[Source::Dense(w)])?)
}

/// `x: [m, k]` by a Q8_0 `w: [n, k]` on the CPU -> `[m, n]`: the dequantized weight's
/// product, decoded a panel at a time.
pub fn matmul_q8_0(x: &Tensor, w: &QTensor) -> crate::Result<Tensor> {
    one(matmul_many(x, &[Source::Q8_0(w)])?)
}

fn one(mut ys: Vec<Tensor>) -> crate::Result<Tensor> {
    Ok(ys.pop().expect("one product per weight"))
}

/// A weight [`matmul_many`] reads: dense f32 `[n, k]` or Q8_0 blocks, on the CPU.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Dense(&'a Tensor),
    Q8_0(&'a QTensor),
}

/// `x W^T` for several weights sharing the input `x: [m, k]` (q, k and v; gate and up) in
/// one call: one packing of `x`, and all weights' panels split over the threads together.
/// The same products as [`matmul`] / [`matmul_q8_0`] one by one, value for value.
pub fn matmul_many(x: &Tensor, ws: &[Source<'_>]) -> crate::Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xd)), Some((x0, x1))) = (&*xs, xl.contiguous_offsets())
    else {
        return Err(crate::Error::Invalid("gemm: f32 CPU inputs".into()));
    };
    // Hold every weight's storage (or block bytes) for the call, then borrow from them.
    // (`G`: candle's storage guard.)
    enum Held<'a, G> {
        Dense(G, usize, usize),
        Q8_0(std::borrow::Cow<'a, [u8]>),
    }
    let dense: Vec<Option<Tensor>> = ws
        .iter()
        .map(|w| match w {
            Source::Dense(t) => t.contiguous().map(Some),
            Source::Q8_0(_) => Ok(None),
        })
        .collect::<candle_core::Result<_>>()?;
    let mut held = Vec::with_capacity(ws.len());
    let mut dims = Vec::with_capacity(ws.len());
    for (w, d) in ws.iter().zip(&dense) {
        let (h, (n, wk), fits) = match (w, d) {
            (Source::Q8_0(q), _) => {
                let fits = q.dtype() == GgmlDType::Q8_0 && k % BLOCK == 0 && q.device().is_cpu();
                (Held::Q8_0(q.data()?), q.shape().dims2()?, fits)
            }
            (Source::Dense(_), Some(d)) => {
                let (g, l) = d.storage_and_layout();
                let (a, b) = l.contiguous_offsets().expect("made contiguous above");
                let fits = d.dtype() == DType::F32 && d.device().is_cpu();
                (Held::Dense(g, a, b), d.dims2()?, fits)
            }
            (Source::Dense(_), None) => unreachable!("dense weights were made contiguous"),
        };
        if wk != k || !fits {
            let what = match w {
                Source::Q8_0(q) => format!("{:?}", q.dtype()),
                Source::Dense(t) => format!("{:?}", t.dtype()),
            };
            return Err(crate::Error::Invalid(format!(
                "gemm: [{m}, {k}] by a {what} weight of shape [{n}, {wk}]"
            )));
        }
        dims.push(n);
        held.push(h);
    }
    let weights: Vec<Weight<'_>> = held
        .iter()
        .map(|h| match h {
            Held::Dense(g, a, b) => match &**g {
                Storage::Cpu(CpuStorage::F32(v)) => Ok(Weight::F32(&v[*a..*b])),
                _ => Err(crate::Error::Invalid("gemm: an f32 CPU weight".into())),
            },
            Held::Q8_0(bytes) => Ok(Weight::Q8_0(bytes)),
        })
        .collect::<crate::Result<_>>()?;
    if !available() {
        return Err(crate::Error::Invalid(
            "gemm: this CPU has no AVX-512".into(),
        ));
    }
    let mut outs: Vec<Vec<f32>> = dims.iter().map(|&n| Vec::with_capacity(m * n)).collect();
    if m > 0 && k > 0 {
        let jobs: Vec<Job<'_>> = weights
            .iter()
            .zip(&dims)
            .zip(outs.iter_mut())
            .filter(|((_, &n), _)| n > 0)
            .map(|((&w, &n), out)| Job {
                w,
                n,
                out: SharedOut(out.as_mut_ptr()),
            })
            .collect();
        // SAFETY: AVX-512F is available; every weight was checked to hold `n` rows of `k`;
        // each output has room for `m * n` values and is its own allocation.
        unsafe { gemm_jobs(&xd[x0..x1], (m, k), &jobs) };
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
    outs.into_iter()
        .zip(&dims)
        .map(|(y, &n)| Ok(Tensor::from_vec(y, (m, n), x.device())?))
        .collect()
}

/// `x W^T` for `x: [m, k]` and `W: [n, k]`, row-major in and out.
pub fn gemm(x: &[f32], (m, k): (usize, usize), w: Weight<'_>, n: usize) -> crate::Result<Vec<f32>> {
    let fits = match w {
        Weight::F32(w) => w.len() >= n * k,
        Weight::F32T(w, wn) => wn == n && w.len() >= n * k,
        Weight::Q8_0(w) => k % BLOCK == 0 && w.len() >= n * (k / BLOCK) * BLOCK_BYTES,
    };
    if !fits || x.len() < m * k {
        return Err(crate::Error::Invalid(format!(
            "gemm: [{m}, {k}] by a weight of {n} rows that does not fit"
        )));
    }
    if !available() {
        return Err(crate::Error::Invalid(
            "gemm: this CPU has no AVX-512".into(),
        ));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; m * n]);
    }
    // Every value is written by the first k-block (tiles cover all rows, panels all
    // columns), so the output starts uninitialized: no zero fill, and a buffer of this size
    // freed earlier can be reused.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `y` has room for `m * n` values.
    unsafe { gemm_to(x, (m, k), w, n, y.as_mut_ptr()) };
    // SAFETY: `gemm_to` wrote all `m * n` values.
    unsafe { y.set_len(m * n) };
    Ok(y)
}

/// `a.matmul(b)` for `a: [batch, m, k]` and `b: [batch, k, n]` (attention's scores and
/// weighted values): the kernel per batch entry when both are f32 on an AVX-512 CPU, `a`
/// has enough rows, no gradient flows and `b` is either contiguous or the transpose of a
/// contiguous `[batch, n, k]` (`keys.t()`); candle's matmul otherwise.
pub fn batched(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match try_batched(a, b)? {
        Some(y) => Ok(y),
        None => a.matmul(b),
    }
}

fn try_batched(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (Ok((batch, m, k)), Ok((batch_b, k_b, n))) = (a.dims3(), b.dims3()) else {
        return Ok(None);
    };
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    if batch != batch_b
        || k != k_b
        || m < MIN_ROWS
        || n * k == 0
        || !cpu_f32(a)
        || !cpu_f32(b)
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
        // SAFETY: `y` has room for `batch * m * n` values; entry `i` writes its own `m * n`.
        unsafe { gemm_to(x, (m, k), w, n, y.as_mut_ptr().add(i * m * n)) };
    }
    // SAFETY: every entry wrote its `m * n` values.
    unsafe { y.set_len(batch * m * n) };
    Ok(Some(Tensor::from_vec(y, (batch, m, n), a.device())?))
}

/// [`gemm`] into `out`, which must have room for `m * n` values (all written); the sizes
/// must fit (checked by the callers) and AVX-512F must be available.
unsafe fn gemm_to(x: &[f32], mk: (usize, usize), w: Weight<'_>, n: usize, out: *mut f32) {
    let job = Job {
        w,
        n,
        out: SharedOut(out),
    };
    gemm_jobs(x, mk, &[job]);
}

/// One weight of a [`gemm_jobs`] call and where its `[m, n]` product goes.
struct Job<'a> {
    w: Weight<'a>,
    n: usize,
    out: SharedOut,
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
    let tiles = m.div_ceil(MR);
    let mut packed = scratch::take_rows(tiles * MR * k);
    packed[..tiles * MR * k]
        .par_chunks_mut(MR * k)
        .enumerate()
        .for_each(|(t, dst)| pack_rows(x, (m, k), t * MR, dst));
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
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        (0..panels).into_par_iter().for_each(|p| {
            let i = first.partition_point(|&f| f <= p) - 1;
            let Job { w, n, out } = &jobs[i];
            let mut panel = scratch::take_panel();
            let j0 = (p - first[i]) * NR;
            let cols = NR.min(n - j0);
            panel.pack(*w, k, j0..j0 + cols, k0, kc);
            for (t, a) in packed[..tiles * MR * k].chunks_exact(MR * k).enumerate() {
                let i0 = t * MR;
                let tile = Tile {
                    rows: MR.min(m - i0),
                    cols,
                    first: k0 == 0,
                };
                // SAFETY: AVX-512F is available (the caller's contract); `a` holds `k * MR`
                // values and the kernel reads `kc * MR` from `k0 * MR`; `out` has room for
                // `m x n` values and the tile writes rows `i0..i0 + rows`, columns
                // `j0..j0 + cols`, which no other task of this k-block writes (tasks own
                // whole panels); later k-blocks read only what the first one wrote.
                unsafe {
                    avx512::tile(
                        a[k0 * MR..].as_ptr(),
                        panel.as_ptr(),
                        kc,
                        out.at(i0 * n + j0),
                        *n,
                        tile,
                    )
                }
            }
            scratch::give_panel(panel);
        });
    }
    scratch::give_rows(packed);
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

    pub fn take_panel() -> Panel {
        PANEL.take().unwrap_or_else(Panel::new)
    }

    pub fn give_panel(p: Panel) {
        PANEL.set(Some(p));
    }
}

/// Packs rows `i0..i0 + MR` of `x: [m, k]` as `dst[kk * MR + r] = x[i0 + r, kk]`, zero
/// for rows past `m`.
fn pack_rows(x: &[f32], (m, k): (usize, usize), i0: usize, dst: &mut [f32]) {
    assert!(dst.len() >= k * MR && x.len() >= m * k && i0 < m);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is available; the bounds were asserted above.
        unsafe { avx512::pack_rows(x, (m, k), i0, dst) };
        return;
    }
    pack_rows_reference(x, (m, k), i0, dst);
}

/// [`pack_rows`], one value at a time: the reference the transposing version is held to.
fn pack_rows_reference(x: &[f32], (m, k): (usize, usize), i0: usize, dst: &mut [f32]) {
    for r in 0..MR {
        for kk in 0..k {
            dst[kk * MR + r] = if i0 + r < m {
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
struct Tile {
    rows: usize,
    cols: usize,
    first: bool,
}

/// One 64-byte line of a packed panel.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A packed panel: `KC` x `NR` weights, k-major, columns past the weight's end zero.
struct Panel(Vec<Line>);

impl Panel {
    fn new() -> Self {
        Panel(vec![Line([0.0; 16]); KC * NR / 16])
    }

    fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    fn values(&mut self) -> &mut [f32] {
        // SAFETY: `Line` is 16 plain f32s, so the buffer is `KC * NR` f32s.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), KC * NR) }
    }

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
        Weight::Q8_0(w) => {
            let block = &w[(j * k + kk) / BLOCK * BLOCK_BYTES..][..BLOCK_BYTES];
            let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            d * block[2 + kk % BLOCK] as i8 as f32
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, Weight, BLOCK, BLOCK_BYTES, MR, NR};

    /// `C[rows, cols] (+)= A[rows, 0..kc] . P[0..kc, cols]` for `A` packed `MR` values per
    /// input (see `pack_rows`), a packed panel `P` (64-byte aligned, `NR` per input) and
    /// `C` rows `ldc` apart.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must hold `kc * MR` values, `p` `kc * NR`, and `c`
    /// `tile.rows` rows of `tile.cols` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        a: *const f32,
        p: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        tile: Tile,
    ) {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        for kk in 0..kc {
            let b0 = _mm512_load_ps(p.add(kk * NR));
            let b1 = _mm512_load_ps(p.add(kk * NR + 16));
            let ak = a.add(kk * MR);
            for r in 0..MR {
                let av = _mm512_set1_ps(*ak.add(r));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        }
        let m0 = lane_mask(tile.cols.min(16));
        let m1 = lane_mask(tile.cols.saturating_sub(16));
        for r in 0..tile.rows {
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
    /// AVX-512F must be available; `dst` must hold `k * MR` values and `x` `m * k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_rows(x: &[f32], (m, k): (usize, usize), i0: usize, dst: &mut [f32]) {
        let rows = MR.min(m - i0);
        let store = lane_mask(MR);
        for kb in (0..k).step_by(16) {
            let lanes = lane_mask(16.min(k - kb));
            let mut v = [_mm512_setzero_ps(); 16];
            for (r, v) in v.iter_mut().enumerate().take(rows) {
                *v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add((i0 + r) * k + kb));
            }
            let t = transpose(v);
            for (kk, t) in t.iter().enumerate().take(16.min(k - kb)) {
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add((kb + kk) * MR), store, *t);
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
            Weight::Q8_0(w) => {
                // `kk` is a multiple of 16 and `k` of 32, so the 16 values lie in one block.
                let block = w.as_ptr().add((j * k + kk) / BLOCK * BLOCK_BYTES);
                let d = half::f16::from_le_bytes([*block, *block.add(1)]).to_f32();
                let q = _mm_loadu_si128(block.add(2 + kk % BLOCK).cast());
                let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                _mm512_maskz_mul_ps(lane_mask(n), v, _mm512_set1_ps(d))
            }
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

    #[test]
    fn matches_matmul_on_ragged_shapes() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        // Rows, inputs and outputs that are and are not multiples of MR, KC and NR.
        for (m, k, n) in [
            (33, 64, 32),
            (47, 300, 45),
            (64, 576, 192),
            (100, 520, 70),
            (14, 256, 33),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let got = matmul(&x, &w).unwrap();
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
        for (m, k, n) in [(40, 64, 50), (70, 544, 96)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let got = matmul_q8_0(&x, &q).unwrap();
            let want = reference(&x, &q.dequantize(&dev).unwrap());
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(d < 1e-4 * (k as f32).sqrt(), "[{m}, {k}] x [{n}, {k}]: {d}");
        }
    }

    #[test]
    fn packing_matches_its_reference() {
        if skipped() {
            return;
        }
        let dev = Device::Cpu;
        for (m, k) in [(14, 16), (20, 37), (3, 300)] {
            let x: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
            for i0 in (0..m).step_by(MR) {
                let (mut a, mut b) = (vec![-1f32; k * MR], vec![-1f32; k * MR]);
                pack_rows(&x, (m, k), i0, &mut a);
                pack_rows_reference(&x, (m, k), i0, &mut b);
                assert_eq!(a, b, "rows of [{m}, {k}] from {i0}");
            }
        }
        for (n, k) in [(45, 64), (32, 288), (7, 544)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let dense = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bytes = q.data().unwrap();
            let t = w.t().unwrap().contiguous().unwrap();
            let transposed = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for weight in [
                Weight::F32(&dense),
                Weight::Q8_0(&bytes),
                Weight::F32T(&transposed, n),
            ] {
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
                let got = try_batched(&a, &b).unwrap().expect("the kernel applies");
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
        assert!(try_batched(&a, &b).unwrap().is_none());
        assert_eq!(batched(&a, &b).unwrap().dims(), &[2, 8, 4]);
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
        let all = matmul_many(
            &x,
            &[Source::Dense(&w1), Source::Q8_0(&q), Source::Dense(&w2)],
        )
        .unwrap();
        let one = [
            matmul(&x, &w1).unwrap(),
            matmul_q8_0(&x, &q).unwrap(),
            matmul(&x, &w2).unwrap(),
        ];
        for (a, b) in all.iter().zip(&one) {
            assert_eq!(crate::testing::max_abs_diff(a, b), 0.0);
        }
        // A weight of another input size is refused.
        let bad = Tensor::randn(0f32, 1.0, (5, k + 1), &dev).unwrap();
        assert!(matmul_many(&x, &[Source::Dense(&w1), Source::Dense(&bad)]).is_err());
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let w = vec![0f32; 10];
        assert!(gemm(&[0.0; 40], (4, 10), Weight::F32(&w), 2).is_err());
        assert!(gemm(&[0.0; 10], (4, 10), Weight::F32(&w), 1).is_err());
    }
}
