//! A projection `y = x W^T (+ b)` over a 2-D batch of rows, with an optional LoRA adapter
//! (Hu et al., 2021): `y += (alpha / r) * (x A^T) B^T`. The weight is dense (f32/f16/bf16)
//! or block-quantized in GGML's formats (Q8_0, Q4K) through candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

use std::sync::{Arc, OnceLock};

use super::{HeadScreen, Packed, WeightSource};
use crate::{Error, Result};

/// Weight formats a model can be quantized to after loading. Spelled `q8_0` and `q4k` on
/// command lines ([`FromStr`](std::str::FromStr)) and in config files (serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Quantization {
    /// 8-bit blocks of 32 with an f16 scale (8.5 bits per weight): near-lossless.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit k-quants in super-blocks of 256 (4.5 bits per weight). A projection whose
    /// input size is not a multiple of 256 falls back to Q8_0, as llama.cpp does.
    #[serde(rename = "q4k")]
    Q4K,
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Quantization::Q8_0, Quantization::Q4K]
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| format!("`{s}` is not a quantization (use q8_0 or q4k)"))
    }
}

impl Quantization {
    fn ggml(self) -> GgmlDType {
        match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
            Quantization::Q4K => GgmlDType::Q4K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4k",
        }
    }

    /// The GGML format a projection with input size `in_dim` gets: this one's, or Q8_0
    /// where the input does not fill whole blocks of it (as llama.cpp does), or none (left
    /// dense). One rule for quantizing at load time and for writing quantized checkpoints.
    pub fn format_for(self, in_dim: usize) -> Option<GgmlDType> {
        [self.ggml(), GgmlDType::Q8_0]
            .into_iter()
            .find(|f| in_dim.is_multiple_of(f.block_size()))
    }
}

/// The name of a GGML block format in checkpoints and logs (the formats this crate writes).
pub fn format_name(f: GgmlDType) -> Option<&'static str> {
    match f {
        GgmlDType::Q8_0 => Some("q8_0"),
        GgmlDType::Q4K => Some("q4k"),
        _ => None,
    }
}

/// The inverse of [`format_name`].
pub fn parse_format(name: &str) -> Option<GgmlDType> {
    [GgmlDType::Q8_0, GgmlDType::Q4K]
        .into_iter()
        .find(|&f| format_name(f) == Some(name))
}

/// A quantized layer given more rows than this (a prefill chunk) dequantizes its weight and
/// multiplies densely; fewer (decode steps) run on the blocks: Q8_0 on the CPU with our
/// kernel and f32 activations (the same product as the dense one), other formats and
/// devices with the GGML kernels, which round the activations to 8 bits too. So on a Q4K
/// or GPU model a prompt read in one chunk and the same prompt read token by token agree
/// to about 1%, not to float rounding.
pub const DENSE_ROWS: usize = 32;

/// A projection's sizes, named: `(in, out)` and `(out, in)` tuples both appeared between
/// neighbouring APIs. The weight is stored `[output, input]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub input: usize,
    pub output: usize,
}

impl Dims {
    pub fn new(input: usize, output: usize) -> Self {
        Self { input, output }
    }

    /// The weight's shape, `[output, input]`.
    pub fn weight_shape(self) -> (usize, usize) {
        (self.output, self.input)
    }
}

/// A low-rank update `scale * B A` of a weight `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// `alpha / rank`
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`; for a quantized layer, the quantized blocks instead (see `quant`).
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
    quant: Option<Quantized>,
    /// The weight in the AVX-512 kernel's panels, packed on first use ([`Linear::packed`]);
    /// emptied whenever the weight changes.
    packed: OnceLock<Option<Arc<Packed>>>,
    /// As an LM head, its Q8_0 screen for greedy picks ([`Linear::screen`]), built on first
    /// use; emptied whenever the weight changes.
    screen: OnceLock<Option<Arc<HeadScreen>>>,
}

impl Quantized {
    /// The blocks, when they are Q8_0 on the CPU.
    fn cpu_q8_0(&self) -> Option<&QTensor> {
        match &self.matmul {
            QMatMul::QTensor(t) if self.format == GgmlDType::Q8_0 && t.device().is_cpu() => Some(t),
            _ => None,
        }
    }
}

/// A quantized weight: the dense one is dropped (that is the memory saving) and `weight`
/// holds a 0-element placeholder of the original dtype.
#[derive(Debug, Clone)]
struct Quantized {
    matmul: QMatMul,
    format: GgmlDType,
    dims: Dims,
}

impl Linear {
    /// Loads `weight` (and `bias`) under `w`'s prefix: the block-quantized weight when the
    /// checkpoint stores one under that name, the dense one otherwise.
    pub fn load(w: &WeightSource, dims: Dims, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(w.get(dims.output, "bias")?)
        } else {
            None
        };
        if let Some(blocks) = w.quantized("weight", dims)? {
            let mut lin = Self::from_quantized(blocks, w.dtype())?;
            lin.bias = bias;
            return Ok(lin);
        }
        let weight = w.get(dims.weight_shape(), "weight")?;
        Ok(Self::from_weights(weight, bias))
    }

    /// A layer over stored GGML blocks `[out, in]`; `dtype` is the model's activation dtype.
    pub fn from_quantized(blocks: QTensor, dtype: DType) -> Result<Self> {
        let (out_dim, in_dim) = blocks.shape().dims2()?;
        let format = blocks.dtype();
        let device = blocks.device();
        Ok(Self {
            weight: Tensor::zeros(0, dtype, &device)?,
            bias: None,
            lora: None,
            quant: Some(Quantized {
                matmul: QMatMul::from_qtensor(blocks)?,
                format,
                dims: Dims::new(in_dim, out_dim),
            }),
            packed: OnceLock::new(),
            screen: OnceLock::new(),
        })
    }

    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quant: None,
            packed: OnceLock::new(),
            screen: OnceLock::new(),
        }
    }

    /// The dense weight `[out, in]` (dequantized, in f32, for a quantized layer).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.quant {
            None => Ok(self.weight.clone()),
            Some(q) => Ok(match &q.matmul {
                QMatMul::QTensor(t) => t.dequantize(self.weight.device())?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            }),
        }
    }

    /// The dense f32 weight and bias when that is all the layer is (no blocks, no unmerged
    /// adapter): what the fused decode step reads directly.
    pub(crate) fn plain_f32(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        let plain = self.quant.is_none()
            && self.lora.is_none()
            && self.weight.dtype() == DType::F32
            && self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
        plain.then_some((&self.weight, self.bias.as_ref()))
    }

    /// The Q8_0 blocks and dense bias of a Q8_0 layer without an unmerged adapter: what the
    /// fused decode step reads directly.
    pub(crate) fn plain_q8_0(&self) -> Option<(std::sync::Arc<QTensor>, Option<&Tensor>)> {
        let q = self.quant.as_ref()?;
        let QMatMul::QTensor(blocks) = &q.matmul else {
            return None;
        };
        let plain = q.format == GgmlDType::Q8_0
            && self.lora.is_none()
            && self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
        plain.then(|| (blocks.clone(), self.bias.as_ref()))
    }

    /// The weight packed for the AVX-512 kernel (`super::packed`), built on first use: a
    /// dense f32 weight no gradient flows through or Q8_0 blocks, on the CPU of an AVX-512
    /// machine; `None` otherwise. Every CPU product with the weight then runs that kernel,
    /// whatever the number of rows (see `super::packed` for why).
    pub fn packed(&self) -> Option<&Arc<Packed>> {
        self.packed
            .get_or_init(|| {
                if !super::gemm::available() {
                    return None;
                }
                match &self.quant {
                    None => Packed::from_tensor(&self.weight),
                    Some(q) => q.cpu_q8_0().and_then(Packed::from_q8_0),
                }
                .map(Arc::new)
            })
            .as_ref()
    }

    /// Where the weight a CPU decode step reads lives, as address ranges: the packed
    /// panels where the CPU takes them ([`packed`](Self::packed), packing now if not yet),
    /// else the CPU tensor's storage or Q8_0 blocks; none on other devices or for other
    /// formats. To place the memory ([`crate::hugepages`]).
    pub fn memory(&self) -> Vec<std::ops::Range<usize>> {
        if let Some(p) = self.packed() {
            return p.memory().into_iter().map(crate::hugepages::span).collect();
        }
        if let Some(q) = &self.quant {
            return q
                .cpu_q8_0()
                .and_then(|t| match t.data().ok()? {
                    // On the CPU the blocks are borrowed: their own address.
                    std::borrow::Cow::Borrowed(bytes) => Some(crate::hugepages::span(bytes)),
                    std::borrow::Cow::Owned(_) => None,
                })
                .into_iter()
                .collect();
        }
        super::with_f32_values(&self.weight, |v| {
            vec![crate::hugepages::span(super::f32_bytes(v))]
        })
        .unwrap_or_default()
    }

    /// The layer as an LM head's screen for greedy picks ([`super::screen`]), built on first
    /// use: a dense f32 weight with no bias or adapter on a CPU that runs the packed kernel
    /// (whose order of sums the screen's exact values follow) and has FMA; `None` otherwise.
    pub fn screen(&self) -> Option<&Arc<HeadScreen>> {
        let (w, bias) = self.plain_f32()?;
        if bias.is_some() || self.packed().is_none() || !super::screen::has_fma() {
            return None;
        }
        self.screen
            .get_or_init(|| {
                let (n, k) = w.dims2().ok()?;
                super::with_f32_values(w, |v| HeadScreen::new(v, (n, k)))?.map(Arc::new)
            })
            .as_ref()
    }

    /// The packed weight when the layer is that product alone (no bias, no adapter): what
    /// a fused consumer of the product (`gemm::gate_up_silu`) may multiply by itself.
    pub(crate) fn packed_alone(&self) -> Option<&Packed> {
        let alone = self.bias.is_none() && self.lora.is_none();
        alone.then(|| self.packed()).flatten().map(|p| p.as_ref())
    }

    /// The GGML format of a quantized layer.
    pub fn quantization(&self) -> Option<GgmlDType> {
        self.quant.as_ref().map(|q| q.format)
    }

    /// Replaces the dense weight by its `q` blocks (or Q8_0 where the input size does not
    /// fit `q`'s blocks; left dense when it fits neither). Adapters must be merged first.
    /// A layer that already holds blocks (a quantized checkpoint) keeps them.
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        if self.quant.is_some() {
            return Ok(());
        }
        if self.lora.is_some() {
            return Err(Error::Invalid(
                "merge LoRA adapters before quantizing".into(),
            ));
        }
        let dims = self.dims();
        let Some(format) = q.format_for(dims.input) else {
            return Ok(());
        };
        let dense = self.weight.to_dtype(DType::F32)?;
        let blocks = QTensor::quantize(&dense, format)?;
        self.quant = Some(Quantized {
            matmul: QMatMul::from_qtensor(blocks)?,
            format,
            dims,
        });
        self.weight = Tensor::zeros(0, self.weight.dtype(), self.weight.device())?;
        self.packed = OnceLock::new();
        self.screen = OnceLock::new();
        Ok(())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn dims(&self) -> Dims {
        if let Some(q) = &self.quant {
            return q.dims;
        }
        let d = self.weight.dims();
        Dims::new(d[1], d[0])
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) {
        self.lora = lora;
    }

    /// Folds the adapter into the weight (`W += scale * B A`, in the weight's dtype) and
    /// drops it: the merged layer computes the same function with no extra cost.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.quant.is_some() && self.lora.is_some() {
            return Err(Error::Invalid(
                "cannot merge an adapter into a quantized layer".into(),
            ));
        }
        if let Some(l) = self.lora.take() {
            let delta = (l.b.matmul(&l.a)? * l.scale)?;
            let merged = (self.weight.to_dtype(delta.dtype())? + delta)?;
            self.weight = merged.to_dtype(self.weight.dtype())?;
            self.packed = OnceLock::new();
            self.screen = OnceLock::new();
        }
        Ok(())
    }
}

impl Module for Linear {
    /// `x`: `[rows, in]` -> `[rows, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The fast path has no backward pass: use it only when no gradient flows through.
        if let Some(mut ys) = Self::packed_forward(&[self], x)? {
            return Ok(ys.pop().expect("one product per layer"));
        }
        let y = if let Some(q) = &self.quant {
            if x.dim(0)? > DENSE_ROWS {
                // Prefill chunks: candle's GGML kernels run one dot product per row and
                // column (measured 4x slower than dense f32 on a 3.8K-token prefill);
                // dequantizing once per call and using gemm costs a fraction of the product
                // (Q8_0 on the CPU decoded on all threads, see `matvec_q8::dequantize`).
                // (With AVX-512, Q8_0 blocks are packed and never get here.)
                let xf = x.to_dtype(DType::F32)?;
                let y = match q.cpu_q8_0() {
                    Some(blocks) => {
                        super::matvec_q8::dequantize(blocks).and_then(|w| Ok(xf.matmul(&w.t()?)?))
                    }
                    None => self.weight().and_then(|w| Ok(xf.matmul(&w.t()?)?)),
                }
                .map_err(candle_core::Error::wrap)?;
                y.to_dtype(x.dtype())?
            } else if let (Some(blocks), false) = (q.cpu_q8_0(), x.track_op()) {
                // Q8_0 on the CPU: the fused decode step's kernel, f32 activations, so a
                // decode step computes the same product whichever path runs it.
                super::matvec_q8::matmul(x, blocks)
                    .map_err(candle_core::Error::wrap)?
                    .to_dtype(x.dtype())?
            } else {
                // GGML kernels take f32 activations (and quantize them per block themselves).
                q.matmul
                    .forward(&x.to_dtype(DType::F32)?)?
                    .to_dtype(x.dtype())?
            }
        } else if !x.track_op() && super::matvec::applies(x, &self.weight) {
            super::matvec::matvec(x, &self.weight)?
        } else if x.track_op() && !self.weight.track_op() {
            frozen_matmul(x, &self.weight)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        self.finish(x, y)
    }
}

impl Linear {
    /// Several layers applied to the same input (q, k and v; gate and up): when all of
    /// them have packed weights, one call of the kernel for all (the input packed once, all
    /// weights' panels shared out together); each layer's `forward` otherwise. The same
    /// values as `layers.map(|l| l.forward(x))` either way.
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match Self::packed_forward(layers, x)? {
            Some(ys) => Ok(ys),
            None => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// `layers`' forwards through their packed weights, when every one has them and `x`
    /// can take the kernel (rows on the CPU, no gradient; f32 for the product).
    fn packed_forward(layers: &[&Linear], x: &Tensor) -> candle_core::Result<Option<Vec<Tensor>>> {
        let eligible = x.device().is_cpu() && x.rank() == 2 && !x.track_op();
        let packed: Option<Vec<&Packed>> = eligible
            .then(|| {
                layers
                    .iter()
                    .map(|l| l.packed().map(|p| p.as_ref()))
                    .collect()
            })
            .flatten();
        let Some(packed) = packed else {
            return Ok(None);
        };
        // Packed weights exist only on AVX-512 CPUs, and `xf` is f32 rows on the CPU without
        // a gradient: what `matmul_packed` takes.
        let xf = x.to_dtype(DType::F32)?;
        let ys = super::gemm::matmul_packed(&xf, &packed).map_err(candle_core::Error::wrap)?;
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| l.finish(x, y.to_dtype(x.dtype())?))
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }

    /// `y` (the product) plus the bias and the adapter's update.
    fn finish(&self, x: &Tensor, mut y: Tensor) -> candle_core::Result<Tensor> {
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xa = x.to_dtype(l.a.dtype())?.matmul(&l.a.t()?)?;
            let delta = (xa.matmul(&l.b.t()?)? * l.scale)?;
            y = (y + delta.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }
}

/// `x W^T` for a frozen `W` (not a variable) when `x` carries a gradient (training).
///
/// candle's matmul backward computes the gradient of both operands; for a frozen weight
/// that is a wasted `[in, rows] x [rows, out]` product per projection, a third of the
/// matmul work of a training step (measured on SmolLM2-135M: the backward of a 2 x 256
/// token step fell from about 11 s to 7 s on 2 cores). This op passes the gradient to `x`
/// only. CPU f32 only; other cases take the plain matmul.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.rank() == 2)
    {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?
        .apply_op1(FrozenMatmul { weight: w.clone() })
}

struct FrozenMatmul {
    /// `[out, in]`
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("frozen-matmul: f32 input expected")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: contiguous input expected")
        };
        let x = Tensor::from_slice(&data[a..b], l.shape(), &candle_core::Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_passes_the_same_gradient_to_its_input() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let run = |frozen: bool| {
            let y = if frozen {
                frozen_matmul(x.as_tensor(), &w).unwrap()
            } else {
                x.as_tensor().matmul(&w.t().unwrap()).unwrap()
            };
            let loss = (y.clone() * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap().get(&x).unwrap().clone();
            (y, g)
        };
        let ((y1, g1), (y2, g2)) = (run(true), run(false));
        let diff = crate::testing::max_abs_diff;
        assert!(diff(&y1, &y2) < 1e-5 && diff(&g1, &g2) < 1e-5);
        // A strided (transposed) input is made contiguous first.
        let xt = x
            .as_tensor()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt.is_contiguous());
        assert!(diff(&frozen_matmul(&xt, &w).unwrap(), &y2) < 1e-5);
    }

    #[test]
    fn forward_many_equals_each_forward() {
        let dev = Device::Cpu;
        let k = 64;
        let dense = Linear::from_weights(
            Tensor::randn(0f32, 1.0, (40, k), &dev).unwrap(),
            Some(Tensor::randn(0f32, 1.0, 40, &dev).unwrap()),
        );
        let mut adapted =
            Linear::from_weights(Tensor::randn(0f32, 1.0, (24, k), &dev).unwrap(), None);
        adapted.set_lora(Some(LoraAdapter {
            a: Tensor::randn(0f32, 1.0, (4, k), &dev).unwrap(),
            b: Tensor::randn(0f32, 1.0, (24, 4), &dev).unwrap(),
            scale: 0.5,
        }));
        let mut quantized =
            Linear::from_weights(Tensor::randn(0f32, 1.0, (33, k), &dev).unwrap(), None);
        quantized.quantize(Quantization::Q8_0).unwrap();
        let layers = [&dense, &adapted, &quantized];
        // Prompt-sized inputs (the kernel, where the CPU has AVX-512) and decode-sized ones.
        for rows in [super::super::gemm::MIN_ROWS + 7, 5] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let all = Linear::forward_many(&layers, &x).unwrap();
            for (l, y) in layers.iter().zip(&all) {
                let d = crate::testing::max_abs_diff(y, &l.forward(&x).unwrap());
                assert_eq!(d, 0.0, "{rows} rows");
            }
        }
    }

    #[test]
    fn quantized_prefill_is_the_dense_product_with_the_dequantized_weight() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &dev).unwrap();
        let mut lin = Linear::from_weights(w, None);
        lin.quantize(Quantization::Q8_0).unwrap();
        let dequantized = lin.weight().unwrap();
        let diff = crate::testing::max_abs_diff;
        let x = Tensor::randn(0f32, 1.0, (DENSE_ROWS + 5, 64), &dev).unwrap();
        let reference = x.matmul(&dequantized.t().unwrap()).unwrap();
        // Many rows: exactly the dense product with the dequantized weight.
        assert!(diff(&lin.forward(&x).unwrap(), &reference) < 1e-4);
        // Few rows (a decode step: the packed kernel, or the Q8_0 decode kernel without
        // AVX-512): the same product with f32 activations, in another order.
        let few = x.narrow(0, 0, 4).unwrap();
        let d = diff(
            &lin.forward(&few).unwrap(),
            &reference.narrow(0, 0, 4).unwrap(),
        );
        assert!(d < 1e-4, "{d}");
    }
}
