//! Kernel micro-benchmark on SmolLM2-135M's projection shapes, the kernels interleaved in
//! one run so machine noise hits both alike: the small-batch AVX2 matvec against candle's
//! gemm, and (on AVX-512 CPUs) the packed-weight kernel against what ran before it.
//!
//! ```text
//! cargo bench -p liger-model --bench kernels
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};
use liger_model::layers::{gemm, matvec, Packed};

/// SmolLM2-135M's projections as `(k, n)`: q and o, k and v, gate and up, down, the LM head.
const SHAPES: [(usize, usize); 5] = [
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (576, 49152),
];

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
    // `--gemm` runs only the packed kernel's table.
    let gemm_only = std::env::args().any(|a| a == "--gemm");
    println!("| rows | k x n | gemm µs | matvec µs | speed-up |");
    println!("|---:|---|---:|---:|---:|");
    for (k, n) in SHAPES.into_iter().filter(|_| !gemm_only) {
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
        // What ran before weights were packed is the baseline: the AVX2 decode kernel
        // (`matvec`) up to its 32 rows, candle's gemm beyond.
        println!("| rows | k x n | AVX2 matvec (candle gemm above 32 rows) µs | packed AVX-512 µs | speed-up | GFLOP/s |");
        println!("|---:|---|---:|---:|---:|---:|");
        for (k, n) in SHAPES {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let packed = Packed::from_tensor(&w).expect("an f32 CPU weight");
            for m in [1, 8, 16, 32, 64, 128, 512] {
                if n > 10_000 && m > 32 {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let wt = w.t()?;
                let reps = (2_000_000_000 / (m * k * n)).clamp(5, 2000);
                let baseline = || match (matvec::MIN_ROWS..=matvec::MAX_ROWS).contains(&m) {
                    true => matvec::matvec(&x, &w).unwrap(),
                    false => x.matmul(&wt).unwrap(),
                };
                let fast = || gemm::matmul_packed(&x, &[&packed]).unwrap().pop().unwrap();
                let (g, f) = medians(baseline, fast, reps);
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
