//! A CPU kernel for `x W^T` when `x` has only a few rows: decode steps, where the cost is
//! reading the weights once from memory.
//!
//! gemm's general kernel reaches about half the machine's memory bandwidth on such shapes.
//! Here each weight row is streamed exactly once and multiplied into every input row while it
//! is in registers (so a batch of 8 decode tokens costs little more than one), with AVX2/FMA
//! when the CPU has it, and the output rows split across threads. Larger batches go to gemm,
//! which is compute-bound there and better at it.
//!
//! `Linear` keeps the plain matmul as the reference; `tests::matches_matmul` holds them equal.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Inputs with this many rows take the fast path. A single row stays with gemm, whose
/// dedicated matrix-vector kernel measured as fast or faster (`benches/kernels.rs`); from 2 to
/// 8 rows this kernel measured about 2x faster than gemm, which re-reads the weights per row.
pub const MIN_ROWS: usize = 2;
pub const MAX_ROWS: usize = 8;

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
                for (r, out_row) in out.chunks_mut(m).enumerate() {
                    let wrow = &w[(first + r) * k..(first + r + 1) * k];
                    dot_rows(x, m, k, wrow, out_row);
                }
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

/// `out[i] = x[i, :] . wrow` for the `m` rows of `x`.
fn dot_rows(x: &[f32], m: usize, k: usize, wrow: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { avx2::dot_rows(x, m, k, wrow, out) };
            return;
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_portable(&x[i * k..(i + 1) * k], wrow);
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
mod avx2 {
    use std::arch::x86_64::*;

    /// One pass over `wrow`: each 8-wide weight block is loaded once and multiplied into every
    /// row of `x` (up to [`super::MAX_ROWS`] accumulators live in registers).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(x: &[f32], m: usize, k: usize, wrow: &[f32], out: &mut [f32]) {
        debug_assert!(m <= super::MAX_ROWS && x.len() >= m * k && wrow.len() >= k);
        let mut acc = [_mm256_setzero_ps(); super::MAX_ROWS];
        let blocks = k / 8;
        let wp = wrow.as_ptr();
        let xp = x.as_ptr();
        for b in 0..blocks {
            let wv = _mm256_loadu_ps(wp.add(b * 8));
            for (i, a) in acc.iter_mut().enumerate().take(m) {
                let xv = _mm256_loadu_ps(xp.add(i * k + b * 8));
                *a = _mm256_fmadd_ps(xv, wv, *a);
            }
        }
        for i in 0..m {
            let mut s = hsum(acc[i]);
            for j in blocks * 8..k {
                s += x[i * k + j] * wrow[j];
            }
            out[i] = s;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
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
        ] {
            let x = randn(&mut rng, (m, k));
            let w = randn(&mut rng, (n, k));
            assert_eq!(applies(&x, &w), m >= MIN_ROWS);
            let fast = matvec(&x, &w).unwrap();
            let slow = x.matmul(&w.t().unwrap()).unwrap();
            let d: f32 = (fast - slow)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
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
