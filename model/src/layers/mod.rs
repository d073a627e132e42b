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
pub mod vexp;

pub use linear::{format_name, parse_format, Dims, Linear, LoraAdapter, Quantization};
pub use mlp::Mlp;
pub(crate) use norm::rms_norm_rows;
pub use norm::RmsNorm;
pub use packed::Packed;
pub use quantized::{QuantizedTensors, WeightSource};
pub use rope::Rope;

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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

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
