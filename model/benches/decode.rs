//! Decode benchmark on the SmolLM2-135M-Instruct fixture: per-token decode latency at growing
//! context lengths for the original Transformer and its Liger-GLA conversion (same runtime,
//! same weights), and the bytes of state each keeps per sequence.
//!
//! ```text
//! cargo bench -p liger-model --bench decode -- [--contexts 256,1024,4096,16384] [--steps 32]
//!     [--dtype f32|f16|bf16] [--quantize q8_0|q4k] [--json PATH]
//! ```
//!
//! The context is built once per model by chunked prefill and grown between measurements,
//! so each model pays one prefill to the largest context. Figures are medians over `--steps`
//! decode tokens; compare ratios from one run (this machine is noisy).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use liger_model::gguf::import_gguf;
use liger_model::layers::Quantization;
use liger_model::testing::model_from_tensors;
use liger_model::{LigerConfig, Logits, Model, ModelConfig};

struct Args {
    contexts: Vec<usize>,
    steps: usize,
    dtype: DType,
    quantize: Option<Quantization>,
    json: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        contexts: vec![256, 1024, 4096, 16384],
        steps: 32,
        dtype: DType::F32,
        quantize: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--contexts" => {
                a.contexts = val()
                    .split(',')
                    .map(|s| s.trim().parse().expect("context"))
                    .collect()
            }
            "--steps" => a.steps = val().parse().expect("steps"),
            "--dtype" => {
                a.dtype = match val().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    d => panic!("unknown dtype {d}"),
                }
            }
            "--quantize" => {
                a.quantize = Some(match val().as_str() {
                    "q8_0" => Quantization::Q8_0,
                    "q4k" => Quantization::Q4K,
                    q => panic!("unknown quantization {q}"),
                })
            }
            "--json" => a.json = Some(val().into()),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a.contexts.sort_unstable();
    a
}

struct Row {
    model: &'static str,
    context: usize,
    ms_per_token: f64,
    state_bytes: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(name: &'static str, m: &Model, args: &Args, rows: &mut Vec<Row>) -> liger_model::Result<()> {
    let vocab = m.config().vocab_size as u32;
    // A deterministic token stream; decode cost does not depend on content.
    let token = |i: usize| ((i as u64 * 2654435761 % vocab as u64) as u32).max(3);
    let mut state = m.new_state()?;
    let mut filled = 0;
    for &ctx in &args.contexts {
        let t0 = Instant::now();
        let prompt: Vec<u32> = (filled..ctx).map(token).collect();
        if !prompt.is_empty() {
            m.prefill(&prompt, &mut state, 512)?;
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut times = Vec::with_capacity(args.steps);
        let mut next = token(ctx);
        for _ in 0..args.steps {
            let t = Instant::now();
            let logits = m.forward(&[next], &mut state, Logits::Last)?;
            next = logits
                .argmax(candle_core::D::Minus1)?
                .squeeze(0)?
                .to_scalar::<u32>()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        filled = state.position();
        let ms = median(times);
        eprintln!(
            "{name:>11} context {ctx:>6}: {ms:7.2} ms/token ({:6.1} tok/s), state {:>10} bytes, prefill of {} tokens {prefill_s:.1}s",
            1e3 / ms,
            state.size_bytes(),
            prompt.len()
        );
        rows.push(Row {
            model: name,
            context: ctx,
            ms_per_token: ms,
            state_bytes: state.size_bytes(),
        });
    }
    Ok(())
}

fn main() -> liger_model::Result<()> {
    let threads = liger_model::threads::init(None);
    let args = parse_args();
    let import = import_gguf(&liger_model::testing::fixture::smollm2_gguf())?;
    let tensors = import.tensors.iter().cloned().collect();
    let cfg = ModelConfig::from_json(import.config.clone())?;
    eprintln!(
        "SmolLM2-135M-Instruct, {:?}{}, threads: {threads}, {} decode steps per point",
        args.dtype,
        args.quantize
            .map_or(String::new(), |q| format!(" quantized to {}", q.name())),
        args.steps
    );
    let mut rows = Vec::new();
    let quantized = |mut m: Model| -> liger_model::Result<Model> {
        if let Some(q) = args.quantize {
            m.quantize(q)?;
        }
        Ok(m)
    };
    let transformer = quantized(model_from_tensors(
        cfg.clone(),
        &tensors,
        args.dtype,
        &Device::Cpu,
    )?)?;
    run("transformer", &transformer, &args, &mut rows)?;
    drop(transformer);
    let liger = quantized(model_from_tensors(
        cfg.with_liger(LigerConfig::default())?,
        &tensors,
        args.dtype,
        &Device::Cpu,
    )?)?;
    run("liger-gla", &liger, &args, &mut rows)?;

    println!("| context | Transformer ms/token | Liger-GLA ms/token | Liger speed-up | Transformer state | Liger state |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &ctx in &args.contexts {
        let t = rows
            .iter()
            .find(|r| r.model == "transformer" && r.context == ctx)
            .unwrap();
        let l = rows
            .iter()
            .find(|r| r.model == "liger-gla" && r.context == ctx)
            .unwrap();
        println!(
            "| {ctx} | {:.2} | {:.2} | {:.2}x | {:.1} MiB | {:.2} MiB |",
            t.ms_per_token,
            l.ms_per_token,
            t.ms_per_token / l.ms_per_token,
            t.state_bytes as f64 / (1 << 20) as f64,
            l.state_bytes as f64 / (1 << 20) as f64
        );
    }
    let first = rows
        .iter()
        .find(|r| r.model == "liger-gla")
        .unwrap()
        .ms_per_token;
    let last = rows
        .iter()
        .rev()
        .find(|r| r.model == "liger-gla")
        .unwrap()
        .ms_per_token;
    println!(
        "\nLiger decode latency at the largest context / the smallest: {:.2}x",
        last / first
    );
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"model": r.model, "context": r.context,
                "ms_per_token": r.ms_per_token, "state_bytes": r.state_bytes})
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap())
            .map_err(|e| liger_model::Error::io(path, e))?;
    }
    Ok(())
}
