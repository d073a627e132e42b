//! The CUDA backend against the CPU one, on the same weights: forward logits of every family
//! and structure, prefill-then-decode and batched steps on the GPU, LoRA gradients, and the
//! SmolLM2 fixture. The CPU path is the one held to the f64 references and the golden logits
//! elsewhere, so agreement here carries those checks over to the GPU.
//!
//! Built only with `--features cuda` and run on a machine with a GPU:
//! `cargo test -p liger-model --features cuda --test cuda`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use liger_model::config::{LigerConfig, Variant};
use liger_model::lora::LoraConfig;
use liger_model::testing::{
    max_abs, model_from_tensors, state_after, step_batch, Family, SplitMix, TinyCheckpoint,
    ALL_FAMILIES,
};
use liger_model::{Logits, Model, ModelConfig, RuntimeOptions};

/// Largest absolute difference, wherever the two tensors live.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    liger_model::testing::max_abs_diff(&cpu(a), &cpu(b))
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("this test needs a CUDA GPU")
}

/// The structures compared: the Transformer and each Liger form, with chunks of 4 tokens so
/// the chunked prefill crosses many chunk boundaries.
fn structures() -> Vec<(&'static str, Option<LigerConfig>)> {
    let base = LigerConfig {
        window: 4,
        ..Default::default()
    };
    vec![
        ("transformer", None),
        ("gla", Some(base.clone())),
        (
            "hgrn2",
            Some(LigerConfig {
                variant: Variant::Hgrn2,
                gate_normalizer: 1.0,
                ..base.clone()
            }),
        ),
        (
            "gsa",
            Some(LigerConfig {
                variant: Variant::Gsa,
                slots: Some(4),
                ..base.clone()
            }),
        ),
        (
            "gla+full1",
            Some(LigerConfig {
                full_attention_layers: vec![1],
                ..base
            }),
        ),
    ]
}

/// The same checkpoint as a model on `device`.
fn model_on(ck: &TinyCheckpoint, dtype: DType, device: &Device) -> Model {
    let cfg = ModelConfig::from_json(ck.config.clone()).unwrap();
    let mut m = model_from_tensors(cfg, &ck.tensors, dtype, device).unwrap();
    m.set_options(RuntimeOptions {
        chunk_size: 4,
        ..Default::default()
    })
    .unwrap();
    m
}

fn checkpoint(family: Family, liger: &Option<LigerConfig>) -> TinyCheckpoint {
    let ck = TinyCheckpoint::new(family, 42).unwrap();
    match liger {
        Some(l) => ck.with_liger(l),
        None => ck,
    }
}

fn forward_all(m: &Model, toks: &[u32]) -> Tensor {
    let mut s = m.new_state().unwrap();
    m.forward(toks, &mut s, Logits::All).unwrap()
}

#[test]
fn gpu_forward_matches_cpu_for_every_structure() {
    let gpu = gpu();
    let toks = SplitMix(1).tokens(29, 61);
    for family in ALL_FAMILIES {
        for (name, liger) in structures() {
            let ck = checkpoint(family, &liger);
            let cpu_logits = forward_all(&model_on(&ck, DType::F32, &Device::Cpu), &toks);
            let g = model_on(&ck, DType::F32, &gpu);
            let d = max_abs_diff(&forward_all(&g, &toks), &cpu_logits);
            assert!(d < 1e-3, "{family:?}/{name}: GPU forward differs by {d}");

            // Prefill then token-by-token decode on the GPU == the CPU's one forward.
            let mut s = g.new_state().unwrap();
            let mut rows = vec![g.forward(&toks[..11], &mut s, Logits::All).unwrap()];
            for t in &toks[11..] {
                rows.push(
                    g.forward(std::slice::from_ref(t), &mut s, Logits::All)
                        .unwrap(),
                );
            }
            let d = max_abs_diff(&Tensor::cat(&rows, 0).unwrap(), &cpu_logits);
            assert!(
                d < 1e-3,
                "{family:?}/{name}: GPU prefill+decode differs by {d}"
            );
        }
    }
}

#[test]
fn gpu_batched_step_matches_cpu() {
    let gpu = gpu();
    for (name, liger) in structures() {
        let ck = checkpoint(Family::Llama, &liger);
        let histories = [SplitMix(2).tokens(9, 61), SplitMix(3).tokens(14, 61)];
        let steps = [SplitMix(5).tokens(1, 61), SplitMix(6).tokens(6, 61)];
        let run = |device: &Device| -> Vec<Tensor> {
            let m = model_on(&ck, DType::F32, device);
            let mut states: Vec<_> = histories
                .iter()
                .map(|h| state_after(&m, h).unwrap())
                .collect();
            step_batch(&m, &mut states, &steps).unwrap()
        };
        for (i, (a, b)) in run(&gpu).iter().zip(run(&Device::Cpu)).enumerate() {
            let d = max_abs_diff(a, &b);
            assert!(d < 1e-3, "{name} seq {i}: GPU batch differs by {d}");
        }
    }
}

#[test]
fn gpu_lora_gradients_match_cpu() {
    let gpu = gpu();
    let toks = SplitMix(3).tokens(12, 61);
    for (name, liger) in structures().into_iter().skip(1) {
        let ck = checkpoint(Family::Llama, &liger);
        let grads = |device: &Device| -> Vec<(String, Tensor)> {
            let mut m = model_on(&ck, DType::F32, device);
            // Training mode: the inference fast paths do not record gradients.
            m.set_options(RuntimeOptions {
                chunk_size: 4,
                differentiable: true,
                ..Default::default()
            })
            .unwrap();
            let vars = m.attach_lora(&LoraConfig::liger_default(), 1).unwrap();
            // B starts at zero; move it so A's gradients are not all zero too.
            for (n, v) in &vars {
                if n.contains("lora_B") {
                    v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
                }
            }
            let mut s = m.new_state().unwrap();
            let logits = m.forward(&toks, &mut s, Logits::All).unwrap();
            let targets = Tensor::new(&toks[1..], device).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits.narrow(0, 0, 11).unwrap(), &targets)
                .unwrap();
            let g = loss.backward().unwrap();
            vars.iter()
                .map(|(n, v)| {
                    let grad = g
                        .get(v)
                        .unwrap_or_else(|| panic!("{name} on {device:?}: no gradient for {n}"));
                    (n.clone(), grad.clone())
                })
                .collect()
        };
        for ((n, a), (_, b)) in grads(&gpu).iter().zip(grads(&Device::Cpu)) {
            let scale = max_abs(&b);
            let d = max_abs_diff(a, &b);
            assert!(
                d <= 1e-3 * scale.max(1e-3),
                "{name} {n}: GPU gradient differs by {d} (largest {scale})"
            );
        }
    }
}

#[test]
fn gpu_half_precision_tracks_f32() {
    let gpu = gpu();
    let ck = checkpoint(Family::Llama, &structures()[1].1);
    let toks = SplitMix(19).tokens(20, 61);
    let f32_logits = forward_all(&model_on(&ck, DType::F32, &gpu), &toks);
    let scale = max_abs(&f32_logits);
    for (dtype, tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let d = max_abs_diff(
            &forward_all(&model_on(&ck, dtype, &gpu), &toks),
            &f32_logits,
        ) / scale;
        assert!(d < tol, "{dtype:?}: {d} of the largest logit {scale}");
    }
}

/// SmolLM2-135M as zero-shot Liger-GLA and as the Transformer: GPU logits == CPU logits.
#[test]
fn gpu_smollm2_matches_cpu() {
    let gpu = gpu();
    let import = common::import_fixture();
    let tensors = import.tensors.iter().cloned().collect();
    let cfg = ModelConfig::from_json(import.config.clone()).unwrap();
    let toks: Vec<u32> = SplitMix(7).tokens(300, 49152);
    for cfg in [cfg.clone(), cfg.with_liger(LigerConfig::default()).unwrap()] {
        let on = |device: &Device| {
            let m = model_from_tensors(cfg.clone(), &tensors, DType::F32, device).unwrap();
            forward_all(&m, &toks)
        };
        let (c, g) = (on(&Device::Cpu), on(&gpu));
        let scale = max_abs(&c);
        let d = max_abs_diff(&g, &c);
        assert!(
            d < 1e-3 * scale,
            "SmolLM2 GPU logits differ by {d} (largest {scale})"
        );
    }
}
