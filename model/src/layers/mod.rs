//! Building blocks shared by every architecture: the families differ by config and
//! weight names, never by copied layer code.

pub mod gemm;
pub(crate) mod host;
mod linear;
pub mod matvec;
pub(crate) mod matvec_q8;
mod mlp;
mod norm;
mod packed;
mod quantized;
pub(crate) mod rope;
pub(crate) mod screen;
pub mod vexp;

pub use linear::{format_name, parse_format, Dims, Linear, LoraAdapter, Quantization};
pub use mlp::Mlp;
pub(crate) use norm::rms_norm_rows;
pub use norm::RmsNorm;
pub use packed::Packed;
pub use quantized::{QuantizedTensors, WeightSource};
pub use rope::Rope;
pub use screen::HeadScreen;

/// f32s viewed as their bytes (to prefetch them, or to place their memory).
pub(crate) fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32s have no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// `f` on the values of a contiguous f32 CPU tensor, borrowed from its storage; `None` for
/// any other tensor.
pub(crate) fn with_f32_values<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// A decoder block's projections, with the sub-block each lives in (`self_attn`, `mlp`):
/// what LoRA adapters target and quantization converts.
pub const PROJECTIONS: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// `t` in f32. f16 rows on the CPU (the caches' `--kv-dtype f16`) are widened eight at a
/// time with F16C where the CPU has it (`half`'s slice conversion), where candle's
/// `to_dtype` converts one element at a time: a prefill piece widens its candidate keys and
/// values on every layer (~0.25 ms for 690 rows of 3 x 64 that way). See [`convert`].
pub(crate) fn to_f32(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    convert(t, candle_core::DType::F32)
}

/// `t` in `dtype`: between f16 and f32 on the CPU through `half`'s slice conversions (F16C
/// where the CPU has it, eight values at a time); anything else, and anything a gradient
/// flows through, through candle's `to_dtype` (the same values, one at a time).
pub(crate) fn convert(
    t: &candle_core::Tensor,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{CpuStorage, DType, Storage, Tensor};
    use half::slice::HalfFloatSliceExt;
    let pair = (t.dtype(), dtype);
    if !matches!(pair, (DType::F16, DType::F32) | (DType::F32, DType::F16))
        || !t.device().is_cpu()
        || t.track_op()
    {
        return t.to_dtype(dtype);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        drop(storage);
        return t.to_dtype(dtype);
    };
    let out = match cpu {
        CpuStorage::F16(data) => {
            let mut out = vec![0f32; b - a];
            data[a..b].convert_to_f32_slice(&mut out);
            Tensor::from_vec(out, t.shape(), t.device())
        }
        CpuStorage::F32(data) => {
            let mut out = vec![half::f16::ZERO; b - a];
            out.convert_from_f32_slice(&data[a..b]);
            Tensor::from_vec(out, t.shape(), t.device())
        }
        _ => unreachable!("checked: f16 or f32"),
    };
    drop(storage);
    out
}

/// `[old[:, skip..], new]` along dim 1 in `dtype`, for caches' rows (`[heads, rows, d]`):
/// what `cat([convert(old), new]).narrow(..)` then `convert` give, written in one pass on the
/// CPU, reading `old` where it lies (a cache is often a view into a buffer with spare rows)
/// instead of making it contiguous, widening it, concatenating and narrowing it back. The
/// rows dropped are `old`'s first `skip`, then `new`'s first `skip - old rows`. `None`
/// (nothing done) unless both are f16 or f32 CPU tensors without gradients, `new` f32,
/// `dtype` f16 or f32 and each of `old`'s heads a contiguous run of rows.
pub(crate) fn join_rows(
    old: &candle_core::Tensor,
    new: &candle_core::Tensor,
    skip: usize,
    dtype: candle_core::DType,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    use candle_core::{CpuStorage, DType, Storage, Tensor};
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    let wanted = |t: &Tensor| t.device().is_cpu() && !t.track_op();
    if !wanted(old)
        || !wanted(new)
        || new.dtype() != DType::F32
        || !matches!(old.dtype(), DType::F16 | DType::F32)
        || !matches!(dtype, DType::F16 | DType::F32)
    {
        return Ok(None);
    }
    let (h, c, d) = old.dims3()?;
    let (nh, t, nd) = new.dims3()?;
    let stride = old.stride();
    if (nh, nd) != (h, d) || (c > 1 && stride[1] != d) || (d > 1 && stride[2] != 1) {
        return Ok(None);
    }
    let new = new.contiguous()?;
    let (old_skip, new_skip) = (skip.min(c), skip.saturating_sub(c).min(t));
    let rows = (c - old_skip) + (t - new_skip);
    if rows == 0 {
        return Ok(Some(Tensor::zeros((h, 0, d), dtype, new.device())?));
    }
    let (os, ol) = old.storage_and_layout();
    let (ns, nl) = new.storage_and_layout();
    let (Storage::Cpu(o), Storage::Cpu(CpuStorage::F32(n))) = (&*os, &*ns) else {
        return Ok(None);
    };
    let n = &n[nl.start_offset()..];
    // Head `hh`'s kept rows of `old`, as an offset into its storage.
    let old_at = |hh: usize| ol.start_offset() + hh * stride[0] + old_skip * d;
    let old_len = (c - old_skip) * d;
    let new_head = |hh: usize| &n[(hh * t + new_skip) * d..(hh + 1) * t * d];
    let old_rows = |hh: usize| old_at(hh)..old_at(hh) + old_len;
    // The output's shape, each head's values from `old`, the device.
    let layout = ((h, rows, d), old_len, new.device());
    let out = match (o, dtype) {
        (CpuStorage::F16(src), DType::F32) => join_heads(
            layout,
            |hh, a: &mut [f32]| src[old_rows(hh)].convert_to_f32_slice(a),
            |hh, b: &mut [f32]| b.copy_from_slice(new_head(hh)),
        )?,
        (CpuStorage::F32(src), DType::F32) => join_heads(
            layout,
            |hh, a: &mut [f32]| a.copy_from_slice(&src[old_rows(hh)]),
            |hh, b: &mut [f32]| b.copy_from_slice(new_head(hh)),
        )?,
        (CpuStorage::F16(src), DType::F16) => join_heads(
            layout,
            |hh, a: &mut [f16]| a.copy_from_slice(&src[old_rows(hh)]),
            |hh, b: &mut [f16]| b.convert_from_f32_slice(new_head(hh)),
        )?,
        (CpuStorage::F32(src), DType::F16) => join_heads(
            layout,
            |hh, a: &mut [f16]| a.convert_from_f32_slice(&src[old_rows(hh)]),
            |hh, b: &mut [f16]| b.convert_from_f32_slice(new_head(hh)),
        )?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// A `shape` (`[heads, rows, d]`) tensor on `device` whose every head has its first
/// `old_len` values written by `of_old` and the rest by `of_new` (given the head):
/// [`join_rows`]' layout for every pair of dtypes.
fn join_heads<T: candle_core::WithDType>(
    (shape, old_len, device): ((usize, usize, usize), usize, &candle_core::Device),
    of_old: impl Fn(usize, &mut [T]),
    of_new: impl Fn(usize, &mut [T]),
) -> candle_core::Result<candle_core::Tensor> {
    let (heads, rows, d) = shape;
    let per_head = rows * d;
    let mut out = vec![T::zero(); heads * per_head];
    for (hh, dst) in out.chunks_mut(per_head).enumerate() {
        let (a, b) = dst.split_at_mut(old_len);
        of_old(hh, a);
        of_new(hh, b);
    }
    candle_core::Tensor::from_vec(out, shape, device)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn join_rows_is_cat_narrow_convert() {
        let buffer = Tensor::randn(0f32, 2.0, (3, 12, 8), &Device::Cpu).unwrap();
        let new = Tensor::randn(0f32, 2.0, (3, 4, 8), &Device::Cpu).unwrap();
        for old_dtype in [DType::F16, DType::F32] {
            let buffer = buffer.to_dtype(old_dtype).unwrap();
            // Whole, and a view into spare rows (rows 2..9 of 12), as caches are.
            for old in [buffer.clone(), buffer.narrow(1, 2, 7).unwrap()] {
                let c = old.dim(1).unwrap();
                for dtype in [DType::F16, DType::F32] {
                    for skip in [0, 1, c - 1, c, c + 2, c + 4] {
                        let all =
                            Tensor::cat(&[&old.to_dtype(DType::F32).unwrap(), &new], 1).unwrap();
                        let want = all
                            .narrow(1, skip, c + 4 - skip)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let got = super::join_rows(&old, &new, skip, dtype)
                            .unwrap()
                            .expect("f16/f32 rows on the CPU");
                        assert_eq!(got.dtype(), dtype);
                        assert_eq!(
                            got.dims(),
                            want.dims(),
                            "{old_dtype:?} {dtype:?} skip {skip}"
                        );
                        let f = |t: &Tensor| {
                            t.to_dtype(DType::F32)
                                .unwrap()
                                .flatten_all()
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap()
                        };
                        assert_eq!(f(&got), f(&want), "{old_dtype:?} {dtype:?} skip {skip}");
                    }
                }
            }
        }
        // Not for it: bf16, or a view whose rows are not contiguous.
        let bf = buffer.to_dtype(DType::BF16).unwrap();
        assert!(super::join_rows(&bf, &new, 0, DType::F32)
            .unwrap()
            .is_none());
        let strided = buffer.transpose(1, 2).unwrap();
        let new_t = Tensor::randn(0f32, 1.0, (3, 2, 12), &Device::Cpu).unwrap();
        assert!(super::join_rows(&strided, &new_t, 0, DType::F32)
            .unwrap()
            .is_none());
    }

    #[test]
    fn to_f32_widens_like_candle() {
        let x = Tensor::randn(0f32, 3.0, (3, 37, 8), &Device::Cpu).unwrap();
        for t in [
            x.to_dtype(DType::F16).unwrap(),
            x.clone(),
            x.to_dtype(DType::BF16).unwrap(),
        ] {
            // Strided too: a transposed view.
            for t in [t.clone(), t.transpose(1, 2).unwrap()] {
                let ours = super::to_f32(&t).unwrap();
                let candle = t.to_dtype(DType::F32).unwrap();
                assert_eq!(ours.dims(), candle.dims());
                let (a, b) = (
                    ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    candle.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn narrowing_to_f16_rounds_like_candle() {
        let x = Tensor::randn(0f32, 3.0, (3, 37, 8), &Device::Cpu).unwrap();
        // Values that round at ties, overflow, underflow to subnormals and zero.
        let edges = Tensor::new(
            &[
                1.0f32 + 1.0 / 2048.0,
                65520.0,
                1e6,
                -1e6,
                1e-6,
                1e-9,
                -0.0,
                f32::INFINITY,
            ],
            &Device::Cpu,
        )
        .unwrap();
        for t in [x.clone(), x.transpose(1, 2).unwrap(), edges] {
            let ours = super::convert(&t, DType::F16).unwrap();
            let candle = t.to_dtype(DType::F16).unwrap();
            assert_eq!(ours.dtype(), DType::F16);
            let bits = |t: &Tensor| -> Vec<u16> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|h| h.to_bits())
                    .collect()
            };
            assert_eq!(bits(&ours), bits(&candle));
        }
    }
}
