//! Block-quantized weights (GGML Q8_0 / Q4K through candle's QMatMul): close to the dense
//! model, and every runtime equivalence still holds on the quantized model itself.

use candle_core::DType;
use liger_model::layers::Quantization;
use liger_model::testing::{
    max_abs, max_abs_diff, model_from_tensors, SplitMix, TinyCheckpoint, ALL_FAMILIES,
};
use liger_model::{LigerConfig, Logits, Model, SeqStep};

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    SplitMix(seed).tokens(n, 61)
}

fn logits(m: &Model, t: &[u32]) -> candle_core::Tensor {
    m.forward(t, &mut m.new_state().unwrap(), Logits::All)
        .unwrap()
}

#[test]
fn q8_0_stays_close_to_dense_and_consistent_with_itself() {
    for family in ALL_FAMILIES {
        let dense = TinyCheckpoint::new(family, 5)
            .unwrap()
            .with_liger(&LigerConfig {
                window: 4,
                ..Default::default()
            })
            .model(DType::F32)
            .unwrap();
        let mut q = dense.clone();
        let counts = q.quantize(Quantization::Q8_0).unwrap();
        // Inputs of 32 fit Q8_0's blocks; down_proj's 48 does not and stays dense.
        assert_eq!(
            counts,
            [("dense".to_string(), 3), ("q8_0".to_string(), 19)],
            "{family:?}"
        );
        assert_ne!(q.fingerprint().unwrap(), dense.fingerprint().unwrap());

        let t = tokens(1, 21);
        let (a, b) = (logits(&dense, &t), logits(&q, &t));
        let scale = max_abs(&a);
        // Q8_0 rounds the weights to 8 bits per block of 32: a few percent at most.
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 0.05 * scale,
            "{family:?}: q8_0 moved logits by {d} (scale {scale})"
        );

        // Prefill then decode == one forward, and batched == alone, on the quantized model.
        let mut st = q.new_state().unwrap();
        q.forward(&t[..13], &mut st, Logits::Last).unwrap();
        let mut last = None;
        for &tok in &t[13..] {
            last = Some(q.forward(&[tok], &mut st, Logits::Last).unwrap());
        }
        let whole = b.get(t.len() - 1).unwrap().unsqueeze(0).unwrap();
        assert!(max_abs_diff(&last.unwrap(), &whole) < 1e-4, "{family:?}");
        let other = tokens(2, 9);
        let (mut s1, mut s2) = (q.new_state().unwrap(), q.new_state().unwrap());
        let out = q
            .forward_batch(
                &mut [
                    SeqStep {
                        tokens: &t,
                        state: &mut s1,
                        argmax_only: false,
                    },
                    SeqStep {
                        tokens: &other,
                        state: &mut s2,
                        argmax_only: false,
                    },
                ],
                Logits::All,
            )
            .unwrap();
        assert!(max_abs_diff(&out[0], &b) < 1e-4, "{family:?}");
        assert!(
            max_abs_diff(&out[1], &logits(&q, &other)) < 1e-4,
            "{family:?}"
        );
    }
}

#[test]
fn q4k_falls_back_where_blocks_do_not_fit_and_adapters_must_be_merged_first() {
    let ckpt = TinyCheckpoint::new(ALL_FAMILIES[0], 6).unwrap();
    let mut m = ckpt.model(DType::F32).unwrap();
    // Tiny inputs (32, 48) fit no 256-wide Q4K block: Q8_0 where 32 divides, else dense.
    let counts = m.quantize(Quantization::Q4K).unwrap();
    assert!(
        counts.iter().all(|(f, _)| f == "q8_0" || f == "dense"),
        "{counts:?}"
    );

    let mut with_adapter = ckpt.model(DType::F32).unwrap();
    with_adapter
        .attach_lora(&liger_model::lora::LoraConfig::liger_default(), 0)
        .unwrap();
    let e = with_adapter.quantize(Quantization::Q8_0).unwrap_err();
    assert!(e.to_string().contains("merge"), "{e}");
}

/// A quantized checkpoint cannot absorb an adapter, so the server runs it unmerged beside
/// the blocks: that must compute what a dense model holding the dequantized weights
/// computes with the same adapter (exactly in a prefill, which multiplies by the
/// dequantized weights; up to GGML's 8-bit activations in decode-sized steps), and differ
/// from the quantized model without it.
#[test]
fn adapters_run_unmerged_on_quantized_weights() {
    let ckpt = TinyCheckpoint::new(ALL_FAMILIES[1], 9).unwrap();
    let mut q = ckpt.model(DType::F32).unwrap();
    q.quantize(Quantization::Q8_0).unwrap();
    let dequantized: std::collections::HashMap<_, _> =
        q.named_weights().unwrap().into_iter().collect();
    let cfg = liger_model::lora::LoraConfig::liger_default();
    let mut dense_lora = model_from_tensors(
        ckpt.model_config().unwrap(),
        &dequantized,
        DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let vars = dense_lora.attach_lora(&cfg, 4).unwrap();
    // attach_lora starts B at zero (no change); give every factor values.
    let mut rng = SplitMix(17);
    for (_, v) in &vars {
        let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() * 0.2).collect();
        v.set(&candle_core::Tensor::from_vec(vals, v.shape(), v.device()).unwrap())
            .unwrap();
    }
    let tensors: std::collections::HashMap<_, _> = dense_lora.lora_tensors().into_iter().collect();
    let mut q_lora = q.clone();
    q_lora.apply_lora(&cfg, &tensors).unwrap();
    assert!(
        q_lora.merge_lora().is_err(),
        "blocks cannot absorb the update"
    );
    for (n, tolerance) in [(40, 1e-4), (6, 0.05)] {
        let t = tokens(3, n);
        let (want, got, base) = (logits(&dense_lora, &t), logits(&q_lora, &t), logits(&q, &t));
        let scale = max_abs(&want);
        let d = max_abs_diff(&want, &got);
        assert!(d < tolerance * scale, "{n} tokens: {d} (scale {scale})");
        let moved = max_abs_diff(&got, &base);
        assert!(
            moved > 0.05 * scale,
            "{n} tokens: the adapter moved logits by {moved}"
        );
    }
}
