//! Vectors that are written once, whole, before anything reads them: allocated without
//! the zero fill a `vec![0; n]` would pay for (megabytes per call on hot paths, where the
//! fill is pure cost), then taken as initialized values once every element is written.

use std::mem::MaybeUninit;

/// `n` uninitialized values.
pub(crate) fn vec<T>(n: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialization, and the capacity is `n`.
    unsafe { v.set_len(n) };
    v
}

/// `v` as the values it holds.
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has `T`'s size and alignment; the caller vouches for the
    // contents; the allocation moves over whole (pointer, length, capacity).
    Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity())
}
