//! Softmax attention of one KV head group's queries in the fused decode step.
//!
//! A group's `g` query heads score the same rows: the global cache's, the window cache's
//! and the token's own. [`attend_reference`] does it head by head on rows widened to f32,
//! one sequential dot product per row (a chain of dependent adds the compiler may not
//! reorder). With a global cache of hundreds of rows in f16 that was a third of a decode
//! step's mixing time, so where the CPU has AVX2, FMA and F16C, [`attend`] reads each row
//! once for all the group's heads, widening f16 rows eight lanes at a time in registers,
//! and takes the softmax in eight lanes too ([`crate::layers::vexp`]).
//! The two sum in different orders; `tests` hold them to each other.

use half::f16;

use super::rows::{sized, softmax, Rows};
use crate::layers::vexp;

/// Queries rotated by the distance cap alone, and which global rows they score (those past
/// the cap, stored un-rotated).
pub(crate) type FarQueries<'a> = Option<(&'a [f32], &'a [bool])>;

/// Most query heads per KV head the vector kernel takes (its accumulators are registers).
const MAX_GROUP: usize = 8;

/// What one group's attention reads and writes.
pub(crate) struct Attend<'a> {
    /// The group's rotated queries `[g, d]`, and those rotated by the cap alone.
    pub queries: (&'a [f32], FarQueries<'a>),
    /// Key and value rows in three blocks: global cache, window cache, the token.
    pub keys: [Rows<'a>; 3],
    pub values: [Rows<'a>; 3],
    pub d: usize,
}

/// Softmax attention over the rows, scaled by `1/sqrt(d)`; writes `out: [g, d]` and, when
/// asked, each window row's (cache, then token) share of the window rows' softmax mass,
/// averaged over the queries: the global rows' terms cancel out of that share, which is
/// the window-only softmax the general path computes. `probs` and `wide` are scratch.
pub(crate) fn attend(
    a: &Attend,
    (probs, wide): (&mut Vec<f32>, &mut [Vec<f32>; 4]),
    (out, mass): (&mut [f32], Option<&mut [f32]>),
) {
    #[cfg(target_arch = "x86_64")]
    {
        let g = a.queries.0.len() / a.d;
        if a.d.is_multiple_of(8)
            && (1..=MAX_GROUP).contains(&g)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            let len: usize = a.keys.iter().map(|k| k.len() / a.d).sum();
            let p = sized(probs, g * len);
            // SAFETY: the features were just detected; the kernel checks its bounds.
            unsafe { avx2::scores(a, p) };
            for head in p.chunks_mut(len) {
                vexp::softmax(head);
            }
            if let Some(m) = mass {
                window_share(p, (g, len), a.keys[0].len() / a.d, m);
            }
            // SAFETY: as above.
            unsafe { avx2::weighted_sum(a, p, out) };
            return;
        }
    }
    let [wgk, wgv, wck, wcv] = wide;
    let keys = [
        a.keys[0].widened(wgk),
        a.keys[1].widened(wck),
        widened_own(a.keys[2]),
    ];
    let values = [
        a.values[0].widened(wgv),
        a.values[1].widened(wcv),
        widened_own(a.values[2]),
    ];
    attend_reference(a.queries, keys, values, (a.d, probs), (out, mass));
}

/// The token's own row is always f32 (computed this step).
fn widened_own(r: Rows<'_>) -> &[f32] {
    match r {
        Rows::F32(x) => x,
        Rows::F16(_) => unreachable!("the token's own row is computed in f32"),
    }
}

/// Adds each window row's share of its query's window-only softmax mass, averaged over the
/// `g` queries, into `mass` (zeroed first); `p` is `[g, len]`, the first `n_global`
/// columns the global rows'.
fn window_share(p: &[f32], (g, len): (usize, usize), n_global: usize, mass: &mut [f32]) {
    mass.fill(0.0);
    for head in p.chunks(len) {
        let window = &head[n_global..];
        let share = 1.0 / (window.iter().sum::<f32>() * g as f32);
        for (mj, &pj) in mass.iter_mut().zip(window) {
            *mj += pj * share;
        }
    }
}

/// The reference: head by head, row by row, on f32 rows.
pub(crate) fn attend_reference(
    (q_rot, far): (&[f32], FarQueries),
    keys: [&[f32]; 3],
    values: [&[f32]; 3],
    (d, probs): (usize, &mut Vec<f32>),
    (out, mut mass): (&mut [f32], Option<&mut [f32]>),
) {
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let len: usize = keys.iter().map(|k| k.len() / d).sum();
    let n_global = keys[0].len() / d;
    let g = q_rot.len() / d;
    if let Some(m) = mass.as_deref_mut() {
        m.fill(0.0);
    }
    let p = sized(probs, len);
    for (head, (qh, o)) in q_rot.chunks(d).zip(out.chunks_mut(d)).enumerate() {
        // Global rows past the cap are scored by the query rotated by the cap alone.
        let q_far = far.map(|(q_cap, rows_far)| (&q_cap[head * d..(head + 1) * d], rows_far));
        let rows = keys.iter().flat_map(|b| b.chunks(d));
        for (j, (pj, key)) in p.iter_mut().zip(rows).enumerate() {
            let q = match q_far {
                Some((qc, rows_far)) if rows_far.get(j) == Some(&true) => qc,
                _ => qh,
            };
            *pj = scale * dot(q, key);
        }
        softmax(p);
        if let Some(m) = mass.as_deref_mut() {
            let window = &p[n_global..];
            let share = 1.0 / (window.iter().sum::<f32>() * g as f32);
            for (mj, &pj) in m.iter_mut().zip(window) {
                *mj += pj * share;
            }
        }
        o.fill(0.0);
        let rows = values.iter().flat_map(|b| b.chunks(d));
        for (&pj, value) in p.iter().zip(rows) {
            for (oi, vi) in o.iter_mut().zip(value) {
                *oi += pj * vi;
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16, Attend, Rows, MAX_GROUP};
    use crate::layers::matvec::avx2::hsum;

    /// Eight lanes of a row, widened to f32.
    trait Lanes: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// `p[h, j] = q_h . k_j / sqrt(d)` for every query head `h` and row `j` (`p: [g, len]`),
    /// the rows in block order; a global row past the cap is scored by the head's query
    /// rotated by the cap alone.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores(a: &Attend, p: &mut [f32]) {
        let d = a.d;
        let (q, far) = a.queries;
        let g = q.len() / d;
        assert!(g <= MAX_GROUP && d.is_multiple_of(8));
        let len = p.len() / g;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let mut at = 0;
        for (b, keys) in a.keys.iter().enumerate() {
            let far = match far {
                Some((q_cap, rows_far)) if b == 0 => Some((q_cap, rows_far)),
                _ => None,
            };
            let n = keys.len() / d;
            assert!(at + n <= len);
            match *keys {
                Rows::F32(k) => block_scores(k, (q, far), (d, g, len, scale), at, p),
                Rows::F16(k) => block_scores(k, (q, far), (d, g, len, scale), at, p),
            }
            at += n;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_scores<T: Lanes>(
        keys: &[T],
        (q, far): (&[f32], super::FarQueries),
        (d, g, len, scale): (usize, usize, usize, f32),
        at: usize,
        p: &mut [f32],
    ) {
        let n = keys.len() / d;
        assert!(q.len() == g * d && p.len() >= g * len && at + n <= len);
        if let Some((q_cap, rows_far)) = far {
            assert!(q_cap.len() == g * d && rows_far.len() >= n);
        }
        for j in 0..n {
            let query = match far {
                Some((q_cap, rows_far)) if rows_far[j] => q_cap.as_ptr(),
                _ => q.as_ptr(),
            };
            let key = keys.as_ptr().add(j * d);
            let mut acc = [_mm256_setzero_ps(); MAX_GROUP];
            for c in (0..d).step_by(8) {
                let kv = T::load8(key.add(c));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(query.add(h * d + c)), kv, *a);
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                p[h * len + at + j] = scale * hsum(*a);
            }
        }
    }

    /// `out[h] = sum_j p[h, j] v_j` (`out: [g, d]`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum(a: &Attend, p: &[f32], out: &mut [f32]) {
        let d = a.d;
        let g = out.len() / d;
        assert!(g <= MAX_GROUP && d.is_multiple_of(8) && out.len() == g * d);
        let len = p.len() / g;
        for c in (0..d).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); MAX_GROUP];
            let mut at = 0;
            for values in &a.values {
                let n = values.len() / d;
                assert!(at + n <= len);
                match *values {
                    Rows::F32(v) => block_sum(v, (d, g, len, c), at, p, &mut acc),
                    Rows::F16(v) => block_sum(v, (d, g, len, c), at, p, &mut acc),
                }
                at += n;
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                _mm256_storeu_ps(out.as_mut_ptr().add(h * d + c), *a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_sum<T: Lanes>(
        values: &[T],
        (d, g, len, c): (usize, usize, usize, usize),
        at: usize,
        p: &[f32],
        acc: &mut [__m256; MAX_GROUP],
    ) {
        let n = values.len() / d;
        assert!(c + 8 <= d && p.len() >= g * len && at + n <= len);
        let pp = p.as_ptr().add(at);
        for j in 0..n {
            let v = T::load8(values.as_ptr().add(j * d + c));
            for (h, a) in acc.iter_mut().enumerate().take(g) {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*pp.add(h * len + j)), v, *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    fn normal(n: usize, rng: &mut SplitMix) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    fn rows<'a>(halves: bool, x: &'a [f32], h: &'a [f16]) -> Rows<'a> {
        if halves {
            Rows::F16(h)
        } else {
            Rows::F32(x)
        }
    }

    #[test]
    fn the_vector_kernel_matches_the_reference() {
        let mut rng = SplitMix(5);
        for (g, d, n_global, n_cached, halves, far) in [
            (3, 64, 40, 23, true, true),
            (3, 64, 0, 23, true, false),
            (1, 8, 5, 0, false, true),
            (4, 16, 9, 7, false, false),
            (8, 32, 3, 11, true, true),
            (5, 24, 2, 3, true, false),
        ] {
            let q = normal(g * d, &mut rng);
            let q_cap = normal(g * d, &mut rng);
            let rows_far: Vec<bool> = (0..n_global).map(|j| j % 3 == 1).collect();
            let [gk, gv, ck, cv] =
                [n_global, n_global, n_cached, n_cached].map(|n| normal(n * d, &mut rng));
            let (own_k, own_v) = (normal(d, &mut rng), normal(d, &mut rng));
            let to_half = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
            let [gk16, gv16, ck16, cv16] = [&gk, &gv, &ck, &cv].map(|x| to_half(x));
            let a = Attend {
                queries: (&q, far.then_some((&q_cap[..], &rows_far[..]))),
                keys: [
                    rows(halves, &gk, &gk16),
                    rows(halves, &ck, &ck16),
                    Rows::F32(&own_k),
                ],
                values: [
                    rows(halves, &gv, &gv16),
                    rows(halves, &cv, &cv16),
                    Rows::F32(&own_v),
                ],
                d,
            };
            let window = n_cached + 1;
            let (mut out, mut mass) = (vec![0f32; g * d], vec![0f32; window]);
            let mut scratch = (Vec::new(), Default::default());
            attend(
                &a,
                (&mut scratch.0, &mut scratch.1),
                (&mut out, Some(&mut mass)),
            );
            // The reference on the same rows widened (f16 -> f32 is exact).
            let wide = |r: Rows| match r {
                Rows::F32(x) => x.to_vec(),
                Rows::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
            };
            let keys = a.keys.map(wide);
            let values = a.values.map(wide);
            let (mut want, mut want_mass) = (vec![0f32; g * d], vec![0f32; window]);
            attend_reference(
                a.queries,
                [&keys[0], &keys[1], &keys[2]],
                [&values[0], &values[1], &values[2]],
                (d, &mut Vec::new()),
                (&mut want, Some(&mut want_mass)),
            );
            let close = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
            };
            assert!(close(&out, &want), "g {g} d {d}: {out:?} vs {want:?}");
            assert!(close(&mass, &want_mass), "g {g} d {d}");
        }
    }
}
