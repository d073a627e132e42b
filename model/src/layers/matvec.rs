//! A CPU kernel for `x W^T` when `x` has few rows: decode steps of a batch of sequences,
//! where gemm's cost is dominated by reading (and packing) the weights.
//!
//! Each weight row is streamed from memory once and multiplied into every input row while
//! it is in cache: the work is cut into micro-tiles of 4 input rows x 3 weight rows whose
//! 12 accumulators live in AVX2 registers (7 loads per 12 FMAs), the input rows staying in
//! L1/L2 across weight rows. Output rows are split across threads. gemm repacks the weight
//! matrix on every call, which dominates at these sizes; from [`MAX_ROWS`] up it is
//! compute-bound and better.
//!
//! `Linear` keeps the plain matmul as the reference; `tests::matches_matmul` holds them equal.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Inputs with this many rows take the fast path. A single row stays with gemm, whose
/// dedicated matrix-vector kernel measured as fast or faster (`benches/kernels.rs`); up to
/// `MAX_ROWS` rows this kernel measured faster than gemm there.
pub const MIN_ROWS: usize = 2;
pub const MAX_ROWS: usize = 32;

/// Micro-tile: input rows x weight rows per register block.
const MR: usize = 4;
const NR: usize = 3;
/// Weight rows per tile for a single input row: with one row the kernel is a pure weight
/// stream, and more concurrent rows keep more loads in flight.
const NR1: usize = 6;

/// Output rows per parallel task: large enough to amortize scheduling, small enough to
/// balance two to a few dozen threads on a 576-wide projection.
const ROWS_PER_TASK: usize = 64;

/// Whether `x @ w^T` can use [`matvec`].
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| (MIN_ROWS..=MAX_ROWS).contains(&m))
        && x.is_contiguous()
        && w.is_contiguous()
}

/// `x: [m, k]`, `w: [n, k]` (both f32, contiguous, CPU) -> `[m, n]`.
pub fn matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &MatVec)
}

struct MatVec;

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "liger-matvec"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("liger-matvec: f32 only");
        };
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("liger-matvec: inner dims {k} and {k2} differ");
        }
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("liger-matvec: inputs must be contiguous");
        };
        let (x, w) = (&x[xa..xb], &w[wa..wb]);
        // Computed as [n, m] so each task writes one contiguous block, then transposed.
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                block(x, (m, k), w, first..first + out.len() / m, out);
            });
        let mut y = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                y[i * n + j] = yt[j * m + i];
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `out[(j - rows.start) * m + i] = x[i, :] . w[j, :]` for the weight rows `rows`: the
/// product of `x: [m, k]` with a band of `w: [n, k]`, transposed (`[rows, m]`). The unit of
/// work [`MatVec`] and the fused decode step hand to each thread.
pub(crate) fn block(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
) {
    let n = rows.len();
    let w = &w[rows.start * k..rows.end * k];
    let step = if m == 1 { NR1 } else { NR };
    for j0 in (0..n).step_by(step) {
        let nr = step.min(n - j0);
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            tile(
                Tile {
                    x,
                    m,
                    k,
                    w,
                    i0,
                    j0,
                    mr,
                    nr,
                },
                out,
            );
        }
    }
}

/// One micro-tile: input rows `i0..i0 + mr` times weight rows `j0..j0 + nr` of `w`.
#[derive(Clone, Copy)]
struct Tile<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    w: &'a [f32],
    i0: usize,
    j0: usize,
    mr: usize,
    nr: usize,
}

/// Writes `out[j * m + i] = x[i, :] . w[j, :]` for the tile's rows (`out` is transposed,
/// `[weight rows, m]`).
fn tile(t: Tile, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected; `avx2::tile` checks the bounds.
            unsafe { avx2::tile(t, out) };
            return;
        }
    }
    for j in t.j0..t.j0 + t.nr {
        let wrow = &t.w[j * t.k..(j + 1) * t.k];
        for i in t.i0..t.i0 + t.mr {
            out[j * t.m + i] = dot_portable(&t.x[i * t.k..(i + 1) * t.k], wrow);
        }
    }
}

/// Eight independent accumulators so the compiler can vectorize without reassociating.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, MR, NR, NR1};

    /// Dispatches on the tile's shape so the full 4 x 3 tile (and each edge shape) gets a
    /// kernel whose accumulators are plain registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(t: Tile, out: &mut [f32]) {
        assert!(t.x.len() >= (t.i0 + t.mr) * t.k && t.w.len() >= (t.j0 + t.nr) * t.k);
        assert!(out.len() >= (t.j0 + t.nr) * t.m && t.mr <= MR && t.nr <= NR.max(NR1));
        match (t.mr, t.nr) {
            (1, 6) => kernel::<1, 6>(t, out),
            (1, 5) => kernel::<1, 5>(t, out),
            (1, 4) => kernel::<1, 4>(t, out),
            (4, 3) => kernel::<4, 3>(t, out),
            (4, 2) => kernel::<4, 2>(t, out),
            (4, 1) => kernel::<4, 1>(t, out),
            (3, 3) => kernel::<3, 3>(t, out),
            (3, 2) => kernel::<3, 2>(t, out),
            (3, 1) => kernel::<3, 1>(t, out),
            (2, 3) => kernel::<2, 3>(t, out),
            (2, 2) => kernel::<2, 2>(t, out),
            (2, 1) => kernel::<2, 1>(t, out),
            (1, 3) => kernel::<1, 3>(t, out),
            (1, 2) => kernel::<1, 2>(t, out),
            _ => kernel::<1, 1>(t, out),
        }
    }

    /// `A x B` accumulators over 8-wide blocks of k: per block, `B` weight loads and `A`
    /// input loads feed `A * B` FMAs.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const A: usize, const B: usize>(t: Tile, out: &mut [f32]) {
        let k = t.k;
        let blocks = k / 8;
        let xp = t.x.as_ptr().add(t.i0 * k);
        let wp = t.w.as_ptr().add(t.j0 * k);
        let mut acc = [[_mm256_setzero_ps(); B]; A];
        for b in 0..blocks {
            let mut wv = [_mm256_setzero_ps(); B];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(j * k + b * 8));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(i * k + b * 8));
                for (a, w) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *w, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let mut s = hsum(*a);
                for c in blocks * 8..k {
                    s += *xp.add(i * k + c) * *wp.add(j * k + c);
                }
                out[(t.j0 + j) * t.m + t.i0 + i] = s;
            }
        }
    }

    /// The sum of a vector's eight lanes (every AVX2 kernel of the crate ends with it).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;
    use candle_core::Device;

    fn randn(rng: &mut SplitMix, shape: (usize, usize)) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_matmul() {
        let mut rng = SplitMix(1);
        // Odd sizes: a partial 8-wide block and a partial task.
        for (m, k, n) in [
            (2, 576, 1536),
            (3, 100, 70),
            (8, 37, 129),
            (5, 8, 1),
            (1, 64, 9),
            (13, 576, 200),
            (6, 40, 33),
            (7, 576, 70),
            (32, 64, 67),
            (64, 24, 130),
            (65, 16, 5),
        ] {
            let x = randn(&mut rng, (m, k));
            let w = randn(&mut rng, (n, k));
            assert_eq!(applies(&x, &w), (MIN_ROWS..=MAX_ROWS).contains(&m));
            let fast = matvec(&x, &w).unwrap();
            let slow = x.matmul(&w.t().unwrap()).unwrap();
            let d = crate::testing::max_abs_diff(&fast, &slow);
            assert!(d < 1e-3, "{m}x{k}x{n}: {d}");
        }
    }

    #[test]
    fn portable_dot_matches() {
        let mut rng = SplitMix(2);
        let a: Vec<f32> = (0..77).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..77).map(|_| rng.normal()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_portable(&a, &b) as f64 - want).abs() < 1e-4);
    }
}
