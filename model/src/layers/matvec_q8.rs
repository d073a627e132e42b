//! `x W^T` for a Q8_0 weight and f32 inputs with few rows: the fused decode step's kernel
//! for 8-bit checkpoints.
//!
//! A Q8_0 row is `k / 32` blocks of 34 bytes: an f16 scale `d` and 32 signed bytes `q`,
//! weight `d * q`. Each block is widened to f32 once and multiplied into every input row
//! while in registers, so the weights are read once per step at 8.5 bits each. Unlike
//! GGML's kernel (candle's `QMatMul`), the inputs stay f32 instead of being rounded to 8
//! bits too: the result is the dequantized weight's exact product, which is what
//! `tests::matches_the_dequantized_product` holds it to.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

/// Weights per block, and bytes per block (f16 scale + 32 x i8).
pub const BLOCK: usize = 32;
pub const BLOCK_BYTES: usize = 34;

/// Output rows per parallel task of [`matmul`].
const ROWS_PER_TASK: usize = 64;

/// `x W^T` for `x: [m, k]` (f32, CPU) and a Q8_0 `W: [n, k]` on the CPU: what a quantized
/// layer computes for decode-sized inputs outside the fused step, so that both paths give
/// the dequantized weight's product. Output rows are split across rayon's threads.
pub fn matmul(x: &Tensor, w: &QTensor) -> crate::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, wk) = w.shape().dims2()?;
    if wk != k || k % BLOCK != 0 || w.dtype() != GgmlDType::Q8_0 {
        return Err(crate::Error::Invalid(format!(
            "Q8_0 product: [{m}, {k}] by a {:?} weight {:?}",
            w.dtype(),
            w.shape()
        )));
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Err(crate::Error::Invalid(
            "Q8_0 product: CPU inputs only".into(),
        ));
    };
    let xs = &data[a..b];
    let bytes = w.data()?;
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            block(xs, (m, k), &bytes, first..first + out.len() / m, out);
        });
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
    Ok(Tensor::from_vec(y, (m, n), x.device())?)
}

/// The dense f32 `[n, k]` of a Q8_0 weight on the CPU, rows decoded in parallel on rayon's
/// threads: what a prefill chunk multiplies by. candle's `QTensor::dequantize` runs on its
/// own pool, which `crate::threads::init` sizes to one thread (a 576 x 1536 weight then
/// takes longer to decode than to multiply). Equal to it value for value
/// (`tests::dequantize_matches_candle`).
pub fn dequantize(w: &QTensor) -> crate::Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    if k % BLOCK != 0 || w.dtype() != GgmlDType::Q8_0 || !w.device().is_cpu() {
        return Err(crate::Error::Invalid(format!(
            "Q8_0 dequantization of a {:?} weight {:?}",
            w.dtype(),
            w.shape()
        )));
    }
    let bytes = w.data()?;
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    let mut out = vec![0f32; n * k];
    out.par_chunks_mut(k)
        .zip(bytes.par_chunks(row_bytes))
        .for_each(|(row, src)| {
            for (dst, block) in row
                .chunks_exact_mut(BLOCK)
                .zip(src.chunks_exact(BLOCK_BYTES))
            {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (x, &q) in dst.iter_mut().zip(&block[2..]) {
                    *x = d * q as i8 as f32;
                }
            }
        });
    Ok(Tensor::from_vec(out, (n, k), &candle_core::Device::Cpu)?)
}

/// Input rows per register tile.
const MR: usize = 4;

/// `out[(j - rows.start) * m + i] = x[i, :] . w[j, :]` for the weight rows `rows`, with `w`
/// the Q8_0 bytes of an `[n, k]` matrix (`k` a multiple of [`BLOCK`]) and `x: [m, k]` f32:
/// the same contract as `matvec::block`.
pub(crate) fn block(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[u8],
    rows: Range<usize>,
    out: &mut [f32],
) {
    assert!(
        k % BLOCK == 0 && x.len() >= m * k,
        "Q8_0 rows of {k} values"
    );
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    assert!(w.len() >= rows.end * row_bytes && out.len() >= rows.len() * m);
    for (jj, j) in rows.enumerate() {
        let wr = &w[j * row_bytes..(j + 1) * row_bytes];
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            let dst = &mut out[jj * m + i0..jj * m + i0 + mr];
            row(&x[i0 * k..(i0 + mr) * k], k, wr, dst);
        }
    }
}

/// `dst[i] = x[i, :] . w` for one Q8_0 weight row `w` and `dst.len()` input rows.
fn row(x: &[f32], k: usize, w: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were just detected; the bounds were checked by `block`
            // and are re-asserted inside.
            unsafe {
                match dst.len() {
                    1 => avx2::row1(x, k, w, dst),
                    2 => avx2::rows::<2>(x, k, w, dst),
                    3 => avx2::rows::<3>(x, k, w, dst),
                    _ => avx2::rows::<4>(x, k, w, dst),
                }
            }
            return;
        }
    }
    row_portable(x, k, w, dst);
}

/// The scale of block `b` of a row.
fn scale(w: &[u8], b: usize) -> f32 {
    f16::from_le_bytes([w[b * BLOCK_BYTES], w[b * BLOCK_BYTES + 1]]).to_f32()
}

fn row_portable(x: &[f32], k: usize, w: &[u8], dst: &mut [f32]) {
    for (i, d) in dst.iter_mut().enumerate() {
        let xi = &x[i * k..(i + 1) * k];
        let mut acc = 0f32;
        for b in 0..k / BLOCK {
            let q = &w[b * BLOCK_BYTES + 2..(b + 1) * BLOCK_BYTES];
            let xs = &xi[b * BLOCK..(b + 1) * BLOCK];
            let s: f32 = q.iter().zip(xs).map(|(&q, &x)| q as i8 as f32 * x).sum();
            acc += scale(w, b) * s;
        }
        *d = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BLOCK_BYTES};
    use crate::layers::matvec::avx2::hsum;

    /// Block `b` of row `w`'s 32 weights, scaled, as four 8-wide f32 vectors. A macro, not a
    /// function: `#[target_feature]` functions are not inlined into each other reliably,
    /// and a call returning four vectors goes through memory.
    macro_rules! widen {
        ($w:expr, $b:expr) => {{
            let block = $w.as_ptr().add($b * BLOCK_BYTES);
            // The f16 scale, widened by F16C.
            let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes([*block, *block.add(1)]) as i32,
            ));
            let d = _mm256_broadcastss_ps(d);
            let q = block.add(2);
            let mut out = [_mm256_setzero_ps(); 4];
            for (c, o) in out.iter_mut().enumerate() {
                let bytes = _mm_loadl_epi64(q.add(8 * c) as *const __m128i);
                *o = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
            }
            out
        }};
    }

    /// One input row: four accumulators (one per 8-lane quarter of a block) so the FMA
    /// chains do not wait on each other.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row1(x: &[f32], k: usize, w: &[u8], dst: &mut [f32]) {
        assert!(x.len() >= k && w.len() >= k / BLOCK * BLOCK_BYTES && !dst.is_empty());
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..k / BLOCK {
            let wv = widen!(w, b);
            let xp = x.as_ptr().add(b * BLOCK);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8 * c)), wv[c], *a);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        dst[0] = hsum(s);
    }

    /// `A` input rows: each block is widened once and used `A` times; two accumulators per
    /// row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<const A: usize>(x: &[f32], k: usize, w: &[u8], dst: &mut [f32]) {
        assert!(x.len() >= A * k && w.len() >= k / BLOCK * BLOCK_BYTES && dst.len() >= A);
        let mut acc = [[_mm256_setzero_ps(); 2]; A];
        for b in 0..k / BLOCK {
            let wv = widen!(w, b);
            for (i, a) in acc.iter_mut().enumerate() {
                let xp = x.as_ptr().add(i * k + b * BLOCK);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), wv[0], a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), wv[1], a[1]);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(16)), wv[2], a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(24)), wv[3], a[1]);
            }
        }
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;
    use candle_core::Device;

    #[test]
    fn dequantize_matches_candle() {
        let mut rng = SplitMix(5);
        let (n, k) = (37, 96);
        let wv: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let ours = dequantize(&q).unwrap().to_vec2::<f32>().unwrap();
        let candle = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(ours, candle);
    }

    #[test]
    fn matches_the_dequantized_product() {
        let mut rng = SplitMix(3);
        for (m, k, n) in [
            (1, 64, 7),
            (2, 576, 13),
            (3, 32, 5),
            (4, 96, 9),
            (7, 128, 6),
            (9, 64, 4),
        ] {
            let wv: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let xv: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
            let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let bytes = q.data().unwrap();
            let want = x
                .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            // Rows 1..n of the weight (a band not starting at 0), transposed.
            let mut out = vec![0f32; (n - 1) * m];
            block(&xv, (m, k), &bytes, 1..n, &mut out);
            let whole = matmul(&x, &q).unwrap().to_vec2::<f32>().unwrap();
            let mut portable = vec![0f32; m];
            let row_bytes = k / BLOCK * BLOCK_BYTES;
            row_portable(&xv, k, &bytes[row_bytes..2 * row_bytes], &mut portable);
            for i in 0..m {
                assert!(
                    (portable[i] - want[i][1]).abs() < 1e-3,
                    "portable {m}x{k}x{n}"
                );
                assert!(
                    (whole[i][0] - want[i][0]).abs() < 1e-3,
                    "matmul {m}x{k}x{n}"
                );
                for j in 1..n {
                    let got = out[(j - 1) * m + i];
                    assert!(
                        (got - want[i][j]).abs() < 1e-3,
                        "{m}x{k}x{n} [{i},{j}]: {got} vs {}",
                        want[i][j]
                    );
                }
            }
        }
    }
}
