//! Cached key and value rows as states store them (f32 or f16), and the small slice
//! helpers the decode kernels share; a leaf under [`super::mixing`] and [`super::attend`].

use std::mem::MaybeUninit;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Cached key or value rows as a state stores them (`KvCache::stored_as`).
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    pub const EMPTY: Rows<'static> = Rows::F32(&[]);

    pub(in crate::decode) fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::F16(x) => x.len(),
        }
    }

    /// The rows in f32: borrowed as they are, or widened into `buf`.
    pub(in crate::decode) fn widened<'s>(self, buf: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            Rows::F32(x) => x,
            Rows::F16(x) => {
                let out = sized(buf, x.len());
                x.convert_to_f32_slice(out);
                out
            }
        }
    }
}

/// Where new cache rows go, in the dtype the state stores them in: not yet initialized
/// (the step writes every element once, so it never zero-fills them first).
pub(crate) enum RowsMut<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    F16(&'a mut [MaybeUninit<f16>]),
}

/// Writes `src` into the start of `dst` (which must be as long).
pub(in crate::decode) fn write_copy<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: equal lengths, and a `&mut` cannot overlap a `&`; writing into
    // `MaybeUninit` memory needs no initialized contents.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), src.len()) };
}

/// Converts `src` into `dst` (as long) a stack block at a time, with `half`'s vectorized
/// slice conversions.
pub(in crate::decode) fn write_converted<S: Copy, D: Copy + Default>(
    dst: &mut [MaybeUninit<D>],
    src: &[S],
    convert: impl Fn(&[S], &mut [D]),
) {
    assert_eq!(dst.len(), src.len());
    let mut block = [D::default(); 64];
    for (d, s) in dst.chunks_mut(64).zip(src.chunks(64)) {
        let b = &mut block[..s.len()];
        convert(s, b);
        write_copy(d, b);
    }
}

/// `buf` resized to `n` (contents unspecified).
pub(in crate::decode) fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

/// In-place softmax with the maximum subtracted first.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}
