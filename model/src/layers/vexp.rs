//! `exp`, `max` and sums over a slice, eight lanes at a time (sixteen for the element-wise
//! functions with AVX-512).
//!
//! A softmax over a long row spends most of its time in `exp`: libm's is scalar, so a
//! 4,096-token prefill with a 384-place global cache pays for some 800 million calls. This
//! is Cephes' `expf` (range reduction by `ln 2` in two parts, a degree-5 polynomial, the
//! power of two built in the exponent bits) written so the compiler vectorizes it; with
//! AVX2 and FMA it runs in 256-bit lanes. Within 2 ulp of `f32::exp` on `[-87, 88]`
//! (`tests`); 0 below, where `f32::exp` is subnormal or 0.

/// `out[i] = exp(x[i] - shift)`.
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if wide() {
            // SAFETY: the features were just detected.
            unsafe { exp_avx512(x, shift, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { exp_avx2(x, shift, out) };
            return;
        }
    }
    exp_lanes(x, shift, out);
}

/// [`exp_shifted`] into memory not yet initialized (the same values): a caller filling a
/// large buffer once need not zero it first.
pub fn exp_shifted_uninit(x: &[f32], shift: f32, out: &mut [std::mem::MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if wide() {
            // SAFETY: the features were just detected.
            unsafe { exp_uninit_avx512(x, shift, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { exp_uninit_avx2(x, shift, out) };
            return;
        }
    }
    exp_uninit_lanes(x, shift, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_uninit_avx512(x: &[f32], shift: f32, out: &mut [std::mem::MaybeUninit<f32>]) {
    exp_uninit_lanes(x, shift, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_uninit_avx2(x: &[f32], shift: f32, out: &mut [std::mem::MaybeUninit<f32>]) {
    exp_uninit_lanes(x, shift, out);
}

#[inline(always)]
fn exp_uninit_lanes(x: &[f32], shift: f32, out: &mut [std::mem::MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(exp1(v - shift));
    }
}

/// `x[i] = exp(x[i] - max(x)) / sum`: a softmax in place.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if wide() {
            // SAFETY: the features were just detected.
            unsafe { softmax_avx512(x) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { softmax_avx2(x) };
            return;
        }
    }
    softmax_lanes(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    softmax_lanes(x);
}

/// Whether the 16-lane versions run: AVX-512F (with AVX2 and FMA, which every AVX-512 CPU
/// has). They compute the very same values as the 8-lane ones: the element-wise functions
/// do the same operations per element, and the reductions keep their eight accumulators
/// (Rust never reassociates floating-point sums), so only the speed differs.
#[cfg(target_arch = "x86_64")]
fn wide() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_avx512(x: &mut [f32]) {
    softmax_lanes(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_avx512(x: &[f32], shift: f32, out: &mut [f32]) {
    exp_lanes(x, shift, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn log_sigmoid_avx512(x: &[f32], scale: f32, out: &mut [f32]) {
    log_sigmoid_lanes(x, scale, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_lanes(gate, up, out);
}

#[inline(always)]
fn softmax_lanes(x: &mut [f32]) {
    let m = max_lanes(x);
    for v in x.iter_mut() {
        *v = exp1(*v - m);
    }
    let inv = 1.0 / sum_lanes(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &[f32], shift: f32, out: &mut [f32]) {
    exp_lanes(x, shift, out);
}

#[inline(always)]
fn exp_lanes(x: &[f32], shift: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp1(v - shift);
    }
}

/// `out[i] = scale * log(sigmoid(x[i]))`, as `min(x, 0) - log(1 + exp(-|x|))` so neither
/// branch overflows: the recurrence's log-gates.
pub fn log_sigmoid(x: &[f32], scale: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if wide() {
            // SAFETY: the features were just detected.
            unsafe { log_sigmoid_avx512(x, scale, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { log_sigmoid_avx2(x, scale, out) };
            return;
        }
    }
    log_sigmoid_lanes(x, scale, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sigmoid_avx2(x: &[f32], scale: f32, out: &mut [f32]) {
    log_sigmoid_lanes(x, scale, out);
}

#[inline(always)]
fn log_sigmoid_lanes(x: &[f32], scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v.min(0.0) - log1p_unit(exp1(-v.abs()))) * scale;
    }
}

/// `log(1 + y)` for `y` in `[0, 1]`: `2 atanh(s)` with `s = y / (2 + y)` in `[0, 1/3]`, the
/// series to `s^13` (its next term is below f32's rounding); exact to the last bits for
/// small `y`, where `log(1 + y)` would cancel.
#[inline(always)]
fn log1p_unit(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let s2 = s * s;
    let p = 1.0 / 11.0 + s2 * (1.0 / 13.0);
    let p = 1.0 / 9.0 + s2 * p;
    let p = 1.0 / 7.0 + s2 * p;
    let p = 1.0 / 5.0 + s2 * p;
    let p = 1.0 / 3.0 + s2 * p;
    2.0 * s * (1.0 + s2 * p)
}

/// `out[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + exp(-g))`: SwiGLU's gate.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if wide() {
            // SAFETY: the features were just detected.
            unsafe { silu_mul_avx512(gate, up, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            unsafe { silu_mul_avx2(gate, up, out) };
            return;
        }
    }
    silu_mul_lanes(gate, up, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_lanes(gate, up, out);
}

#[inline(always)]
fn silu_mul_lanes(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp1(-g)) * u;
    }
}

/// The largest value (`-inf` for none), in eight independent lanes: a plain fold is a
/// chain of dependent comparisons the compiler may not reorder.
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { max_avx2(x) };
        }
    }
    max_lanes(x)
}

/// The sum in eight independent lanes (so in another order than a plain fold).
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { sum_avx2(x) };
        }
    }
    sum_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_avx2(x: &[f32]) -> f32 {
    max_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[f32]) -> f32 {
    sum_lanes(x)
}

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    rest.iter().copied().fold(m, f32::max)
}

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so `n * LN2_HI` is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let low = x < -87.0;
    let x = x.clamp(-87.0, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * r2 + r + 1.0;
    // `2^n` built in the exponent bits. `n` is a whole number in [-126, 128] here, so
    // adding 1.5 * 2^23 leaves `n + 127` in the low mantissa bits, shifted up into the
    // exponent: the bits `(n as i32 + 127) << 23` gives, without the saturating float to
    // int cast (NaN and range checks per element), which the compiler cannot vectorize:
    // with it, this function ran one lane at a time (~2.2 ns per element).
    let scale = f32::from_bits((n + (127.0 + 12_582_912.0)).to_bits() << 23);
    if low {
        0.0
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_two_ulp() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        let mut out = vec![0f32; xs.len()];
        exp_shifted(&xs, 0.0, &mut out);
        let mut portable = vec![0f32; xs.len()];
        exp_lanes(&xs, 0.0, &mut portable);
        for ((&x, &y), &p) in xs.iter().zip(&out).zip(&portable) {
            let want = x.exp();
            let ulp = (want.to_bits() as i64 - y.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {y}, libm {want}");
            assert_eq!(y.to_bits(), p.to_bits(), "vector and portable lanes agree");
        }
        // Shifted, and far below: 0, like a masked score.
        exp_shifted(&[3.0, -1e30, f32::NEG_INFINITY], 3.0, &mut out[..3]);
        assert_eq!(out[0], 1.0);
        assert_eq!((out[1], out[2]), (0.0, 0.0));
    }

    #[test]
    fn powers_of_two_match_the_integer_cast() {
        // `exp1`'s `2^n` without a float to int cast: the same bits for every `n` it meets.
        for n in -126..=128 {
            let f = n as f32;
            let cast = ((f as i32 + 127) as u32) << 23;
            let built = (f + (127.0 + 12_582_912.0)).to_bits() << 23;
            assert_eq!(cast, built, "2^{n}");
        }
    }

    #[test]
    fn log_sigmoid_matches_the_definition() {
        let x: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.01).collect();
        let x: Vec<f32> = x
            .into_iter()
            .chain([-90.0, -30.0, 30.0, 90.0, 1e-6, -1e-6])
            .collect();
        let mut out = vec![0f32; x.len()];
        log_sigmoid(&x, 0.25, &mut out);
        let mut portable = vec![0f32; x.len()];
        log_sigmoid_lanes(&x, 0.25, &mut portable);
        for (i, &v) in x.iter().enumerate() {
            let v64 = v as f64;
            let want = 0.25 * (v64.min(0.0) - (-v64.abs()).exp().ln_1p());
            let got = out[i] as f64;
            assert!(
                (got - want).abs() <= 4e-7 * want.abs().max(1e-6),
                "log_sigmoid({v}) = {got}, want {want}"
            );
            assert_eq!(out[i].to_bits(), portable[i].to_bits());
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        let x = [-100.0f32, -3.0, 0.0, 2.5, 100.0];
        let mut out = [0f32; 5];
        log_sigmoid(&x, 1.0, &mut out);
        for (&x, &y) in x.iter().zip(&out) {
            let want = (1.0 / (1.0 + (-x as f64).exp())).ln();
            assert!((y as f64 - want).abs() < 1e-5, "{x}");
        }
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        let gate: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) * 0.25).collect();
        let up: Vec<f32> = (0..1001).map(|i| 1.0 + (i % 7) as f32).collect();
        let mut out = vec![0f32; gate.len()];
        silu_mul(&gate, &up, &mut out);
        let mut portable = vec![0f32; gate.len()];
        silu_mul_lanes(&gate, &up, &mut portable);
        for (i, (&g, &u)) in gate.iter().zip(&up).enumerate() {
            let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
            assert!(
                (out[i] - want).abs() <= 1e-6 * want.abs().max(1e-6),
                "{g}: {} vs {want}",
                out[i]
            );
            assert_eq!(out[i].to_bits(), portable[i].to_bits());
        }
    }

    #[test]
    fn softmax_matches_the_definition() {
        let mut x: Vec<f32> = (0..45)
            .map(|i| ((i * 13) % 17) as f32 * 0.7 - 3.0)
            .collect();
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let want: Vec<f64> = x.iter().map(|&v| ((v - m) as f64).exp() / z).collect();
        softmax(&mut x);
        for (a, b) in x.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lanes_give_the_same_bits_as_eight() {
        if !wide() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // Odd length: a partial vector at the end of both widths.
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 40.0).collect();
        let up: Vec<f32> = x.iter().map(|v| v * 0.5 - 1.0).collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        // SAFETY (each pair below): `wide()` checked AVX-512F, AVX2 and FMA.
        unsafe { (exp_avx512(&x, 3.0, &mut a), exp_avx2(&x, 3.0, &mut b)) };
        assert_eq!(bits(&a), bits(&b));
        unsafe {
            (
                silu_mul_avx512(&x, &up, &mut a),
                silu_mul_avx2(&x, &up, &mut b),
            )
        };
        assert_eq!(bits(&a), bits(&b));
        unsafe {
            (
                log_sigmoid_avx512(&x, 0.25, &mut a),
                log_sigmoid_avx2(&x, 0.25, &mut b),
            )
        };
        assert_eq!(bits(&a), bits(&b));
        let (mut a, mut b) = (x.clone(), x.clone());
        unsafe { (softmax_avx512(&mut a), softmax_avx2(&mut b)) };
        assert_eq!(bits(&a), bits(&b));
        let mut u = vec![std::mem::MaybeUninit::<f32>::uninit(); x.len()];
        exp_shifted_uninit(&x, 3.0, &mut u);
        exp_shifted(&x, 3.0, &mut b);
        // SAFETY: `exp_shifted_uninit` wrote every element.
        let u: Vec<f32> = u.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(bits(&u), bits(&b));
    }

    #[test]
    fn lane_reductions_match_folds() {
        let x: Vec<f32> = (0..77).map(|i| ((i * 37) % 23) as f32 - 11.5).collect();
        for n in [0, 1, 7, 8, 9, 77] {
            let x = &x[..n];
            assert_eq!(max(x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(x) as f64 - want).abs() < 1e-4);
        }
    }
}
