//! The three forms of the gated recurrence agree: naive (f64 definition) == chunked ==
//! recurrent, across chunk boundaries, with a nonzero initial state, and with gates strong
//! enough that a careless chunked form would overflow. The same for GSA's two memories.

use candle_core::{Device, Tensor};
use liger_model::config::Variant;
use liger_model::gla::{self, gsa, reference, FeatureMaps, GlaInputs, Recurrence};
use liger_model::testing::SplitMix;

struct Case {
    b: usize,
    hkv: usize,
    g: usize,
    t: usize,
    d: usize,
    /// Multiplies raw keys: large values mean strong gates.
    key_scale: f32,
}

fn randn(rng: &mut SplitMix, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| scale * rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn inputs(c: &Case, variant: Variant, seed: u64) -> (GlaInputs, Tensor) {
    let mut rng = SplitMix(seed);
    let q = randn(&mut rng, &[c.b, c.hkv * c.g, c.t, c.d], 2.0);
    let k = randn(&mut rng, &[c.b, c.hkv, c.t, c.d], c.key_scale);
    let v = randn(&mut rng, &[c.b, c.hkv, c.t, c.d], 1.0);
    let fm = FeatureMaps {
        variant,
        gate_normalizer: variant.default_gate_normalizer(),
        slots: 0,
        differentiable: false,
    };
    let x = gla::feature_maps(fm, &q, &k, &v).unwrap();
    let s0 = randn(&mut rng, &[c.b, c.hkv, c.d, c.d], 0.5);
    (x, s0)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Runs the f64 reference head by head.
fn naive(c: &Case, x: &GlaInputs, s0: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let (q, k, g, v, s) = (flat(&x.q), flat(&x.k), flat(&x.gate), flat(&x.v), flat(s0));
    let (td, gtd, dd) = (c.t * c.d, c.g * c.t * c.d, c.d * c.d);
    let mut o = Vec::new();
    let mut st = Vec::new();
    for bh in 0..c.b * c.hkv {
        let (oh, sh) = reference::gla_head(&reference::Head {
            q: &q[bh * gtd..(bh + 1) * gtd],
            k: &k[bh * td..(bh + 1) * td],
            gate: &g[bh * td..(bh + 1) * td],
            v: &v[bh * td..(bh + 1) * td],
            s0: &s[bh * dd..(bh + 1) * dd],
            groups: c.g,
            len: c.t,
            dim: c.d,
        });
        o.extend(oh);
        st.extend(sh);
    }
    (o, st)
}

fn check_case(c: Case, variant: Variant, tol: f32) {
    let (x, s0) = inputs(&c, variant, 7 + c.t as u64);
    let (o_ref, s_ref) = naive(&c, &x, &s0);
    // Each form's output and final state within `tol` of the definition.
    let check = |form: &str, (o, s): (Tensor, Tensor)| {
        let (eo, es) = (
            max_rel_diff(&flat(&o), &o_ref),
            max_rel_diff(&flat(&s), &s_ref),
        );
        assert!(
            eo < tol && es < tol,
            "{form} t={}: out {eo:e}, state {es:e}",
            c.t
        );
    };
    for chunk in [1, 4, 16, 64] {
        check(
            &format!("chunked c={chunk}"),
            gla::chunked(&x, &s0, chunk).unwrap(),
        );
    }
    check("recurrent", gla::recurrent(&x, &s0).unwrap());
    // The host scan prefill runs on the CPU (`Recurrence::span`).
    assert!(gla::scan::applies(&x, &s0));
    check("scan", gla::scan::scan(&x, &s0).unwrap());
}

#[test]
fn gla_forms_agree_across_chunk_boundaries() {
    for t in [1, 3, 15, 16, 17, 33, 50] {
        let c = Case {
            b: 2,
            hkv: 2,
            g: 3,
            t,
            d: 8,
            key_scale: 2.0,
        };
        check_case(c, Variant::Gla, 2e-5);
    }
    // Head dim 32: the host scan splits the value columns into blocks of 16, with a kernel
    // per reader count up to 5 and the generic loop beyond.
    for g in [1, 2, 4, 5, 6] {
        let c = Case {
            b: 1,
            hkv: 3,
            g,
            t: 21,
            d: 32,
            key_scale: 2.0,
        };
        check_case(c, Variant::Gla, 5e-5);
    }
}

#[test]
fn hgrn2_forms_agree() {
    for t in [1, 16, 37] {
        let c = Case {
            b: 1,
            hkv: 3,
            g: 1,
            t,
            d: 8,
            key_scale: 2.0,
        };
        check_case(c, Variant::Hgrn2, 2e-5);
    }
}

#[test]
fn strong_gates_stay_finite_and_exact() {
    // Keys of magnitude ~60 give log-gates down to ~-4 per token (after /16): over a
    // 64-token chunk that is e^-250, which overflows f32 if any form divides by e^B.
    let c = Case {
        b: 1,
        hkv: 2,
        g: 2,
        t: 70,
        d: 8,
        key_scale: 60.0,
    };
    let (x, s0) = inputs(&c, Variant::Gla, 99);
    let (o, s) = gla::chunked(&x, &s0, 64).unwrap();
    assert!(flat(&o)
        .iter()
        .chain(flat(&s).iter())
        .all(|v| v.is_finite()));
    check_case(c, Variant::Gla, 2e-5);
}

#[test]
fn step_matches_one_token_recurrence() {
    let c = Case {
        b: 3,
        hkv: 2,
        g: 2,
        t: 1,
        d: 8,
        key_scale: 2.0,
    };
    let (x, s0) = inputs(&c, Variant::Gla, 3);
    let (o1, s1) = gla::recurrent(&x, &s0).unwrap();
    let sq = |t: &Tensor, d: usize| t.squeeze(d).unwrap();
    let (o2, s2) = gla::step(
        &sq(&x.q, 3),
        &sq(&x.k, 2),
        &sq(&x.gate, 2),
        &sq(&x.v, 2),
        &s0,
    )
    .unwrap();
    assert!(max_rel_diff(&flat(&o2), &flat(&o1)) < 1e-6);
    assert!(max_rel_diff(&flat(&s2), &flat(&s1)) < 1e-6);
}

#[test]
fn log_sigmoid_is_stable() {
    let x = Tensor::new(&[-200f32, -20.0, 0.0, 20.0, 200.0], &Device::Cpu).unwrap();
    let y = flat(&gla::feature::log_sigmoid(&x).unwrap());
    let want = [-200.0, -20.0, -std::f32::consts::LN_2, -2.06e-9, 0.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// GSA from raw inputs: the fast forms against the f64 recurrence, run head by head.
fn check_gsa(c: &Case, slots: usize, tol: f32) {
    let mut rng = SplitMix(11 + c.t as u64 + slots as u64);
    let q = randn(&mut rng, &[c.b, c.hkv * c.g, c.t, c.d], 1.0);
    let k = randn(&mut rng, &[c.b, c.hkv, c.t, c.d], c.key_scale);
    let v = randn(&mut rng, &[c.b, c.hkv, c.t, c.d], 1.0);
    let s0 = randn(&mut rng, &[c.b, c.hkv, 2 * slots, c.d], 0.5);
    let fm = FeatureMaps {
        variant: Variant::Gsa,
        gate_normalizer: 16.0,
        slots,
        differentiable: false,
    };
    let x = Recurrence::new(fm, &q, &k, &v).unwrap();

    let (qf, kf, vf, sf) = (flat(&q), flat(&k), flat(&v), flat(&s0));
    let (td, gtd, sd) = (c.t * c.d, c.g * c.t * c.d, 2 * slots * c.d);
    let (mut o_ref, mut s_ref) = (Vec::new(), Vec::new());
    for bh in 0..c.b * c.hkv {
        let (oh, sh) = reference::gsa_head(&reference::GsaHead {
            q: &qf[bh * gtd..(bh + 1) * gtd],
            k: &kf[bh * td..(bh + 1) * td],
            v: &vf[bh * td..(bh + 1) * td],
            s0: &sf[bh * sd..(bh + 1) * sd],
            groups: c.g,
            len: c.t,
            dim: c.d,
            slots,
            gate_normalizer: 16.0,
        });
        o_ref.extend(oh);
        s_ref.extend(sh);
    }
    let (o_rec, s_rec) = x.recurrent(&s0).unwrap();
    let mut forms = vec![("recurrent".to_owned(), o_rec, s_rec)];
    for chunk in [1, 4, 16, 64] {
        let (o, s) = x.chunked(&s0, chunk).unwrap();
        forms.push((format!("chunked c={chunk}"), o, s));
    }
    for (name, o, s) in forms {
        let (eo, es) = (
            max_rel_diff(&flat(&o), &o_ref),
            max_rel_diff(&flat(&s), &s_ref),
        );
        assert!(
            eo < tol && es < tol,
            "GSA {name} t={} M={slots}: out {eo:e}, state {es:e}",
            c.t
        );
    }
}

#[test]
fn gsa_forms_agree_with_and_without_pooling() {
    for t in [1, 3, 16, 17, 41] {
        for slots in [8, 4, 2] {
            let c = Case {
                b: 2,
                hkv: 2,
                g: 2,
                t,
                d: 8,
                key_scale: 2.0,
            };
            check_gsa(&c, slots, 2e-5);
        }
    }
}

#[test]
fn gsa_strong_gates_stay_exact() {
    let c = Case {
        b: 1,
        hkv: 1,
        g: 3,
        t: 70,
        d: 8,
        key_scale: 60.0,
    };
    // Keys this large make the slot scores q K~ run into the hundreds, and the softmax
    // turns their f32 rounding (~1e-7 relative) into ~1e-5 relative output error: that is
    // the conditioning of the function, not a form drifting apart.
    check_gsa(&c, 8, 3e-4);
}

#[test]
fn gsa_rejects_slots_that_do_not_divide_the_head_dim() {
    let q = Tensor::zeros((1, 2, 3, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((1, 1, 3, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let fm = FeatureMaps {
        variant: Variant::Gsa,
        gate_normalizer: 16.0,
        slots: 3,
        differentiable: false,
    };
    let err = gsa::feature_maps(fm, &q, &k, &k).unwrap_err().to_string();
    assert!(err.contains("3 slots"), "{err}");
}
