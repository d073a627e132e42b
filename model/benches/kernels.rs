//! Kernel micro-benchmark: the small-batch matvec fast path against candle's gemm on
//! SmolLM2-135M's projection shapes, interleaved in one run so machine noise hits both alike.
//!
//! ```text
//! cargo bench -p liger-model --bench kernels
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};
use liger_model::layers::{gemm, matvec};

fn time(f: impl Fn() -> Tensor, reps: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() * 1e6 / reps as f64
}

/// Median µs per call of `a` and of `b` over five rounds, the two interleaved.
fn medians(a: impl Fn() -> Tensor, b: impl Fn() -> Tensor, reps: usize) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        ta.push(time(&a, reps));
        tb.push(time(&b, reps));
    }
    ta.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    (ta[2], tb[2])
}

fn main() -> candle_core::Result<()> {
    let threads = liger_model::threads::init(None);
    println!("threads: {threads}");
    // `--gemm` runs only the prefill kernel's table.
    let gemm_only = std::env::args().any(|a| a == "--gemm");
    println!("| rows | k x n | gemm µs | matvec µs | speed-up |");
    println!("|---:|---|---:|---:|---:|");
    for (k, n) in [
        (576, 576),
        (576, 192),
        (576, 1536),
        (1536, 576),
        (576, 49152),
    ]
    .into_iter()
    .filter(|_| !gemm_only)
    {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        for m in [1, 4, 8, 16, 32, 64, 96] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let wt = w.t()?;
            let reps = (200_000_000 / (k * n)).clamp(5, 2000);
            let (g, f) = medians(
                || x.matmul(&wt).unwrap(),
                || matvec::matvec(&x, &w).unwrap(),
                reps,
            );
            println!("| {m} | {k} x {n} | {g:.1} | {f:.1} | {:.2}x |", g / f);
        }
    }
    if gemm::available() {
        println!();
        // Below `gemm::MIN_ROWS` the decode kernel (`matvec`) is what runs, so that is the
        // baseline there.
        println!("| rows | k x n | candle gemm (matvec below 33 rows) µs | AVX-512 gemm µs | speed-up | GFLOP/s |");
        println!("|---:|---|---:|---:|---:|---:|");
        for (k, n) in [(576, 576), (576, 192), (576, 1536), (1536, 576)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            for m in [8, 16, 32, 64, 128, 512] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let wt = w.t()?;
                let reps = (2_000_000_000 / (m * k * n)).clamp(5, 2000);
                let baseline = || match m < gemm::MIN_ROWS {
                    true => matvec::matvec(&x, &w).unwrap(),
                    false => x.matmul(&wt).unwrap(),
                };
                let (g, f) = medians(baseline, || gemm_any_rows(&x, &w), reps);
                println!(
                    "| {m} | {k} x {n} | {g:.1} | {f:.1} | {:.2}x | {:.0} |",
                    g / f,
                    (2 * m * k * n) as f64 / f / 1e3
                );
            }
        }
    }
    Ok(())
}

/// The AVX-512 kernel on any number of rows (the library routes only `gemm::MIN_ROWS` and
/// up to it).
fn gemm_any_rows(x: &Tensor, w: &Tensor) -> Tensor {
    use candle_core::{CpuStorage, Storage};
    let (m, k) = x.dims2().unwrap();
    let n = w.dim(0).unwrap();
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(ws))) = (&*xs, &*ws)
    else {
        unreachable!("f32 CPU tensors")
    };
    let y = gemm::gemm(xs, (m, k), gemm::Weight::F32(ws), n).unwrap();
    Tensor::from_vec(y, (m, n), &Device::Cpu).unwrap()
}
