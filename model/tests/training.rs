//! What recovery relies on: gradients that are right and reach every adapter, adapters that
//! merge and round-trip through PEFT's files, and the layer hooks attention transfer uses.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use liger_model::config::Variant;
use liger_model::gla::{self, FeatureMaps};
use liger_model::lora::{self, LoraConfig};
use liger_model::testing::{Family, SplitMix, TinyCheckpoint};
use liger_model::{LigerConfig, Logits, Model, RuntimeOptions};

fn liger_model(family: Family) -> Model {
    let l = LigerConfig {
        window: 3,
        ..Default::default()
    };
    let mut m = TinyCheckpoint::new(family, 21)
        .unwrap()
        .with_liger(&l)
        .model(DType::F32)
        .unwrap();
    m.set_options(RuntimeOptions {
        chunk_size: 4,
        differentiable: true,
        ..Default::default()
    })
    .unwrap();
    m
}

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    SplitMix(seed).tokens(n, 61)
}

use liger_model::testing::max_abs_diff as max_diff;

/// A scalar loss of a variant's chunked form, as a function of raw q and k (so the feature
/// maps, the gate and GSA's slot pooling are inside the differentiated function).
fn recurrent_loss(variant: Variant, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor) -> Tensor {
    // GSA pools the head dim of 4 into 2 slots; its state is two 2 x 4 memories.
    let (slots, rows) = if variant == Variant::Gsa {
        (2, 4)
    } else {
        (0, 4)
    };
    let fm = FeatureMaps {
        variant,
        gate_normalizer: 16.0,
        slots,
        differentiable: true,
    };
    let x = gla::Recurrence::new(fm, q, k, v).unwrap();
    let s0 = Tensor::zeros((1, 2, rows, 4), DType::F32, &Device::Cpu).unwrap();
    let (o, s) = x.chunked(&s0, 4).unwrap();
    // Weighted sums so every output element matters differently.
    let lo = (o.flatten_all().unwrap() * w).unwrap().sum_all().unwrap();
    (lo + s.sqr().unwrap().sum_all().unwrap()).unwrap()
}

fn check_chunked_gradient(variant: Variant) {
    let dev = Device::Cpu;
    let mut rng = SplitMix(5);
    let mut randn = |shape: &[usize], scale: f64| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| scale * rng.normal() as f64).collect();
        Tensor::from_vec(v, shape, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (t, d) = (10, 4); // crosses two chunk boundaries
    let q = Var::from_tensor(&randn(&[1, 4, t, d], 1.5)).unwrap();
    let k = Var::from_tensor(&randn(&[1, 2, t, d], 3.0)).unwrap();
    let v = Var::from_tensor(&randn(&[1, 2, t, d], 1.0)).unwrap();
    let w = randn(&[2 * 2 * t * d], 1.0);
    let loss = recurrent_loss(variant, &q, &k, &v, &w);
    let grads = loss.backward().unwrap();
    let eps = 1e-2f32;
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let g: Vec<f32> = grads
            .get(var)
            .expect("gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        // Central differences on a spread of coordinates.
        for idx in (0..base.len()).step_by(7) {
            let eval = |delta: f32| -> f32 {
                let mut x = base.clone();
                x[idx] += delta;
                let x = Tensor::from_vec(x, var.shape(), &dev).unwrap();
                let (qq, kk, vv) = match name {
                    "q" => (x, k.as_tensor().clone(), v.as_tensor().clone()),
                    "k" => (q.as_tensor().clone(), x, v.as_tensor().clone()),
                    _ => (q.as_tensor().clone(), k.as_tensor().clone(), x),
                };
                recurrent_loss(variant, &qq, &kk, &vv, &w)
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let tol = 2e-2 * (1.0 + numeric.abs());
            assert!(
                (numeric - g[idx]).abs() < tol,
                "{variant:?}: d loss / d {name}[{idx}]: autograd {} vs numeric {numeric}",
                g[idx]
            );
        }
    }
}

#[test]
fn chunked_gla_gradient_matches_finite_differences() {
    check_chunked_gradient(Variant::Gla);
}

#[test]
fn chunked_gsa_gradient_matches_finite_differences() {
    check_chunked_gradient(Variant::Gsa);
}

#[test]
fn gradient_reaches_every_adapter() {
    for family in [Family::Llama, Family::Qwen2] {
        let mut m = liger_model(family);
        let cfg = LoraConfig {
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
                .map(String::from)
                .to_vec(),
            ..LoraConfig::liger_default()
        };
        let vars = m.attach_lora(&cfg, 1).unwrap();
        assert_eq!(vars.len(), 3 * 5 * 2);
        // B starts at zero, so only B gets a gradient on the first step; perturb B so A does too.
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
            }
        }
        let toks = tokens(3, 12);
        let mut s = m.new_state().unwrap();
        let logits = m.forward(&toks, &mut s, Logits::All).unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits.narrow(0, 0, 11).unwrap(),
            &Tensor::new(&toks[1..], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{family:?}: no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "{family:?}: zero gradient for {name}");
        }
    }
}

#[test]
fn merged_adapter_equals_base_plus_adapter_and_round_trips() {
    let mut m = liger_model(Family::Llama);
    let cfg = LoraConfig::liger_default();
    let vars = m.attach_lora(&cfg, 2).unwrap();
    let mut rng = SplitMix(9);
    for (_, v) in &vars {
        let n = v.elem_count();
        let r: Vec<f32> = (0..n).map(|_| 0.1 * rng.normal()).collect();
        v.set(&Tensor::from_vec(r, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let toks = tokens(4, 15);
    let run = |m: &Model| {
        m.forward(&toks, &mut m.new_state().unwrap(), Logits::All)
            .unwrap()
    };
    let with_adapter = run(&m);
    let base = run(&liger_model(Family::Llama));
    assert!(
        max_diff(&with_adapter, &base) > 1e-3,
        "the adapter must change the model"
    );

    // Save as PEFT files, load into a fresh model: same logits.
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(dir.path(), &cfg, &m.lora_tensors(), Some("tiny")).unwrap();
    let (cfg2, tensors) = lora::load_adapter(dir.path()).unwrap();
    assert_eq!(cfg2, cfg);
    let mut fresh = liger_model(Family::Llama);
    fresh.apply_lora(&cfg2, &tensors).unwrap();
    assert!(max_diff(&run(&fresh), &with_adapter) < 1e-5);

    // Merged weights give the same function.
    m.merge_lora().unwrap();
    assert!(m.lora_tensors().is_empty());
    assert!(max_diff(&run(&m), &with_adapter) < 1e-4);

    // A mismatched adapter is refused.
    let mut bad: HashMap<String, Tensor> = tensors.clone();
    let name = lora::peft_name(0, "q_proj", "A");
    bad.insert(
        name,
        Tensor::zeros((8, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(fresh.apply_lora(&cfg2, &bad).is_err());
    let mut extra = tensors;
    extra.insert(
        lora::peft_name(99, "q_proj", "A"),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(liger_model(Family::Llama)
        .apply_lora(&cfg2, &extra)
        .is_err());
}

#[test]
fn layer_hooks_reproduce_the_forward() {
    // The residual entering layer l+1 is layer l's input plus its attention and MLP; check
    // the pieces the hooks expose against a full forward's logits and against each other.
    let m = liger_model(Family::Mistral);
    let seqs = [tokens(6, 9), tokens(7, 5)];
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let inputs = m.layer_inputs(&refs).unwrap();
    assert_eq!(inputs.len(), m.config().num_layers + 1);
    assert_eq!(inputs[0].dims(), [14, 32]);
    // Attention outputs on a batch of two equal those on each sequence alone.
    let both = m.attention_output(1, &inputs[1], &[9, 5]).unwrap();
    let first = m
        .attention_output(1, &inputs[1].narrow(0, 0, 9).unwrap(), &[9])
        .unwrap();
    assert!(max_diff(&both.narrow(0, 0, 9).unwrap(), &first) < 1e-5);
    assert_eq!(both.dims(), [14, 4 * 8]);
    // named_weights covers exactly what the model loads.
    let ck = TinyCheckpoint::new(Family::Mistral, 21).unwrap();
    let names: Vec<String> = m
        .named_weights()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut want: Vec<String> = ck.tensors.keys().cloned().collect();
    let mut got = names.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
}
