//! Greedy decode steps against full ones: where every sequence of a fused step wants only
//! its argmax (`SeqStep::argmax_only`), the step reads the LM head's Q8_0 screen and computes
//! exactly only the logits that can be the largest (`liger_model::layers::HeadScreen`).
//! The same steps asking for every logit are the reference: each row's argmax is theirs,
//! every value the screen computed is theirs to the bit, the others are `-inf`, and the
//! states advance alike. Batches past the screen's rows, and models with the screen off,
//! read the full head.

mod common;

use candle_core::{DType, Tensor};
use liger_model::config::LigerConfig;
use liger_model::testing::{
    state_after, step_batch_as, Family, SplitMix, TinyCheckpoint, ALL_FAMILIES,
};
use liger_model::{Model, RuntimeOptions, SequenceState};

/// One batched step of every `states[i]` reading `toks[i]`, all rows' logits.
fn step(
    m: &Model,
    states: &mut [SequenceState],
    toks: &[Vec<u32>],
    argmax_only: bool,
) -> Vec<Tensor> {
    step_batch_as(m, states, toks, argmax_only).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

/// The first index of the largest value.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Steps `histories`' states greedily and fully side by side; checks every row as the
/// module docs say. Returns how many logits the screen left out in all, and of how many
/// rows.
fn check(m: &Model, histories: &[Vec<u32>], vocab: usize, what: &str) -> (usize, usize) {
    let mut rng = SplitMix(histories.len() as u64 + 3);
    let mut greedy: Vec<SequenceState> = histories
        .iter()
        .map(|h| state_after(m, h).unwrap())
        .collect();
    let mut full = greedy.clone();
    let (mut left_out, mut all_rows) = (0, 0);
    for s in 0..5 {
        let toks: Vec<Vec<u32>> = (0..histories.len())
            .map(|i| rng.tokens(if s < 2 { 1 } else { 1 + (i + s) % 4 }, vocab))
            .collect();
        let got = step(m, &mut greedy, &toks, true);
        let want = step(m, &mut full, &toks, false);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            for (r, (g, w)) in rows(g).iter().zip(rows(w)).enumerate() {
                let at = format!("{what} step {s} seq {i} row {r}");
                assert!(
                    w.iter().all(|v| v.is_finite()),
                    "{at}: the reference is full"
                );
                assert_eq!(argmax(g), argmax(&w), "{at}: argmax");
                for (a, b) in g.iter().zip(&w) {
                    assert!(
                        *a == f32::NEG_INFINITY || a.to_bits() == b.to_bits(),
                        "{at}: {a} against {b}"
                    );
                }
                left_out += g.iter().filter(|v| !v.is_finite()).count();
                all_rows += 1;
            }
        }
        for (a, b) in greedy.iter().zip(&full) {
            assert_eq!(a.position(), b.position(), "{what}");
        }
    }
    // The states read the same tokens through the same layers: their next full steps agree.
    let toks: Vec<Vec<u32>> = histories.iter().map(|_| vec![1]).collect();
    let (a, b) = (
        step(m, &mut greedy, &toks, false),
        step(m, &mut full, &toks, false),
    );
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(rows(a), rows(b), "{what}: states after");
    }
    (left_out, all_rows)
}

fn with_screen(m: &Model, head_screen: bool) -> Model {
    let mut m = m.clone();
    m.set_options(RuntimeOptions {
        head_screen,
        ..m.options()
    })
    .unwrap();
    m
}

#[test]
fn greedy_steps_pick_what_the_full_head_picks() {
    if !liger_model::layers::gemm::available() || !std::arch::is_x86_feature_detected!("fma") {
        eprintln!("skipped: the screen needs AVX-512 and FMA");
        return;
    }
    let mut rng = SplitMix(21);
    let histories: Vec<Vec<u32>> = [0, 2, 5, 9].iter().map(|&n| rng.tokens(n, 61)).collect();
    let liger = LigerConfig {
        window: 4,
        ..Default::default()
    };
    for family in ALL_FAMILIES {
        let m = TinyCheckpoint::new(family, 11)
            .unwrap()
            .with_liger(&liger)
            .model(DType::F32)
            .unwrap();
        let what = format!("{family:?}");
        let (left_out, _) = check(&m, &histories, 61, &what);
        assert!(left_out > 0, "{what}: the screen ran");
        assert_eq!(check(&with_screen(&m, false), &histories, 61, &what).0, 0);
        // More rows than the screen takes (20 a step, then ~50 in two fused steps of
        // over 16 each): the full head.
        let many: Vec<Vec<u32>> = (0..20).map(|i| rng.tokens(i % 3, 61)).collect();
        assert_eq!(check(&m, &many, 61, &format!("{what} 20 sequences")).0, 0);
    }
    // A Transformer too (no Liger layers): the head is the same.
    let m = TinyCheckpoint::new(Family::Llama, 11)
        .unwrap()
        .model(DType::F32)
        .unwrap();
    assert!(check(&m, &histories, 61, "transformer").0 > 0);
    fixture(&mut rng);
}

/// The SmolLM2 fixture's head (49,152 x 576, tied) in the default structure: real logits,
/// whose leads the bound must separate from tens of thousands of rows.
fn fixture(rng: &mut SplitMix) {
    let m = common::fixture_in_default_structure();
    let vocab = m.config().vocab_size;
    let histories: Vec<Vec<u32>> = [30, 300].iter().map(|&n| rng.tokens(n, vocab)).collect();
    let (left_out, rows) = check(&m, &histories, vocab, "fixture");
    // Nearly every logit is left out: all but a few per row.
    assert!(
        left_out > rows * (vocab - 100),
        "fixture: {left_out} of {rows} rows"
    );
}
