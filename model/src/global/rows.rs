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

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, WithDType};
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

    /// The kept rows `[hkv, rows, d]` (`rows >= n`; the rows past `n` zero: a cache's room
    /// to change in place), on the host when every source is on the CPU.
    pub fn run_padded(&self, unrotate: Option<&Unrotate>, rows: usize) -> Result<Tensor> {
        let host = match self.dtype {
            DType::F32 => self.host::<f32>(unrotate, rows)?,
            DType::F16 => self.host::<f16>(unrotate, rows)?,
            DType::BF16 => self.host::<bf16>(unrotate, rows)?,
            _ => None,
        };
        if let Some(t) = host {
            return Ok(t);
        }
        let kept = self.reference(unrotate)?;
        let (hkv, n, d) = kept.dims3()?;
        if rows == n {
            return Ok(kept);
        }
        let spare = Tensor::zeros((hkv, rows - n, d), self.dtype, kept.device())?;
        Ok(Tensor::cat(&[&kept, &spare], 1)?)
    }

    /// The rows [`write`](Changes::write) puts into `room` (`[hkv, rows, d]`, contiguous on
    /// the CPU, in `self.dtype`; its first `old` rows per head are the kept entries
    /// before): those of the places whose row changes (a new candidate, an entry moved
    /// from another place, a key rotated back, a place past `old`), read now, before any is
    /// written (an entry may move to a place whose entry moves on). The other places hold
    /// their rows already. `None` where the host path does not apply (a source off the CPU,
    /// a dtype it does not take, a room that does not fit).
    pub fn changes(
        &self,
        unrotate: Option<&Unrotate>,
        room: &Tensor,
        old: usize,
    ) -> Result<Option<Changes>> {
        match self.dtype {
            DType::F32 => self.changes_as::<f32>(unrotate, room, old),
            DType::F16 => self.changes_as::<f16>(unrotate, room, old),
            DType::BF16 => self.changes_as::<bf16>(unrotate, room, old),
            _ => Ok(None),
        }
    }

    fn changes_as<T: WithDType>(
        &self,
        unrotate: Option<&Unrotate>,
        room: &Tensor,
        old: usize,
    ) -> Result<Option<Changes>> {
        let (hkv, room_rows, d) = room.dims3()?;
        let n = self.kept_after.first().map_or(0, Vec::len);
        if !room.device().is_cpu()
            || room.dtype() != self.dtype
            || !room.is_contiguous()
            || self.kept_after.len() != hkv
            || n > room_rows
        {
            return Ok(None);
        }
        let back = |h: usize, i: usize| unrotate.map_or(0, |u| u.back[h * n + i]);
        let changed = |h: usize, i: usize, c: usize| c != i || i >= old || back(h, i) != 0;
        let (mut places, mut rows) = (Vec::new(), Vec::<T>::new());
        let read = self.each_row::<T>(unrotate, changed, |h, i, row| {
            places.push(h * room_rows + i);
            rows.extend_from_slice(row);
        })?;
        Ok(read.then(|| Changes {
            places,
            rows: T::to_cpu_storage_owned(rows),
            d,
        }))
    }

    /// [`run_padded`](Self::run_padded) on the host: one copy per kept row from the
    /// sources' storage; `None` when a source is not on the CPU.
    fn host<T: WithDType>(
        &self,
        unrotate: Option<&Unrotate>,
        rows: usize,
    ) -> Result<Option<Tensor>> {
        let hkv = self.kept_after.len();
        let Some(d) = self.sources.first().map(|t| t.dim(2)).transpose()? else {
            return Ok(None);
        };
        // Place `i` of head `h` is row `h * rows + i`; the spare places stay zero.
        let mut out = vec![T::zero(); hkv * rows * d];
        let read = self.each_row::<T>(
            unrotate,
            |_, _, _| true,
            |h, i, row| out[(h * rows + i) * d..][..d].copy_from_slice(row),
        )?;
        Ok(read
            .then(|| Tensor::from_vec(out, (hkv, rows, d), &Device::Cpu))
            .transpose()?)
    }

    /// Calls `each(h, i, row)` for every place `i` of every head `h` whose candidate `c`
    /// `pick(h, i, c)` selects, in place order, with its row read where it lies in the
    /// sources' storage (those in another dtype converted first: only ever the new rows of
    /// a prefill chunk), rotated back where `unrotate` says; `false` when a source is not
    /// on the CPU.
    fn each_row<T: WithDType>(
        &self,
        unrotate: Option<&Unrotate>,
        pick: impl Fn(usize, usize, usize) -> bool,
        mut each: impl FnMut(usize, usize, &[T]),
    ) -> Result<bool> {
        if self.sources.iter().any(|t| !t.device().is_cpu()) {
            return Ok(false);
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
                _ => return Ok(false),
            }
        }
        let Some(first) = converted.first() else {
            return Ok(true);
        };
        let (_, _, d) = first.dims3()?;
        let lens = converted
            .iter()
            .map(|t| t.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n = self.kept_after.first().map_or(0, Vec::len);
        // Scratch for rows rotated back (allocated by the first: most steps have none).
        let (mut row32, mut rotated) = (Vec::<f32>::new(), Vec::<T>::new());
        for (h, places) in self.kept_after.iter().enumerate() {
            for (i, &c) in places.iter().enumerate() {
                if !pick(h, i, c) {
                    continue;
                }
                let (s, j) = locate(&lens, c);
                let (data, head_stride) = slices[s];
                let at = h * head_stride + j * d;
                let row = &data[at..at + d];
                match unrotate.map_or(0, |u| u.back[h * n + i]) {
                    0 => each(h, i, row),
                    p => {
                        row32.clear();
                        row32.extend(row.iter().map(|&y| y.to_f64() as f32));
                        let inv_freq = unrotate.map_or(&[][..], |u| u.inv_freq);
                        rotate_row(&mut row32, p, inv_freq);
                        rotated.clear();
                        rotated.extend(row32.iter().map(|&x| T::from_f64(x as f64)));
                        each(h, i, &rotated);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Rows to write over some rows of a buffer: row `places[i]` of a contiguous `[rows, d]`
/// buffer gets `rows[i * d..][..d]` (in the buffer's dtype).
#[derive(Debug, Clone)]
pub(super) struct Changes {
    pub places: Vec<usize>,
    pub rows: CpuStorage,
    pub d: usize,
}

impl Changes {
    /// No rows to write.
    pub fn none(d: usize) -> Self {
        Changes {
            places: Vec::new(),
            rows: CpuStorage::F32(Vec::new()),
            d,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// The rows `buffer` holds now at these places (what writing them over it undoes).
    pub fn current(&self, buffer: &Tensor) -> Result<Changes> {
        fn pick<T: WithDType>(data: &[T], c: &Changes, start: usize) -> CpuStorage {
            // Row by row: an iterator over elements cost ~1.7% of a 32-sequence decode step.
            let mut rows = Vec::with_capacity(c.places.len() * c.d);
            for &p in &c.places {
                rows.extend_from_slice(&data[start + p * c.d..][..c.d]);
            }
            T::to_cpu_storage_owned(rows)
        }
        let (storage, layout) = buffer.storage_and_layout();
        let (start, d) = (layout.start_offset(), self.d);
        let rows = match &*storage {
            Storage::Cpu(CpuStorage::F32(x)) => pick(x, self, start),
            Storage::Cpu(CpuStorage::F16(x)) => pick(x, self, start),
            Storage::Cpu(CpuStorage::BF16(x)) => pick(x, self, start),
            _ => {
                return Err(crate::Error::State(
                    "global cache rows: not a CPU f32, f16 or bf16 buffer".into(),
                ))
            }
        };
        Ok(Changes {
            places: self.places.clone(),
            rows,
            d,
        })
    }

    /// Writes the rows into `buffer` (contiguous, on the CPU, in the rows' dtype), in
    /// place: no view of the buffer may be read meanwhile by anyone who must not see them.
    pub fn write(&self, buffer: &Tensor) -> Result<()> {
        if !self.is_empty() {
            buffer.inplace_op1(self)?;
        }
        Ok(())
    }
}

impl InplaceOp1 for Changes {
    fn name(&self) -> &'static str {
        "global-cache-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        fn put<T: Copy>(data: &mut [T], rows: &[T], c: &Changes, start: usize) {
            for (&place, row) in c.places.iter().zip(rows.chunks_exact(c.d)) {
                data[start + place * c.d..][..c.d].copy_from_slice(row);
            }
        }
        let start = layout.start_offset();
        match (storage, &self.rows) {
            (CpuStorage::F32(data), CpuStorage::F32(rows)) => put(data, rows, self, start),
            (CpuStorage::F16(data), CpuStorage::F16(rows)) => put(data, rows, self, start),
            (CpuStorage::BF16(data), CpuStorage::BF16(rows)) => put(data, rows, self, start),
            _ => candle_core::bail!("{}: rows in another dtype than the buffer", self.name()),
        }
        Ok(())
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
                    DType::F32 => g.host::<f32>(unrotate, 7),
                    DType::F16 => g.host::<f16>(unrotate, 7),
                    _ => g.host::<bf16>(unrotate, 7),
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
    #[test]
    fn changed_places_written_in_place_equal_a_fresh_gather_and_undo() {
        let mut rng = SplitMix(29);
        let (hkv, d, room_rows, old) = (3, 8, 10, 5);
        let inv_freq = [1.0f32, 0.1, 0.01, 0.001];
        let rows = |t: &Tensor, n: usize| -> Vec<f32> {
            let t = t.narrow(1, 0, n).unwrap().to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for case in 0..4 {
                // The kept rows are the first `old` rows of each head of a room with spare
                // rows; the window is a view into another buffer; new rows come in f32.
                let room = random((hkv, room_rows, d), &mut rng)
                    .to_dtype(dtype)
                    .unwrap();
                let buffer = random((hkv, 10, d), &mut rng).to_dtype(dtype).unwrap();
                let window = buffer.narrow(1, 2, 4).unwrap();
                let new = random((hkv, 3, d), &mut rng);
                // Places kept, swapped (read before their place is written), replaced by
                // window rows or new ones, and appended; differently in every head.
                let kept_after: Vec<Vec<usize>> = (0..hkv)
                    .map(|h| {
                        let mut row: Vec<usize> = (0..old).collect();
                        row.swap(h % old, (h + 2 + case) % old);
                        row[(h + case) % old] = old + (h + case) % 7;
                        row.extend([old + 4 + h % 3, (case + h) % old].iter().take(case % 3));
                        row
                    })
                    .collect();
                let n = kept_after[0].len();
                let back: Vec<i64> = (0..hkv * n)
                    .map(|i| {
                        if (i + case) % 4 == 0 {
                            -(300 + i as i64)
                        } else {
                            0
                        }
                    })
                    .collect();
                let u = Unrotate {
                    back: &back,
                    inv_freq: &inv_freq,
                };
                for unrotate in [None, Some(&u)] {
                    let room = room.copy().unwrap();
                    let before = rows(&room, room_rows);
                    let kept = room.narrow(1, 0, old).unwrap();
                    let sources = [&kept, &window, &new];
                    let g = Gather {
                        sources: &sources,
                        kept_after: &kept_after,
                        dtype,
                    };
                    let fresh = g.run_padded(unrotate, room_rows).unwrap();
                    let changes = g.changes(unrotate, &room, old).unwrap().unwrap();
                    let saved = changes.current(&room).unwrap();
                    changes.write(&room).unwrap();
                    let what = format!("{dtype:?} case {case}");
                    assert_eq!(rows(&room, n), rows(&fresh, n), "{what}");
                    saved.write(&room).unwrap();
                    assert_eq!(rows(&room, room_rows), before, "{what}: undone");
                }
            }
        }
    }
}
