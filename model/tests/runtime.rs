//! Model-level equivalences on tiny random checkpoints of every family:
//! - prefill-then-decode == one full forward, across window and chunk boundaries;
//! - a batched step == the same sequences one at a time;
//! - Liger with recurrent weight 0 == windowed softmax attention, and with a window at
//!   least the sequence length == full attention;
//! - states serialize, fork and restore exactly, and stay constant-size.

use candle_core::{DType, Tensor};
use liger_model::config::{KvDtype, LigerConfig, Variant};
use liger_model::testing::{
    max_abs, state_after, step_batch, Family, SplitMix, TinyCheckpoint, ALL_FAMILIES,
};
use liger_model::{Logits, Model, RuntimeOptions, SeqStep, SequenceState};

const LEN: usize = 29;

fn liger(window: usize) -> LigerConfig {
    LigerConfig {
        window,
        ..Default::default()
    }
}

/// Window attention alone (read-out off) with 5 places: a sink, two by attention, two by
/// recall, so tokens pushed out of the attention places move on to the recall places.
fn window_both(window: usize) -> LigerConfig {
    LigerConfig {
        recurrent_weight: 0.0,
        window_weight: 1.0,
        global_cache: 5,
        sinks: 1,
        attention_places: 2,
        ..liger(window)
    }
}

/// The model variants every equivalence runs on.
fn variants(family: Family) -> Vec<(String, Model)> {
    let base = || TinyCheckpoint::new(family, 42).unwrap();
    let mut out = vec![("transformer".to_string(), base().model(DType::F32).unwrap())];
    let settings = [
        ("gla", liger(4)),
        (
            "hgrn2",
            LigerConfig {
                variant: Variant::Hgrn2,
                gate_normalizer: 1.0,
                ..liger(5)
            },
        ),
        (
            "gsa",
            LigerConfig {
                variant: Variant::Gsa,
                slots: Some(4), // head dim 8: pooled in pairs
                ..liger(4)
            },
        ),
        (
            "gla+full1",
            LigerConfig {
                full_attention_layers: vec![1],
                ..liger(3)
            },
        ),
        (
            // A global cache of 4 places (one a sink) beside a 3-token window: by token 29
            // many tokens have competed for places and lost.
            "gla+global",
            LigerConfig {
                global_cache: 4,
                sinks: 1,
                ..liger(3)
            },
        ),
        (
            "hgrn2+global",
            LigerConfig {
                variant: Variant::Hgrn2,
                gate_normalizer: 1.0,
                global_cache: 2,
                ..liger(4)
            },
        ),
        (
            // StreamingLLM: window attention plus two sinks, no recurrent memory.
            "window+sinks",
            LigerConfig {
                recurrent_weight: 0.0,
                window_weight: 1.0,
                global_cache: 2,
                sinks: 2,
                ..liger(3)
            },
        ),
        (
            // Window-only output, the memory kept only to choose the cache.
            "window+global",
            LigerConfig {
                recurrent_weight: 0.0,
                window_weight: 1.0,
                global_cache: 3,
                sinks: 1,
                ..liger(3)
            },
        ),
        (
            // Places given by the attention tokens got while in the window: no memory.
            "window+attention",
            LigerConfig {
                recurrent_weight: 0.0,
                window_weight: 1.0,
                global_cache: 3,
                sinks: 1,
                attention_places: 2,
                ..liger(3)
            },
        ),
        ("window+both", window_both(3)),
        (
            // Both kinds of places with a distance cap of 6 on a 29-token run: the sink
            // and most kept tokens are scored at the cap long before the end.
            "window+both+cap",
            LigerConfig {
                max_distance: Some(6),
                ..window_both(3)
            },
        ),
        (
            "gla+global+cap",
            LigerConfig {
                global_cache: 4,
                sinks: 1,
                max_distance: Some(5),
                ..liger(3)
            },
        ),
        (
            // Window and kept rows stored in f16: rounded once when stored, so a query
            // reading them from the state sees them rounded, one reading them in its own
            // chunk does not (prefill-then-decode is equal within f16's rounding).
            "window+both+cap f16 rows",
            LigerConfig {
                max_distance: Some(6),
                kv_dtype: Some(KvDtype::F16),
                ..window_both(3)
            },
        ),
        (
            "gsa+attention",
            LigerConfig {
                variant: Variant::Gsa,
                slots: Some(4),
                global_cache: 3,
                attention_places: 3,
                ..liger(4)
            },
        ),
    ];
    for (name, l) in settings {
        let mut m = base().with_liger(&l).model(DType::F32).unwrap();
        // Small chunks so the test crosses many chunk boundaries, and global-cache layers
        // read long spans in several pieces.
        m.set_options(RuntimeOptions {
            chunk_size: 4,
            global_block: 5,
            ..Default::default()
        })
        .unwrap();
        out.push((name.to_string(), m));
    }
    out
}

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    SplitMix(seed).tokens(n, 61)
}

use liger_model::testing::max_abs_diff as max_diff;

fn full_forward(m: &Model, toks: &[u32]) -> Tensor {
    let mut s = m.new_state().unwrap();
    m.forward(toks, &mut s, Logits::All).unwrap()
}

#[test]
fn prefill_then_decode_equals_one_forward() {
    for family in ALL_FAMILIES {
        for (name, m) in variants(family) {
            let toks = tokens(1, LEN);
            let all = full_forward(&m, &toks);
            // Uneven prefill pieces, then token-by-token decode.
            for split in [1, 7, 13] {
                let mut s = m.new_state().unwrap();
                let mut rows = vec![m
                    .forward(&toks[..split.min(5)], &mut s, Logits::All)
                    .unwrap()];
                if split > 5 {
                    rows.push(m.forward(&toks[5..split], &mut s, Logits::All).unwrap());
                }
                for t in &toks[split..] {
                    rows.push(
                        m.forward(std::slice::from_ref(t), &mut s, Logits::All)
                            .unwrap(),
                    );
                }
                let stepwise = Tensor::cat(&rows, 0).unwrap();
                let d = max_diff(&stepwise, &all);
                // f16 keeps 11 mantissa bits: relative to the largest logit.
                let tol = if name.ends_with("f16 rows") {
                    1e-2 * max_abs(&all)
                } else {
                    1e-4
                };
                assert!(d < tol, "{family:?}/{name} split {split}: {d}");
                assert_eq!(s.position(), LEN);
            }
        }
    }
}

#[test]
fn batched_step_equals_one_at_a_time() {
    for family in ALL_FAMILIES {
        for (name, m) in variants(family) {
            // Three sequences with different histories, then one mixed step: two decode
            // tokens and a prefill chunk, plus a fresh sequence.
            let histories = [tokens(2, 9), tokens(3, 1), tokens(4, 14), vec![]];
            let steps = [tokens(5, 1), tokens(6, 6), tokens(7, 1), tokens(8, 11)];
            let mut solo_states: Vec<SequenceState> = Vec::new();
            let mut solo_logits = Vec::new();
            for (h, st) in histories.iter().zip(&steps) {
                let mut s = state_after(&m, h).unwrap();
                solo_logits.push(m.forward(st, &mut s, Logits::All).unwrap());
                solo_states.push(s);
            }
            let mut states: Vec<SequenceState> = histories
                .iter()
                .map(|h| state_after(&m, h).unwrap())
                .collect();
            let out = step_batch(&m, &mut states, &steps).unwrap();
            for (i, (a, b)) in out.iter().zip(&solo_logits).enumerate() {
                let d = max_diff(a, b);
                assert!(d < 1e-4, "{family:?}/{name} seq {i}: {d}");
            }
            // And the states continue identically.
            let next = tokens(9, 1);
            for (a, b) in states.iter_mut().zip(solo_states.iter_mut()) {
                let la = m.forward(&next, a, Logits::Last).unwrap();
                let lb = m.forward(&next, b, Logits::Last).unwrap();
                assert!(max_diff(&la, &lb) < 1e-4, "{family:?}/{name} continuation");
            }
        }
    }
}

/// `forward_batch` moves the general path onto rayon's pool when called from outside it
/// (`Model::on_pool`); called from a pool thread it runs where it is. Same logits, same
/// states, to the bit.
#[test]
fn forward_is_the_same_on_and_off_the_pool() {
    for family in ALL_FAMILIES {
        for (name, m) in variants(family) {
            let history = tokens(2, 9);
            let chunk = tokens(3, 17);
            let mut outside = state_after(&m, &history).unwrap();
            let mut inside = state_after(&m, &history).unwrap();
            let a = m.forward(&chunk, &mut outside, Logits::All).unwrap();
            let b = rayon::scope(|_| m.forward(&chunk, &mut inside, Logits::All).unwrap());
            assert_eq!(max_diff(&a, &b), 0.0, "{family:?}/{name}");
            let next = tokens(4, 1);
            let la = m.forward(&next, &mut outside, Logits::Last).unwrap();
            let lb = m.forward(&next, &mut inside, Logits::Last).unwrap();
            assert_eq!(max_diff(&la, &lb), 0.0, "{family:?}/{name} continuation");
        }
    }
}

#[test]
fn last_logits_are_the_last_row_of_all() {
    let m = TinyCheckpoint::new(Family::Llama, 1)
        .unwrap()
        .with_liger(&liger(4))
        .model(DType::F32)
        .unwrap();
    let toks = tokens(11, 10);
    let all = full_forward(&m, &toks);
    let mut s = m.new_state().unwrap();
    let last = m.forward(&toks, &mut s, Logits::Last).unwrap();
    // Not bit-equal: the matmuls see different row counts and block differently.
    assert!(max_diff(&last, &all.narrow(0, 9, 1).unwrap()) < 1e-4);
}

#[test]
fn recurrent_weight_zero_is_windowed_attention() {
    for family in ALL_FAMILIES {
        let window = 5;
        let only_window = LigerConfig {
            window,
            window_weight: 1.0,
            recurrent_weight: 0.0,
            ..Default::default()
        };
        let m = TinyCheckpoint::new(family, 3)
            .unwrap()
            .with_liger(&only_window)
            .model(DType::F32)
            .unwrap();
        // The same weights as a Transformer with a sliding window of `window` keys before the
        // query (Hugging Face counts the query itself, hence +1).
        let mut tc = TinyCheckpoint::new(family, 3).unwrap();
        tc.config["model_type"] = "mistral".into();
        tc.config["sliding_window"] = (window + 1).into();
        if family == Family::Qwen2 {
            // Mistral has no q/k/v biases: keep Qwen2 and turn its window on instead.
            tc.config["model_type"] = "qwen2".into();
            tc.config["use_sliding_window"] = true.into();
            tc.config["max_window_layers"] = 0.into();
        }
        let reference = tc.model(DType::F32).unwrap();
        let toks = tokens(12, LEN);
        let d = max_diff(&full_forward(&m, &toks), &full_forward(&reference, &toks));
        assert!(d < 1e-4, "{family:?}: {d}");
        // Nothing recurrent is kept: the state is the window caches alone.
        let bytes = m.state_spec().bytes_by_kind_at(1000);
        assert_eq!((bytes.recurrent, bytes.kv_cache), (0, 0));
        assert!(bytes.window > 0);
    }
}

#[test]
fn window_covering_the_sequence_is_full_attention() {
    for family in [Family::Llama, Family::Qwen2] {
        let wide = LigerConfig {
            window: LEN,
            window_weight: 1.0,
            recurrent_weight: 0.0,
            ..Default::default()
        };
        let m = TinyCheckpoint::new(family, 4)
            .unwrap()
            .with_liger(&wide)
            .model(DType::F32)
            .unwrap();
        let t = TinyCheckpoint::new(family, 4)
            .unwrap()
            .model(DType::F32)
            .unwrap();
        let toks = tokens(13, LEN);
        let d = max_diff(&full_forward(&m, &toks), &full_forward(&t, &toks));
        assert!(d < 1e-4, "{family:?}: {d}");
    }
}

fn gsa(window: usize) -> LigerConfig {
    LigerConfig {
        variant: Variant::Gsa,
        slots: Some(2),
        ..liger(window)
    }
}

#[test]
fn liger_state_is_constant_size_and_round_trips() {
    let window_only = LigerConfig {
        window_weight: 1.0,
        recurrent_weight: 0.0,
        ..liger(4)
    };
    let global = LigerConfig {
        global_cache: 5,
        sinks: 2,
        ..liger(4)
    };
    let sinks_only = LigerConfig {
        global_cache: 2,
        sinks: 2,
        ..window_only.clone()
    };
    let window_global = LigerConfig {
        global_cache: 5,
        sinks: 2,
        ..window_only.clone()
    };
    let window_attention = LigerConfig {
        attention_places: 3,
        ..window_global.clone()
    };
    let window_both = LigerConfig {
        attention_places: 1,
        ..window_global.clone()
    };
    let capped = LigerConfig {
        max_distance: Some(7),
        ..window_both.clone()
    };
    let half_rows = LigerConfig {
        kv_dtype: Some(KvDtype::F16),
        ..capped.clone()
    };
    for l in [
        liger(4),
        gsa(4),
        window_only,
        global,
        sinks_only,
        window_global,
        window_attention,
        window_both,
        capped,
        half_rows,
    ] {
        check_state_round_trip(&l);
    }
}

#[test]
fn global_places_covering_the_sequence_are_a_window_covering_it() {
    // Every token that leaves the 3-token window finds a place, so each query sees all the
    // tokens before it, as with a window as long as the sequence (whatever the salience).
    for (family, attention_places) in [(Family::Llama, 0), (Family::Qwen2, 0), (Family::Llama, 9)] {
        let with_places = LigerConfig {
            global_cache: LEN,
            sinks: 1,
            attention_places,
            ..liger(3)
        };
        let m = TinyCheckpoint::new(family, 4)
            .unwrap()
            .with_liger(&with_places)
            .model(DType::F32)
            .unwrap();
        let w = TinyCheckpoint::new(family, 4)
            .unwrap()
            .with_liger(&liger(LEN))
            .model(DType::F32)
            .unwrap();
        let toks = tokens(13, LEN);
        let d = max_diff(&full_forward(&m, &toks), &full_forward(&w, &toks));
        assert!(d < 1e-4, "{family:?}: {d}");
        // ... and fewer places than that do change the output.
        let few = TinyCheckpoint::new(family, 4)
            .unwrap()
            .with_liger(&LigerConfig {
                global_cache: 2,
                attention_places: attention_places.min(1),
                ..with_places
            })
            .model(DType::F32)
            .unwrap();
        assert!(max_diff(&full_forward(&few, &toks), &full_forward(&w, &toks)) > 1e-3);
    }
}

#[test]
fn the_distance_cap_changes_nothing_until_a_kept_token_is_past_it() {
    // The sink (token 0) is the oldest kept token: with a cap of 10 the first 11 tokens'
    // logits are the uncapped model's, and later ones are not.
    let uncapped = LigerConfig {
        global_cache: 4,
        sinks: 1,
        attention_places: 1,
        ..liger(3)
    };
    let capped = LigerConfig {
        max_distance: Some(10),
        ..uncapped.clone()
    };
    let model = |l: &LigerConfig| {
        TinyCheckpoint::new(Family::Llama, 6)
            .unwrap()
            .with_liger(l)
            .model(DType::F32)
            .unwrap()
    };
    let toks = tokens(15, LEN);
    let (a, b) = (
        full_forward(&model(&uncapped), &toks),
        full_forward(&model(&capped), &toks),
    );
    let rows = |t: &Tensor, from: usize, len: usize| t.narrow(0, from, len).unwrap();
    assert_eq!(max_diff(&rows(&a, 0, 11), &rows(&b, 0, 11)), 0.0);
    for p in 11..LEN {
        assert!(
            max_diff(&rows(&a, p, 1), &rows(&b, p, 1)) > 1e-4,
            "position {p} is past the cap"
        );
    }
}

fn check_state_round_trip(l: &LigerConfig) {
    let m = TinyCheckpoint::new(Family::Llama, 5)
        .unwrap()
        .with_liger(l)
        .model(DType::F32)
        .unwrap();
    // GLA keeps a d x d memory per KV head (head dim 8), GSA two M x d ones.
    let rows = match l.gsa_slots() {
        _ if !l.keeps_memory() => 0,
        Some(m) => 2 * m,
        None => 8,
    };
    assert_eq!(m.state_spec().recurrent_rows, rows);
    let toks = tokens(14, 40);
    let mut s = m.new_state().unwrap();
    m.forward(&toks[..10], &mut s, Logits::Last).unwrap();
    let size_10 = s.size_bytes();
    m.forward(&toks[10..30], &mut s, Logits::Last).unwrap();
    assert_eq!(s.size_bytes(), size_10, "state grew with context");
    assert_eq!(s.size_bytes(), m.state_spec().bytes_at(30));

    // Serialize, restore, fork: all three continue exactly like the original.
    let bytes = s.to_bytes().unwrap();
    let mut restored = SequenceState::from_bytes(m.state_spec(), &bytes).unwrap();
    let mut fork = s.clone();
    let a = m.forward(&toks[30..], &mut s, Logits::All).unwrap();
    let b = m.forward(&toks[30..], &mut restored, Logits::All).unwrap();
    let c = m.forward(&toks[30..], &mut fork, Logits::All).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    assert_eq!(max_diff(&a, &c), 0.0);

    // A blob is checked against the model it is loaded into.
    let other = TinyCheckpoint::new(Family::Qwen2, 5)
        .unwrap()
        .with_liger(l)
        .model(DType::F32)
        .unwrap();
    let err = SequenceState::from_bytes(other.state_spec(), &bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sequence state"), "{err}");
    assert!(SequenceState::from_bytes(m.state_spec(), &bytes[..bytes.len() / 2]).is_err());
    assert!(SequenceState::from_bytes(m.state_spec(), b"garbage").is_err());
}

#[test]
fn transformer_state_grows_with_context() {
    let m = TinyCheckpoint::new(Family::Llama, 5)
        .unwrap()
        .model(DType::F32)
        .unwrap();
    let mut s = m.new_state().unwrap();
    m.forward(&tokens(15, 10), &mut s, Logits::Last).unwrap();
    let a = s.size_bytes();
    m.forward(&tokens(16, 10), &mut s, Logits::Last).unwrap();
    assert_eq!(s.size_bytes(), 2 * a);
    let restored = SequenceState::from_bytes(m.state_spec(), &s.to_bytes().unwrap()).unwrap();
    assert_eq!(restored.size_bytes(), s.size_bytes());
}

#[test]
fn bad_inputs_are_errors_and_leave_states_untouched() {
    let m = TinyCheckpoint::new(Family::Llama, 6)
        .unwrap()
        .with_liger(&liger(4))
        .model(DType::F32)
        .unwrap();
    let mut good = m.new_state().unwrap();
    m.forward(&tokens(17, 5), &mut good, Logits::Last).unwrap();
    let before = good.to_bytes().unwrap();
    let mut other = m.new_state().unwrap();
    let bad_token = [9999u32];
    let ok_tokens = tokens(18, 3);
    let mut batch = [
        SeqStep {
            tokens: &ok_tokens,
            state: &mut good,
            argmax_only: false,
        },
        SeqStep {
            tokens: &bad_token,
            state: &mut other,
            argmax_only: false,
        },
    ];
    let err = m
        .forward_batch(&mut batch, Logits::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token id 9999"), "{err}");
    assert!(
        good.to_bytes().unwrap() == before,
        "state changed by a failed step"
    );
    let empty: [u32; 0] = [];
    assert!(m.forward(&empty, &mut good, Logits::Last).is_err());
    assert_eq!(good.position(), 5);
}

#[test]
fn global_cache_pieces_are_prefill_chunks() {
    // A span read in pieces of 3 or 7 tokens equals it read whole (pieces of 128).
    let l = LigerConfig {
        max_distance: Some(6),
        ..window_both(3)
    };
    let base = TinyCheckpoint::new(Family::Llama, 12)
        .unwrap()
        .with_liger(&l)
        .model(DType::F32)
        .unwrap();
    let toks = tokens(23, LEN);
    let whole = full_forward(&base, &toks);
    for block in [3, 7] {
        let mut m = base.clone();
        m.set_options(RuntimeOptions {
            global_block: block,
            ..Default::default()
        })
        .unwrap();
        let d = max_diff(&full_forward(&m, &toks), &whole);
        assert!(d < 1e-4, "pieces of {block}: {d}");
    }
    let mut m = base.clone();
    assert!(m
        .set_options(RuntimeOptions {
            global_block: 0,
            ..Default::default()
        })
        .is_err());
}

#[test]
fn host_prefill_attention_equals_the_candle_path() {
    // Layers with a global cache read prefill pieces with the host kernel unless told not
    // to; the candle path is its reference. Caps the pieces cross, f16 rows, pieces that
    // start mid-window, recall and attention places, a recurrent read-out; without a cap,
    // the pieces' scores are multiplied out block by block.
    let settings = [
        LigerConfig {
            global_cache: 6,
            sinks: 1,
            ..window_both(4)
        },
        LigerConfig {
            max_distance: Some(6),
            ..window_both(3)
        },
        LigerConfig {
            max_distance: Some(9),
            kv_dtype: Some(KvDtype::F16),
            ..window_both(4)
        },
        LigerConfig {
            global_cache: 4,
            sinks: 1,
            max_distance: Some(7),
            ..liger(3)
        },
    ];
    for (case, l) in settings.iter().enumerate() {
        let base = TinyCheckpoint::new(Family::Llama, 31)
            .unwrap()
            .with_liger(l)
            .model(DType::F32)
            .unwrap();
        for block in [5, 128] {
            let with = |host_attention| {
                let mut m = base.clone();
                m.set_options(RuntimeOptions {
                    global_block: block,
                    host_attention,
                    ..Default::default()
                })
                .unwrap();
                m
            };
            let (host, candle) = (with(true), with(false));
            // Long enough for pieces of several blocks of queries (`global::QUERY_BLOCK`),
            // except with f16 rows: the two paths round them apart, and over 130 tokens
            // the logits drift a few 1e-4 apart (1e-4 before the host norm, 4e-4 after).
            let n = if l.kv_dtype.is_some() { LEN } else { 130 };
            let long = tokens(40 + case as u64, n);
            let d = max_diff(&full_forward(&host, &long), &full_forward(&candle, &long));
            assert!(d < 1e-4, "case {case}, pieces of {block}: {d}");
            let toks = &long[..LEN];
            // Then decode: the caches the two prefills left must agree too.
            let (mut sh, mut sc) = (host.new_state().unwrap(), candle.new_state().unwrap());
            host.forward(&toks[..20], &mut sh, Logits::Last).unwrap();
            candle.forward(&toks[..20], &mut sc, Logits::Last).unwrap();
            for &t in &toks[20..] {
                let a = host.forward(&[t], &mut sh, Logits::Last).unwrap();
                let b = candle.forward(&[t], &mut sc, Logits::Last).unwrap();
                let d = max_diff(&a, &b);
                assert!(d < 1e-4, "case {case}, pieces of {block}, decode: {d}");
            }
        }
    }
}

#[test]
fn f16_rows_halve_the_rows_and_track_f32_rows() {
    let rows = |kv_dtype| LigerConfig {
        kv_dtype,
        ..window_both(4)
    };
    let model = |l: &LigerConfig| {
        TinyCheckpoint::new(Family::Llama, 8)
            .unwrap()
            .with_liger(l)
            .model(DType::F32)
            .unwrap()
    };
    let (full, half) = (model(&rows(None)), model(&rows(Some(KvDtype::F16))));
    let toks = tokens(21, 24);
    // Read in pieces, so later pieces read earlier rows back from the state.
    let run = |m: &Model| -> (Tensor, SequenceState) {
        let mut s = m.new_state().unwrap();
        let parts: Vec<Tensor> = toks
            .chunks(5)
            .map(|c| m.forward(c, &mut s, Logits::All).unwrap())
            .collect();
        (Tensor::cat(&parts, 0).unwrap(), s)
    };
    let ((a, sa), (b, sb)) = (run(&full), run(&half));
    let d = max_diff(&a, &b) / max_abs(&a);
    assert!(d < 1e-2, "{d} of the largest logit");
    assert!(d > 0.0, "f16 rows must actually be rounded");
    let (ba, bb) = (sa.bytes_by_kind(), sb.bytes_by_kind());
    assert_eq!(bb.window * 2, ba.window);
    assert_eq!(bb.recurrent, ba.recurrent);
    assert!(bb.global < ba.global);
    assert_eq!(sb.size_bytes(), half.state_spec().bytes_at(24));
    for l in sb.layers() {
        let liger_model::state::LayerState::Liger { window, global, .. } = l else {
            panic!("a Liger layer");
        };
        assert_eq!(window.parts().unwrap().0.dtype(), DType::F16);
        assert_eq!(global.kept().unwrap().1.dtype(), DType::F16);
    }
}

#[test]
fn half_precision_tracks_f32() {
    let ck = TinyCheckpoint::new(Family::Llama, 8)
        .unwrap()
        .with_liger(&liger(4));
    let toks = tokens(19, 20);
    let f32_logits = full_forward(&ck.model(DType::F32).unwrap(), &toks);
    let scale = max_abs(&f32_logits);
    // Relative to the largest logit: f16 keeps 11 mantissa bits, bf16 only 8.
    for (dtype, tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let d = max_diff(&full_forward(&ck.model(dtype).unwrap(), &toks), &f32_logits) / scale;
        assert!(d < tol, "{dtype:?}: {d} of the largest logit {scale}");
    }
}
