//! Weights packed once, at first use, into the AVX-512 kernel's panels ([`super::gemm`]):
//! every product with a packed weight, a decode step of one sequence as much as a 512-token
//! prompt chunk, runs that one kernel.
//!
//! Why once and not per call: packing (a transpose of the weight) cost as much as a small
//! batch's whole product (kernels bench: 8 rows by a 576 x 576 weight, 147 µs packed per
//! call against 66 µs for the AVX2 decode kernel), which is why decode steps of up to 32
//! sequences ran on that AVX2 kernel, at half an AVX-512 core's peak, although a batch of 32
//! is compute-bound. Read straight from packed panels, the kernel streams a weight once for
//! one row and runs at its full rate for many.
//!
//! Why one kernel for every row count: it sums each output over `k` in one fixed order (a
//! chain of FMAs per k-block of [`KC`](super::gemm::KC), the blocks added in order),
//! whatever the number of rows and whichever rows share a tile. So a sequence's logits do not
//! depend on how many sequences share its decode step, and a token gets the same product
//! whether a prompt chunk or a decode step reads it.
//!
//! Layout: panels of [`NR`] output columns, each `[k][NR]` k-major, one after another, 64-byte
//! aligned, columns past `n` zero: a k-block of a panel is one contiguous run. Q8_0 weights
//! stay 8-bit (`[panels][k][NR]` signed bytes and `[panels][k / 32][NR]` f32 scales, 9 bits a
//! weight) and are decoded into an f32 panel a k-block at a time, to the same `d * q` as the
//! dequantized weight. A dense f32 weight is held twice (its tensor and the packed copy):
//! the tensor stays the reference, the export's and the other devices' copy.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use half::f16;
use rayon::prelude::*;

use super::matvec_q8::{BLOCK, BLOCK_BYTES};

/// Output columns per panel: two 16-lane registers.
pub const NR: usize = 32;
/// Inputs per k-block (a multiple of Q8_0's block of 32).
pub const KC: usize = 256;

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One 64-byte line of a panel.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub [f32; 16]);

/// `lines` as the f32s they are.
fn floats(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: `Line` is 16 plain f32s, with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
}

/// A panel block as the kernel reads it: `KC` x `NR` values, k-major, 64-byte aligned
/// (scratch for one packed per call, or decoded from Q8_0).
pub(super) struct Panel(Vec<Line>);

impl Panel {
    pub(super) fn new() -> Self {
        Panel(vec![Line([0.0; 16]); KC * NR / 16])
    }

    pub(super) fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    pub(super) fn values(&mut self) -> &mut [f32] {
        floats(&mut self.0)
    }
}

/// A weight `[n, k]` in the kernel's panels.
pub struct Packed {
    n: usize,
    k: usize,
    data: Data,
}

enum Data {
    /// `[panels][k][NR]` values.
    F32(Vec<Line>),
    /// `q`: `[panels][k][NR]`; `d`: `[panels][k / BLOCK][NR]`.
    Q8_0 { q: Vec<i8>, d: Vec<f32> },
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.data {
            Data::F32(_) => "f32",
            Data::Q8_0 { .. } => "q8_0",
        };
        write!(f, "Packed({format}, [{}, {}])", self.n, self.k)
    }
}

impl Packed {
    /// A dense f32 CPU weight `[n, k]`; `None` for anything else (or a weight a gradient
    /// flows through: it may change, and the kernel has no backward pass).
    pub fn from_tensor(w: &Tensor) -> Option<Self> {
        if w.dtype() != DType::F32 || !w.device().is_cpu() || w.track_op() {
            return None;
        }
        let (n, k) = w.dims2().ok()?;
        super::with_f32_values(w, |v| Self::from_f32(v, (n, k)))
    }

    /// Q8_0 blocks `[n, k]` on the CPU; `None` for other formats or devices.
    pub fn from_q8_0(w: &QTensor) -> Option<Self> {
        let (n, k) = w.shape().dims2().ok()?;
        if w.dtype() != GgmlDType::Q8_0 || !w.device().is_cpu() || !k.is_multiple_of(BLOCK) {
            return None;
        }
        Some(Self::from_q8_0_bytes(&w.data().ok()?, (n, k)))
    }

    /// `w`: `[n, k]` row-major.
    pub fn from_f32(w: &[f32], (n, k): (usize, usize)) -> Self {
        assert!(w.len() >= n * k, "a weight of {n} rows of {k}");
        Self::f32_panels((n, k), |p, cols, dst| {
            for c in 0..cols {
                let row = &w[(p * NR + c) * k..][..k];
                for (kk, &x) in row.iter().enumerate() {
                    dst[kk * NR + c] = x;
                }
            }
        })
    }

    /// `w^T`: `[k, n]` row-major (attention's values, the right operand of `p v`).
    pub fn from_f32_t(wt: &[f32], (n, k): (usize, usize)) -> Self {
        assert!(wt.len() >= n * k, "a weight of {n} rows of {k}, transposed");
        Self::f32_panels((n, k), |p, cols, dst| {
            for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
                d[..cols].copy_from_slice(&wt[kk * n + p * NR..][..cols]);
            }
        })
    }

    /// f32 panels of an `[n, k]` weight, each filled by `fill(panel, its columns, values)`
    /// (`k * NR` values, k-major, zero past the columns), the panels in parallel.
    fn f32_panels((n, k): (usize, usize), fill: impl Fn(usize, usize, &mut [f32]) + Sync) -> Self {
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0.0; 16]); panels * k * NR / 16];
        floats(&mut lines)
            .par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(p, dst)| fill(p, NR.min(n - p * NR), dst));
        Self {
            n,
            k,
            data: Data::F32(lines),
        }
    }

    /// `w`: GGML Q8_0 bytes of `[n, k]` (`k` a multiple of 32): per row `k / 32` blocks of
    /// an f16 scale and 32 signed bytes.
    pub fn from_q8_0_bytes(w: &[u8], (n, k): (usize, usize)) -> Self {
        let row_bytes = k / BLOCK * BLOCK_BYTES;
        assert!(k.is_multiple_of(BLOCK) && w.len() >= n * row_bytes);
        let panels = n.div_ceil(NR);
        let mut q = vec![0i8; panels * k * NR];
        let mut d = vec![0f32; panels * k / BLOCK * NR];
        q.par_chunks_mut((k * NR).max(1))
            .zip(d.par_chunks_mut((k / BLOCK * NR).max(1)))
            .enumerate()
            .for_each(|(p, (q, d))| {
                for c in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + c) * row_bytes..][..row_bytes];
                    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        d[b * NR + c] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                        for (i, &byte) in block[2..].iter().enumerate() {
                            q[(b * BLOCK + i) * NR + c] = byte as i8;
                        }
                    }
                }
            });
        Self {
            n,
            k,
            data: Data::Q8_0 { q, d },
        }
    }

    /// Output columns `n` and inputs `k`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the packed copy holds.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(lines) => std::mem::size_of_val(lines.as_slice()),
            Data::Q8_0 { q, d } => q.len() + std::mem::size_of_val(d.as_slice()),
        }
    }

    /// The memory the packed copy lives in (f32 panels; Q8_0's bytes and scales), to place
    /// it ([`crate::hugepages`]).
    pub fn memory(&self) -> Vec<&[u8]> {
        match &self.data {
            Data::F32(_) => vec![self.all_bytes()],
            Data::Q8_0 { d, .. } => vec![self.all_bytes(), super::f32_bytes(d)],
        }
    }

    /// Panels of [`NR`] columns.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Every panel's bytes in order (to prefetch: a band of panels is a piece of it), f32
    /// lines or Q8_0's signed bytes.
    pub(crate) fn all_bytes(&self) -> &[u8] {
        match &self.data {
            // SAFETY: plain f32s viewed as their bytes.
            Data::F32(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr().cast(), std::mem::size_of_val(&lines[..]))
            },
            // SAFETY: i8s viewed as bytes.
            Data::Q8_0 { q, .. } => unsafe {
                std::slice::from_raw_parts(q.as_ptr().cast(), q.len())
            },
        }
    }

    /// The bytes panel `p`'s k-block from `k0` is read from (to prefetch): f32 lines, or
    /// Q8_0's signed bytes (their scales are a panel's few lines, read every block).
    pub(crate) fn block_bytes(&self, p: usize, k0: usize) -> &[u8] {
        let kc = KC.min(self.k.saturating_sub(k0));
        if p >= self.panels() || kc == 0 {
            return &[];
        }
        // Values to bytes: 4 per f32, 1 per Q8_0 quant.
        let size = match &self.data {
            Data::F32(_) => 4,
            Data::Q8_0 { .. } => 1,
        };
        let at = (p * self.k + k0) * NR;
        &self.all_bytes()[at * size..(at + kc * NR) * size]
    }

    /// Panel `p`'s inputs `k0..k0 + kc` as the kernel reads them (`kc * NR` values,
    /// k-major, 64-byte aligned): in place for f32, decoded into `scratch` for Q8_0.
    pub(super) fn block(&self, p: usize, k0: usize, kc: usize, scratch: &mut Panel) -> *const f32 {
        let k = self.k;
        assert!(p < self.panels() && k0 + kc <= k && kc <= KC);
        match &self.data {
            Data::F32(lines) => {
                // SAFETY: in bounds (asserted above); `(p * k + k0) * NR` is a multiple of
                // 16, so the pointer is at a line's start.
                unsafe { lines.as_ptr().cast::<f32>().add((p * k + k0) * NR) }
            }
            Data::Q8_0 { .. } => {
                let (q, d) = self.q8_block(p, k0, kc).expect("a Q8_0 weight");
                let out = scratch.values();
                #[cfg(target_arch = "x86_64")]
                if available() {
                    // SAFETY: AVX-512F is available; `q` holds `kc` inputs of NR, `d` every
                    // block of the panel, `out` KC * NR values.
                    unsafe { avx512::decode(q, d, k0, out) };
                    return scratch.as_ptr();
                }
                decode_reference(q, d, k0, out);
                scratch.as_ptr()
            }
        }
    }

    /// A Q8_0 weight's panel `p`, inputs `k0..k0 + kc`, as stored: `kc * NR` signed bytes
    /// (k-major) and the scales of every block of the panel (`[k / 32][NR]`: input `kk`'s
    /// are at `kk / 32 * NR`); `None` for an f32 weight.
    pub(super) fn q8_block(&self, p: usize, k0: usize, kc: usize) -> Option<(&[i8], &[f32])> {
        let Data::Q8_0 { q, d } = &self.data else {
            return None;
        };
        let k = self.k;
        assert!(p < self.panels() && k0 + kc <= k);
        Some((
            &q[(p * k + k0) * NR..][..kc * NR],
            &d[p * (k / BLOCK) * NR..][..k / BLOCK * NR],
        ))
    }
}

/// [`Packed::block`]'s Q8_0 decoding one value at a time: `out[kk * NR + c] = d * q` with
/// the scale of input `k0 + kk`'s block.
fn decode_reference(q: &[i8], d: &[f32], k0: usize, out: &mut [f32]) {
    for (kk, (o, q)) in out.chunks_exact_mut(NR).zip(q.chunks_exact(NR)).enumerate() {
        let d = &d[(k0 + kk) / BLOCK * NR..][..NR];
        for c in 0..NR {
            o[c] = d[c] * q[c] as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, NR};

    /// `super::decode_reference`, sixteen columns at a time (the same product per value).
    ///
    /// # Safety
    /// AVX-512F must be available; `q` must hold whole inputs of `NR`, `d` the scales of
    /// every block they lie in, `out` as many values as `q`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn decode(q: &[i8], d: &[f32], k0: usize, out: &mut [f32]) {
        assert!(out.len() >= q.len() && q.len().is_multiple_of(NR));
        for kk in 0..q.len() / NR {
            let s = d.as_ptr().add((k0 + kk) / BLOCK * NR);
            assert!((k0 + kk) / BLOCK * NR + NR <= d.len());
            for half in 0..2 {
                let bytes = _mm_loadu_si128(q.as_ptr().add(kk * NR + 16 * half).cast());
                let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                let v = _mm512_mul_ps(_mm512_loadu_ps(s.add(16 * half)), v);
                _mm512_storeu_ps(out.as_mut_ptr().add(kk * NR + 16 * half), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `W[j, kk]` of a packed weight, read back from its panels.
    fn read_back(p: &Packed, j: usize, kk: usize) -> f32 {
        let (k0, mut panel) = (kk / KC * KC, Panel::new());
        let kc = KC.min(p.k - k0);
        let at = p.block(j / NR, k0, kc, &mut panel);
        // SAFETY: the block holds `kc * NR` values.
        unsafe { *at.add((kk - k0) * NR + j % NR) }
    }

    #[test]
    fn panels_hold_the_weight() {
        let dev = Device::Cpu;
        for (n, k) in [(45, 64), (32, 288), (7, 544), (70, 32)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let dense = w.to_vec2::<f32>().unwrap();
            let deq = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
            let pf = Packed::from_tensor(&w).unwrap();
            let pq = Packed::from_q8_0(&q).unwrap();
            let wt = w
                .t()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let pt = Packed::from_f32_t(&wt, (n, k));
            for j in 0..n {
                for kk in 0..k {
                    assert_eq!(read_back(&pf, j, kk), dense[j][kk], "f32 [{j}, {kk}]");
                    assert_eq!(
                        read_back(&pt, j, kk),
                        dense[j][kk],
                        "f32 from W^T [{j}, {kk}]"
                    );
                    assert_eq!(read_back(&pq, j, kk), deq[j][kk], "q8_0 [{j}, {kk}]");
                }
            }
            // Columns past `n` read as zero.
            if n % NR != 0 {
                assert_eq!(read_back(&pf, n, 0), 0.0);
                assert_eq!(read_back(&pq, n, k - 1), 0.0);
                assert_eq!(read_back(&pt, n, k - 1), 0.0);
            }
        }
    }

    #[test]
    fn block_bytes_are_the_blocks_the_kernel_reads() {
        let w = Tensor::randn(0f32, 1.0, (40, 544), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let (pf, pq) = (
            Packed::from_tensor(&w).unwrap(),
            Packed::from_q8_0(&q).unwrap(),
        );
        for p in 0..pf.panels() {
            for k0 in (0..544).step_by(KC) {
                let kc = KC.min(544 - k0);
                let mut panel = Panel::new();
                let at = pf.block(p, k0, kc, &mut panel);
                // SAFETY: the block holds `kc * NR` values.
                let values = unsafe { std::slice::from_raw_parts(at, kc * NR) };
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
                assert_eq!(pf.block_bytes(p, k0), &bytes[..]);
                assert_eq!(pq.block_bytes(p, k0).len(), kc * NR);
            }
        }
        // Past the last panel or input: nothing.
        assert!(pf.block_bytes(pf.panels(), 0).is_empty());
        assert!(pq.block_bytes(0, 544).is_empty());
    }

    #[test]
    fn decoding_matches_its_reference() {
        let w = Tensor::randn(0f32, 1.0, (40, 544), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let Data::Q8_0 { q, d } = &Packed::from_q8_0(&q).unwrap().data else {
            unreachable!()
        };
        let k = 544;
        for (p, k0) in [(0, 0), (0, 256), (1, 512)] {
            let kc = KC.min(k - k0);
            let q = &q[(p * k + k0) * NR..][..kc * NR];
            let d = &d[p * (k / BLOCK) * NR..][..k / BLOCK * NR];
            let (mut a, mut b) = (vec![-1f32; kc * NR], vec![-1f32; kc * NR]);
            decode_reference(q, d, k0, &mut a);
            #[cfg(target_arch = "x86_64")]
            if available() {
                // SAFETY: AVX-512F is available; the sizes are those `block` passes.
                unsafe { avx512::decode(q, d, k0, &mut b) };
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_pack() {
        let dev = Device::Cpu;
        let half = Tensor::zeros((4, 8), DType::F16, &dev).unwrap();
        assert!(Packed::from_tensor(&half).is_none());
        let var = candle_core::Var::zeros((4, 8), DType::F32, &dev).unwrap();
        assert!(Packed::from_tensor(var.as_tensor()).is_none());
        let q4 = QTensor::quantize(
            &Tensor::zeros((4, 32), DType::F32, &dev).unwrap(),
            GgmlDType::Q4_0,
        )
        .unwrap();
        assert!(Packed::from_q8_0(&q4).is_none());
    }
}
