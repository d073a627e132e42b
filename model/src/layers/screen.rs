//! Exact greedy picks from a cheaper LM head.
//!
//! A greedy sequence uses one number of its logits row: which token is largest. At f32 the
//! head (`[vocab, hidden]`, 113 MB for SmolLM2's 49,152 x 576) is a fifth of the weights a
//! one-token decode step reads from memory. [`HeadScreen`] holds the head a second time in
//! Q8_0 (a quarter of the bytes) with, per row, a bound on how far its product can be from
//! the f32 one; a step reads that copy, and then computes in f32 only the rows whose bound
//! lets them reach the largest value, the others left at `-inf`:
//!
//! - `|exact_r - approx_r| <= slack_r * |x|_1`, where `slack_r` is the row's largest
//!   quantization error plus the rounding of both sums (see [`HeadScreen::new`]);
//! - the row `j` whose approximate value is largest gets its exact value `L`: a lower bound
//!   on the largest exact value;
//! - a row whose `approx_r + slack_r |x|_1` is under `L` cannot be the largest, nor tie it.
//!
//! Each exact value is summed in the packed kernel's order ([`exact`]): the same bits as
//! the full product, so the argmax (lowest index on ties) is the full row's. The full
//! product stays the reference: where a row has too many candidates, or a value is not
//! finite, the caller computes it whole.

use super::matvec_q8::{BLOCK, BLOCK_BYTES};
use std::sync::Arc;

use super::packed::{Packed, KC};

/// An LM head's Q8_0 copy and per-row error bounds (see the module docs).
pub struct HeadScreen {
    approx: Arc<Packed>,
    /// Per row: how far the two products can be apart per unit of the input's L1 norm.
    slack: Vec<f32>,
}

impl std::fmt::Debug for HeadScreen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeadScreen({:?})", self.approx.dims())
    }
}

impl HeadScreen {
    /// The screen of `w`: `[n, k]` row-major, `k` a multiple of 32.
    ///
    /// Each block of 32 gets the scale `d = max|w| / 127` (rounded to f16, as GGML stores
    /// it) and `q = round(w / d)`; the kernel decodes `d * q` exactly in f32 (an 11-bit
    /// mantissa times an 8-bit integer). The row's slack per unit of `|x|_1`:
    ///
    /// - its largest `|w - d q|`: the two products' difference in exact arithmetic;
    /// - `gamma * max|w|` and `gamma * max|d q|`: each computed sum is within
    ///   `gamma_n sum |w_i x_i|` of its exact value, `n` the roundings a term goes through
    ///   (an FMA chain of at most [`KC`], then one add per k-block), and `k + 8` bounds `n`;
    ///   `gamma` is taken as `2 (k + 8) 2^-24`, twice that, so that half of it is left over;
    /// - raised by `2^-10` for the rounding of the slack, of `|x|_1`, and of
    ///   `approx + slack |x|_1` in [`pick`](Self::pick): that sum's rounding, at most
    ///   `2^-24 |approx|`, is covered by the spare `gamma` term alone (`|approx|` is at most
    ///   `max|d q| |x|_1`, up to its own rounding).
    pub fn new(w: &[f32], (n, k): (usize, usize)) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || k == 0 || w.len() < n * k || !w.iter().all(|x| x.is_finite())
        {
            return None;
        }
        let row_bytes = k / BLOCK * BLOCK_BYTES;
        let mut bytes = vec![0u8; n * row_bytes];
        let gamma = (k + 8) as f32 * f32::EPSILON;
        let slack = bytes
            .chunks_mut(row_bytes)
            .zip(w.chunks(k))
            .map(|(out, row)| {
                let (mut err, mut big, mut big_q) = (0f32, 0f32, 0f32);
                for (block, dst) in row.chunks(BLOCK).zip(out.chunks_mut(BLOCK_BYTES)) {
                    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let d = half::f16::from_f32(amax / 127.0);
                    let (df, inv) = match d.to_f32() {
                        0.0 => (0.0, 0.0),
                        df => (df, 1.0 / df),
                    };
                    dst[..2].copy_from_slice(&d.to_le_bytes());
                    for (x, q) in block.iter().zip(&mut dst[2..]) {
                        let qi = (x * inv).round().clamp(-127.0, 127.0);
                        *q = qi as i8 as u8;
                        let decoded = df * qi;
                        err = err.max((x - decoded).abs());
                        big_q = big_q.max(decoded.abs());
                    }
                    big = big.max(amax);
                }
                (err + gamma * (big + big_q)) * (1.0 + 1.0 / 1024.0)
            })
            .collect();
        Some(Self {
            approx: Arc::new(Packed::from_q8_0_bytes(&bytes, (n, k))),
            slack,
        })
    }

    /// The Q8_0 copy, as the kernel reads it.
    pub fn approx(&self) -> &Arc<Packed> {
        &self.approx
    }

    /// The memory a step reads (the copy's bytes and scales, the bounds), to place it.
    pub fn memory(&self) -> Vec<&[u8]> {
        let mut all = self.approx.memory();
        all.push(super::f32_bytes(&self.slack));
        all
    }

    /// One row's logits for a greedy pick, in place: `logits` holds the copy's product
    /// with `x` and gets the exact values (as the full product has them, `w` being the f32
    /// head `[n, k]`) of every row that can be the largest, and `-inf` for the others.
    /// Returns `false`, `logits` unspecified, where it cannot tell (a value that is not
    /// finite, or more than `most` candidates): then the caller computes the row in full.
    pub fn pick(&self, w: &[f32], x: &[f32], logits: &mut [f32], most: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above); the body is safe code.
            return unsafe { self.pick_avx512(w, x, logits, most) };
        }
        self.pick_body(w, x, logits, most)
    }

    /// [`pick`](Self::pick) compiled for AVX-512: its passes over the vocabulary run
    /// sixteen lanes wide instead of baseline x86-64's four (69 -> 57 us a row of 49,152). The same
    /// operations (compares, selects, adds, multiplies; Rust fuses none), so the same
    /// result.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pick_avx512(&self, w: &[f32], x: &[f32], logits: &mut [f32], most: usize) -> bool {
        self.pick_body(w, x, logits, most)
    }

    #[inline(always)]
    fn pick_body(&self, w: &[f32], x: &[f32], logits: &mut [f32], most: usize) -> bool {
        let (n, k) = self.approx.dims();
        assert!(x.len() == k && logits.len() == n && w.len() >= n * k);
        let norm: f32 = x.iter().map(|v| v.abs()).sum();
        let Some(top) = first_max(logits) else {
            return false;
        };
        let floor = exact(&w[top * k..][..k], x);
        if !norm.is_finite() || !floor.is_finite() {
            return false;
        }
        // Every value is finite here (`first_max`), so no `reach` is NaN. Most lanes miss:
        // each is tested with no branch, and a lane of 16 that holds a candidate is gone
        // through again one value at a time.
        let mut found = 0;
        let lanes = logits.chunks_mut(LANE).zip(self.slack.chunks(LANE));
        for (i, (ls, ss)) in lanes.enumerate() {
            let hit = ls
                .iter()
                .zip(ss)
                .fold(false, |hit, (&l, &s)| hit | (l + s * norm >= floor));
            if !hit {
                ls.fill(f32::NEG_INFINITY);
                continue;
            }
            for (j, (l, &s)) in ls.iter_mut().zip(ss).enumerate() {
                if *l + s * norm >= floor {
                    found += 1;
                    if found > most {
                        return false;
                    }
                    let r = i * LANE + j;
                    *l = exact(&w[r * k..][..k], x);
                } else {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        true
    }
}

/// Whether the CPU fuses multiply-adds: without, [`exact`] calls libm for each (the same
/// bits, far slower) and the screen is not worth it.
pub(crate) fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Values [`HeadScreen::pick`] tests at once, and [`first_max`] keeps a maximum each of.
const LANE: usize = 16;

/// The first index of the largest value; `None` if any value is not finite (or none is
/// given). Sixteen running maxima and finiteness flags, which the compiler keeps in vector
/// registers, then the first value equal to their largest.
#[inline(always)]
fn first_max(values: &[f32]) -> Option<usize> {
    let mut max = [f32::NEG_INFINITY; LANE];
    let mut finite = [true; LANE];
    let whole = values.chunks_exact(LANE);
    let rest = whole.remainder();
    for c in whole {
        for i in 0..LANE {
            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
            finite[i] &= c[i].abs() < f32::INFINITY;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        max[i] = if v > max[i] { v } else { max[i] };
        finite[i] &= v.abs() < f32::INFINITY;
    }
    if values.is_empty() || finite.contains(&false) {
        return None;
    }
    let top = max.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    values.iter().position(|&v| v == top)
}

/// `w . x` summed as the packed kernel sums each output (`super::gemm`): an FMA chain from
/// zero per k-block of [`KC`], each block's sum added to the blocks' before it. The same
/// bits as the kernel's value for that column (`tests`).
pub(crate) fn exact(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked above); the body is safe code.
        return unsafe { exact_fma(w, x) };
    }
    exact_body(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn exact_fma(w: &[f32], x: &[f32]) -> f32 {
    exact_body(w, x)
}

/// `mul_add` is one rounding wherever it runs (an instruction with FMA, libm's `fmaf`
/// without), so both compilations give the same bits.
#[inline(always)]
fn exact_body(w: &[f32], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (i, (wb, xb)) in w.chunks(KC).zip(x.chunks(KC)).enumerate() {
        let mut acc = 0f32;
        for (&wv, &xv) in wb.iter().zip(xb) {
            acc = xv.mul_add(wv, acc);
        }
        total = if i == 0 { acc } else { acc + total };
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gemm;
    use crate::rng::SplitMix;
    use candle_core::{Device, Tensor};

    fn normal(n: usize, rng: &mut SplitMix) -> Vec<f32> {
        rng.normals(n, 1.0)
    }

    fn below(n: usize, rng: &mut SplitMix) -> usize {
        (rng.next_u64() % n as u64) as usize
    }

    /// `x W^T` for one row `x`, by the packed kernel.
    fn product(w: &Packed, x: &[f32]) -> Vec<f32> {
        let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu).unwrap();
        let y = gemm::matmul_packed(&x, &[w]).unwrap();
        y[0].flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The f32 head's full product.
    fn full(w: &[f32], (n, k): (usize, usize), x: &[f32]) -> Vec<f32> {
        product(&Packed::from_f32(w, (n, k)), x)
    }

    /// The screen's copy's product.
    fn approx(s: &HeadScreen, x: &[f32]) -> Vec<f32> {
        product(s.approx(), x)
    }

    #[test]
    fn exact_sums_as_the_packed_kernel_does() {
        if !gemm::available() {
            return;
        }
        let mut rng = SplitMix(3);
        for (n, k) in [(40, 576), (33, 64), (7, 300)] {
            let w = normal(n * k, &mut rng);
            let x = normal(k, &mut rng);
            let kernel = full(&w, (n, k), &x);
            for (r, &v) in kernel.iter().enumerate() {
                let mine = exact(&w[r * k..][..k], &x);
                assert_eq!(mine.to_bits(), v.to_bits(), "[{n}, {k}] row {r}");
                assert_eq!(exact_body(&w[r * k..][..k], &x).to_bits(), v.to_bits());
            }
        }
    }

    /// Weights whose rows all nearly tie: the bound has to do the work.
    fn near_ties(n: usize, k: usize, rng: &mut SplitMix) -> Vec<f32> {
        let base = normal(k, rng);
        let mut w = Vec::with_capacity(n * k);
        for _ in 0..n {
            w.extend(base.iter().map(|b| b + 1e-4 * rng.normal()));
        }
        w
    }

    #[test]
    fn a_pick_keeps_the_full_rows_argmax_and_its_values() {
        if !gemm::available() {
            return;
        }
        let mut rng = SplitMix(11);
        let (n, k) = (300, 128);
        for case in 0..24 {
            let mut x = normal(k, &mut rng);
            let w = match case % 3 {
                0 => normal(n * k, &mut rng),
                1 => near_ties(n, k, &mut rng),
                // A duplicated row that x points at: an exact tie for the lead, which the
                // lowest index wins.
                _ => {
                    let mut w = normal(n * k, &mut rng);
                    let (a, b) = (below(n, &mut rng), below(n, &mut rng));
                    let row: Vec<f32> = w[a * k..][..k].to_vec();
                    w[b * k..][..k].copy_from_slice(&row);
                    x = row;
                    w
                }
            };
            let screen = HeadScreen::new(&w, (n, k)).unwrap();
            let want = full(&w, (n, k), &x);
            let mut got = approx(&screen, &x);
            assert!(screen.pick(&w, &x, &mut got, n));
            let argmax = |v: &[f32]| first_max(&v.iter().map(|x| x.max(-1e30)).collect::<Vec<_>>());
            assert_eq!(argmax(&got), argmax(&want), "case {case}");
            for (g, w) in got.iter().zip(&want) {
                assert!(*g == f32::NEG_INFINITY || g.to_bits() == w.to_bits());
                assert!(*g == f32::NEG_INFINITY || *g >= want[argmax(&want).unwrap()] - 1.0);
            }
        }
    }

    #[test]
    fn every_row_whose_bound_reaches_the_lead_is_computed() {
        if !gemm::available() {
            return;
        }
        let mut rng = SplitMix(5);
        let (n, k) = (200, 64);
        let w = near_ties(n, k, &mut rng);
        let screen = HeadScreen::new(&w, (n, k)).unwrap();
        let x = normal(k, &mut rng);
        let a = approx(&screen, &x);
        let want = full(&w, (n, k), &x);
        // The bound holds for every row.
        let norm: f32 = x.iter().map(|v| v.abs()).sum();
        for r in 0..n {
            assert!((want[r] - a[r]).abs() <= screen.slack[r] * norm, "row {r}");
        }
        let mut got = a.clone();
        assert!(screen.pick(&w, &x, &mut got, n));
        let lead = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let ties = want.iter().filter(|&&v| v == lead).count();
        assert!(got.iter().filter(|&&v| v == lead).count() == ties);
        // Too few places for them: the caller is told to compute the row whole.
        let computed = got.iter().filter(|v| v.is_finite()).count();
        assert!(computed > 1, "near ties leave several candidates");
        assert!(!screen.pick(&w, &x, &mut a.clone(), computed - 1));
    }

    #[test]
    fn values_that_are_not_finite_send_the_row_back() {
        let (n, k) = (4, 32);
        let w = vec![0.5f32; n * k];
        let screen = HeadScreen::new(&w, (n, k)).unwrap();
        let mut x = vec![1f32; k];
        assert!(!screen.pick(&w, &x, &mut [1.0, f32::NAN, 0.0, 0.0], n));
        x[3] = f32::INFINITY;
        assert!(!screen.pick(&w, &x, &mut [1.0, 0.0, 0.0, 0.0], n));
        assert!(
            HeadScreen::new(&w, (n, 30)).is_none(),
            "k not in blocks of 32"
        );
    }
}
