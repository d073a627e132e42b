//! Cached key and value rows as states store them (f32 or f16), and the small slice
//! helpers the decode kernels share; a leaf under [`super::mixing`] and [`super::attend`].

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

/// Where new cache rows go, in the dtype the state stores them in.
pub(crate) enum RowsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

impl RowsMut<'_> {
    pub(in crate::decode) fn len(&self) -> usize {
        match self {
            RowsMut::F32(x) => x.len(),
            RowsMut::F16(x) => x.len(),
        }
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
