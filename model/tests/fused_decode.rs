//! The fused CPU decode step against the general path, its reference: for every family and
//! every mixer it covers, a batch of decode steps gives the same logits and leaves the same
//! states (window caches trimmed alike, recurrent memories equal), for one sequence (the
//! single-row kernel) and for many, across window boundaries, with spans of a few tokens
//! per sequence (speculative drafts: rows leave the window and take global-cache places
//! during the span), and beside a prompt chunk in the same batch (the short steps fused,
//! the chunk on the general path). Q8_0 weights run on their
//! blocks with f32 inputs, so they equal the dense model of the dequantized weights. Steps
//! it does not cover (GSA, half precision) must go to the general path; batches over 32
//! take several fused steps.
//!
//! The SmolLM2 fixture, in the default structure, runs last: its real shapes make every
//! projection many bands (the tiny models' are one band each).
//!
//! One test function: the fused-step counter is process-wide, and tests of one binary run
//! in parallel.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use liger_model::config::{KvDtype, LigerConfig, Variant};
use liger_model::layers::Quantization;
use liger_model::state::LayerState;
use liger_model::testing::{
    fused_decode_steps, max_abs, max_abs_diff, model_from_tensors, state_after, step_batch, Family,
    SplitMix, TinyCheckpoint, ALL_FAMILIES,
};
use liger_model::{Model, RuntimeOptions, SequenceState};
use liger_model::{FUSED_SPAN_TOKENS, FUSED_STEP_TOKENS};

fn liger(window: usize) -> LigerConfig {
    LigerConfig {
        window,
        ..Default::default()
    }
}

/// Which steps the fused step takes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Covered {
    /// Every decode step, and every span of a few tokens.
    Yes,
    /// Every decode step, and the spans during which no kept token passes the distance
    /// cap (those take the general path).
    BeforeCap,
    No,
}

/// (name, settings, which steps the fused step covers)
fn settings() -> Vec<(&'static str, Option<LigerConfig>, Covered)> {
    vec![
        ("transformer", None, Covered::Yes),
        ("gla", Some(liger(4)), Covered::Yes),
        (
            "hgrn2",
            Some(LigerConfig {
                variant: Variant::Hgrn2,
                gate_normalizer: 1.0,
                ..liger(5)
            }),
            Covered::Yes,
        ),
        (
            "window-only",
            Some(LigerConfig {
                window_weight: 1.0,
                recurrent_weight: 0.0,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            "gla+full1",
            Some(LigerConfig {
                full_attention_layers: vec![1],
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            "gla+global",
            Some(LigerConfig {
                global_cache: 3,
                sinks: 1,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            "window+sinks",
            Some(LigerConfig {
                window_weight: 1.0,
                recurrent_weight: 0.0,
                global_cache: 2,
                sinks: 2,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            // Window-only output; the memory is kept only to choose the cache (LoLA's rule).
            "window+global",
            Some(LigerConfig {
                window_weight: 1.0,
                recurrent_weight: 0.0,
                global_cache: 3,
                sinks: 1,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            // Places by attention while in the window: no memory at all.
            "window+attention",
            Some(LigerConfig {
                window_weight: 1.0,
                recurrent_weight: 0.0,
                global_cache: 3,
                sinks: 1,
                attention_places: 2,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            // Both kinds of places beside the GLA read-out.
            "gla+both",
            Some(LigerConfig {
                global_cache: 4,
                sinks: 1,
                attention_places: 1,
                ..liger(3)
            }),
            Covered::Yes,
        ),
        (
            // Both kinds of places, kept tokens past a distance cap of 6 (re-rotated keys).
            "gla+both+cap",
            Some(LigerConfig {
                global_cache: 4,
                sinks: 1,
                attention_places: 1,
                max_distance: Some(6),
                ..liger(3)
            }),
            Covered::BeforeCap,
        ),
        (
            // The same, its window and kept rows stored in f16 (copied as stored, the new
            // row rounded once).
            "gla+both+cap f16 rows",
            Some(LigerConfig {
                global_cache: 4,
                sinks: 1,
                attention_places: 1,
                max_distance: Some(6),
                kv_dtype: Some(KvDtype::F16),
                ..liger(3)
            }),
            Covered::BeforeCap,
        ),
        (
            // Rows stored in bf16: the general path.
            "gla+global bf16 rows",
            Some(LigerConfig {
                global_cache: 3,
                sinks: 1,
                kv_dtype: Some(KvDtype::Bf16),
                ..liger(3)
            }),
            Covered::No,
        ),
        (
            "gsa",
            Some(LigerConfig {
                variant: Variant::Gsa,
                slots: Some(4),
                ..liger(4)
            }),
            Covered::No,
        ),
    ]
}

fn with_fused(m: &Model, fast_decode: bool) -> Model {
    let mut m = m.clone();
    m.set_options(RuntimeOptions {
        fast_decode,
        ..m.options()
    })
    .unwrap();
    m
}

fn assert_states_equal(a: &SequenceState, b: &SequenceState, what: &str) {
    assert_eq!(a.position(), b.position(), "{what}");
    let close = |x: &Tensor, y: &Tensor, part: &str| {
        assert_eq!(x.dims(), y.dims(), "{what}: {part} shape");
        if y.elem_count() == 0 {
            return; // window-only layers keep no recurrent memory
        }
        let d = max_abs_diff(x, y);
        // Rows stored in f16 may round a last bit apart (their inputs differ by float noise).
        let tol = if y.dtype() == DType::F16 { 1e-3 } else { 1e-5 };
        assert!(
            d <= tol * max_abs(y).max(1.0),
            "{what}: {part} differs by {d}"
        );
    };
    for (l, (x, y)) in a.layers().iter().zip(b.layers()).enumerate() {
        let caches = match (x, y) {
            (LayerState::Softmax(cx), LayerState::Softmax(cy)) => (cx, cy),
            (
                LayerState::Liger {
                    window: cx,
                    recurrent: rx,
                    global: gx,
                },
                LayerState::Liger {
                    window: cy,
                    recurrent: ry,
                    global: gy,
                },
            ) => {
                close(rx, ry, &format!("layer {l} recurrent memory"));
                // The same tokens kept in the same places, with the same saliences.
                assert_eq!(gx.len(), gy.len(), "{what}: layer {l} global cache length");
                assert_eq!(
                    gx.positions(),
                    gy.positions(),
                    "{what}: layer {l} global cache positions"
                );
                // Saliences: sinks score +inf on both paths.
                let scores_close = |x: &Tensor, y: &Tensor, part: &str| {
                    let (x, y) = (
                        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    assert_eq!(x.len(), y.len(), "{what}: layer {l} {part}");
                    for (a, b) in x.iter().zip(&y) {
                        assert!(
                            a == b || (a - b).abs() <= 1e-4,
                            "{what}: layer {l} {part}: {a} vs {b}"
                        );
                    }
                };
                if let (Some(x), Some(y)) = (gx.kept(), gy.kept()) {
                    close(x.0, y.0, &format!("layer {l} global keys"));
                    close(x.1, y.1, &format!("layer {l} global values"));
                }
                for (x, y, part) in [
                    (gx.kept_scores(), gy.kept_scores(), "global saliences"),
                    (
                        gx.kept_attention(),
                        gy.kept_attention(),
                        "global attention scores",
                    ),
                    (gx.window_scores(), gy.window_scores(), "window scores"),
                    (
                        gx.window_attention(),
                        gy.window_attention(),
                        "window attention sums",
                    ),
                ] {
                    let (x, y) = (x.unwrap(), y.unwrap());
                    assert_eq!(x.is_some(), y.is_some(), "{what}: layer {l} {part}");
                    if let (Some(x), Some(y)) = (&x, &y) {
                        scores_close(x, y, part);
                    }
                }
                (cx, cy)
            }
            _ => panic!("{what}: layer {l} kinds differ"),
        };
        assert_eq!(
            caches.0.len(),
            caches.1.len(),
            "{what}: layer {l} cache length"
        );
        if let (Some((kx, vx)), Some((ky, vy))) = (caches.0.parts(), caches.1.parts()) {
            close(kx, ky, &format!("layer {l} keys"));
            close(vx, vy, &format!("layer {l} values"));
        }
    }
}

/// Steps `histories.len()` sequences with both models: three one-token steps, then spans of
/// one to three tokens (drafts being checked), one of them with a prompt chunk for the first
/// sequence beside the others' spans (a server step while a prompt is read: the spans fuse,
/// the chunk does not). Checks equality, and that the fused path ran where it covers the
/// model (`covered`), in as many fused steps as the tokens need. Returns how many fused
/// steps with spans in them ran, and how many the tokens needed.
fn check(
    fused: &Model,
    reference: &Model,
    histories: &[Vec<u32>],
    covered: Covered,
    what: &str,
) -> (u64, u64) {
    let mut spans_fused = (0, 0);
    let mut rng = SplitMix(histories.len() as u64);
    // Both start from the reference's states: prompts are read by the general path anyway,
    // (on a Q8_0 model, with the same kernel as the fused step or the dense product).
    let mut sf: Vec<SequenceState> = histories
        .iter()
        .map(|h| state_after(reference, h).unwrap())
        .collect();
    let mut sr: Vec<SequenceState> = histories
        .iter()
        .map(|h| state_after(reference, h).unwrap())
        .collect();
    let (most, short) = (FUSED_STEP_TOKENS, FUSED_SPAN_TOKENS);
    for step in 0..8 {
        let mut toks: Vec<Vec<u32>> = (0..histories.len())
            .map(|i| {
                let len = if step < 3 { 1 } else { 1 + (i + step) % 3 };
                rng.tokens(len, 61)
            })
            .collect();
        if step == 6 {
            toks[0] = rng.tokens(short + 1, 61);
        }
        // Fused steps the batch takes: its short steps, packed in order up to `most` tokens.
        let mut expected = 0;
        let mut room = 0;
        for t in toks.iter().map(Vec::len).filter(|&l| l <= short) {
            if t > room {
                expected += 1;
                room = most;
            }
            room -= t;
        }
        if covered == Covered::No {
            expected = 0;
        }
        let before = fused_decode_steps();
        let out_f = step_batch(fused, &mut sf, &toks).unwrap();
        let ran = fused_decode_steps() - before;
        let spans = toks.iter().any(|t| t.len() > 1);
        if covered == Covered::BeforeCap && spans {
            assert!(ran <= expected, "{what} step {step}: fused steps taken");
        } else {
            assert_eq!(
                ran, expected,
                "{what} step {step}: fused steps taken ({toks:?})"
            );
        }
        if spans {
            spans_fused.0 += ran;
            spans_fused.1 += expected;
        }
        let before = fused_decode_steps();
        let out_r = step_batch(reference, &mut sr, &toks).unwrap();
        assert_eq!(
            fused_decode_steps(),
            before,
            "{what}: the reference must not fuse"
        );
        for (i, (a, b)) in out_f.iter().zip(&out_r).enumerate() {
            assert_eq!(a.dims(), b.dims());
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-4 * max_abs(b).max(1.0),
                "{what} step {step} seq {i}: logits differ by {d}"
            );
        }
        for (i, (a, b)) in sf.iter().zip(&sr).enumerate() {
            assert_states_equal(a, b, &format!("{what} step {step} seq {i}"));
        }
    }
    spans_fused
}

/// A Q8_0 Liger model (untied, so its LM head is quantized and named) and the dense model
/// of its dequantized weights.
fn q8_0_and_dequantized(family: Family) -> (Model, Model) {
    let mut tc = TinyCheckpoint::new(family, 13)
        .unwrap()
        .with_liger(&liger(4));
    if tc.config["tie_word_embeddings"] == true {
        tc.config["tie_word_embeddings"] = false.into();
        let embed = tc.tensors["model.embed_tokens.weight"].clone();
        tc.tensors.insert("lm_head.weight".into(), embed);
    }
    let mut quantized = tc.model(DType::F32).unwrap();
    let formats = quantized.quantize(Quantization::Q8_0).unwrap();
    assert!(formats.iter().any(|(f, _)| f == "q8_0"), "{formats:?}");
    let dense: HashMap<String, Tensor> = quantized.named_weights().unwrap().into_iter().collect();
    let cfg = tc.model_config().unwrap();
    let dequantized = model_from_tensors(cfg, &dense, DType::F32, &Device::Cpu).unwrap();
    (
        with_fused(&quantized, true),
        with_fused(&dequantized, false),
    )
}

#[test]
fn fused_decode_equals_the_general_path() {
    let mut rng = SplitMix(7);
    // Fresh, short, at and past the windows (3-6) and the Mistral sliding window (6).
    let histories: Vec<Vec<u32>> = [0, 1, 3, 5, 9, 14]
        .iter()
        .map(|&n| rng.tokens(n, 61))
        .collect();
    for family in ALL_FAMILIES {
        for (name, liger, covered) in settings() {
            let mut tc = TinyCheckpoint::new(family, 11).unwrap();
            if let Some(l) = &liger {
                tc = tc.with_liger(l);
            }
            let base = tc.model(DType::F32).unwrap();
            let (fused, reference) = (with_fused(&base, true), with_fused(&base, false));
            let what = format!("{family:?}/{name}");
            let mut spans: Vec<(u64, u64)> = vec![check(
                &fused,
                &reference,
                &histories,
                covered,
                &format!("{what} batch"),
            )];
            for h in [&histories[0], &histories[4]] {
                let one = std::slice::from_ref(h);
                spans.push(check(
                    &fused,
                    &reference,
                    one,
                    covered,
                    &format!("{what} alone"),
                ));
            }
            // Where a kept token passing the cap sends a span to the general path, the
            // others still fuse.
            let (ran, needed) = spans.iter().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
            match covered {
                Covered::Yes => assert!(ran == needed && ran > 0, "{what}: spans fused"),
                Covered::BeforeCap => assert!(0 < ran && ran < needed, "{what}: {ran} of {needed}"),
                Covered::No => assert_eq!(ran, 0, "{what}"),
            }
        }
        // Called from inside a rayon pool, the step brings threads of its own.
        let base = TinyCheckpoint::new(family, 11)
            .unwrap()
            .with_liger(&liger(4))
            .model(DType::F32)
            .unwrap();
        let (fused, reference) = (with_fused(&base, true), with_fused(&base, false));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            assert!(rayon::current_thread_index().is_some());
            check(
                &fused,
                &reference,
                &histories,
                Covered::Yes,
                &format!("{family:?} in a pool"),
            );
        });
        let (q8, dequantized) = q8_0_and_dequantized(family);
        let what = format!("{family:?} q8_0");
        check(&q8, &dequantized, &histories, Covered::Yes, &what);
        check(
            &q8,
            &dequantized,
            &histories[3..4],
            Covered::Yes,
            &format!("{what} alone"),
        );
        // Beyond the fused step's batch limit: several fused steps (32 tokens at most each).
        let many: Vec<Vec<u32>> = (0..33).map(|i| rng.tokens(i % 7, 61)).collect();
        check(
            &fused,
            &reference,
            &many,
            Covered::Yes,
            &format!("{family:?} 33 sequences"),
        );
        // Half precision: the general path.
        let half = TinyCheckpoint::new(family, 11)
            .unwrap()
            .with_liger(&liger(4))
            .model(DType::F16)
            .unwrap();
        let mut s = state_after(&half, &histories[2]).unwrap();
        let before = fused_decode_steps();
        half.forward(&[5], &mut s, liger_model::Logits::Last)
            .unwrap();
        assert_eq!(
            fused_decode_steps(),
            before,
            "{family:?}: f16 must not fuse"
        );
    }
    fixture_shapes(&mut rng);
}

/// The SmolLM2 fixture's real shapes, as the default structure the server runs (a 240-token
/// window, 384 cache places in f16): every projection is many bands of the packed kernel
/// (the tiny models' are one band each), so this is where the bands' split between threads
/// and the waiting threads' prefetch run; histories short and past the window.
fn fixture_shapes(rng: &mut SplitMix) {
    let base = common::fixture_in_default_structure();
    let vocab = base.config().vocab_size;
    let (fused, reference) = (with_fused(&base, true), with_fused(&base, false));
    let histories: Vec<Vec<u32>> = [20, 300].iter().map(|&n| rng.tokens(n, vocab)).collect();
    let states: Vec<SequenceState> = histories
        .iter()
        .map(|h| state_after(&reference, h).unwrap())
        .collect();
    // Thirty layers of real weights carry the two paths' float noise (their sums run in
    // different orders) further than the tiny models do: logits are held to 1e-3 of their
    // largest, and the state to what the logits read from it.
    for (what, from) in [("fixture batch", 0), ("fixture alone", 1)] {
        let (mut sf, mut sr) = (states[from..].to_vec(), states[from..].to_vec());
        // Three decode steps, then two of spans (drafts checked: at 300 tokens, rows leave
        // the window during the span and compete for places).
        for step in 0..5 {
            let len = if step < 3 { 1 } else { 5 };
            let toks: Vec<Vec<u32>> = sf.iter().map(|_| rng.tokens(len, vocab)).collect();
            let before = fused_decode_steps();
            let out_f = step_batch(&fused, &mut sf, &toks).unwrap();
            assert_eq!(
                fused_decode_steps() - before,
                1,
                "{what} step {step}: fused"
            );
            let out_r = step_batch(&reference, &mut sr, &toks).unwrap();
            for (i, (a, b)) in out_f.iter().zip(&out_r).enumerate() {
                let d = max_abs_diff(a, b);
                assert!(
                    d <= 1e-3 * max_abs(b),
                    "{what} step {step} seq {i}: logits differ by {d} (largest {})",
                    max_abs(b)
                );
            }
        }
    }
}
