//! Moving a model's weights onto huge pages (`Model::weight_memory`,
//! `hugepages::back_with_huge_pages`, as liger-serve does after loading) names every
//! weight a decode step reads and changes nothing the model computes.

use candle_core::DType;
use liger_model::config::LigerConfig;
use liger_model::hugepages::back_with_huge_pages;
use liger_model::layers::Quantization;
use liger_model::testing::{Family, TinyCheckpoint};
use liger_model::{Logits, Model};

fn model(quantize: Option<Quantization>) -> Model {
    let liger = LigerConfig {
        window: 4,
        ..Default::default()
    };
    let mut m = TinyCheckpoint::new(Family::Llama, 7)
        .unwrap()
        .with_liger(&liger)
        .model(DType::F32)
        .unwrap();
    if let Some(q) = quantize {
        m.quantize(q).unwrap();
    }
    m
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = m.new_state().unwrap();
    let mut out = m.forward(tokens, &mut state, Logits::All).unwrap();
    // Decode steps too (the fused path reads the packed weights).
    for &t in &[3u32, 1, 4] {
        out = m.forward(&[t], &mut state, Logits::Last).unwrap();
    }
    out.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn weights_on_huge_pages_are_named_in_full_and_compute_the_same() {
    for quantize in [None, Some(Quantization::Q8_0)] {
        let m = model(quantize);
        let tokens = [5u32, 9, 2, 7, 7, 1, 3, 8, 6];
        let before = logits(&m, &tokens);
        m.pack_weights();
        let memory = m.weight_memory();
        let cfg = m.config();
        // The LM head and seven projections a layer, each at least one range.
        assert!(
            memory.len() > cfg.num_layers * 7,
            "{quantize:?}: {} ranges",
            memory.len()
        );
        // At least: the LM head, q, o and the MLP (k and v left out).
        let weights = cfg.vocab_size * cfg.hidden_size
            + cfg.num_layers
                * (2 * cfg.hidden_size * cfg.hidden_size
                    + 3 * cfg.hidden_size * cfg.intermediate_size);
        let bytes: usize = memory.iter().map(|r| r.len()).sum();
        // f32: four bytes a weight; Q8_0: a byte a weight and its block's scale.
        let least = if quantize.is_some() {
            weights
        } else {
            4 * weights
        };
        assert!(
            bytes >= least && memory.iter().all(|r| !r.is_empty()),
            "{quantize:?}: {bytes} bytes for {weights} weights"
        );
        let got = back_with_huge_pages(&memory);
        assert!(got.collapsed <= got.asked, "{got:?}");
        assert_eq!(
            before,
            logits(&m, &tokens),
            "{quantize:?}: the logits after moving the memory"
        );
    }
}
