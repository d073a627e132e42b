//! The runtime against an independent float32 reference on the real SmolLM2-135M-Instruct
//! fixture (`../shared/golden`): the original Transformer and its zero-shot Liger-GLA
//! conversion must give the same top-5 tokens at every listed position and logits within
//! 1e-2, through one forward, through prefill-then-decode, and batched.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use liger_model::testing::model_from_tensors;
use liger_model::{LigerConfig, Logits, Model, ModelConfig, SeqStep};
use serde_json::Value;

const TOLERANCE: f32 = 1e-2;

fn model(liger: bool) -> Model {
    let import = common::import_fixture();
    let mut cfg = ModelConfig::from_json(import.config.clone()).unwrap();
    if liger {
        cfg = cfg.with_liger(LigerConfig::default()).unwrap();
    }
    let tensors: HashMap<String, Tensor> = import.tensors.iter().cloned().collect();
    model_from_tensors(cfg, &tensors, DType::F32, &Device::Cpu).unwrap()
}

/// One golden position: (pos, top_ids, top_logits, logsumexp).
type GoldenRow = (usize, Vec<u32>, Vec<f32>, f32);

struct Case {
    name: String,
    ids: Vec<u32>,
    /// Per model kind: rows of (pos, top_ids, top_logits, logsumexp).
    rows: HashMap<String, Vec<GoldenRow>>,
}

fn cases() -> Vec<Case> {
    let golden = common::golden_json("smollm2_135m_logits.json");
    golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let rows = ["transformer", "liger_gla"]
                .iter()
                .map(|kind| {
                    let r = c[*kind]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|row: &Value| {
                            let f = |k: &str| -> Vec<f32> {
                                row[k]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|v| v.as_f64().unwrap() as f32)
                                    .collect()
                            };
                            let top_ids = f("top_ids").into_iter().map(|x| x as u32).collect();
                            (
                                row["pos"].as_u64().unwrap() as usize,
                                top_ids,
                                f("top_logits"),
                                row["logsumexp"].as_f64().unwrap() as f32,
                            )
                        })
                        .collect();
                    (kind.to_string(), r)
                })
                .collect();
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                ids,
                rows,
            }
        })
        .collect()
}

/// Checks `logits: [len, vocab]` against the golden rows of `kind`.
fn check(case: &Case, kind: &str, logits: &Tensor, how: &str) {
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    for (pos, top_ids, top_logits, lse) in &case.rows[kind] {
        let row = &logits[*pos];
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let ours: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(
            ours,
            top_ids[..5],
            "{kind}/{}/{how}: top-5 at pos {pos}",
            case.name
        );
        for (id, want) in top_ids.iter().zip(top_logits) {
            let got = row[*id as usize];
            assert!(
                (got - want).abs() < TOLERANCE,
                "{kind}/{}/{how}: logit of {id} at pos {pos}: {got} vs {want}",
                case.name
            );
        }
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let our_lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        assert!(
            (our_lse - lse).abs() < TOLERANCE,
            "{kind}/{}/{how}: logsumexp at pos {pos}: {our_lse} vs {lse}",
            case.name
        );
    }
}

#[test]
fn golden_logits_one_forward() {
    for (kind, liger) in [("transformer", false), ("liger_gla", true)] {
        let m = model(liger);
        for case in cases() {
            let mut s = m.new_state().unwrap();
            let logits = m.forward(&case.ids, &mut s, Logits::All).unwrap();
            check(&case, kind, &logits, "one forward");
        }
    }
}

#[test]
fn golden_logits_prefill_then_decode_and_batched() {
    // The longest case crosses the 64-token window; split it so prefill chunks and decode
    // steps straddle the window edge, and run every case in one batch as well.
    let all_cases = cases();
    for (kind, liger) in [("transformer", false), ("liger_gla", true)] {
        let m = model(liger);
        for case in &all_cases {
            let mut s = m.new_state().unwrap();
            let split = case.ids.len().min(60);
            let mut rows = vec![m.forward(&case.ids[..split], &mut s, Logits::All).unwrap()];
            for chunk in case.ids[split..].chunks(3) {
                rows.push(m.forward(chunk, &mut s, Logits::All).unwrap());
            }
            check(
                case,
                kind,
                &Tensor::cat(&rows, 0).unwrap(),
                "prefill+decode",
            );
        }
        let mut states: Vec<_> = all_cases.iter().map(|_| m.new_state().unwrap()).collect();
        let mut batch: Vec<SeqStep> = all_cases
            .iter()
            .zip(states.iter_mut())
            .map(|(c, state)| SeqStep {
                tokens: &c.ids,
                state,
                argmax_only: false,
            })
            .collect();
        let out = m.forward_batch(&mut batch, Logits::All).unwrap();
        for (case, logits) in all_cases.iter().zip(&out) {
            check(case, kind, logits, "batched");
        }
    }
}

#[test]
fn transformer_answers_the_capital_question() {
    let import = common::import_fixture();
    let m = model(false);
    let case = cases()
        .into_iter()
        .find(|c| c.name == "chat_capital")
        .expect("chat case");
    let eos = m.config().eos_token_ids.clone();
    let mut s = m.new_state().unwrap();
    let mut logits = m.forward(&case.ids, &mut s, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..24 {
        let next = logits
            .argmax(candle_core::D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        logits = m.forward(&[next], &mut s, Logits::Last).unwrap();
    }
    let text = import.tokenizer.decode(&out, true).unwrap();
    assert_eq!(text.trim(), "The capital of France is Paris.");
}
