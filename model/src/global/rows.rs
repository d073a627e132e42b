//! Rebuilding a layer's kept keys and values after an admission.
//!
//! Place `i` of head `h` takes candidate `kept_after[h][i]` of the sources laid end to end
//! (the kept entries, then the window rows and new tokens), and a key that passes the
//! distance cap is rotated back by its own position. The reference does this with candle
//! ops on any device. While a cache fills, a decode step admits a token in almost every
//! layer, serially after the parallel step, and those ops (an index tensor of `hkv * n * d`
//! u32, a concatenation and a gather, each a full copy, and a rotation of every key when one
//! passes) cost some 20 ms a token at 384 places: most of the step. On the CPU, [`Gather`]
//! copies each kept row once, straight from the sources' storage, and rotates only the rows
//! that pass. `tests` hold the two equal.

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use half::{bf16, f16};

use crate::layers::rope::rotate_rows;
use crate::Result;

/// Which rows the kept entries are built from.
pub(super) struct Gather<'a> {
    /// `[hkv, len, d]` each, laid end to end along dim 1.
    pub sources: &'a [&'a Tensor],
    /// Per head, the source row of every place.
    pub kept_after: &'a [Vec<usize>],
    /// What the kept rows are stored in.
    pub dtype: DType,
}

/// Keys to rotate back: per kept row (`[hkv * n]`, head-major), by how much (0: leave it),
/// with the cap's rotary frequencies.
pub(super) struct Unrotate<'a> {
    pub back: &'a [i64],
    pub inv_freq: &'a [f32],
}

impl Gather<'_> {
    /// The kept rows `[hkv, n, d]`, on the host when every source is on the CPU.
    pub fn run(&self, unrotate: Option<&Unrotate>) -> Result<Tensor> {
        let host = match self.dtype {
            DType::F32 => self.host::<f32>(unrotate)?,
            DType::F16 => self.host::<f16>(unrotate)?,
            DType::BF16 => self.host::<bf16>(unrotate)?,
            _ => None,
        };
        match host {
            Some(t) => Ok(t),
            None => self.reference(unrotate),
        }
    }

    /// Candle ops on any device: convert, concatenate, gather; keys are rotated in f32,
    /// whatever they are stored in (so rounded once more at most).
    pub fn reference(&self, unrotate: Option<&Unrotate>) -> Result<Tensor> {
        let all = self
            .sources
            .iter()
            .map(|t| t.to_dtype(self.dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = Tensor::cat(&all, 1)?;
        let (hkv, _, d) = all.dims3()?;
        let n = self.kept_after.first().map_or(0, Vec::len);
        let idx: Vec<u32> = self
            .kept_after
            .iter()
            .flat_map(|row| row.iter().flat_map(|&c| std::iter::repeat_n(c as u32, d)))
            .collect();
        let idx = Tensor::from_vec(idx, (hkv, n, d), all.device())?;
        let kept = all.contiguous()?.gather(&idx, 1)?;
        let Some(u) = unrotate else {
            return Ok(kept);
        };
        let rows = kept.reshape((hkv * n, d))?.to_dtype(DType::F32)?;
        Ok(rotate_rows(&rows, u.back, u.inv_freq)?
            .to_dtype(self.dtype)?
            .reshape((hkv, n, d))?)
    }

    /// One copy per kept row from the sources' storage (those in another dtype converted
    /// first: only ever the new rows of a prefill chunk); `None` when a source is not on
    /// the CPU.
    fn host<T: WithDType>(&self, unrotate: Option<&Unrotate>) -> Result<Option<Tensor>> {
        if self.sources.iter().any(|t| !t.device().is_cpu()) {
            return Ok(None);
        }
        // Rows are read where they are: a window cache's rows are a view into a buffer
        // with spare rows (`KvCache::push`), each head's rows contiguous, the heads apart;
        // copying the window to make it contiguous cost as much as the rest of the store.
        let converted = self
            .sources
            .iter()
            .map(|t| match (t.dtype() == self.dtype, rows_apart(t)) {
                (true, Some(_)) => Ok((*t).clone()),
                (true, None) => t.contiguous(),
                (false, _) => crate::layers::convert(t, self.dtype),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let guards: Vec<_> = converted.iter().map(|t| t.storage_and_layout()).collect();
        // Each source's data from its first row, and the distance between its heads.
        let mut slices: Vec<(&[T], usize)> = Vec::with_capacity(guards.len());
        for ((storage, layout), t) in guards.iter().zip(&converted) {
            match (&**storage, rows_apart(t)) {
                (Storage::Cpu(ref cpu), Some(head_stride)) => slices.push((
                    &T::cpu_storage_as_slice(cpu)?[layout.start_offset()..],
                    head_stride,
                )),
                _ => return Ok(None),
            }
        }
        let (hkv, _, d) = converted[0].dims3()?;
        let lens = converted
            .iter()
            .map(|t| t.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n = self.kept_after.first().map_or(0, Vec::len);
        let mut out: Vec<T> = Vec::with_capacity(hkv * n * d);
        let mut row32 = vec![0f32; d];
        for (h, places) in self.kept_after.iter().enumerate() {
            for (i, &c) in places.iter().enumerate() {
                let (s, j) = locate(&lens, c);
                let (data, head_stride) = slices[s];
                let at = h * head_stride + j * d;
                let row = &data[at..at + d];
                match unrotate.map_or(0, |u| u.back[h * n + i]) {
                    0 => out.extend_from_slice(row),
                    p => {
                        for (x, &y) in row32.iter_mut().zip(row) {
                            *x = y.to_f64() as f32;
                        }
                        let inv_freq = unrotate.map_or(&[][..], |u| u.inv_freq);
                        rotate_row(&mut row32, p, inv_freq);
                        out.extend(row32.iter().map(|&x| T::from_f64(x as f64)));
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(out, (hkv, n, d), &Device::Cpu)?))
    }
}

/// The distance between the heads of `t` (`[hkv, len, d]`) when each head's rows are
/// contiguous (a contiguous tensor, or a window of rows of one); `None` otherwise.
fn rows_apart(t: &Tensor) -> Option<usize> {
    let (_, len, d) = t.dims3().ok()?;
    match *t.stride() {
        [h, r, 1] if r == d || len <= 1 => Some(h),
        _ => None,
    }
}

/// The source and row of candidate `c` of sources `lens` long, end to end.
fn locate(lens: &[usize], mut c: usize) -> (usize, usize) {
    for (s, &len) in lens.iter().enumerate() {
        if c < len {
            return (s, c);
        }
        c -= len;
    }
    panic!("a plan's candidate past its sources");
}

/// [`rotate_rows`] on one row: the same f32 angles, products and differences, so the two
/// agree to the bit.
pub(super) fn rotate_row(x: &mut [f32], position: i64, inv_freq: &[f32]) {
    let half = x.len() / 2;
    let (sign, p) = (position.signum() as f32, position.unsigned_abs() as f32);
    let (x1, x2) = x.split_at_mut(half);
    for ((a, b), &f) in x1.iter_mut().zip(x2.iter_mut()).zip(inv_freq) {
        let angle = sign * (p * f);
        let (sin, cos) = (angle.sin(), angle.cos());
        let (u, w) = (*a, *b);
        *a = u * cos - w * sin;
        *b = u * sin + w * cos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    fn random(shape: (usize, usize, usize), rng: &mut SplitMix) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let x: Vec<f32> = (0..n).map(|_| rng.uniform() * 4.0 - 2.0).collect();
        Tensor::from_vec(x, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn host_gather_equals_the_candle_reference() {
        let mut rng = SplitMix(11);
        let (hkv, d) = (3, 8);
        let inv_freq = [1.0f32, 0.1, 0.01, 0.001];
        for (case, dtype) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            // Kept rows already in the stored dtype, window rows in it too (a view into a
            // buffer with spare rows, as `KvCache::push` keeps them), new rows in f32 (a
            // prefill chunk's).
            let kept = random((hkv, 5, d), &mut rng).to_dtype(dtype).unwrap();
            let buffer = random((hkv, 10, d), &mut rng).to_dtype(dtype).unwrap();
            let window = buffer.narrow(1, 3, 4).unwrap();
            assert!(!window.is_contiguous() && rows_apart(&window) == Some(10 * d));
            let new = random((hkv, 3, d), &mut rng);
            let sources = [&kept, &window, &new];
            // Moves, replacements, appends, differently in every head.
            let kept_after: Vec<Vec<usize>> = (0..hkv)
                .map(|h| (0..7).map(|i| (i * 5 + h + case) % 12).collect())
                .collect();
            let back: Vec<i64> = (0..hkv * 7)
                .map(|i| match i % 3 {
                    0 => 0,
                    1 => -(1000 + i as i64 * 37),
                    _ => 4096 + i as i64,
                })
                .collect();
            let g = Gather {
                sources: &sources,
                kept_after: &kept_after,
                dtype,
            };
            let u = Unrotate {
                back: &back,
                inv_freq: &inv_freq,
            };
            for unrotate in [None, Some(&u)] {
                let fast = match dtype {
                    DType::F32 => g.host::<f32>(unrotate),
                    DType::F16 => g.host::<f16>(unrotate),
                    _ => g.host::<bf16>(unrotate),
                };
                let fast = fast.unwrap().expect("the host path takes CPU tensors");
                let slow = g.reference(unrotate).unwrap();
                assert_eq!(fast.dtype(), dtype);
                let f32s = |t: &Tensor| -> Vec<f32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                assert_eq!(f32s(&fast), f32s(&slow), "{dtype:?}");
            }
        }
    }
}
