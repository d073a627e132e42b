//! Softmax attention of one KV head group's queries in the fused decode step.
//!
//! A group's `g` query heads score the same rows: the global cache's, the window cache's
//! and the token's own. [`attend_reference`] does it head by head on rows widened to f32,
//! one sequential dot product per row (a chain of dependent adds the compiler may not
//! reorder). With a global cache of hundreds of rows in f16 that was a third of a decode
//! step's mixing time, so where the CPU has AVX2, FMA and F16C, [`attend`] reads each row
//! once for all the group's heads, widening f16 rows eight lanes at a time in registers,
//! and takes the softmax in eight lanes too ([`crate::layers::vexp`]). With AVX-512 the
//! same in sixteen lanes, scoring four rows at a time (their sums reduced together) and
//! summing values 64 columns at a time (each row read once, `4 g` independent sums): the
//! AVX2 kernel's sums were one chain per head and eight columns, bound by the FMA latency,
//! and its one reduction per score by the shuffle port.
//! They sum in different orders; `tests` hold every kernel the CPU has to the reference.

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
    /// Key and value rows in three blocks: global cache, window cache, the token (with the
    /// tokens of its span before it, in a step that reads several).
    pub keys: [Rows<'a>; 3],
    pub values: [Rows<'a>; 3],
    pub d: usize,
    /// Which of the first rows (in block order) the queries do not see: in a span, kept
    /// entries an earlier token pushed out, and window rows that have left the window
    /// without a place. Empty: all are seen.
    pub hidden: &'a [bool],
    /// The first window row: rows before it are the global cache's (kept entries, and
    /// window rows that left the window for a place), outside the window's mass.
    pub window_from: usize,
}

/// Softmax attention over the rows, scaled by `1/sqrt(d)`; writes `out: [g, d]` and, when
/// asked, each window row's (cache, then token) share of the window rows' softmax mass,
/// averaged over the queries: the global rows' terms cancel out of that share, which is
/// the window-only softmax the general path computes. `probs` and `wide` are scratch.
pub(crate) fn attend(
    a: &Attend,
    scratch: (&mut Vec<f32>, &mut [Vec<f32>; 4]),
    out: (&mut [f32], Option<&mut [f32]>),
) {
    attend_with(Kernel::best(a), a, scratch, out);
}

/// Which code computes a group's attention: the reference always exists; the vector
/// kernels where the CPU and the group's shape allow.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    /// 16 lanes, each row read once for all heads; scores of four rows reduced together.
    Avx512,
    /// 8 lanes, each row read once for all heads.
    Avx2,
    Reference,
}

impl Kernel {
    /// The fastest kernel that takes `a` on this CPU.
    fn best(a: &Attend) -> Self {
        Self::available(a)
            .into_iter()
            .next()
            .unwrap_or(Self::Reference)
    }

    /// Every kernel that takes `a` on this CPU, fastest first (the reference last).
    fn available(a: &Attend) -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let g = a.queries.0.len() / a.d;
            let features = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if features
                && std::arch::is_x86_feature_detected!("avx512f")
                && a.d.is_multiple_of(16)
                && (1..=avx512::MAX_GROUP).contains(&g)
            {
                all.push(Self::Avx512);
            }
            if features && a.d.is_multiple_of(8) && (1..=MAX_GROUP).contains(&g) {
                all.push(Self::Avx2);
            }
        }
        all.push(Self::Reference);
        all
    }
}

fn attend_with(
    kernel: Kernel,
    a: &Attend,
    (probs, wide): (&mut Vec<f32>, &mut [Vec<f32>; 4]),
    (out, mass): (&mut [f32], Option<&mut [f32]>),
) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Reference {
        let g = a.queries.0.len() / a.d;
        let len: usize = a.keys.iter().map(|k| k.len() / a.d).sum();
        let p = sized(probs, g * len);
        // SAFETY (both kernels, each call): `Kernel::available` detected the features and
        // checked the shapes; the kernels check their bounds.
        match kernel {
            Kernel::Avx512 => unsafe { avx512::scores(a, p) },
            _ => unsafe { avx2::scores(a, p) },
        }
        for head in p.chunks_mut(len) {
            hide(head, a.hidden);
            vexp::softmax(head);
        }
        if let Some(m) = mass {
            window_share(p, (g, len), a.window_from, m);
        }
        match kernel {
            Kernel::Avx512 => unsafe { avx512::weighted_sum(a, p, out) },
            _ => unsafe { avx2::weighted_sum(a, p, out) },
        }
        return;
    }
    let _ = kernel;
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
    let rows = WideRows {
        keys,
        values,
        hidden: a.hidden,
        window_from: a.window_from,
    };
    attend_reference(a.queries, rows, (a.d, probs), (out, mass));
}

/// What the reference reads: [`Attend`]'s rows widened to f32.
pub(crate) struct WideRows<'a> {
    pub keys: [&'a [f32]; 3],
    pub values: [&'a [f32]; 3],
    pub hidden: &'a [bool],
    pub window_from: usize,
}

/// Scores of hidden rows to `-inf` (a softmax weight of 0).
fn hide(scores: &mut [f32], hidden: &[bool]) {
    for (x, &h) in scores.iter_mut().zip(hidden) {
        if h {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The three blocks of rows (global cache, window cache, the token) with each block's
/// first column among all rows, and the far queries with the block they score (the global
/// rows): how every vector kernel walks a group's keys and values.
#[cfg(target_arch = "x86_64")]
fn blocks<'a>(
    rows: &'a [Rows<'a>; 3],
    far: FarQueries<'a>,
    d: usize,
) -> impl Iterator<Item = (Rows<'a>, FarQueries<'a>, usize)> + 'a {
    rows.iter().enumerate().scan(0, move |at, (b, &r)| {
        let first = *at;
        *at += r.len() / d;
        Some((r, far.filter(|_| b == 0), first))
    })
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
/// columns the global cache's.
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
    rows: WideRows,
    (d, probs): (usize, &mut Vec<f32>),
    (out, mut mass): (&mut [f32], Option<&mut [f32]>),
) {
    let WideRows {
        keys,
        values,
        hidden,
        window_from: n_global,
    } = rows;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let len: usize = keys.iter().map(|k| k.len() / d).sum();
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
            *pj = if hidden.get(j) == Some(&true) {
                f32::NEG_INFINITY
            } else {
                scale * dot(q, key)
            };
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
        for (keys, far, at) in super::blocks(&a.keys, far, d) {
            assert!(at + keys.len() / d <= len);
            match keys {
                Rows::F32(k) => block_scores(k, (q, far), (d, g, len, scale), at, p),
                Rows::F16(k) => block_scores(k, (q, far), (d, g, len, scale), at, p),
            }
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
            for (values, _, at) in super::blocks(&a.values, None, d) {
                assert!(at + values.len() / d <= len);
                match values {
                    Rows::F32(v) => block_sum(v, (d, g, len, c), at, p, &mut acc),
                    Rows::F16(v) => block_sum(v, (d, g, len, c), at, p, &mut acc),
                }
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{f16, Attend, Rows};

    /// Most query heads per KV head this kernel takes: a block of four rows keeps
    /// `4 * MAX_GROUP` score accumulators and, summing values, `4 * MAX_GROUP` output
    /// accumulators in registers.
    pub const MAX_GROUP: usize = 4;

    /// Sixteen lanes of a row, widened to f32.
    trait Lanes: Copy {
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }

    /// The sums of four vectors' lanes, `[Σa, Σb, Σc, Σd]`: eight shuffles for the four,
    /// where reducing each alone takes four (the shuffle port, not the FMAs, bounded the
    /// scores).
    #[inline(always)]
    unsafe fn sum4([a, b, c, d]: [__m512; 4]) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then the same for c, d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Per lane: [a, b, c, d], each a quarter of its sum.
        let s = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(ab, cd),
            _mm512_shuffle_ps::<0xEE>(ab, cd),
        );
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
        let s = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// As `super::avx2::scores`, sixteen lanes at a time (`d` a multiple of 16).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn scores(a: &Attend, p: &mut [f32]) {
        let g = a.queries.0.len() / a.d;
        match g {
            1 => scores_g::<1>(a, p),
            2 => scores_g::<2>(a, p),
            3 => scores_g::<3>(a, p),
            4 => scores_g::<4>(a, p),
            _ => unreachable!("groups of 1 to {MAX_GROUP} heads, not {g}"),
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn scores_g<const G: usize>(a: &Attend, p: &mut [f32]) {
        let d = a.d;
        let (q, far) = a.queries;
        assert!(q.len() == G * d && d.is_multiple_of(16));
        let len = p.len() / G;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        for (keys, far, at) in super::blocks(&a.keys, far, d) {
            let n = keys.len() / d;
            assert!(at + n <= len && p.len() >= G * len);
            if let Some((q_cap, rows_far)) = far {
                assert!(q_cap.len() == G * d && rows_far.len() >= n);
            }
            match keys {
                Rows::F32(k) => block_scores::<f32, G>(k, (q, far), (d, len, scale), at, p),
                Rows::F16(k) => block_scores::<f16, G>(k, (q, far), (d, len, scale), at, p),
            }
        }
    }

    /// The scores of one block's rows (bounds asserted by the caller): four rows at a
    /// time, each loaded once for the `G` heads; the last few, and any four with a row
    /// past the distance cap, one at a time.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn block_scores<T: Lanes, const G: usize>(
        keys: &[T],
        (q, far): (&[f32], super::FarQueries),
        (d, len, scale): (usize, usize, f32),
        at: usize,
        p: &mut [f32],
    ) {
        let n = keys.len() / d;
        let (kp, qp, pp) = (keys.as_ptr(), q.as_ptr(), p.as_mut_ptr());
        let is_far = |j: usize| far.is_some_and(|(_, rows_far)| rows_far[j]);
        let mut j = 0;
        while j + 4 <= n {
            if (j..j + 4).any(is_far) {
                for r in j..j + 4 {
                    let row = (q, far, is_far(r));
                    row_scores::<T, G>(kp.add(r * d), row, (d, len, scale), at + r, pp);
                }
                j += 4;
                continue;
            }
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for c in (0..d).step_by(16) {
                let k = [0, 1, 2, 3].map(|r| T::load16(kp.add((j + r) * d + c)));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let qv = _mm512_loadu_ps(qp.add(h * d + c));
                    for (a, k) in acc.iter_mut().zip(&k) {
                        *a = _mm512_fmadd_ps(qv, *k, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                let s = _mm_mul_ps(sum4(*acc), _mm_set1_ps(scale));
                _mm_storeu_ps(pp.add(h * len + at + j), s);
            }
            j += 4;
        }
        for r in j..n {
            let row = (q, far, is_far(r));
            row_scores::<T, G>(kp.add(r * d), row, (d, len, scale), at + r, pp);
        }
    }

    /// One row's scores, `p[h * len + col]`; by the cap-rotated queries when `far_row`.
    #[inline(always)]
    unsafe fn row_scores<T: Lanes, const G: usize>(
        key: *const T,
        (q, far, far_row): (&[f32], super::FarQueries, bool),
        (d, len, scale): (usize, usize, f32),
        col: usize,
        p: *mut f32,
    ) {
        let query = match far {
            Some((q_cap, _)) if far_row => q_cap.as_ptr(),
            _ => q.as_ptr(),
        };
        let mut acc = [_mm512_setzero_ps(); G];
        for c in (0..d).step_by(16) {
            let k = T::load16(key.add(c));
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(query.add(h * d + c)), k, *a);
            }
        }
        for (h, a) in acc.iter().enumerate() {
            *p.add(h * len + col) = scale * _mm512_reduce_add_ps(*a);
        }
    }

    /// `out[h] = sum_j p[h, j] v_j` (`out: [g, d]`): 64 columns at a time (16 where `d`
    /// is not a multiple of 64), so each value row is read once per 64 columns and the
    /// `4 * G` sums are independent chains.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn weighted_sum(a: &Attend, p: &[f32], out: &mut [f32]) {
        let g = out.len() / a.d;
        match g {
            1 => weighted_sum_g::<1>(a, p, out),
            2 => weighted_sum_g::<2>(a, p, out),
            3 => weighted_sum_g::<3>(a, p, out),
            4 => weighted_sum_g::<4>(a, p, out),
            _ => unreachable!("groups of 1 to {MAX_GROUP} heads, not {g}"),
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn weighted_sum_g<const G: usize>(a: &Attend, p: &[f32], out: &mut [f32]) {
        let d = a.d;
        assert!(out.len() == G * d && d.is_multiple_of(16));
        let len = p.len() / G;
        let mut c0 = 0;
        while c0 < d {
            if c0 + 64 <= d {
                columns::<G, 4>(a, (p, len), c0, out);
                c0 += 64;
            } else {
                columns::<G, 1>(a, (p, len), c0, out);
                c0 += 16;
            }
        }
    }

    /// Columns `c0..c0 + 16 * C` of every head's output, over every block of rows.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn columns<const G: usize, const C: usize>(
        a: &Attend,
        (p, len): (&[f32], usize),
        c0: usize,
        out: &mut [f32],
    ) {
        let d = a.d;
        let mut acc = [[_mm512_setzero_ps(); C]; G];
        for (values, _, at) in super::blocks(&a.values, None, d) {
            assert!(at + values.len() / d <= len && p.len() >= G * len && c0 + 16 * C <= d);
            match values {
                Rows::F32(v) => block_sum::<f32, G, C>(v, (d, len, c0), at, p, &mut acc),
                Rows::F16(v) => block_sum::<f16, G, C>(v, (d, len, c0), at, p, &mut acc),
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(h * d + c0 + 16 * c), *a);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn block_sum<T: Lanes, const G: usize, const C: usize>(
        values: &[T],
        (d, len, c0): (usize, usize, usize),
        at: usize,
        p: &[f32],
        acc: &mut [[__m512; C]; G],
    ) {
        let n = values.len() / d;
        let (vp, pp) = (values.as_ptr(), p.as_ptr().add(at));
        for j in 0..n {
            let row = vp.add(j * d + c0);
            let mut v = [_mm512_setzero_ps(); C];
            for (c, v) in v.iter_mut().enumerate() {
                *v = T::load16(row.add(16 * c));
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*pp.add(h * len + j));
                for (a, v) in acc.iter_mut().zip(&v) {
                    *a = _mm512_fmadd_ps(w, *v, *a);
                }
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
    fn every_kernel_matches_the_reference() {
        let mut rng = SplitMix(5);
        for (g, d, n_global, n_cached, halves, far) in [
            (3, 64, 40, 23, true, true),
            (3, 64, 0, 23, true, false),
            (1, 8, 5, 0, false, true),
            (4, 16, 9, 7, false, false),
            (8, 32, 3, 11, true, true),
            (5, 24, 2, 3, true, false),
            // Fours of rows and their tails; far rows inside fours; 16-column steps.
            (4, 64, 37, 18, true, true),
            (2, 80, 9, 6, false, true),
            (3, 128, 8, 4, true, false),
        ] {
            let q = normal(g * d, &mut rng);
            let q_cap = normal(g * d, &mut rng);
            let rows_far: Vec<bool> = (0..n_global).map(|j| j % 3 == 1).collect();
            let [gk, gv, ck, cv] =
                [n_global, n_global, n_cached, n_cached].map(|n| normal(n * d, &mut rng));
            let (own_k, own_v) = (normal(d, &mut rng), normal(d, &mut rng));
            let to_half = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
            let [gk16, gv16, ck16, cv16] = [&gk, &gv, &ck, &cv].map(|x| to_half(x));
            // As a span's later token sees them: some kept entries pushed out, the oldest
            // cached rows out of the window (one of them kept, so seen, but outside the
            // window's mass).
            let left = n_cached.min(3);
            let hidden: Vec<bool> = (0..n_global + left)
                .map(|j| {
                    if j < n_global {
                        j % 4 == 2
                    } else {
                        j != n_global + 1
                    }
                })
                .collect();
            for (hidden, window_from) in [(&[][..], n_global), (&hidden[..], n_global + left)] {
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
                    hidden,
                    window_from,
                };
                // The reference on the same rows widened (f16 -> f32 is exact).
                let wide = |r: Rows| match r {
                    Rows::F32(x) => x.to_vec(),
                    Rows::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
                };
                let keys = a.keys.map(wide);
                let values = a.values.map(wide);
                let window = n_global + n_cached + 1 - window_from;
                let (mut want, mut want_mass) = (vec![0f32; g * d], vec![0f32; window]);
                attend_reference(
                    a.queries,
                    WideRows {
                        keys: [&keys[0], &keys[1], &keys[2]],
                        values: [&values[0], &values[1], &values[2]],
                        hidden,
                        window_from,
                    },
                    (d, &mut Vec::new()),
                    (&mut want, Some(&mut want_mass)),
                );
                let close = |x: &[f32], y: &[f32]| {
                    x.iter()
                        .zip(y)
                        .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
                };
                let kernels = Kernel::available(&a);
                assert_eq!(kernels.last(), Some(&Kernel::Reference));
                for kernel in kernels {
                    let (mut out, mut mass) = (vec![0f32; g * d], vec![0f32; window]);
                    let mut scratch = (Vec::new(), Default::default());
                    attend_with(
                        kernel,
                        &a,
                        (&mut scratch.0, &mut scratch.1),
                        (&mut out, Some(&mut mass)),
                    );
                    let at = format!("{kernel:?}, g {g} d {d}");
                    assert!(close(&out, &want), "{at}: {out:?} vs {want:?}");
                    assert!(close(&mass, &want_mass), "{at}");
                }
            }
        }
    }
}
