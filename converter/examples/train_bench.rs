//! Times the pieces of a recovery training step on real folders (teacher, student).
//! `cargo run --release -p liger-converter --example train_bench -- ORIG CONV`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use liger_model::lora::LoraConfig;
use liger_model::testing::SplitMix;
use liger_model::{Logits, Model, RuntimeOptions, SeqStep};

/// Runs `f`, returning its result and the seconds it took.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed().as_secs_f64()))
}

/// All-position logits of `seqs` from fresh states, concatenated.
fn logits_all(m: &Model, seqs: &[Vec<u32>]) -> anyhow::Result<Tensor> {
    let mut states: Vec<_> = seqs
        .iter()
        .map(|_| m.new_state())
        .collect::<Result<_, _>>()?;
    let mut steps: Vec<SeqStep> = states
        .iter_mut()
        .zip(seqs)
        .map(|(s, t)| SeqStep {
            tokens: t,
            state: s,
            argmax_only: false,
        })
        .collect();
    Ok(Tensor::cat(&m.forward_batch(&mut steps, Logits::All)?, 0)?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let teacher = liger_model::checkpoint::load_model(args[1].as_ref(), DType::F32, &dev)?;
    let mut student = liger_model::checkpoint::load_model(args[2].as_ref(), DType::F32, &dev)?;
    let chunk: usize = std::env::var("CHUNK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    student.set_options(RuntimeOptions {
        chunk_size: chunk,
        differentiable: true,
        ..Default::default()
    })?;
    let vars = student.attach_lora(&LoraConfig::liger_default(), 0)?;
    let vocab = teacher.config().vocab_size;
    let mut rng = SplitMix(1);
    let seqs: Vec<Vec<u32>> = (0..4).map(|_| rng.tokens(256, vocab)).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let lens = vec![256usize; 4];

    let (inputs, secs) = timed(|| Ok(teacher.layer_inputs(&refs)?))?;
    println!("teacher layer_inputs 4x256: {secs:.3}s");
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for l in (0..reps).flat_map(|_| [0usize, 15, 16, 17]) {
        let (target, t_teacher) = timed(|| Ok(teacher.attention_output(l, &inputs[l], &lens)?))?;
        let (loss, t_fwd) = timed(|| {
            let out = student.attention_output(l, &inputs[l], &lens)?;
            Ok((out - &target)?.sqr()?.mean_all()?)
        })?;
        let (grads, t_bwd) = timed(|| Ok(loss.backward()?))?;
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
    let batch = &seqs[..b.min(seqs.len())];
    let (tl, secs) = timed(|| logits_all(&teacher, batch))?;
    println!("teacher forward {b}x256: {secs:.3}s");
    let p = candle_nn::ops::softmax_last_dim(&tl)?;
    for _ in 0..2 {
        let (sl, t_fwd) = timed(|| logits_all(&student, batch))?;
        let (loss, t_loss) = timed(|| {
            let ls = candle_nn::ops::log_softmax(&sl, D::Minus1)?;
            Ok((p.mul(&ls)?.sum(D::Minus1)?.neg()?).mean_all()?)
        })?;
        let (grads, t_bwd) = timed(|| Ok(loss.backward()?))?;
        let n = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
        println!(
            "student distill {b}x256: fwd {t_fwd:.3}s loss {t_loss:.3}s bwd {t_bwd:.3}s ({n}/{} grads) loss {}",
            vars.len(),
            loss.to_scalar::<f32>()?
        );
    }
    Ok(())
}
