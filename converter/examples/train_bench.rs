//! Times the pieces of a recovery training step on real folders (teacher, student).
//! `cargo run --release -p liger-converter --example train_bench -- ORIG CONV`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use liger_model::lora::LoraConfig;
use liger_model::testing::SplitMix;
use liger_model::{Logits, RuntimeOptions, SeqStep};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let teacher = liger_model::weights::load_model(args[1].as_ref(), DType::F32, &dev)?;
    let mut student = liger_model::weights::load_model(args[2].as_ref(), DType::F32, &dev)?;
    let chunk: usize = std::env::var("CHUNK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    student.set_options(RuntimeOptions {
        chunk_size: chunk,
        differentiable: true,
    })?;
    let vars = student.attach_lora(&LoraConfig::liger_default(), 0)?;
    let vocab = teacher.config().vocab_size;
    let mut rng = SplitMix(1);
    let seqs: Vec<Vec<u32>> = (0..4).map(|_| rng.tokens(256, vocab)).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let lens = vec![256usize; 4];

    let t = Instant::now();
    let inputs = teacher.layer_inputs(&refs)?;
    println!(
        "teacher layer_inputs 4x256: {:.3}s",
        t.elapsed().as_secs_f64()
    );
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for l in (0..reps).flat_map(|_| [0usize, 15, 16, 17]) {
        let t = Instant::now();
        let target = teacher.attention_output(l, &inputs[l], &lens)?;
        let t_teacher = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = student.attention_output(l, &inputs[l], &lens)?;
        let loss = (out - &target)?.sqr()?.mean_all()?;
        let t_fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = loss.backward()?;
        let t_bwd = t.elapsed().as_secs_f64();
        let n = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
        println!("layer {l}: teacher attn {t_teacher:.3}s, student fwd {t_fwd:.3}s, bwd {t_bwd:.3}s ({n} grads)");
    }

    if std::env::var("SKIP_DISTILL").is_ok() {
        return Ok(());
    }
    let b: usize = std::env::var("DB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let t = Instant::now();
    let mut states: Vec<_> = (0..b)
        .map(|_| teacher.new_state())
        .collect::<Result<_, _>>()?;
    let mut steps: Vec<SeqStep> = states
        .iter_mut()
        .zip(&seqs)
        .map(|(s, t)| SeqStep {
            tokens: t,
            state: s,
        })
        .collect();
    let tl = teacher.forward_batch(&mut steps, Logits::All)?;
    let tl = Tensor::cat(&tl, 0)?;
    println!("teacher forward {b}x256: {:.3}s", t.elapsed().as_secs_f64());
    let p = candle_nn::ops::softmax_last_dim(&tl)?;
    for _ in 0..2 {
        let t = Instant::now();
        let mut states: Vec<_> = (0..b)
            .map(|_| student.new_state())
            .collect::<Result<_, _>>()?;
        let mut steps: Vec<SeqStep> = states
            .iter_mut()
            .zip(&seqs)
            .map(|(s, t)| SeqStep {
                tokens: t,
                state: s,
            })
            .collect();
        let sl = student.forward_batch(&mut steps, Logits::All)?;
        let sl = Tensor::cat(&sl, 0)?;
        let t_fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ls = candle_nn::ops::log_softmax(&sl, D::Minus1)?;
        let loss = (p.mul(&ls)?.sum(D::Minus1)?.neg()?).mean_all()?;
        let t_loss = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = loss.backward()?;
        let t_bwd = t.elapsed().as_secs_f64();
        let n = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
        println!(
            "student distill {b}x256: fwd {t_fwd:.3}s loss {t_loss:.3}s bwd {t_bwd:.3}s ({n}/{} grads) loss {}",
            vars.len(),
            loss.to_scalar::<f32>()?
        );
    }
    Ok(())
}
